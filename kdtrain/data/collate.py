"""Padding a batch of token sequences.

The attention mask comes from each sequence's *length*, never from comparing ids with the
pad id: SmolLM2's PAD is its EOS (id 2), and ``ids != pad_id`` would mask every real EOS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # [B, T] int64 (training); export casts to int32 at the boundary
    attention_mask: torch.Tensor  # [B, T] int64, 1 = real token, 0 = padding


def pad_batch(
    sequences: Sequence[Sequence[int]],
    pad_id: int,
    pad_to: int | None = None,
    side: Literal["right", "left"] = "right",
) -> Batch:
    if not sequences:
        raise ValueError("pad_batch: expected at least one sequence, found none")
    longest = max(len(s) for s in sequences)
    length = longest if pad_to is None else pad_to
    if length < longest:
        raise ValueError(f"pad_batch: expected pad_to >= the longest sequence ({longest}), found {pad_to}")
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        n = len(seq)
        cols = slice(0, n) if side == "right" else slice(length - n, length)
        ids[row, cols] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, cols] = 1
    return Batch(ids, mask)
