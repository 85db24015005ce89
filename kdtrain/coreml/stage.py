"""``kdtrain convert``: one FP16 multifunction mlpackage per enumerated length, islands kept FP32.

Conversion is refused, naming each finding, when the linter flags the exported graph.
"""

from __future__ import annotations

from tqdm import tqdm

from kdtrain.artifact_table import coreml_package
from kdtrain.coreml.convert import LintError, convert_function, save_multifunction, scratch
from kdtrain.export.lint import lint
from kdtrain.export.programs import HOST_API_VERSION
from kdtrain.export.stage import export_program
from kdtrain.export.graph import summarize_program
from kdtrain.stage import StageContext


def convert_length(student, length: int, coreml, rules, islands, out) -> None:
    """Every function the contract declares (verify at its segment length), into one package."""
    with scratch(out):
        models = {}
        for function in coreml.functions:
            program = export_program(student, function, length, coreml.segment)
            findings = lint(summarize_program(program, function, length), rules)
            if findings:
                raise LintError(f"{function}-{length}: conversion not attempted, the linter found:\n" + "\n".join(f"  {f}" for f in findings))
            models[function] = convert_function(program, coreml.functions[function], islands, coreml.symbol, length)
        save_multifunction(models, out, default="prefill" if "prefill" in models else next(iter(models)))


def _convert_one(student_path: str, contracts: str, length: int, out: str) -> int:
    """One length, in a worker process: the student and the contracts read there."""
    from pathlib import Path

    from kdcontracts.families import load
    from kdtrain.student.model import StudentLM

    folder = Path(contracts)
    convert_length(StudentLM.from_pretrained(Path(student_path)), length, load(folder / "coreml_contract.json"),
                   load(folder / "export_lint.yaml").rules, load(folder / "precision_islands.yaml").islands, Path(out))
    return length


def stage_convert(ctx: StageContext) -> None:
    """Each length in its own process: conversion is mostly coremltools' pure-Python passes on one
    core, so two lengths at a time take half the time on two cores (114 s -> ~60 s here)."""
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor, as_completed

    coreml = ctx.contract("coreml_contract.json")
    ctx.contract("export_lint.yaml")  # a bad contract fails here, not in a worker
    islands = ctx.contract("precision_islands.yaml").islands
    student = str(ctx.folder.path(ctx.folder.exported_student()))
    workers = max(1, min(len(coreml.lengths), os.cpu_count() or 1))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = [pool.submit(_convert_one, student, str(ctx.contracts), length, str(ctx.folder.root / coreml_package(length).path))
                for length in coreml.lengths]
        for job in tqdm(as_completed(jobs), total=len(jobs), desc="convert", unit="length"):
            job.result()  # a worker's error (a lint finding, a conversion failure) is raised here
    for length in coreml.lengths:
        ctx.folder.record(coreml_package(length))
    ctx.folder.record_stage("convert", {
        "lengths": list(coreml.lengths),
        "compute_precision": "float16",
        "islands": {i.name: list(i.op_types) for i in islands},
        "deployment_target": coreml.deployment_target,
        "host_api_version": HOST_API_VERSION,
    })
