"""Contract families: one module per contract file, each ``parse`` (typed) and ``checks``.

``contracts/<file>`` declares, ``pytest_kdcontracts/contracts/<family>.py`` verifies, and
``kdtrain/<stage>/`` produces: a reader who knows one family knows where the next lives.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from pytest_kdcontracts.loader import load_contract


@dataclass(frozen=True)
class Family:
    file_name: str
    schema: str
    mark: str
    module: str

    def _impl(self):
        return importlib.import_module(self.module)

    def load(self, path: Path) -> Any:
        """Schema-validate, then let the family type the document and check cross-references."""
        return self._impl().parse(path, load_contract(path, self.schema))

    def checks(self, contract: Any) -> Iterator:
        return self._impl().checks(contract)


FAMILIES: tuple[Family, ...] = (
    Family("manifest.json", "manifest.schema.json", "kdcontract", "pytest_kdcontracts.contracts.manifest"),
    Family("tokens.json", "tokens.schema.json", "tokens", "pytest_kdcontracts.contracts.tokens"),
    Family("coreml_contract.json", "coreml_contract.schema.json", "coreml", "pytest_kdcontracts.contracts.coreml"),
    Family("export_lint.yaml", "export_lint.schema.json", "export", "pytest_kdcontracts.contracts.export_lint"),
    Family("precision_islands.yaml", "precision_islands.schema.json", "coreml", "pytest_kdcontracts.contracts.islands"),
    Family("quant_recipe.yaml", "quant_recipe.schema.json", "quant", "pytest_kdcontracts.contracts.quant"),
    Family("tool_registry.json", "tool_registry.schema.json", "data", "pytest_kdcontracts.contracts.tool_registry"),
    Family("distill_data.yaml", "distill_data.schema.json", "data", "pytest_kdcontracts.contracts.distill_data"),
    Family("ablations.yaml", "ablations.schema.json", "ablations", "pytest_kdcontracts.contracts.ablations"),
)

MARKERS = {
    "kdcontract": "an item generated from a kdcontracts contract file",
    "tokens": "tokenizer contracts (tokens.json)",
    "export": "exported-graph lint (export_lint.yaml)",
    "coreml": "converted mlpackages: IO, islands, ANE residency (coreml_contract.json, precision_islands.yaml)",
    "golden": "golden vectors and prefill/decode consistency through the execution backend",
    "quant": "INT8 packages: recipe conformance, A/B against FP16, finite outputs (quant_recipe.yaml)",
    "data": "distillation data and teacher targets: tool registry, corpus versions and calls, corruption rate, logit cache (tool_registry.json, distill_data.yaml)",
    "ablations": "the trainer's canonical mini experiments against their stored baselines (ablations.yaml)",
}


def family_for(path: Path) -> Family | None:
    return next((f for f in FAMILIES if f.file_name == path.name), None)


def load_sibling(path: Path, file_name: str) -> Any:
    """A contract that another one depends on (the enumerated shapes live in coreml_contract.json)."""
    from pytest_kdcontracts.errors import ContractFileError, Problem

    sibling = path.parent / file_name
    if not sibling.is_file():
        raise ContractFileError(str(path), [Problem("(folder)", f"{file_name} beside it (it declares the enumerated shapes)", "no such file")])
    return family_for(sibling).load(sibling)
