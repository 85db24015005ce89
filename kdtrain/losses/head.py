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
- the logits at ids are ``[tokens, K]`` dot products on the positions that have an id,
  gathered one chunk of weight rows at a time;
- every read's weight gradient (the normaliser's dense one, the ids' rows) is summed into
  one ``[vocab, H]`` gradient per backward pass (:class:`_WeightGradient`), so a loss set
  that reads the head more often (KD: the teacher's top-k besides the label) costs no more
  memory than CE and little more time.

We write it ourselves because torch 2.13 has no such op: ``F.cross_entropy`` fuses nothing
with the matmul, and the fused kernels (Liger, CCE) are CUDA/Triton-only and return a CE
loss, not the normaliser and arbitrary-id logits that top-k KD, length and the code-mode
preference read. The normaliser is computed once per head and shared by every loss.

:class:`DenseHead` gives the same interface over a logits tensor already materialised (the
tests' synthetic logits); :func:`as_head` is what each loss calls on its input, so every
loss accepts either.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

# Elements of the float32 [chunk, width] buffer one chunk works on: 32 MiB, so chunk = 170
# tokens at a vocabulary of 49k. Large enough that a chunk's matmul runs at full speed.
CHUNK_ELEMENTS = 1 << 23


def _chunk(width: int, chunk_tokens: int | None) -> int:
    return chunk_tokens or max(1, CHUNK_ELEMENTS // width)


def _upcast(dtype: torch.dtype) -> torch.dtype:
    """What the head's outputs are computed in: float32, or float64 for float64 inputs (gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


class _WeightGradient:
    """What one head's reads leave for the weight during a backward pass, summed once at its end.

    Each read returning its own ``[V, H]`` gradient would cost a zero-filled buffer and an
    accumulation per read: a KD step reads the head more often than a CE step (the teacher's
    top-k besides the label), and those passes over the weight were most of its overhead.
    Here the normaliser leaves its dense gradient, the reads their ``[rows, H]`` updates and
    the ids they go to; :class:`_Route`'s backward, which autograd runs after every read
    (each takes the route's output as an input), adds them into one buffer."""

    def __init__(self):
        self.dense: torch.Tensor | None = None
        self.ids: list[torch.Tensor] = []
        self.rows: list[torch.Tensor] = []

    def take(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        grad = self.dense if self.dense is not None else torch.zeros(shape, dtype=_upcast(dtype), device=device)
        if self.ids:
            grad.index_add_(0, torch.cat(self.ids), torch.cat(self.rows).to(grad.dtype))
        self.dense, self.ids, self.rows = None, [], []  # the next backward pass (retain_graph) starts empty
        return grad.to(dtype)


def _reaches_weight(ctx) -> bool:
    """Whether this backward pass runs the head's route: a pass that asks for other inputs only
    (``torch.autograd.grad(loss, hidden)``) skips it and must leave nothing in the sink."""
    return ctx.needs_input_grad[2] and torch._C._will_engine_execute_node(ctx.route)  # as torch.utils.checkpoint asks


class _Route(torch.autograd.Function):
    """A 0-dim anchor every read of one head takes as an input; backward hands the weight what they left."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, sink: _WeightGradient) -> torch.Tensor:
        ctx.sink, ctx.shape, ctx.dtype, ctx.device = sink, weight.shape, weight.dtype, weight.device
        return torch.zeros((), dtype=weight.dtype, device=weight.device)

    @staticmethod
    @once_differentiable
    def backward(ctx, _):
        return ctx.sink.take(ctx.shape, ctx.dtype, ctx.device), None


class _ChunkedLogSumExp(torch.autograd.Function):
    """[N] ``logsumexp(hidden @ weight.T)`` per row, one chunk of rows at a time.

    Backward: d lse / d logits = softmax, recomputed per chunk from the saved normaliser;
    rows whose incoming gradient is exactly zero (positions no loss reads: prompts,
    padding) contribute nothing and are skipped, as CCE skips ignored tokens. The weight's
    gradient goes to the head's :class:`_WeightGradient`, accumulated in float32."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, anchor: torch.Tensor, sink: _WeightGradient,
                chunk: int) -> torch.Tensor:
        # hidden [N, H], weight [V, H] (detached: its gradient goes through anchor)
        up = _upcast(weight.dtype)
        lse = torch.empty(hidden.shape[0], dtype=up, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            lse[start:start + chunk] = torch.logsumexp((hidden[start:start + chunk] @ weight.T).to(up), dim=-1)  # [c, V] -> [c]
        ctx.save_for_backward(hidden, weight, lse)
        ctx.sink, ctx.route, ctx.chunk = sink, anchor.grad_fn, chunk
        return lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_lse: torch.Tensor):
        hidden, weight, lse = ctx.saved_tensors
        up = lse.dtype
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=up, device=weight.device) if _reaches_weight(ctx) else None
        rows = grad_lse.nonzero().squeeze(1)
        for start in range(0, rows.numel(), ctx.chunk):
            r = rows[start:start + ctx.chunk]
            h = hidden[r]  # [c, H]
            p = (h @ weight.T).to(up)  # [c, V] logits, recomputed
            p.sub_(lse[r, None]).exp_().mul_(grad_lse[r, None])  # softmax x incoming gradient
            if grad_hidden is not None:
                grad_hidden[r] = p.to(weight.dtype) @ weight
            if grad_weight is not None:
                grad_weight.addmm_(p.T, h.to(up))
        if grad_weight is not None:
            ctx.sink.dense = grad_weight if ctx.sink.dense is None else ctx.sink.dense.add_(grad_weight)
        return grad_hidden, None, None, None, None


class _LogitsAt(torch.autograd.Function):
    """[N, K] ``hidden[n] . weight[ids[n, k]]`` on the rows listed in ``rows`` (0 elsewhere),
    without gathering W[ids] for all of them at once; the weight's gradient goes to the sink as rows."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, anchor: torch.Tensor, sink: _WeightGradient,
                ids: torch.Tensor, rows: torch.Tensor, chunk: int) -> torch.Tensor:
        # hidden [N, H], weight [V, H] (detached), ids [N, K] in [0, V), rows [M] the rows read
        out = torch.zeros(ids.shape, dtype=_upcast(weight.dtype), device=hidden.device)
        for start in range(0, rows.numel(), chunk):
            r = rows[start:start + chunk]
            gathered = weight[ids[r]]  # [c, K, H]
            out[r] = torch.bmm(gathered, hidden[r, :, None]).squeeze(-1).to(out.dtype)
        ctx.save_for_backward(hidden, weight, ids, rows)
        ctx.sink, ctx.route, ctx.chunk = sink, anchor.grad_fn, chunk
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        hidden, weight, ids, rows = ctx.saved_tensors
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        to_weight = _reaches_weight(ctx)
        for start in range(0, rows.numel(), ctx.chunk):
            r = rows[start:start + ctx.chunk]
            g = grad_out[r]  # [c, K]
            if grad_hidden is not None:
                grad_hidden[r] = torch.bmm(g[:, None, :].to(weight.dtype), weight[ids[r]]).squeeze(1)
            if to_weight:
                ctx.sink.ids.append(ids[r].flatten())
                ctx.sink.rows.append((g[:, :, None] * hidden[r, None, :].to(g.dtype)).flatten(0, 1))  # [c * K, H]
        return grad_hidden, None, None, None, None, None, None


class Head(ABC):
    """What the losses read: shapes, the normaliser, logits and log-probs at ids, a graph-connected zero."""

    shape: torch.Size  # [B, S, V]
    device: torch.device

    @abstractmethod
    def logsumexp(self) -> torch.Tensor:
        """[B, S] log-normaliser (float32, or float64 for float64 inputs) over the vocabulary (computed once, then shared)."""

    @abstractmethod
    def logits_at(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, S, K] logits (the normaliser's dtype) at ``ids`` [B, S, K]; a negative id (none) reads 0 with no gradient."""

    @abstractmethod
    def full(self) -> torch.Tensor:
        """[B, S, V] logits, materialised (evaluation; the training losses never call it)."""

    @abstractmethod
    def zero(self) -> torch.Tensor:
        """A scalar 0 connected to everything the head reads: a batch with nothing to supervise still backpropagates (zeros)."""

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
        # every read's weight gradient goes through one route: one [V, H] gradient per backward pass
        self._sink = _WeightGradient()
        self._anchor = _Route.apply(weight, self._sink)

    def logsumexp(self) -> torch.Tensor:
        if self._lse is None:
            chunk = _chunk(self.shape[-1], self.chunk_tokens)
            lse = _ChunkedLogSumExp.apply(self.hidden.flatten(0, -2), self.weight.detach(), self._anchor, self._sink, chunk)
            self._lse = lse.view(self.shape[:-1])
        return self._lse

    def logits_at(self, ids: torch.Tensor) -> torch.Tensor:
        none = ids < 0
        flat = ids.flatten(0, -2)  # [N, K]
        rows = (flat >= 0).any(-1).nonzero().squeeze(1)  # positions with something to read
        chunk = _chunk(flat.shape[-1] * self.hidden.shape[-1], self.chunk_tokens)
        logits = _LogitsAt.apply(self.hidden.flatten(0, -2), self.weight.detach(), self._anchor, self._sink,
                                 flat.clamp(min=0), rows, chunk)
        return logits.view(ids.shape).masked_fill(none, 0.0)

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
