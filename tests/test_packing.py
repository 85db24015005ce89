"""The packed cache payload gives back ids and spans bit for bit and log-probs within half a
quantisation step, in about a third of the raw bytes; the KD loss the trainer computes on
it is within 1% of the loss on the teacher's uncompressed top-k, at k = 8 and k = 32, on
distributions shaped like a real teacher's."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from kdtrain.losses.kl import topk_kl
from kdtrain.teacher import packing, synthetic
from kdtrain.teacher.base import TeacherResponse
from kdtrain.teacher.cache import raw_bytes_per_token

TEMPERATURE = 2.0  # configs/distill_reference.yaml: kl_temperature, kl_direction forward


def assert_unpacks_to(r: TeacherResponse, payload: bytes) -> None:
    t, k = r.topk_ids.shape
    token_ids, offsets, topk_ids, logprobs = packing.unpack(payload, t, k)
    for got, want in ((token_ids, r.token_ids), (offsets, r.offsets), (topk_ids, r.topk_ids)):
        assert got.dtype == np.int32 and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    assert logprobs.dtype == np.float32 and logprobs.shape == (t, k)
    top1 = r.topk_logprobs[:, :1].astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(logprobs[:, :1], top1)
    np.testing.assert_allclose(logprobs[:, 1:] - top1, r.topk_logprobs[:, 1:] - top1, rtol=0, atol=packing.STEP / 2 + 1e-5)


@st.composite
def responses(draw) -> TeacherResponse:
    t, k = draw(st.integers(0, 40)), draw(st.integers(1, 40))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    vocab = draw(st.sampled_from([k, 100, 2**31 - 1]))
    ids = np.array([rng.choice(vocab, k, replace=False) for _ in range(t)], np.int64).reshape(t, k)
    logprobs = -np.sort(rng.exponential(draw(st.sampled_from([0.01, 2.0, 300.0])), (t, k)), axis=1) + draw(st.sampled_from([0.0, 12.0]))
    tokens = np.where(rng.random(t) < 0.7, ids[:, 0], rng.integers(0, 2**31 - 1, t))
    starts = np.cumsum(rng.integers(-3, 30, t))  # overlapping, gapped and contiguous spans alike
    offsets = np.stack([starts, starts + rng.integers(0, 9, t)], 1)
    return TeacherResponse("", tokens.astype(np.int32), offsets.astype(np.int32), ids.astype(np.int32),
                           logprobs.astype(np.float32), 0, 0)


@settings(max_examples=150, deadline=None)
@given(r=responses())
def test_ids_and_spans_unpack_bit_for_bit_and_log_probs_within_half_a_step(r):
    assert packing.packable(r)
    assert_unpacks_to(r, packing.pack(r))


@pytest.mark.parametrize("edit", [
    lambda r: r.topk_logprobs.__setitem__((1, 2), -np.inf),  # an API's "impossible"
    lambda r: r.topk_logprobs.__setitem__((0, 0), np.nan),
    lambda r: r.topk_logprobs.__setitem__((0, 0), 7e4),  # beyond FP16
    lambda r: r.topk_logprobs.__setitem__((1, 3), -1e9),  # beyond 2**31 steps below the top-1
    lambda r: r.topk_ids.__setitem__((2, 1), -1),
])
def test_what_packing_cannot_hold_is_not_packable(edit):
    r = synthetic.response(np.random.default_rng(0), 4, 4, vocab=1000)[0]
    assert packing.packable(r)
    edit(r)
    assert not packing.packable(r)


def _kd_loss(student: np.ndarray, ids: np.ndarray, logprobs: np.ndarray) -> float:
    mask = torch.ones(1, len(ids), dtype=torch.bool)
    return float(topk_kl(torch.from_numpy(student)[None], torch.from_numpy(ids).long()[None], torch.from_numpy(logprobs)[None],
                         mask, temperature=TEMPERATURE, direction="forward"))


def _kd_losses(k: int, tokens: int = 64) -> tuple[float, float]:
    """KD loss on the uncompressed top-k, and on the same top-k packed and unpacked, of a
    student that has learned the teacher in part (its logits: 0.8 x the teacher's + N(0, 1))."""
    rng = np.random.default_rng(k)
    r, logits = synthetic.response(rng, tokens, k)
    student = (0.8 * logits + rng.normal(0.0, 1.0, logits.shape)).astype(np.float32)
    _, _, ids, logprobs = packing.unpack(packing.pack(r), tokens, k)
    return _kd_loss(student, r.topk_ids, r.topk_logprobs), _kd_loss(student, ids, logprobs)


@pytest.mark.parametrize("k", [8, 32])
def test_kd_loss_on_packed_targets_is_within_1_percent_of_uncompressed_top_k(k):
    uncompressed, packed = _kd_losses(k)
    assert uncompressed > 0.1  # a student that is not the teacher: the relative difference means something
    assert abs(packed - uncompressed) / uncompressed < 0.01


def test_a_coarser_quantisation_would_fail_the_1_percent_bound(monkeypatch):
    monkeypatch.setattr(packing, "STEP", 2.0)
    uncompressed, packed = _kd_losses(32)
    assert abs(packed - uncompressed) / uncompressed > 0.01


@pytest.mark.parametrize("k", [8, 32])
def test_a_realistic_top_k_packs_to_under_45_percent_of_the_raw_bytes(k):
    rng = np.random.default_rng(k)
    rs = [synthetic.response(rng, 128, k)[0] for _ in range(4)]
    per_token = sum(len(packing.pack(r)) for r in rs) / (4 * 128)
    assert per_token < 0.45 * raw_bytes_per_token(k)  # 27 bytes at k = 8, 92 at k = 32


@pytest.mark.parametrize("damage, why", [
    (lambda p: p[:-3], "packed payload does not decompress"),
    (lambda p: zlib.compress(b"\0" * 9), "packed payload of 9 bytes unpacked, expected at least 25 for 6 tokens x top-8"),
    (lambda p: zlib.compress(zlib.decompress(p) + b"\x81"), "packed payload: 1 bytes after the last varint, expected none"),
    (lambda p: zlib.compress(zlib.decompress(p)[:-1]), "packed payload: 107 varints, expected 108"),
    (lambda p: zlib.compress(zlib.decompress(p)[:12] + b"\xff" * 13 + zlib.decompress(p)[25:]), "Lehmer digit out of range"),
])
def test_a_payload_that_does_not_unpack_says_why(damage, why):
    r = synthetic.response(np.random.default_rng(0), 6, 8, vocab=1000)[0]
    payload = packing.pack(r)
    assert_unpacks_to(r, payload)
    with pytest.raises(ValueError, match=why):
        packing.unpack(damage(payload), 6, 8)
