"""``ablations.yaml``: the protocol of the canonical mini experiments, where their baselines
are stored and how far a re-run may drift from them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kdcontracts.loader import path_beside


@dataclass(frozen=True)
class Protocol:
    slice: int  # usable samples trained and evaluated on
    steps: int
    samples: int  # prompts whose greedy outputs are kept
    sample_tokens: int  # greedy tokens per prompt


@dataclass(frozen=True)
class Tolerance:
    metric_rel: float  # a metric may move by this fraction of the baseline's value...
    metric_abs: float  # ...or by this much, whichever is larger
    sample_agreement: float  # share of greedy tokens that must equal the baseline's


@dataclass(frozen=True)
class AblationsContract:
    file: Path
    protocol: Protocol
    dir: Path  # syrupy snapshots (resolved against the contract file)
    tolerance: Tolerance


def parse(path: Path, data: dict) -> AblationsContract:
    return AblationsContract(path, Protocol(**data["protocol"]), path_beside(path, "baselines.dir", data["baselines"]["dir"]),
                             Tolerance(**data["tolerance"]))
