"""``precision_islands.yaml``: ops that must run FP32 inside the FP16 program, checked in the
converted MIL program of every function and length. An island that matches nothing fails."""

from __future__ import annotations

from functools import partial
from typing import Iterator

from kdcontracts.models.islands import IslandsContract
from kdtrain.coreml.inspect import dtype_name
from pytest_kdcontracts.check import Check, fail
from pytest_kdcontracts.contracts.coreml import require_function


def _operations(block):
    for op in block.operations:
        yield op
        for inner in op.blocks:
            yield from _operations(inner)


def check_islands(c: IslandsContract, function: str, length: int, kd_coreml) -> None:
    require_function(c.file.name, kd_coreml, function, length)
    program = kd_coreml.mil(length)
    matched = {island.name: 0 for island in c.islands}
    wrong = []
    for op in _operations(program.functions[function]):
        for island in c.islands:
            if island.matches(op.op_type, op.name):
                matched[island.name] += 1
                dtypes = sorted({dtype_name(v) for v in (*op.outputs, *[x for x in op.inputs.values() if hasattr(x, "dtype")]) if dtype_name(v).startswith("fp")})
                if dtypes != ["fp32"]:
                    wrong.append(f"{island.name}: {op.op_type} {op.name!r} runs in {'/'.join(dtypes)}")
    empty = [name for name, n in matched.items() if n == 0]
    if wrong or empty:
        found = wrong + [f"{name}: matched no op (an island that matches nothing protects nothing)" for name in empty]
        fail(c.file.name, f"precision islands of {function}-{length} in {kd_coreml.package(length)}",
             "every island op FP32, every island matching at least one op", "\n    " + "\n    ".join(found[:12]))


def checks(c: IslandsContract) -> Iterator[Check]:
    for function, length in c.coreml.items():
        yield Check("islands", (function, str(length)), partial(check_islands, c, function, length), ("kd_coreml",))
