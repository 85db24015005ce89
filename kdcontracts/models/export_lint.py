"""``export_lint.yaml``: the graph linter's settings (denylist, int64 sinks, cast baseline),
applied to every function and length that ``coreml_contract.json`` enumerates.

The rules are data defined here; linting a graph with them is ``kdtrain.export.lint``'s (it
needs the exporter's graph summaries and coremltools' op registry, which a contract must not)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kdcontracts.families import load_sibling
from kdcontracts.models.coreml import CoreMLContract


@dataclass(frozen=True)
class LintRules:
    denylist: tuple[str, ...]
    int64_sinks: tuple[str, ...]  # op kinds whose inputs must be int64-free (softmax, matmul, ...)
    mask_inputs: tuple[str, ...]  # user inputs that feed the mask arithmetic
    cast_ops: tuple[str, ...]
    cast_baseline: dict[str, int]  # function -> number of casts recorded


@dataclass(frozen=True)
class ExportLintContract:
    file: Path
    rules: LintRules
    coreml: CoreMLContract  # the functions and lengths to check


def parse(path: Path, data: dict) -> ExportLintContract:
    rules = LintRules(
        denylist=tuple(data["denylist"]),
        int64_sinks=tuple(data["int64_sinks"]),
        mask_inputs=tuple(data["mask_inputs"]),
        cast_ops=tuple(data["cast_ops"]),
        cast_baseline=dict(data["cast_baseline"]),
    )
    return ExportLintContract(path, rules, load_sibling(path, "coreml_contract.json"))
