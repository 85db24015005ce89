"""`make bench-gate`'s mechanism on the runtime benchmarks (benchmarks/test_runtime_speed.py):
pytest-benchmark, comparing with a saved run, fails on a planted slowdown and passes a run that
did not regress. No assertion depends on how fast this machine is: the planted sleep is twice
the saved mean, and the passing comparison is against a saved mean made 100x larger.

One cheap case (the MIL executor's FP16 TTFT at the smallest length) against the reference
artifacts, through pytester in-process runs, each with its own benchmark storage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE = REPO / "benchmarks/test_runtime_speed.py"

SLOWDOWN = '''
"""A planted slowdown: every call into the MIL executor sleeps first."""
import time

import pytest

from kdtrain.runtime.backend import MILSession


@pytest.fixture(autouse=True)
def _slow_mil(monkeypatch):
    predict = MILSession.predict

    def slow(self, function, inputs, state):
        time.sleep({seconds!r})
        return predict(self, function, inputs, state)

    monkeypatch.setattr(MILSession, "predict", slow)
'''


@pytest.mark.filterwarnings("ignore:Can't compare. No benchmark files")  # the first run's, expected
def test_gate_fails_on_a_planted_slowdown_and_passes_a_run_that_did_not_regress(pytester, test_contracts, reference_artifacts):
    from kdcontracts.families import load

    contract = load(test_contracts / "runtime_budget.yaml")
    rule = contract.benchmarks.regression
    case = f"test_ttft[mil-reference-fp16-{min(contract.contexts)}]"
    shutil.copy(MODULE, pytester.path / MODULE.name)
    storage = pytester.path / "benchmarks-storage"

    def bench(*args: str):
        return pytester.runpytest_inprocess(
            f"{MODULE.name}::{case}", "--kd-contracts", str(test_contracts), "--kd-artifacts", str(reference_artifacts),
            "-p", "no:cacheprovider", f"--benchmark-storage=file://{storage}", *args)

    # `make bench-gate`'s comparing command on a machine with no saved run: pytest-benchmark 5 saves
    # the run, then refuses to compare (why the target saves a baseline without comparing first).
    result = bench("--benchmark-autosave", "--benchmark-compare", f"--benchmark-compare-fail={rule}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: --benchmark-compare-fail requires valid --benchmark-compare."])
    result.stdout.fnmatch_lines(["*test_runtime_speed.py .*"])  # the benchmark itself passed
    [saved] = storage.glob("*/0001_*.json")
    baseline = json.loads(saved.read_text())
    assert [b["fullname"].split("::")[-1] for b in baseline["benchmarks"]] == [case]
    assert baseline["benchmarks"][0]["extra_info"]["backend"] == "mil-reference"
    # The gate's clock may count reference workloads (clock: machine); the round's seconds are here.
    seconds = baseline["benchmarks"][0]["extra_info"]["ttft_ms"] / 1e3

    # Every timed call now sleeps twice the saved mean first: +100% at least, past the rule (+20%).
    # A sleep does not slow the reference workload, so it moves a machine clock's ratio as much.
    pytester.makeconftest(SLOWDOWN.format(seconds=2 * seconds))
    result = bench("--benchmark-compare", f"--benchmark-compare-fail={rule}")
    assert result.ret != 0  # the benchmark passed; the comparison, in the terminal summary, fails the run
    verdict = pytest.LineMatcher(result.outlines + result.errlines)  # pytest-benchmark writes it to stderr
    verdict.fnmatch_lines(["Performance has regressed:",
                           f"*{_glob(case)} (0001_*) - Field 'mean' has failed PercentageRegressionCheck: *"])

    # The same run, not slowed, against a baseline whose mean is 100x larger: a faster run passes.
    (pytester.path / "conftest.py").unlink()
    for bench_stats in baseline["benchmarks"]:
        bench_stats["stats"]["mean"] *= 100
    saved.write_text(json.dumps(baseline))
    result = bench("--benchmark-compare", f"--benchmark-compare-fail={rule}")
    result.assert_outcomes(passed=1)
    assert result.ret == 0 and "Performance has regressed" not in result.stdout.str() + result.stderr.str()
    result.stdout.fnmatch_lines(["*runtime speed (benchmarks/test_runtime_speed.py)*", "*mil-reference  fp16 *"])


def _glob(text: str) -> str:
    """``text`` as a literal in an fnmatch pattern (a test id's brackets are a character class there)."""
    return text.replace("[", "\0").replace("]", "[]]").replace("\0", "[[]")
