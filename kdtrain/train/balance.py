"""Gradient balance: per-loss gradient norms over the student's parameters, and an alert when
one term dominates.

Loss values say little about which term drives the update (a KL of 0.1 at tau=2 can push
harder than a CE of 3); the gradient each weighted term sends into the parameters says it
directly. Every ``balance.every_n_steps`` steps the trainer takes one backward pass per term
(:func:`measure`) instead of one for their sum: the per-term gradients are added into
``.grad``, so a measured step costs (terms - 1) extra backward passes and nothing else.

:class:`BalanceMonitor` keeps the last ``balance.window`` measurements and raises a
:class:`DominanceAlert` when the same term's norm exceeded every other active term's by
``balance.ratio`` in each of them. A single spiky step does not alert; a term that stays
dominant does. Terms with a zero gradient (nothing to supervise in the batch) are left out.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from kdtrain.errors import KDError


class BalanceError(KDError):
    """The smoke run's balance check failed: the real run does not start."""


@dataclass(frozen=True)
class DominanceAlert:
    step: int
    loss: str  # the dominating term
    runner_up: str
    ratio: float  # its norm over the runner-up's, the smallest over the window
    threshold: float
    window: int
    norms: dict[str, float]  # mean norm per term over the window

    def __str__(self) -> str:
        shown = ", ".join(f"{k}={v:.3g}" for k, v in sorted(self.norms.items(), key=lambda kv: -kv[1]))
        return (f"step {self.step}: loss {self.loss!r} dominates the gradient: its norm is {self.ratio:.1f}x "
                f"that of {self.runner_up!r} or more in each of the last {self.window} measurement(s) (threshold "
                f"{self.threshold:g}x); mean norms: {shown}")


def measure(terms: Mapping[str, torch.Tensor], params: Sequence[torch.nn.Parameter], accumulate: bool = True) -> dict[str, float]:
    """The L2 norm of each weighted term's gradient over ``params``.

    With ``accumulate`` the gradients are also added into each parameter's ``.grad``, so the
    caller does not backpropagate the sum again (single process). Under DDP the caller
    passes ``accumulate=False`` and runs its usual backward, which synchronises ranks.
    """
    norms = {}
    names = list(terms)
    for i, name in enumerate(names):
        grads = torch.autograd.grad(terms[name], params, retain_graph=i < len(names) - 1 or not accumulate, allow_unused=True)
        total = torch.zeros((), dtype=torch.float64)
        for param, grad in zip(params, grads):
            if grad is None:
                continue
            total += torch.linalg.vector_norm(grad.detach(), dtype=torch.float64).square().cpu()
            if accumulate:
                param.grad = grad.detach().clone() if param.grad is None else param.grad.add_(grad.detach())
        norms[name] = math.sqrt(float(total))
    return norms


def measure_sharded(terms: Mapping[str, torch.Tensor], params: Sequence[torch.nn.Parameter]) -> dict[str, float]:
    """:func:`measure` under FSDP2, where ``params`` are sharded DTensors that ``autograd.grad`` never reaches.

    Each term is backpropagated in turn as training does (FSDP2 reduce-scatters it into the
    sharded ``.grad``); its norm is that of what it added, summed over the ranks' shards. The
    gradients end up holding the sum of the terms, as one backward of the total would. The
    norm is of the ranks' mean gradient (DDP's :func:`measure` averages the ranks' norms).
    """
    import torch.distributed as dist

    def local(grad):
        if grad is None:
            return None
        return (grad.to_local() if hasattr(grad, "to_local") else grad).detach()

    norms: dict[str, float] = {}
    names = list(terms)
    before = [None] * len(params)
    for i, name in enumerate(names):
        terms[name].backward(retain_graph=i < len(names) - 1)
        now = [local(p.grad) for p in params]
        total = torch.zeros((), dtype=torch.float64)
        for old, new in zip(before, now):
            if new is not None:
                added = new if old is None else new - old
                total += torch.linalg.vector_norm(added, dtype=torch.float64).square().cpu()
        if dist.is_initialized():
            dist.all_reduce(total)
        norms[name] = math.sqrt(float(total))
        before = [g.clone() if g is not None else None for g in now]
    return norms


class BalanceMonitor:
    """The window of recent measurements and the dominance rule over it."""

    def __init__(self, ratio: float, window: int):
        self.ratio, self.window = ratio, window
        self.recent: deque[dict[str, float]] = deque(maxlen=window)
        self.alerts: list[DominanceAlert] = []

    def observe(self, step: int, norms: Mapping[str, float]) -> DominanceAlert | None:
        """Record one measurement; the alert if the same term dominated every one of a full window."""
        self.recent.append(dict(norms))
        if len(self.recent) < self.window:
            return None
        leaders = [_leader(m) for m in self.recent]
        if any(lead is None for lead in leaders) or len({lead[0] for lead in leaders}) != 1:
            return None
        if min(lead[2] for lead in leaders) < self.ratio:
            return None
        names = set.intersection(*(set(m) for m in self.recent))
        mean = {n: sum(m[n] for m in self.recent) / len(self.recent) for n in names}
        alert = DominanceAlert(step, leaders[-1][0], leaders[-1][1], min(lead[2] for lead in leaders), self.ratio, len(self.recent), mean)
        self.alerts.append(alert)
        return alert


def _leader(norms: Mapping[str, float]) -> tuple[str, str, float] | None:
    """(largest term, runner-up, their ratio) among the terms with a gradient; None below two."""
    active = sorted(((v, n) for n, v in norms.items() if v > 0), reverse=True)
    if len(active) < 2:
        return None
    (top, name), (second, runner) = active[:2]
    return name, runner, top / second
