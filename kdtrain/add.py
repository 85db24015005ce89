"""``kdtrain add NAME PATH --out DIR``: register an artifact kdtrain did not build.

Users convert with their own scripts and bring their own tokenizers, checkpoints and corpora.
The artifact is copied into the folder at the place the artifact table gives its name (so
every reader finds it the usual way), checked to be what that name's kind is (a tokenizer
folder, a tokenizer.json, a transformers checkpoint, an mlpackage, a corpus), and recorded in
the manifest with its kind and hash. The ``add`` stage record keeps where each came from.

A package says nothing about the host API it speaks. Golden, prefill/decode and verify/decode
items drive a package through the contract's host API (1.0: functions ``prefill`` and ``decode``
sharing the KV-cache states; 1.1: and ``verify``); ``--host-api`` declares that it does, and
without it those items fail saying why. A 1.0 package goes with a contract without ``verify``.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path, PurePosixPath

from kdtrain import atomic
from kdtrain.artifact_table import FIXED, Artifact, coreml_package
from kdtrain.artifacts import ArtifactsFolder
from kdtrain.errors import ConfigError, located

STAGE = "add"
_PACKAGE = re.compile(r"^coreml\.(fp16|int8)\.(\d+)$")


def artifact_named(name: str) -> Artifact:
    """The table's entry for ``name``: a fixed artifact or a package ``coreml.<fp16|int8>.<L>``."""
    match = _PACKAGE.match(name)
    if match:
        return coreml_package(int(match.group(2)), match.group(1))
    for artifact in FIXED:
        if artifact.name == name:
            return artifact
    known = ", ".join(a.name for a in FIXED)
    raise ConfigError(located("NAME", None, f"an artifact name ({known}, or coreml.fp16.<L> / coreml.int8.<L>)", repr(name)))


def _kind_problem(kind: str, path: Path) -> str | None:
    """Why ``path`` is not an artifact of ``kind``, or None."""
    if kind == "tokenizer/transformers":
        ok = path.is_dir() and ((path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file())
        return None if ok else "a tokenizer folder (tokenizer.json, tokenizer_config.json)"
    if kind == "tokenizer/runtime":
        return None if path.is_file() and path.suffix == ".json" else "a tokenizer.json file"
    if kind == "checkpoint/transformers":
        ok = path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors"))
        return None if ok else "a transformers checkpoint folder (config.json and safetensors weights; never pickles)"
    if kind.startswith("coreml/mlpackage"):
        return None if path.is_dir() and (path / "Manifest.json").is_file() else "an .mlpackage folder (with its Manifest.json)"
    if kind == "corpus/jsonl":
        return None if path.is_dir() and any(path.glob("*.jsonl")) else "a corpus folder (JSONL samples, as kdtrain build-corpus writes)"
    return f"one of the kinds kdtrain add registers, not {kind}"


def add_artifact(name: str, source: Path | str, out: Path | str, host_api: str | None = None) -> Path:
    """Copy ``source`` into ``out`` as artifact ``name``, record it, and return where it now is."""
    artifact = artifact_named(name)
    source = Path(source).expanduser().resolve()
    problem = _kind_problem(artifact.kind, source) if source.exists() else "an existing file or folder"
    if problem:
        raise ConfigError(located(source, None, f"{problem} for {name} (kind {artifact.kind})", "something else" if source.exists() else "nothing"))
    if host_api is not None and not artifact.kind.startswith("coreml/"):
        raise ConfigError(located("--host-api", None, "only with a Core ML package", f"{host_api!r} for {name}"))
    folder = ArtifactsFolder.create(out)
    target = folder.root / artifact.path
    if source.is_dir():
        with atomic.directory(target) as tmp:
            shutil.copytree(source, tmp, dirs_exist_ok=True, symlinks=False)
    else:
        atomic.write_bytes(target, source.read_bytes())
    added = Artifact(artifact.name, str(PurePosixPath(artifact.path)), artifact.kind, STAGE)
    folder.record(added)
    record = folder.manifest.stages.get(STAGE)
    settings = dict(record.settings) if record else {"artifacts": {}}
    settings["artifacts"] = {**settings.get("artifacts", {}), name: {"from": str(source), "kind": artifact.kind}}
    if host_api is not None:
        settings["host_api_version"] = host_api
    folder.record_stage(STAGE, settings)
    return target
