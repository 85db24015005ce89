"""The validation pass: every tool call of every sample checked against the tool registry.

Malformed data is common (truncated generations, hallucinated tools, stale schemas) and
teaches the student exactly the calls the runtime will reject. Every invalid sample is
dropped or marked (``meta.invalid``), never silently kept, and counted by cause and by tool
in a :class:`ValidationReport`, so that a source that breaks is visible and can be fixed.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Literal

from kdcontracts.models.tool_registry import ToolRegistry, compatible
from kdtrain.data.calls import Call, describe, read_calls
from kdtrain.data.corpus import Corpus, Sample
from kdtrain.errors import DataError, located

CAUSES = ("truncated_json", "invalid_json", "unclosed_tool_call", "unknown_tool", "missing_field", "wrong_type",
          "invalid_value", "unexpected_field", "incompatible_version")
UNREADABLE = "(unreadable)"  # by_tool key of a call whose tool name cannot be read
EXAMPLES_PER_CAUSE = 3


@dataclass(frozen=True)
class Finding:
    cause: str
    tool: str | None
    detail: str  # where, the key, what was expected and what was found


def _key(path) -> str:
    return "arguments" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)


def _schema_finding(call: Call, error) -> Finding | None:
    kind, value, instance, key = error.validator, error.validator_value, error.instance, _key(error.absolute_path)
    if kind == "required":
        missing = [k for k in value if k not in instance and k not in call.opaque]
        if not missing or "**" in call.opaque:
            return None
        cause, key, expected, found = "missing_field", f"{key}.{missing[0]}", "a value (required)", "no such key"
    elif kind == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = [k for k in instance if k not in allowed]
        cause, key, expected, found = "unexpected_field", f"{key}.{extra[0]}", f"only the keys {allowed}", f"unknown key {extra[0]!r}"
    elif kind == "type":
        cause, expected, found = "wrong_type", " or ".join(value) if isinstance(value, list) else value, describe(instance)
    else:
        cause, found = "invalid_value", describe(instance)
        expected = {"enum": f"one of {value}", "pattern": f"a string matching {value}", "format": f"a valid {value}",
                    "minimum": f">= {value}", "maximum": f"<= {value}", "minLength": f"at least {value} character(s)"}.get(kind, error.message)
    return Finding(cause, call.tool, f"{call.where}: {call.tool}: at {key}: expected {expected}, found {found}")


def check_call(call: Call, registry: ToolRegistry) -> list[Finding]:
    """What is wrong with one call (nothing: an empty list)."""
    if call.problem is not None:
        return [Finding(call.problem[0], call.tool, f"{call.where}: {call.tool or UNREADABLE}: {call.problem[1]}")]
    tool = registry.tool(call.tool)
    if tool is None:
        return [Finding("unknown_tool", call.tool, f"{call.where}: at name: expected a tool of the registry {list(registry.names)}, found {call.tool!r}")]
    findings = [f for e in tool.validator.iter_errors(call.arguments) if (f := _schema_finding(call, e)) is not None]
    findings += [Finding("unexpected_field", call.tool, f"{call.where}: {call.tool}: at arguments.{k}: expected only the keys {sorted(tool.fields)}, found unknown key {k!r}")
                 for k in sorted(call.opaque - {"**"}) if k not in tool.fields]
    return findings


def incompatible_versions(sample: Sample, registry: ToolRegistry) -> list[tuple[str, str, str]]:
    """(key, sample's version, runtime's version) for each version the registry's runtime cannot use."""
    keys = ("tool_schema_version", "orchestrator_version")
    return [(k, getattr(sample.meta, k), getattr(registry, k)) for k in keys if not compatible(getattr(sample.meta, k), getattr(registry, k))]


def version_findings(sample: Sample, registry: ToolRegistry) -> list[Finding]:
    return [Finding("incompatible_version", None, f"at meta.{key}: expected a version compatible with {runtime} (major "
                    f"{runtime.split('.')[0]}, minor <= {runtime.split('.')[-1]}; see compatible()), found {found!r}")
            for key, found, runtime in incompatible_versions(sample, registry)]


def sample_calls(sample: Sample, registry: ToolRegistry) -> list[Call]:
    tools = set(registry.names)
    return [c for i, m in enumerate(sample.messages) if m.role == "assistant" for c in read_calls(i, m.content, tools)]


def check_sample(sample: Sample, registry: ToolRegistry) -> list[tuple[Call | None, list[Finding]]]:
    """Each call with its findings; a sample of an incompatible version is not read against this registry."""
    versions = version_findings(sample, registry)
    if versions:
        return [(None, versions)]
    return [(call, check_call(call, registry)) for call in sample_calls(sample, registry)]


@dataclass
class ToolStats:
    calls: int = 0
    invalid: int = 0
    by_cause: Counter = field(default_factory=Counter)


@dataclass
class ValidationReport:
    on_invalid: str
    tool_schema_version: str
    orchestrator_version: str
    total: int = 0
    invalid: int = 0
    by_cause: Counter = field(default_factory=Counter)  # cause -> samples
    by_tool: dict[str, ToolStats] = field(default_factory=lambda: defaultdict(ToolStats))
    examples: dict[str, list[dict]] = field(default_factory=lambda: defaultdict(list))

    @property
    def valid(self) -> int:
        return self.total - self.invalid

    @property
    def corruption_rate(self) -> float:
        return self.invalid / self.total if self.total else 0.0

    def add(self, sample: Sample, checked: list[tuple[Call | None, list[Finding]]]) -> list[str]:
        """Count one sample; returns its causes (sorted, empty when valid)."""
        self.total += 1
        for call, findings in checked:
            if call is not None:
                stats = self.by_tool[call.tool or UNREADABLE]
                stats.calls += 1
                stats.invalid += bool(findings)
                stats.by_cause.update({f.cause for f in findings})
            for f in findings:
                if len(self.examples[f.cause]) < EXAMPLES_PER_CAUSE:
                    self.examples[f.cause].append({"sample": sample.id, "tool": f.tool, "detail": f.detail})
        causes = sorted({f.cause for _, findings in checked for f in findings})
        self.invalid += bool(causes)
        self.by_cause.update(causes)
        return causes

    def to_json(self) -> dict:
        return {
            "registry": {"tool_schema_version": self.tool_schema_version, "orchestrator_version": self.orchestrator_version},
            "on_invalid": self.on_invalid, "total": self.total, "valid": self.valid, "invalid": self.invalid,
            "corruption_rate": round(self.corruption_rate, 6), "by_cause": dict(sorted(self.by_cause.items())),
            "by_tool": {t: {"calls": s.calls, "invalid": s.invalid, "by_cause": dict(sorted(s.by_cause.items()))} for t, s in sorted(self.by_tool.items())},
            "examples": dict(sorted(self.examples.items())),
        }

    def summary(self) -> str:
        causes = ", ".join(f"{c} {n}" for c, n in sorted(self.by_cause.items())) or "none"
        return (f"{self.total} samples, {self.invalid} invalid (corruption rate {self.corruption_rate:.1%}, "
                f"{'dropped' if self.on_invalid == 'drop' else 'marked'}); by cause: {causes}")


def validate_corpus(corpus: Corpus, registry: ToolRegistry, on_invalid: Literal["drop", "mark"] = "drop") -> tuple[Corpus, ValidationReport]:
    """The corpus with invalid samples dropped (or marked in ``meta.invalid``), and what was found."""
    if on_invalid not in ("drop", "mark"):
        raise DataError(located("on_invalid", None, "'drop' or 'mark'", repr(on_invalid)))
    report = ValidationReport(on_invalid, registry.tool_schema_version, registry.orchestrator_version)
    kept = []
    for sample in corpus.samples:
        causes = report.add(sample, check_sample(sample, registry))
        if not causes or on_invalid == "mark":
            meta = sample.meta.model_copy(update={"invalid": tuple(causes) or None})
            kept.append(sample.model_copy(update={"meta": meta}))
    return corpus.replace(samples=tuple(kept)), report


def incompatible_samples(corpus: Corpus, registry: ToolRegistry) -> list[str]:
    """``"<id>: tool_schema_version '1.0' (runtime 2.0)"`` for every sample version the runtime cannot use."""
    return [f"{s.id}: {key} {found!r} (runtime {runtime})" for s in corpus.samples for key, found, runtime in incompatible_versions(s, registry)]


def require_compatible(corpus: Corpus, registry: ToolRegistry, where: object) -> None:
    """Distillation refuses data whose version is incompatible with the target runtime's (the registry's)."""
    found = incompatible_samples(corpus, registry)
    if found:
        listed = "; ".join(found[:10]) + (f"; … {len(found) - 10} more" if len(found) > 10 else "")
        raise DataError(located(where, "samples[].meta", f"versions compatible with the target runtime's {registry.file} "
                                f"(tool schema {registry.tool_schema_version}, orchestrator {registry.orchestrator_version}; "
                                "migrate older data with `kdtrain migrate-data`)", f"{len(found)} incompatible: {listed}"))
