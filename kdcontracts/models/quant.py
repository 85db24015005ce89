"""``quant_recipe.yaml``: the per-submodule INT8 recipe, its calibration set and A/B bounds,
for every function and length that coreml_contract.json enumerates."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kdcontracts.families import load_sibling
from kdcontracts.models.coreml import CoreMLContract
from kdtrain.quant.recipe import Recipe


@dataclass(frozen=True)
class QuantContract:
    file: Path
    recipe: Recipe
    coreml: CoreMLContract  # the functions and lengths to check


def parse(path: Path, data: dict) -> QuantContract:
    return QuantContract(path, Recipe.from_json(data), load_sibling(path, "coreml_contract.json"))
