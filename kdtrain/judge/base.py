"""The judge interface: compare two outputs for a task, or score one.

A judge answers a scoring prompt (:mod:`kdtrain.judge.prompts`) with one token, and what it
says is read from the log-probabilities of the answer tokens rather than from sampled text:
``"A"``/``"B"`` for a pairwise comparison, ``"Yes"``/``"No"`` for a pointwise "is this
correct?". So a verdict has a strength (the renormalised probability, the per-output score)
as well as a direction, and the same reading serves a local model and an API that returns
top-k log-probs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol, Sequence

Position = Literal["A", "B"]


@dataclass(frozen=True)
class PairwiseVerdict:
    """One order's verdict: the log-probabilities of answering "A" and "B"."""

    logprob_a: float
    logprob_b: float

    @property
    def choice(self) -> Position | None:
        """The position preferred; None on an exact tie (it then counts for neither)."""
        if self.logprob_a == self.logprob_b:
            return None
        return "A" if self.logprob_a > self.logprob_b else "B"

    @property
    def scores(self) -> tuple[float, float]:
        """P(A) and P(B) renormalised over the two answers: the judge's score of each output."""
        p_a = two_way(self.logprob_a, self.logprob_b)
        return p_a, 1.0 - p_a


def two_way(logprob_yes: float, logprob_no: float) -> float:
    """P(first answer) when the judge must give one of the two (a logistic of the log-odds)."""
    return 1.0 / (1.0 + math.exp(max(-700.0, min(700.0, logprob_no - logprob_yes))))


def answer_token_ids(tokenizer, prompt: str, answers: tuple[str, ...], judge: str) -> list[int]:
    """The first token each answer adds right after the assistant header of ``prompt``, found in context
    (``prompt + answer`` must encode as ``prompt``'s tokens and more); the answers' first tokens must differ,
    since a verdict is read from their log-probabilities at that one position."""
    from kdtrain.errors import ArtifactError

    base, ids = tokenizer.encode(prompt).ids, []
    for answer in answers:
        full = tokenizer.encode(prompt + answer).ids
        if full[:len(base)] != base or len(full) == len(base):
            raise ArtifactError(f"judge {judge}: tokenizer {getattr(tokenizer, 'path', tokenizer)}: expected the prompt's tokens "
                                f"followed by those of {answer!r}, found the prompt itself re-tokenized (the verdict is read "
                                "from the answer's first token)")
        ids.append(full[len(base)])
    if len(set(ids)) < len(ids):
        raise ArtifactError(f"judge {judge}: tokenizer {getattr(tokenizer, 'path', tokenizer)}: expected answers {answers} to start "
                            f"with different tokens, found {ids}")
    return ids


class Judge(Protocol):
    """A judge over batches: ``compare`` takes (task, response A, response B), ``score`` (task, response)."""

    name: str

    def compare(self, items: Sequence[tuple[str, str, str]]) -> list[PairwiseVerdict]: ...

    def score(self, items: Sequence[tuple[str, str]]) -> list[float]: ...
