"""``runtime_budget.yaml``: what the student needs on the device, per size and enumerated context.

The contract names a device (its unified memory and what else runs beside the model), the
student sizes a user may distil into (the reference student, read from the artifacts, and
published Llama-family shapes, each citing its ``config.json``), and the settings of the
runtime measurements: the micro-benchmarks' protocol and regression rule, and the session
pool demo. The arithmetic (:mod:`kdtrain.runtime.budget`) turns a shape and the quant recipe
into weight, KV-cache and workspace bytes and the sessions that fit; the contexts are
``coreml_contract.json``'s enumerated lengths.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from kdcontracts.errors import ContractFileError, Problem
from kdcontracts.families import load_sibling
from kdcontracts.models.coreml import CoreMLContract

GIB = 1 << 30


@dataclass(frozen=True)
class Device:
    name: str
    memory_bytes: int
    reserve: Mapping[str, int]  # what runs beside the model (os, browser, editor) -> bytes

    @property
    def available_bytes(self) -> int:
        return self.memory_bytes - sum(self.reserve.values())


@dataclass(frozen=True)
class Shape:
    """A Llama-family decoder's shape, in ``config.json``'s terms."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool

    @classmethod
    def from_hf(cls, config: Mapping) -> "Shape":
        heads = config["num_attention_heads"]
        return cls(config["num_hidden_layers"], config["hidden_size"], heads, config.get("num_key_value_heads") or heads,
                   config.get("head_dim") or config["hidden_size"] // heads, config["intermediate_size"], config["vocab_size"],
                   bool(config.get("tie_word_embeddings", False)))


@dataclass(frozen=True)
class Size:
    name: str
    source: str  # the published config.json it was taken from, or "artifacts" (the exported student)
    shape: Shape | None  # None: read from the artifacts' exported student

    @property
    def from_artifacts(self) -> bool:
        return self.shape is None


@dataclass(frozen=True)
class Benchmarks:
    """The TTFT / decode micro-benchmarks' protocol (as llama-bench and mlx-lm measure them)."""

    ttft_fill: float  # the prompt fills this fraction of the context
    decode_steps: int  # steady-state decode steps timed per round
    warmup_rounds: int
    rounds: int
    regression: str  # pytest-benchmark's --benchmark-compare-fail expression, e.g. "mean:20%"
    threads: int | None = None  # torch's and BLAS's pools while timing; None: the machine's defaults
    clock: str = "wall"  # "machine": rounds in units of a reference workload (kdtrain.runtime.speed.MachineClock)


@dataclass(frozen=True)
class PoolSettings:
    sessions: int  # conversations opened
    resident: int  # the budget, in sessions of the measured size
    steps: int  # greedy decode steps per conversation, round-robin


@dataclass(frozen=True)
class RuntimeBudgetContract:
    file: Path
    device: Device
    kv_bytes: int  # bytes per cached element (FP16: 2)
    workspace_margin: float  # the activation estimate times this (allocator slack)
    weight_tolerance: float  # relative: computed weight bytes against the packages' weight constants
    sizes: tuple[Size, ...]
    benchmarks: Benchmarks
    pool: PoolSettings
    coreml: CoreMLContract  # the enumerated contexts

    @property
    def contexts(self) -> tuple[int, ...]:
        return tuple(self.coreml.lengths)


def parse(path: Path, data: dict) -> RuntimeBudgetContract:
    d = data["device"]
    device = Device(d["name"], int(d["memory_gib"] * GIB), {k: int(v * GIB) for k, v in d["reserve_gib"].items()})
    names = [s["name"] for s in data["sizes"]]
    problems = [Problem(f"sizes[{i}].name", "a name no other size has", repr(name)) for i, name in enumerate(names) if name in names[:i]]
    if sum(s["source"] == "artifacts" for s in data["sizes"]) > 1:
        problems.append(Problem("sizes", "at most one size read from the artifacts (source: artifacts)", "several"))
    if data["pool"]["resident"] >= data["pool"]["sessions"]:
        problems.append(Problem("pool.resident", f"fewer than pool.sessions ({data['pool']['sessions']}): the demo must evict",
                                repr(data["pool"]["resident"])))
    if problems:
        raise ContractFileError(str(path), problems)
    sizes = tuple(Size(s["name"], s["source"], Shape(**s["shape"]) if "shape" in s else None) for s in data["sizes"])
    return RuntimeBudgetContract(path, device, data["kv_bytes"], data["workspace_margin"], data["weight_tolerance"], sizes,
                                 Benchmarks(**data["benchmarks"]), PoolSettings(**data["pool"]), load_sibling(path, "coreml_contract.json"))
