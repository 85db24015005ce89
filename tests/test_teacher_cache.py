"""The logit cache is trusted only as far as it verifies: a tampered entry (payload edited,
teacher version changed, prompt changed) is never used, nor is a packed payload that verifies
but does not unpack; a crash mid-write never leaves an entry that reads as valid; a damaged
database file is an error naming it; a cache written before packing (format 2) still reads;
a fill pass with failing calls loses no sample."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import tamper_cache
from kdcontracts.models.distill_data import Accept
from kdcontracts.models.tokens import Message
from kdtrain.data.targets import TeacherTargets
from kdtrain.errors import ArtifactError
from kdtrain.teacher.base import BudgetExceeded, TeacherError, TeacherRequest, TeacherResponse
from kdtrain.artifacts import sha256_path
from kdtrain.teacher import packing
from kdtrain.teacher.cache import CACHE_FILE, TeacherCache, TeacherId, raw_bytes_per_token
from kdtrain.teacher.fill import fill_cache, retry_later

TEACHER = TeacherId("SmolLM2-135M-Instruct", "v1")
ACCEPT = Accept(TEACHER.name, (TEACHER.version,))


def request(i: int, text: str = "") -> TeacherRequest:
    text = text or f"<|im_start|>user\nquestion {i}<|im_end|>\n<|im_start|>assistant\n"
    return TeacherRequest(f"s{i:03d}", (Message("user", f"question {i}"),), text, tuple(range(i, i + 7)), top_k=4)


def response(seed: int, tokens: int = 5, k: int = 4) -> TeacherResponse:
    rng = np.random.default_rng(seed)
    logprobs = -np.sort(rng.exponential(2.0, (tokens, k)), axis=1).astype(np.float32)
    return TeacherResponse(
        text="x" * tokens, token_ids=rng.integers(0, 49152, tokens).astype(np.int32),
        offsets=np.stack([np.arange(tokens), np.arange(1, tokens + 1)], 1).astype(np.int32),
        topk_ids=rng.integers(0, 49152, (tokens, k)).astype(np.int32), topk_logprobs=logprobs,
        prompt_tokens=7, completion_tokens=tokens,
    )


class FakeTeacher:
    """Answers deterministically; fails the sample ids it is told to (a flaky API)."""

    name, version = TEACHER.name, TEACHER.version

    def __init__(self, failing=(), budget_after: int | None = None):
        self.failing, self.budget_after, self.calls = set(failing), budget_after, []

    def complete(self, req: TeacherRequest) -> TeacherResponse:
        self.calls.append(req.sample_id)
        if self.budget_after is not None and len(self.calls) > self.budget_after:
            raise BudgetExceeded("max_calls 3 reached")
        if req.sample_id in self.failing:
            raise TeacherError(f"{req.sample_id}: HTTP 503 after 3 retries")
        return response(int(req.sample_id[1:]))


def filled(tmp_path, n: int = 3, tokens: int = 5) -> TeacherCache:
    with TeacherCache(tmp_path / "cache") as cache:
        cache.append_many((request(i), TEACHER, response(i, tokens)) for i in range(n))
    return TeacherCache(cache.folder)  # re-read from disk


def assert_same_targets(got: TeacherResponse, want: TeacherResponse, step: float = packing.STEP) -> None:
    """Ids and spans exact, the top-1 log-prob as FP16, the others within a quantisation step (and FP16 rounding)."""
    for name in ("token_ids", "offsets", "topk_ids"):
        assert getattr(got, name).dtype == np.int32
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
    assert got.topk_logprobs.dtype == np.float32
    np.testing.assert_array_equal(got.topk_logprobs[:, 0], want.topk_logprobs[:, 0].astype(np.float16))
    np.testing.assert_allclose(got.topk_logprobs, want.topk_logprobs, rtol=2**-11, atol=step + 1e-6)
    assert (got.text, got.prompt_tokens, got.completion_tokens) == (want.text, want.prompt_tokens, want.completion_tokens)


def test_entries_round_trip_packed(tmp_path):
    cache = filled(tmp_path)
    for i in range(3):
        assert_same_targets(cache.lookup(request(i), ACCEPT).entry.response, response(i))
    assert cache.lookup(request(9), ACCEPT).reason == "missing"
    headers = [json.loads(h) for (h,) in sqlite3.connect(cache.file).execute("SELECT header FROM entries")]
    assert [h["payload"] for h in headers] == ["packed-1"] * 3


def test_a_response_packing_cannot_hold_is_stored_raw_and_round_trips_exactly(tmp_path):
    impossible = response(0)
    impossible.topk_logprobs[2, 3] = -np.inf  # an API's "impossible"
    with TeacherCache(tmp_path / "cache") as cache:
        cache.append(request(0), TEACHER, impossible)
    got = TeacherCache(cache.folder).lookup(request(0), ACCEPT).entry.response
    assert_same_targets(got, impossible, step=0.0)
    np.testing.assert_array_equal(got.topk_logprobs, impossible.topk_logprobs.astype(np.float16))
    assert json.loads(sqlite3.connect(cache.file).execute("SELECT header FROM entries").fetchone()[0])["payload"] == "raw"


def test_at_rest_the_cache_is_one_file_that_readers_leave_as_it_is_and_rows_are_never_rewritten(tmp_path):
    cache = filled(tmp_path)
    assert os.listdir(cache.folder) == [CACHE_FILE]
    before = sha256_path(cache.folder)
    assert all(cache.lookup(request(i), ACCEPT).entry for i in range(3)) and len(list(cache)) == 3
    assert os.listdir(cache.folder) == [CACHE_FILE] and sha256_path(cache.folder) == before
    with contextlib.closing(sqlite3.connect(cache.file)) as db:
        for sql in ("UPDATE entries SET payload = x'00'", "DELETE FROM entries"):
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                db.execute(sql)


def test_storage_is_reported_against_full_vocabulary_logits(tmp_path):
    stats = filled(tmp_path, 40, tokens=128).stats(vocab_size=49152)
    assert stats["tokens"] == 40 * 128 and stats["full_vocab_fp32_bytes_per_token"] == 49152 * 4
    # packed, even uniformly random ids (no teacher's) take less than the raw payload alone, headers and pages included
    assert 0.5 * raw_bytes_per_token(4) < stats["bytes_per_token"] < raw_bytes_per_token(4)
    assert stats["compression"] > 1000


def test_edited_payload_is_never_used(tmp_path, caplog):
    cache = filled(tmp_path)
    entry = cache.lookup(request(1), ACCEPT).entry
    payload = bytearray(sqlite3.connect(cache.file).execute("SELECT payload FROM entries WHERE id = ?", (entry.row,)).fetchone()[0])
    payload[-5] ^= 0x40  # inside the packed (compressed) payload
    tamper_cache(cache.file, "UPDATE entries SET payload = ? WHERE id = ?", bytes(payload), entry.row)
    reread = TeacherCache(cache.folder)
    found = reread.lookup(request(1), ACCEPT)
    assert found.entry is None and found.reason == f"entry {entry.row}: content hash does not verify (the entry was edited or damaged)"
    assert [r for r, _ in reread.verify().damaged] == [entry.row]
    assert reread.lookup(request(0), ACCEPT).entry is not None and reread.lookup(request(2), ACCEPT).entry is not None
    with caplog.at_level(logging.INFO, "kdtrain.data"):
        seen = [ex.request.sample_id for ex in TeacherTargets([request(i) for i in range(3)], reread, ACCEPT)]
    assert seen == ["s000", "s002"]
    assert "missing teacher targets: 1/3 samples (33.3%)" in caplog.text


def _re_sign(path, row: int, payload: bytes) -> None:
    """Store ``payload`` in ``row`` with a content hash that verifies: what a writer with a packing bug would leave."""
    header = sqlite3.connect(path).execute("SELECT header FROM entries WHERE id = ?", (row,)).fetchone()[0].encode("utf-8")
    sha = hashlib.sha256(header + b"\0" + payload).hexdigest()
    tamper_cache(path, "UPDATE entries SET payload = ?, content_sha256 = ? WHERE id = ?", payload, sha, row)


@pytest.mark.parametrize("forge, why", [
    (lambda p: p[:-4], "packed-1 payload of {n} bytes for 5 tokens x top-4: packed payload does not decompress "
                           "(the stream ends early)"),
    (lambda p: packing.compress(packing.decompress(p) + b"\x05"), "packed-1 payload of {n} bytes for 5 tokens x top-4: "
                                                                 "packed payload: 51 varints, expected 50"),
])
def test_a_packed_payload_that_verifies_but_does_not_unpack_is_reported_and_never_used(tmp_path, forge, why):
    cache = filled(tmp_path)
    row, payload = sqlite3.connect(cache.file).execute("SELECT id, payload FROM entries WHERE sample_id = 's001'").fetchone()
    forged = forge(payload)
    _re_sign(cache.file, row, forged)
    reread = TeacherCache(cache.folder)
    why = why.format(n=len(forged))
    assert reread.lookup(request(1), ACCEPT).reason == f"entry {row}: {why}"
    assert reread.verify().damaged == [(row, why)]
    assert [e.sample_id for e in reread] == ["s000", "s002"]


def _format_2_cache(folder, items) -> None:
    """A cache as kdtrain wrote it before packing (format 2): raw payloads, no ``payload`` key in the header."""
    folder.mkdir()
    with TeacherCache(folder) as cache:  # the schema; then the rows of the old writer
        cache.append_many(items[:0])
    with contextlib.closing(sqlite3.connect(cache.file)) as db, db:
        db.execute("PRAGMA user_version = 2")
        for req, teacher, r in items:
            header = json.dumps({
                "sample_id": req.sample_id, "prompt_sha256": req.prompt_sha256(), "mode": req.mode,
                "teacher": {"name": teacher.name, "version": teacher.version}, "text": r.text, "tokens": len(r.token_ids),
                "top_k": r.topk_ids.shape[1], "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
            }, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
            payload = b"".join(np.ascontiguousarray(a, dtype).tobytes() for a, dtype in (
                (r.token_ids, "<i4"), (r.offsets, "<i4"), (r.topk_ids, "<i4"), (r.topk_logprobs, "<f2")))
            db.execute("INSERT INTO entries (sample_id, header, payload, content_sha256) VALUES (?, ?, ?, ?)",
                       (req.sample_id, header, payload, hashlib.sha256(header.encode() + b"\0" + payload).hexdigest()))


def test_a_format_2_cache_reads_as_it_is_and_takes_packed_entries_as_format_3(tmp_path):
    folder = tmp_path / "cache"
    _format_2_cache(folder, [(request(i), TEACHER, response(i)) for i in range(2)])
    before = (folder / CACHE_FILE).read_bytes()
    old = TeacherCache(folder)
    for i in range(2):
        assert_same_targets(old.lookup(request(i), ACCEPT).entry.response, response(i), step=0.0)
    assert old.verify().entries == 2 and (folder / CACHE_FILE).read_bytes() == before  # reading changes nothing
    with TeacherCache(folder) as cache:
        cache.append(request(2), TEACHER, response(2))
    reread = TeacherCache(folder)
    assert [e.sample_id for e in reread] == ["s000", "s001", "s002"] and not reread.verify().damaged
    assert_same_targets(reread.lookup(request(2), ACCEPT).entry.response, response(2))
    assert sqlite3.connect(reread.file).execute("PRAGMA user_version").fetchone()[0] == 3


@pytest.mark.parametrize("edit, why", [
    ("UPDATE entries SET header = replace(header, '\"version\":\"v1\"', '\"version\":\"v2\"')", "content hash does not verify"),
    ("UPDATE entries SET header = replace(header, '\"prompt_sha256\":\"', '\"prompt_sha256\":\"0')", "content hash does not verify"),
    ("UPDATE entries SET content_sha256 = upper(content_sha256)", "content hash does not verify"),
    ("UPDATE entries SET sample_id = 's001'", "filed under sample 's001' but holds sample 's000'"),
    ("UPDATE entries SET header = CAST(x'ff' AS TEXT) || header", "content hash does not verify"),
    ("UPDATE entries SET sample_id = CAST(x'ff' AS TEXT)", "unreadable entry (UnicodeDecodeError: "),
    ("UPDATE entries SET content_sha256 = CAST(x'ff' AS TEXT)", "unreadable entry (UnicodeDecodeError: "),
])
def test_edited_or_rotten_entries_are_reported_and_never_used(tmp_path, edit, why):
    cache = filled(tmp_path, 1)
    tamper_cache(cache.file, edit)
    reread = TeacherCache(cache.folder)
    assert [reread.lookup(request(i), Accept(TEACHER.name, ("v1", "v2"))).entry for i in range(2)] == [None, None]
    assert why in reread.verify().damaged[0][1] and not list(reread)


def test_entry_from_another_teacher_version_is_refused_even_if_it_verifies(tmp_path):
    cache = TeacherCache(tmp_path / "cache")
    cache.append(request(0), TeacherId(TEACHER.name, "v0-old"), response(0))
    found = TeacherCache(cache.folder).lookup(request(0), ACCEPT)
    assert found.entry is None
    assert found.reason == "teacher SmolLM2-135M-Instruct v0-old, expected SmolLM2-135M-Instruct at v1"


def test_entry_for_a_changed_prompt_is_refused(tmp_path):
    cache = filled(tmp_path, 1)
    changed = request(0, "<|im_start|>user\nquestion 0 (edited)<|im_end|>\n<|im_start|>assistant\n")
    assert cache.lookup(changed, ACCEPT).reason == "prompt changed since it was cached (prompt SHA-256 differs)"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_write_cut_anywhere_is_never_read_and_the_next_append_repeats_it(tmp_path_factory, data):
    cache = filled(tmp_path_factory.mktemp("torn"), 2)
    cache.append(request(2), TEACHER, response(2))  # committed to the write-ahead log, not yet checkpointed
    log = (cache.folder / (CACHE_FILE + "-wal")).read_bytes()
    cut = data.draw(st.integers(min_value=1, max_value=len(log) - 1))
    crashed = tmp_path_factory.mktemp("crashed")  # the files as a crash in the middle of that write leaves them
    shutil.copy(cache.file, crashed / CACHE_FILE)
    (crashed / (CACHE_FILE + "-wal")).write_bytes(log[:cut])
    with TeacherCache(crashed) as torn:
        assert [e.sample_id for e in torn] == ["s000", "s001"] and not torn.verify().damaged
        torn.append(request(2), TEACHER, response(2))
    assert [e.sample_id for e in TeacherCache(crashed)] == ["s000", "s001", "s002"]
    assert os.listdir(crashed) == [CACHE_FILE]


def test_kill_9_during_appends_leaves_every_complete_entry_valid(tmp_path):
    folder = tmp_path / "cache"
    writer = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(os.path.dirname(__file__))!r})
        from test_teacher_cache import request, response, TEACHER
        from kdtrain.teacher.cache import TeacherCache
        cache = TeacherCache({str(folder)!r})
        i = 0
        while True:
            cache.append(request(i % 1000), TEACHER, response(i % 1000, tokens=2000, k=8))
            i += 1
            if i == 3:
                print("started", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "started"
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with TeacherCache(folder) as cache:
        found = cache.verify()
        assert found.entries >= 3 and not found.damaged
        for entry in cache:
            i = int(entry.sample_id[1:])
            np.testing.assert_array_equal(entry.response.topk_ids, response(i, tokens=2000, k=8).topk_ids)
        cache.append(request(999), TEACHER, response(999))
    assert os.listdir(folder) == [CACHE_FILE]


def _garbage_header(path):
    with open(path, "r+b") as handle:
        handle.write(b"KDTC" * 4)


def _garbage_page(path):  # the entries table's root (page 2), which every read and write goes through
    with open(path, "r+b") as handle:
        handle.seek(4096)
        handle.write(b"\xff" * 12)


def _cut_in_half(path):
    os.truncate(path, path.stat().st_size // 2)


def _another_database(path):
    path.unlink()
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("CREATE TABLE entries (x)")


@pytest.mark.parametrize("damage, found", [
    (_garbage_header, "expected a readable SQLite teacher cache, found DatabaseError: file is not a database"),
    (_garbage_page, "expected a readable SQLite teacher cache, found DatabaseError: database disk image is malformed"),
    (_cut_in_half, "expected a readable SQLite teacher cache, found DatabaseError: database disk image is malformed"),
    (_another_database, "at SQLite application_id, user_version: expected a kdtrain teacher cache (0x4b445443, format 2 or 3), "
                        "found (0x0, format 0)"),
])
def test_a_damaged_database_file_is_an_error_naming_it_and_is_left_as_it_is(tmp_path, damage, found):
    cache = filled(tmp_path, 40, tokens=64)
    damage(cache.file)
    data = cache.file.read_bytes()
    for use in (lambda c: c.verify(), lambda c: c.lookup(request(5), ACCEPT), lambda c: c.append(request(99), TEACHER, response(99))):
        with pytest.raises(ArtifactError) as error:
            use(TeacherCache(cache.folder))
        assert str(error.value) == f"{cache.file}: {found}"
    assert cache.file.read_bytes() == data


def test_with_30_percent_of_calls_failing_no_sample_is_lost_and_the_retry_pass_completes(tmp_path):
    requests = [request(i) for i in range(40)]
    failing = {r.sample_id for r in requests[::10] + requests[3::10] + requests[7::10]}
    cache = TeacherCache(tmp_path / "cache")
    first = fill_cache(cache, FakeTeacher(failing), requests, ACCEPT)
    assert first.fetched == 28 and set(first.retry_later) == failing == set(retry_later(cache))
    cached = {e.sample_id for e in TeacherCache(cache.folder)}
    assert cached | failing == {r.sample_id for r in requests} and not cached & failing

    second_teacher = FakeTeacher()
    second = fill_cache(TeacherCache(cache.folder), second_teacher, requests, ACCEPT)
    assert sorted(second_teacher.calls) == sorted(failing) and second.hits == 28 and not second.retry_later
    assert retry_later(cache) == {}
    targets = TeacherTargets(requests, TeacherCache(cache.folder), ACCEPT)
    assert len(list(targets)) == 40 and targets.missing_ratio == 0


def test_an_exhausted_budget_stops_asking_and_lists_the_rest(tmp_path):
    requests = [request(i) for i in range(6)]
    report = fill_cache(TeacherCache(tmp_path / "c"), FakeTeacher(budget_after=3), requests, ACCEPT)
    assert report.fetched == 3
    assert set(report.retry_later) == {"s003", "s004", "s005"}
    assert all(r.startswith("budget exhausted") for r in report.retry_later.values())


def test_a_tampered_entry_is_refetched_by_the_next_fill(tmp_path):
    cache = TeacherCache(tmp_path / "cache")
    cache.append(request(0), TeacherId(TEACHER.name, "v0-old"), response(0))
    teacher = FakeTeacher()
    report = fill_cache(TeacherCache(cache.folder), teacher, [request(0)], ACCEPT)
    assert teacher.calls == ["s000"] and "v0-old" in report.refused["s000"]
    assert TeacherCache(cache.folder).lookup(request(0), ACCEPT).entry.teacher == TEACHER


def test_a_teacher_the_reader_would_refuse_cannot_fill(tmp_path):
    with pytest.raises(TeacherError, match="expected SmolLM2-135M-Instruct at v2"):
        fill_cache(TeacherCache(tmp_path), FakeTeacher(), [request(0)], Accept(TEACHER.name, ("v2",)))
