"""Every command the README shows, run as a user types it (a subprocess) on a copy of the small
reference artifacts: each exits 0, and none prints a traceback from our code."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, TEST_REFERENCE_RUN, _link_unless_appendable, write_distill_config

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def folder(tmp_path_factory, reference_artifacts, test_contracts) -> Path:
    """A private copy (hard links; stages replace files, never edit them) and its contracts."""
    root = tmp_path_factory.mktemp("readme")
    shutil.copytree(reference_artifacts, root / "artifacts", copy_function=_link_unless_appendable)
    shutil.copytree(test_contracts, root / "contracts")
    shutil.copytree(REPO / "golden", root / "golden")  # the contracts' golden folder is ../golden
    # The configuration the build's mini run used: the README's full run starts on its verdict.
    write_distill_config(root / "distill.yaml", root / "artifacts", **TEST_REFERENCE_RUN)
    return root


def run(*command: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}:\n{output[-4000:]}"
    assert "Traceback (most recent call last)" not in output, f"{' '.join(command)} printed a traceback:\n{output[-4000:]}"
    return done


# convert and quantize re-convert every length (minutes on two cores): `make test-all` runs them.
@pytest.mark.parametrize("stage", ["export", pytest.param("convert", marks=pytest.mark.slow), pytest.param("quantize", marks=pytest.mark.slow)])
def test_one_stage_alone(folder, stage):
    done = run("kdtrain", stage, "--out", str(folder / "artifacts"), "--contracts", str(folder / "contracts"))
    assert "artifacts written to" in done.stdout


@pytest.mark.slow  # the gates stage runs in every reference build; this is its command-line spelling (47 s)
def test_evaluate_writes_the_verdict(folder):
    done = run("kdtrain", "evaluate", "--out", str(folder / "artifacts"), "--contracts", str(folder / "contracts"),
               "--config", str(folder / "distill.yaml"))
    assert "artifacts written to" in done.stdout and "gate verdict: passed" in done.stderr


@pytest.mark.slow  # the judge stage runs in every reference build; this is its command-line spelling (loads the teacher)
def test_judge_writes_the_report(folder):
    done = run("kdtrain", "judge", "--out", str(folder / "artifacts"), "--contracts", str(folder / "contracts"),
               "--config", str(folder / "distill.yaml"))
    assert "artifacts written to" in done.stdout and "stage judge: probe_set" in done.stderr


def test_budget_writes_the_runtime_config_and_logs_the_table(folder):
    done = run("kdtrain", "budget", "--out", str(folder / "artifacts"), "--contracts", str(folder / "contracts"))
    assert "artifacts written to" in done.stdout and "sessions" in done.stderr and "yi-1.5-9b" in done.stderr


def test_pipeline_with_a_subset_of_stages(folder):
    done = run("kdtrain", "pipeline", "--out", str(folder / "artifacts"), "--contracts", str(folder / "contracts"),
               "--distill-config", str(folder / "distill.yaml"), "--stages", "data")
    assert "artifacts written to" in done.stdout


def test_distill_resumes_a_run_folder(folder):
    done = run("kdtrain", "distill", "--config", str(folder / "distill.yaml"), "--run-dir", str(folder / "run"), "--steps", "1")
    assert "step 1 of 3" in done.stdout
    assert "gate verdict" in done.stderr and "passed for this configuration" in done.stderr  # the unlock, logged


def test_fingerprint(folder):
    from kdtrain.tokenizers.fingerprint import tokenizer_fingerprint

    path = folder / "artifacts/tokenizers/student"
    assert run("kdtrain", "fingerprint", str(path)).stdout == f"{tokenizer_fingerprint(path)}  {path}\n"


def test_data_commands(folder, tmp_path):
    run("kdtrain", "build-corpus", "--out", str(tmp_path / "raw"), "--per-scenario", "1")
    done = run("kdtrain", "validate-data", str(tmp_path / "raw"), "--out", str(tmp_path / "valid"))
    assert "validated" in done.stdout
    done = run("kdtrain", "migrate-data", str(tmp_path / "valid"), "--out", str(tmp_path / "migrated"))
    assert "written to" in done.stdout


@pytest.mark.slow  # runs the golden and ablation items in a fresh pytest: `make test-all`
def test_make_golden_rewrites_the_snapshots(folder):
    shutil.rmtree(folder / "golden/coreml_contract")
    make("golden", folder)
    assert sorted(p.name for p in (folder / "golden/coreml_contract").iterdir()) == [
        f"golden[{fn}-{length}].npz" for fn in ("decode", "prefill", "verify") for length in (128, 64)]


@pytest.mark.slow  # the benchmarks take minutes by design: `make test-all`
def test_make_bench_prints_its_ratios(folder):
    done = make("bench", folder)
    assert "MIL/torch TTFT" in done.stdout and "KD overhead" in done.stdout


@pytest.mark.slow  # two runs of the runtime benchmarks: `make test-all`
def test_make_bench_gate_saves_a_baseline_then_compares(folder):
    """The verdict of the comparison depends on this machine's noise, so only the mechanism is
    pinned here (tests/test_runtime_gate.py plants the slowdown)."""
    storage = folder / "bench-storage"
    done = make("bench-gate", folder, f"BENCH_STORAGE={storage}")
    assert "saving a baseline for this machine" in done.stdout
    assert len(list(storage.glob("*/0001_*.json"))) == 1
    second = subprocess.run(["make", *_make_args("bench-gate", folder, f"BENCH_STORAGE={storage}")], cwd=REPO,
                            capture_output=True, text=True, timeout=1800)
    assert "comparing with" in second.stdout and "Traceback (most recent call last)" not in second.stdout + second.stderr


def _make_args(target: str, folder: Path, *variables: str) -> list[str]:
    artifacts, venv = folder / "artifacts", Path(sys.executable).parent.parent
    return ["-o", f"{venv}/.kdcontracts-installed", "-o", f"{artifacts}/manifest.json", target,
            f"VENV={venv}", f"ARTIFACTS={artifacts}", f"CONTRACTS={folder / 'contracts'}", *variables]


def make(target: str, folder: Path, *variables: str) -> subprocess.CompletedProcess:
    """``make TARGET`` on this folder; the install and the artifacts count as made (-o)."""
    return run("make", *_make_args(target, folder, *variables))
