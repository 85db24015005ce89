"""Does ``make bench-gate`` pass on an unchanged tree? Run it repeatedly and print the ratios.

A regression gate that fails on noise is worse than none: people learn to rebaseline it. This
runs the gate's own command (``benchmarks/test_runtime_speed.py`` with pytest-benchmark's
``--benchmark-autosave``, then ``--benchmark-compare`` and ``--benchmark-compare-fail`` with the
contract's rule) ``--runs`` times against a fresh storage whose first run is the baseline, with
nothing changed in between, and prints every benchmark's mean over the baseline's per run, the
worst ratio, and each run's verdict. Each run is compared with the last good saved one and a
failing run is set aside, as the gate does; the table shows each run against the baseline.

    .venv/bin/python benchmarks/gate_stability.py --runs 6 -k 512
    .venv/bin/python benchmarks/gate_stability.py --artifacts /tmp/fresh/artifacts --runs 6 -k 512

It times things, so it is a script, never a test; it exits 1 when any compared run failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rule(contracts: Path) -> str:
    from kdcontracts.families import load

    return load(contracts / "runtime_budget.yaml").benchmarks.regression


def _means(storage: Path) -> list[dict[str, float]]:
    """Every saved run, oldest first: benchmark name -> mean seconds."""
    runs = sorted((p for p in storage.rglob("*") if p.name[:4].isdigit() and p.name.endswith((".json", ".json.regressed"))),
                  key=lambda p: p.name)
    return [{b["name"]: b["stats"]["mean"] for b in json.loads(p.read_text(encoding="utf-8"))["benchmarks"]} for p in runs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=6, help="runs after the baseline (default 6)")
    parser.add_argument("--artifacts", type=Path, default=ROOT / "artifacts")
    parser.add_argument("--contracts", type=Path, default=ROOT / "contracts")
    parser.add_argument("--keep", type=Path, default=None, help="keep the runs in this storage folder (default: a temporary one)")
    parser.add_argument("-k", dest="keyword", default=None, help="pytest -k: a subset of the cases, e.g. 512")
    args = parser.parse_args(argv)
    rule = _rule(args.contracts)
    with contextlib.ExitStack() as stack:
        storage = str(args.keep.resolve()) if args.keep else stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-gate-"))
        command = [sys.executable, "-m", "pytest", str(ROOT / "benchmarks" / "test_runtime_speed.py"), "-q", "-p", "no:cacheprovider",
                   "--kd-contracts", str(args.contracts), "--kd-artifacts", str(args.artifacts),
                   f"--benchmark-storage=file://{storage}", "--benchmark-autosave", *(["-k", args.keyword] if args.keyword else [])]
        verdicts = []
        for index in range(args.runs + 1):
            compare = ["--benchmark-compare", f"--benchmark-compare-fail={rule}"] if index else []
            done = subprocess.run(command + compare, cwd=ROOT, capture_output=True, text=True)
            if index == 0 and done.returncode:
                sys.stdout.write(done.stdout[-4000:] + done.stderr[-4000:])
                return 2
            verdicts.append("baseline" if index == 0 else ("passed" if done.returncode == 0 else "FAILED"))
            if verdicts[-1] == "FAILED":  # set aside, as the gate does: the next run compares with the last good one
                newest = max(Path(storage).rglob("*.json"), key=lambda p: p.name)
                newest.rename(newest.with_name(newest.name + ".regressed"))
            print(f"run {index}: {verdicts[-1]}", flush=True)
        means = _means(Path(storage))
    names = sorted(means[0])
    width = max(map(len, names))
    print(f"\nmean / baseline mean, per run (gate: {rule} against the previous run)")
    print(f"{'benchmark':{width}s} " + " ".join(f"{f'run {i}':>7s}" for i in range(1, len(means))) + f" {'worst':>7s}")
    for name in names:
        ratios = [run.get(name, float("nan")) / means[0][name] for run in means[1:]]
        print(f"{name:{width}s} " + " ".join(f"{r:7.3f}" for r in ratios) + f" {max(ratios):7.3f}")
    print("verdicts: " + ", ".join(verdicts))
    return 1 if "FAILED" in verdicts else 0


if __name__ == "__main__":
    sys.exit(main())
