"""Teacher cache throughput at 10^4 and 10^5 entries of 16 tokens x top-8, and its size and
KD-loss cost at k = 8 and k = 32.

Appends are timed as a fill pass makes them, one response per transaction (fsync included),
over the last 2,000 entries before the cache reaches each size; the rest of the filling is
setup, in batches. Lookups are timed as the trainer makes them, one sample at a time, every
entry in random order, from a fresh reader. Reported, never asserted: entries/s, and the
per-entry time at 10^5 entries over that at 10^4 (flat, ~1, when both are O(1)).

Size is measured on top-k shaped like a real teacher's (:mod:`kdtrain.teacher.synthetic`:
Zipf-distributed ids, peaked log-probs; uniformly random ids would overstate it): payload
bytes per token, and whole-file bytes per token (headers, hashes and SQLite pages
included), against the raw layout; and the KD loss (``topk_kl``, tau = 2, forward, as the
reference config trains) of a half-trained student on the unpacked targets relative to the
same loss on the uncompressed (float32) top-k. When ``--kd-artifacts`` holds a teacher cache,
its real entries (top-8) are re-written packed and measured too. Run with ``make bench``.
"""

from __future__ import annotations

import random
import time

import numpy as np
import torch

from kdcontracts.models.distill_data import Accept
from kdtrain.artifact_table import TEACHER_CACHE
from kdtrain.losses.kl import topk_kl
from kdtrain.teacher import packing, synthetic
from kdtrain.teacher.base import TeacherRequest, TeacherResponse
from kdtrain.teacher.cache import CACHE_FILE, TeacherCache, TeacherId, raw_bytes_per_token

SMALL, LARGE = 10_000, 100_000
WINDOW = 2_000  # appends timed one by one just before the cache reaches each size
BATCH = 10_000  # setup appends per transaction
TOKENS, TOP_K = 16, 8
TEACHER = TeacherId("bench-teacher", "v1")
ACCEPT = Accept(TEACHER.name, (TEACHER.version,))


def _request(i: int) -> TeacherRequest:
    text = f"<|im_start|>user\nquestion {i}<|im_end|>\n<|im_start|>assistant\n"
    return TeacherRequest(f"s{i:07d}", (), text, tuple(range(i % 1000, i % 1000 + 24)), top_k=TOP_K)


def _responses(n: int = 64) -> list[TeacherResponse]:
    rng = np.random.default_rng(0)
    return [TeacherResponse(
        text="y" * TOKENS, token_ids=rng.integers(0, 49152, TOKENS).astype(np.int32),
        offsets=np.stack([np.arange(TOKENS), np.arange(1, TOKENS + 1)], 1).astype(np.int32),
        topk_ids=rng.integers(0, 49152, (TOKENS, TOP_K)).astype(np.int32),
        topk_logprobs=-np.sort(rng.exponential(2.0, (TOKENS, TOP_K)), axis=1).astype(np.float32),
        prompt_tokens=24, completion_tokens=TOKENS) for _ in range(n)]


def test_fill_and_read_100k_entries(benchmark, tmp_path):
    requests, responses = [_request(i) for i in range(LARGE)], _responses()
    item = lambda i: (requests[i], TEACHER, responses[i % len(responses)])  # noqa: E731
    cache, filled = TeacherCache(tmp_path / "cache"), 0

    def read(size: int) -> float:
        """Seconds per lookup, every entry once in random order, from a fresh reader."""
        reader, order = TeacherCache(cache.folder), random.Random(size).sample(requests[:size], size)
        start = time.perf_counter()
        hits = sum(reader.lookup(request, ACCEPT).entry is not None for request in order)
        assert hits == size
        return (time.perf_counter() - start) / size

    append, lookup = {}, {}
    for size in (SMALL, LARGE):
        for start in range(filled, size - WINDOW, BATCH):
            cache.append_many(item(i) for i in range(start, min(start + BATCH, size - WINDOW)))
        start = time.perf_counter()
        for i in range(size - WINDOW, size):
            cache.append(*item(i))
        append[size], filled = (time.perf_counter() - start) / WINDOW, size
        cache.close()  # readers see the file as the stage leaves it
        lookup[size] = read(size) if size == SMALL else benchmark.pedantic(read, args=(size,), rounds=1, iterations=1)
    for name, times in (("append (one response per transaction, synchronous=FULL)", append),
                        ("lookup (verified, random order)", lookup)):
        print(f"\n{name}: {1 / times[LARGE]:.0f} entries/s at {LARGE} entries; per entry {1e6 * times[SMALL]:.0f} us "
              f"at {SMALL}, {1e6 * times[LARGE]:.0f} us at {LARGE}: ratio {times[LARGE] / times[SMALL]:.2f}")
    print(f"file: {cache.file.stat().st_size / LARGE:.0f} bytes per entry ({cache.file.stat().st_size / (LARGE * TOKENS):.0f} per token)")


SIZE_ENTRIES, SIZE_TOKENS, DISTINCT = 400, 128, 8  # a cache of 400 entries of 128 tokens, 8 distinct responses repeated


def _file_bytes_per_token(folder, responses: list[TeacherResponse]) -> float:
    """Whole-file bytes per token of a cache holding ``responses``, each under its own sample."""
    with TeacherCache(folder) as cache:
        cache.append_many((_request(i), TEACHER, r) for i, r in enumerate(responses))
    return cache.file.stat().st_size / sum(len(r.token_ids) for r in responses)


def _kd_loss(student: np.ndarray, ids: np.ndarray, logprobs: np.ndarray) -> float:
    mask = torch.ones(1, len(ids), dtype=torch.bool)
    return float(topk_kl(torch.from_numpy(student)[None], torch.from_numpy(ids).long()[None], torch.from_numpy(logprobs)[None],
                         mask, temperature=2.0, direction="forward"))


def test_bytes_per_token_and_kd_loss_at_k_8_and_32(tmp_path, bench_artifacts):
    for k in (8, 32):
        rng = np.random.default_rng(k)
        responses, losses = [], np.zeros(3)  # uncompressed, packed, raw (FP16)
        for _ in range(DISTINCT):
            r, logits = synthetic.response(rng, SIZE_TOKENS, k)
            student = (0.8 * logits + rng.normal(0.0, 1.0, logits.shape)).astype(np.float32)  # learned the teacher in part
            _, _, _, ids, logprobs = packing.unpack(packing.pack(r), SIZE_TOKENS, k)
            losses += [_kd_loss(student, r.topk_ids, r.topk_logprobs), _kd_loss(student, ids, logprobs),
                       _kd_loss(student, r.topk_ids, r.topk_logprobs.astype(np.float16).astype(np.float32))]
            responses.append(r)
        payload = sum(len(packing.pack(r)) for r in responses) / (DISTINCT * SIZE_TOKENS)
        whole = _file_bytes_per_token(tmp_path / f"k{k}", [responses[i % DISTINCT] for i in range(SIZE_ENTRIES)])
        print(f"\ntop-{k} (synthetic, {SIZE_ENTRIES} entries x {SIZE_TOKENS} tokens): packed payload {payload:.1f} bytes per token, "
              f"whole file {whole:.1f} (raw payload {raw_bytes_per_token(k)}); KD loss {losses[0] / DISTINCT:.4f} on the "
              f"uncompressed top-k, packed {(losses[1] - losses[0]) / losses[0]:+.2e} relative (raw FP16 {(losses[2] - losses[0]) / losses[0]:+.2e})")
    real = bench_artifacts / TEACHER_CACHE.path
    if not (real / CACHE_FILE).is_file():
        print(f"\nno teacher cache in {real}: no real-data figure")
        return
    entries = list(TeacherCache(real))
    k = entries[0].response.topk_ids.shape[1]
    with TeacherCache(tmp_path / "real") as cache:
        cache.append_many((_request(i), TEACHER, e.response) for i, e in enumerate(entries))
    tokens = sum(len(e.response.token_ids) for e in entries)
    payload = sum(len(packing.pack(e.response)) for e in entries) / tokens
    print(f"top-{k} (the teacher cache in {real}, {len(entries)} entries, {tokens} tokens): packed payload {payload:.1f} bytes "
          f"per token, whole file {cache.file.stat().st_size / tokens:.1f} (raw payload {raw_bytes_per_token(k)}, "
          f"as it is on disk {(real / CACHE_FILE).stat().st_size / tokens:.1f})")
