"""What the losses read from the student: its LM head (read lazily), the final hidden state,
halt probabilities, and optionally some layers projected into the teacher's hidden size.

One pass of the backbone (``StudentLM.model``: embeddings, layers, final norm) gives the
final hidden state that ``lm_head`` and the halt head read, as in ``kdtrain.export.programs``;
the selected decoder layers are taken with forward hooks on the same pass. ``lm_head`` is
not applied to every position: the losses read the log-normaliser and the logits at the
ids they need through :class:`kdtrain.losses.head.ChunkedHead`, so the ``[tokens, vocab]``
logits are never held; ``out.head.full()`` materialises them for evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdtrain.losses.head import ChunkedHead, Head
from kdtrain.losses.intermediate import HiddenProjection


@dataclass(frozen=True)
class StudentOutputs:
    head: Head  # the LM head over the final hidden state: logits [B, S, V], read lazily
    hidden: torch.Tensor  # [B, S, H] final hidden state after the norm
    halt: torch.Tensor  # [B, S] halt probability at each position
    layers: tuple[torch.Tensor, ...] = ()  # [B, S, Ht] per HiddenProjection pair, projected


def student_outputs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    projection: HiddenProjection | None = None) -> StudentOutputs:
    """One forward pass of a :class:`kdtrain.student.model.StudentLM`'s backbone with its hidden states."""
    captured: dict[int, torch.Tensor] = {}

    def keep(key):
        return lambda module, args, output: captured.__setitem__(key, output[0] if isinstance(output, tuple) else output)

    wanted = projection.student_layers if projection is not None else ()
    hooks = [model.model.layers[i].register_forward_hook(keep(i)) for i in wanted]
    try:
        hidden = model.model(input_ids, attention_mask)  # [B, S, H]
    finally:
        for hook in hooks:
            hook.remove()
    layers = projection([captured[i] for i in wanted]) if projection is not None else ()
    return StudentOutputs(ChunkedHead(hidden, model.lm_head.weight), hidden, model.halt_probability(hidden), layers)
