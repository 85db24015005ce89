"""The packed cache payload gives back ids and spans bit for bit and log-probs within a
quantisation step, their mass never above the teacher's, in about a third of the raw bytes; the KD loss the trainer computes on
it is within 1% of the loss on the teacher's uncompressed top-k, at k = 8 and k = 32, on
distributions shaped like a real teacher's."""

from __future__ import annotations

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
    text, token_ids, offsets, topk_ids, logprobs = packing.unpack(payload, t, k)
    assert text == r.text
    for got, want in ((token_ids, r.token_ids), (offsets, r.offsets), (topk_ids, r.topk_ids)):
        assert got.dtype == np.int32 and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    assert logprobs.dtype == np.float32 and logprobs.shape == (t, k)
    top1 = r.topk_logprobs[:, :1].astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(logprobs[:, :1], top1)
    error = logprobs[:, 1:].astype(np.float64) - r.topk_logprobs[:, 1:]
    assert (np.abs(error) < packing.STEP + 1e-5).all()  # the ceiling or the floor
    teacher = np.exp(top1.astype(np.float64)) + np.exp(r.topk_logprobs[:, 1:].astype(np.float64)).sum(1, keepdims=True)
    assert (np.exp(logprobs.astype(np.float64)).sum(1, keepdims=True) <= teacher * (1 + 1e-6)).all()  # mass never above
    if (np.diff(r.topk_logprobs, axis=1) <= 0).all():
        assert (np.diff(logprobs, axis=1) <= 0).all()  # best first stays best first


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
    text = draw(st.text(max_size=30))
    return TeacherResponse(text, tokens.astype(np.int32), offsets.astype(np.int32), ids.astype(np.int32),
                           logprobs.astype(np.float32), 0, 0)


@settings(max_examples=150, deadline=None)
@given(r=responses())
def test_ids_and_spans_unpack_bit_for_bit_and_log_probs_within_a_step(r):
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
    _, _, _, ids, logprobs = packing.unpack(packing.pack(r), tokens, k)
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
def test_a_realistic_response_packs_to_under_half_of_its_raw_payload_and_text(k):
    rng = np.random.default_rng(k)
    rs = [synthetic.response(rng, 128, k)[0] for _ in range(4)]
    text = sum(len(r.text.encode()) for r in rs) / (4 * 128)  # about 13 bytes per token, in the header when raw
    per_token = sum(len(packing.pack(r)) for r in rs) / (4 * 128)
    assert per_token < 0.5 * (raw_bytes_per_token(k) + text)  # about 30 bytes at k = 8, 83 at k = 32


def _repacked(edit):
    return lambda payload: packing.compress(edit(packing.decompress(payload)))


TEXT_END = 4 + 35  # the length and the 35 characters of the response's text below


@pytest.mark.parametrize("damage, why", [
    (lambda p: p[:-3], r"packed payload does not decompress \(the stream ends early\)"),
    (lambda p: p + b"\0", r"packed payload does not decompress \(the stream has bytes after its end\)"),
    (lambda p: b"\xff" + p[1:], r"packed payload does not decompress \(Corrupt input data\)"),
    (_repacked(lambda d: d[:4] + b"\0" * 5), "packed payload of 9 bytes unpacked, expected at least 64 for 6 tokens x top-8"),
    (_repacked(lambda d: d[:4] + b"\xff" + d[5:]), "packed payload: text is not UTF-8"),
    (_repacked(lambda d: d + b"\x81"), "packed payload: 1 bytes after the last varint, expected none"),
    (_repacked(lambda d: d[:-1]), "packed payload: 107 varints, expected 108"),
    (_repacked(lambda d: d[:TEXT_END + 12] + b"\xff" * 13 + d[TEXT_END + 25:]), "Lehmer digit out of range"),
])
def test_a_payload_that_does_not_unpack_says_why(damage, why):
    r = synthetic.response(np.random.default_rng(0), 6, 8, vocab=1000)[0]
    assert len(r.text) + 4 == TEXT_END
    payload = packing.pack(r)
    assert_unpacks_to(r, payload)
    with pytest.raises(ValueError, match=why):
        packing.unpack(damage(payload), 6, 8)
