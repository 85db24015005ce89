"""Convert the student's exported programs to one multifunction mlpackage per length.

Why one multifunction package per enumerated length: prefill, decode and verify must share the KV
cache, and Core ML states are shared only between functions of one model; functions also
share (deduplicated) weights. One package per length keeps every shape static, the ANE's
best case, and lets each length be verified, shipped or dropped alone.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

import numpy as np

from kdcontracts.models.islands import Island
from kdtrain import atomic
from kdtrain.errors import ArtifactError, KDError

_NP = {"int32": np.int32, "float16": np.float16, "float32": np.float32}


class LintError(KDError):
    """The linter found problems: conversion is not attempted."""


def fp16_selector(islands: tuple[Island, ...]):
    """``op_selector`` for FP16ComputePrecision: True means 'compute this op in FP16'."""
    return lambda op: not any(island.matches(op.op_type, op.name) for island in islands)


def convert_function(program, io, islands: tuple[Island, ...], length_symbol: str, length: int):
    """One exported program -> an MLModel (not saved). ``io`` is the contract's function IO."""
    import coremltools as ct

    def shape(dims):
        return tuple(length if d == length_symbol else d for d in dims)

    return ct.convert(
        program,
        inputs=[ct.TensorType(name=t.name, shape=shape(t.shape), dtype=_NP[t.dtype]) for t in io.inputs],
        outputs=[ct.TensorType(name=t.name) for t in io.outputs],
        states=[ct.StateType(wrapped_type=ct.TensorType(shape=shape(t.shape), dtype=_NP[t.dtype]), name=t.name) for t in io.states],
        minimum_deployment_target=ct.target.iOS18,
        compute_precision=ct.transform.FP16ComputePrecision(op_selector=fp16_selector(islands)),
        skip_model_load=True,
    )


def save_multifunction(models: dict, out: Path, default: str) -> None:
    """Save {function name: MLModel} as one mlpackage, atomically."""
    import coremltools as ct

    with tempfile.TemporaryDirectory() as scratch:
        desc = ct.utils.MultiFunctionDescriptor()
        for name, model in models.items():
            single = Path(scratch) / f"{name}.mlpackage"
            model.save(str(single))
            desc.add_function(str(single), src_function_name="main", target_function_name=name)
        desc.default_function_name = default
        with _package_folder(out) as package:
            ct.utils.save_multifunction(desc, str(package))


@contextlib.contextmanager
def scratch(out: Path | None):
    """Run coremltools with its temporary packages in a folder beside ``out``, removed at the end.

    coremltools writes every intermediate MLModel (each ``ct.convert`` result, each package that
    ``save_multifunction`` assembles) as a package in the system temp folder and removes it only at
    interpreter exit (``atexit``): a pool worker or a test session that converts dozens of packages
    leaves gigabytes there. coremltools takes no folder argument, so ``tempfile.tempdir`` is set
    for the block. A failure with the disk nearly full says so: coremltools then reports a package
    with no valid manifest (it could not write one), which names neither the cause nor the disk.
    """
    parent = None if out is None else Path(out).parent
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    previous = tempfile.tempdir
    with tempfile.TemporaryDirectory(dir=parent, prefix=".coreml-scratch-") as folder:
        tempfile.tempdir = folder
        try:
            yield Path(folder)
        except Exception as exc:
            free = shutil.disk_usage(folder).free
            if free < LOW_DISK_BYTES:
                raise ArtifactError(f"{out or folder}: expected room to write a Core ML package, found {free / 2**20:.0f} MiB "
                                    f"free on the disk holding {folder} (coremltools said: {exc})") from exc
            raise
        finally:
            tempfile.tempdir = previous


LOW_DISK_BYTES = 1 << 30
"""Below this much free space a failed package write is reported as a full disk: one reference
package is 0.1-0.3 GiB, and coremltools holds three or four copies of it while it writes one."""


def save_package(model, out: Path) -> None:
    """Save an MLModel as ``out``, atomically."""
    with _package_folder(out) as package:
        model.save(str(package))


@contextlib.contextmanager
def _package_folder(out: Path):
    """A path to save an mlpackage at; its contents become ``out`` (atomically) when the block succeeds."""
    with atomic.directory(out) as tmp:
        package = tmp / "model.mlpackage"
        yield package
        for item in package.iterdir():
            item.rename(tmp / item.name)
        package.rmdir()
