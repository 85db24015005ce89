"""The MIL reference executor: runs a converted mlpackage's MIL program op by op, on any OS.

Values live in the dtype each MIL variable declares, so an FP16 program is rounded to FP16
at every op boundary: overflow becomes inf and inf arithmetic becomes NaN where the device's
would. Weights come from the package itself (read back with coremltools' milproto loader),
constexpr weights (INT8 and friends) are materialised by coremltools' own
``materialized_val_inference``, and states (the KV cache) are read and written as the program says.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kdtrain.coreml.inspect import load_mil
from kdtrain.errors import ArtifactError
from kdtrain.runtime.kernels import KERNELS, UnsupportedOpError, to_dtype

_NP_DTYPES = {
    "fp16": np.float16, "fp32": np.float32, "fp64": np.float64,
    "int8": np.int8, "uint8": np.uint8, "int16": np.int16, "uint16": np.uint16,
    "int32": np.int32, "uint32": np.uint32, "int64": np.int64, "bool": np.bool_,
}


def numpy_dtype(var) -> type | None:
    """The numpy dtype a MIL variable is stored in; None for non-tensors (strings, lists)."""
    from coremltools.converters.mil.mil import types

    dtype = var.dtype
    if types.is_state(var.sym_type):
        dtype = var.sym_type.wrapped_type().get_primitive()
    return _NP_DTYPES.get(types.builtin_to_string(dtype))


def _stored(value, var):
    dtype = numpy_dtype(var)
    return value if dtype is None else to_dtype(value, dtype)


def _flat(values):
    for value in values:
        if isinstance(value, (list, tuple)):
            yield from _flat(value)
        else:
            yield value


def _same(a, b) -> bool:
    """Two const values equal in dtype, shape and every element (scalars and strings too)."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    return type(a) is type(b) and a == b


@dataclass
class State:
    """Named state arrays of one model instance (shared by its functions, like MLState)."""

    values: dict[str, np.ndarray] = field(default_factory=dict)

    def read(self, name: str) -> np.ndarray:
        return self.values[name].copy()


# Which keyword arguments each kernel takes, looked up once (not on every op of every call).
_KERNEL_PARAMS = {name: frozenset(inspect.signature(kernel).parameters) for name, kernel in KERNELS.items()}


class MILExecutor:
    def __init__(self, package: Path | str, program=None):
        """``program``: the package's MIL program when the caller has read it already (read-only here)."""
        self.package = Path(package)
        self.program = load_mil(self.package) if program is None else program
        self._consts: dict[str, dict[str, np.ndarray]] = {}
        self._dead: dict[str, dict[int, tuple[str, ...]]] = {}
        self._weights: dict[str, tuple[list, list]] = {}  # op name -> (what it was made from, its values)

    @property
    def functions(self) -> list[str]:
        return list(self.program.functions)

    def new_state(self) -> State:
        """Zero-initialised states, as Core ML's ``make_state()``."""
        state = State()
        for function in self.program.functions.values():
            for name, var in function.inputs.items():
                from coremltools.converters.mil.mil import types

                if types.is_state(var.sym_type):
                    state.values.setdefault(name, np.zeros(var.shape, dtype=numpy_dtype(var)))
        return state

    def _constants(self, function: str) -> dict[str, np.ndarray]:
        """Const and constexpr outputs, materialised once per function."""
        if function not in self._consts:
            consts = {}
            for op in self.program.functions[function].operations:
                if op.op_type == "const" or op.op_type.startswith("constexpr_"):
                    for var, value in zip(op.outputs, self._materialised(op)):
                        consts[var.name] = value
            self._consts[function] = consts
        return self._consts[function]

    def _materialised(self, op) -> list:
        """A const or constexpr op's values, shared with another function's op of the same name
        and the same source values: the package stores deduplicated weights once, and so does
        the executor (one dequantization, one FP32 twin, for prefill, decode and verify)."""
        source = [op.outputs[0].val] if op.op_type == "const" else [v.val for v in op.inputs.values()]
        known = self._weights.get(op.name)
        if known is not None and len(known[0]) == len(source) and all(_same(a, b) for a, b in zip(known[0], source)):
            return known[1]
        if op.op_type == "const":
            values = source
        else:  # Core ML's own dequantization
            inferred = op.materialized_val_inference()
            values = list(inferred) if len(op.outputs) > 1 else [inferred]
        values = [_stored(value, var) for var, value in zip(op.outputs, values)]
        for value in values:
            if isinstance(value, np.ndarray):
                value.flags.writeable = False  # lets kernels cache FP32 twins
        self._weights[op.name] = (source, values)
        return values

    def predict(self, function: str, inputs: dict[str, np.ndarray], state: State | None = None) -> dict[str, np.ndarray]:
        if function not in self.program.functions:  # a package of host API 1.0 has no verify
            raise ArtifactError(f"{self.package}: expected a function named {function!r}, found functions {sorted(self.functions)}")
        fn = self.program.functions[function]
        env: dict[str, object] = dict(self._constants(function))
        for name, var in fn.inputs.items():
            if name in (state.values if state else {}):
                env[name] = name  # a state input is a handle: read_state/coreml_update_state use it
            elif name in inputs:
                env[name] = np.asarray(inputs[name]).astype(numpy_dtype(var))
            else:
                raise UnsupportedOpError(f"{self.package}:{function}: expected input {name!r}, found only {sorted(inputs)}")
        last_use = self._last_use(function)
        for index, op in enumerate(fn.operations):
            if op.outputs and op.outputs[0].name in env:
                continue
            env.update(self._run(op, env, state, function))
            for name in last_use.get(index, ()):
                env.pop(name, None)
        return {var.name: env[var.name] for var in fn.outputs}

    def _last_use(self, function: str) -> dict[int, tuple[str, ...]]:
        """Per op index, the intermediate values no later op reads: dropped as soon as they are
        dead, so a prefill at L=4096 holds a few [heads, L, L] tensors at a time, not all of them."""
        if function not in self._dead:
            fn = self.program.functions[function]
            keep = set(self._constants(function)) | {var.name for var in fn.outputs} | set(fn.inputs)
            last: dict[str, int] = {}
            for index, op in enumerate(fn.operations):
                for var in _flat(op.inputs.values()):
                    last[var.name] = index
                for var in op.outputs:
                    last.setdefault(var.name, index)
            dead: dict[int, list[str]] = {}
            for name, index in last.items():
                if name not in keep:
                    dead.setdefault(index, []).append(name)
            self._dead[function] = {index: tuple(names) for index, names in dead.items()}
        return self._dead[function]

    def _value(self, var, env):
        if isinstance(var, (list, tuple)):
            return [self._value(v, env) for v in var]
        if var.name in env:
            return env[var.name]
        if var.val is not None:
            return _stored(var.val, var)
        raise UnsupportedOpError(f"variable {var.name!r} used before it is defined")

    def _run(self, op, env, state: State | None, function: str) -> dict[str, np.ndarray]:
        args = {name: self._value(var, env) for name, var in op.inputs.items()}
        if op.op_type == "read_state":
            out = state.read(args["input"])
        elif op.op_type == "coreml_update_state":
            value = np.asarray(args["value"]).astype(state.values[args["state"]].dtype)
            state.values[args["state"]] = value
            out = value
        elif op.op_type == "cast":
            out = np.asarray(args["x"])
        elif op.op_type in KERNELS:
            accepted = _KERNEL_PARAMS[op.op_type]
            try:
                out = KERNELS[op.op_type](**{k: v for k, v in args.items() if k in accepted})
            except Exception as exc:
                raise UnsupportedOpError(f"{self.package}:{function}: op {op.name!r} ({op.op_type}) failed: {exc}") from None
        else:
            raise UnsupportedOpError(
                f"{self.package}:{function}: the MIL reference executor cannot run op {op.name!r} of type {op.op_type!r}"
            )
        outputs = out if isinstance(out, (list, tuple)) else [out]
        with np.errstate(over="ignore", invalid="ignore"):
            return {var.name: _stored(value, var) for var, value in zip(op.outputs, outputs)}
