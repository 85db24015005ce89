"""The distillation corpus: typed samples, one folder on disk, and the reference corpus.

A corpus folder holds ``corpus.jsonl`` (one sample per line, sorted keys) and ``corpus.json``
(dataset version, tool-schema and orchestrator versions, seed, sample count, SHA-256 of the
lines). Every sample records the versions it was written against, so that data from an older
tool schema is migrated or refused instead of teaching the student calls the runtime rejects.
The reference corpus is generated offline from templates (``kdtrain.data.templates``) and a
seed: the same seed gives byte-identical files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal

from pydantic import BaseModel, ConfigDict, Field

from kdcontracts.models.tokens import Message
from kdtrain.data import store
from kdtrain.errors import DataError, located

CORPUS_JSONL = "corpus.jsonl"
CORPUS_JSON = "corpus.json"

Scenario = Literal["single_call", "multi_step", "code_mode", "large_payload", "pii", "plain", "plain_thinking"]
SCENARIOS: tuple[str, ...] = Scenario.__args__
# Scenarios worth orchestrating in code (several calls, a payload that should stay out of the
# context, personal data that should not pass through the model): eligible for code mode.
CODE_MODE_SCENARIOS = frozenset({"multi_step", "code_mode", "large_payload", "pii"})


class Eligibility(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    code_mode: bool


class SampleMeta(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tool_schema_version: str
    orchestrator_version: str
    scenario: Scenario
    eligible: Eligibility
    seed: int
    invalid: tuple[str, ...] | None = None  # causes the validation pass found (``on_invalid="mark"``)


class Sample(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1)
    messages: tuple[Message, ...] = Field(min_length=1)
    meta: SampleMeta

    def line(self) -> str:
        """The sample as one line of ``corpus.jsonl`` (sorted keys: stable bytes)."""
        return json.dumps(self.model_dump(mode="json", exclude_none=True), sort_keys=True, ensure_ascii=False)


class CorpusInfo(BaseModel):
    """``corpus.json``."""

    model_config = ConfigDict(extra="forbid")

    dataset_version: int = Field(ge=1)
    tool_schema_version: str
    orchestrator_version: str
    seed: int
    samples: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Corpus:
    samples: tuple[Sample, ...]
    tool_schema_version: str
    orchestrator_version: str
    seed: int
    dataset_version: int = 1

    def jsonl(self) -> bytes:
        return "".join(s.line() + "\n" for s in self.samples).encode("utf-8")

    def info(self) -> CorpusInfo:
        return CorpusInfo(dataset_version=self.dataset_version, tool_schema_version=self.tool_schema_version,
                          orchestrator_version=self.orchestrator_version, seed=self.seed, samples=len(self.samples),
                          sha256=hashlib.sha256(self.jsonl()).hexdigest())

    def replace(self, **changes) -> "Corpus":
        return dataclasses.replace(self, **changes)

    def save(self, folder: Path | str) -> Path:
        """Write both files into a fresh folder swapped in whole: a reader never sees half a corpus."""
        return store.save(folder, CORPUS_JSONL, self.jsonl(), CORPUS_JSON, self.info())

    @classmethod
    def load(cls, folder: Path | str) -> "Corpus":
        """Read and verify a corpus folder; a DataError names the file, line and key of any fault.
        The lines are read before the checksum is checked: a hand-edited line is reported where it is."""
        folder = Path(folder)
        info, data = store.read_info(folder, CORPUS_JSON, CORPUS_JSONL, CorpusInfo, "a corpus folder")
        samples = [sample for _, sample in store.records(folder / CORPUS_JSONL, data, Sample.model_validate, "a sample id")]
        store.check_count(folder / CORPUS_JSON, "samples", CORPUS_JSONL, len(samples), info.samples)
        store.check_sha256(folder / CORPUS_JSONL, data, info.sha256, CORPUS_JSON)
        return cls(tuple(samples), info.tool_schema_version, info.orchestrator_version, info.seed, info.dataset_version)


def example_hash(messages: Iterable[Message]) -> str:
    """SHA-256 of the messages' roles and contents as canonical JSON (what makes two examples the same)."""
    canonical = json.dumps([{"content": m.content, "role": m.role} for m in messages],
                           ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def build_reference_corpus(registry, samples_per_scenario: int, seed: int) -> Corpus:
    """Samples of every scenario written against ``registry`` (a ToolRegistry); reproducible from ``seed``."""
    from kdtrain.data.templates import BUILDERS, REFERENCE_TOOLS

    missing = sorted(set(REFERENCE_TOOLS) - set(registry.names))
    if missing:
        raise DataError(located(registry.file, "tools", f"the reference corpus's tools {list(REFERENCE_TOOLS)}", f"no tool named {missing}"))
    samples = []
    for scenario in SCENARIOS:
        for index in range(samples_per_scenario):
            # One generator per sample (a string seed hashes stably): a sample depends on
            # (seed, id) only, so adding a scenario does not reshuffle the others.
            rng = random.Random(f"{seed}/{scenario}/{index}")
            meta = SampleMeta(tool_schema_version=registry.tool_schema_version, orchestrator_version=registry.orchestrator_version,
                              scenario=scenario, eligible=Eligibility(code_mode=scenario in CODE_MODE_SCENARIOS), seed=seed)
            samples.append(Sample(id=f"{scenario}-{index:04d}", messages=tuple(BUILDERS[scenario](rng, registry)), meta=meta))
    return Corpus(tuple(samples), registry.tool_schema_version, registry.orchestrator_version, seed)
