"""The student's LM head as the losses read it: the log-normaliser and the logits at chosen ids.

Every loss needs the student's log-probabilities at a few ids per position (the label, the
teacher's top-k, EOS, ``<tool_call>``, the code-mode pair), some also the log-normaliser
``logsumexp_v(h . w_v)`` over the whole vocabulary; none needs the ``[tokens, vocab]``
logits themselves. :class:`ChunkedHead` computes both from the final hidden state and the
head weight without ever holding those logits:

- the normaliser loops over chunks of tokens (``chunk x vocab`` logits at a time, upcast
  to float32 per chunk), keeps only the hidden state, the weight and the ``[tokens]``
  result for backward, and recomputes each chunk's logits there (the fused
  linear-cross-entropy technique of Liger-Kernel and Apple's Cut Cross-Entropy);
- the logits at ids are ``[tokens, K]`` dot products, gathered one chunk of weight rows at
  a time, their weight gradient scattered back row by row.

We write it ourselves because torch 2.13 has no such op: ``F.cross_entropy`` fuses nothing
with the matmul, and the fused kernels (Liger, CCE) are CUDA/Triton-only and return a CE
loss, not the normaliser and arbitrary-id logits that top-k KD, length and the code-mode
preference read. The normaliser is computed once per head and shared by every loss.

:class:`DenseHead` gives the same interface over a logits tensor already materialised (the
tests' synthetic logits); :func:`as_head` is what each loss calls on its input, so every
loss accepts either.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Elements of the float32 [chunk, width] buffer one chunk works on: 32 MiB, so chunk = 170
# tokens at a vocabulary of 49k. Large enough that a chunk's matmul runs at full speed.
CHUNK_ELEMENTS = 1 << 23


def _chunk(width: int, chunk_tokens: int | None) -> int:
    return chunk_tokens or max(1, CHUNK_ELEMENTS // width)


def _upcast(dtype: torch.dtype) -> torch.dtype:
    """What the head's outputs are computed in: float32, or float64 for float64 inputs (gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


class _ChunkedLogSumExp(torch.autograd.Function):
    """[N] ``logsumexp(hidden @ weight.T)`` per row, one chunk of rows at a time.

    Backward: d lse / d logits = softmax, recomputed per chunk from the saved normaliser;
    rows whose incoming gradient is exactly zero (positions no loss reads: prompts,
    padding) contribute nothing and are skipped, as CCE skips ignored tokens."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, chunk: int) -> torch.Tensor:
        # hidden [N, H], weight [V, H]
        up = _upcast(weight.dtype)
        lse = torch.empty(hidden.shape[0], dtype=up, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            lse[start:start + chunk] = torch.logsumexp((hidden[start:start + chunk] @ weight.T).to(up), dim=-1)  # [c, V] -> [c]
        ctx.save_for_backward(hidden, weight, lse)
        ctx.chunk = chunk
        return lse

    @staticmethod
    def backward(ctx, grad_lse: torch.Tensor):
        hidden, weight, lse = ctx.saved_tensors
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        up = lse.dtype
        grad_weight = torch.zeros(weight.shape, dtype=up, device=weight.device) if ctx.needs_input_grad[1] else None
        rows = grad_lse.nonzero().squeeze(1)
        for start in range(0, rows.numel(), ctx.chunk):
            r = rows[start:start + ctx.chunk]
            h = hidden[r]  # [c, H]
            p = (h @ weight.T).to(up)  # [c, V] logits, recomputed
            p.sub_(lse[r, None]).exp_().mul_(grad_lse[r, None])  # softmax x incoming gradient
            if grad_hidden is not None:
                grad_hidden[r] = p.to(weight.dtype) @ weight
            if grad_weight is not None:
                grad_weight.addmm_(p.T, h.to(up))  # accumulated in float32 across chunks
        return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None


class _LogitsAt(torch.autograd.Function):
    """[N, K] ``hidden[n] . weight[ids[n, k]]`` without gathering W[ids] for all rows at once."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, chunk: int) -> torch.Tensor:
        # hidden [N, H], weight [V, H], ids [N, K] in [0, V)
        out = torch.empty(ids.shape, dtype=_upcast(weight.dtype), device=hidden.device)
        for start in range(0, ids.shape[0], chunk):
            rows = weight[ids[start:start + chunk]]  # [c, K, H]
            out[start:start + chunk] = torch.bmm(rows, hidden[start:start + chunk, :, None]).squeeze(-1).to(out.dtype)
        ctx.save_for_backward(hidden, weight, ids)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hidden, weight, ids = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=grad_out.dtype, device=weight.device) if ctx.needs_input_grad[1] else None
        for start in range(0, ids.shape[0], ctx.chunk):
            end = start + ctx.chunk
            g = grad_out[start:end].to(weight.dtype)  # [c, K]
            if grad_hidden is not None:
                grad_hidden[start:end] = torch.bmm(g[:, None, :], weight[ids[start:end]]).squeeze(1)
            if grad_weight is not None:
                outer = g[:, :, None] * hidden[start:end, None, :]  # [c, K, H]
                grad_weight.index_add_(0, ids[start:end].flatten(), outer.flatten(0, 1).to(grad_weight.dtype))
        return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None


class Head:
    """What the losses read: shapes, the normaliser, logits and log-probs at ids, a graph-connected zero."""

    shape: torch.Size  # [B, S, V]
    device: torch.device

    def logsumexp(self) -> torch.Tensor:
        """[B, S] log-normaliser (float32, or float64 for float64 inputs) over the vocabulary (computed once, then shared)."""
        raise NotImplementedError

    def logits_at(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, S, K] logits (the normaliser's dtype) at ``ids`` [B, S, K]; a negative id (none) reads 0 with no gradient."""
        raise NotImplementedError

    def full(self) -> torch.Tensor:
        """[B, S, V] logits, materialised (evaluation; the training losses never call it)."""
        raise NotImplementedError

    def zero(self) -> torch.Tensor:
        """A scalar 0 connected to everything the head reads: a batch with nothing to supervise still backpropagates (zeros)."""
        raise NotImplementedError

    def log_probs_at(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, S, K] log-probabilities at ``ids`` (negative ids: minus the normaliser, to be masked by the caller)."""
        return self.logits_at(ids) - self.logsumexp()[..., None]


class ChunkedHead(Head):
    """The head ``logits = hidden @ weight.T`` evaluated only where the losses read it."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, chunk_tokens: int | None = None):
        self.hidden, self.weight = hidden, weight  # [B, S, H], [V, H]
        self.shape = torch.Size((*hidden.shape[:-1], weight.shape[0]))
        self.device = hidden.device
        self.chunk_tokens = chunk_tokens  # None: sized by CHUNK_ELEMENTS
        self._lse: torch.Tensor | None = None

    def logsumexp(self) -> torch.Tensor:
        if self._lse is None:
            flat = self.hidden.flatten(0, -2)  # [N, H]
            lse = _ChunkedLogSumExp.apply(flat, self.weight, _chunk(self.shape[-1], self.chunk_tokens))
            self._lse = lse.view(self.shape[:-1])
        return self._lse

    def logits_at(self, ids: torch.Tensor) -> torch.Tensor:
        none = ids < 0
        flat = ids.clamp(min=0).flatten(0, -2)  # [N, K]
        chunk = _chunk(flat.shape[-1] * self.hidden.shape[-1], self.chunk_tokens)
        logits = _LogitsAt.apply(self.hidden.flatten(0, -2), self.weight, flat, chunk).view(ids.shape)
        return logits.masked_fill(none, 0.0)

    def full(self) -> torch.Tensor:
        return F.linear(self.hidden, self.weight)

    def zero(self) -> torch.Tensor:
        return (self.hidden.sum() + self.weight.sum()) * 0.0


class DenseHead(Head):
    """The same interface over materialised logits [B, S, V] (any dtype; read in float32 at least)."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits
        self.shape, self.device = logits.shape, logits.device
        self._lse: torch.Tensor | None = None

    def logsumexp(self) -> torch.Tensor:
        if self._lse is None:
            self._lse = torch.logsumexp(self.logits.to(_upcast(self.logits.dtype)), dim=-1)
        return self._lse

    def logits_at(self, ids: torch.Tensor) -> torch.Tensor:
        return self.logits.to(_upcast(self.logits.dtype)).gather(-1, ids.clamp(min=0)).masked_fill(ids < 0, 0.0)

    def full(self) -> torch.Tensor:
        return self.logits

    def zero(self) -> torch.Tensor:
        return self.logits.sum() * 0.0


def as_head(logits: Head | torch.Tensor) -> Head:
    """A loss's input as a :class:`Head`: a head as is, a logits tensor [B, S, V] wrapped."""
    return logits if isinstance(logits, Head) else DenseHead(logits)
