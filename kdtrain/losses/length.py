"""Length-aware KD: penalise an expected answer longer than the teacher's, differentiably.

Under teacher forcing the student's end-of-turn probability at each step of a turn is a
hazard ``h_i = p(EOS | prefix_i)``. Stopping first at step ``i`` has probability
``h_i * prod_{j<i} (1 - h_j)``, so the expected length (end token included) is the sum of
survival probabilities ``E[N] = sum_i S_i`` with ``S_i = prod_{j<i} (1 - h_j)``.

The hazards are only known along the teacher's L tokens. The estimator assumes that past
the teacher's end the student keeps the hazard it has at the teacher's last step
(``h_{L-1}``, where the teacher stops) and that decoding stops at ``horizon * L`` tokens:
``E[N] = sum_{i<L} S_i + S_L * (1 - (1 - h_{L-1})**m) / h_{L-1}``, ``m = (horizon - 1) * L``.
A student that ends where the teacher does has ``E[N] ~ L``; one that never ends has
``horizon * L``. The loss is ``relu(E[N] - (1 + excess) * L) / L`` per turn, mean over turns:
exactly zero (with zero gradient) within the threshold. Ending early is CE's business.
"""

from __future__ import annotations

import torch

from kdtrain.losses.head import Head, as_head

EXCESS = 0.15
HORIZON = 4.0
MAX_HAZARD = 1.0 - 1e-6  # log(1 - h) stays finite


def turn_membership(starts: torch.Tensor, ends: torch.Tensor, length: int) -> torch.Tensor:
    """bool [B, T, S]: position s belongs to turn k (starts <= s <= ends; -1 starts are empty)."""
    pos = torch.arange(length, device=starts.device)
    return (pos >= starts[..., None]) & (pos <= ends[..., None]) & (starts[..., None] >= 0)


def expected_length(eos_logprob: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor, horizon: float = HORIZON) -> torch.Tensor:
    """[B, T] expected tokens per turn. eos_logprob [B, S]; starts, ends [B, T] predicting positions, -1 = no turn."""
    member = turn_membership(starts, ends, eos_logprob.shape[1]).float()  # [B, T, S]
    hazard = eos_logprob.float().exp().clamp(max=MAX_HAZARD)  # [B, S]
    log_keep = torch.log1p(-hazard)[:, None, :] * member  # [B, T, S]
    through = log_keep.cumsum(-1)  # log S_{i+1}: survival through step i
    survival = (through - log_keep).exp() * member  # S_i: survival before step i
    teacher_len = member.sum(-1)  # [B, T]
    h_end = hazard.gather(1, ends.clamp(min=0)).clamp(min=1e-12)  # [B, T] hazard at the teacher's last step
    after = (horizon - 1.0) * teacher_len
    tail = log_keep.sum(-1).exp() * -torch.expm1(after * torch.log1p(-h_end)) / h_end
    return survival.sum(-1) + tail


def length_loss(
    logits: Head | torch.Tensor,  # [B, S, V]
    eos_id: int,
    starts: torch.Tensor,  # [B, T] first predicting position of each assistant turn, -1 = none
    ends: torch.Tensor,  # [B, T] position predicting the turn's closing EOS
    excess: float = EXCESS,
    horizon: float = HORIZON,
) -> torch.Tensor:
    """Scalar: mean over turns of the relative overrun beyond (1 + excess) x the teacher's length."""
    head = as_head(logits)
    valid = starts >= 0  # [B, T]
    if not valid.any():
        return head.zero()
    eos = torch.full((*head.shape[:-1], 1), eos_id, device=head.device)
    eos_logprob = head.log_probs_at(eos)[..., 0]  # [B, S]
    teacher_len = (ends - starts + 1).clamp(min=1).float()
    overrun = torch.relu(expected_length(eos_logprob, starts, ends, horizon) - (1.0 + excess) * teacher_len) / teacher_len
    return overrun[valid].mean()
