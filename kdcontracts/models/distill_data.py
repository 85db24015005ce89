"""``distill_data.yaml``: how the corpus is generated and how much of it may be malformed; which
teachers' targets may be trained on (names, versions, minimum top-k) and how many samples may
lack trusted targets. Which teacher fills the cache is the trainer config's, not this file's.

:class:`CorpusSettings` and :class:`Accept` are defined here, by the contract, so the trainer
(``kdtrain data``, the teacher cache) and the plugin read one type without importing each other."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal


@dataclass(frozen=True)
class CorpusSettings:
    """How the reference corpus is built and validated (``corpus``)."""

    samples_per_scenario: int = 6
    seed: int = 1234
    noise: float = 0.0  # fraction of samples given a malformed tool call on purpose
    on_invalid: Literal["drop", "mark"] = "drop"
    max_corruption_rate: float = 0.0


@dataclass(frozen=True)
class Accept:
    """What a reader accepts: this teacher, at one of these versions."""

    name: str
    versions: tuple[str, ...]

    def __contains__(self, teacher) -> bool:
        """``teacher``: anything with a ``name`` and a ``version`` (a cache entry's TeacherId)."""
        return teacher.name == self.name and teacher.version in self.versions

    def __str__(self) -> str:
        return f"{self.name} at {' or '.join(self.versions)}"


@dataclass(frozen=True)
class DataContract:
    file: Path
    corpus: CorpusSettings
    accept: Accept  # the teachers whose targets may be trained on
    min_top_k: int
    max_missing_ratio: float


def parse(path: Path, data: dict) -> DataContract:
    t = data["teacher"]
    return DataContract(path, CorpusSettings(**data["corpus"]), Accept(t["name"], tuple(t["versions"])), t["min_top_k"],
                        t["max_missing_ratio"])
