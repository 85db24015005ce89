"""Distillation losses: one module per loss with its mask logic, one registry, one signature.

Every entry of ``LOSSES`` is ``loss(batch: DistillBatch, out: StudentOutputs, cfg: LossConfig)
-> torch.Tensor`` (a scalar). The batch is built once by :func:`collate_distill`; the
student's outputs once by :func:`student_outputs`, its LM head read lazily (a
:class:`Head`: the losses ask for the log-normaliser and the logits at the ids they need);
the trainer weights and sums the terms its config names (:func:`weighted_sum`), which is
what the training loop calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from kdtrain.losses.batch import DistillBatch, collate_distill
from kdtrain.losses.ce import masked_ce, supervised_ce
from kdtrain.losses.code_mode import BETA, code_mode_loss, code_mode_mask, eligible_fraction
from kdtrain.losses.early_tool import DECAY, early_tool_loss
from kdtrain.losses.halt import halt_loss
from kdtrain.losses.head import ChunkedHead, DenseHead, Head
from kdtrain.losses.intermediate import HiddenProjection, intermediate_loss
from kdtrain.losses.kl import Direction, topk_kl
from kdtrain.losses.length import EXCESS, HORIZON, length_loss
from kdtrain.losses.outputs import StudentOutputs, student_outputs

__all__ = ["LOSSES", "ChunkedHead", "DenseHead", "DistillBatch", "Head", "HiddenProjection", "LossConfig", "LossFn", "StudentOutputs", "WeightedLoss",
           "code_mode_mask", "collate_distill", "eligible_fraction", "student_outputs", "weighted_sum"]


@dataclass(frozen=True)
class LossConfig:
    temperature: float = 1.0
    kl_direction: Direction = "forward"
    rest_bucket: bool = False
    length_excess: float = EXCESS
    length_horizon: float = HORIZON
    early_tool_decay: float = DECAY
    code_mode_beta: float = BETA


LossFn = Callable[[DistillBatch, StudentOutputs, LossConfig], torch.Tensor]


def _intermediate(batch: DistillBatch, out: StudentOutputs, cfg: LossConfig) -> torch.Tensor:
    if not out.layers or len(batch.teacher_hidden) != len(out.layers) or batch.hidden_mask is None:
        raise ValueError(f"intermediate loss: expected as many teacher hidden states (with hidden_mask) as projected student "
                         f"layers ({len(out.layers)}), found {len(batch.teacher_hidden)}: set them from a live teacher")
    return intermediate_loss(out.layers, batch.teacher_hidden, batch.hidden_mask)


LOSSES: dict[str, LossFn] = {
    "kl": lambda b, o, c: topk_kl(o.head, b.teacher_ids, b.teacher_logprobs, b.kd_mask, c.temperature, c.kl_direction, c.rest_bucket),
    "ce": lambda b, o, c: supervised_ce(o.head, b.labels),
    "tool_name": lambda b, o, c: masked_ce(o.head, b.labels, b.tool_name_mask),
    "tool_args": lambda b, o, c: masked_ce(o.head, b.labels, b.tool_args_mask),
    "tool_integration": lambda b, o, c: masked_ce(o.head, b.labels, b.integration_mask),
    "length": lambda b, o, c: length_loss(o.head, b.eos_id, b.turn_starts, b.turn_ends, c.length_excess, c.length_horizon),
    "halt": lambda b, o, c: halt_loss(o.halt, b.halt_targets, b.supervised),
    "early_tool_call": lambda b, o, c: early_tool_loss(o.head, b.call_id, b.turn_starts, b.call_positions, c.early_tool_decay),
    "code_mode": lambda b, o, c: code_mode_loss(o.head, b.eligible, b.decision_positions, b.chosen_ids, b.rejected_ids, c.code_mode_beta),
    "intermediate": _intermediate,
}


@dataclass(frozen=True)
class WeightedLoss:
    total: torch.Tensor  # sum of the weighted terms
    terms: dict[str, torch.Tensor]  # weight x loss per term, still in the graph: the balance check backpropagates each alone
    values: dict[str, float]  # each term's unweighted value, for the log


def weighted_sum(batch: DistillBatch, out: StudentOutputs, cfg: LossConfig, weights: Mapping[str, float]) -> WeightedLoss:
    """The named terms with a non-zero weight, weighted, and their sum (zero weights are not computed)."""
    unknown = sorted(set(weights) - set(LOSSES))
    if unknown:
        raise KeyError(f"loss weights: expected names among {sorted(LOSSES)}, found {unknown}")
    values = {name: LOSSES[name](batch, out, cfg) for name, w in weights.items() if w}
    terms = {name: weights[name] * value for name, value in values.items()}
    total = sum(terms.values(), start=out.hidden.new_zeros(()))
    return WeightedLoss(total, terms, {name: float(value.detach()) for name, value in values.items()})
