"""``judge.yaml``: what a judge must show before its verdicts gate anything.

A judge (the teacher, or a student distilled into the judge role) compares two outputs for a
task. It is held to objective signals on a seeded probe set (``kdtrain.judge.probes``):

- ``consistency``: the share of pairs judged the same way in both orders (MT-Bench's
  conservative rule: only such a verdict counts; the others are ties);
- ``position_bias``: the share of all verdicts that chose position A (0.5 is unbiased);
- ``agreement``: consistent verdicts that pick the objectively better output, among consistent
  verdicts; ``agreement_all``: the same over all pairs (ties count against);
- ``spearman``, ``kendall``: rank correlation of the judge's pointwise scores with an objective
  metric (fraction of unit tests passed, of required arguments given);
- ``length_preference``: among consistent verdicts on two equally correct answers, the share
  won by the longer.

Every bound is judged. A figure can be undefined (no consistent verdict to take a share of):
that fails a floor, which asks for evidence of quality, and passes a ceiling, since no verdict
shows the bias it caps (``consistency`` is what fails such a judge).

``known_unfit`` names the items a judge is known to fail, and why (the reference's 135M
teacher cannot judge). Its bounds stay the real ones: the plugin runs those items as strict
xfails (a pass fails, so the entry gets revisited) and the stage logs them as known unfit.
The judging lives here so that the stage and the plugin apply one rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from kdcontracts.errors import ContractFileError, Problem
from kdcontracts.models.gates import Bound, Judgement

JUDGES = ("teacher", "student")
# item -> the metrics it judges
ITEMS: dict[str, tuple[str, ...]] = {
    "consistency": ("consistency",),
    "position_bias": ("position_bias",),
    "agreement": ("agreement", "agreement_all"),
    "rank_correlation": ("spearman", "kendall"),
    "length_bias": ("length_preference",),
}
METRICS = tuple(m for metrics in ITEMS.values() for m in metrics)


@dataclass(frozen=True)
class ProbeSettings:
    seed: int
    pairs_per_kind: int  # of each pair kind: code, tool_call, exact, length
    graded_tasks: int  # tasks with outputs at several levels, for rank correlation

    def as_dict(self) -> dict:
        return {"seed": self.seed, "pairs_per_kind": self.pairs_per_kind, "graded_tasks": self.graded_tasks}


@dataclass(frozen=True)
class KnownUnfit:
    """Items a judge is known to fail under the real bounds, and what was measured."""

    reason: str
    items: tuple[str, ...]


@dataclass(frozen=True)
class JudgeContract:
    file: Path
    judges: tuple[str, ...]
    probes: ProbeSettings
    batch_size: int  # prompts per forward pass of a local judge
    bounds: Mapping[str, Bound]  # metric -> bound
    known_unfit: Mapping[str, KnownUnfit]  # judge -> the items it is known to fail

    def unfit_reason(self, judge: str, item: str) -> str | None:
        """Why ``judge`` is known to fail ``item`` (an item of :data:`ITEMS`), or None."""
        unfit = self.known_unfit.get(judge)
        return unfit.reason if unfit is not None and item in unfit.items else None

    def judge(self, judge: str, metrics: Mapping[str, float | None], support: Mapping[str, str]) -> list[Judgement]:
        """One judgement per metric, named by its item (``agreement[teacher]``); ``support`` says what each figure counts."""
        found = []
        for item, names in ITEMS.items():
            for name in names:
                bound, value = self.bounds[name], metrics.get(name)
                detail = f"over {support.get(name, '?')}"
                if value is None:
                    ceiling = bound.min is None
                    why = "no verdict shows the bias it caps" if ceiling else "no evidence of the quality it asks for"
                    found.append(Judgement(f"{item}[{judge}]", None, f"{name} {bound}", ceiling, f"{detail}: undefined, {why}"))
                else:
                    found.append(Judgement(f"{item}[{judge}]", value, f"{name} {bound}", bound.holds(value), detail))
        return found


def _known_unfit(data: dict, problems: list[Problem]) -> dict[str, KnownUnfit]:
    """``known_unfit``: judge -> {reason, items}, each judge one ``judges`` lists, each item one of :data:`ITEMS`."""
    found = {}
    for judge, entry in data.get("known_unfit", {}).items():
        if judge not in data["judges"]:
            problems.append(Problem(f"known_unfit.{judge}", f"a judge listed in judges {data['judges']}", repr(judge)))
        for i, item in enumerate(entry["items"]):
            if item not in ITEMS:
                problems.append(Problem(f"known_unfit.{judge}.items[{i}]", f"an item of {list(ITEMS)}", repr(item)))
        found[judge] = KnownUnfit(entry["reason"], tuple(entry["items"]))
    return found


def parse(path: Path, data: dict) -> JudgeContract:
    bounds, problems = {}, []
    for name in METRICS:
        bounds[name] = Bound.of(data["bounds"][name])
        problems += bounds[name].problems(f"bounds.{name}")
    known_unfit = _known_unfit(data, problems)
    if problems:
        raise ContractFileError(str(path), problems)
    p = data["probes"]
    return JudgeContract(path, tuple(data["judges"]), ProbeSettings(p["seed"], p["pairs_per_kind"], p["graded_tasks"]),
                         data["batch_size"], bounds, known_unfit)
