"""Optional intermediate-layer matching: MSE between student and teacher hidden states.

Only where both models have read exactly the same text: the student token and the teacher
token end at the same character with the same span (``kdtrain.losses.align.match_spans``).
When hidden sizes differ, a learned linear projection maps the student's layer into the
teacher's size (FitNets); the projections live in :class:`HiddenProjection`, an
``nn.Module`` the trainer owns, optimises with the student, and drops at export.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from kdtrain.losses.align import match_spans
from kdtrain.losses.ce import zero_like_graph


class HiddenProjection(nn.Module):
    """Student layer i -> teacher layer j pairs, each with its projection (identity when sizes agree)."""

    def __init__(self, pairs: Sequence[tuple[int, int]], student_size: int, teacher_size: int):
        super().__init__()
        self.student_layers = tuple(s for s, _ in pairs)
        self.teacher_layers = tuple(t for _, t in pairs)
        self.projections = nn.ModuleList(
            nn.Identity() if student_size == teacher_size else nn.Linear(student_size, teacher_size, bias=False) for _ in pairs
        )

    def forward(self, hidden: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """hidden: the selected student layers, each [B, S, Hs] -> each [B, S, Ht]."""
        return tuple(proj(h) for proj, h in zip(self.projections, hidden, strict=True))


def gather_teacher_hidden(
    teacher_hidden: torch.Tensor,  # [B, T, Ht] one teacher layer over its own tokens
    student_offsets: torch.Tensor,  # [B, S, 2] student tokens' character spans
    teacher_offsets: Sequence[Sequence[tuple[int, int]]],  # per sample, the teacher tokens' spans
) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher states at student token positions [B, S, Ht], mask [B, S] bool: a teacher token has the same span).

    Indexed by token, not by predicting position: both hidden states have read the same text.
    """
    index = torch.stack([
        torch.from_numpy(match_spans(student.tolist(), teacher)) for student, teacher in zip(student_offsets, teacher_offsets, strict=True)
    ]).to(teacher_hidden.device)  # [B, S]
    mask = index >= 0
    gathered = teacher_hidden.gather(1, index.clamp(min=0)[..., None].expand(-1, -1, teacher_hidden.shape[-1]))
    return gathered * mask[..., None], mask


def intermediate_loss(
    student_hidden: Sequence[torch.Tensor],  # each [B, S, Ht], projected
    teacher_hidden: Sequence[torch.Tensor],  # each [B, S, Ht], on student positions
    mask: torch.Tensor,  # [B, S] bool
) -> torch.Tensor:
    """Scalar: MSE over masked positions and features, mean over layer pairs."""
    if not mask.any():
        return zero_like_graph(student_hidden[0])
    per_layer = [((s.float() - t.float()) ** 2)[mask].mean() for s, t in zip(student_hidden, teacher_hidden, strict=True)]
    return torch.stack(per_layer).mean()
