"""Fill the logit cache from a teacher, item by item, losing nothing to a failed call.

Every sample ends a pass in exactly one place: cached (already, or fetched now) or on the
retry-later list with the reason. A failed call does not stop the batch; a budget
exhausted does (every remaining sample goes on the list). The next pass asks only for
what is not cached, so retrying is running the pass again.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

from tqdm import tqdm

from kdcontracts.models.distill_data import Accept
from kdcontracts.models.tokens import Message
from kdtrain import atomic
from kdtrain.data.chat import ChatFormat
from kdtrain.teacher.base import BudgetExceeded, Teacher, TeacherError, TeacherRequest, prompt_messages
from kdtrain.teacher.cache import TeacherCache, TeacherId

log = logging.getLogger("kdtrain.teacher")
RETRY_FILE = "retry_later.json"


@dataclass(frozen=True)
class TeacherSettings:
    """Which teacher fills the cache and how its targets are asked for (the distill config's
    ``teacher`` section; recorded in the teacher report so that checks rebuild the requests)."""

    name: str
    version: str
    mode: Literal["score", "generate"] = "score"
    top_k: int = 8
    max_new_tokens: int = 128

    @property
    def teacher(self) -> TeacherId:
        return TeacherId(self.name, self.version)

    @property
    def accept(self) -> Accept:
        """This teacher's entries only: what the trainer may train on."""
        return Accept(self.name, (self.version,))


def build_request(sample_id: str, messages: Sequence[Message], tokenizer, settings: TeacherSettings) -> TeacherRequest:
    """score: the whole conversation, targets on the assistant turns; generate: the prompt."""
    chat = ChatFormat.of(tokenizer)
    if settings.mode == "score":
        messages = tuple(messages)
        rendered = chat.render(messages)
        text, spans = rendered.text, tuple(rendered.supervised_spans)
    else:
        messages = prompt_messages(messages)
        text, spans = chat.prompt(messages), ()
    return TeacherRequest(sample_id, messages, text, tuple(tokenizer.encode(text).ids), settings.mode, spans,
                          settings.max_new_tokens, settings.top_k)


@dataclass
class FillReport:
    requested: int = 0
    hits: int = 0
    fetched: int = 0
    refused: dict[str, str] = field(default_factory=dict)  # entries found but not trusted: refetched
    retry_later: dict[str, str] = field(default_factory=dict)  # sample id -> why

    def to_json(self) -> dict:
        return {"requested": self.requested, "hits": self.hits, "fetched": self.fetched,
                "refused": self.refused, "retry_later": self.retry_later}


def _retry_file(cache: TeacherCache) -> Path:
    return cache.folder / RETRY_FILE


def retry_later(cache: TeacherCache) -> dict[str, str]:
    path = _retry_file(cache)
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def fill_cache(cache: TeacherCache, teacher: Teacher, requests: Sequence[TeacherRequest], accept: Accept) -> FillReport:
    """One pass: fetch what is not cached (or not trusted), list what failed, keep the rest."""
    if TeacherId(teacher.name, teacher.version) not in accept:
        raise TeacherError(f"teacher {teacher.name} {teacher.version}: expected {accept} (its entries would never be used)")
    report = FillReport(requested=len(requests))
    who = TeacherId(teacher.name, teacher.version)
    stopped: str | None = None
    for request in tqdm(requests, desc=f"teacher {teacher.name}", unit="sample"):
        found = cache.lookup(request, accept)
        if found.entry is not None:
            report.hits += 1
            continue
        if found.reason != "missing":
            report.refused[request.sample_id] = found.reason
            log.warning("cache entry for %s not used: %s; refetching", request.sample_id, found.reason)
        if stopped:
            report.retry_later[request.sample_id] = stopped
            continue
        try:
            response = teacher.complete(request)
        except BudgetExceeded as exc:
            stopped = f"budget exhausted: {exc}"
            report.retry_later[request.sample_id] = stopped
            continue
        except TeacherError as exc:
            report.retry_later[request.sample_id] = str(exc)
            continue
        cache.append(request, who, response)
        report.fetched += 1
    atomic.write_json(_retry_file(cache), report.retry_later)
    if report.retry_later:
        log.warning("teacher: %d of %d samples marked retry-later (run the pass again to retry them)",
                    len(report.retry_later), report.requested)
    return report
