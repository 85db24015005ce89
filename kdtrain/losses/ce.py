"""Cross-entropy on the supervised labels: the assistant's own tokens, shifted already.

Labels are indexed by predicting position (``labels[:, t]`` is the token the logits at
``t`` predict) and ``IGNORE_INDEX`` elsewhere, so CE covers every supervised token, the
tags and positions without a teacher distribution included. ``masked_ce`` restricts it
further (tool names, arguments, integrated values): the same loss on fewer positions.
Each position's CE is ``logsumexp - logit[label]`` read from the student's head
(:mod:`kdtrain.losses.head`): the normaliser is computed once and shared by every CE term.
"""

from __future__ import annotations

import torch

from kdtrain.data.chat import IGNORE_INDEX
from kdtrain.losses.head import Head, as_head


def zero_like_graph(t: torch.Tensor) -> torch.Tensor:
    """A scalar 0 connected to ``t``: a batch with nothing to supervise still backpropagates (zeros)."""
    return t.sum() * 0.0


def supervised_ce(logits: Head | torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Scalar: mean CE over positions whose label is not IGNORE_INDEX. logits [B, S, V], labels [B, S]."""
    head = as_head(logits)
    labelled = labels != IGNORE_INDEX
    if not labelled.any():
        return head.zero()
    nll = -head.log_probs_at(labels[..., None])[..., 0]  # [B, S]; IGNORE_INDEX (negative) reads no logit
    return nll[labelled].mean()


def masked_ce(logits: Head | torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scalar: CE restricted to ``mask`` [B, S] (and to supervised labels), mean over those positions."""
    return supervised_ce(logits, labels.masked_fill(~mask, IGNORE_INDEX))
