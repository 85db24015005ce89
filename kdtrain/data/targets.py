"""What the trainer iterates: samples paired with teacher targets that verified.

A sample whose cache entry is missing, damaged, stale or from a teacher not accepted is
skipped, never trained on without its targets; how many were skipped, and why, is logged
at the end of every pass as the missing-teacher ratio.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from kdcontracts.models.distill_data import Accept
from kdtrain.teacher.base import TeacherRequest, TeacherResponse
from kdtrain.teacher.cache import TeacherCache

log = logging.getLogger("kdtrain.data")


@dataclass(frozen=True)
class DistillExample:
    request: TeacherRequest  # the sample as the teacher saw it
    targets: TeacherResponse  # verified top-k targets and their character spans


def as_teacher_forced(example: DistillExample, chat) -> DistillExample:
    """A generate-mode target as a teacher-forced one: sequence-level KD (Kim and Rush, 2016).

    The teacher's answer becomes the assistant turn after the prompt, rendered by ``chat`` (a
    :class:`kdtrain.data.chat.ChatFormat`), and its top-k, reported on the answer's own
    characters, move to where the answer sits in the rendered conversation. Score-mode
    examples are returned as they are."""
    import dataclasses

    from kdcontracts.models.tokens import Message

    request, response = example.request, example.targets
    if request.mode == "score":
        return example
    messages = (*request.messages, Message("assistant", response.text))
    rendered = chat.render(messages)
    start = rendered.message_spans[-1][0]
    forced = dataclasses.replace(request, messages=messages, text=rendered.text, ids=(), mode="score",
                                 score_spans=tuple(rendered.supervised_spans[-1:]))
    return DistillExample(forced, dataclasses.replace(response, text=rendered.text, offsets=response.offsets + start))


@dataclass
class TeacherTargets:
    requests: Sequence[TeacherRequest]
    cache: TeacherCache
    accept: Accept
    missing: dict[str, str] = field(default_factory=dict)  # sample id -> why, for the last pass

    def __iter__(self) -> Iterator[DistillExample]:
        self.missing = {}
        for request in self.requests:
            found = self.cache.lookup(request, self.accept)
            if found.entry is None:
                self.missing[request.sample_id] = found.reason
                continue
            yield DistillExample(request, found.entry.response)
        log.info("missing teacher targets: %d/%d samples (%.1f%%)%s", len(self.missing), len(self.requests),
                 100 * self.missing_ratio, f"; {dict(self.reasons)}" if self.missing else "")

    @property
    def missing_ratio(self) -> float:
        return len(self.missing) / len(self.requests) if self.requests else 0.0

    @property
    def reasons(self) -> Counter:
        return Counter("missing" if r == "missing" else "refused" for r in self.missing.values())
