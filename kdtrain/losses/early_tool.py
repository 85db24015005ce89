"""Early tool call: in a turn that calls a tool, push the call towards the turn's start.

Every token before ``<tool_call>`` (a preamble, a long think) is latency on device. At each
position from the turn's start to the one that predicts the call, the loss is
``-log p(<tool_call>)``, weighted ``decay ** (t - start)``: strongest where calling at once
was possible, weaker further in, where some reasoning may have been needed. The weighted
sum is normalised by the weights per turn and averaged over turns with a call; turns
without a call contribute nothing.
"""

from __future__ import annotations

import torch

from kdtrain.losses.head import Head, as_head
from kdtrain.losses.length import turn_membership

DECAY = 0.9


def early_tool_loss(
    logits: Head | torch.Tensor,  # [B, S, V]
    call_id: int,  # <tool_call> in the student vocabulary
    starts: torch.Tensor,  # [B, T] first predicting position of each assistant turn, -1 = none
    calls: torch.Tensor,  # [B, T] position predicting the turn's first <tool_call>, -1 = no call
    decay: float = DECAY,
) -> torch.Tensor:
    """Scalar: mean over turns with a call of the distance-weighted mean of -log p(<tool_call>)."""
    head = as_head(logits)
    with_call = (calls >= 0) & (starts >= 0)  # [B, T]
    if not with_call.any():
        return head.zero()
    length = head.shape[1]
    member = turn_membership(starts.masked_fill(~with_call, -1), calls, length)  # [B, T, S]
    distance = torch.arange(length, device=head.device) - starts[..., None]  # [B, T, S]
    weight = torch.where(member, decay ** distance.clamp(min=0).float(), 0.0)
    call = torch.full((*head.shape[:-1], 1), call_id, device=head.device)
    nll = -head.log_probs_at(call)[..., 0]  # [B, S]
    per_turn = (weight * nll[:, None, :]).sum(-1) / weight.sum(-1).clamp(min=1e-12)  # [B, T]
    return per_turn[with_call].mean()
