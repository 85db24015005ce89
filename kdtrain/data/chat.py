"""Chat rendering through the tokenizer's own chat template, and supervised-label masking.

The template is the model's: SmolLM2 renders ChatML, a Zephyr-style tokenizer renders
``<|user|>`` blocks closed by ``</s>``. We render with it (transformers'
``apply_chat_template``) and then find each message's content in the output, in order: the
template may add headers, a default system prompt or separators around the content, but it
must keep the content itself verbatim, and must close every assistant turn with the
tokenizer's EOS; both are checked, with an error naming the tokenizer.

Tool results are the corpus's convention, not every template's: a ``tool`` message is
rendered as a user turn holding ``<tool_response>`` … ``</tool_response>``, which every
template can render.

Only what the assistant produces is supervised: its content (thinking, tool calls with
their JSON, the answer) and the EOS that closes its turn. Headers, system, user and
tool-response turns get the ignore index. Labels are assigned from character spans through
the tokenizer's offsets, so a token that overlaps supervised text is supervised: masking can
only err towards supervising, never towards hiding a tool or JSON token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from kdcontracts.models.tokens import Message
from kdtrain.errors import ArtifactError, DataError

IGNORE_INDEX = -100
TOOL_RESPONSE = ("<tool_response>", "</tool_response>")  # how the corpus wraps a tool result (kdtrain.data.templates)


@dataclass(frozen=True)
class RenderedChat:
    text: str
    message_spans: list[tuple[int, int]]  # character span of each message's content
    supervised_spans: list[tuple[int, int]]


@dataclass(frozen=True)
class ChatFormat:
    """A tokenizer's chat template and the token that closes a turn (its EOS)."""

    tokenizer: Any  # a transformers tokenizer with a chat_template
    end_of_turn: str
    name: str = "tokenizer"

    @classmethod
    def of(cls, tokenizer) -> "ChatFormat":
        """From a :class:`kdtrain.tokenizers.Tokenizer` (transformers kind) or a transformers tokenizer."""
        hf = getattr(tokenizer, "transformers", tokenizer)
        name = str(getattr(tokenizer, "path", None) or getattr(hf, "name_or_path", "") or "tokenizer")
        if not getattr(hf, "chat_template", None):
            raise ArtifactError(f"{name}: expected a tokenizer with a chat_template (the model's chat format), found none")
        if not hf.eos_token:
            raise ArtifactError(f"{name}: expected a tokenizer with an eos_token (the token closing a turn), found none")
        return cls(hf, hf.eos_token, name)

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> RenderedChat:
        """The conversation as the template renders it, with each content's span and the assistant turns' spans."""
        turns = [{"role": "user", "content": f"{TOOL_RESPONSE[0]}\n{m.content}\n{TOOL_RESPONSE[1]}"} if m.role == "tool"
                 else {"role": m.role, "content": m.content} for m in messages]
        try:
            text = self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=add_generation_prompt)
        except Exception as exc:  # jinja's raise_exception, undefined roles: many types
            raise DataError(f"{self.name}: chat template: expected it to render roles {sorted({t['role'] for t in turns})}, "
                            f"found an error: {exc}") from None
        message_spans, pos = [], 0
        for i, message in enumerate(messages):
            start = text.find(message.content, pos)
            if start < 0:
                raise DataError(f"{self.name}: chat template: expected message {i} ({message.role}) content verbatim in its "
                                f"output, found it changed (a template that trims or rewrites content cannot be aligned)")
            pos = start + len(message.content)
            message_spans.append((start, pos))
        supervised = []
        for i, message in enumerate(messages):
            if message.role != "assistant":
                continue
            end = message_spans[i][1]
            close = text.find(self.end_of_turn, end)
            following = message_spans[i + 1][0] if i + 1 < len(messages) else len(text)
            if close < 0 or close >= following:
                raise DataError(f"{self.name}: chat template: expected assistant message {i} closed by the EOS "
                                f"{self.end_of_turn!r}, found {text[end:following][:40]!r} after it")
            supervised.append((message_spans[i][0], close + len(self.end_of_turn)))
        return RenderedChat(text, message_spans, supervised)

    def prompt(self, messages: Sequence[Message]) -> str:
        """The text that asks for the next assistant turn."""
        return self.render(messages, add_generation_prompt=True).text


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
    rendered = ChatFormat.of(tokenizer).render(messages)
    enc = tokenizer.encode(rendered.text)
    return rendered, enc.ids, supervised_labels(enc.ids, enc.offsets, rendered.supervised_spans)
