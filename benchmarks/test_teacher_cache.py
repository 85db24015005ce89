"""Teacher cache throughput at 10^4 and 10^5 entries of 16 tokens x top-8.

Appends are timed as a fill pass makes them, one response per transaction (fsync included),
over the last 2,000 entries before the cache reaches each size; the rest of the filling is
setup, in batches. Lookups are timed as the trainer makes them, one sample at a time, every
entry in random order, from a fresh reader. Run with ``make bench`` (needs no artifacts).
Reported, never asserted: entries/s, and the per-entry time at 10^5 entries over that at
10^4 (flat, ~1, when both are O(1)).
"""

from __future__ import annotations

import random
import time

import numpy as np

from kdcontracts.models.distill_data import Accept
from kdtrain.teacher.base import TeacherRequest, TeacherResponse
from kdtrain.teacher.cache import TeacherCache, TeacherId

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
