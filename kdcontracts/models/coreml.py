"""``coreml_contract.json``: the enumerated lengths, the host API version, each function's IO
and states (shapes with the length symbol), golden tolerances and ANE residency bounds.

``verify`` (host API 1.1) is optional: a package converted elsewhere may speak 1.0 (prefill and
decode only). Its segment length S is declared once, as its ``input_ids`` shape [1, S]."""

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
    segment: int | None  # S: tokens one verify call takes (verify's input_ids [1, S]); None without verify

    def function(self, name: str) -> FunctionSpec:
        """``name``'s IO; a contract without it is an error naming the file and the function."""
        if name not in self.functions:
            raise ContractFileError(str(self.file), [Problem(f"functions.{name}", f"a function named {name!r}", f"functions {sorted(self.functions)}")])
        return self.functions[name]

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
    segment = _segment(data, problems)
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
        segment=segment,
    )


def _segment(data: dict, problems: list[Problem]) -> int | None:
    """verify's S from its input_ids [1, S]: a fixed number of tokens, at most the shortest length."""
    verify = data["functions"].get("verify")
    if verify is None:
        return None
    index = next((i for i, t in enumerate(verify["inputs"]) if t["name"] == "input_ids"), None)
    if index is None:
        problems.append(Problem("functions.verify.inputs", "an input named 'input_ids' ([1, S]: S tokens a call)",
                                f"inputs {[t['name'] for t in verify['inputs']]}"))
        return None
    shape, shortest = verify["inputs"][index]["shape"], min(data["enumerated_shapes"]["values"])
    if len(shape) != 2 or shape[0] != 1 or not isinstance(shape[1], int) or not 1 <= shape[1] <= shortest:
        problems.append(Problem(f"functions.verify.inputs[{index}].shape", f"[1, S] with S a number of tokens in 1..{shortest} "
                                "(the shortest enumerated length)", repr(shape)))
        return None
    return shape[1]
