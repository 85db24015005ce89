"""Curriculum telemetry: what each stage did to the student, measured when it ends, and the alerts that stop a run.

When a curriculum stage ends (its ``until_step``, or the run's last step for the last stage)
the student is measured on held-out prompts, the first ``telemetry.prompts`` good examples of
``data.halt_set`` (never trained on):

- **tokens**: the supervised tokens of the stage's steps by source: ``data`` (the corpus's
  answers, teacher-scored), ``teacher`` (answers the teacher wrote: generate-mode targets),
  ``student`` (its own answers: on-policy steps, :mod:`kdtrain.train.on_policy`);
- **length**: the student's mean greedy answer length against the teacher's, both counted in
  student tokens and cut at ``telemetry.max_new_tokens``. The teacher's are generated once per
  run (:func:`kdtrain.runtime.generate.teacher_generator`) and kept in curriculum.json: a
  resume reuses them;
- **halt**: the halt head's P(halt), teacher-forced on the reference answers
  (:func:`kdtrain.gates.halt.score_halt_set`), by relative position in the answer (10 bins:
  mean, p10, p50, p90), and the share of answers where it fires (P >= ``halt_threshold``)
  before the labelled stop.

Alerts (thresholds in ``telemetry``): the length relative to the teacher's fell by more than
``length_collapse`` since the previous stage; the head fires early on more than
``early_halt`` of the answers. An alert is logged, written in curriculum.json and, after the
stage's checkpoint and summary are written, stops the run with a :class:`TelemetryError`,
unless ``telemetry.override`` or ``kdtrain distill --override-alerts`` (logged, recorded). A
run resumed at a boundary whose alert was not overridden stops again. With telemetry on, every
stage's end is also a checkpoint, so that a stopped run resumes there.

Off, and logged why, without a ``telemetry`` section, without a curriculum (the ablations:
no stages to compare) or when the artifacts have no ``data.halt_set``.

``<run>/curriculum.json``::

    {"settings": {the telemetry section}, "prompts": [held-out example ids],
     "teacher": {"name", "lengths": [per prompt], "mean"},
     "stages": [{"stage", "steps": [first, end), "tokens": {source: n}, "fractions": {source: share},
                 "length": {"student", "teacher", "ratio", "change", "stopped"},
                 "halt": {"threshold", "early", "early_ids", "positions": [{"from", "to", "n", "mean", "p10", "p50", "p90"}]},
                 "alerts": [{"kind", "message"}], "override", "seconds"}]}
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from kdtrain import atomic
from kdtrain.artifact_table import DATA_HALT_SET, DISTILL_CURRICULUM, DISTILL_CURRICULUM_PLOT
from kdtrain.errors import KDError
from kdtrain.losses import DistillBatch
from kdtrain.train.config import DistillConfig, Telemetry

log = logging.getLogger("kdtrain.train")

CURRICULUM, CURRICULUM_PLOT = Path(DISTILL_CURRICULUM.path).name, Path(DISTILL_CURRICULUM_PLOT.path).name
SOURCES = ("data", "teacher", "student")
BINS = 10
QUANTILES = {"p10": 0.1, "p50": 0.5, "p90": 0.9}


# The teacher's greedy lengths, by (teacher section, prompts, bound): computed once per process
# as well as once per run (a pipeline's or a test session's runs share them; greedy decoding
# of the same teacher on the same prompts gives the same answers).
_TEACHER_LENGTHS: dict[tuple, list[int]] = {}


class TelemetryError(KDError):
    """A curriculum stage's telemetry alerted: the run stopped after the stage's checkpoint and summary."""


@dataclass(frozen=True)
class TelemetryAlert:
    kind: str  # "length_collapse" or "early_halt"
    message: str

    def __str__(self) -> str:
        return self.message


def tokens_by_source(batch: DistillBatch, source: str) -> dict[str, int]:
    """Supervised tokens of a batch: each sample's last assistant turn counted as ``source``.

    Earlier assistant turns are the corpus's (``data``), except in an on-policy batch
    (``student``), which trains on the student's turn alone: the rest is its prompt."""
    positions = torch.arange(batch.labels.shape[1])[None, :]  # [1, S]
    last = batch.turn_starts.max(dim=1).values[:, None]  # [B, 1]: predicting position of the last turn's first token
    in_last = batch.supervised & (positions >= last)
    counts = {source: int(in_last.sum())}
    if source != "student":
        counts["data"] = counts.get("data", 0) + int((batch.supervised & ~in_last).sum())
    return counts


def judge(settings: Telemetry, where: str, ratio: float | None, previous: float | None, early: float) -> list[TelemetryAlert]:
    """The alerts of one stage: length collapse against the previous stage's ratio, early halts."""
    alerts = []
    if ratio is not None and previous:
        change = ratio / previous - 1
        if change < -settings.length_collapse:
            alerts.append(TelemetryAlert("length_collapse", (
                f"{where}: the student's answers fell from {previous:.2f} to {ratio:.2f} of the teacher's length ({change:+.0%}; "
                f"telemetry.length_collapse allows -{settings.length_collapse:.0%} a stage)")))
    if early > settings.early_halt:
        alerts.append(TelemetryAlert("early_halt", (
            f"{where}: the halt head fires (P(halt) >= {settings.halt_threshold:g}) before the labelled stop on {early:.0%} of "
            f"the held-out answers (telemetry.early_halt allows {settings.early_halt:.0%})")))
    return alerts


def halt_by_position(records, threshold: float) -> dict:
    """P(halt) by relative position in the reference answer (BINS bins) and the early firings (before ``stop``)."""
    values: list[list[float]] = [[] for _ in range(BINS)]
    for record in records:
        for i, p in enumerate(record.halt):  # token i of n ends (i + 1) / n of the answer: each answer's last in the last bin
            values[(BINS * (i + 1) - 1) // len(record.halt)].append(p)
    positions = [{"from": b / BINS, "to": (b + 1) / BINS, "n": len(v),
                  **({"mean": round(float(np.mean(v)), 6), **{k: round(float(np.quantile(v, q)), 6) for k, q in QUANTILES.items()}}
                     if v else {"mean": None, **dict.fromkeys(QUANTILES)})} for b, v in enumerate(values)]
    early = [r.id for r in records if r.stop is not None and any(p >= threshold for p in r.halt[:r.stop])]
    return {"threshold": threshold, "early": len(early) / len(records), "early_ids": early, "positions": positions}


def digest(summary: dict) -> dict:
    """What a stage's last step carries in log.jsonl of its summary."""
    return {"stage": summary["stage"], "length_ratio": summary["length"]["ratio"], "halt_early": summary["halt"]["early"],
            "alerts": [a["message"] for a in summary["alerts"]]}


class CurriculumTelemetry:
    """The run's ``curriculum.json``: measured at each stage's end, read back on resume."""

    def __init__(self, config: DistillConfig, run_dir: Path, examples: Sequence, tokenizer, artifacts, main: bool):
        self.config, self.settings, self.file = config, config.telemetry, Path(run_dir) / CURRICULUM
        self.examples, self.tokenizer, self.artifacts, self.main = tuple(examples), tokenizer, artifacts, main
        self.ends = config.stage_ends()
        self.state = {"settings": self.settings.model_dump(mode="json"), "prompts": [e.id for e in self.examples],
                      "teacher": None, "stages": []}

    @classmethod
    def open(cls, config: DistillConfig, run_dir: Path, artifacts, tokenizer, main: bool) -> "CurriculumTelemetry | None":
        """The run's telemetry, or None (logged why) without a ``telemetry`` section, a curriculum or a ``data.halt_set``."""
        from kdtrain.data.halt_set import HaltSet

        if config.telemetry is None or not config.curriculum:
            log.info("curriculum telemetry off: %s has no %s", config.file, "telemetry section" if config.curriculum else "curriculum")
            return None
        if DATA_HALT_SET.name not in artifacts.manifest.artifacts:
            log.warning("curriculum telemetry off: %s has no %s (the held-out prompts it measures on)", artifacts.root, DATA_HALT_SET.name)
            return None
        examples = HaltSet.load(artifacts.path(DATA_HALT_SET)).good()[: config.telemetry.prompts]
        if not examples:
            log.warning("curriculum telemetry off: %s has no good examples", artifacts.path(DATA_HALT_SET))
            return None
        return cls(config, run_dir, examples, tokenizer, artifacts, main)

    # --- resume --------------------------------------------------------------------------

    def start(self, step: int, override: bool) -> None:
        """Keep what was measured up to ``step`` (nothing when fresh); an alert at ``step`` not overridden stops again."""
        if step and self.file.exists():
            saved = json.loads(self.file.read_text(encoding="utf-8"))
            same = (saved["prompts"], saved["settings"]["max_new_tokens"]) == (self.state["prompts"], self.settings.max_new_tokens)
            if same and saved["teacher"] and saved["teacher"]["name"] == self._teacher_name:
                self.state["teacher"] = saved["teacher"]
            self.state["stages"] = [s for s in saved["stages"] if s["steps"][1] <= step]
        self._write()
        last = self.state["stages"][-1] if self.state["stages"] else None
        if last and last["steps"][1] == step and last["alerts"] and not last["override"]:
            self._stop_unless(override or self.settings.override, last)

    # --- a stage's end -------------------------------------------------------------------

    def measure(self, done: int, student, records: Sequence[dict]) -> dict | None:
        """The summary of the stage that ends after ``done`` steps (None if none does); written to curriculum.json."""
        if done not in self.ends:
            return None
        tick = time.perf_counter()
        first = max([e for e in self.ends if e < done], default=0)
        name = self.ends[done]
        tokens = Counter({s: 0 for s in SOURCES})
        for record in records:
            if first <= record["step"] < done:
                tokens.update(record.get("sources", {}))
        total = sum(tokens.values())
        length = self._length(student)
        previous = self.state["stages"][-1]["length"]["ratio"] if self.state["stages"] else None
        length["change"] = None if previous in (None, 0) or length["ratio"] is None else round(length["ratio"] / previous - 1, 6)
        halt = self._halt(student)
        where = f"{self.file}: at stages[{len(self.state['stages'])}] ({name}, step {done})"
        alerts = judge(self.settings, where, length["ratio"], previous, halt["early"])
        summary = {"stage": name, "steps": [first, done], "tokens": dict(tokens),
                   "fractions": {s: round(n / total, 6) if total else 0.0 for s, n in tokens.items()},
                   "length": length, "halt": halt, "alerts": [{"kind": a.kind, "message": a.message} for a in alerts],
                   "override": bool(alerts) and self.settings.override, "seconds": round(time.perf_counter() - tick, 3)}
        self.state["stages"].append(summary)
        self._write()
        log.info("curriculum stage %s (steps %d-%d): tokens %s; length %.1f vs teacher %.1f (ratio %s, change %s); "
                 "halt fires early on %.0f%%; %d alert(s), %.1f s", name, first, done - 1,
                 ", ".join(f"{s} {n} ({summary['fractions'][s]:.0%})" for s, n in tokens.items()), length["student"],
                 length["teacher"], length["ratio"], length["change"], 100 * halt["early"], len(alerts), summary["seconds"])
        for alert in alerts:
            log.warning("curriculum telemetry: %s", alert)
        return summary

    def stop_on_alerts(self, summary: dict, override: bool) -> None:
        """After the stage's checkpoint: raise on the summary's alerts unless overridden (then logged and recorded)."""
        if summary["alerts"]:
            self._stop_unless(override or self.settings.override, summary)

    def _stop_unless(self, override: bool, summary: dict) -> None:
        alerts = [a["message"] for a in summary["alerts"]]
        if override:
            summary["override"] = True
            self._write()
            log.warning("telemetry override: continuing despite %d alert(s) at the end of stage %s: %s", len(alerts), summary["stage"],
                        alerts[0])
            return
        raise TelemetryError("\n  ".join([
            f"{self.file}: the curriculum telemetry of stage {summary['stage']!r} alerted ({len(alerts)} alert(s)); the run "
            f"stopped at step {summary['steps'][1]}, after the stage's checkpoint and summary:", *alerts,
            "look at the stage in log.jsonl and curriculum.png (losses, on-policy share), or continue with telemetry.override: "
            "true (or kdtrain distill --override-alerts); the override is logged and recorded in curriculum.json"]))

    # --- measurements --------------------------------------------------------------------

    @property
    def _teacher_name(self) -> str:
        return f"{self.config.teacher.name} {self.config.teacher.version}"

    def _length(self, student) -> dict:
        from kdtrain.runtime.generate import StudentGenerator

        prompts = [e.messages for e in self.examples]
        bound = self.settings.max_new_tokens
        if self.state["teacher"] is None:
            key = (self.config.teacher.model_dump_json(), tuple(e.sha256 for e in self.examples), bound)
            if key not in _TEACHER_LENGTHS:
                from kdtrain.runtime.generate import teacher_generator

                turns = teacher_generator(self.config, self.artifacts).turns(prompts, bound)
                _TEACHER_LENGTHS[key] = [len(self.tokenizer.encode(t.text).ids) for t in turns]
            lengths = _TEACHER_LENGTHS[key]
            self.state["teacher"] = {"name": self._teacher_name, "lengths": lengths,
                                     "mean": float(np.mean(lengths))}
        with evaluating(student) as model:
            turns = StudentGenerator(model, self.tokenizer).turns(prompts, bound)
        mean, teacher = float(np.mean([t.tokens for t in turns])), self.state["teacher"]["mean"]
        return {"student": round(mean, 4), "teacher": round(teacher, 4), "ratio": round(mean / teacher, 6) if teacher else None,
                "stopped": round(sum(t.stopped for t in turns) / len(turns), 6)}

    def _halt(self, student) -> dict:
        from kdtrain.gates.halt import score_halt_set

        with evaluating(student) as model:
            records = score_halt_set(model, self.tokenizer, self.examples)
        return halt_by_position(records, self.settings.halt_threshold)

    def _write(self) -> None:
        if self.main:
            atomic.write_json(self.file, self.state)
            if self.state["stages"]:
                from kdtrain.train.plots import plot_curriculum

                plot_curriculum(self.state, self.file.with_name(CURRICULUM_PLOT))


@contextlib.contextmanager
def evaluating(student):
    """The student to decode or score with: in eval mode and on the CPU, where kdtrain.runtime.generate and
    kdtrain.gates.halt build their tensors (itself on a CPU run, a copy on an accelerator); back in its mode after."""
    training = student.training
    model = student if student.lm_head.weight.device.type == "cpu" else copy.deepcopy(student).cpu()
    model.eval()
    try:
        yield model
    finally:
        student.train(training)
