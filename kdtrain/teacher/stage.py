"""Pipeline stage ``teacher``: fill the logit cache for the validated corpus.

Which teacher and how (backend, version, mode, top-k, max new tokens) come from the distill
config's ``teacher`` section, the one the trainer reads too: the two cannot disagree. The
report records those settings (never an API key), so that the contract checks rebuild the
same requests and hold the teacher against what ``distill_data.yaml`` accepts.

The cache is appended to, never rewritten: a re-run asks the teacher only for samples
without a trusted entry (and loads no model when there are none). An API teacher's attempts
and tokens are booked against ``budgets.teacher_calls`` / ``budgets.teacher_tokens``; what
was spent is kept in ``teacher/budget.json`` after every pass, so a re-run continues from it
instead of spending the budget again.
"""

from __future__ import annotations

import json
from dataclasses import asdict

from kdtrain import atomic
from kdtrain.artifact_table import DATA_CORPUS, TEACHER_BUDGET, TEACHER_CACHE, TEACHER_REPORT
from kdtrain.data.targets import TeacherTargets
from kdtrain.errors import ArtifactError, located
from kdtrain.stage import StageContext
from kdtrain.teacher.budget import Budget, BudgetLimits
from kdtrain.teacher.cache import TeacherCache
from kdtrain.teacher.fill import TeacherSettings, build_request, fill_cache
from kdtrain.tokenizers.load import load_tokenizer

SETTINGS = ("name", "version", "mode", "top_k", "max_new_tokens")


class _LazyTeacher:
    """Loads the local model (teacher.source) on the first request only."""

    def __init__(self, tokenizer, teacher_config):
        self.tokenizer, self.config, self._teacher = tokenizer, teacher_config, None
        self.name, self.version = teacher_config.name, teacher_config.version

    def complete(self, request):
        from kdtrain.teacher import source
        from kdtrain.teacher.local import LocalTeacher

        if self._teacher is None:
            self._teacher = LocalTeacher(source.load_model(self.config.source), self.tokenizer, self.name, self.version)
        return self._teacher.complete(request)


def teacher_requests(folder, settings: TeacherSettings):
    """The requests for the corpus artifact, as the teacher tokenizer artifact encodes them."""
    from kdtrain.data.corpus import Corpus

    tokenizer = load_tokenizer(folder, "teacher")
    corpus = Corpus.load(folder.path(DATA_CORPUS))
    return [build_request(s.id, s.messages, tokenizer, settings) for s in corpus.samples], tokenizer


def filled_settings(folder) -> TeacherSettings:
    """The settings the cache was last filled with, as the teacher report records them."""
    path = folder.path(TEACHER_REPORT)
    recorded = json.loads(path.read_text(encoding="utf-8")).get("teacher", {})
    if not all(key in recorded for key in SETTINGS):
        raise ArtifactError(located(path, "teacher", f"the keys {', '.join(SETTINGS)} (written by the teacher stage)", sorted(recorded)))
    return TeacherSettings(*(recorded[key] for key in SETTINGS))


def _api_teacher(config, folder):
    """The OpenAI-compatible client, its budget continuing from what earlier passes spent."""
    from kdtrain.teacher.openai_api import OpenAIChatTeacher

    t, endpoint = config.teacher, config.teacher.openai
    limits = BudgetLimits(config.budgets.teacher_calls, config.budgets.teacher_tokens)
    spent = folder.root / TEACHER_BUDGET.path
    budget = Budget.from_state(json.loads(spent.read_text(encoding="utf-8")), limits) if spent.exists() else Budget(limits)
    return OpenAIChatTeacher(endpoint.base_url, endpoint.model, t.version, api_key_env=endpoint.api_key_env, budget=budget,
                             timeout_s=endpoint.timeout_s, name=t.name)


def stage_teacher(ctx: StageContext) -> None:
    folder = ctx.folder
    config = ctx.config
    settings = config.teacher.settings()
    requests, tokenizer = teacher_requests(folder, settings)
    api = config.teacher.backend == "openai"
    teacher = _api_teacher(config, folder) if api else _LazyTeacher(tokenizer, config.teacher)
    with TeacherCache(folder.root / TEACHER_CACHE.path) as cache:  # closed before it is hashed: one file, no write-ahead log
        try:
            fill = fill_cache(cache, teacher, requests, settings.accept)
        finally:
            if api:  # spent money stays spent, even when the pass fails
                atomic.write_json(folder.root / TEACHER_BUDGET.path, teacher.budget.state_dict())
        targets = TeacherTargets(requests, cache, settings.accept)
        usable = sum(1 for _ in targets)
        recorded = {"backend": config.teacher.backend, **asdict(settings), "source": config.teacher.source.model_dump(mode="json")}
        if api:
            recorded["endpoint"] = {"base_url": config.teacher.openai.base_url, "model": config.teacher.openai.model}
        report = {
            "teacher": recorded, "config": str(ctx.distill_config),
            "fill": fill.to_json(),
            "targets": {"samples": len(requests), "usable": usable, "missing_ratio": targets.missing_ratio, "missing": targets.missing},
            "storage": cache.stats(vocab_size=len(tokenizer.vocab)),
        }
    if api:
        report["budget"] = teacher.budget.state_dict()
    atomic.write_json(folder.root / TEACHER_REPORT.path, report)
    folder.record(TEACHER_CACHE)
    folder.record(TEACHER_REPORT)
    if api:
        folder.record(TEACHER_BUDGET)
    folder.record_stage("teacher", {"backend": config.teacher.backend, "teacher": settings.version, "mode": settings.mode,
                                    "top_k": settings.top_k, "fetched": fill.fetched, "retry_later": len(fill.retry_later)})
