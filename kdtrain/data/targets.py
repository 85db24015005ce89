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
