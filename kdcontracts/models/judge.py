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

A bound may be ``null``: the figure is reported, not judged. A figure can be undefined (no
consistent verdict to take a share of): that fails a floor, which asks for evidence of
quality, and passes a ceiling, since no verdict shows the bias it caps (``consistency`` is
what fails such a judge). The judging lives here so that the stage and the plugin apply one rule.
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
class JudgeContract:
    file: Path
    judges: tuple[str, ...]
    probes: ProbeSettings
    batch_size: int  # prompts per forward pass of a local judge
    bounds: Mapping[str, Bound | None]  # metric -> bound; None: reported, not judged

    def judge(self, judge: str, metrics: Mapping[str, float | None], support: Mapping[str, str]) -> list[Judgement]:
        """One judgement per metric, named by its item (``agreement[teacher]``); ``support`` says what each figure counts."""
        found = []
        for item, names in ITEMS.items():
            for name in names:
                bound, value = self.bounds[name], metrics.get(name)
                detail = f"over {support.get(name, '?')}"
                if bound is None:
                    found.append(Judgement(f"{item}[{judge}]", value, f"{name} (bound null: reported, not judged)", True, detail))
                elif value is None:
                    ceiling = bound.min is None
                    why = "no verdict shows the bias it caps" if ceiling else "no evidence of the quality it asks for"
                    found.append(Judgement(f"{item}[{judge}]", None, f"{name} {bound}", ceiling, f"{detail}: undefined, {why}"))
                else:
                    found.append(Judgement(f"{item}[{judge}]", value, f"{name} {bound}", bound.holds(value), detail))
        return found


def parse(path: Path, data: dict) -> JudgeContract:
    bounds, problems = {}, []
    for name in METRICS:
        raw = data["bounds"][name]
        bounds[name] = None if raw is None else Bound(raw.get("min"), raw.get("max"))
        if raw is not None and raw.get("min") is not None and raw.get("max") is not None and raw["min"] > raw["max"]:
            problems.append(Problem(f"bounds.{name}", "min <= max", f"min {raw['min']} > max {raw['max']}"))
    if problems:
        raise ContractFileError(str(path), problems)
    p = data["probes"]
    return JudgeContract(path, tuple(data["judges"]), ProbeSettings(p["seed"], p["pairs_per_kind"], p["graded_tasks"]),
                         data["batch_size"], bounds)
