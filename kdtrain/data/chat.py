"""Chat rendering (ChatML, as SmolLM2 is trained) and supervised-label masking.

Only what the assistant produces is supervised: its content (thinking, tool calls with
their JSON, the answer) and the ``<|im_end|>`` that closes its turn. Headers, system, user
and tool-response turns get the ignore index. Labels are assigned from character spans
through the tokenizer's offsets, so a token that overlaps supervised text is supervised:
masking can only err towards supervising, never towards hiding a tool or JSON token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from kdcontracts.models.tokens import Message

IGNORE_INDEX = -100


@dataclass(frozen=True)
class RenderedChat:
    text: str
    message_spans: list[tuple[int, int]]  # character span of each message's content
    supervised_spans: list[tuple[int, int]]


def render_chat(messages: Sequence[Message]) -> RenderedChat:
    parts: list[str] = []
    pos = 0
    message_spans, supervised = [], []

    def emit(piece: str) -> tuple[int, int]:
        nonlocal pos
        parts.append(piece)
        start, pos = pos, pos + len(piece)
        return start, pos

    for message in messages:
        if message.role == "tool":
            emit("<|im_start|>user\n<tool_response>\n")
            span = emit(message.content)
            emit("\n</tool_response><|im_end|>\n")
        else:
            emit(f"<|im_start|>{message.role}\n")
            span = emit(message.content)
            end = emit("<|im_end|>")
            emit("\n")
            if message.role == "assistant":
                supervised.append((span[0], end[1]))
        message_spans.append(span)
    return RenderedChat("".join(parts), message_spans, supervised)


def supervised_labels(
    ids: Sequence[int], offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]
) -> list[int]:
    """Labels for next-token CE: the id where the token overlaps a supervised span, else ignore."""
    labels = []
    for token_id, (start, end) in zip(ids, offsets, strict=True):
        inside = any(start < s_end and end > s_start for s_start, s_end in spans)
        labels.append(int(token_id) if inside else IGNORE_INDEX)
    return labels


def tokenize_chat(tokenizer, messages: Sequence[Message]) -> tuple[RenderedChat, list[int], list[int]]:
    """Render, tokenize (a :class:`kdtrain.tokenizers.Tokenizer`) and label one conversation."""
    rendered = render_chat(messages)
    enc = tokenizer.encode(rendered.text)
    return rendered, enc.ids, supervised_labels(enc.ids, enc.offsets, rendered.supervised_spans)
