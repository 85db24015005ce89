"""What the losses read from the student: logits, the final hidden state, halt probabilities,
and optionally some layers projected into the teacher's hidden size.

``StudentLM.forward`` returns logits only (its signature is the export's); the hidden states
are taken with forward hooks on the same pass: the final norm's output (what ``lm_head``
and the halt head read, as in ``kdtrain.export.programs``) and the selected decoder layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdtrain.losses.intermediate import HiddenProjection


@dataclass(frozen=True)
class StudentOutputs:
    logits: torch.Tensor  # [B, S, V]
    hidden: torch.Tensor  # [B, S, H] final hidden state after the norm
    halt: torch.Tensor  # [B, S] halt probability at each position
    layers: tuple[torch.Tensor, ...] = ()  # [B, S, Ht] per HiddenProjection pair, projected


def student_outputs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    projection: HiddenProjection | None = None) -> StudentOutputs:
    """One forward pass of a :class:`kdtrain.student.model.StudentLM` with its hidden states."""
    captured: dict[object, torch.Tensor] = {}

    def keep(key):
        return lambda module, args, output: captured.__setitem__(key, output[0] if isinstance(output, tuple) else output)

    wanted = projection.student_layers if projection is not None else ()
    hooks = [model.model.norm.register_forward_hook(keep("final"))]
    hooks += [model.model.layers[i].register_forward_hook(keep(i)) for i in wanted]
    try:
        logits = model(input_ids, attention_mask)
    finally:
        for hook in hooks:
            hook.remove()
    hidden = captured["final"]
    layers = projection([captured[i] for i in wanted]) if projection is not None else ()
    return StudentOutputs(logits, hidden, model.halt_probability(hidden), layers)
