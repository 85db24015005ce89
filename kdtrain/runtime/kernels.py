"""Numeric kernels of the MIL reference executor, one per MIL op type.

Each kernel receives the op's inputs as numpy arrays (or Python lists for list inputs) and
returns one array per output. Arithmetic runs in FP32 (``_f32``); the executor then stores
each output in its declared dtype, which is where FP16 rounding, overflow to inf and the
NaN that follows happen, exactly at op boundaries as on device. Matmul-shaped work goes
through torch's BLAS in FP32 rather than numpy's slow FP16 loops.
"""

from __future__ import annotations

import numpy as np
import torch

from kdtrain.errors import KDError


class UnsupportedOpError(KDError):
    """The executor met an op (or an op variant) it cannot run; the message names it."""


# FP32 twins of read-only FP16 constants (weights), keyed by id; the source is kept alive
# beside its twin so that an id cannot be reused while cached.
_CONST_F32: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _f32(x: np.ndarray) -> np.ndarray:
    if x.dtype != np.float16:
        return x
    if not x.flags.writeable:  # a constant: convert once
        cached = _CONST_F32.get(id(x))
        if cached is None or cached[0] is not x:
            cached = _CONST_F32[id(x)] = (x, torch.from_numpy(x.copy()).float().numpy())
        return cached[1]
    # torch's FP16 -> FP32 conversion is vectorised; numpy's astype is ~10x slower.
    return torch.from_numpy(np.ascontiguousarray(x)).float().numpy()


# Conversions to a float dtype that torch makes vectorised and numpy's astype does not (bool,
# ints, FP16 <-> FP32): FP32 -> FP16 rounds to nearest even and overflows to inf in both.
_TORCH_SOURCES = {np.dtype(t): getattr(torch, n) for t, n in ((np.float16, "float16"), (np.float32, "float32"), (np.float64, "float64"),
                                                              (np.bool_, "bool"), (np.int8, "int8"), (np.uint8, "uint8"),
                                                              (np.int16, "int16"), (np.int32, "int32"), (np.int64, "int64"))}
_TORCH_FLOATS = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32}


def to_dtype(value: np.ndarray, dtype) -> np.ndarray:
    """Store a result in its MIL dtype; FP32 -> FP16 rounds (and overflows to inf) as IEEE does."""
    target = _TORCH_FLOATS.get(np.dtype(dtype))
    if target is not None and isinstance(value, np.ndarray) and value.dtype != dtype and value.dtype in _TORCH_SOURCES:
        return torch.from_numpy(np.ascontiguousarray(value)).to(target).numpy()
    return np.asarray(value).astype(dtype, copy=False)


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(_f32(x)))


def _axes(axes, ndim: int) -> tuple[int, ...] | None:
    return None if axes is None else tuple(int(a) % ndim for a in np.atleast_1d(axes))


def _binary(np_fn, torch_fn=None, exact_in_fp16=False):
    """``exact_in_fp16``: for +, -, x and / of two FP16 inputs, torch's CPU Half kernels compute
    each element in FP32 and round once to FP16, which is what FP32 arithmetic followed by the
    executor's rounding gives (double rounding through FP32 is innocuous for these ops: 24 >= 2*11+2
    bits). Running them on the FP16 arrays directly skips two conversions of every element, which
    is most of a prefill at L=4096 ([heads, L, L] masks and scales). ``tests/test_mil_executor.py``
    pins the equality bit for bit, overflow to inf included."""

    def kernel(x, y):
        x, y = np.asarray(x), np.asarray(y)
        if exact_in_fp16 and x.dtype == y.dtype == np.float16 and max(x.size, y.size) > 4096:
            return torch_fn(_half(x), _half(y)).numpy()
        a, b = _f32(x), _f32(y)
        if torch_fn is not None and a.dtype == b.dtype == np.float32 and max(a.size, b.size) > 4096:
            # large float work: torch's threaded, vectorised loops
            return torch_fn(torch.from_numpy(np.ascontiguousarray(a)), torch.from_numpy(np.ascontiguousarray(b))).numpy()
        return np_fn(a, b)
    return kernel


def _half(x: np.ndarray) -> torch.Tensor:
    """An FP16 array as a tensor; a read-only constant is copied (torch wants writable memory)."""
    return torch.from_numpy(np.ascontiguousarray(x) if x.flags.writeable else x.copy())


def _slices(shape, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    n = len(shape)
    stride = np.ones(n, dtype=np.int64) if stride is None else stride
    index, squeeze = [], []
    for i in range(n):
        b = None if begin_mask is not None and begin_mask[i] else int(begin[i])
        e = None if end_mask is not None and end_mask[i] else int(end[i])
        if squeeze_mask is not None and squeeze_mask[i]:
            index.append(slice(b, None if b in (None, -1) else b + 1, 1))
            squeeze.append(i)
        else:
            index.append(slice(b, e, int(stride[i])))
    return tuple(index), tuple(squeeze)


def slice_by_index(x, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    index, squeeze = _slices(x.shape, begin, end, stride, begin_mask, end_mask, squeeze_mask)
    out = x[index]
    return np.squeeze(out, axis=squeeze) if squeeze else out


def slice_update(x, update, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    index, squeeze = _slices(x.shape, begin, end, stride, begin_mask, end_mask, squeeze_mask)
    out = x.copy()
    target_shape = out[index].shape
    out[index] = np.reshape(update, target_shape).astype(out.dtype)
    return out


def _matmul_fp16_rows(x: np.ndarray, b: torch.Tensor, rows: int = 512) -> np.ndarray:
    """``x @ b`` for a large FP16 ``x`` (attention probabilities [.., L, L]), converted to FP32 a
    block of rows at a time: the same products, but each block's FP32 copy stays in cache, where
    converting all of ``x`` first would stream [heads, L, L] FP32 through memory twice."""
    a = torch.from_numpy(np.ascontiguousarray(x))
    lead = a.shape[:-2]
    a3, b3 = a.reshape(-1, *a.shape[-2:]), b.expand(*lead, *b.shape[-2:]).reshape(-1, *b.shape[-2:])
    out = torch.empty(a3.shape[0], a3.shape[1], b3.shape[2], dtype=torch.float32)
    for i in range(a3.shape[0]):
        for start in range(0, a3.shape[1], rows):
            torch.matmul(a3[i, start:start + rows].float(), b3[i], out=out[i, start:start + rows])
    return out.reshape(*lead, *out.shape[-2:]).numpy()


# Up to this many rows, a matmul or linear computes one row at a time (:func:`_by_row`).
ROW_BY_ROW = 32


def _by_row(fn, a: torch.Tensor, *rest) -> torch.Tensor:
    """``fn(a, *rest)`` one row of ``a`` (its second-to-last axis) at a time when it has a few.

    A row's result must not depend on how many rows came with it: the verify function's S
    tokens must give, bit for bit, the logits S decode calls give (speculative decoding is
    exact only then: where the worker's greedy choice is a near-tie in FP16, a last-bit
    difference picks the other token). BLAS runs one row as a matrix-vector product and several
    as a blocked matrix product, whose sums are ordered, and so rounded, differently (verify's
    logits differed from decode's by up to 0.066, several FP16 ulps, when computed whole). So a
    few rows (decode's 1, verify's S, a short prefill) each run as decode's one row does; a
    long prefill stays one product. Core ML on device makes no such promise: see
    ``speculative.yaml``'s tie tolerance for the coreml backend."""
    rows = a.shape[-2] if a.dim() >= 2 else 1
    if a.dim() < 2 or rows == 1 or rows > ROW_BY_ROW:
        return fn(a, *rest)
    return torch.cat([fn(a[..., i:i + 1, :].contiguous(), *rest) for i in range(rows)], dim=-2)


def matmul(x, y, transpose_x=False, transpose_y=False):
    x = np.asarray(x)
    if x.dtype == np.float16 and x.ndim >= 3 and x.size > 1 << 22 and not transpose_x and np.asarray(y).ndim == x.ndim:
        b = _t(y)
        return _matmul_fp16_rows(x, b.transpose(-1, -2) if transpose_y else b)
    a, b = _t(x), _t(y)
    if transpose_x:
        a = a.transpose(-1, -2)
    if transpose_y:
        b = b.transpose(-1, -2)
    return _by_row(torch.matmul, a, b).numpy()


def linear(x, weight, bias=None):
    out = _by_row(torch.nn.functional.linear, _t(x), _t(weight), None if bias is None else _t(bias))
    return out.numpy()


def softmax(x, axis=-1):
    return torch.softmax(_t(x), dim=int(axis)).numpy()


def reduce(fn):
    def kernel(x, axes=None, keep_dims=False):
        return fn(_f32(x), axis=_axes(axes, x.ndim), keepdims=bool(keep_dims))
    return kernel


def cumsum(x, axis=0, exclusive=False, reverse=False):
    axis = int(axis)
    data = np.flip(x, axis) if reverse else x
    out = np.cumsum(data, axis=axis, dtype=x.dtype if x.dtype.kind in "iu" else np.float32)
    if exclusive:
        out = np.concatenate([np.zeros_like(np.take(out, [0], axis=axis)), np.delete(out, -1, axis=axis)], axis=axis)
    return np.flip(out, axis) if reverse else out


def concat(values, axis, interleave=False):
    if interleave:
        raise UnsupportedOpError("concat with interleave=True is not implemented by the reference executor")
    return np.concatenate([np.asarray(v) for v in values], axis=int(axis))


def gather(x, indices, axis=0, batch_dims=0, validate_indices=False):
    if int(batch_dims) != 0:
        raise UnsupportedOpError("gather with batch_dims != 0 is not implemented by the reference executor")
    indices = np.asarray(indices).astype(np.int64)
    indices = np.where(indices < 0, indices + x.shape[int(axis)], indices)
    return np.take(x, indices, axis=int(axis))


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-_f32(x)))


KERNELS = {
    "add": _binary(np.add, torch.add, exact_in_fp16=True),
    "sub": _binary(np.subtract, torch.sub, exact_in_fp16=True),
    "mul": _binary(np.multiply, torch.mul, exact_in_fp16=True),
    "real_div": _binary(np.divide, torch.div, exact_in_fp16=True),
    "pow": _binary(np.power),
    "maximum": _binary(np.maximum),
    "minimum": _binary(np.minimum),
    "equal": _binary(np.equal),
    "not_equal": _binary(np.not_equal),
    "less": _binary(np.less),
    "less_equal": _binary(np.less_equal),
    "greater": _binary(np.greater),
    "greater_equal": _binary(np.greater_equal),
    "logical_and": lambda x, y: np.logical_and(x, y),
    "logical_or": lambda x, y: np.logical_or(x, y),
    "logical_not": lambda x: np.logical_not(x),
    "rsqrt": lambda x, epsilon=1e-12: 1.0 / np.sqrt(_f32(x) + np.float32(epsilon)),
    "sqrt": lambda x: np.sqrt(_f32(x)),
    "exp": lambda x: np.exp(_f32(x)),
    "sigmoid": _sigmoid,
    "silu": lambda x: torch.nn.functional.silu(_t(x)).numpy(),
    "relu": lambda x: np.maximum(_f32(x), 0),
    "tanh": lambda x: np.tanh(_f32(x)),
    "reduce_mean": reduce(np.mean),
    "reduce_sum": reduce(np.sum),
    "reduce_max": reduce(np.max),
    "softmax": softmax,
    "matmul": matmul,
    "linear": linear,
    "reshape": lambda x, shape: np.reshape(x, tuple(int(d) for d in shape)),
    "transpose": lambda x, perm: np.transpose(x, tuple(int(p) for p in perm)),
    "expand_dims": lambda x, axes: np.expand_dims(x, tuple(int(a) for a in np.atleast_1d(axes))),
    "squeeze": lambda x, axes=None: np.squeeze(x, axis=_axes(axes, x.ndim)),
    "tile": lambda x, reps: np.tile(x, tuple(int(r) for r in reps)),
    "concat": concat,
    "select": lambda cond, a, b: np.where(cond, _f32(np.asarray(a)), _f32(np.asarray(b))),
    "gather": gather,
    "cumsum": cumsum,
    "slice_by_index": slice_by_index,
    "slice_update": slice_update,
    "identity": lambda x: x,
}
