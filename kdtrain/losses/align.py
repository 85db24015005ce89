"""Teacher targets on student positions, matched by character span.

The teacher scores the rendered conversation with its own tokenizer; the student reads the
same text with a vocabulary that adds the thinking and tool tags as single tokens. A teacher
distribution is used at a student position only where both predict *the same text*: the
student token predicted there has exactly the character span of a teacher target token.
Then both read the same characters before it and predict the same characters next, so the
distributions are comparable. Inside a tag the teacher splits (``<`` ``tool`` ``_`` ``call``
``>``) nothing corresponds; those positions get CE only.

Everything here is indexed by *predicting position*: the logits at student position ``t``
predict token ``t + 1``, so the teacher distribution for student token ``t + 1`` is placed
at ``t``. Teacher ids below ``shared_vocab`` are the same tokens in the student vocabulary
(the migration appends the tags after the teacher's ids); any other id becomes -1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from kdtrain.teacher.base import TeacherResponse

NO_TOKEN = -1


def match_spans(student_offsets: Sequence[tuple[int, int]], teacher_offsets: Sequence[tuple[int, int]]) -> np.ndarray:
    """int64 [S]: for each student token, the index of the teacher token with the same span, else -1."""
    index = {(int(s), int(e)): j for j, (s, e) in enumerate(teacher_offsets) if e > s}
    return np.asarray([index.get((int(s), int(e)), NO_TOKEN) for s, e in student_offsets], np.int64).reshape(-1)


@dataclass(frozen=True)
class AlignedTargets:
    mask: np.ndarray  # bool [S]: a teacher distribution for the token that position t predicts
    topk_ids: np.ndarray  # int64 [S, k]: student-vocabulary ids, -1 where none or not shared
    topk_logprobs: np.ndarray  # float32 [S, k]: the teacher's log-probs (0 where ids are -1)

    @property
    def aligned(self) -> int:
        return int(self.mask.sum())


def align_targets(student_offsets: Sequence[tuple[int, int]], targets: TeacherResponse, shared_vocab: int) -> AlignedTargets:
    """Teacher top-k (score mode: spans in the rendered text) placed at the student positions that predict the same span."""
    s, k = len(student_offsets), targets.topk_ids.shape[1]
    ids = np.full((s, k), NO_TOKEN, np.int64)
    logprobs = np.zeros((s, k), np.float32)
    match = match_spans(student_offsets, targets.offsets.tolist())  # [S] teacher target per student token
    tokens = np.flatnonzero(match[1:] >= 0) + 1  # student tokens with a teacher target (token 0 is never predicted)
    teacher_ids = targets.topk_ids[match[tokens]].astype(np.int64)  # [n, k]
    shared = (teacher_ids >= 0) & (teacher_ids < shared_vocab)
    ids[tokens - 1] = np.where(shared, teacher_ids, NO_TOKEN)
    logprobs[tokens - 1] = np.where(shared, targets.topk_logprobs[match[tokens]], 0.0)
    mask = (ids >= 0).any(axis=1)
    return AlignedTargets(mask, ids, logprobs)


def overlapping_positions(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """bool [S]: predicting positions whose next token overlaps one of ``spans`` (character spans)."""
    starts = np.asarray([o[0] for o in offsets], np.int64)
    ends = np.asarray([o[1] for o in offsets], np.int64)
    hit = np.zeros(len(starts), bool)
    for lo, hi in spans:
        hit |= (starts < hi) & (ends > lo)
    out = np.zeros(len(starts), bool)
    out[:-1] = hit[1:]
    return out
