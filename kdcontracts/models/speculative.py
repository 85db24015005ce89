"""``speculative.yaml``: drafter/worker pairs for speculative decoding and the bounds they hold.

A pair names its drafter (the student's package at a precision), its worker (the teacher, a
local transformers model on torch, or the student's package at a precision), the segment
policy the drafter follows (at least ``min`` and at most ``max`` tokens, ``max`` below the
verify function's S, ``coreml_contract.json``; a segment ends early where the drafter's halt
probability reaches ``halt_threshold``) and the bounds its metrics hold. Every pair's output
must equal the worker's plain greedy decoding; a self pair (the worker is the drafter's own
package) must accept every drafted token. The runs are pairs x ``lengths`` x each pair's
``backends``: ``package`` is the platform's runtime (Core ML on macOS, the MIL executor
elsewhere), ``torch`` the PyTorch programs the packages were converted from.

The held-out prompts are dealt round-robin over the lengths (prompt i runs at length i mod
n): every length's package is held to exactness on its own prompts, while the acceptance,
segment and self figures pool a pair's runs on a backend over every length. Those figures do
not depend on the context length (the same weights propose and verify the same tokens; the
packages differ only in the cache's size), and pooling keeps the stage's cost that of
``prompts.count`` decodings per pair and backend however many lengths there are.

The judging lives here, beside the bounds (as gates.yaml's does): the stage that measures and
the plugin that re-judges its records apply one rule.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Mapping

from kdcontracts.errors import ContractFileError, Problem
from kdcontracts.families import load_sibling
from kdcontracts.models.coreml import CoreMLContract
from kdcontracts.models.gates import Bound, Judgement

TEACHER = "teacher"


@dataclass(frozen=True)
class Segments:
    min: int
    max: int
    halt_threshold: float


@dataclass(frozen=True)
class PairBounds:
    acceptance_rate: Bound  # accepted drafted tokens / drafted
    mean_accepted_length: Bound  # tokens per verification: accepted drafts + the worker's own
    segment_accepted_fraction: Bound  # per segment, accepted / drafted, averaged


@dataclass(frozen=True)
class Pair:
    name: str
    drafter: str  # the student's package precision
    worker: str  # "teacher", or the student's package precision
    backends: tuple[str, ...]  # "package" (the platform's runtime) and/or "torch"
    segments: Segments
    bounds: PairBounds | None  # None: a self pair judged by exactness and ::self alone

    @property
    def is_self(self) -> bool:
        return self.worker == self.drafter

    def settings(self) -> dict:
        """What a measurement of this pair depends on (its bounds do not: they judge it)."""
        return {"drafter": self.drafter, "worker": self.worker, "segments": asdict(self.segments)}


@dataclass(frozen=True)
class Run:
    pair: Pair
    length: int
    backend: str  # the resolved backend: coreml, mil-reference, torch

    @property
    def params(self) -> tuple[str, str, str]:
        return self.pair.name, str(self.length), self.backend


@dataclass(frozen=True)
class Pool:
    """A pair's runs on one backend, over every length: what its figures are judged on."""

    pair: Pair
    backend: str  # the resolved backend
    runs: tuple[Run, ...]

    @property
    def params(self) -> tuple[str, str]:
        return self.pair.name, self.backend


@dataclass(frozen=True)
class SpeculativeContract:
    file: Path
    prompts: int  # held-out prompts per pair and backend, dealt over the lengths
    max_new_tokens: int
    lengths: tuple[int, ...]
    pairs: tuple[Pair, ...]
    tie_tolerance: Mapping[str, float]  # backend (coreml, mil-reference, torch) -> logits: a worker's preference below this is a tie (0: none)
    coreml: CoreMLContract  # the verify function's segment length S and the enumerated lengths

    @property
    def segment(self) -> int:
        return self.coreml.segment

    def runs(self, package_backend: str) -> Iterator[Run]:
        """Every pair x length x its backends, ``package`` resolved to ``package_backend``."""
        for pair in self.pairs:
            for length in self.lengths:
                for backend in pair.backends:
                    yield Run(pair, length, package_backend if backend == "package" else backend)

    def pools(self, package_backend: str) -> Iterator[Pool]:
        """Every pair x its backends, with its runs at every length."""
        runs = list(self.runs(package_backend))
        for pair in self.pairs:
            for backend in dict.fromkeys(r.backend for r in runs if r.pair == pair):
                yield Pool(pair, backend, tuple(r for r in runs if r.pair == pair and r.backend == backend))

    def prompt_indices(self, length: int) -> range:
        """Which of the ``prompts`` held-out prompts run at ``length``: dealt round-robin over the lengths."""
        return range(self.lengths.index(length), self.prompts, len(self.lengths))

    def tolerance(self, pair: Pair, backend: str) -> float:
        """The tie tolerance of the pair's worker: the teacher runs on torch, a package on the backend."""
        return self.tie_tolerance["torch" if pair.worker == TEACHER else backend]

    def settings(self, pair: Pair) -> dict:
        """What a recorded run must have been measured with to be judged under this contract."""
        return {"prompts": self.prompts, "lengths": list(self.lengths), "max_new_tokens": self.max_new_tokens,
                "segment": self.segment, **pair.settings()}

    def judge_acceptance(self, pair: Pair, metrics: Mapping) -> list[Judgement]:
        b = pair.bounds
        return [Judgement(f"acceptance[{key}]", metrics.get(key), str(bound), bound.holds(metrics.get(key)))
                for key, bound in (("acceptance_rate", b.acceptance_rate), ("mean_accepted_length", b.mean_accepted_length))]

    def judge_segments(self, pair: Pair, metrics: Mapping) -> list[Judgement]:
        bound, value = pair.bounds.segment_accepted_fraction, metrics.get("segment_accepted_fraction")
        return [Judgement("segments[segment_accepted_fraction]", value, str(bound), bound.holds(value))]

    def judge_self(self, pool: Pool, metrics: Mapping) -> list[Judgement]:
        value, margin = metrics.get("acceptance_rate"), metrics.get("max_rejection_margin")
        tolerance = self.tolerance(pool.pair, pool.backend)
        return [Judgement("self[acceptance_rate]", value, f"exactly 1 (the drafter drafting for itself), or rejections "
                          f"only at ties (worker's margin < {tolerance:g})", value == 1.0 or (margin is not None and margin < tolerance),
                          f"largest rejection margin {margin}")]


def _bounds(data: Mapping) -> PairBounds:
    return PairBounds(*(Bound.of(data[key]) for key in ("acceptance_rate", "mean_accepted_length", "segment_accepted_fraction")))


def _pair_problems(i: int, p: dict, segment: int | None) -> list[Problem]:
    where, s, problems = f"pairs[{i}]", p["segments"], []
    if s["min"] > s["max"]:
        problems.append(Problem(f"{where}.segments.min", f"at most segments.max ({s['max']})", repr(s["min"])))
    if segment is not None and s["max"] > segment - 1:
        problems.append(Problem(f"{where}.segments.max", f"at most {segment - 1} (coreml_contract.json's verify takes S = {segment} "
                                "tokens: the last token and the segment)", repr(s["max"])))
    worker = p["worker"] if p["worker"] == TEACHER else p["worker"]["precision"]
    if worker != p["drafter"]["precision"] and "bounds" not in p:
        problems.append(Problem(f"{where}.bounds", "acceptance_rate, mean_accepted_length and segment_accepted_fraction "
                                "(only a self pair, its worker the drafter's own package, may omit them)", "none"))
    for key, bound in p.get("bounds", {}).items():
        problems += Bound.of(bound).problems(f"{where}.bounds.{key}")
    return problems


def parse(path: Path, data: dict) -> SpeculativeContract:
    coreml = load_sibling(path, "coreml_contract.json")
    problems = []
    if coreml.segment is None:
        problems.append(Problem("(coreml_contract.json)", "a verify function (its input_ids [1, S]: the worker verifies a segment "
                                "in one call)", f"functions {sorted(coreml.functions)}"))
    names = [p["name"] for p in data["pairs"]]
    problems += [Problem(f"pairs[{i}].name", "a name no other pair has", repr(n)) for i, n in enumerate(names) if n in names[:i]]
    problems += [Problem(f"lengths[{i}]", f"one of coreml_contract.json's enumerated lengths {list(coreml.lengths)}", repr(n))
                 for i, n in enumerate(data["lengths"]) if n not in coreml.lengths]
    if data["prompts"]["count"] < len(data["lengths"]):
        problems.append(Problem("prompts.count", f"at least one prompt per length ({len(data['lengths'])}: the prompts are "
                                "dealt over the lengths)", repr(data["prompts"]["count"])))
    for i, p in enumerate(data["pairs"]):
        problems += _pair_problems(i, p, coreml.segment)
    if problems:
        raise ContractFileError(str(path), problems)
    pairs = tuple(Pair(p["name"], p["drafter"]["precision"], p["worker"] if p["worker"] == TEACHER else p["worker"]["precision"],
                       tuple(p["backends"]), Segments(**p["segments"]), _bounds(p["bounds"]) if "bounds" in p else None)
                  for p in data["pairs"])
    return SpeculativeContract(path, data["prompts"]["count"], data["prompts"]["max_new_tokens"], tuple(data["lengths"]),
                               pairs, dict(data["tie_tolerance"]), coreml)
