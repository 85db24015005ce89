"""Pipeline stages ``distill`` and ``ablations``.

``distill``: a short distillation of the initial student from the cached
teacher targets, before export, so that the whole path from distillation to an mlpackage
runs on every ``make demo``.

The run is always fresh (its folder is swapped in whole when it finishes); resumable,
long runs are ``kdtrain distill``'s. The distilled student is recorded as
``student.distilled`` with the initial checkpoint it came from, which is what the export
stages then read (:meth:`kdtrain.artifacts.ArtifactsFolder.exported_student`).

``ablations``: the three canonical mini experiments (kdtrain.train.ablations) with the
protocol of ``contracts/ablations.yaml``; their results are what that contract compares.
"""

from __future__ import annotations

import json
import logging

from kdtrain import atomic
from kdtrain.artifact_table import (ABLATIONS_PLOT, ABLATIONS_RESULTS, ABLATIONS_RUNS, DATA_CORPUS, DISTILL_CURRICULUM,
                                    DISTILL_CURRICULUM_PLOT, DISTILL_REPORT, DISTILL_RUN, STUDENT_CHECKPOINT, STUDENT_DISTILLED,
                                    TEACHER_CACHE)
from kdtrain.gates.verdict import gate_fingerprint
from kdtrain.stage import StageContext
from kdtrain.train.loop import PLOT, Distiller

log = logging.getLogger("kdtrain.train")


def stage_distill(ctx: StageContext) -> None:
    folder = ctx.folder
    config = ctx.config
    initial = f"{STUDENT_CHECKPOINT.name} sha256:{folder.entry(STUDENT_CHECKPOINT).sha256}"
    with atomic.directory(folder.root / DISTILL_RUN.path) as run:
        distiller = Distiller(config, run, artifacts=folder.root)
        distiller.setup()
        result = distiller.train()
        distiller.cleanup()
        records = distiller.records()
    hf_config = json.loads((folder.path(STUDENT_CHECKPOINT) / "config.json").read_text(encoding="utf-8"))
    hf_config = {k: v for k, v in hf_config.items() if not k.startswith("kd_")}
    with atomic.directory(folder.root / STUDENT_DISTILLED.path) as tmp:
        distiller.trainee.student.save_pretrained(tmp, hf_config)
    last = records[-1] if records else {}
    report = {
        "config": str(ctx.distill_config), "fingerprint": config.fingerprint(), "student": initial,
        "steps": result.step, "samples": len(distiller.data), "tokens": sum(r["tokens"] for r in records),
        "missing_teacher_ratio": distiller.data.missing_ratio, "too_long": distiller.data.too_long,
        "code_mode_eligible_fraction": distiller.data.eligible_fraction,
        "final": {"loss": last.get("loss"), "terms": last.get("terms")},
        "alerts": [str(a) for a in result.alerts], "plot": f"{DISTILL_RUN.path}/{PLOT}",
        "curriculum": _curriculum(folder.root / DISTILL_CURRICULUM.path),
    }
    atomic.write_json(folder.root / DISTILL_REPORT.path, report)
    for artifact in (DISTILL_RUN, DISTILL_REPORT, STUDENT_DISTILLED, DISTILL_CURRICULUM, DISTILL_CURRICULUM_PLOT):
        if (folder.root / artifact.path).exists():  # the curriculum's only with telemetry on
            folder.record(artifact)
    # What made the distilled student, split in two: the inputs that define it, and the files
    # whose bytes vary with the CPU's float summation order (the teacher cache's FP16 log-probs,
    # the trained weights). Golden snapshots record both and are judged by their values alone.
    teacher = folder.manifest.stages["teacher"].settings
    identity = {"initial": initial, "config": config.fingerprint(), DATA_CORPUS.name: f"sha256:{folder.entry(DATA_CORPUS).sha256}",
                "teacher": f"{teacher['teacher']} {teacher['mode']} top-{teacher['top_k']}", "steps": result.step}
    numerics = {artifact.name: f"sha256:{folder.entry(artifact).sha256}" for artifact in (TEACHER_CACHE, STUDENT_DISTILLED)}
    folder.record_stage("distill", {"config": str(ctx.distill_config), "fingerprint": config.fingerprint(),
                                    "gate_fingerprint": gate_fingerprint(config), "student": initial,
                                    "steps": result.step, "alerts": len(result.alerts), "identity": identity, "numerics": numerics})


def _curriculum(path) -> dict | None:
    """curriculum.json's per-stage digest (token shares, length against the teacher's, early halts) and its alerts."""
    if not path.exists():
        return None
    stages = json.loads(path.read_text(encoding="utf-8"))["stages"]
    return {"file": DISTILL_CURRICULUM.path,
            "stages": [{"stage": s["stage"], "steps": s["steps"], "fractions": s["fractions"], "length": s["length"],
                        "halt_early": s["halt"]["early"], "alerts": [a["message"] for a in s["alerts"]], "override": s["override"]}
                       for s in stages],
            "alerts": [a["message"] for s in stages for a in s["alerts"]]}


def stage_ablations(ctx: StageContext) -> None:
    from kdtrain.train.ablations import run_ablations
    from kdtrain.train.plots import plot_ablations

    folder = ctx.folder
    if not (ctx.contracts / "ablations.yaml").exists():  # a new project: its baselines come from a run it trusts
        log.warning("stage ablations: nothing to run, %s has no ablations.yaml (the protocol and its baselines)", ctx.contracts)
        return
    protocol = ctx.contract("ablations.yaml").protocol
    base = ctx.config
    with atomic.directory(folder.root / ABLATIONS_RUNS.path) as runs:
        results = run_ablations(base, folder.root, runs, protocol)
    atomic.write_json(folder.root / ABLATIONS_RESULTS.path, results)
    plot_ablations(results, folder.root / ABLATIONS_PLOT.path)
    for artifact in (ABLATIONS_RUNS, ABLATIONS_RESULTS, ABLATIONS_PLOT):
        folder.record(artifact)
    folder.record_stage("ablations", {"config": str(ctx.distill_config), "protocol": results["protocol"],
                                      "experiments": list(results["experiments"])})
