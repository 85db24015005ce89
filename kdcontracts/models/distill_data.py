"""``distill_data.yaml``: how the corpus is generated and how much of it may be malformed; which
teacher fills the cache (versions, mode, top-k) and how many samples may lack trusted targets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kdtrain.data.settings import CorpusSettings
from kdtrain.teacher.fill import TeacherSettings


@dataclass(frozen=True)
class DataContract:
    file: Path
    corpus: CorpusSettings
    teacher: TeacherSettings
    max_missing_ratio: float


def parse(path: Path, data: dict) -> DataContract:
    t = data["teacher"]
    teacher = TeacherSettings(t["name"], tuple(t["versions"]), t["mode"], t["top_k"], t["max_new_tokens"])
    return DataContract(path, CorpusSettings(**data["corpus"]), teacher, t["max_missing_ratio"])
