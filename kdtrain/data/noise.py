"""Malformed tool calls planted on purpose, as real sources produce them.

A scraped or teacher-written corpus carries truncated generations, hallucinated tools,
missing or mistyped arguments and samples from an older schema. The reference corpus can
carry a seeded fraction of them (``CorpusSettings.noise``) so that the validation pass is
seen to catch and count each one; the tests plant every kind through the same functions.
"""

from __future__ import annotations

import json
import math
import random
from typing import Callable

from kdcontracts.models.tokens import Message
from kdcontracts.models.tool_registry import ToolRegistry, parse_version
from kdtrain.data.calls import CLOSE, CODE_TOOL, OPEN, find_blocks
from kdtrain.data.corpus import Corpus, Sample

HALLUCINATED_TOOL = "web_search"
UNEXPECTED_FIELD = "verbose"
CODE_UNKNOWN_CALL = 'notify_team(message="done")\n'
NOISE_KINDS = ("truncated_json", "unknown_tool", "missing_field", "wrong_type", "incompatible_version")

# rewrite(envelope, tool, block text, rng, registry) -> the new "<tool_call>…" segment, or None if it does not apply
Rewrite = Callable[[dict, object, str, random.Random, ToolRegistry], "str | None"]


def _segment(envelope: dict) -> str:
    return f"{OPEN}\n{json.dumps(envelope, ensure_ascii=False)}\n{CLOSE}"


def _with_arguments(envelope: dict, arguments: dict) -> str:
    return _segment({**envelope, "arguments": arguments})


def _truncated(envelope, tool, text, rng, registry):
    body = text.rstrip()
    start = text.index("{")
    return OPEN + text[: rng.randrange(start + 1, len(body))] + "\n" + CLOSE


def _invalid_json(envelope, tool, text, rng, registry):
    return OPEN + text.rstrip()[:-1] + ", }\n" + CLOSE  # a trailing comma: balanced, still not JSON


def _unclosed(envelope, tool, text, rng, registry):
    return OPEN + text.rstrip()


def _unknown_tool(envelope, tool, text, rng, registry):
    return _segment({**envelope, "name": HALLUCINATED_TOOL})


def _missing_field(envelope, tool, text, rng, registry):
    present = [k for k in tool.parameters["required"] if k in envelope["arguments"]]
    return _with_arguments(envelope, {k: v for k, v in envelope["arguments"].items() if k != present[0]}) if present else None


def _wrong_type(envelope, tool, text, rng, registry):
    props = tool.parameters["properties"]
    typed = [k for k in envelope["arguments"] if "type" in props.get(k, {})]
    if not typed:
        return None
    wrong = 42 if props[typed[0]]["type"] == "string" else "many"
    return _with_arguments(envelope, {**envelope["arguments"], typed[0]: wrong})


def _invalid_value(envelope, tool, text, rng, registry):
    props = tool.parameters["properties"]
    for key in envelope["arguments"]:
        schema = props.get(key, {})
        if "enum" in schema or "pattern" in schema:
            return _with_arguments(envelope, {**envelope["arguments"], key: "not-a-valid-value"})
        if "maximum" in schema:
            return _with_arguments(envelope, {**envelope["arguments"], key: schema["maximum"] + 1000})
    return None


def _unexpected_field(envelope, tool, text, rng, registry):
    return _with_arguments(envelope, {**envelope["arguments"], UNEXPECTED_FIELD: True})


def _code_line(line: Callable[[ToolRegistry], str]) -> Rewrite:
    """A line appended to the code of a run_code call."""
    def rewrite(envelope, tool, text, rng, registry):
        if envelope["name"] != CODE_TOOL or not isinstance(envelope["arguments"].get("code"), str):
            return None
        return _with_arguments(envelope, {**envelope["arguments"], "code": envelope["arguments"]["code"] + line(registry)})
    return rewrite


def _wrong_type_in_code(registry: ToolRegistry) -> str:
    tool = next(t for t in registry.tools if t.name != CODE_TOOL and any(t.parameters["properties"][k].get("type") == "string" for k in t.parameters["required"]))
    field = next(k for k in tool.parameters["required"] if tool.parameters["properties"][k].get("type") == "string")
    return f"extra = {tool.name}({field}=42)\n"


CALL_FAULTS: dict[str, Rewrite] = {
    "truncated_json": _truncated, "invalid_json": _invalid_json, "unclosed_tool_call": _unclosed, "unknown_tool": _unknown_tool,
    "missing_field": _missing_field, "wrong_type": _wrong_type, "invalid_value": _invalid_value, "unexpected_field": _unexpected_field,
    "code_wrong_type": _code_line(_wrong_type_in_code), "code_unknown_tool": _code_line(lambda registry: CODE_UNKNOWN_CALL),
}


def plant(sample: Sample, kind: str, registry: ToolRegistry, rng: random.Random) -> Sample | None:
    """``sample`` with one fault of ``kind`` (a key of CALL_FAULTS, or incompatible_version); None if it has no call to break."""
    if kind == "incompatible_version":
        major = parse_version(registry.tool_schema_version)[0]
        return sample.model_copy(update={"meta": sample.meta.model_copy(update={"tool_schema_version": f"{major - 1 if major else major + 1}.0"})})
    rewrite = CALL_FAULTS[kind]
    for index, message in enumerate(sample.messages):
        for block in find_blocks(message.content) if message.role == "assistant" else ():
            try:
                envelope = json.loads(block.text)
            except json.JSONDecodeError:
                continue  # already broken
            tool = registry.tool(envelope.get("name")) if isinstance(envelope, dict) else None
            new = rewrite(envelope, tool, block.text, rng, registry) if tool is not None else None
            if new is None:
                continue
            start, end = block.start - len(OPEN), block.end + len(CLOSE)
            content = message.content[:start] + new + message.content[end:]
            messages = sample.messages[:index] + (Message(message.role, content),) + sample.messages[index + 1:]
            return sample.model_copy(update={"messages": messages})
    return None


def plant_noise(corpus: Corpus, registry: ToolRegistry, rate: float, seed: int) -> Corpus:
    """At least ``rate`` of the samples (rounded up), chosen by ``seed``, each given one fault of NOISE_KINDS in turn."""
    rng = random.Random(f"{seed}/noise")
    samples = list(corpus.samples)
    chosen = sorted(rng.sample(range(len(samples)), math.ceil(round(rate * len(samples), 9))))
    for turn, index in enumerate(chosen):
        kind = NOISE_KINDS[turn % len(NOISE_KINDS)]
        samples[index] = plant(samples[index], kind, registry, rng) or plant(samples[index], "incompatible_version", registry, rng)
    return corpus.replace(samples=tuple(samples))
