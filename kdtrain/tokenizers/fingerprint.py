"""SHA-256 fingerprints of what a tokenizer *means*, stable across file formatting.

Two files that tokenize and decode identically must fingerprint identically, whatever
their key order, indentation or merges spelling (``"a b"`` or ``["a", "b"]``); a changed id,
merge, normalizer, added-token flag, special-token role or chat template must change it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from kdtrain.errors import ArtifactError, located

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE = "chat_template.jinja"
# What a transformers tokenizer adds to tokenizer.json's meaning.
ROLE_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{path}: expected a tokenizer file, found no such file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(located(path, None, "valid UTF-8 JSON", exc)) from None


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _token_text(value: Any) -> Any:
    return value.get("content") if isinstance(value, dict) else value


def tokenizer_meaning(path: Path | str) -> dict[str, Any]:
    """The parts of a tokenizer folder (or a bare tokenizer.json) that change its behaviour."""
    path = Path(path)
    file = path if path.is_file() else path / TOKENIZER_JSON
    data = _read_json(file)
    data.pop("version", None)
    model = data.get("model") or {}
    merges = model.get("merges")
    if isinstance(merges, list):
        model["merges"] = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in merges]
    added = data.get("added_tokens")
    if isinstance(added, list):
        data["added_tokens"] = sorted(added, key=lambda t: (t.get("id", -1), t.get("content", "")))
    meaning: dict[str, Any] = {"tokenizer": data}
    if path.is_dir() and (path / TOKENIZER_CONFIG).is_file():
        config = _read_json(path / TOKENIZER_CONFIG)
        meaning["roles"] = {key: _token_text(config.get(key)) for key in ROLE_KEYS}
        template = config.get("chat_template")
        if template is None and (path / CHAT_TEMPLATE).is_file():
            template = (path / CHAT_TEMPLATE).read_text(encoding="utf-8")
        meaning["chat_template"] = template
    return meaning


def tokenizer_fingerprint(path: Path | str) -> str:
    return "sha256:" + hashlib.sha256(_canonical(tokenizer_meaning(path))).hexdigest()


def vocab_sha256(vocab: dict[str, int]) -> str:
    """Hash of the token -> id map (added tokens included), ordered by id."""
    ordered = sorted(vocab.items(), key=lambda item: (item[1], item[0]))
    return "sha256:" + hashlib.sha256(_canonical(ordered)).hexdigest()
