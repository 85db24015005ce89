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


@pytest.mark.parametrize("op", ["add", "sub", "mul", "real_div"])
def test_fp16_elementwise_equals_fp32_arithmetic_rounded_once(op):
    """The FP16 fast path of +, -, x, / gives, bit for bit, FP32 arithmetic rounded to FP16 (the
    executor's definition), overflow to inf and the NaN of inf - inf included."""
    from kdtrain.runtime.kernels import KERNELS, to_dtype

    rng = np.random.default_rng(0)
    with np.errstate(over="ignore"):  # some products overflow FP16 on purpose
        x = (rng.standard_normal((3, 64, 64)) * rng.choice([1e-6, 1.0, 300.0, 6e4], (3, 64, 64))).astype(np.float16)
        y = (rng.standard_normal((1, 64, 64)) * rng.choice([1e-6, 1.0, 300.0, 6e4], (1, 64, 64))).astype(np.float16)
    x[0, 0, :4], y[0, 0, :4] = [np.inf, np.inf, -np.inf, 0], [np.inf, -np.inf, 1, 0]
    fast = KERNELS[op](x, y)
    reference = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "real_div": np.divide}[op]
    with np.errstate(all="ignore"):
        slow = to_dtype(reference(x.astype(np.float32), y.astype(np.float32)), np.float16)
    assert fast.dtype == np.float16
    assert np.array_equal(fast.view(np.uint16)[~np.isnan(slow)], slow.view(np.uint16)[~np.isnan(slow)])
    assert np.array_equal(np.isnan(fast), np.isnan(slow))


def test_fp16_attention_matmul_by_row_blocks_equals_the_whole_product():
    from kdtrain.runtime.kernels import matmul

    rng = np.random.default_rng(1)
    probs = rng.random((1, 3, 2100, 1100)).astype(np.float16)  # > 4M elements: the row-block path
    values = rng.standard_normal((1, 3, 1100, 64)).astype(np.float16)
    whole = torch.matmul(torch.from_numpy(probs).float(), torch.from_numpy(values).float()).numpy()
    # The same products, summed in FP32 in another order: BLAS splits a block of 512 rows across
    # threads otherwise than the whole matrix, so sums of 1,100 terms (|sum| up to 86) differ in
    # their last bits (up to 5.6e-5 with two threads, none with one), far below FP16's ulp there (0.06).
    tolerance = dict(rtol=1e-5, atol=2e-4)
    np.testing.assert_allclose(matmul(probs, values), whole, **tolerance)
    np.testing.assert_allclose(matmul(probs, values.transpose(0, 1, 3, 2).copy(), transpose_y=True), whole, **tolerance)


def test_intermediates_are_dropped_once_dead_and_outputs_kept(tmp_path):
    import coremltools as ct

    executor = _convert(Square(), torch.ones(4), tmp_path / "sq.mlpackage", ct.precision.FLOAT16)
    y = executor.predict("main", {"x": np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)})["y"]
    assert y.tolist() == [2.0, 5.0, 10.0, 17.0]
    dead = {name for names in executor._last_use("main").values() for name in names}
    function = executor.program.functions["main"]
    assert dead and not dead & ({v.name for v in function.outputs} | set(function.inputs))


def test_the_functions_of_a_package_share_their_weights(reference_artifacts):
    """A multifunction package stores each weight once; the executor dequantizes it once and keeps
    one array (and one FP32 twin) for prefill, decode and verify."""
    from kdtrain.artifact_table import coreml_package

    executor = MILExecutor(reference_artifacts / coreml_package(64, "int8").path)
    prefill, decode, verify = (executor._constants(f) for f in ("prefill", "decode", "verify"))
    weights = [name for name, value in verify.items() if name in prefill and name in decode
               and isinstance(value, np.ndarray) and value.dtype == np.float16 and value.size > 1 << 16]
    assert len(weights) >= 20 and all(verify[n] is prefill[n] is decode[n] for n in weights)  # dequantized once


@pytest.mark.parametrize("rows", [2, 8, 32])
def test_a_few_rows_give_each_row_what_it_gives_alone_bit_for_bit(rows):
    """What makes verify's S rows equal S decode steps: BLAS sums one row (a matrix-vector product)
    in another order than a block of rows, so a few rows are computed one at a time."""
    from kdtrain.runtime.kernels import KERNELS

    rng = np.random.default_rng(rows)
    x = rng.standard_normal((1, 4, rows, 64)).astype(np.float16)  # [batch, heads, rows, head_dim]
    keys = rng.standard_normal((1, 4, 96, 64)).astype(np.float16)
    weight = rng.standard_normal((300, 64)).astype(np.float16)
    scores = KERNELS["matmul"](x, keys, transpose_y=True)
    projected = KERNELS["linear"](x, weight)
    for i in range(rows):
        assert np.array_equal(scores[..., i:i + 1, :], KERNELS["matmul"](x[..., i:i + 1, :], keys, transpose_y=True))
        assert np.array_equal(projected[..., i:i + 1, :], KERNELS["linear"](x[..., i:i + 1, :], weight))


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_verify_gives_decodes_logits_bit_for_bit(reference_artifacts, precision):
    """Speculative decoding on the executor is exact with no allowance: one verify call over S
    greedy tokens gives, row by row, the very logits S decode steps give."""
    from kdtrain.artifact_table import coreml_package
    from kdtrain.export.programs import SEGMENT
    from kdtrain.runtime.backend import MILSession
    from kdtrain.runtime.host import Host

    host = Host(MILSession(reference_artifacts / coreml_package(64, precision).path), 64, pad_id=0)
    prompt = list(range(100, 120))
    state, logits = host.prefill(prompt)
    tokens, decoded = [], []
    for _ in range(SEGMENT):
        tokens.append(int(np.argmax(logits)))
        state, logits = host.decode_step(state, tokens[-1])
        decoded.append(logits)
    _, verified, _ = host.verify(host.prefill(prompt)[0], tokens, SEGMENT)
    for row, (expected, found) in enumerate(zip(decoded, verified)):
        assert np.array_equal(expected, found), f"row {row}: max |diff| {np.abs(expected - found).max()}"
