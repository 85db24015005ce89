"""What every pipeline stage is handed: the artifacts folder and the contracts it builds towards."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from kdtrain.artifacts import ArtifactsFolder


@dataclass
class StageContext:
    """What a stage gets: the artifacts folder and the contract folder it builds towards."""

    folder: ArtifactsFolder
    contracts: Path
    distill_config: Path = Path("configs/distill_reference.yaml")  # the trainer's config (distill stage)

    @cached_property
    def config(self):
        """The distill config (:class:`kdtrain.train.config.DistillConfig`): its teacher and student sections
        say what the tokenizers, student and teacher stages build."""
        from kdtrain.train.config import load_config

        return load_config(self.distill_config)

    def contract(self, file_name: str) -> Any:
        """A contract file, schema-validated and typed by the contract language (:mod:`kdcontracts`)."""
        from kdcontracts.families import load

        return load(self.contracts / file_name)
