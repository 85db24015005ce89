"""``precision_islands.yaml``: ops that must run FP32 inside the FP16 program (the converter
keeps them FP32; the plugin checks every function and length that coreml_contract.json enumerates)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from kdcontracts.families import load_sibling
from kdcontracts.models.coreml import CoreMLContract


@dataclass(frozen=True)
class Island:
    name: str
    op_types: tuple[str, ...]
    name_pattern: str | None = None

    def matches(self, op_type: str, op_name: str) -> bool:
        return op_type in self.op_types and (self.name_pattern is None or re.search(self.name_pattern, op_name) is not None)


@dataclass(frozen=True)
class IslandsContract:
    file: Path
    islands: tuple[Island, ...]
    coreml: CoreMLContract  # the functions and lengths to check


def parse(path: Path, data: dict) -> IslandsContract:
    islands = tuple(Island(i["name"], tuple(i["op_types"]), i.get("name_pattern")) for i in data["islands"])
    return IslandsContract(path, islands, load_sibling(path, "coreml_contract.json"))
