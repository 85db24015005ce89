"""The scoring prompts every judge answers, local or API: one place, so that judges differ
only in the model behind them.

The wording follows the MT-Bench pairwise judge: judge correctness, and say outright that
the order and the length of the responses must not sway the verdict (a judge that still
prefers the first or the longer response is what the probe set catches). The answer is one
token, read from its log-probability: "A"/"B" for a pair, "Yes"/"No" for one response.
"""

from __future__ import annotations

import hashlib

from kdcontracts.models.tokens import Message

SYSTEM = "You are an impartial judge of correctness. The order and the length of responses must not influence you."
PAIRWISE = "[Task]\n{task}\n\n[Response A]\n{a}\n\n[Response B]\n{b}\n\nWhich response is correct? Answer with one letter: A or B."
POINTWISE = "[Task]\n{task}\n\n[Response]\n{response}\n\nIs this response correct? Answer Yes or No."
PAIRWISE_ANSWERS = ("A", "B")
POINTWISE_ANSWERS = ("Yes", "No")


def pairwise(task: str, a: str, b: str) -> tuple[Message, ...]:
    return Message("system", SYSTEM), Message("user", PAIRWISE.format(task=task, a=a, b=b))


def pointwise(task: str, response: str) -> tuple[Message, ...]:
    return Message("system", SYSTEM), Message("user", POINTWISE.format(task=task, response=response))


def prompts_sha256() -> str:
    """What the report records of the wording (a judge measured with other prompts measured another judge)."""
    text = "\0".join((SYSTEM, PAIRWISE, POINTWISE, *PAIRWISE_ANSWERS, *POINTWISE_ANSWERS))
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()
