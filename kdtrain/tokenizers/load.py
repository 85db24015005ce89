"""One small interface over the two ways a tokenizer is used.

Training code and the teacher use a transformers tokenizer folder; a host app loads the
runtime ``tokenizer.json`` with the `tokenizers` library alone. Contracts compare them
through this interface, so each keeps its library's own encode and decode behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

from kdtrain.artifact_table import TOKENIZER_RUNTIME, TOKENIZER_STUDENT, TOKENIZER_TEACHER
from kdtrain.errors import ArtifactError
from kdtrain.tokenizers.fingerprint import TOKENIZER_JSON, tokenizer_fingerprint, vocab_sha256

Kind = Literal["transformers", "runtime"]


@dataclass(frozen=True)
class Encoding:
    ids: list[int]
    offsets: list[tuple[int, int]]


class Tokenizer:
    """A named tokenizer loaded from an artifact path (a transformers folder or tokenizer.json)."""

    def __init__(self, name: str, path: Path, kind: Kind):
        self.name, self.path, self.kind = name, Path(path), kind

    @cached_property
    def _impl(self):
        try:
            if self.kind == "runtime":
                from tokenizers import Tokenizer as RuntimeTokenizer

                file = self.path if self.path.is_file() else self.path / TOKENIZER_JSON
                return RuntimeTokenizer.from_file(str(file))
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(self.path)
        except ArtifactError:
            raise
        except Exception as exc:  # the libraries raise many types for a broken file
            raise ArtifactError(f"{self.path}: expected a loadable {self.kind} tokenizer, found: {exc}") from None

    @property
    def transformers(self):
        """The transformers tokenizer itself (chat templates, offsets); only for that kind."""
        if self.kind != "transformers":
            raise TypeError(f"tokenizer {self.name!r} is a runtime tokenizer.json, not a transformers one")
        return self._impl

    def encode(self, text: str) -> Encoding:
        """Ids and character offsets, without any automatically added BOS/EOS."""
        if self.kind == "runtime":
            enc = self._impl.encode(text, add_special_tokens=False)
            return Encoding(list(enc.ids), [tuple(o) for o in enc.offsets])
        enc = self._impl(text, add_special_tokens=False, return_offsets_mapping=True)
        return Encoding(list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]])

    def decode(self, ids: list[int]) -> str:
        """Decode keeping every token: a host app must see the tags it parses."""
        return self._impl.decode(ids, skip_special_tokens=False)

    @property
    def eos_token(self) -> str:
        """The text of the token that ends a turn (a transformers tokenizer's ``eos_token``)."""
        eos = self.transformers.eos_token
        if not eos:
            raise ArtifactError(f"{self.path}: expected a tokenizer with an eos_token (the token closing a turn), found none")
        return eos

    def token_to_id(self, text: str) -> int | None:
        return self.vocab.get(text)

    @cached_property
    def vocab(self) -> dict[str, int]:
        if self.kind == "runtime":
            return dict(self._impl.get_vocab(with_added_tokens=True))
        return dict(self._impl.get_vocab())

    @cached_property
    def fingerprint(self) -> str:
        return tokenizer_fingerprint(self.path)

    @cached_property
    def vocab_sha256(self) -> str:
        return vocab_sha256(self.vocab)

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, {self.kind}, {self.path})"


# artifact name -> (tokenizer name, kind); the plugin resolves names through this map.
TOKENIZER_ARTIFACTS: dict[str, tuple[str, Kind]] = {
    "teacher": (TOKENIZER_TEACHER.name, "transformers"),
    "student": (TOKENIZER_STUDENT.name, "transformers"),
    "runtime": (TOKENIZER_RUNTIME.name, "runtime"),
}


def load_tokenizer(artifacts, name: str) -> Tokenizer:
    """The tokenizer ``name`` (teacher, student, runtime) of an :class:`ArtifactsFolder`."""
    artifact, kind = TOKENIZER_ARTIFACTS[name]
    return Tokenizer(name, artifacts.path(artifact), kind)
