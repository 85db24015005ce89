"""The artifacts folder: every stage writes into it, the plugin reads only from it.

Layout (each stage owns one sub-folder; later stages add theirs)::

    manifest.json              what is here, which stage wrote it, its SHA-256
    tokenizers/teacher/        the teacher's tokenizer (the distill config's teacher.source)
    tokenizers/student/        teacher + thinking/tool tags (vocab migration)
    tokenizers/runtime/        tokenizer.json alone, as a host app loads it
    migration/audit.json       the vocab migration's audit log
    student/checkpoint/        config.json + model.safetensors (transformers folder)
    student/init.json          how the student was initialised from the teacher
    data/raw/, data/corpus/    the reference corpus as generated, and as validation kept it
    data/validation_report.json
    teacher/cache/, teacher/report.json   the teacher's top-k targets and the fill report
    distill/run/               the distillation run: checkpoints, log.jsonl, smoke.json, grad_norms.png
    student/distilled/         the distilled student (what export, convert and quantize read)

Artifacts are named (``tokenizer.runtime``), never located by path in contracts, so a
stage can move its files without touching a contract; :mod:`kdtrain.artifact_table` is
the one table of names, paths, kinds and stages.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kdtrain import __version__, atomic
from kdtrain.artifact_table import STUDENT_CHECKPOINT, STUDENT_DISTILLED, Artifact
from kdtrain.errors import ArtifactError, located

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


class ArtifactEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    kind: str
    stage: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @field_validator("path")
    @classmethod
    def _inside_folder(cls, value: str) -> str:
        # Artifacts may come from elsewhere: a manifest must not point outside its folder.
        pure = PurePosixPath(value)
        if pure.is_absolute() or ".." in pure.parts or not value:
            raise ValueError("a relative path inside the artifacts folder")
        return value


class StageRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    finished_at: str
    kdtrain_version: str
    settings: dict[str, Any] = {}


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    manifest_version: Literal[1] = MANIFEST_VERSION
    artifacts: dict[str, ArtifactEntry] = {}
    stages: dict[str, StageRecord] = {}


def sha256_path(path: Path) -> str:
    """SHA-256 of a file, or of a folder as the sorted (relative path, file hash) pairs."""
    if path.is_file():
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}\0{sha256_path(file)}\n".encode())
    return digest.hexdigest()


def _pydantic_message(file: Path, error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        lines.append(located(file, key, item["msg"].removeprefix("Value error, "), repr(item.get("input"))))
    return "\n".join(lines)


def _name(artifact: Artifact | str) -> str:
    return artifact.name if isinstance(artifact, Artifact) else artifact


class ArtifactsFolder:
    """An artifacts folder and its manifest; the only way kdtrain and the plugin touch it."""

    def __init__(self, root: Path, manifest: Manifest):
        self.root = root
        self.manifest = manifest

    @classmethod
    def create(cls, root: Path | str) -> "ArtifactsFolder":
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        if (root / MANIFEST).exists():
            return cls.open(root)
        folder = cls(root, Manifest())
        folder.save()
        return folder

    @classmethod
    def open(cls, root: Path | str) -> "ArtifactsFolder":
        root = Path(root)
        file = root / MANIFEST
        if not file.is_file():
            raise ArtifactError(
                f"{file}: expected an artifacts manifest, found no such file "
                f"(build the folder with `kdtrain pipeline --out {root}`)"
            )
        try:
            raw = json.loads(file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ArtifactError(located(file, None, "valid UTF-8 JSON", exc)) from None
        try:
            return cls(root, Manifest.model_validate(raw))
        except ValidationError as exc:
            raise ArtifactError(_pydantic_message(file, exc)) from None

    def save(self) -> None:
        atomic.write_json(self.root / MANIFEST, self.manifest.model_dump(mode="json"))

    def path(self, artifact: Artifact | str) -> Path:
        """Where an artifact (a table entry, or a name from a config) lives; an :class:`ArtifactError` if it is not there."""
        name = _name(artifact)
        entry = self.manifest.artifacts.get(name)
        if entry is None:
            known = ", ".join(sorted(self.manifest.artifacts)) or "none"
            raise ArtifactError(
                located(self.root / MANIFEST, f"artifacts.{name}", f"an artifact named {name!r}", f"only: {known}")
            )
        path = self.root / entry.path
        if not path.exists():
            raise ArtifactError(
                located(self.root / MANIFEST, f"artifacts.{name}.path", f"{entry.path} to exist", "nothing there")
            )
        return path

    def entry(self, artifact: Artifact | str) -> ArtifactEntry:
        self.path(artifact)
        return self.manifest.artifacts[_name(artifact)]

    def record(self, artifact: Artifact) -> None:
        """Register an artifact that a stage has just written (atomically) at its table path."""
        entry = ArtifactEntry(path=artifact.path, kind=artifact.kind, stage=artifact.stage,
                              sha256=sha256_path(self.root / artifact.path))
        self.manifest.artifacts[artifact.name] = entry
        self.save()

    def exported_student(self) -> Artifact:
        """The student checkpoint the export stages and the plugin read, by artifact name.

        The distilled one once the distill stage has run, provided it was trained from the
        current initial checkpoint; a stale one is an error, never exported silently.
        """
        if STUDENT_DISTILLED.name not in self.manifest.artifacts:
            return STUDENT_CHECKPOINT
        distill = STUDENT_DISTILLED.stage
        source = self.manifest.stages[distill].settings.get("student") if distill in self.manifest.stages else None
        current = f"{STUDENT_CHECKPOINT.name} sha256:{self.entry(STUDENT_CHECKPOINT).sha256}"
        if source != current:
            raise ArtifactError(located(self.root / MANIFEST, "stages.distill.settings.student",
                                        f"{STUDENT_DISTILLED.name} trained from the current {current} (re-run: kdtrain pipeline --stages distill)",
                                        source))
        return STUDENT_DISTILLED

    def record_stage(self, stage: str, settings: dict[str, Any]) -> None:
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        self.manifest.stages[stage] = StageRecord(finished_at=now, kdtrain_version=__version__, settings=settings)
        self.save()
