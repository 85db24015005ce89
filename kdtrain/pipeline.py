"""The end-to-end pipeline: each stage writes its part of the artifacts folder atomically.

Stages run in order and can be re-run alone (``kdtrain pipeline --stages student``); a
stage reads what earlier stages wrote through the manifest, never through memory.
"""

from __future__ import annotations

import importlib
import logging
import shutil
import time
from pathlib import Path, PurePosixPath
from typing import Callable

from tqdm import tqdm

from kdtrain import atomic
from kdtrain.artifact_table import (MIGRATION_AUDIT, STUDENT_CHECKPOINT, STUDENT_INIT, TOKENIZER_RUNTIME, TOKENIZER_STUDENT,
                                    TOKENIZER_TEACHER)
from kdtrain.artifacts import ArtifactsFolder
from kdtrain.errors import ConfigError, located
from kdtrain.stage import StageContext
from kdtrain.tokenizers.fingerprint import TOKENIZER_JSON

log = logging.getLogger("kdtrain.pipeline")


def added_tags(contract) -> tuple[str, ...]:
    """The tags ``tokens.json`` adds: tokens the migration's source tokenizer lacks (id null) and its target has."""
    return tuple(t.text for t in contract.special_tokens
                 if t.ids.get(contract.migration_from) is None and t.ids.get(contract.migration_to) is not None)


def stage_tokenizers(ctx: StageContext) -> None:
    """The teacher's tokenizer (teacher.source), the student's by vocab migration (the tags tokens.json adds),
    the runtime tokenizer.json, the audit log."""
    folder = ctx.folder
    from kdtrain.teacher import source
    from kdtrain.tokenizers.migration import migrate_vocabulary

    teacher_config = ctx.config.teacher
    teacher = source.load_tokenizer(teacher_config.source)
    student, _, audit = migrate_vocabulary(teacher, added_tags(ctx.contract("tokens.json")))
    for artifact, tok in ((TOKENIZER_TEACHER, teacher), (TOKENIZER_STUDENT, student)):
        with atomic.directory(folder.root / artifact.path) as tmp:
            tok.save_pretrained(tmp)
        folder.record(artifact)
    runtime = PurePosixPath(TOKENIZER_RUNTIME.path)
    with atomic.directory(folder.root / runtime.parent) as tmp:
        shutil.copyfile(folder.path(TOKENIZER_STUDENT) / TOKENIZER_JSON, tmp / runtime.name)
    folder.record(TOKENIZER_RUNTIME)
    audit["teacher"] = {"name": teacher_config.name, "version": teacher_config.version}
    atomic.write_json(folder.root / MIGRATION_AUDIT.path, audit)
    folder.record(MIGRATION_AUDIT)
    folder.record_stage("tokenizers", {"teacher": teacher_config.version, "added_tags": [t["text"] for t in audit["added_tokens"]]})


def stage_student(ctx: StageContext) -> None:
    """The student the distill config's ``student`` section describes, initialised from the teacher
    as far as the architectures allow (kdtrain.student.init), saved as a transformers folder."""
    folder = ctx.folder
    import json

    from kdtrain.student.init import init_student
    from kdtrain.teacher import source
    from kdtrain.tokenizers.load import load_tokenizer
    from kdtrain.tokenizers.migration import AddedTag

    audit = json.loads(folder.path(MIGRATION_AUDIT).read_text(encoding="utf-8"))
    tags = [AddedTag(t["text"], t["id"], t["teacher_ids"]) for t in audit["added_tokens"]]
    teacher_config = ctx.config.teacher
    # An API teacher's weights are not here: the student starts fresh (student.shape is then required).
    teacher = source.load_model(teacher_config.source) if teacher_config.backend == "local" else None
    tokenizer = load_tokenizer(folder, "student")
    ids = {role: tokenizer.token_to_id(getattr(tokenizer.transformers, f"{role}_token") or "") for role in ("bos", "eos", "pad")}
    try:
        model, hf_config, record = init_student(teacher, tags, ctx.config.student, teacher_name=teacher_config.version,
                                                vocab_size=len(tokenizer.vocab), token_ids=ids)
    except ValueError as exc:
        raise ConfigError(located(ctx.config.file, "student", "a student the teacher allows", exc)) from None
    with atomic.directory(folder.root / STUDENT_CHECKPOINT.path) as tmp:
        model.save_pretrained(tmp, hf_config)
    folder.record(STUDENT_CHECKPOINT)
    atomic.write_json(folder.root / STUDENT_INIT.path, record.to_json())
    folder.record(STUDENT_INIT)
    folder.record_stage("student", {"method": record.method, "teacher_layers": record.teacher_layers, "parameters": record.parameters})


def _lazy(module: str, name: str) -> Callable[[StageContext], None]:
    """A stage whose module (and its heavy imports) loads only when the stage runs."""

    def stage(ctx: StageContext) -> None:
        getattr(importlib.import_module(module), name)(ctx)

    stage.__name__ = name
    return stage


STAGES: dict[str, Callable[[StageContext], None]] = {
    "tokenizers": stage_tokenizers,
    "data": _lazy("kdtrain.data.stage", "stage_data"),
    "student": stage_student,
    "teacher": _lazy("kdtrain.teacher.stage", "stage_teacher"),
    "distill": _lazy("kdtrain.train.stage", "stage_distill"),
    "ablations": _lazy("kdtrain.train.stage", "stage_ablations"),
    "export": _lazy("kdtrain.export.stage", "stage_export"),
    "convert": _lazy("kdtrain.coreml.stage", "stage_convert"),
    "quantize": _lazy("kdtrain.quant.stage", "stage_quantize"),
    "runtime": _lazy("kdtrain.runtime.budget", "stage_runtime"),
    "speculative": _lazy("kdtrain.runtime.speculative_stage", "stage_speculative"),
    "gates": _lazy("kdtrain.gates.stage", "stage_gates"),
    "judge": _lazy("kdtrain.judge.stage", "stage_judge"),
}


def run_pipeline(out: Path | str, stages: list[str] | None = None, contracts: Path | str = "contracts",
                 distill_config: Path | str = StageContext.distill_config) -> ArtifactsFolder:
    ctx = StageContext(ArtifactsFolder.create(out), Path(contracts), Path(distill_config))
    folder = ctx.folder
    names = stages or list(STAGES)
    unknown = [s for s in names if s not in STAGES]
    if unknown:
        raise ValueError(f"--stages: expected some of {list(STAGES)}, found {unknown}")
    seconds = {}
    for name in (bar := tqdm(names, desc="kdtrain pipeline", unit="stage")):
        bar.set_postfix_str(name)
        start = time.perf_counter()
        STAGES[name](ctx)
        seconds[name] = time.perf_counter() - start
    log.info("stage times: %s", ", ".join(f"{name} {s:.0f} s" for name, s in seconds.items()))
    return folder
