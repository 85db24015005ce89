"""Cross-entropy on the supervised labels: the assistant's own tokens, shifted already.

Labels are indexed by predicting position (``labels[:, t]`` is the token the logits at
``t`` predict) and ``IGNORE_INDEX`` elsewhere, so CE covers every supervised token, the
tags and positions without a teacher distribution included. ``masked_ce`` restricts it
further (tool names, arguments, integrated values): the same loss on fewer positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdtrain.data.chat import IGNORE_INDEX


def zero_like_graph(t: torch.Tensor) -> torch.Tensor:
    """A scalar 0 connected to ``t``: a batch with nothing to supervise still backpropagates (zeros)."""
    return t.sum() * 0.0


def supervised_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Scalar: mean CE over positions whose label is not IGNORE_INDEX. logits [B, S, V], labels [B, S]."""
    if not (labels != IGNORE_INDEX).any():
        return zero_like_graph(logits)
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)


def masked_ce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scalar: CE restricted to ``mask`` [B, S] (and to supervised labels), mean over those positions."""
    return supervised_ce(logits, labels.masked_fill(~mask, IGNORE_INDEX))
