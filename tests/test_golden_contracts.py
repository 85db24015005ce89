"""Golden, prefill/decode, verify/decode and host-API items fail on the right item with a clear
message: flipped weight bytes, an FP16 mask built from float32's min, an off-by-one KV index, a
verify that writes its rows to the wrong slots, a snapshot made for another model, artifacts of
another host API version."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from kdtrain.artifact_table import STUDENT_DISTILLED, coreml_package

PACKAGE = coreml_package(64).path


@pytest.fixture
def golden_workspace(workspace):
    """A workspace whose golden/ snapshots were written from the reference artifacts."""
    # the snapshots alone (3 functions x 2 lengths): the consistency items write none
    workspace.run("--snapshot-update", "-m", "golden", "-k", "not prefill_decode and not verify_decode").assert_outcomes(passed=6)
    return workspace


def test_flipped_weight_bytes_fail_golden_and_consistency(golden_workspace):
    weights = golden_workspace.artifacts / PACKAGE / "Data/com.apple.CoreML/weights/weight.bin"
    data = bytearray(weights.read_bytes())
    for start in range(len(data) // 20, len(data), len(data) // 20):  # 4 KiB flipped every 5% of the file
        data[start:start + 4096] = bytes(b ^ 0xFF for b in data[start:start + 4096])
    golden_workspace.write(str(weights.relative_to(golden_workspace.artifacts)), "")  # new inode first
    weights.write_bytes(bytes(data))
    result = golden_workspace.run("-m", "golden")
    assert {"golden[prefill-64]", "golden[decode-64]", "prefill_decode[64]"} <= golden_workspace.failed(result)
    assert not any(name.endswith("128]") for name in golden_workspace.failed(result))
    result.stdout.fnmatch_lines(["*prefill-64 logits, mil-reference vs PyTorch*"])


def test_fp16_mask_from_float32_min_gives_nan_and_fails(golden_workspace, reference_artifacts, monkeypatch):
    import kdtrain.export.programs as programs

    with monkeypatch.context() as patch:  # not monkeypatch.undo(): pytester's chdir is on it too
        patch.setattr(programs, "MASK_MIN", float(torch.finfo(torch.float32).min))
        golden_workspace.reconvert(reference_artifacts / STUDENT_DISTILLED.path, 64)
    result = golden_workspace.run("-m", "golden", "-k", "64")
    assert golden_workspace.failed(result) == {"golden[prefill-64]", "golden[decode-64]", "golden[verify-64]",
                                               "prefill_decode[64]", "verify_decode[64]"}
    result.stdout.fnmatch_lines([
        "*prefill-64 logits, mil-reference vs PyTorch",
        "*expected: cosine >= 0.999, no NaN or Inf",
        "*found:    cosine nan, max |diff| inf, non-finite 49158*",
    ])


def test_off_by_one_kv_index_fails_prefill_decode(golden_workspace, reference_artifacts, monkeypatch):
    import kdtrain.export.programs as programs

    class OffByOne(programs.DecodeProgram):
        def forward(self, input_ids, position):
            return super().forward(input_ids, position + 1)  # writes (and ropes) one slot too far

    with monkeypatch.context() as patch:
        patch.setitem(programs.PROGRAMS, "decode", OffByOne)
        golden_workspace.reconvert(reference_artifacts / STUDENT_DISTILLED.path, 64)
    result = golden_workspace.run("-m", "golden", "-k", "64")
    assert "prefill_decode[64]" in golden_workspace.failed(result)
    assert "golden[prefill-64]" not in golden_workspace.failed(result)
    result.stdout.fnmatch_lines([
        "*KV cache after decode step 1 at L=64",
        "*expected: position 17 -> 18, slot 17 written",
        "*found:    position 18, slots written [[]18[]]",
    ])


def test_verify_writing_its_rows_one_slot_too_far_fails_verify_decode(workspace, reference_artifacts, monkeypatch):
    import kdtrain.export.programs as programs

    class OneSlotTooFar(programs.VerifyProgram):
        def forward(self, input_ids, position):
            return super().forward(input_ids, position + 1)  # rows at slots position+1.., roped there too

    with monkeypatch.context() as patch:
        patch.setitem(programs.PROGRAMS, "verify", OneSlotTooFar)
        workspace.reconvert(reference_artifacts / STUDENT_DISTILLED.path, 64, only=("verify",))
    result = workspace.run("-k", "verify_decode")
    assert workspace.failed(result) == {"verify_decode[64]"}  # decode and the other length unharmed
    result.stdout.fnmatch_lines([
        "*coreml_contract.json: KV cache after verify of 8 tokens at position 17, L=64",
        "*expected: position 17 -> 25, slots 17..24 written",
        "*found:    position 25, slots written [[]18, 19, 20, 21, 22, 23, 24, 25[]]",
    ])


def test_an_executor_whose_verify_is_not_decode_bit_for_bit_fails_verify_decode(workspace, monkeypatch):
    """Computed as one matrix product, verify's rows round otherwise than decode's single row: within
    the golden tolerance, but no longer exact, and speculative decoding on the executor relies on exact."""
    import kdtrain.runtime.kernels as kernels

    monkeypatch.setattr(kernels, "ROW_BY_ROW", 0)
    result = workspace.run("-k", "verify_decode")
    assert workspace.failed(result) == {"verify_decode[64]", "verify_decode[128]"}
    result.stdout.fnmatch_lines(["*verify of 8 greedy tokens at position * at L=64, mil-reference: row 0",
                                 "*expected: the logits of decode step 0, bit for bit (what makes speculative decoding exact on mil-reference)"])


def _edit_snapshot(workspace, item: str, change_meta, change_arrays=lambda arrays: None):
    """Rewrite one stored golden snapshot as another machine or another model would have made it."""
    path = workspace.pytester.path / f"golden/coreml_contract/golden[{item}].npz"
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    meta = json.loads(arrays["__meta__"].tobytes())
    change_meta(meta)
    change_arrays(arrays)
    arrays["__meta__"] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    path.write_bytes(buffer.getvalue())
    return path


def test_snapshot_of_another_model_fails_naming_the_inputs_that_differ(golden_workspace):
    rng = np.random.default_rng(0)

    def another_model(arrays):
        arrays["torch_logits"] = rng.permutation(arrays["torch_logits"])
        arrays["backend_logits"] = rng.permutation(arrays["backend_logits"])

    _edit_snapshot(golden_workspace, "prefill-64", lambda m: m["model"].update(config="e" * 64), another_model)
    result = golden_workspace.run("-m", "golden", "-k", "golden and 64")
    assert golden_workspace.failed(result) == {"golden[prefill-64]"}
    result.stdout.fnmatch_lines([
        "*prefill-64 against its golden snapshot*",
        "*torch_logits: cosine *",
        "*made from other inputs than the snapshot: config: eeee* -> *",
    ])


def test_snapshot_from_another_machine_passes_when_values_agree(golden_workspace):
    """Another CPU: other teacher-cache and weight bytes, logits that agree at cosine ~0.99999."""
    rng = np.random.default_rng(1)

    def other_numerics(meta):
        meta["numerics"] = {k: "sha256:" + "a" * 64 for k in meta["numerics"]}

    def drifted(arrays):
        for name in ("torch_logits", "backend_logits"):
            arrays[name] = arrays[name] + rng.normal(0, 1e-3 * arrays[name].std(), arrays[name].shape).astype(np.float32)

    path = _edit_snapshot(golden_workspace, "decode-64", other_numerics, drifted)
    before = path.read_bytes()
    result = golden_workspace.run("-m", "golden", "-k", "golden and 64")
    assert golden_workspace.failed(result) == set()
    result.stdout.fnmatch_lines(["*golden[[]decode-64[]]: values agree with the snapshot made from other inputs "
                                 "(student.distilled: sha256:aaaaaaaaaaaa… -> sha256:*; teacher.cache: sha256:aaaaaaaaaaaa… -> sha256:*)"])
    golden_workspace.run("-m", "golden", "-k", "golden and 64", "--snapshot-update")
    assert path.read_bytes() == before, "numerics alone must not rewrite a snapshot (no churn across machines)"


def test_snapshot_update_records_changed_model_inputs(golden_workspace):
    path = _edit_snapshot(golden_workspace, "prefill-128", lambda m: m["model"].update(steps=999))
    assert golden_workspace.run("-m", "golden", "-k", "golden and prefill-128").ret == 0  # values agree: passes
    golden_workspace.run("-m", "golden", "-k", "golden and prefill-128", "--snapshot-update")
    with np.load(path, allow_pickle=False) as npz:
        assert json.loads(npz["__meta__"].tobytes())["model"]["steps"] != 999


def test_missing_snapshot_names_the_update_command(workspace):
    result = workspace.run("-m", "golden", "-k", "golden and prefill-64")
    assert workspace.failed(result) == {"golden[prefill-64]"}
    result.stdout.fnmatch_lines(["*none (write it with: pytest --kd-contracts … -m golden --snapshot-update)"])


def test_artifacts_of_another_host_api_version_fail_loudly(workspace):
    workspace.edit_json("manifest.json", lambda m: m["stages"]["convert"]["settings"].update(host_api_version="0.9"))
    result = workspace.run("-k", "host_api_version or prefill_decode")
    assert workspace.failed(result) == {"host_api_version", "prefill_decode[64]", "prefill_decode[128]"}
    result.stdout.fnmatch_lines(["*at stages.convert.settings.host_api_version: expected '1.1'*, found '0.9'; re-run `kdtrain convert`"])
