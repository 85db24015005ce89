"""What the quantization recipe is resolved against: the student's modules that own weights,
and the names the converter gives their weights in the MIL program.

The recipe itself (rules, settings, resolution with typos as errors) is ``quant_recipe.yaml``'s
typed model, :mod:`kdcontracts.models.quant`.
"""

from __future__ import annotations

from typing import Iterable


def checkpoint_modules(weight_names: Iterable[str], tied_lm_head: bool) -> list[str]:
    """Module paths that own weights; with tied embeddings, ``lm_head`` stands for both."""
    modules = sorted({name.rsplit(".", 1)[0] for name in weight_names})
    if tied_lm_head:
        modules = sorted((set(modules) - {"model.embed_tokens"}) | {"lm_head"})
    return modules


def const_name(module: str, parameter: str = "weight") -> str:
    """The name the converter gives a module's weight in the MIL program (torch.export path)."""
    return f"p_student_{module.replace('.', '_')}_{parameter}_to_fp16"
