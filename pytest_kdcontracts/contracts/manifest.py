"""``manifest.json`` of a contract folder: where the artifacts are; one check that they are there."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from pytest_kdcontracts.check import Check


@dataclass(frozen=True)
class ContractManifest:
    file: Path
    artifacts: Path  # as written, resolved against the contract folder


def parse(path: Path, data: dict) -> ContractManifest:
    return ContractManifest(path, (path.parent / data["artifacts"]).resolve())


def _artifacts_open(kd_artifacts) -> None:
    # kd_artifacts raises its ArtifactError on first use when the folder is missing or bad.
    kd_artifacts.manifest


def checks(contract: ContractManifest) -> Iterator[Check]:
    yield Check("artifacts_manifest", (), _artifacts_open, ("kd_artifacts",), doc="the artifacts folder has a valid manifest")
