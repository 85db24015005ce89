"""Record stores: ``<name>.jsonl``, one JSON record per line, beside ``<name>.json``, what the lines
are (their SHA-256, and how they were made).

A store is written into a fresh folder swapped in whole (a reader never sees half of one) and
read back verified: every fault is a :class:`DataError` naming the file, the line and key, what
was expected and what was found. The corpus, the scenario cases, the halt set and the judge's
probe set are such stores; each adds its own checks (counts, per-record hashes) to these.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, TypeVar

from pydantic import BaseModel, ValidationError

from kdtrain import atomic
from kdtrain.errors import DataError, located

T = TypeVar("T")
Info = TypeVar("Info", bound=BaseModel)


def save(folder: Path | str, lines_name: str, lines: bytes, info_name: str, info: BaseModel) -> Path:
    """Both files in a fresh folder swapped in whole."""
    folder = Path(folder)
    with atomic.directory(folder) as tmp:
        atomic.write_bytes(tmp / lines_name, lines)
        atomic.write_json(tmp / info_name, info.model_dump(mode="json"))
    return folder


def read_info(folder: Path, info_name: str, lines_name: str, model: type[Info], kind: str) -> tuple[Info, bytes]:
    """The validated ``<name>.json`` and the raw lines; ``kind`` names the folder in errors ("a corpus folder")."""
    info_file, lines_file = folder / info_name, folder / lines_name
    for file in (info_file, lines_file):
        if not file.is_file():
            raise DataError(located(file, None, f"{kind} ({info_name} + {lines_name})", "no such file"))
    try:
        info = model.model_validate(read_json(info_file, "", info_file.read_text(encoding="utf-8")))
    except ValidationError as exc:
        raise pydantic_problem(info_file, "", exc) from None
    return info, lines_file.read_bytes()


def check_sha256(lines_file: Path, data: bytes, recorded: str, info_name: str) -> None:
    found = hashlib.sha256(data).hexdigest()
    if found != recorded:
        raise DataError(located(lines_file, None, f"sha256 {recorded} (as {info_name} records)",
                                f"sha256 {found}: the file changed after it was written"))


def records(lines_file: Path, data: bytes, parse: Callable[[object], T], id_noun: str = "an id") -> list[tuple[str, T]]:
    """Each line as ``parse`` makes it (a pydantic ``model_validate``), with its location
    (``"line N, "``); ids (a record's ``id``) must not repeat."""
    found, seen = [], {}
    for number, raw in enumerate(data.splitlines(), start=1):
        where = f"line {number}, "
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(located(lines_file, f"line {number}", "UTF-8 text", f"undecodable byte at column {exc.start + 1}")) from None
        try:
            record = parse(read_json(lines_file, where, text))
        except ValidationError as exc:
            raise pydantic_problem(lines_file, where, exc) from None
        if record.id in seen:
            raise DataError(located(lines_file, f"{where}id", f"{id_noun} not used before (also at line {seen[record.id]})", repr(record.id)))
        seen[record.id] = number
        found.append((where, record))
    return found


def check_count(info_file: Path, key: str, lines_name: str, found: int, recorded: int) -> None:
    if found != recorded:
        raise DataError(located(info_file, key, f"the number of lines of {lines_name} ({found})", recorded))


def pydantic_problem(file: Path, where: str, error: ValidationError) -> DataError:
    """pydantic's first error as the project's message: file, key path, expected, found."""
    item = error.errors()[0]
    key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in item["loc"]).lstrip(".")
    expected = item["msg"][0].lower() + item["msg"][1:]
    return DataError(located(file, f"{where}{key or '(top level)'}", expected, repr(item.get("input"))))


def read_json(file: Path, where: str, text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(located(file, where.rstrip(", ") or None, "valid JSON", f"{exc.msg} at column {exc.colno}")) from None
