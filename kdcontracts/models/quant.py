"""``quant_recipe.yaml``: the per-submodule INT8 recipe, its calibration set and A/B bounds,
for every function and length that coreml_contract.json enumerates.

Every module gets exactly one setting: the rule whose pattern matches it, or the default
(keep FP16). A pattern that matches no module is an error (a typo would silently leave
weights in FP16), and so is a module that two rules claim with different settings."""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Iterable

from kdcontracts.families import load_sibling
from kdcontracts.models.coreml import CoreMLContract
from kdtrain.errors import ConfigError


@dataclass(frozen=True)
class Quantize:
    dtype: str
    granularity: str  # per_channel | per_tensor
    symmetric: bool

    def __str__(self) -> str:
        return f"{self.dtype} {self.granularity} {'symmetric' if self.symmetric else 'asymmetric'}"


@dataclass(frozen=True)
class Keep:
    dtype: str = "fp16"

    def __str__(self) -> str:
        return f"keep {self.dtype}"


Setting = Quantize | Keep


@dataclass(frozen=True)
class Rule:
    name: str
    pattern: str
    setting: Setting


@dataclass(frozen=True)
class Recipe:
    rules: tuple[Rule, ...]
    calibration: dict
    ab: dict

    @classmethod
    def from_json(cls, data: dict) -> "Recipe":
        rules = tuple(
            Rule(r["name"], r["pattern"], Quantize(**r["quantize"]) if "quantize" in r else Keep(r["keep"]))
            for r in data["rules"]
        )
        return cls(rules, dict(data["calibration"]), dict(data["ab"]))

    def resolve(self, modules: Iterable[str], file: str = "quant_recipe.yaml") -> dict[str, Setting]:
        """module path -> setting, or a ConfigError naming the rule and the module."""
        modules = list(modules)
        claims: dict[str, tuple[int, Setting]] = {}
        problems = []
        for i, rule in enumerate(self.rules):
            matched = [m for m in modules if fnmatchcase(m, rule.pattern)]
            if not matched:
                problems.append(f"{file}: at rules[{i}].pattern: expected a pattern matching at least one module of the student, "
                                f"found none matching {rule.pattern!r}")
            for module in matched:
                if module in claims and claims[module][1] != rule.setting:
                    j, other = claims[module]
                    problems.append(f"{file}: at rules[{i}]: expected one setting per module, found {module!r} claimed by "
                                    f"rules[{j}] ({other}) and rules[{i}] ({rule.setting})")
                claims.setdefault(module, (i, rule.setting))
        if problems:
            raise ConfigError("\n".join(problems))
        return {m: claims[m][1] if m in claims else Keep() for m in modules}


@dataclass(frozen=True)
class QuantContract:
    file: Path
    recipe: Recipe
    coreml: CoreMLContract  # the functions and lengths to check


def parse(path: Path, data: dict) -> QuantContract:
    return QuantContract(path, Recipe.from_json(data), load_sibling(path, "coreml_contract.json"))
