"""``coreml_contract.json``: the enumerated lengths, the host API version, each function's IO
and states (shapes with the length symbol), golden tolerances and ANE residency bounds."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from kdcontracts.errors import ContractFileError, Problem
from kdcontracts.loader import path_beside

Dim = int | str


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[Dim, ...]
    dtype: str


@dataclass(frozen=True)
class FunctionSpec:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    states: tuple[TensorSpec, ...]


@dataclass(frozen=True)
class Golden:
    dir: Path  # syrupy snapshots (resolved against the contract file)
    cosine_min: float
    prompt: str
    decode_steps: int


@dataclass(frozen=True)
class AneBounds:
    min_op_fraction: float
    min_cost_fraction: float


@dataclass(frozen=True)
class CoreMLContract:
    file: Path
    host_api_version: str
    deployment_target: str
    symbol: str
    lengths: tuple[int, ...]
    functions: dict[str, FunctionSpec]
    golden: Golden
    ane: AneBounds

    def bind(self, shape: tuple[Dim, ...], length: int) -> tuple[int, ...]:
        return tuple(length if d == self.symbol else d for d in shape)

    def items(self) -> Iterator[tuple[str, int]]:
        """(function, length) pairs: the unit every Core ML item is generated over."""
        for length in self.lengths:
            for function in self.functions:
                yield function, length


def parse(path: Path, data: dict) -> CoreMLContract:
    symbol = data["enumerated_shapes"]["symbol"]
    problems = []
    for fname, fn in data["functions"].items():
        for group in ("inputs", "outputs", "states"):
            for i, tensor in enumerate(fn[group]):
                for j, dim in enumerate(tensor["shape"]):
                    if isinstance(dim, str) and dim != symbol:
                        problems.append(Problem(f"functions.{fname}.{group}[{i}].shape[{j}]", f"an integer or the shape symbol {symbol!r}", repr(dim)))
    if problems:
        raise ContractFileError(str(path), problems)

    def tensors(items):
        return tuple(TensorSpec(t["name"], tuple(t["shape"]), t["dtype"]) for t in items)

    return CoreMLContract(
        file=path,
        host_api_version=data["host_api_version"],
        deployment_target=data["deployment_target"],
        symbol=symbol,
        lengths=tuple(data["enumerated_shapes"]["values"]),
        functions={name: FunctionSpec(tensors(f["inputs"]), tensors(f["outputs"]), tensors(f["states"])) for name, f in data["functions"].items()},
        golden=Golden(**{**data["golden"], "dir": path_beside(path, "golden.dir", data["golden"]["dir"])}),
        ane=AneBounds(**data["ane"]),
    )
