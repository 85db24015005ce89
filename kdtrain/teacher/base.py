"""One teacher interface for every backend: a request in, text plus top-k log-probs out.

A request carries the exact prompt (rendered text and the teacher tokenizer's ids) so that
the cache can key and verify entries on what the teacher actually saw. Two modes:

- ``generate``: the teacher completes the prompt (every backend, API teachers included);
- ``score``: the teacher reads the whole conversation once (teacher forcing) and reports
  its distribution at every token inside ``score_spans`` (the assistant's turns). Only a
  local model can do this; it gives targets on exactly the text the student learns.

Either way the response holds, per target token, the top-k token ids and log-probs and
the token's character span in the response text. Character spans are how teacher and
student positions are aligned when their tokenizers differ.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Literal, Protocol, Sequence

import numpy as np

from kdcontracts.models.tokens import Message
from kdtrain.errors import KDError


class TeacherError(KDError):
    """A request failed for good (after retries): the item is marked "retry later"."""


class BudgetExceeded(TeacherError):
    """Spending one more call or token would exceed the run's budget: stop asking."""


Mode = Literal["generate", "score"]


@dataclass(frozen=True)
class TeacherRequest:
    sample_id: str
    messages: tuple[Message, ...]  # generate: the prompt; score: the whole conversation
    text: str  # messages rendered by the tokenizer's chat template (generate: ending with its assistant header)
    ids: tuple[int, ...]  # text in the teacher tokenizer
    mode: Mode = "generate"
    score_spans: tuple[tuple[int, int], ...] = ()  # score: character spans to report
    max_new_tokens: int = 128
    top_k: int = 8

    def prompt_sha256(self) -> str:
        """SHA-256 of the exact prompt: text, token ids, mode and what is scored."""
        canonical = json.dumps(
            {"text": self.text, "ids": list(self.ids), "mode": self.mode, "score_spans": [list(s) for s in self.score_spans],
             "max_new_tokens": self.max_new_tokens, "top_k": self.top_k},
            sort_keys=True, ensure_ascii=False, separators=(",", ":"),
        )
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class TeacherResponse:
    text: str  # generate: the completion; score: the request's text
    token_ids: np.ndarray  # int32 [T]: the target tokens in the teacher's vocabulary
    offsets: np.ndarray  # int32 [T, 2]: each target token's character span in ``text``
    topk_ids: np.ndarray  # int32 [T, k]: the teacher's k likeliest tokens at that position
    topk_logprobs: np.ndarray  # float32 [T, k], descending along k
    prompt_tokens: int
    completion_tokens: int

    def __post_init__(self) -> None:
        t = len(self.token_ids)
        shapes = (self.token_ids.shape, self.offsets.shape, self.topk_ids.shape, self.topk_logprobs.shape)
        if (self.token_ids.ndim != 1 or self.offsets.shape != (t, 2) or self.topk_ids.ndim != 2
                or self.topk_ids.shape != self.topk_logprobs.shape or self.topk_ids.shape[0] != t):
            raise TeacherError(f"teacher response: expected token_ids [T], offsets [T, 2], top-k ids and logprobs [T, k], found {shapes}")


class Teacher(Protocol):
    name: str
    version: str

    def complete(self, request: TeacherRequest) -> TeacherResponse: ...


def top_k(logprobs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k ids (int32) and log-probs (float32) along the last axis, best first."""
    idx = np.argpartition(-logprobs, k - 1, axis=-1)[..., :k]
    vals = np.take_along_axis(logprobs, idx, axis=-1)
    order = np.argsort(-vals, axis=-1, kind="stable")
    return np.take_along_axis(idx, order, -1).astype(np.int32), np.take_along_axis(vals, order, -1).astype(np.float32)


def prompt_messages(messages: Sequence[Message]) -> tuple[Message, ...]:
    """The prompt for a sample: everything before its last assistant turn."""
    last = max((i for i, m in enumerate(messages) if m.role == "assistant"), default=len(messages))
    return tuple(messages[:last])
