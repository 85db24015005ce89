"""Halt head: BCE of P(stop here) against the turn's end, on supervised positions.

The head reads the final (normed) hidden state at position ``t``, the one whose logits
predict token ``t + 1``; its target is 1 where that token is the EOS closing an
assistant turn and 0 at every other supervised position. It learns "the turn is complete
after what I have read", which the host can act on without sampling the end token.
Positive targets are one per turn: the mean is over all supervised positions, so the
head stays conservative (an early stop costs more than a late one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdtrain.losses.ce import zero_like_graph


def halt_loss(halt: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scalar: mean BCE over ``mask``. halt: probabilities [B, S]; targets: 0/1 [B, S]; mask: bool [B, S]."""
    if not mask.any():
        return zero_like_graph(halt)
    return F.binary_cross_entropy(halt[mask].float(), targets[mask].float())
