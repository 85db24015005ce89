"""The MIL reference executor: FP16 as the device stores it, and a clear error on an unknown op."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdtrain.runtime.mil_executor import MILExecutor, UnsupportedOpError


def _convert(module: torch.nn.Module, example: torch.Tensor, path, precision):
    import coremltools as ct

    program = torch.export.export(module.eval(), (example,)).run_decompositions({})
    model = ct.convert(program, inputs=[ct.TensorType(name="x", shape=example.shape)], outputs=[ct.TensorType(name="y")],
                       minimum_deployment_target=ct.target.iOS18, compute_precision=precision, skip_model_load=True)
    model.save(str(path))
    return MILExecutor(path)


class Square(torch.nn.Module):
    def forward(self, x):
        return x * x + 1.0


def test_fp16_overflow_becomes_inf_where_the_device_would(tmp_path):
    import coremltools as ct

    executor = _convert(Square(), torch.ones(4), tmp_path / "sq.mlpackage", ct.precision.FLOAT16)
    y = executor.predict("main", {"x": np.array([1.0, 200.0, 300.0, -1e5], dtype=np.float32)})["y"]
    assert y.dtype == np.float16
    assert y[0] == 2.0 and y[1] == np.float16(40001.0) and np.isinf(y[2]) and np.isinf(y[3])  # 300^2 > 65504


def test_fp32_program_keeps_fp32(tmp_path):
    import coremltools as ct

    executor = _convert(Square(), torch.ones(2), tmp_path / "sq32.mlpackage", ct.precision.FLOAT32)
    y = executor.predict("main", {"x": np.array([300.0, 2.0], dtype=np.float32)})["y"]
    assert y.dtype == np.float32 and y.tolist() == [90001.0, 5.0]


class Erf(torch.nn.Module):
    def forward(self, x):
        return torch.erf(x)


def test_an_op_it_cannot_run_is_named(tmp_path):
    import coremltools as ct

    executor = _convert(Erf(), torch.ones(3), tmp_path / "erf.mlpackage", ct.precision.FLOAT16)
    with pytest.raises(UnsupportedOpError, match=r"cannot run op '.*' of type 'erf'"):
        executor.predict("main", {"x": np.zeros(3, dtype=np.float32)})
