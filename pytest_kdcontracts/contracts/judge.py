"""``judge.yaml``: the judge(s) against objective signals, re-judged from the artifacts.

The judge stage recorded every verdict's log-probabilities (both orders of every pair) and
every pointwise score. These items recompute the figures from those records
(:func:`kdtrain.judge.metrics.judge_metrics`) with the contract's current bounds, after
checking that the report belongs to this folder's probe set and judge:

- ``probes``: the probe set was built with the contract's settings, shares no task with the
  training prompts, and every output's objective metric measures again as recorded;
- ``consistency[<judge>]``, ``position_bias[<judge>]``, ``agreement[<judge>]``,
  ``rank_correlation[<judge>]``, ``length_bias[<judge>]``: the figures against their bounds,
  printed in the kdcontracts summary.

An item the contract's ``known_unfit`` lists for its judge runs all the same, under the same
bounds, marked ``xfail(strict=True, raises=OutOfBounds)``: a figure out of its bound shows as
XFAIL with the contract's reason ("known unfit" in the summary), a pass fails the run (strict
XPASS: the entry is out of date), and anything else (a missing report, a report on other probes
or another judge) fails as it would without the entry.
"""

from __future__ import annotations

import json
from functools import partial
from typing import Iterator

import pytest

from kdcontracts.models.judge import ITEMS, JudgeContract
from kdtrain.artifact_table import DATA_CORPUS, JUDGE_PROBES, JUDGE_REPORT
from pytest_kdcontracts.check import Check, fail
from pytest_kdcontracts.errors import ContractViolation

RERUN = "re-run: kdtrain pipeline --stages judge"


class OutOfBounds(ContractViolation):
    """A judge's figure breaks its bound: the one failure a ``known_unfit`` entry expects."""


def _probes(c: JudgeContract, kd_artifacts):
    from kdtrain.errors import KDError
    from kdtrain.judge.probes import ProbeSet

    try:
        return ProbeSet.load(kd_artifacts.path(JUDGE_PROBES))
    except KDError as exc:
        fail(c.file.name, f"judge probe set ({kd_artifacts.path(JUDGE_PROBES)})", "a probe set that verifies", exc, RERUN)


def _report(c: JudgeContract, kd_artifacts, judge: str) -> dict:
    """The judge's part of the report, provided it judged this folder's probe set as this folder's judge ``judge``."""
    from kdtrain.judge.stage import judge_identity

    path = kd_artifacts.path(JUDGE_REPORT)
    report = json.loads(path.read_text(encoding="utf-8"))
    probes = f"sha256:{kd_artifacts.entry(JUDGE_PROBES).sha256}"
    if report.get(JUDGE_PROBES.name) != probes:
        fail(c.file.name, f"judge report ({path})", f"verdicts on this folder's probe set ({probes})", report.get(JUDGE_PROBES.name),
             f"a report on other probes says nothing about these; {RERUN}")
    found = report.get("judges", {}).get(judge)
    identity = judge_identity(kd_artifacts, judge)
    if found is None or found.get("identity") != identity:
        fail(c.file.name, f"judge report ({path}), judge {judge}", f"the verdicts of {identity}",
             "none" if found is None else found.get("identity"), f"a report on another judge says nothing about this one; {RERUN}")
    return found


def check_probes(c: JudgeContract, kd_artifacts) -> None:
    from kdtrain.data.corpus import Corpus
    from kdtrain.data.registry import load_registry
    from kdtrain.data.scenario_cases import normalise
    from kdtrain.judge.probes import remeasure, training_prompts

    probes, where = _probes(c, kd_artifacts), f"judge probe set ({kd_artifacts.path(JUDGE_PROBES)})"
    if probes.settings != c.probes.as_dict():
        fail(c.file.name, where, f"built with {c.probes.as_dict()}", probes.settings, RERUN)
    if DATA_CORPUS.name in kd_artifacts.manifest.artifacts:
        training = training_prompts(Corpus.load(kd_artifacts.path(DATA_CORPUS)))
        seen = [p.id for p in (*probes.pairs, *probes.graded) if normalise(p.task) in training]
        if seen:
            fail(c.file.name, where, "no task that is a training prompt", seen[:5], "a judge is calibrated on data it has not seen")
    problems = remeasure(probes, load_registry(c.file.parent / "tool_registry.json"))
    if problems:
        fail(c.file.name, where, "every output's objective metric as recorded", problems[:3],
             f"{len(problems)} output(s) measure otherwise: the probe set no longer says which output is better")


def check_item(c: JudgeContract, item: str, judge: str, kd_artifacts, kd_report) -> None:
    from kdtrain.judge.metrics import judge_metrics, support

    record = _report(c, kd_artifacts, judge)
    metrics = judge_metrics(_probes(c, kd_artifacts), record["pairwise"], record["pointwise"])
    mine = [j for j in c.judge(judge, metrics["overall"], support(metrics)) if j.item == f"{item}[{judge}]"]
    failing = "known unfit" if c.unfit_reason(judge, item) else "FAIL"
    for j in mine:
        value = "undefined" if j.value is None else f"{j.value:.3f}"
        kd_report(f"judge {j.item:26s} {value:>9s}  {'ok' if j.passed else failing:4s}  {j.expected} ({j.detail})")
    if item == "consistency":
        per_kind = ", ".join(f"{k} {m['consistency']:.2f}" for k, m in metrics["kinds"].items())
        kd_report(f"judge {judge}: consistency per kind: {per_kind}; {record['forward_passes']} forward passes in {record['seconds']} s")
    failed = [j for j in mine if not j.passed]
    if failed:
        j = failed[0]
        found = "undefined" if j.value is None else round(j.value, 4)
        fail(c.file.name, j.item, j.expected, f"{found} ({j.detail})" + (f"; also failed: {[f.expected for f in failed[1:]]}" if failed[1:] else ""),
             error=OutOfBounds)


def checks(c: JudgeContract) -> Iterator[Check]:
    yield Check("probes", (), partial(check_probes, c), ("kd_artifacts",),
                doc="the probe set: the contract's settings, held out from training, objective metrics that measure again")
    for judge in c.judges:
        for item in ITEMS:
            reason = c.unfit_reason(judge, item)
            marks = () if reason is None else (pytest.mark.xfail(strict=True, raises=OutOfBounds, reason=f"known unfit: {reason}"),)
            yield Check(item, (judge,), partial(check_item, c, item, judge), ("kd_artifacts", "kd_report"), marks)
