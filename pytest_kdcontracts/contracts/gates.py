"""``gates.yaml``: the checkpoint gates, re-judged from the artifacts.

The gates stage (``kdtrain evaluate``) recorded raw measurements: the halt head's
probability at every held-out position, the curriculum telemetry, every scenario case's
turns and outcomes. These items recompute the figures from those records with the
contract's current bounds and thresholds, check that the records belong to the artifacts
they sit beside (the student, the held-out data), and hold the verdict file, which the
trainer trusts, to the same judgement:

- ``held_out``: the calibration set and scenario cases share no example with the training corpus (by hash);
- ``halt_auc``, ``halt_ece``, ``halt_early_stop``, ``halt_length``: the halt head on the calibration set;
- ``curriculum``: every curriculum stage's telemetry (no length collapse, no early halts);
- ``scenario[<scenario>-<metric>]``: the student against the teacher and a floor;
- ``verdict``: ``gates/verdict.json`` is bound to these artifacts and says what these items say.
"""

from __future__ import annotations

import json
from functools import partial
from typing import Iterator

from kdcontracts.models.gates import GatesContract, HaltGate, Judgement
from kdtrain.artifact_table import (DATA_CORPUS, DATA_HALT_SET, DATA_SCENARIOS, GATES_HALT, GATES_SCENARIOS, GATES_VERDICT,
                                    STUDENT_CHECKPOINT)
from pytest_kdcontracts.check import Check, fail


def _json(kd_artifacts, artifact) -> dict:
    return json.loads(kd_artifacts.path(artifact).read_text(encoding="utf-8"))


def _bound_to(c: GatesContract, kd_artifacts, report, data) -> dict:
    """The gates report ``report``, provided it measured the student and held-out ``data`` this folder holds."""
    record = _json(kd_artifacts, report)
    student = kd_artifacts.exported_student()
    expected = {"student": f"{student.name} sha256:{kd_artifacts.entry(student).sha256}",
                data.name: f"sha256:{kd_artifacts.entry(data).sha256}"}
    found = {key: record.get(key) for key in expected}
    if found != expected:
        fail(c.file.name, f"{report.name} ({kd_artifacts.path(report)})", f"measurements of this folder's {expected}", found,
             "re-run: kdtrain evaluate (kdtrain pipeline --stages gates)")
    return record


def halt_judgements(c: GatesContract, kd_artifacts) -> list[Judgement]:
    from kdtrain.gates.halt import HaltRecord, halt_metrics

    record = _bound_to(c, kd_artifacts, GATES_HALT, DATA_HALT_SET)
    records = [HaltRecord.from_json(r) for r in record["records"]]
    return c.judge_halt(halt_metrics(records, c.halt.threshold, c.halt.tolerance_tokens))


def curriculum_judgements(c: GatesContract, kd_artifacts) -> list[Judgement]:
    from kdtrain.gates.stage import curriculum_stages

    return c.judge_curriculum(curriculum_stages(kd_artifacts))


def scenario_judgements(c: GatesContract, kd_artifacts) -> list[Judgement]:
    from kdtrain.gates.scenarios import rates_from_cases

    record = _bound_to(c, kd_artifacts, GATES_SCENARIOS, DATA_SCENARIOS)
    return c.judge_scenarios(rates_from_cases(record["cases"]))


def _judge(c: GatesContract, judgements: list[Judgement], kd_report=None) -> None:
    failed = [j for j in judgements if not j.passed]
    if kd_report is not None:
        for j in judgements:
            value = "none" if j.value is None else f"{j.value:.3f}"
            kd_report(f"gate {j.item:40s} {value:>7s}  {'ok  ' if j.passed else 'FAIL'}  ({j.expected}; {j.detail})")
    if failed:
        j = failed[0]
        fail(c.file.name, j.item, j.expected, f"{j.value} ({j.detail})" + (f"; also failed: {[f.item for f in failed[1:]]}" if failed[1:] else ""))


def check_held_out(c: GatesContract, kd_artifacts) -> None:
    from kdtrain.data.corpus import Corpus
    from kdtrain.data.halt_set import HaltSet, overlap
    from kdtrain.data.scenario_cases import ScenarioCases, overlap as case_overlap

    corpus = Corpus.load(kd_artifacts.path(DATA_CORPUS))
    halt_set = HaltSet.load(kd_artifacts.path(DATA_HALT_SET))
    cases = ScenarioCases.load(kd_artifacts.path(DATA_SCENARIOS))
    shared = {"halt set": overlap(halt_set, corpus), "scenario cases": case_overlap(cases, corpus)}
    if any(shared.values()):
        fail(c.file.name, "held-out data against the training corpus", "no example in common (by SHA-256 of the conversation)",
             {k: v[:5] for k, v in shared.items() if v}, "a gate measured on training data says nothing about new inputs")
    built = {DATA_HALT_SET: {"bases_per_scenario": halt_set.bases_per_scenario, "seed": halt_set.seed},
             DATA_SCENARIOS: {k: cases.settings.get(k) for k in ("cases_per_scenario", "seed")}}
    wanted = {DATA_HALT_SET: {"bases_per_scenario": c.halt.calibration_set.bases_per_scenario, "seed": c.halt.calibration_set.seed},
              DATA_SCENARIOS: {"cases_per_scenario": c.scenarios.cases_per_scenario, "seed": c.scenarios.seed}}
    for data, settings in wanted.items():
        if built[data] != settings:
            fail(c.file.name, f"{data.name} ({kd_artifacts.path(data)})", f"built with {settings}", built[data],
                 "re-run: kdtrain pipeline --stages data")


def check_halt(c: GatesContract, item: str, kd_artifacts, kd_report) -> None:
    _judge(c, [j for j in halt_judgements(c, kd_artifacts) if j.item == item], kd_report)


def check_curriculum(c: GatesContract, kd_artifacts, kd_report) -> None:
    _judge(c, curriculum_judgements(c, kd_artifacts), kd_report)


def check_scenario(c: GatesContract, item: str, kd_artifacts, kd_report) -> None:
    _judge(c, [j for j in scenario_judgements(c, kd_artifacts) if j.item == item], kd_report)


def check_verdict(c: GatesContract, kd_artifacts, kd_report) -> None:
    verdict = _json(kd_artifacts, GATES_VERDICT)
    path = kd_artifacts.path(GATES_VERDICT)
    distill = kd_artifacts.manifest.stages.get("distill")
    student = kd_artifacts.exported_student()
    expected = {"config": distill.settings.get("gate_fingerprint") if distill else None,
                "corpus": f"sha256:{kd_artifacts.entry(DATA_CORPUS).sha256}",
                "student": f"sha256:{kd_artifacts.entry(STUDENT_CHECKPOINT).sha256}"}
    found = {key: verdict.get("binding", {}).get(key) for key in expected}
    if found != expected or verdict.get("student_distilled") != f"{student.name} sha256:{kd_artifacts.entry(student).sha256}":
        fail(c.file.name, f"gate verdict ({path})", f"a verdict on this folder's run: {expected}", found,
             "a verdict made for another configuration, data or student unlocks nothing; re-run: kdtrain evaluate")
    mine = halt_judgements(c, kd_artifacts) + curriculum_judgements(c, kd_artifacts) + scenario_judgements(c, kd_artifacts)
    passed, failed = all(j.passed for j in mine), sorted(j.item for j in mine if not j.passed)
    if verdict.get("passed") is not passed or sorted(verdict.get("failed", [])) != failed:
        fail(c.file.name, f"gate verdict ({path})", f"passed={passed}, failed {failed} (as these artifacts judge under {c.file.name})",
             f"passed={verdict.get('passed')}, failed {verdict.get('failed')}", "re-run: kdtrain evaluate")
    kd_report(f"gate verdict: {'passed' if passed else 'FAILED'} ({len(mine)} items), bound to config {expected['config']}")


def checks(c: GatesContract) -> Iterator[Check]:
    yield Check("held_out", (), partial(check_held_out, c), ("kd_artifacts",),
                doc="the calibration set and scenario cases share no example with the training corpus")
    for _, item in HaltGate.ITEMS:
        yield Check(item, (), partial(check_halt, c, item), ("kd_artifacts", "kd_report"))
    yield Check("curriculum", (), partial(check_curriculum, c), ("kd_artifacts", "kd_report"))
    for scenario, metrics in c.scenarios.bounds.items():
        for metric in metrics:
            yield Check("scenario", (scenario, metric), partial(check_scenario, c, f"scenario[{scenario}-{metric}]"),
                        ("kd_artifacts", "kd_report"))
    yield Check("verdict", (), partial(check_verdict, c), ("kd_artifacts", "kd_report"))
