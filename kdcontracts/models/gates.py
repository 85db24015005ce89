"""``gates.yaml``: what a checkpoint must show before a full run may spend money.

Three gates, each a list of bounds on measured values:

- ``halt``: the halt head on a held-out calibration set (AUC, ECE, early stops, effective
  against reference length at the host's threshold);
- ``curriculum``: every curriculum stage's telemetry (answer length against the teacher's
  not collapsing from one stage to the next, the head not firing before the stop);
- ``scenarios``: the student on canonical held-out tasks, against the teacher (a fraction of
  its rate) and an absolute floor.

The judging lives here, beside the bounds, so that ``kdtrain evaluate`` (which writes the
verdict the trainer reads) and the plugin (which re-judges the artifacts) apply one rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from kdcontracts.errors import Problem


@dataclass(frozen=True)
class Bound:
    """A contract's ``{min, max}`` on a measured value; either side may be absent (or null)."""

    min: float | None = None
    max: float | None = None

    @classmethod
    def of(cls, data: Mapping) -> "Bound":
        return cls(data.get("min"), data.get("max"))

    def problems(self, key: str) -> list[Problem]:
        """A bound no value can hold (min above max), located at ``key``."""
        if self.min is not None and self.max is not None and self.min > self.max:
            return [Problem(key, "min <= max", f"min {self.min} > max {self.max}")]
        return []

    def holds(self, value: float | None) -> bool:
        if value is None or value != value:  # no value (or NaN) never passes a bound
            return False
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)

    def __str__(self) -> str:
        if self.min is not None and self.max is not None:
            return f"in [{self.min:g}, {self.max:g}]"
        return f">= {self.min:g}" if self.min is not None else f"<= {self.max:g}"


@dataclass(frozen=True)
class Judgement:
    """One gate item's outcome: ``item`` is its test id (``halt_auc``, ``scenario[tool_chain-chain_complete]``)."""

    item: str
    value: float | None
    expected: str
    passed: bool
    detail: str = ""

    def to_json(self) -> dict:
        return {"item": self.item, "value": self.value, "expected": self.expected, "passed": self.passed, "detail": self.detail}


@dataclass(frozen=True)
class CalibrationSet:
    bases_per_scenario: int
    seed: int


@dataclass(frozen=True)
class HaltGate:
    calibration_set: CalibrationSet
    threshold: float  # a host stops after the first token whose P(halt) reaches it
    tolerance_tokens: int  # stopping this close to the labelled stop is on time
    auc: Bound
    ece: Bound
    early_stop_rate: Bound
    length_ratio: Bound

    # metric key in kdtrain.gates.halt.halt_metrics -> item name
    ITEMS = (("auc", "halt_auc"), ("ece", "halt_ece"), ("early_stop_rate", "halt_early_stop"), ("length_ratio", "halt_length"))


@dataclass(frozen=True)
class CurriculumGate:
    max_length_drop: float  # relative fall of (student / teacher length) from one stage to the next
    max_early_halt: float  # held-out samples where the head fires before the labelled stop


@dataclass(frozen=True)
class ScenarioBound:
    relative: float  # the student's rate >= relative x the teacher's...
    floor: float  # ...and >= floor

    def required(self, teacher: float) -> float:
        return max(self.floor, self.relative * teacher)


@dataclass(frozen=True)
class ScenarioGate:
    cases_per_scenario: int
    seed: int
    max_new_tokens: int
    max_rounds: int
    halt_tolerance: float  # a final turn may be this much longer than the reference's
    bounds: Mapping[str, Mapping[str, ScenarioBound]]  # scenario -> metric -> bound


@dataclass(frozen=True)
class GatesContract:
    file: Path
    halt: HaltGate
    curriculum: CurriculumGate
    scenarios: ScenarioGate

    def judge_halt(self, metrics: Mapping[str, float]) -> list[Judgement]:
        """``metrics``: :func:`kdtrain.gates.halt.halt_metrics` of the distilled student."""
        h = self.halt
        return [Judgement(item, metrics.get(key), str(getattr(h, key)), getattr(h, key).holds(metrics.get(key)),
                          f"threshold {h.threshold:g}, tolerance {h.tolerance_tokens} token(s)")
                for key, item in HaltGate.ITEMS]

    def judge_curriculum(self, stages: list[Mapping]) -> list[Judgement]:
        """``stages``: the per-stage summaries of ``distill/run/curriculum.json``, in order."""
        c, found, previous = self.curriculum, [], None
        if not stages:
            return [Judgement("curriculum", None, "the telemetry of every curriculum stage (distill/run/curriculum.json)", False,
                              "none recorded: the distill config needs a telemetry section and the data a halt set")]
        for stage in stages:
            ratio, early = stage.get("length", {}).get("ratio"), stage.get("halt", {}).get("early")
            drop = None if previous in (None, 0) or ratio is None else (previous - ratio) / previous
            ok = (drop is None or drop <= c.max_length_drop) and early is not None and early <= c.max_early_halt
            detail = (f"student/teacher length {ratio if ratio is None else round(ratio, 3)}"
                      f"{'' if drop is None else f' ({drop:+.0%} against the previous stage: a fall, if positive)'}; "
                      f"head fires before the stop on {early if early is None else f'{early:.0%}'} of held-out samples")
            found.append(Judgement(f"curriculum[{stage['stage']}]", drop if drop is not None else 0.0,
                                   f"length fall <= {c.max_length_drop:.0%} and early halts <= {c.max_early_halt:.0%}", ok, detail))
            previous = ratio
        return found

    def judge_scenarios(self, rates: Mapping[str, Mapping[str, Mapping[str, float]]]) -> list[Judgement]:
        """``rates``: scenario -> model -> metric -> rate, with models ``teacher`` and ``student``."""
        found = []
        for scenario, metrics in self.scenarios.bounds.items():
            by_model = rates.get(scenario, {})
            for metric, bound in metrics.items():
                teacher = by_model.get("teacher", {}).get(metric)
                student = by_model.get("student", {}).get(metric)
                need = bound.required(teacher or 0.0)
                ok = student is not None and teacher is not None and student >= need
                found.append(Judgement(f"scenario[{scenario}-{metric}]", student,
                                       f">= max({bound.floor:g}, {bound.relative:g} x teacher {teacher}) = {need:.3g}", ok,
                                       f"baseline {by_model.get('baseline', {}).get(metric)}"))
        return found


def parse(path: Path, data: dict) -> GatesContract:
    h, c, s = data["halt"], data["curriculum"], data["scenarios"]
    b = h["bounds"]
    halt = HaltGate(CalibrationSet(**h["calibration_set"]), h["threshold"], h["tolerance_tokens"], Bound.of(b["auc"]), Bound.of(b["ece"]),
                    Bound.of(b["early_stop_rate"]), Bound.of(b["length_ratio"]))
    bounds = {scenario: {metric: ScenarioBound(**bound) for metric, bound in metrics.items()} for scenario, metrics in s["bounds"].items()}
    scenarios = ScenarioGate(s["cases_per_scenario"], s["seed"], s["max_new_tokens"], s["max_rounds"], s["halt_tolerance"], bounds)
    return GatesContract(path, halt, CurriculumGate(c["max_length_drop"], c["max_early_halt"]), scenarios)
