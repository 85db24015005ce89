"""Pipeline stage ``gates`` (``kdtrain evaluate``): judge the distilled student before money is spent.

Reads ``contracts/gates.yaml`` and evaluates, on data held out from training (written by
the data stage):

- the halt head on the calibration set (``gates/halt.json``: per-example probabilities and
  metrics; ``gates/halt/{roc,reliability,lengths}.png``);
- the curriculum telemetry the distill stage wrote (``distill/run/curriculum.json``);
- teacher, distilled student and baseline (the initial student) on the scenario cases
  (``gates/scenarios.json``, ``gates/scenarios.png``);

then writes ``gates/verdict.json``, bound to what it judged (kdtrain.gates.verdict): the
file a full ``kdtrain distill`` run asks for before it starts. A project without
``gates.yaml`` has nothing to judge: the stage logs so and writes nothing.
"""

from __future__ import annotations

import json
import logging

from kdtrain import atomic
from kdtrain.artifact_table import (DATA_HALT_SET, DATA_SCENARIOS, DISTILL_CURRICULUM, GATES_HALT, GATES_HALT_PLOTS,
                                    GATES_SCENARIOS, GATES_SCENARIOS_PLOT, GATES_VERDICT, STUDENT_CHECKPOINT)
from kdtrain.stage import StageContext

log = logging.getLogger("kdtrain.gates")


def curriculum_stages(folder) -> list[dict]:
    """The per-stage telemetry of the distill run, or none when it recorded none."""
    if DISTILL_CURRICULUM.name not in folder.manifest.artifacts:
        return []
    return json.loads(folder.path(DISTILL_CURRICULUM).read_text(encoding="utf-8"))["stages"]


def student_identity(folder) -> tuple[object, str]:
    """The student the gates judge (the distilled one once there is one) and how the reports name it."""
    distilled = folder.exported_student()
    return distilled, f"{distilled.name} sha256:{folder.entry(distilled).sha256}"


def evaluate_halt(folder, contract, student, tokenizer) -> dict:
    """``gates/halt.json`` (per-example probabilities, metrics) and its plots; the metrics."""
    from kdtrain.data.halt_set import HaltSet
    from kdtrain.gates.halt import halt_metrics, plot_halt, score_halt_set

    halt = contract.halt
    halt_set = HaltSet.load(folder.path(DATA_HALT_SET))
    records = score_halt_set(student, tokenizer, halt_set.examples)
    metrics = halt_metrics(records, halt.threshold, halt.tolerance_tokens)
    atomic.write_json(folder.root / GATES_HALT.path, {
        "student": student_identity(folder)[1], DATA_HALT_SET.name: f"sha256:{folder.entry(DATA_HALT_SET).sha256}",
        "threshold": halt.threshold, "tolerance_tokens": halt.tolerance_tokens, "metrics": metrics,
        "records": [r.to_json() for r in records]})
    with atomic.directory(folder.root / GATES_HALT_PLOTS.path) as tmp:
        plot_halt(records, metrics, tmp)
    for artifact in (GATES_HALT, GATES_HALT_PLOTS):
        folder.record(artifact)
    return metrics


def evaluate_on_scenarios(folder, contract, generators: dict, registry) -> dict:
    """``gates/scenarios.json`` (every case's turns and outcomes per model, the rates) and its plot; the results."""
    from kdtrain.data.scenario_cases import ScenarioCases
    from kdtrain.gates.scenarios import evaluate_scenarios, plot_scenarios, scenario_table

    s = contract.scenarios
    cases = ScenarioCases.load(folder.path(DATA_SCENARIOS))
    results = evaluate_scenarios(cases, generators, registry, s.max_new_tokens, s.max_rounds, halt_tolerance=s.halt_tolerance)
    atomic.write_json(folder.root / GATES_SCENARIOS.path, {
        "student": student_identity(folder)[1], DATA_SCENARIOS.name: f"sha256:{folder.entry(DATA_SCENARIOS).sha256}", **results})
    plot_scenarios(results, folder.root / GATES_SCENARIOS_PLOT.path)
    for artifact in (GATES_SCENARIOS, GATES_SCENARIOS_PLOT):
        folder.record(artifact)
    log.info("scenario evaluations (rates):\n%s", scenario_table(results))
    return results


def judge(folder, contract, config, metrics: dict, results: dict) -> dict:
    """Every gate item judged, ``gates/verdict.json`` written and recorded; the verdict."""
    from kdtrain.gates.verdict import Binding, write_verdict

    judgements = (contract.judge_halt(metrics) + contract.judge_curriculum(curriculum_stages(folder))
                  + contract.judge_scenarios(results["scenarios"]))
    verdict = write_verdict(folder, judgements, Binding.of(config, folder), contract.file, student_identity(folder)[1])
    folder.record(GATES_VERDICT)
    for j in judgements:
        log.info("gate %s: %s (%s; %s)", j.item, "ok" if j.passed else "FAILED", j.expected, j.detail)
    return verdict


def stage_gates(ctx: StageContext) -> None:
    from kdtrain.runtime.generate import StudentGenerator, teacher_generator
    from kdtrain.student.model import StudentLM
    from kdtrain.tokenizers.load import load_tokenizer

    folder = ctx.folder
    if not (ctx.contracts / "gates.yaml").exists():
        log.warning("stage gates: nothing to judge, %s has no gates.yaml (the bounds come from a run you trust)", ctx.contracts)
        return
    contract = ctx.contract("gates.yaml")
    tokenizer = load_tokenizer(folder, "student")
    distilled, identity = student_identity(folder)
    student = StudentLM.from_pretrained(folder.path(distilled))
    metrics = evaluate_halt(folder, contract, student, tokenizer)
    generators = {"teacher": teacher_generator(ctx.config, folder),
                  "student": StudentGenerator(student, tokenizer, "student"),
                  "baseline": StudentGenerator(StudentLM.from_pretrained(folder.path(STUDENT_CHECKPOINT)), tokenizer, "baseline")}
    results = evaluate_on_scenarios(folder, contract, generators, ctx.contract("tool_registry.json"))
    verdict = judge(folder, contract, ctx.config, metrics, results)
    folder.record_stage("gates", {"passed": verdict["passed"], "failed": verdict["failed"], "student": identity})
    (log.info if verdict["passed"] else log.warning)("gate verdict: %s%s", "passed" if verdict["passed"] else "FAILED",
                                                      "" if verdict["passed"] else f" ({', '.join(verdict['failed'])})")
