"""Code-mode preference: at the first tool call of an eligible sample, prefer ``run_code``.

Only some tasks are better done by one ``run_code`` call whose Python calls the tools:
multi-step chains, large payloads that should stay out of the context, personal data that
should not pass through the model (``sample.meta.eligible.code_mode``). For those, at the
decision point (the position predicting the first token of the first call's tool name)
a reference-free, DPO-style logistic loss prefers the first token of ``run_code`` over
the first token of a direct tool name::

    -logsigmoid(beta * (log p(chosen) - log p(rejected)))

The rejected name is the direct tool the sample calls, or, when it already calls
``run_code``, the first tool its code calls. Everywhere else, ineligible samples included,
the weight is exactly zero, so they get exactly zero gradient from this term. A pair whose
two names start with the same token carries no preference and is dropped as well. The
log-normaliser cancels in the margin: only the two logits are read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdtrain.data.calls import CODE_TOOL, code_calls
from kdtrain.losses.head import Head, as_head
from kdtrain.losses.tool import CallSpans

BETA = 1.0


@dataclass(frozen=True)
class Decision:
    name_start: int  # character where the first call's tool name starts (rendered text)
    chosen: str  # run_code
    rejected: str  # the direct tool name


def decision(calls: list[tuple[int, CallSpans]]) -> Decision | None:
    """The code-mode decision of a sample from its tool calls (absolute spans), or None."""
    if not calls or calls[0][1].name is None:
        return None
    first = calls[0][1]
    rejected = first.tool
    if first.tool == CODE_TOOL:
        inner = [c.tool for c in code_calls(first.code or "", set(), "code") if c.tool and c.problem is None]
        rejected = inner[0] if inner else None
    return Decision(first.name[0], CODE_TOOL, rejected) if rejected else None


def first_token(tokenizer, name: str) -> int:
    """The student token that starts ``name`` where a call writes it (after ``"name": "``)."""
    prefix = '{"name": "'
    enc = tokenizer.encode(prefix + name + '"')
    return next(i for i, (start, end) in zip(enc.ids, enc.offsets) if end > len(prefix))


def code_mode_weights(eligible: torch.Tensor, positions: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """float [B]: 1 for an eligible sample with a decision whose two tokens differ, else exactly 0."""
    return (eligible & (positions >= 0) & (chosen != rejected)).float()


def code_mode_mask(batch) -> torch.Tensor:
    """float [B, S] for a DistillBatch: the weight at each sample's decision position, 0 everywhere else."""
    weights = code_mode_weights(batch.eligible, batch.decision_positions, batch.chosen_ids, batch.rejected_ids)  # [B]
    mask = torch.zeros(batch.input_ids.shape, device=weights.device)
    return mask.scatter(1, batch.decision_positions.clamp(min=0)[:, None], weights[:, None])


def code_mode_loss(
    logits: Head | torch.Tensor,  # [B, S, V]
    eligible: torch.Tensor,  # [B] bool
    positions: torch.Tensor,  # [B] decision position, -1 = none
    chosen: torch.Tensor,  # [B] first token of run_code
    rejected: torch.Tensor,  # [B] first token of the direct tool name
    beta: float = BETA,
) -> torch.Tensor:
    """Scalar: mean over weighted samples of -logsigmoid(beta * (log p(chosen) - log p(rejected)))."""
    head = as_head(logits)
    weights = code_mode_weights(eligible, positions, chosen, rejected)  # [B]
    if not weights.any():
        return head.zero()
    rows, at = torch.arange(len(positions), device=head.device), positions.clamp(min=0)
    ids = torch.full((*head.shape[:-1], 2), -1, device=head.device)  # [B, S, 2]: none but at the decisions
    ids[rows, at] = torch.stack([chosen, rejected], dim=-1)
    pair = head.logits_at(ids)[rows, at]  # [B, 2]
    margin = pair[:, 0] - pair[:, 1]  # log p(chosen) - log p(rejected)
    return (weights * -F.logsigmoid(beta * margin)).sum() / weights.sum()


def eligible_fraction(batch) -> float:
    """The share of a DistillBatch's samples the code-mode term may act on (for the trainer's log)."""
    return float(batch.eligible.float().mean()) if batch.eligible.numel() else 0.0
