"""The contract families: one row per contract file, read the same way by kdtrain and the plugin.

A family's ``name`` is the module that types it (``kdcontracts/models/<name>.py``) and the
module that checks it (``pytest_kdcontracts/contracts/<name>.py``): one table, both sides.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdcontracts.errors import ContractFileError, Problem
from kdcontracts.loader import load_contract


@dataclass(frozen=True)
class Family:
    name: str  # kdcontracts.models.<name>, pytest_kdcontracts.contracts.<name>
    file_name: str
    schema: str
    mark: str  # the pytest marker its items carry

    def load(self, path: Path) -> Any:
        """Schema-validate, then let the family's model type the document and check cross-references."""
        model = importlib.import_module(f"kdcontracts.models.{self.name}")
        return model.parse(path, load_contract(path, self.schema))


FAMILIES: tuple[Family, ...] = (
    Family("manifest", "manifest.json", "manifest.schema.json", "kdcontract"),
    Family("tokens", "tokens.json", "tokens.schema.json", "tokens"),
    Family("coreml", "coreml_contract.json", "coreml_contract.schema.json", "coreml"),
    Family("export_lint", "export_lint.yaml", "export_lint.schema.json", "export"),
    Family("islands", "precision_islands.yaml", "precision_islands.schema.json", "coreml"),
    Family("quant", "quant_recipe.yaml", "quant_recipe.schema.json", "quant"),
    Family("tool_registry", "tool_registry.json", "tool_registry.schema.json", "data"),
    Family("distill_data", "distill_data.yaml", "distill_data.schema.json", "data"),
    Family("ablations", "ablations.yaml", "ablations.schema.json", "ablations"),
    Family("gates", "gates.yaml", "gates.schema.json", "gates"),
    Family("runtime_budget", "runtime_budget.yaml", "runtime_budget.schema.json", "runtime"),
    Family("judge", "judge.yaml", "judge.schema.json", "judge"),
    Family("speculative", "speculative.yaml", "speculative.schema.json", "speculative"),
)


def family_for(path: Path) -> Family | None:
    return next((f for f in FAMILIES if f.file_name == path.name), None)


def load(path: Path) -> Any:
    """Any contract file, typed by its family; an unknown file name is a located error too."""
    family = family_for(path)
    if family is None:
        known = sorted(f.file_name for f in FAMILIES)
        raise ContractFileError(str(path), [Problem("(file name)", f"one of {known}", repr(path.name))])
    return family.load(path)


def load_sibling(path: Path, file_name: str) -> Any:
    """A contract that another one depends on (the enumerated shapes live in coreml_contract.json)."""
    sibling = path.parent / file_name
    if not sibling.is_file():
        raise ContractFileError(str(path), [Problem("(folder)", f"{file_name} beside it (it declares the enumerated shapes)", "no such file")])
    return family_for(sibling).load(sibling)
