"""``manifest.json`` of a contract folder: one check that the artifacts folder it names is there."""

from __future__ import annotations

from typing import Iterator

from kdcontracts.models.manifest import ContractManifest
from pytest_kdcontracts.check import Check


def _artifacts_open(kd_artifacts) -> None:
    # kd_artifacts raises its ArtifactError on first use when the folder is missing or bad.
    kd_artifacts.manifest


def checks(contract: ContractManifest) -> Iterator[Check]:
    yield Check("artifacts_manifest", (), _artifacts_open, ("kd_artifacts",), doc="the artifacts folder has a valid manifest")
