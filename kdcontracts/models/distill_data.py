"""``distill_data.yaml``: how the corpus is generated and how much of it may be malformed; which
teachers' targets may be trained on (names, versions, minimum top-k) and how many samples may
lack trusted targets. Which teacher fills the cache is the trainer config's, not this file's."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kdtrain.data.settings import CorpusSettings
from kdtrain.teacher.cache import Accept


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
