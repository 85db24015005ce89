"""``export_lint.yaml``: the linter's verdict on each exported graph (function x length),
from the graph summary kdtrain wrote into the artifacts folder."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterator

from kdtrain.export.lint import LintRules
from pytest_kdcontracts.check import Check, fail
from pytest_kdcontracts.contracts import load_sibling


@dataclass(frozen=True)
class ExportLintContract:
    file: Path
    rules: LintRules
    coreml: object  # CoreMLContract


def parse(path: Path, data: dict) -> ExportLintContract:
    rules = LintRules(
        denylist=tuple(data["denylist"]),
        int64_sinks=tuple(data["int64_sinks"]),
        mask_inputs=tuple(data["mask_inputs"]),
        cast_ops=tuple(data["cast_ops"]),
        cast_baseline=dict(data["cast_baseline"]),
    )
    return ExportLintContract(path, rules, load_sibling(path, "coreml_contract.json"))


def check_lint(c: ExportLintContract, function: str, length: int, kd_artifacts) -> None:
    from kdtrain.export.graph import GraphSummary
    from kdtrain.export.lint import lint
    from kdtrain.export.stage import graph_artifact

    path = kd_artifacts.path(graph_artifact(function, length))
    findings = lint(GraphSummary.load(path), c.rules)
    if findings:
        fail(c.file.name, f"exported graph {function}-{length} ({path})", "no lint findings",
             f"{len(findings)} finding(s):\n    " + "\n    ".join(str(f) for f in findings[:15]))


def checks(c: ExportLintContract) -> Iterator[Check]:
    for function, length in c.coreml.items():
        yield Check("lint", (function, str(length)), partial(check_lint, c, function, length), ("kd_artifacts",))
