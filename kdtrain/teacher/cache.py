"""The teacher logit cache: an append-only SQLite table of self-verifying entries.

One entry per (sample, exact prompt): the teacher's name and version, the prompt's SHA-256,
the response (text, target tokens, their character spans, top-k ids and FP16 log-probs)
and a content hash over all of it. Nothing is trusted on read: an entry is used only if
its content hash verifies, its prompt hash is the one the caller would send now, and its
teacher is one the caller accepts. Anything else is reported and excluded, never used.

On disk, one row per entry in ``entries(id, sample_id, header, payload, content_sha256)``,
indexed by sample id, so a lookup is one index probe and an append one insert whatever the
size (a run caches 10^5-10^6 samples). ``header`` is canonical JSON; its key ``payload``
names the payload's layout:

- ``packed-1`` (:mod:`kdtrain.teacher.packing`): the text, target ids and spans, sorted and
  delta-coded top-k ids with their rank order, log-probs in 1/32-nat steps below the FP16
  top-1 (their mass never above the teacher's), LZMA2-compressed; the header holds no text. The whole file takes
  about 39 bytes per token at k = 8 and 96 at k = 32 on the reference teacher's targets;
- ``raw``: ``token_ids:i4[T] offsets:i4[T,2] topk_ids:i4[T,k] topk_logprobs:f2[T,k]``
  little-endian (12 + 6k bytes per token), the text in the header. A response packing
  cannot hold (an ``-inf`` log-prob) is written raw, and every entry of a format-2 file is
  raw (its header has no ``payload`` key).

``content_sha256 = SHA-256(header + b"\\0" + payload)``, over the stored bytes: a payload is
verified before it is decoded, and one that verifies but does not decode is refused as
damaged, saying why. Rows are only inserted (triggers abort an UPDATE or DELETE), each
append is one transaction: a crash mid-write rolls back on the next open and is never
read. While writing, the file is in WAL mode with ``synchronous=FULL`` (one fsync per
append: an answer the teacher was paid for survives a power cut); ``close`` folds the log
back in, so at rest the cache is one self-contained file that readers never modify. A file
SQLite cannot read is an ``ArtifactError`` naming it. Format 3 (``PRAGMA user_version``)
marks a file that may hold packed entries, so that a kdtrain from before packing refuses
it by name instead of reporting every packed entry as damaged; a format-2 file is read as
it is and becomes format 3 with its first append.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import sqlite3
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from kdcontracts.models.distill_data import Accept
from kdtrain.errors import ArtifactError, located
from kdtrain.teacher import packing
from kdtrain.teacher.base import TeacherRequest, TeacherResponse

CACHE_FILE = "entries.sqlite3"
APPLICATION_ID = 0x4B445443  # "KDTC" in the SQLite header: this file is a teacher cache
FORMAT = 3  # PRAGMA user_version; 3 may hold packed payloads, 2 holds raw ones only, 1 was the frame log before SQLite
READABLE_FORMATS = (2, FORMAT)
PACKED, RAW = "packed-1", "raw"  # the header's ``payload``: how the payload is laid out
FULL_VOCAB_BYTES_PER_TOKEN_FP32 = 4  # one FP32 logit per vocabulary entry, for the size comparison
_SCHEMA = f"""
BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS entries (id INTEGER PRIMARY KEY, sample_id TEXT NOT NULL, header TEXT NOT NULL,
                      payload BLOB NOT NULL, content_sha256 TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS entries_by_sample ON entries (sample_id);
CREATE TRIGGER IF NOT EXISTS entries_append_only_update BEFORE UPDATE ON entries BEGIN SELECT RAISE(ABORT, 'append-only'); END;
CREATE TRIGGER IF NOT EXISTS entries_append_only_delete BEFORE DELETE ON entries BEGIN SELECT RAISE(ABORT, 'append-only'); END;
PRAGMA application_id = {APPLICATION_ID};
PRAGMA user_version = {FORMAT};
COMMIT;
"""
_COLUMNS = "id, sample_id, header, payload, content_sha256"


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _raw_payload(r: TeacherResponse) -> bytes:
    return b"".join((
        np.ascontiguousarray(r.token_ids, "<i4").tobytes(),
        np.ascontiguousarray(r.offsets, "<i4").tobytes(),
        np.ascontiguousarray(r.topk_ids, "<i4").tobytes(),
        np.ascontiguousarray(r.topk_logprobs, "<f2").tobytes(),
    ))


def _content_sha256(header: bytes, payload: bytes) -> str:
    return hashlib.sha256(header + b"\0" + payload).hexdigest()


@dataclass(frozen=True)
class TeacherId:
    name: str
    version: str


@dataclass(frozen=True)
class Entry:
    sample_id: str
    prompt_sha256: str
    teacher: TeacherId
    response: TeacherResponse
    row: int  # the entry's id in the table, for reports


@dataclass
class Integrity:
    """What a pass over every entry found: totals of those that verify, and the rest."""

    entries: int = 0
    tokens: int = 0
    teachers: Counter = field(default_factory=Counter)
    damaged: list[tuple[int, str]] = field(default_factory=list)  # (row, why)


@dataclass(frozen=True)
class Lookup:
    entry: Entry | None
    reason: str  # "hit", "missing", or why every stored entry for the sample was refused


def _unpack_raw(payload: bytes, t: int, k: int) -> tuple[np.ndarray, ...]:
    sizes = [4 * t, 8 * t, 4 * t * k, 2 * t * k]
    if sum(sizes) != len(payload):
        raise ValueError(f"expected {sum(sizes)} bytes, found {len(payload)}")
    cuts = list(itertools.accumulate(sizes, initial=0))
    part = [payload[cuts[i]:cuts[i + 1]] for i in range(4)]
    return (np.frombuffer(part[0], "<i4").astype(np.int32), np.frombuffer(part[1], "<i4").reshape(t, 2).astype(np.int32),
            np.frombuffer(part[2], "<i4").reshape(t, k).astype(np.int32),
            np.frombuffer(part[3], "<f2").reshape(t, k).astype(np.float32))


def _decode(header: dict, payload: bytes) -> TeacherResponse:
    t, k, layout = int(header["tokens"]), int(header["top_k"]), header.get("payload", RAW)  # format 2: no key, raw
    if layout not in (PACKED, RAW):
        raise ValueError(f"payload layout {layout!r}, expected {PACKED!r} or {RAW!r}")
    try:
        if layout == PACKED:
            text, token_ids, offsets, topk_ids, topk_logprobs = packing.unpack(payload, t, k)
        else:
            text, (token_ids, offsets, topk_ids, topk_logprobs) = header["text"], _unpack_raw(payload, t, k)
    except ValueError as exc:
        raise ValueError(f"{layout} payload of {len(payload)} bytes for {t} tokens x top-{k}: {exc}") from exc
    return TeacherResponse(
        text=text, token_ids=token_ids, offsets=offsets, topk_ids=topk_ids, topk_logprobs=topk_logprobs,
        prompt_tokens=int(header["prompt_tokens"]), completion_tokens=int(header["completion_tokens"]),
    )


def _verified(row: tuple) -> Entry:
    """The row as an entry if it is exactly what was written; ValueError saying why not.

    Text columns arrive as bytes (the connection's text_factory), so a damaged one is refused
    here instead of failing the whole read."""
    rowid, sample_id, header_bytes, payload, content_sha256 = row
    try:
        if _content_sha256(header_bytes, payload) != content_sha256.decode("ascii"):
            raise ValueError("content hash does not verify (the entry was edited or damaged)")
        header, sample_id = json.loads(header_bytes), sample_id.decode("utf-8")
        if header["sample_id"] != sample_id:
            raise ValueError(f"filed under sample {sample_id!r} but holds sample {header['sample_id']!r}")
        return Entry(sample_id, header["prompt_sha256"], TeacherId(**header["teacher"]), _decode(header, payload), rowid)
    except (KeyError, TypeError, AttributeError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"unreadable entry ({type(exc).__name__}: {exc})") from exc


def _row(request: TeacherRequest, teacher: TeacherId, response: TeacherResponse) -> tuple[str, str, bytes, str]:
    layout = PACKED if packing.packable(response) else RAW
    payload = packing.pack(response) if layout == PACKED else _raw_payload(response)
    header = _canonical({
        "sample_id": request.sample_id,
        "prompt_sha256": request.prompt_sha256(),
        "mode": request.mode,
        "teacher": {"name": teacher.name, "version": teacher.version},
        **({} if layout == PACKED else {"text": response.text}),  # packed: compressed with the payload
        "tokens": int(len(response.token_ids)),
        "top_k": int(response.topk_ids.shape[1]),
        "prompt_tokens": response.prompt_tokens,
        "completion_tokens": response.completion_tokens,
        "payload": layout,
    })
    return request.sample_id, header, payload, _content_sha256(header.encode("utf-8"), payload)


class TeacherCache:
    """A folder holding the entries database; lookups verify, appends are transactions.

    The connection opens on first use; ``close`` (or leaving a ``with`` block) ends writing
    and leaves one file. The object stays usable after ``close``: it reopens when needed.
    """

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)
        self.file = self.folder / CACHE_FILE
        self._db: sqlite3.Connection | None = None
        self._empty = False  # the file exists but no cache was created in it yet
        self._format = FORMAT  # the open file's; an append raises 2 to FORMAT
        self._writing = False

    def __enter__(self) -> "TeacherCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def _sqlite(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.DatabaseError as exc:
            raise ArtifactError(located(self.file, None, "a readable SQLite teacher cache",
                                        f"{type(exc).__name__}: {exc}")) from exc

    def _connect(self, write: bool) -> sqlite3.Connection | None:
        """The connection, or None when reading a cache that holds nothing yet."""
        if self._db is None:
            if not write and not self.file.exists():
                return None
            self.folder.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.file, isolation_level=None)  # transactions are explicit
            db.text_factory = bytes
            try:
                with self._sqlite():
                    self._format = self._check_format(db)
            except ArtifactError:
                db.close()
                raise
            self._db, self._empty = db, self._format is None
        if write and not self._writing:
            with self._sqlite():
                if not self._empty:  # a damaged table root stops an append here, before the file changes
                    self._db.execute("SELECT max(id) FROM entries").fetchone()
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
                if self._empty:
                    self._db.executescript(_SCHEMA)
            self._writing, self._empty, self._format = True, False, self._format or FORMAT
        return None if self._empty else self._db

    def _check_format(self, db: sqlite3.Connection) -> int | None:
        """The file's format, None for a new (empty) database; an ArtifactError for anything but a teacher cache."""
        found = (db.execute("PRAGMA application_id").fetchone()[0], db.execute("PRAGMA user_version").fetchone()[0])
        if found[0] == APPLICATION_ID and found[1] in READABLE_FORMATS:
            return found[1]
        if found == (0, 0) and not db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
            return None
        formats = " or ".join(map(str, READABLE_FORMATS))
        raise ArtifactError(located(self.file, "SQLite application_id, user_version",
                                    f"a kdtrain teacher cache ({APPLICATION_ID:#x}, format {formats})",
                                    f"({found[0]:#x}, format {found[1]})"))

    def close(self) -> None:
        """Stop writing: checkpoint the write-ahead log into the file and delete it and the
        shared-memory file, so the folder holds one file that readers never modify. While
        another connection has the file open this cannot be done; the last one to close
        then checkpoints it."""
        if self._db is None:
            return
        db, self._db, writing, self._writing = self._db, None, self._writing, False
        with self._sqlite():
            if writing:
                db.execute("PRAGMA busy_timeout = 0")
                try:
                    db.execute("PRAGMA journal_mode=DELETE")
                except sqlite3.OperationalError as exc:
                    if exc.sqlite_errorname != "SQLITE_BUSY":
                        raise
            db.close()

    # reading -------------------------------------------------------------------------
    def lookup(self, request: TeacherRequest, accept: Accept) -> Lookup:
        """The newest entry for the sample that verifies for this exact request and teacher."""
        db = self._connect(write=False)
        if db is None:
            return Lookup(None, "missing")
        with self._sqlite():
            rows = db.execute(f"SELECT {_COLUMNS} FROM entries WHERE sample_id = ? ORDER BY id DESC",
                              (request.sample_id,)).fetchall()
        refused, prompt_sha256 = [], request.prompt_sha256()
        for row in rows:
            try:
                entry = _verified(row)
            except ValueError as exc:
                refused.append(f"entry {row[0]}: {exc}")
                continue
            if entry.teacher not in accept:
                refused.append(f"teacher {entry.teacher.name} {entry.teacher.version}, expected {accept}")
            elif entry.prompt_sha256 != prompt_sha256:
                refused.append("prompt changed since it was cached (prompt SHA-256 differs)")
            else:
                return Lookup(entry, "hit")
        return Lookup(None, "; ".join(refused) or "missing")

    def _rows(self) -> Iterator[tuple]:
        db = self._connect(write=False)
        if db is None:
            return
        with self._sqlite():
            yield from db.execute(f"SELECT {_COLUMNS} FROM entries ORDER BY id")

    def __iter__(self) -> Iterator[Entry]:
        """Every entry that verifies, oldest first (damaged ones are in ``verify``)."""
        for row in self._rows():
            with contextlib.suppress(ValueError):
                yield _verified(row)

    def verify(self) -> Integrity:
        """One pass over every entry (and SQLite's own page checks): what verifies, what does not."""
        db = self._connect(write=False)
        if db is not None:
            with self._sqlite():
                problems = [line.decode("utf-8", "replace") for (line,) in db.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise ArtifactError(located(self.file, "PRAGMA quick_check", "ok", "; ".join(problems[:5])))
        found = Integrity()
        for row in self._rows():
            try:
                entry = _verified(row)
            except ValueError as exc:
                found.damaged.append((row[0], str(exc)))
                continue
            found.entries += 1
            found.tokens += len(entry.response.token_ids)
            found.teachers[f"{entry.teacher.name} {entry.teacher.version}"] += 1
        return found

    def stats(self, vocab_size: int) -> dict:
        """Sizes against storing full-vocabulary FP32 logits for the same tokens."""
        found = self.verify()
        size = sum(p.stat().st_size for p in (self.file, self.file.with_name(CACHE_FILE + "-wal")) if p.exists())
        per_token = size / found.tokens if found.tokens else None
        full = vocab_size * FULL_VOCAB_BYTES_PER_TOKEN_FP32
        return {
            "entries": found.entries,
            "tokens": found.tokens,
            "bytes": size,
            "bytes_per_token": round(per_token, 1) if per_token else None,
            "full_vocab_fp32_bytes_per_token": full,
            "compression": round(full / per_token, 1) if per_token else None,
            "teachers": dict(found.teachers),
            "damaged": [{"row": r, "reason": why} for r, why in found.damaged],
        }

    # writing -------------------------------------------------------------------------
    def append(self, request: TeacherRequest, teacher: TeacherId, response: TeacherResponse) -> None:
        self.append_many([(request, teacher, response)])

    def append_many(self, items: Iterable[tuple[TeacherRequest, TeacherId, TeacherResponse]]) -> None:
        """All of ``items`` in one transaction: after a crash, all of them or none."""
        rows = [_row(*item) for item in items]
        db = self._connect(write=True)
        with self._sqlite():
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany("INSERT INTO entries (sample_id, header, payload, content_sha256) VALUES (?, ?, ?, ?)", rows)
                if self._format != FORMAT:  # the rows may be packed: a reader must know packing
                    db.execute(f"PRAGMA user_version = {FORMAT}")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            self._format = FORMAT


def raw_bytes_per_token(top_k: int) -> int:
    """Raw payload bytes per target token: id, span, k ids, k FP16 log-probs (headers aside)."""
    return 4 + 8 + 4 * top_k + 2 * top_k
