"""Migration of a corpus to the registry's tool-schema version through its declared migrations.

Data written for an older tool schema is still worth training on once its calls say what
the runtime now expects: a renamed tool, a renamed field, an added field with its default.
The rewrite touches the ``<tool_call>`` JSON and the keyword calls inside ``run_code`` code
(edited in place at the positions ``ast`` gives, so the rest of the code stays as written).
Migrating is idempotent: a migrated sample carries the new version and is left alone again,
and ``dataset_version`` moves only when some byte of the corpus did.
"""

from __future__ import annotations

import ast
import json
import keyword
import re
from collections import Counter
from dataclasses import dataclass, field

from kdcontracts.models.tokens import Message
from kdcontracts.models.tool_registry import Migration, RenameField, RenameTool, Step, ToolRegistry, describe_step
from kdtrain.data.calls import CODE_TOOL, field_name, find_blocks, tool_calls_in_code
from kdtrain.data.corpus import Corpus, Sample
from kdtrain.errors import DataError, located


def migrate_arguments(name: str, arguments: dict, step: Step) -> tuple[str, dict]:
    """One step applied to one call (a new dict; key order kept, a renamed key stays in place)."""
    if isinstance(step, RenameTool):
        return (step.new if name == step.old else name), arguments
    if name != step.tool:
        return name, arguments
    if isinstance(step, RenameField):
        return name, {(step.new if k == step.old else k): v for k, v in arguments.items()}
    return name, (arguments if step.field in arguments else {**arguments, step.field: step.default})


def _python_literal(value) -> str:
    return json.dumps(value, ensure_ascii=False) if isinstance(value, str) else repr(value)


def _python_name(field_name_: str) -> str:
    return field_name_ + "_" if keyword.iskeyword(field_name_) else field_name_


def migrate_code(code: str, step: Step) -> tuple[str, int]:
    """One step applied to the tool calls of ``run_code`` code; returns the code and the calls changed."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return code, 0  # unreadable code is the validation pass's to report, not ours to guess at
    lines = re.findall(r"[^\n]*\n|[^\n]+$", code)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))

    def offset(lineno: int, col: int) -> int:  # ast columns count UTF-8 bytes
        return starts[lineno - 1] + len(lines[lineno - 1].encode("utf-8")[:col].decode("utf-8"))

    edits = []  # (start, end, replacement)
    for call in tool_calls_in_code(tree, {step.old if isinstance(step, RenameTool) else step.tool}):
        if isinstance(step, RenameTool):
            edits.append((offset(call.func.lineno, call.func.col_offset), offset(call.func.end_lineno, call.func.end_col_offset), step.new))
        elif isinstance(step, RenameField):
            edits += [(offset(kw.lineno, kw.col_offset), offset(kw.lineno, kw.col_offset) + len(kw.arg), _python_name(step.new))
                      for kw in call.keywords if kw.arg is not None and field_name(kw.arg) == step.old]
        elif not any(kw.arg is None or field_name(kw.arg) == step.field for kw in call.keywords):
            at = offset(call.end_lineno, call.end_col_offset) - 1  # the closing parenthesis
            before = code[:at].rstrip()
            separator = "" if not (call.args or call.keywords) else ", "
            if before.endswith(","):  # after a trailing comma: f(a=1,\n) -> f(a=1, b=2\n)
                at, separator = len(before), " "
            edits.append((at, at, f"{separator}{_python_name(step.field)}={_python_literal(step.default)}"))
    for start, end, text in sorted(edits, reverse=True):
        code = code[:start] + text + code[end:]
    return code, len({e[0] for e in edits})


def _migrate_block(text: str, steps: list[Step], counts: Counter) -> str:
    try:
        envelope = json.loads(text)
        name, arguments = envelope["name"], envelope["arguments"]
    except (json.JSONDecodeError, TypeError, KeyError):
        return text  # a malformed call is reported by validation, never rewritten into something else
    if not (isinstance(name, str) and isinstance(arguments, dict)):
        return text
    new_name, new_arguments = name, arguments
    for step in steps:
        before = (new_name, new_arguments)
        new_name, new_arguments = migrate_arguments(new_name, new_arguments, step)
        changed = int((new_name, new_arguments) != before)
        if new_name == CODE_TOOL and isinstance(new_arguments.get("code"), str):
            code, inner = migrate_code(new_arguments["code"], step)
            new_arguments, changed = {**new_arguments, "code": code}, changed + inner
        if changed:
            counts[describe_step(step)] += changed
    if (new_name, new_arguments) == (name, arguments):
        return text
    head, tail = text[: len(text) - len(text.lstrip())], text[len(text.rstrip()):]
    return head + json.dumps({**envelope, "name": new_name, "arguments": new_arguments}, ensure_ascii=False) + tail


def migrate_content(content: str, steps: list[Step], counts: Counter) -> str:
    """Every closed ``<tool_call>`` block of one assistant message, migrated."""
    for block in reversed(find_blocks(content)):
        if block.closed:
            content = content[: block.start] + _migrate_block(block.text, steps, counts) + content[block.end:]
    return content


def migrate_sample(sample: Sample, path: tuple[Migration, ...], counts: Counter) -> Sample:
    if not path:
        return sample
    steps = [step for migration in path for step in migration.steps]
    messages = tuple(Message(m.role, migrate_content(m.content, steps, counts)) if m.role == "assistant" else m for m in sample.messages)
    meta = sample.meta.model_copy(update={"tool_schema_version": path[-1].target})
    return sample.model_copy(update={"messages": messages, "meta": meta})


@dataclass
class MigrationReport:
    target: str
    dataset_version_before: int
    dataset_version_after: int = 0
    samples: Counter = field(default_factory=Counter)  # "1.0 -> 2.0" -> samples migrated
    calls: Counter = field(default_factory=Counter)  # step -> calls it rewrote

    @property
    def changed(self) -> bool:
        return self.dataset_version_after != self.dataset_version_before

    def to_json(self) -> dict:
        return {"target": self.target, "dataset_version": {"before": self.dataset_version_before, "after": self.dataset_version_after},
                "samples": dict(sorted(self.samples.items())), "calls": dict(sorted(self.calls.items()))}

    def summary(self) -> str:
        moved = ", ".join(f"{k}: {n}" for k, n in sorted(self.samples.items())) or "nothing to migrate"
        return f"migrated to tool schema {self.target} ({moved}); dataset_version {self.dataset_version_before} -> {self.dataset_version_after}"


def migrate_corpus(corpus: Corpus, registry: ToolRegistry) -> tuple[Corpus, MigrationReport]:
    """Every sample rewritten to the registry's tool-schema version; a DataError if one has no path there."""
    report = MigrationReport(registry.tool_schema_version, corpus.dataset_version)
    samples = []
    for sample in corpus.samples:
        version = sample.meta.tool_schema_version
        path = registry.migration_path(version)
        if path is None:
            declared = [f"{m.source} -> {m.target}" for m in registry.migrations] or "none"
            raise DataError(located(f"sample {sample.id}", "meta.tool_schema_version", f"a version compatible with "
                                    f"{registry.tool_schema_version} or with a migration path to it (declared in {registry.file}: {declared})", repr(version)))
        if path:
            report.samples[f"{version} -> {path[-1].target}"] += 1
        samples.append(migrate_sample(sample, path, report.calls))
    migrated = corpus.replace(samples=tuple(samples), tool_schema_version=registry.tool_schema_version)
    if migrated.jsonl() == corpus.jsonl():
        report.dataset_version_after = corpus.dataset_version
        return corpus, report
    report.dataset_version_after = corpus.dataset_version + 1
    return migrated.replace(dataset_version=report.dataset_version_after), report
