"""Reading the tool calls out of assistant messages, as the runtime would parse them.

Two forms: ``<tool_call>`` blocks holding one JSON object ``{"name", "arguments"}``, and, in
code mode, the calls that ``run_code``'s Python makes to registry tools (found with ``ast``,
never executed). A call that cannot be read carries its problem (cause and detail) instead of
arguments; checking arguments against the registry is ``kdtrain.data.validate``'s job.
"""

from __future__ import annotations

import ast
import builtins
import json
import keyword
import re
from dataclasses import dataclass, field

OPEN, CLOSE = "<tool_call>", "</tool_call>"
CODE_TOOL = "run_code"
_NAME = re.compile(r'"name"\s*:\s*"([^"\\]{1,64})"')


@dataclass(frozen=True)
class Block:
    """The text of one ``<tool_call>`` block: ``content[start:end]``; unclosed if no ``</tool_call>`` ends it."""

    start: int
    end: int
    text: str
    closed: bool


def find_blocks(content: str) -> list[Block]:
    blocks, pos = [], 0
    while (start := content.find(OPEN, pos)) != -1:
        body = start + len(OPEN)
        close, following = content.find(CLOSE, body), content.find(OPEN, body)
        if close == -1 or -1 < following < close:
            end = following if following != -1 else len(content)
            blocks.append(Block(body, end, content[body:end], False))
            pos = end
        else:
            blocks.append(Block(body, close, content[body:close], True))
            pos = close + len(CLOSE)
    return blocks


@dataclass(frozen=True)
class Call:
    tool: str | None  # the name as written; None when it cannot be read
    where: str  # "messages[2] <tool_call> #1" or "messages[2] run_code line 3"
    arguments: dict = field(default_factory=dict)  # literal arguments
    opaque: frozenset[str] = frozenset()  # code keyword arguments whose values are computed
    problem: tuple[str, str] | None = None  # (cause, detail) when the call cannot be read


def unterminated(text: str) -> bool:
    """Whether ``text`` stops inside a string, object or array (a truncated JSON document)."""
    stack, in_string, escaped = [], False, False
    for char in text:
        if in_string:
            escaped, in_string = (False, True) if escaped else (char == "\\", char != '"')
        elif char == '"':
            in_string = True
        elif char in "{[":
            stack.append("}" if char == "{" else "]")
        elif char in "}]":
            if not stack or stack.pop() != char:
                return False
    return in_string or bool(stack) or not text.strip()


def _json_call(block: Block, where: str) -> Call:
    guess = _NAME.search(block.text)
    name = guess[1] if guess else None
    if not block.closed:
        return Call(name, where, problem=("unclosed_tool_call", f"expected {CLOSE} after the call, found none after {describe(block.text.rstrip(), 50)}"))
    try:
        envelope = json.loads(block.text)
    except json.JSONDecodeError as exc:
        if unterminated(block.text):
            return Call(name, where, problem=("truncated_json", f"expected a complete JSON object, found it cut off after {describe(block.text.strip(), 50)}"))
        near = block.text[max(0, exc.pos - 20): exc.pos + 20]
        return Call(name, where, problem=("invalid_json", f"expected valid JSON, found {exc.msg.removesuffix(' at')} at column {exc.colno} near {describe(near)}"))
    if not (isinstance(envelope, dict) and set(envelope) == {"name", "arguments"}
            and isinstance(envelope["name"], str) and isinstance(envelope["arguments"], dict)):
        return Call(name, where, problem=("invalid_json", f'expected {{"name": string, "arguments": object}}, found {describe(envelope)}'))
    return Call(envelope["name"], where, envelope["arguments"])


def field_name(argument: str) -> str:
    """A keyword argument's field: ``from_`` stands for ``from``, a Python keyword."""
    return argument[:-1] if argument.endswith("_") and keyword.iskeyword(argument[:-1]) else argument


def _bound_names(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.alias):
            names.add((node.asname or node.name).split(".")[0])
    return names


def tool_calls_in_code(tree: ast.AST, tools: set[str]) -> list[ast.Call]:
    """The calls of ``tools`` by name, in source order."""
    found = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in tools]
    return sorted(found, key=lambda n: (n.lineno, n.col_offset))


def code_calls(code: str, tools: set[str], where: str) -> list[Call]:
    """The calls ``run_code``'s code makes to functions that are not builtins or its own."""
    try:
        tree = ast.parse(code)
    except SyntaxError as exc:
        return [Call(CODE_TOOL, where, problem=("invalid_value", f"arguments.code: expected Python, found a syntax error at line {exc.lineno}: {exc.msg}"))]
    known = _bound_names(tree) | set(dir(builtins))
    calls = []
    for node in sorted((n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)), key=lambda n: (n.lineno, n.col_offset)):
        name, here = node.func.id, f"{where} line {node.lineno}"
        if name not in tools:
            if name not in known:
                calls.append(Call(name, here))
            continue
        if node.args:
            calls.append(Call(name, here, problem=("unexpected_field", f"expected keyword arguments only, found {len(node.args)} positional argument(s)")))
            continue
        arguments, opaque = {}, set()
        for kw in node.keywords:
            if kw.arg is None:
                opaque.add("**")
                continue
            try:
                arguments[field_name(kw.arg)] = ast.literal_eval(kw.value)
            except ValueError:
                opaque.add(field_name(kw.arg))
        calls.append(Call(name, here, arguments, frozenset(opaque)))
    return calls


def read_calls(index: int, content: str, tools: set[str]) -> list[Call]:
    """Every call of one assistant message (``index`` in the sample), run_code's inner calls after it."""
    calls = []
    for number, block in enumerate(find_blocks(content), start=1):
        call = _json_call(block, f"messages[{index}] {OPEN} #{number}")
        calls.append(call)
        code = call.arguments.get("code") if call.tool == CODE_TOOL and call.problem is None else None
        if isinstance(code, str):
            calls.extend(code_calls(code, tools, f"messages[{index}] {CODE_TOOL}"))
    return calls


def describe(value: object, limit: int = 60) -> str:
    """A value as a message quotes it: a string in Python quotes, anything else as JSON, shortened."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = text if len(text) <= limit else ("…" + text[1 - limit:] if isinstance(value, str) else text[: limit - 1] + "…")
    return repr(text) if isinstance(value, str) else text
