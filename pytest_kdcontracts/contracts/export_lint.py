"""``export_lint.yaml``: the linter's verdict on each exported graph (function x length),
from the graph summary kdtrain wrote into the artifacts folder."""

from __future__ import annotations

from functools import partial
from typing import Iterator

from kdcontracts.models.export_lint import ExportLintContract
from pytest_kdcontracts.check import Check, fail


def check_lint(c: ExportLintContract, function: str, length: int, kd_artifacts) -> None:
    from kdtrain.export.graph import GraphSummary
    from kdtrain.export.lint import lint
    from kdtrain.artifact_table import export_graph

    path = kd_artifacts.path(export_graph(function, length))
    findings = lint(GraphSummary.load(path), c.rules)
    if findings:
        fail(c.file.name, f"exported graph {function}-{length} ({path})", "no lint findings",
             f"{len(findings)} finding(s):\n    " + "\n    ".join(str(f) for f in findings[:15]))


def checks(c: ExportLintContract) -> Iterator[Check]:
    for function, length in c.coreml.items():
        yield Check("lint", (function, str(length)), partial(check_lint, c, function, length), ("kd_artifacts",))
