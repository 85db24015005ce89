"""How the reference corpus is built and validated (``corpus`` in ``distill_data.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class CorpusSettings:
    samples_per_scenario: int = 6
    seed: int = 1234
    noise: float = 0.0  # fraction of samples given a malformed tool call on purpose
    on_invalid: Literal["drop", "mark"] = "drop"
    max_corruption_rate: float = 0.0
