"""Vocab migration: the teacher's tokenizer plus the thinking and tool tags, with an audit log.

The tags are added as *non-special* added tokens (``special=False, normalized=False``):
they match before pre-tokenization, so they are single tokens alone and inside running
text, and ``decode`` keeps them by default, which the host app needs to parse them. New
ids are appended after the teacher's vocabulary, so every teacher id keeps its meaning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kdtrain.tokenizers.fingerprint import vocab_sha256

TAGS = ("<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")

# Strings whose tokenization the migration changes, or must not change, for the audit log.
AUDIT_SAMPLES = (
    "<think>The user wants the weather; call the tool.</think>",
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>',
    '<tool_response>{"temperature_c": 18}</tool_response>',
    "Before<think>inline</think>after<tool_call>{}</tool_call>",
    "A <thinking> tag and a <tool> tag are ordinary text.",
    "Plain text without any tag.",
)


@dataclass(frozen=True)
class AddedTag:
    text: str
    id: int
    teacher_ids: list[int]  # how the teacher splits it; new embedding rows start from these


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def migrate_vocabulary(teacher, tags: tuple[str, ...] = TAGS):
    """Return (student tokenizer, added tags, audit log) for a transformers teacher tokenizer."""
    from copy import deepcopy

    from transformers import AddedToken

    before = dict(teacher.get_vocab())
    present = [tag for tag in tags if tag in before]
    if present:
        raise ValueError(f"teacher tokenizer: expected the new tags to be absent, found {present} already in it")
    student = deepcopy(teacher)
    student.add_tokens([AddedToken(t, special=False, normalized=False) for t in tags])
    after = dict(student.get_vocab())
    added = [AddedTag(t, after[t], _ids(teacher, t)) for t in tags]
    if sorted(a.id for a in added) != list(range(len(before), len(before) + len(tags))):
        raise AssertionError(f"new ids {[a.id for a in added]} are not appended after the teacher's {len(before)}")
    audit: dict[str, Any] = {
        "audit_version": 1,
        "from": {"tokenizer": "teacher", "vocab_size": len(before), "vocab_sha256": vocab_sha256(before)},
        "to": {"tokenizer": "student", "vocab_size": len(after), "vocab_sha256": vocab_sha256(after)},
        "added_tokens": [
            {
                "text": a.text,
                "id": a.id,
                "special": False,
                "normalized": False,
                "teacher_ids": a.teacher_ids,
                "teacher_pieces": teacher.convert_ids_to_tokens(a.teacher_ids),
            }
            for a in added
        ],
        "samples": [
            {"text": s, "old_ids": _ids(teacher, s), "new_ids": _ids(student, s)}
            for s in (*tags, *AUDIT_SAMPLES)
        ],
    }
    for sample in audit["samples"]:
        sample["changed"] = sample["old_ids"] != sample["new_ids"]
    return student, added, audit
