"""Distillation KL against the teacher's top-k (what the cache stores) or its full logits.

Top-k: the teacher distribution is ``softmax(top-k log-probs / tau)`` over its k ids,
renormalised; the teacher mass outside its top-k is dropped (with k = 8 it is small on
the confident tokens of tool calls and JSON, and unknown anyway once tempered). The student
is ``log_softmax(logits / tau)`` gathered at the same ids and, by default, renormalised over
them too: both sides are then distributions on one support, the loss is exactly 0 when the
student's logits equal the teacher's, and with k = vocabulary it is the full KL. What the
student puts outside the teacher's top-k is left to CE on the label.

``rest_bucket=True`` instead adds one "everything else" outcome on both sides, at tau = 1
from the raw log-probs (the teacher's tail mass is known exactly there), then tempers the
k + 1 outcomes together: the student is also taught how much mass to leave outside the
top-k, at the price of treating the tail as a single token under temperature.

Both are multiplied by tau**2 (Hinton et al.: the gradients of softened targets scale as
1 / tau**2) and averaged over aligned positions. The student is read through its head
(:mod:`kdtrain.losses.head`): the default reads k logits per position and no normaliser
(it cancels in the renormalisation); the rest bucket also reads the normaliser.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from kdtrain.losses.head import Head, as_head

Direction = Literal["forward", "reverse"]
# Excluded entries get a finite floor, never -inf: a row with no valid entry (an unaligned
# position) must give finite values whose gradient is masked to zero, not NaN.
FLOOR = -1.0e4


def _kl(log_p: torch.Tensor, log_q: torch.Tensor, valid: torch.Tensor, direction: Direction) -> torch.Tensor:
    """Per-position KL [...] over the last axis, entries outside ``valid`` excluded.

    forward = KL(teacher || student), mean-seeking: the student spreads mass over every
    teacher candidate; right when the teacher's alternatives are all acceptable (argument
    spellings, phrasings) and the student has the capacity to cover them.
    reverse = KL(student || teacher), mode-seeking (MiniLLM, GKD): the student may drop
    teacher modes but is punished for mass where the teacher has little; argue for it when
    the student is much smaller than the teacher and open-ended generation would otherwise
    wander into low-probability text between the modes it cannot all represent.
    """
    if direction == "reverse":
        log_p, log_q = log_q, log_p
    log_p = log_p.masked_fill(~valid, 0.0)
    log_q = log_q.masked_fill(~valid, 0.0)
    return (log_p.exp() * (log_p - log_q)).masked_fill(~valid, 0.0).sum(-1)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # values, mask: [B, S]; a batch without aligned positions contributes a graph-connected 0
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def topk_kl(
    logits: Head | torch.Tensor,  # [B, S, V] student logits
    teacher_ids: torch.Tensor,  # [B, S, K] student-vocabulary ids, -1 = none
    teacher_logprobs: torch.Tensor,  # [B, S, K]
    mask: torch.Tensor,  # [B, S] bool: aligned positions
    temperature: float = 1.0,
    direction: Direction = "forward",
    rest_bucket: bool = False,
) -> torch.Tensor:
    """Scalar: tau**2 * mean over aligned positions of KL between the top-k distributions."""
    tau = float(temperature)
    valid = (teacher_ids >= 0) & mask[..., None]  # [B, S, K]
    positions = valid.any(-1)  # [B, S]
    head = as_head(logits)
    t_lp = teacher_logprobs.float().masked_fill(~valid, FLOOR)  # [B, S, K]
    if rest_bucket:
        s_lp = head.log_probs_at(torch.where(valid, teacher_ids, -1)).masked_fill(~valid, FLOOR)  # [B, S, K]
        t_lp, valid = _with_rest(t_lp, valid), F.pad(valid, (0, 1), value=True)  # [B, S, K + 1]
        s_lp = _with_rest(s_lp, valid[..., :-1])
        log_p = torch.log_softmax(t_lp / tau, dim=-1)
        log_q = torch.log_softmax(s_lp / tau, dim=-1)
    else:
        log_p = torch.log_softmax(t_lp / tau, dim=-1)  # renormalised over the valid top-k
        s_lp = (head.logits_at(torch.where(valid, teacher_ids, -1)) / tau).masked_fill(~valid, FLOOR)
        log_q = torch.log_softmax(s_lp, dim=-1)  # == log_softmax(logits / tau) at ids, renormalised
    per_position = _kl(log_p, log_q, valid, direction)  # [B, S]
    return tau * tau * _masked_mean(per_position, positions)


def _with_rest(log_probs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[..., K] normalised log-probs -> [..., K + 1] with log(1 - sum) appended (clamped: tails of 0)."""
    inside = torch.logsumexp(log_probs, dim=-1, keepdim=True).clamp(max=-1e-6)
    rest = torch.log(-torch.expm1(inside)).clamp(min=-30.0)
    return torch.cat([log_probs, rest], dim=-1)


def full_kl(
    logits: Head | torch.Tensor,  # [B, S, V] student
    teacher_logits: torch.Tensor,  # [B, S, V] teacher, same vocabulary (or its shared prefix)
    mask: torch.Tensor,  # [B, S] bool
    temperature: float = 1.0,
    direction: Direction = "forward",
) -> torch.Tensor:
    """Scalar: tau**2 * mean over ``mask`` of KL between the full tempered distributions (materialises both)."""
    tau = float(temperature)
    v = teacher_logits.shape[-1]
    log_p = torch.log_softmax(teacher_logits.float() / tau, dim=-1)
    log_q = torch.log_softmax(as_head(logits).full()[..., :v].float() / tau, dim=-1)
    valid = mask[..., None].expand_as(log_p)
    return tau * tau * _masked_mean(_kl(log_p, log_q, valid, direction), mask)
