"""``manifest.json`` of a contract folder: where the artifacts folder is."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kdcontracts.loader import path_beside


@dataclass(frozen=True)
class ContractManifest:
    file: Path
    artifacts: Path  # as written, resolved against the contract folder


def parse(path: Path, data: dict) -> ContractManifest:
    return ContractManifest(path, path_beside(path, "artifacts", data["artifacts"]))
