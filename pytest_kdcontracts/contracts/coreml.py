"""``coreml_contract.json``: the host-facing IO of every function at every enumerated length,
read from the saved mlpackage's spec (works on Linux)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterator

from pytest_kdcontracts.check import Check, fail
from pytest_kdcontracts.errors import ContractFileError, Problem

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
        golden=Golden(**{**data["golden"], "dir": (path.parent / data["golden"]["dir"]).resolve()}),
        ane=AneBounds(**data["ane"]),
    )


def check_io(c: CoreMLContract, function: str, length: int, kd_coreml) -> None:
    package = kd_coreml.package(length)
    found_all = kd_coreml.io(length)
    if function not in found_all:
        fail(c.file.name, f"function {function!r} in {package}", f"a function named {function!r}", f"functions {sorted(found_all)}")
    found, spec = found_all[function], c.functions[function]
    problems = []
    for group in ("inputs", "outputs", "states"):
        want = {t.name: t for t in getattr(spec, group)}
        have = {t.name: t for t in getattr(found, group)}
        for name in sorted(want.keys() - have.keys()):
            problems.append(f"{group}: {name!r} missing (found {sorted(have)})")
        for name in sorted(have.keys() - want.keys()):
            problems.append(f"{group}: unexpected {name!r}")
        for name in sorted(want.keys() & have.keys()):
            shape = c.bind(want[name].shape, length)
            if have[name].shape != shape:
                problems.append(f"{group}: {name!r} shape expected {list(shape)}, found {list(have[name].shape)}")
            if have[name].dtype != want[name].dtype:
                problems.append(f"{group}: {name!r} dtype expected {want[name].dtype}, found {have[name].dtype}")
    if problems:
        fail(c.file.name, f"IO of {function}-{length} in {package}", "the contract's names, shapes and dtypes", "\n    " + "\n    ".join(problems))


def check_host_api(c: CoreMLContract, kd_artifacts) -> None:
    from kdtrain.runtime.host import check_host_api as read_version

    read_version(kd_artifacts, c.host_api_version)


def checks(c: CoreMLContract) -> Iterator[Check]:
    from pytest_kdcontracts.contracts import coreml_ane, coreml_golden

    yield Check("host_api_version", (), partial(check_host_api, c), ("kd_artifacts",))
    for function, length in c.items():
        yield Check("io", (function, str(length)), partial(check_io, c, function, length), ("kd_coreml",))
    yield from coreml_golden.checks(c)
    yield from coreml_ane.checks(c)
