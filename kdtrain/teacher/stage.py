"""Pipeline stage ``teacher``: fill the logit cache for the validated corpus.

The cache lives in the artifacts folder and is appended to, never rewritten: a re-run asks
the teacher only for samples without a trusted entry (and loads no model when there are
none). Its report gives the fill counts, the retry-later list and the storage per token.
"""

from __future__ import annotations

from kdtrain import atomic
from kdtrain.data.targets import TeacherTargets
from kdtrain.pipeline import StageContext
from kdtrain.teacher.cache import TeacherCache
from kdtrain.teacher.fill import build_request, fill_cache
from kdtrain.tokenizers.load import load_tokenizer

CACHE = "teacher/cache"
REPORT = "teacher/report.json"


class _LazyTeacher:
    """Loads the local model on the first request only."""

    def __init__(self, tokenizer, name: str, version: str):
        self.tokenizer, self.name, self.version, self._teacher = tokenizer, name, version, None

    def complete(self, request):
        from kdtrain.teacher.local import LocalTeacher

        if self._teacher is None:
            self._teacher = LocalTeacher.load(self.tokenizer)
        return self._teacher.complete(request)


def teacher_requests(folder, settings):
    """The requests for the corpus artifact, as the teacher tokenizer artifact encodes them."""
    from kdtrain.data.corpus import Corpus

    tokenizer = load_tokenizer(folder, "teacher")
    corpus = Corpus.load(folder.path("data.corpus"))
    return [build_request(s.id, s.messages, tokenizer, settings) for s in corpus.samples], tokenizer


def stage_teacher(ctx: StageContext) -> None:
    from kdtrain.teacher import gguf

    folder = ctx.folder
    contract = ctx.contract("distill_data.yaml")
    settings = contract.teacher
    requests, tokenizer = teacher_requests(folder, settings)
    teacher = _LazyTeacher(tokenizer, gguf.TEACHER_NAME, gguf.TEACHER_VERSION)
    with TeacherCache(folder.root / CACHE) as cache:  # closed before it is hashed: one file, no write-ahead log
        fill = fill_cache(cache, teacher, requests, settings.accept)
        targets = TeacherTargets(requests, cache, settings.accept)
        usable = sum(1 for _ in targets)
        report = {
            "teacher": {"name": teacher.name, "version": teacher.version, "mode": settings.mode, "top_k": settings.top_k},
            "fill": fill.to_json(),
            "targets": {"samples": len(requests), "usable": usable, "missing_ratio": targets.missing_ratio, "missing": targets.missing},
            "storage": cache.stats(vocab_size=len(tokenizer.vocab)),
        }
    atomic.write_json(folder.root / REPORT, report)
    folder.record("teacher.cache", CACHE, "cache/teacher-logits", "teacher")
    folder.record("teacher.report", REPORT, "report/teacher-fill", "teacher")
    folder.record_stage("teacher", {"teacher": teacher.version, "mode": settings.mode, "top_k": settings.top_k,
                                    "fetched": fill.fetched, "retry_later": len(fill.retry_later)})
