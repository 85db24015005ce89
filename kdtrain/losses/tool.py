"""Tool-step supervision: where, in the rendered text, the tool name, its arguments and the
answer's use of tool results are, so that CE can be weighted on exactly those tokens.

A wrong tool name or a broken argument object costs a whole step at run time while
costing CE only a few tokens among many; separate terms make them count on their own:

- ``tool_name``: CE on the tokens overlapping the name's characters (quotes excluded);
- ``tool_args``: CE on the tokens of the ``arguments`` object (braces included);
- ``tool_integration``: CE on the answer tokens that restate values of an earlier tool
  result, found by permissive patterns (:mod:`kdtrain.losses.integration`).

Calls are read as the runtime reads them (``kdtrain.data.calls.find_blocks``); only the
top level of the call object is walked, so an argument called ``name`` is not the name.
The loss itself is :func:`kdtrain.losses.ce.masked_ce` with these masks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from json.decoder import scanstring
from typing import Sequence

from kdcontracts.models.tokens import Message
from kdtrain.data.calls import CLOSE, OPEN, find_blocks
from kdtrain.data.chat import RenderedChat
from kdtrain.losses.integration import integration_spans, integrates

__all__ = ["CallSpans", "ToolSpans", "call_spans", "integrates", "integration_spans", "tool_spans"]

Span = tuple[int, int]
_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class CallSpans:
    """One ``<tool_call>`` block of a message; spans are relative to the message content."""

    open_tag: Span
    tool: str | None
    name: Span | None  # the name string's characters, without its quotes
    arguments: Span | None  # the arguments object, braces included
    code: str | None = None  # run_code's code argument, for the code-mode decision


def _skip(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _top_level(text: str) -> dict[str, tuple[int, int, object]]:
    """key -> (start, end, value) of each top-level field of the JSON object ``text`` starts with.

    Fields are collected up to the first syntax error: a truncated call keeps its name span.
    """
    fields: dict[str, tuple[int, int, object]] = {}
    i = _skip(text, 0)
    if not text.startswith("{", i):
        return fields
    i = _skip(text, i + 1)
    try:
        while text[i] == '"':
            key, i = scanstring(text, i + 1)
            i = _skip(text, i)
            if text[i] != ":":
                break
            start = _skip(text, i + 1)
            value, end = _DECODER.raw_decode(text, start)
            fields[key] = (start, end, value)
            i = _skip(text, end)
            if text[i] != ",":
                break
            i = _skip(text, i + 1)
    except (ValueError, IndexError):
        pass
    return fields


def call_spans(content: str) -> list[CallSpans]:
    """The tool calls of one assistant message, in order."""
    calls = []
    for block in find_blocks(content):
        fields = _top_level(block.text)
        name = fields.get("name")
        args = fields.get("arguments")
        tool = name[2] if name and isinstance(name[2], str) else None
        code = args[2].get("code") if args and isinstance(args[2], dict) else None
        calls.append(CallSpans(
            open_tag=(block.start - len(OPEN), block.start),
            tool=tool,
            name=(block.start + name[0] + 1, block.start + name[1] - 1) if tool is not None else None,
            arguments=(block.start + args[0], block.start + args[1]) if args and isinstance(args[2], dict) else None,
            code=code if isinstance(code, str) else None,
        ))
    return calls


@dataclass
class ToolSpans:
    """Character spans in the rendered conversation, for one sample."""

    names: list[Span] = field(default_factory=list)
    arguments: list[Span] = field(default_factory=list)
    integration: list[Span] = field(default_factory=list)
    calls: list[tuple[int, CallSpans]] = field(default_factory=list)  # (message index, call), spans absolute


def _shift(span: Span | None, by: int) -> Span | None:
    return None if span is None else (span[0] + by, span[1] + by)


def _answer_text(content: str) -> str:
    """The message with its tool-call blocks blanked (same length: spans stay valid)."""
    for block in find_blocks(content):
        start, end = block.start - len(OPEN), block.end + (len(CLOSE) if block.closed else 0)
        content = content[:start] + " " * (end - start) + content[end:]
    return content


def tool_spans(messages: Sequence[Message], rendered: RenderedChat) -> ToolSpans:
    """Name, argument and integration spans of every assistant message (integration: after a tool result)."""
    spans = ToolSpans()
    results: list[str] = []
    for index, (message, (offset, _)) in enumerate(zip(messages, rendered.message_spans, strict=True)):
        if message.role == "tool":
            results.append(message.content)
        if message.role != "assistant":
            continue
        calls = call_spans(message.content)
        for call in calls:
            absolute = CallSpans(_shift(call.open_tag, offset), call.tool, _shift(call.name, offset),
                                 _shift(call.arguments, offset), call.code)
            spans.calls.append((index, absolute))
            spans.names += [absolute.name] if absolute.name else []
            spans.arguments += [absolute.arguments] if absolute.arguments else []
        answer = _answer_text(message.content)
        for result in results:
            spans.integration += [_shift(s, offset) for s in integration_spans(answer, result)]
    return spans
