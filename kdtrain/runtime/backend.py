"""One interface to run a converted package: ``new_state()`` and ``predict(function, inputs, state)``.

- ``coreml``: the Core ML runtime (macOS only): ``MLModel(function_name=…)``, ``make_state()``.
- ``mil-reference``: :class:`kdtrain.runtime.mil_executor.MILExecutor`, on any OS.
- ``torch``: the PyTorch programs the package was converted from, for live comparisons.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Protocol

import numpy as np


class Session(Protocol):
    backend: str

    def new_state(self): ...

    def copy_state(self, state):
        """An independent copy of ``state``, or None where the runtime cannot copy one (MLState)."""

    def restore_state(self, state, saved) -> None:
        """Overwrite ``state`` in place with a copy made by :meth:`copy_state`."""

    def is_fresh(self, state) -> bool:
        """Whether ``state`` is as ``new_state()`` made it (all zero)."""

    def state_bytes(self, state) -> int:
        """The bytes ``state`` holds (the KV cache): what a session costs a pool's memory budget."""

    def predict(self, function: str, inputs: dict[str, np.ndarray], state) -> dict[str, np.ndarray]: ...


def backend_name() -> str:
    return "coreml" if sys.platform == "darwin" else "mil-reference"


def describe_backend() -> str:
    if backend_name() == "coreml":
        return "coreml (Core ML runtime)"
    return f"mil-reference (MIL reference executor, FP16 emulated; Core ML prediction needs macOS, this is {sys.platform})"


class MILSession:
    backend = "mil-reference"

    def __init__(self, package: Path, program=None):
        from kdtrain.runtime.mil_executor import MILExecutor

        self.executor = MILExecutor(package, program)

    def new_state(self):
        return self.executor.new_state()

    def copy_state(self, state):
        from kdtrain.runtime.mil_executor import State

        return State({name: value.copy() for name, value in state.values.items()})

    def restore_state(self, state, saved) -> None:
        state.values.update({name: value.copy() for name, value in saved.values.items()})

    def is_fresh(self, state) -> bool:
        return not any(value.any() for value in state.values.values())

    def state_bytes(self, state) -> int:
        return sum(value.nbytes for value in state.values.values())

    def predict(self, function, inputs, state):
        return self.executor.predict(function, inputs, state)

    def read_state(self, state, name: str) -> np.ndarray:
        return state.read(name)


class CoreMLSession:
    backend = "coreml"

    def __init__(self, package: Path):
        self.package, self._models = Path(package), {}

    def _model(self, function: str):
        import coremltools as ct

        from kdtrain.coreml.inspect import functions_io
        from kdtrain.errors import ArtifactError

        if function not in self._models:
            found = functions_io(self.package)  # read from the spec: a clear error before the runtime's own
            if function not in found:
                raise ArtifactError(f"{self.package}: expected a function named {function!r}, found functions {sorted(found)}")
            self._models[function] = ct.models.MLModel(str(self.package), function_name=function, compute_units=ct.ComputeUnit.ALL)
        return self._models[function]

    def new_state(self):
        return self._model("prefill").make_state()

    def copy_state(self, state):
        return None  # an MLState cannot be copied: callers run the prefill again

    def restore_state(self, state, saved) -> None:
        raise TypeError("an MLState cannot be restored from a copy")

    def is_fresh(self, state) -> bool:
        return False

    def state_bytes(self, state) -> int:
        """From the prefill function's state descriptions: an MLState cannot be measured."""
        from coremltools.proto.FeatureTypes_pb2 import ArrayFeatureType as Array

        description = self._model("prefill").get_spec().description
        states = next((f.state for f in description.functions if f.name == "prefill"), description.state)
        size = {Array.FLOAT16: 2, Array.FLOAT32: 4, Array.INT32: 4, Array.DOUBLE: 8, Array.INT8: 1}
        return sum(int(np.prod(s.type.stateType.arrayType.shape)) * size[s.type.stateType.arrayType.dataType] for s in states)

    def predict(self, function, inputs, state):
        return {k: np.asarray(v) for k, v in self._model(function).predict(inputs, state=state).items()}

    def read_state(self, state, name: str) -> np.ndarray:
        return np.asarray(state.read_state(name))


class TorchSession:
    """The PyTorch programs of one length (prefill, decode, verify), sharing one KV cache like a package.
    ``segment``: verify's S, as the package's contract declares it (``CoreMLContract.segment``)."""

    backend = "torch"

    def __init__(self, student, length: int, segment: int | None = None):
        from kdtrain.export.programs import PROGRAMS, SEGMENT, build_program

        self.programs = {name: build_program(name, student, length, segment or SEGMENT) for name in PROGRAMS}

    def new_state(self) -> dict:
        prefill = self.programs["prefill"]
        return {"k_cache": prefill.k_cache.clone().zero_(), "v_cache": prefill.v_cache.clone().zero_()}

    def copy_state(self, state):
        return {name: value.clone() for name, value in state.items()}

    def restore_state(self, state, saved) -> None:
        for name, value in saved.items():
            state[name].copy_(value)

    def is_fresh(self, state) -> bool:
        return not any(bool(value.any()) for value in state.values())

    def state_bytes(self, state) -> int:
        return sum(value.nbytes for value in state.values())

    def predict(self, function, inputs, state):
        import torch

        program = self.programs[function]
        program.k_cache.copy_(state["k_cache"])
        program.v_cache.copy_(state["v_cache"])
        with torch.no_grad():
            logits, halt = program(*(torch.from_numpy(np.asarray(v)) for v in inputs.values()))
        state["k_cache"].copy_(program.k_cache)
        state["v_cache"].copy_(program.v_cache)
        return {"logits": logits.numpy(), "halt": halt.numpy()}

    def read_state(self, state, name: str) -> np.ndarray:
        return state[name].numpy().copy()


def open_package(package: Path, backend: str | None = None, program=None) -> Session:
    """``program``: the package's MIL program if already read (the executor shares it)."""
    backend = backend or backend_name()
    if backend == "coreml":
        return CoreMLSession(package)
    if backend == "mil-reference":
        return MILSession(package, program)
    raise ValueError(f"backend: expected 'coreml' or 'mil-reference', found {backend!r}")
