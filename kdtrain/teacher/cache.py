"""The teacher logit cache: an append-only file of self-verifying entries.

One entry per (sample, exact prompt): the teacher's name and version, the prompt's SHA-256,
the response (text, target tokens, their character spans, top-k ids and FP16 log-probs)
and a content hash over all of it. Nothing is trusted on read: an entry is used only if
its content hash verifies, its prompt hash is the one the caller would send now, and its
teacher is one the caller accepts. Anything else is reported and excluded, never used.

On disk, each entry is one frame::

    b"KDTC" | u8 format | u32 header length | u64 payload length | header (JSON) | payload

Frames are appended with one ``write`` and an ``fsync``. A crash mid-write leaves a frame
shorter than its lengths say at the end of the file: readers ignore it, and the next
writer cuts it off before appending. A damaged frame whose lengths are intact is skipped
and reported; bytes that are not a frame where one should start stop the reader and make
writers refuse to append (we never cut off data we cannot read).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from kdtrain.errors import ArtifactError
from kdtrain.teacher.base import TeacherRequest, TeacherResponse

MAGIC = b"KDTC"
FORMAT = 1
_FRAME = struct.Struct("<4sBIQ")
CACHE_FILE = "entries.kdtc"
FULL_VOCAB_BYTES_PER_TOKEN_FP32 = 4  # one FP32 logit per vocabulary entry, for the size comparison


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _payload(r: TeacherResponse) -> bytes:
    return b"".join((
        np.ascontiguousarray(r.token_ids, "<i4").tobytes(),
        np.ascontiguousarray(r.offsets, "<i4").tobytes(),
        np.ascontiguousarray(r.topk_ids, "<i4").tobytes(),
        np.ascontiguousarray(r.topk_logprobs, "<f2").tobytes(),
    ))


def _content_sha256(header: dict, payload: bytes) -> str:
    unsigned = {k: v for k, v in header.items() if k != "content_sha256"}
    return hashlib.sha256(_canonical(unsigned) + b"\0" + payload).hexdigest()


@dataclass(frozen=True)
class TeacherId:
    name: str
    version: str


@dataclass(frozen=True)
class Accept:
    """What a reader accepts: this teacher, at one of these versions."""

    name: str
    versions: tuple[str, ...]

    def __contains__(self, teacher: TeacherId) -> bool:
        return teacher.name == self.name and teacher.version in self.versions

    def __str__(self) -> str:
        return f"{self.name} at {' or '.join(self.versions)}"


@dataclass(frozen=True)
class Entry:
    sample_id: str
    prompt_sha256: str
    teacher: TeacherId
    response: TeacherResponse
    offset: int  # of the frame in the file, for reports


@dataclass
class Scan:
    """What a pass over the file found: good entries and everything that was not."""

    entries: list[Entry] = field(default_factory=list)
    damaged: list[tuple[int, str]] = field(default_factory=list)  # (frame offset, why)
    readable_end: int = 0  # where the last whole frame ends
    torn_tail: int = 0  # bytes after it that a crash left behind
    unreadable_at: int | None = None  # a non-frame where a frame should start


def _decode(header: dict, payload: bytes) -> TeacherResponse:
    t, k = int(header["tokens"]), int(header["top_k"])
    sizes = [4 * t, 8 * t, 4 * t * k, 2 * t * k]
    if sum(sizes) != len(payload):
        raise ValueError(f"payload of {len(payload)} bytes, expected {sum(sizes)} for {t} tokens x top-{k}")
    cuts = np.cumsum([0] + sizes)
    part = [payload[cuts[i]:cuts[i + 1]] for i in range(4)]
    return TeacherResponse(
        text=header["text"],
        token_ids=np.frombuffer(part[0], "<i4").astype(np.int32),
        offsets=np.frombuffer(part[1], "<i4").reshape(t, 2).astype(np.int32),
        topk_ids=np.frombuffer(part[2], "<i4").reshape(t, k).astype(np.int32),
        topk_logprobs=np.frombuffer(part[3], "<f2").reshape(t, k).astype(np.float32),
        prompt_tokens=int(header["prompt_tokens"]), completion_tokens=int(header["completion_tokens"]),
    )


def scan(path: Path) -> Scan:
    result = Scan()
    data = path.read_bytes() if path.exists() else b""
    pos = 0
    while pos < len(data):
        if len(data) - pos < _FRAME.size:
            result.torn_tail = len(data) - pos
            break
        magic, fmt, hlen, plen = _FRAME.unpack_from(data, pos)
        if magic != MAGIC or fmt != FORMAT:
            result.unreadable_at = pos
            break
        end = pos + _FRAME.size + hlen + plen
        if end > len(data):
            result.torn_tail = len(data) - pos
            break
        body = data[pos + _FRAME.size:end]
        try:
            header = json.loads(body[:hlen])
            payload = body[hlen:]
            if _content_sha256(header, payload) != header.get("content_sha256"):
                raise ValueError("content hash does not verify (the entry was edited or damaged)")
            result.entries.append(Entry(header["sample_id"], header["prompt_sha256"],
                                        TeacherId(**header["teacher"]), _decode(header, payload), pos))
        except (ValueError, KeyError, TypeError) as exc:
            result.damaged.append((pos, str(exc)))
        pos = result.readable_end = end
    return result


@dataclass(frozen=True)
class Lookup:
    entry: Entry | None
    reason: str  # "hit", "missing", or why every stored entry for the sample was refused


class TeacherCache:
    """A folder holding the entries file; lookups verify, appends are crash-safe."""

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)
        self.file = self.folder / CACHE_FILE
        self._scan: Scan | None = None

    # reading -------------------------------------------------------------------------
    @property
    def contents(self) -> Scan:
        if self._scan is None:
            self._scan = scan(self.file)
        return self._scan

    def lookup(self, request: TeacherRequest, accept: Accept) -> Lookup:
        """The newest entry for the sample that verifies for this exact request and teacher."""
        refused = []
        for entry in reversed(self.contents.entries):
            if entry.sample_id != request.sample_id:
                continue
            if entry.teacher not in accept:
                refused.append(f"teacher {entry.teacher.name} {entry.teacher.version}, expected {accept}")
            elif entry.prompt_sha256 != request.prompt_sha256():
                refused.append("prompt changed since it was cached (prompt SHA-256 differs)")
            else:
                return Lookup(entry, "hit")
        return Lookup(None, "; ".join(refused) or "missing")

    def stats(self, vocab_size: int) -> dict:
        """Sizes against storing full-vocabulary FP32 logits for the same tokens."""
        entries = self.contents.entries
        tokens = sum(len(e.response.token_ids) for e in entries)
        size = self.file.stat().st_size if self.file.exists() else 0
        per_token = size / tokens if tokens else None
        full = vocab_size * FULL_VOCAB_BYTES_PER_TOKEN_FP32
        return {
            "entries": len(entries),
            "tokens": tokens,
            "bytes": size,
            "bytes_per_token": round(per_token, 1) if per_token else None,
            "full_vocab_fp32_bytes_per_token": full,
            "compression": round(full / per_token, 1) if per_token else None,
            "teachers": dict(Counter(f"{e.teacher.name} {e.teacher.version}" for e in entries)),
            "damaged": [{"offset": o, "reason": r} for o, r in self.contents.damaged],
            "torn_tail_bytes": self.contents.torn_tail,
        }

    # writing -------------------------------------------------------------------------
    def _prepare_append(self) -> None:
        found = scan(self.file)
        if found.unreadable_at is not None:
            raise ArtifactError(
                f"{self.file}: expected cache frames, found unreadable bytes at offset {found.unreadable_at}; "
                "refusing to append after data that cannot be read (move the file aside to start over)"
            )
        if found.torn_tail:
            with open(self.file, "r+b") as handle:  # cut a crashed write off before appending
                handle.truncate(found.readable_end)
                handle.flush()
                os.fsync(handle.fileno())
        self._scan = found

    def append(self, request: TeacherRequest, teacher: TeacherId, response: TeacherResponse) -> None:
        self.append_many([(request, teacher, response)])

    def append_many(self, items: Iterable[tuple[TeacherRequest, TeacherId, TeacherResponse]]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._prepare_append()
        with open(self.file, "ab") as handle:
            for request, teacher, response in items:
                offset = handle.tell()
                handle.write(frame(request, teacher, response))
                handle.flush()
                os.fsync(handle.fileno())
                self._scan.entries.append(Entry(request.sample_id, request.prompt_sha256(), teacher, response, offset))
                self._scan.readable_end = handle.tell()

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.contents.entries)


def frame(request: TeacherRequest, teacher: TeacherId, response: TeacherResponse) -> bytes:
    payload = _payload(response)
    header = {
        "sample_id": request.sample_id,
        "prompt_sha256": request.prompt_sha256(),
        "mode": request.mode,
        "teacher": {"name": teacher.name, "version": teacher.version},
        "text": response.text,
        "tokens": int(len(response.token_ids)),
        "top_k": int(response.topk_ids.shape[1]),
        "prompt_tokens": response.prompt_tokens,
        "completion_tokens": response.completion_tokens,
        "payload": "token_ids:i4[T] offsets:i4[T,2] topk_ids:i4[T,k] topk_logprobs:f2[T,k] (little-endian)",
    }
    header["content_sha256"] = _content_sha256(header, payload)
    body = _canonical(header)
    return _FRAME.pack(MAGIC, FORMAT, len(body), len(payload)) + body + payload


def bytes_per_token(top_k: int) -> int:
    """Payload bytes per target token: id, span, k ids, k FP16 log-probs (headers aside)."""
    return 4 + 8 + 4 * top_k + 2 * top_k
