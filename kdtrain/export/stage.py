"""``kdtrain export``: torch.export of every function the Core ML contract declares (prefill,
decode, verify) at every enumerated length, linted.

Each graph's summary (``export/<function>-<L>/graph.json``) and the linter's findings
(``lint.json``) go into the artifacts folder; the plugin re-lints the summary against the
contract, so a changed rule applies without re-exporting.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from kdtrain import atomic
from kdtrain.artifact_table import export_graph, export_lint
from kdtrain.export.graph import summarize_program
from kdtrain.export.lint import lint
from kdtrain.export.programs import SEGMENT, build_program, example_inputs
from kdtrain.stage import StageContext


def export_program(student, function: str, length: int, segment: int = SEGMENT) -> torch.export.ExportedProgram:
    """Static-shape export, then ``run_decompositions({})`` (what ``ct.convert`` needs).
    ``segment``: verify's S, from the contract (``CoreMLContract.segment``)."""
    module = build_program(function, student, length, segment)
    with torch.no_grad():
        return torch.export.export(module, example_inputs(function, length, segment)).run_decompositions({})


def stage_export(ctx: StageContext) -> None:
    from kdtrain.student.model import StudentLM

    student = StudentLM.from_pretrained(ctx.folder.path(ctx.folder.exported_student()))
    coreml, rules = ctx.contract("coreml_contract.json"), ctx.contract("export_lint.yaml").rules
    dirty = []
    for length in (bar := tqdm(coreml.lengths, desc="export", unit="length")):
        for function in coreml.functions:
            bar.set_postfix_str(f"{function}-{length}")
            summary = summarize_program(export_program(student, function, length, coreml.segment), function, length)
            findings = lint(summary, rules)
            graph, linted = export_graph(function, length), export_lint(function, length)
            atomic.write_json(ctx.folder.root / graph.path, summary.to_json())
            atomic.write_json(ctx.folder.root / linted.path, [f.__dict__ for f in findings])
            ctx.folder.record(graph)
            ctx.folder.record(linted)
            dirty += [f"{function}-{length}: {f}" for f in findings]
    for line in dirty:
        print(f"lint: {line}")
    ctx.folder.record_stage("export", {"lengths": list(coreml.lengths), "findings": len(dirty)})
