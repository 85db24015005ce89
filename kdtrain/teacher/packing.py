"""The teacher cache's packed payload: top-k targets in under half the raw bytes.

Raw, a target token costs 12 + 6k bytes (int32 id and span, int32 top-k ids, FP16
log-probs): 204 at k = 32. What a teacher's top-k actually holds is far less information,
and five observations pack it (DistillKit-style: quantised log-probs, delta-coded ids):

- the k ids of one position are distinct and, sorted, sit a few hundred to a few thousand
  apart (frequent tokens have small ids in a BPE vocabulary): sorted and delta-coded they
  take one to two bytes each instead of four. Their rank order is kept as a permutation in
  Lehmer code (rank r's digit: how many later ranks hold a smaller id, ``ceil(log2(k - r))``
  bits): 129 bits at k = 32, where 5 bits per rank would take 160. The alternative, log-probs
  stored in id order and the ranks recovered by sorting them, cannot restore the order of
  two log-probs that quantise to the same step, and the tail of a top-32 has many near-ties;
- log-probs in rank order only fall: the top-1 is kept as FP16 (as in the raw layout) and
  the others as their distance below it in whole ``STEP`` nats, coded as the difference from
  the previous rank's, a small number. Each distance is rounded to the nearer step unless
  that would lift the top-k mass so far above the teacher's (then up: error diffusion), so
  the mass never exceeds the teacher's (rounding to nearest alone gave 1.0047 on the
  reference cache, which the data contract's mass <= 1 refuses) and the errors do not all
  lean one way (always rounding up moved the KD loss 4 x 10^-3 of itself, this at most
  9 x 10^-4). A step of 1/32 nat: 1/64 would cost 3.5 more bytes a token at k = 32;
- the target token is usually one of its position's top-k (84% of the reference cache's
  at k = 8): it is coded as that rank, else as ``k + id``;
- spans are mostly contiguous: each is coded as its start minus the previous end (zigzag,
  0 almost always) and its length;
- the response text (in score mode the whole conversation: 13 bytes a token in the
  reference cache, where it sat in the header) compresses to a third with the rest.

Layout, little-endian, the whole then LZMA2-compressed (raw, no container; 64 KiB
dictionary: at k = 32, 8% smaller than zlib for a millisecond an entry)::

    text_bytes:u4  text:utf-8[text_bytes]
    top1_logprob:f2[T]
    rank_permutation: per position, k Lehmer digits of ceil(log2(k - r)) bits, MSB first;
        zero-padded to a byte at the end
    varints (LEB128), T*(2k+2) of them: token[T], span[T, 2], sorted-id deltas[T, k]
        (the first of each row absolute), log-prob steps[T, k-1] (zigzag)

Decoding gives ids and spans bit for bit, the top-1 log-prob as FP16, the others within
``STEP`` of the teacher's, their mass never above the teacher's and a falling row falling.
Only responses with non-negative ids and finite log-probs within range are packable (an
API's ``-inf`` is not); the cache stores the others raw.
"""

from __future__ import annotations

import lzma

import numpy as np

from kdtrain.teacher.base import TeacherResponse

STEP = 1.0 / 32  # nats per quantisation step below the top-1; part of the layout: another step is another layout name
MAX_STEPS = 2**31 - 1  # a log-prob further below the top-1 than this many steps is not packable
_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 6, "dict_size": 1 << 16}]  # part of the layout, as STEP is
_GROUPS = 5  # 7-bit groups per varint: every coded value is below 2**35 (int32 differences, zigzagged)


def packable(r: TeacherResponse) -> bool:
    """Whether :func:`pack` can hold ``r``: ids exactly, log-probs within ``STEP``."""
    logprobs = r.topk_logprobs.astype(np.float64)
    if (not r.topk_ids.shape[1] or (r.topk_ids < 0).any() or (r.token_ids < 0).any() or not np.isfinite(logprobs).all()
            or (np.abs(logprobs[:, 0]) > np.finfo(np.float16).max).any()):
        return False
    top1 = logprobs[:, :1].astype(np.float16).astype(np.float64)
    return bool((np.abs(top1 - logprobs) / STEP < MAX_STEPS).all())


def pack(r: TeacherResponse) -> bytes:
    """The packed payload of a :func:`packable` response."""
    t, k = r.topk_ids.shape
    order = np.argsort(r.topk_ids, axis=1, kind="stable")  # [T, k]: the rank of each sorted id
    sorted_ids = np.take_along_axis(r.topk_ids, order, 1).astype(np.int64)
    rank_to_sorted = np.argsort(order, axis=1)  # [T, k]: where rank r's id sits among the sorted ids
    top1 = r.topk_logprobs[:, 0].astype("<f2")
    steps = _quantise((top1[:, None].astype(np.float64) - r.topk_logprobs[:, 1:]) / STEP)  # [T, k-1]
    is_token = r.topk_ids == r.token_ids[:, None]
    previous_end = np.concatenate([[0], r.offsets[:-1, 1]]).astype(np.int64)
    values = np.concatenate([
        np.where(is_token.any(1), is_token.argmax(1), k + r.token_ids.astype(np.int64)),
        np.stack([_zigzag(r.offsets[:, 0] - previous_end), _zigzag(r.offsets[:, 1].astype(np.int64) - r.offsets[:, 0])], 1).ravel(),
        np.diff(sorted_ids, axis=1, prepend=0).ravel(),
        _zigzag(np.diff(steps, axis=1, prepend=0)).ravel(),
    ])
    text = r.text.encode("utf-8")
    return compress(len(text).to_bytes(4, "little") + text + top1.tobytes() + _lehmer_bits(rank_to_sorted) + _varints(values))


def unpack(payload: bytes, t: int, k: int) -> tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``text, token_ids:int32[T], offsets:int32[T, 2], topk_ids:int32[T, k], topk_logprobs:float32[T, k]``
    of a packed payload; ValueError saying what does not fit ``t`` tokens x top-``k``."""
    data = decompress(payload)
    if k < 1:
        raise ValueError(f"packed payload for top-{k}, expected top-1 or more")
    text_end = 4 + int.from_bytes(data[:4], "little")
    cut = [text_end + 2 * t, text_end + 2 * t + -(-t * int(_widths(k).sum()) // 8)]
    if len(data) < cut[1]:
        raise ValueError(f"packed payload of {len(data)} bytes unpacked, expected at least {cut[1]} for {t} tokens x top-{k}")
    try:
        text = data[4:text_end].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"packed payload: text is not UTF-8 ({exc})") from exc
    data = np.frombuffer(data, np.uint8)
    top1 = data[text_end:cut[0]].view("<f2").astype(np.float32)
    rank_to_sorted = _from_lehmer(_unlehmer_bits(data[cut[0]:cut[1]], t, k))
    values = _unvarints(data[cut[1]:], t * (2 * k + 2)).astype(np.int64)
    token, spans, deltas, steps = np.split(values, np.cumsum([t, 2 * t, t * k]))
    topk_ids = np.take_along_axis(np.cumsum(deltas.reshape(t, k), axis=1), rank_to_sorted, 1)
    gap, length = _unzigzag(spans.reshape(t, 2)).T
    starts = np.cumsum(gap + np.concatenate([[0], length[:-1]]))  # start_i = start_(i-1) + length_(i-1) + gap_i
    offsets = np.stack([starts, starts + length], 1)
    rows = np.arange(t)
    token_ids = np.where(token < k, topk_ids[rows, np.minimum(token, k - 1)], token - k)
    logprobs = top1[:, None] - np.cumsum(_unzigzag(steps.reshape(t, k - 1)), axis=1) * STEP
    out = (token_ids, offsets, topk_ids)
    if any((a < np.iinfo(np.int32).min).any() or (a > np.iinfo(np.int32).max).any() for a in out):
        raise ValueError("packed payload: an id or span does not fit int32")
    return (text, *(a.astype(np.int32) for a in out), np.concatenate([top1[:, None], logprobs], 1).astype(np.float32))


def compress(data: bytes) -> bytes:
    return lzma.compress(data, format=lzma.FORMAT_RAW, filters=_FILTERS)


def decompress(payload: bytes) -> bytes:
    """The packed bytes; ValueError if ``payload`` is not exactly one compressed stream."""
    decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=_FILTERS)
    try:
        data = decompressor.decompress(payload)
    except lzma.LZMAError as exc:
        raise ValueError(f"packed payload does not decompress ({exc})") from exc
    if not decompressor.eof or decompressor.unused_data:
        raise ValueError(f"packed payload does not decompress (the stream {'ends early' if not decompressor.eof else 'has bytes after its end'})")
    return data


def _quantise(distances: np.ndarray) -> np.ndarray:
    """[T, k-1] distances below the top-1, in steps -> whole steps, each the floor or the ceiling:
    the nearer one unless the probability kept so far would exceed the teacher's; never fewer
    than the previous rank's (so a falling row stays falling)."""
    steps = np.zeros(distances.shape, np.int64)
    excess = np.zeros(len(distances))  # decoded minus teacher probability so far, in units of the top-1's
    previous = np.full(len(distances), np.iinfo(np.int64).min)
    for i in range(distances.shape[1]):
        d, floor = distances[:, i], np.floor(distances[:, i])
        nearer = np.where((d - floor < 0.5) & (excess + np.exp(-floor * STEP) - np.exp(-d * STEP) <= 0), floor, np.ceil(d))
        steps[:, i] = np.minimum(np.ceil(d), np.maximum(nearer, previous))
        excess += np.exp(-steps[:, i] * STEP) - np.exp(-d * STEP)
        previous = steps[:, i]
    return steps


def _widths(k: int) -> np.ndarray:
    """Bits of each rank's Lehmer digit: rank r's is below k - r."""
    return np.array([(k - 1 - r).bit_length() for r in range(k)])


def _lehmer_bits(perm: np.ndarray) -> bytes:
    """[T, k] permutations as Lehmer digits, bit-packed at :func:`_widths`."""
    t, k = perm.shape
    later = np.triu(np.ones((k, k), bool), 1)  # [r, s]: s after r
    digits = ((perm[:, None, :] < perm[:, :, None]) & later).sum(2)  # [T, k]: later ranks with a smaller value
    widths = _widths(k)
    shifts = widths[:, None] - 1 - np.arange(max(widths.max(), 1))  # [k, W]: MSB first; negative = no such bit
    bits = (digits[:, :, None] >> np.maximum(shifts, 0)) & 1  # [T, k, W]
    return np.packbits(bits[:, shifts >= 0].astype(np.uint8).ravel()).tobytes()


def _unlehmer_bits(data: np.ndarray, t: int, k: int) -> np.ndarray:
    widths = _widths(k)
    shifts = widths[:, None] - 1 - np.arange(max(widths.max(), 1))
    bits = np.zeros((t, k, shifts.shape[1]), np.int64)
    bits[:, shifts >= 0] = np.unpackbits(data, count=t * int(widths.sum())).reshape(t, int(widths.sum()))
    digits = (bits << np.maximum(shifts, 0)).sum(2)  # [T, k]
    if (digits > k - 1 - np.arange(k)).any():
        raise ValueError(f"a Lehmer digit out of range, expected rank r's below {k} - r")
    return digits


def _from_lehmer(digits: np.ndarray) -> np.ndarray:
    """[T, k] Lehmer digits -> permutations. Right to left: each digit is its value among the
    ranks after it, so every later value at or above it moves up by one."""
    perm = digits.copy()
    for r in range(perm.shape[1] - 2, -1, -1):
        later = perm[:, r + 1:]
        later += later >= perm[:, r:r + 1]
    return perm


def _zigzag(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.int64)
    return (v << 1) ^ (v >> 63)


def _unzigzag(v: np.ndarray) -> np.ndarray:
    return (v >> 1) ^ -(v & 1)


def _varints(values: np.ndarray) -> bytes:
    """LEB128 of non-negative values below 2**35, vectorised: 7 bits a byte, high bit = more follow."""
    v = values.astype(np.uint64)
    groups = ((v[:, None] >> np.arange(0, 7 * _GROUPS, 7, dtype=np.uint64)) & np.uint64(0x7F)).astype(np.uint8)  # [N, 5]
    nonzero = groups != 0
    used = np.where(nonzero.any(1), _GROUPS - np.argmax(nonzero[:, ::-1], axis=1), 1)  # [N]: up to the last non-zero group
    column = np.arange(_GROUPS)
    groups |= np.where(column < used[:, None] - 1, 0x80, 0).astype(np.uint8)
    return groups[column < used[:, None]].tobytes()


def _unvarints(data: np.ndarray, count: int) -> np.ndarray:
    ends = np.flatnonzero(data < 0x80)
    if len(ends) != count:
        raise ValueError(f"packed payload: {len(ends)} varints, expected {count}")
    if len(data) and (not count or ends[-1] != len(data) - 1):
        raise ValueError(f"packed payload: {len(data) - (ends[-1] + 1 if count else 0)} bytes after the last varint, expected none")
    if not count:
        return np.zeros(0, np.uint64)
    starts = np.concatenate([[0], ends[:-1] + 1])
    if (ends - starts >= _GROUPS).any():
        raise ValueError(f"packed payload: a varint longer than {_GROUPS} bytes")
    position = np.arange(len(data)) - np.repeat(starts, ends - starts + 1)
    return np.add.reduceat((data & 0x7F).astype(np.uint64) << (7 * position).astype(np.uint64), starts)
