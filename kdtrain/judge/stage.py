"""Pipeline stage ``judge``: hold the judge(s) ``judge.yaml`` names to objective signals.

Builds the probe set from the contract's settings (``judge/probes/``: seeded, held out from
the training corpus's prompts), asks each judge for both orders of every pair and a pointwise
score of every graded output, and writes ``judge/report.json``: every verdict's log-
probabilities, the figures (:func:`kdtrain.judge.metrics.judge_metrics`), the seconds taken,
bound to the probe set (its manifest SHA-256) and to each judge's identity, so that the plugin
can tell a report on other probes or another judge. ``judge/report.png`` plots it.

A judge is the distill config's teacher (the local model, or the OpenAI-compatible endpoint
through its client, budget and a reply cache ``judge/cache/``) or the distilled student,
through the same local path as the teacher. A project without ``judge.yaml`` has nothing to
judge: the stage logs so and writes nothing.

A judgement out of its bound is logged (FAILED, or "known unfit (<reason>)" for an item the
contract's ``known_unfit`` lists for that judge), never raised: the plugin's items judge it.
"""

from __future__ import annotations

import json
import logging
import time

from kdtrain import atomic
from kdtrain.artifact_table import (DATA_CORPUS, JUDGE_CACHE, JUDGE_PLOT, JUDGE_PROBES, JUDGE_REPORT, MIGRATION_AUDIT,
                                    TEACHER_BUDGET)
from kdtrain.errors import ConfigError, located
from kdtrain.stage import StageContext

log = logging.getLogger("kdtrain.judge")
CONTRACT = "judge.yaml"


def judge_identity(folder, name: str) -> str:
    """What a report's judge ``name`` must have been: the teacher the folder's tokenizers were built
    for (its name and version), or the student the folder exports (its checkpoint's SHA-256)."""
    if name == "teacher":
        teacher = json.loads(folder.path(MIGRATION_AUDIT).read_text(encoding="utf-8"))["teacher"]
        return f"{teacher['name']} {teacher['version']}"
    student = folder.exported_student()
    return f"{student.name} sha256:{folder.entry(student).sha256}"


def build_probes(folder, contract, registry):
    """The probe set of the contract's settings, held out from the corpus's prompts, saved and recorded."""
    from kdtrain.data.corpus import Corpus
    from kdtrain.judge.probes import build_probe_set

    corpus = Corpus.load(folder.path(DATA_CORPUS)) if DATA_CORPUS.name in folder.manifest.artifacts else None
    p = contract.probes
    probes = build_probe_set(registry, p.pairs_per_kind, p.graded_tasks, p.seed, corpus)
    probes.save(folder.root / JUDGE_PROBES.path)
    folder.record(JUDGE_PROBES)
    return probes


def _teacher_judge(ctx: StageContext, contract):
    from kdtrain.tokenizers.load import load_tokenizer

    config, folder = ctx.config, ctx.folder
    recorded = judge_identity(folder, "teacher")
    if recorded != f"{config.teacher.name} {config.teacher.version}":
        raise ConfigError(located(ctx.distill_config, "teacher", f"the teacher the artifacts were built for ({recorded})",
                                  f"{config.teacher.name} {config.teacher.version} (re-run: kdtrain pipeline --stages tokenizers)"))
    tokenizer = load_tokenizer(folder, "teacher")
    if config.teacher.backend == "local":
        from kdtrain.judge.local import LocalJudge
        from kdtrain.teacher import source

        return LocalJudge(source.load_model(config.teacher.source), tokenizer, "teacher", contract.batch_size)
    from kdtrain.judge.api import OpenAIJudge
    from kdtrain.teacher.cache import TeacherCache
    from kdtrain.teacher.stage import _api_teacher

    return OpenAIJudge(_api_teacher(config, folder), tokenizer, "teacher", TeacherCache(folder.root / JUDGE_CACHE.path))


def _student_judge(ctx: StageContext, contract):
    from kdtrain.judge.local import LocalJudge
    from kdtrain.student.model import StudentLM
    from kdtrain.tokenizers.load import load_tokenizer

    folder = ctx.folder
    student = StudentLM.from_pretrained(folder.path(folder.exported_student()))
    return LocalJudge(student, load_tokenizer(folder, "student"), "student", contract.batch_size)


def make_judges(ctx: StageContext, contract) -> dict:
    """The judges the contract names, built from the distill config and the folder."""
    return {name: (_teacher_judge if name == "teacher" else _student_judge)(ctx, contract) for name in contract.judges}


def run_judge(judge, probes) -> dict:
    """Both orders of every pair and a pointwise score of every graded output; the records and the seconds."""
    keys, items = [], []
    for pair in probes.pairs:
        for first in (0, 1):  # the output shown in position A
            keys.append((pair.id, first))
            items.append((pair.task, pair.outputs[first].text, pair.outputs[1 - first].text))
    start = time.perf_counter()
    verdicts = judge.compare(items)
    graded = [(g.id, i, g.task, o.text) for g in probes.graded for i, o in enumerate(g.outputs)]
    scores = judge.score([(task, text) for _, _, task, text in graded])
    seconds = time.perf_counter() - start
    pairwise = [{"pair": p, "first": f, "logprob_a": round(v.logprob_a, 6), "logprob_b": round(v.logprob_b, 6)}
                for (p, f), v in zip(keys, verdicts)]
    pointwise = [{"item": item, "output": i, "score": round(s, 6)} for (item, i, _, _), s in zip(graded, scores)]
    return {"pairwise": pairwise, "pointwise": pointwise, "seconds": round(seconds, 2),
            "forward_passes": len(items) + len(graded)}


def evaluate_judges(folder, contract, judges: dict, probes) -> dict:
    """Every judge on the probe set; ``judge/report.json`` and its plot written and recorded; the report."""
    from kdtrain.judge.metrics import judge_metrics, plot_judges, support
    from kdtrain.judge.prompts import prompts_sha256

    results = {}
    for name, judge in judges.items():
        run = run_judge(judge, probes)
        metrics = judge_metrics(probes, run["pairwise"], run["pointwise"])
        results[name] = {"identity": judge_identity(folder, name), **run, "metrics": metrics}
        for j in contract.judge(name, metrics["overall"], support(metrics)):
            unfit = contract.unfit_reason(name, j.item.split("[")[0])
            verdict = "ok" if j.passed else ("FAILED" if unfit is None else f"known unfit ({unfit})")
            log.info("judge %s: %s %s, %s (%s)", j.item, "undefined" if j.value is None else f"{j.value:.3f}",
                     verdict, j.expected, j.detail)
    report = {JUDGE_PROBES.name: f"sha256:{folder.entry(JUDGE_PROBES).sha256}", "prompts": prompts_sha256(),
              "contract": str(contract.file), "judges": results}
    atomic.write_json(folder.root / JUDGE_REPORT.path, report)
    plot_judges(probes, results, folder.root / JUDGE_PLOT.path)
    for artifact in (JUDGE_REPORT, JUDGE_PLOT):
        folder.record(artifact)
    return report


def _keep_api_spending(folder, judges: dict) -> None:
    """An API judge's calls are the run's teacher calls: spent money stays spent (teacher/budget.json), and
    the replies stay cached, even when judging failed half way."""
    from kdtrain.judge.api import OpenAIJudge

    for judge in judges.values():
        if isinstance(judge, OpenAIJudge):
            judge.cache.close()
            atomic.write_json(folder.root / TEACHER_BUDGET.path, judge.client.budget.state_dict())
            folder.record(TEACHER_BUDGET)
            if (folder.root / JUDGE_CACHE.path).exists():
                folder.record(JUDGE_CACHE)


def stage_judge(ctx: StageContext) -> None:
    folder = ctx.folder
    if not (ctx.contracts / CONTRACT).exists():
        log.warning("stage judge: nothing to judge, %s has no %s", ctx.contracts, CONTRACT)
        return
    start = time.perf_counter()
    contract = ctx.contract(CONTRACT)
    probes = build_probes(folder, contract, ctx.contract("tool_registry.json"))
    built = time.perf_counter() - start
    judges = make_judges(ctx, contract)
    try:
        report = evaluate_judges(folder, contract, judges, probes)
    finally:
        _keep_api_spending(folder, judges)
    seconds = {"probe_set": round(built, 2), **{n: r["seconds"] for n, r in report["judges"].items()},
               "stage": round(time.perf_counter() - start, 2)}
    folder.record_stage("judge", {"judges": {n: r["identity"] for n, r in report["judges"].items()}, "probes": probes.settings,
                                  "seconds": seconds})
    log.info("stage judge: %s", ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
