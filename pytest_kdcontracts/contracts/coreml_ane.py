"""ANE residency per function and length: the fraction of ops, and of their estimated cost,
placed on the Neural Engine, against the contract's minimums.

On macOS the numbers come from Core ML's own ``MLComputePlan``. Elsewhere they are a static
estimate from the MIL program, labelled as such: an op is counted off the Neural Engine when
it computes in FP32 (the ANE computes in FP16), produces int32/int64 tensors beyond a few
elements, or has rank above 5; cost is approximated by multiply-accumulates for matmul and
linear and by output size otherwise.
"""

from __future__ import annotations

import sys
from functools import partial
from typing import Iterator

import numpy as np

from pytest_kdcontracts.check import Check, fail
from pytest_kdcontracts.contracts.coreml import require_function

SKIP = {"const", "read_state", "coreml_update_state"}


def _cost(op) -> float:
    out = op.outputs[0]
    size = float(np.prod(out.shape)) if out.shape and all(isinstance(d, int) for d in out.shape) else 1.0
    if op.op_type in ("matmul", "linear"):
        x = op.inputs["x"].shape
        return size * float(x[-1] if not (op.op_type == "matmul" and op.inputs["transpose_x"].val) else x[-2])
    return size


def _static_on_ane(op) -> bool:
    from kdtrain.coreml.inspect import dtype_name

    tensors = [v for v in (*op.outputs, *[x for x in op.inputs.values() if hasattr(x, "dtype")]) if v.shape is not None]
    dtypes = {dtype_name(v) for v in tensors}
    if "fp32" in dtypes:
        return False
    big_ints = [v for v in op.outputs if dtype_name(v) in ("int32", "int64") and np.prod(v.shape or (1,)) > 16]
    return not big_ints and all(len(v.shape) <= 5 for v in tensors)


def static_residency(program, function: str) -> tuple[float, float, list[str]]:
    ops = [op for op in program.functions[function].operations if op.op_type not in SKIP]
    on = [_static_on_ane(op) for op in ops]
    costs = [_cost(op) for op in ops]
    off = sorted({op.op_type for op, placed in zip(ops, on) if not placed})
    return sum(on) / len(ops), sum(c for c, p in zip(costs, on) if p) / sum(costs), off


def compute_plan_residency(package, function: str) -> tuple[float, float, list[str]]:
    import coremltools as ct
    from coremltools.models.compute_device import MLNeuralEngineComputeDevice
    from coremltools.models.compute_plan import MLComputePlan

    plan = MLComputePlan.load_from_path(path=str(package), compute_units=ct.ComputeUnit.ALL)
    ops = [op for op in plan.model_structure.program.functions[function].block.operations if op.operator_name not in SKIP]
    on, costs, off = [], [], set()
    for op in ops:
        usage = plan.get_compute_device_usage_for_mlprogram_operation(op)
        placed = usage is not None and isinstance(usage.preferred_compute_device, MLNeuralEngineComputeDevice)
        cost = plan.get_estimated_cost_for_mlprogram_operation(op)
        on.append(placed)
        costs.append(cost.weight if cost is not None else 0.0)
        if not placed:
            off.add(op.operator_name)
    return sum(on) / len(ops), sum(c for c, p in zip(costs, on) if p) / max(sum(costs), 1e-12), sorted(off)


def check_ane(c, function: str, length: int, kd_coreml) -> None:
    require_function(c.file.name, kd_coreml, function, length)
    if sys.platform == "darwin":
        source = "MLComputePlan"
        ops, cost, off = compute_plan_residency(kd_coreml.package(length), function)
    else:
        source = "static estimate from the MIL program (no MLComputePlan off macOS)"
        ops, cost, off = static_residency(kd_coreml.mil(length), function)
    if ops < c.ane.min_op_fraction or cost < c.ane.min_cost_fraction:
        fail(c.file.name, f"ANE residency of {function}-{length} [{source}]",
             f"ops >= {c.ane.min_op_fraction:.0%}, cost >= {c.ane.min_cost_fraction:.0%}",
             f"ops {ops:.1%}, cost {cost:.1%}; off the ANE: {off}")


def checks(c) -> Iterator[Check]:
    for function, length in c.items():
        yield Check("ane_residency", (function, str(length)), partial(check_ane, c, function, length), ("kd_coreml",))
