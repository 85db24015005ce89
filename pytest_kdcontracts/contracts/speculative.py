"""``speculative.yaml``: the drafter/worker pairs, re-judged from the speculative stage's report.

The stage (``kdtrain pipeline --stages speculative``) recorded, per run (pair x length x
backend) and held-out prompt, the worker's plain greedy tokens and the speculative decoding's
tokens and verifications. These items check that a run's record belongs to this folder and
contract (the packages, tokenizers, cases and teacher it measured; the settings it used), then
recompute every figure from it with the contract's current bounds:

- ``exact[<pair>-<L>-<backend>]``: every prompt's speculative tokens are the worker's plain
  greedy tokens, at every length;
- ``acceptance[<pair>-<backend>]``: acceptance rate and mean accepted length per verification at
  least their floors, over the pair's runs at every length (the contract deals the prompts over
  the lengths; the figures are printed in the kdcontracts summary);
- ``segments[<pair>-<backend>]``: the accepted fraction of a segment within its band (segments
  neither so short that verification is wasted nor so long that most of each is rejected);
- ``self[<pair>-<backend>]``: a self pair (the drafter drafting for itself) accepts every drafted token.
"""

from __future__ import annotations

import json
from functools import partial
from typing import Iterator

from kdcontracts.models.speculative import TEACHER, Pool, Run, SpeculativeContract
from kdtrain.artifact_table import SPECULATIVE_PLOT, SPECULATIVE_REPORT, coreml_package
from pytest_kdcontracts.check import Check, fail

RERUN = "re-run: kdtrain pipeline --stages speculative"


def _title(run: Run | Pool) -> str:
    if isinstance(run, Pool):
        return f"speculative pair {run.pair.name} [{run.backend}] over L={'/'.join(str(r.length) for r in run.runs)}"
    return f"speculative pair {run.pair.name} at L={run.length} [{run.backend}]"


def _current(kd_artifacts, name: str) -> str | None:
    """What a recorded input is now: an artifact's SHA-256, or the teacher version its stage filled the cache with."""
    if name == TEACHER:
        stage = kd_artifacts.manifest.stages.get("teacher")
        return stage.settings.get("teacher") if stage else None
    entry = kd_artifacts.manifest.artifacts.get(name)
    return f"sha256:{entry.sha256}" if entry else None


def run_record(c: SpeculativeContract, run: Run, kd_artifacts) -> dict:
    """The report's record of ``run``, provided it measured this folder's artifacts with this contract's settings."""
    path = kd_artifacts.path(SPECULATIVE_REPORT)
    runs = json.loads(path.read_text(encoding="utf-8"))["runs"]
    record = next((r for r in runs if (r["pair"], r["length"], r["backend"]) == (run.pair.name, run.length, run.backend)), None)
    if record is None:
        recorded = ["{pair}-{length}-{backend}".format(**r) for r in runs]
        fail(c.file.name, f"{_title(run)} ({path})", "a recorded run", f"none; it records {recorded}", RERUN)
    if record["settings"] != c.settings(run.pair):
        fail(c.file.name, f"{_title(run)} ({path})", f"measured with this contract's settings {c.settings(run.pair)}",
             record["settings"], RERUN)
    drafter = kd_artifacts.exported_student() if run.backend == "torch" else coreml_package(run.length, run.pair.drafter)
    inputs = {drafter.name: None, **record["inputs"]}  # the drafter's own artifact at least
    stale = {name: f"recorded {value}, now {_current(kd_artifacts, name)}" for name, value in inputs.items()
             if _current(kd_artifacts, name) != value}
    if stale:
        fail(c.file.name, f"{_title(run)} ({path})", "a measurement of this folder's artifacts", stale, RERUN)
    return record


def _pooled(c: SpeculativeContract, pool: Pool, kd_artifacts):
    """The pool's figures, from every one of its runs' records (each must be current)."""
    from kdtrain.runtime.speculative import SpeculativeMetrics

    return SpeculativeMetrics.of_records(run_record(c, run, kd_artifacts) for run in pool.runs)


def _judge(c: SpeculativeContract, pool: Pool, judgements, metrics) -> None:
    failed = [j for j in judgements if not j.passed]
    if failed:
        fail(c.file.name, f"{_title(pool)}: " + ", ".join(j.item for j in failed),
             "; ".join(f"{j.item.split('[')[1][:-1]} {j.expected}" for j in failed),
             "; ".join(f"{j.value}" for j in failed), metrics.line())


def check_exact(c: SpeculativeContract, run: Run, kd_artifacts, kd_report) -> None:
    from kdtrain.runtime.speculative import first_difference

    record, tolerance = run_record(c, run, kd_artifacts), c.tolerance(run.pair, run.backend)
    ties, wrong = [], []
    for p in record["prompts"]:
        at = first_difference(p["plain"], p["speculative"]["tokens"])
        if at is None:
            continue
        recorded = p.get("divergence") or {}
        margin = recorded.get("margin") if recorded.get("at") == at else None
        (ties if margin is not None and margin < tolerance else wrong).append((p, at, margin))
    exact = len(record["prompts"]) - len(ties) - len(wrong)
    tied = f", {len(ties)} left it at a tie (worker's margin {max(m for _, _, m in ties):.3g} < {tolerance:g})" if ties else ""
    kd_report(f"{_title(run)}: {exact}/{len(record['prompts'])} prompts token for token{tied}")
    if wrong:
        p, at, margin = wrong[0]
        fail(c.file.name, f"{_title(run)}, prompt {p['case']} ({p['prompt_tokens']} tokens), new token {at}",
             f"the worker's plain greedy token {p['plain'][at:at + 1]} (then {p['plain'][at + 1:at + 4]}...), or a tie "
             f"(its margin < {tolerance:g})",
             f"{p['speculative']['tokens'][at:at + 4]}, worker's margin {margin}"
             + (f"; {len(wrong) - 1} more prompt(s) differ" if len(wrong) > 1 else ""),
             "speculative decoding must never change the output: a verifier that accepts what the worker would not have chosen")


def check_acceptance(c: SpeculativeContract, pool: Pool, kd_artifacts, kd_report) -> None:
    metrics = _pooled(c, pool, kd_artifacts)
    kd_report(f"{_title(pool)}: {metrics.line()} (plot: {kd_artifacts.path(SPECULATIVE_PLOT)})")
    _judge(c, pool, c.judge_acceptance(pool.pair, metrics.to_json()), metrics)


def check_segments(c: SpeculativeContract, pool: Pool, kd_artifacts) -> None:
    metrics = _pooled(c, pool, kd_artifacts)
    _judge(c, pool, c.judge_segments(pool.pair, metrics.to_json()), metrics)


def check_self(c: SpeculativeContract, pool: Pool, kd_artifacts, kd_report) -> None:
    metrics = _pooled(c, pool, kd_artifacts)
    kd_report(f"{_title(pool)}: {metrics.line()} (plot: {kd_artifacts.path(SPECULATIVE_PLOT)})")
    _judge(c, pool, c.judge_self(pool, metrics.to_json()), metrics)


def checks(c: SpeculativeContract) -> Iterator[Check]:
    from kdtrain.runtime.backend import backend_name

    for run in c.runs(backend_name()):
        yield Check("exact", run.params, partial(check_exact, c, run), ("kd_artifacts", "kd_report"))
    for pool in c.pools(backend_name()):
        if pool.pair.bounds is not None:
            yield Check("acceptance", pool.params, partial(check_acceptance, c, pool), ("kd_artifacts", "kd_report"))
            yield Check("segments", pool.params, partial(check_segments, c, pool), ("kd_artifacts",))
        if pool.pair.is_self:
            yield Check("self", pool.params, partial(check_self, c, pool), ("kd_artifacts", "kd_report"))
