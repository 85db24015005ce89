"""``kdtrain convert``: one FP16 multifunction mlpackage per enumerated length, islands kept FP32.

Conversion is refused, naming each finding, when the linter flags the exported graph.
"""

from __future__ import annotations

from tqdm import tqdm

from kdtrain.artifact_table import coreml_package
from kdtrain.coreml.convert import LintError, convert_function, save_multifunction
from kdtrain.export.lint import lint
from kdtrain.export.programs import HOST_API_VERSION
from kdtrain.export.stage import FUNCTIONS, export_program
from kdtrain.export.graph import summarize_program
from kdtrain.stage import StageContext


def convert_length(student, length: int, coreml, rules, islands, out) -> None:
    models = {}
    for function in FUNCTIONS:
        program = export_program(student, function, length)
        findings = lint(summarize_program(program, function, length), rules)
        if findings:
            raise LintError(f"{function}-{length}: conversion not attempted, the linter found:\n" + "\n".join(f"  {f}" for f in findings))
        models[function] = convert_function(program, coreml.functions[function], islands, coreml.symbol, length)
    save_multifunction(models, out, default="prefill")


def stage_convert(ctx: StageContext) -> None:
    from kdtrain.student.model import StudentLM

    student = StudentLM.from_pretrained(ctx.folder.path(ctx.folder.exported_student()))
    coreml, rules = ctx.contract("coreml_contract.json"), ctx.contract("export_lint.yaml").rules
    islands = ctx.contract("precision_islands.yaml").islands
    for length in tqdm(coreml.lengths, desc="convert", unit="length"):
        package = coreml_package(length)
        convert_length(student, length, coreml, rules, islands, ctx.folder.root / package.path)
        ctx.folder.record(package)
    ctx.folder.record_stage("convert", {
        "lengths": list(coreml.lengths),
        "compute_precision": "float16",
        "islands": {i.name: list(i.op_types) for i in islands},
        "deployment_target": coreml.deployment_target,
        "host_api_version": HOST_API_VERSION,
    })
