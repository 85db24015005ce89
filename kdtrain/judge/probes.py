"""The judge's probe set: pairs and graded items whose worth an objective check decided.

A judge is calibrated against signals that need no judge: code that compiles and passes its
unit tests, a tool call the registry validates, an exact answer. The set holds

- pairs of four kinds (:data:`PAIR_KINDS`): ``code``, ``tool_call`` and ``exact`` pairs have an
  objective winner (``better``); ``length`` pairs are two correct answers, one padded, so a
  judge that picks the longer (``longer``) shows a preference for length;
- graded items: one task with outputs at several levels of an objective metric, for the rank
  correlation between a judge's pointwise scores and that metric.

It is seeded and held out: draw ``i`` of a kind uses ``random.Random("judge/{seed}/{kind}/{i}")``,
a draw whose task repeats an earlier one or a training prompt (the corpus's user turns) is
skipped. On disk: ``probes.jsonl`` (one probe per line, sorted keys) and ``probes.json`` (the
generator's settings, counts, SHA-256 of the lines and of the training corpus). The same
settings give byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kdtrain.data import store
from kdtrain.errors import DataError, located

PROBES_JSONL = "probes.jsonl"
PROBES_JSON = "probes.json"

PairKind = Literal["code", "tool_call", "exact", "length"]
PAIR_KINDS: tuple[str, ...] = PairKind.__args__
OBJECTIVE_KINDS = ("code", "tool_call", "exact")  # pairs with an objective winner
GRADED_SOURCES = ("code", "tool_call")
_DRAWS_PER_PROBE = 40  # draws a kind may use per accepted probe before giving up


class Output(BaseModel):
    """One candidate output and what the objective check found (``metric``: 1/0 in a pair, a level in a graded item)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    text: str = Field(min_length=1)
    metric: float = Field(ge=0, le=1)
    evidence: dict[str, Any]


class PairProbe(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1)
    kind: PairKind
    task: str = Field(min_length=1)
    check: dict[str, Any]  # how the outputs' metrics are measured (kdtrain.judge.checks)
    outputs: tuple[Output, Output]
    better: Literal[0, 1] | None  # the objectively better output; None: a length pair (both correct)
    longer: Literal[0, 1]

    @model_validator(mode="after")
    def _consistent(self) -> "PairProbe":
        a, b = self.outputs
        if (self.better is None) != (self.kind == "length"):
            raise ValueError(f"better: expected a winner exactly when the kind is not 'length', found {self.better!r} for {self.kind!r}")
        if self.better is not None and not self.outputs[self.better].metric > self.outputs[1 - self.better].metric:
            raise ValueError(f"better: expected the output with the higher metric, found metrics {a.metric} and {b.metric}")
        if self.better is None and a.metric != b.metric:
            raise ValueError(f"outputs: expected two equally correct answers on a length pair, found metrics {a.metric} and {b.metric}")
        if len(self.outputs[self.longer].text) < len(self.outputs[1 - self.longer].text):
            raise ValueError("longer: expected the index of the longer output")
        return self


class GradedProbe(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1)
    kind: Literal["graded"]
    source: Literal["code", "tool_call"]
    task: str = Field(min_length=1)
    check: dict[str, Any]
    outputs: tuple[Output, ...] = Field(min_length=2)


class _Line(BaseModel):
    probe: Annotated[Union[PairProbe, GradedProbe], Field(discriminator="kind")]


class ProbeSetInfo(BaseModel):
    """``probes.json``."""

    model_config = ConfigDict(extra="forbid")

    seed: int
    pairs_per_kind: int = Field(ge=1)
    graded_tasks: int = Field(ge=0)
    counts: dict[str, int]
    probes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    training_sha256: str | None
    generator: dict[str, Any]  # what else fixed the draws: tests per code task, sandbox limits


def _line(probe: PairProbe | GradedProbe) -> str:
    return json.dumps(probe.model_dump(mode="json"), sort_keys=True, ensure_ascii=False)


@dataclass(frozen=True)
class ProbeSet:
    pairs: tuple[PairProbe, ...]
    graded: tuple[GradedProbe, ...]
    seed: int
    pairs_per_kind: int
    graded_tasks: int
    training_sha256: str | None

    @property
    def settings(self) -> dict:
        """What the generator was asked for (the contract's ``probes`` section)."""
        return {"seed": self.seed, "pairs_per_kind": self.pairs_per_kind, "graded_tasks": self.graded_tasks}

    def jsonl(self) -> bytes:
        return "".join(_line(p) + "\n" for p in (*self.pairs, *self.graded)).encode("utf-8")

    def info(self) -> ProbeSetInfo:
        from kdtrain.judge import code_tasks, sandbox

        counts = {k: sum(p.kind == k for p in self.pairs) for k in PAIR_KINDS} | {"graded": len(self.graded)}
        return ProbeSetInfo(seed=self.seed, pairs_per_kind=self.pairs_per_kind, graded_tasks=self.graded_tasks, counts=counts,
                            probes=len(self.pairs) + len(self.graded), sha256=hashlib.sha256(self.jsonl()).hexdigest(),
                            training_sha256=self.training_sha256,
                            generator={"tests_per_code_task": code_tasks.TESTS_PER_TASK, "sandbox_cpu_s": sandbox.CPU_S,
                                       "sandbox_memory_bytes": sandbox.MEMORY_BYTES})

    def save(self, folder: Path | str) -> Path:
        """Both files in a fresh folder swapped in whole."""
        return store.save(folder, PROBES_JSONL, self.jsonl(), PROBES_JSON, self.info())

    @classmethod
    def load(cls, folder: Path | str) -> "ProbeSet":
        """Read and verify a probe-set folder; a DataError names the file, key, expected and found."""
        folder = Path(folder)
        info, data = store.read_info(folder, PROBES_JSON, PROBES_JSONL, ProbeSetInfo, "a judge probe-set folder")
        store.check_sha256(folder / PROBES_JSONL, data, info.sha256, PROBES_JSON)
        probes = [probe for _, probe in store.records(folder / PROBES_JSONL, data, lambda raw: _Line.model_validate({"probe": raw}).probe)]
        return cls(tuple(p for p in probes if isinstance(p, PairProbe)), tuple(p for p in probes if isinstance(p, GradedProbe)),
                   info.seed, info.pairs_per_kind, info.graded_tasks, info.training_sha256)


def remeasure(probes: ProbeSet, registry) -> list[str]:
    """Every output measured again by its probe's check; what disagrees with the recorded metric."""
    from kdtrain.judge.checks import measure

    problems = []
    for probe in (*probes.pairs, *probes.graded):
        found = measure(probe.check, [o.text for o in probe.outputs], registry)
        problems += [f"{probe.id} output {i}: recorded metric {o.metric}, measured {m} ({e})"
                     for i, (o, (m, e)) in enumerate(zip(probe.outputs, found)) if abs(o.metric - m) > 1e-9]
    return problems


def training_prompts(corpus) -> set[str]:
    """The user turns of the training corpus, normalised: a probe task equal to one is not held out."""
    from kdtrain.data.scenario_cases import normalise

    return {normalise(m.content) for s in corpus.samples for m in s.messages if m.role == "user"}


def _draw(kind: str, wanted: int, seed: int, draw, registry, excluded: set[str]) -> list:
    from kdtrain.data.scenario_cases import normalise

    accepted = []
    for index in range(wanted * _DRAWS_PER_PROBE):
        probe = draw(random.Random(f"judge/{seed}/{kind}/{index}"), f"{kind}-{index:04d}", registry)
        if probe is None or normalise(probe.task) in excluded:
            continue  # the check did not confirm the kind, or a repeated or training task
        excluded.add(normalise(probe.task))
        accepted.append(probe)
        if len(accepted) == wanted:
            return accepted
    raise DataError(located(f"judge probe set (seed {seed})", f"kind {kind}", f"{wanted} probes new to the set and to training",
                            f"{len(accepted)} after {wanted * _DRAWS_PER_PROBE} draws"))


def build_probe_set(registry, pairs_per_kind: int, graded_tasks: int, seed: int, corpus=None) -> ProbeSet:
    """``pairs_per_kind`` pairs of each kind and ``graded_tasks`` graded items (alternating code and tool
    calls), none repeating a task or a training prompt of ``corpus``; reproducible from the settings."""
    from kdtrain.judge.probe_kinds import GRADED_DRAWS, PAIR_DRAWS

    excluded = training_prompts(corpus) if corpus is not None else set()
    pairs = [p for kind in PAIR_KINDS for p in _draw(kind, pairs_per_kind, seed, PAIR_DRAWS[kind], registry, excluded)]
    graded = []
    for i, source in enumerate(GRADED_SOURCES):
        share = graded_tasks // len(GRADED_SOURCES) + (i < graded_tasks % len(GRADED_SOURCES))
        if share:
            graded += _draw(f"graded_{source}", share, seed, GRADED_DRAWS[source], registry, excluded)
    return ProbeSet(tuple(pairs), tuple(graded), seed, pairs_per_kind, graded_tasks,
                    corpus.info().sha256 if corpus is not None else None)
