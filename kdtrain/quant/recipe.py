"""The quantization recipe, resolved against the student's modules.

Every module gets exactly one setting: the rule whose pattern matches it, or the default
(keep FP16). A pattern that matches no module is an error (a typo would silently leave
weights in FP16), and so is a module that two rules claim with different settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Iterable

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


def checkpoint_modules(weight_names: Iterable[str], tied_lm_head: bool) -> list[str]:
    """Module paths that own weights; with tied embeddings, ``lm_head`` stands for both."""
    modules = sorted({name.rsplit(".", 1)[0] for name in weight_names})
    if tied_lm_head:
        modules = sorted((set(modules) - {"model.embed_tokens"}) | {"lm_head"})
    return modules


def const_name(module: str, parameter: str = "weight") -> str:
    """The name the converter gives a module's weight in the MIL program (torch.export path)."""
    return f"p_student_{module.replace('.', '_')}_{parameter}_to_fp16"
