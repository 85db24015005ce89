"""``kdtrain export``: torch.export of prefill and decode at every enumerated length, linted.

Each graph's summary (``export/<function>-<L>/graph.json``) and the linter's findings
(``lint.json``) go into the artifacts folder; the plugin re-lints the summary against the
contract, so a changed rule applies without re-exporting.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from kdtrain import atomic
from kdtrain.export.graph import summarize_program
from kdtrain.export.lint import lint
from kdtrain.export.programs import PROGRAMS, example_inputs

FUNCTIONS = ("prefill", "decode")


def graph_artifact(function: str, length: int) -> str:
    return f"export.graph.{function}.{length}"


def export_program(student, function: str, length: int) -> torch.export.ExportedProgram:
    """Static-shape export, then ``run_decompositions({})`` (what ``ct.convert`` needs)."""
    module = PROGRAMS[function](student, length).eval()
    with torch.no_grad():
        return torch.export.export(module, example_inputs(function, length)).run_decompositions({})


def stage_export(ctx) -> None:
    from kdtrain.student.model import StudentLM

    student = StudentLM.from_pretrained(ctx.folder.path(ctx.folder.exported_student()))
    coreml, rules = ctx.contract("coreml_contract.json"), ctx.contract("export_lint.yaml").rules
    dirty = []
    for length in (bar := tqdm(coreml.lengths, desc="export", unit="length")):
        for function in FUNCTIONS:
            bar.set_postfix_str(f"{function}-{length}")
            summary = summarize_program(export_program(student, function, length), function, length)
            findings = lint(summary, rules)
            rel = f"export/{function}-{length}"
            atomic.write_json(ctx.folder.root / rel / "graph.json", summary.to_json())
            atomic.write_json(ctx.folder.root / rel / "lint.json", [f.__dict__ for f in findings])
            ctx.folder.record(graph_artifact(function, length), f"{rel}/graph.json", "export/graph-summary", "export")
            dirty += [f"{function}-{length}: {f}" for f in findings]
    for line in dirty:
        print(f"lint: {line}")
    ctx.folder.record_stage("export", {"lengths": list(coreml.lengths), "findings": len(dirty)})
