"""Golden, prefill/decode and host-API items fail on the right item with a clear message:
flipped weight bytes, an FP16 mask built from float32's min, an off-by-one KV index, a
snapshot made for another model, artifacts of another host API version."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

PACKAGE = "coreml/fp16/student-L64.mlpackage"


@pytest.fixture
def golden_workspace(workspace):
    """A workspace whose golden/ snapshots were written from the reference artifacts."""
    workspace.run("--snapshot-update", "-m", "golden").assert_outcomes(passed=6)
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
        golden_workspace.reconvert(reference_artifacts / "student/distilled", 64)
    result = golden_workspace.run("-m", "golden", "-k", "64")
    assert golden_workspace.failed(result) == {"golden[prefill-64]", "golden[decode-64]", "prefill_decode[64]"}
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
        golden_workspace.reconvert(reference_artifacts / "student/distilled", 64)
    result = golden_workspace.run("-m", "golden", "-k", "64")
    assert "prefill_decode[64]" in golden_workspace.failed(result)
    assert "golden[prefill-64]" not in golden_workspace.failed(result)
    result.stdout.fnmatch_lines([
        "*KV cache after decode step 1 at L=64",
        "*expected: position 17 -> 18, slot 17 written",
        "*found:    position 18, slots written [[]18[]]",
    ])


def test_snapshot_made_for_another_model_fails(golden_workspace):
    path = next((golden_workspace.pytester.path / "golden/coreml_contract").glob("golden*prefill-64*.npz"))
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    meta = json.loads(arrays["__meta__"].tobytes())
    meta["model"] = "student.checkpoint sha256:" + "e" * 64
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    rng = np.random.default_rng(0)
    arrays["torch_logits"] = rng.permutation(arrays["torch_logits"])  # another model's outputs
    arrays["backend_logits"] = rng.permutation(arrays["backend_logits"])
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    path.write_bytes(buffer.getvalue())
    result = golden_workspace.run("-m", "golden", "-k", "golden and 64")
    assert golden_workspace.failed(result) == {"golden[prefill-64]"}
    result.stdout.fnmatch_lines([
        "*prefill-64 against its golden snapshot*",
        "*snapshot made for model student.checkpoint sha256:eeee*, the artifacts hold student.distilled from student.checkpoint sha256:*",
        "*torch_logits: cosine *",
    ])


def test_missing_snapshot_names_the_update_command(workspace):
    result = workspace.run("-m", "golden", "-k", "golden and prefill-64")
    assert workspace.failed(result) == {"golden[prefill-64]"}
    result.stdout.fnmatch_lines(["*none (write it with: pytest --kd-contracts … -m golden --snapshot-update)"])


def test_artifacts_of_another_host_api_version_fail_loudly(workspace):
    workspace.edit_json("manifest.json", lambda m: m["stages"]["convert"]["settings"].update(host_api_version="0.9"))
    result = workspace.run("-k", "host_api_version or prefill_decode")
    assert workspace.failed(result) == {"host_api_version", "prefill_decode[64]", "prefill_decode[128]"}
    result.stdout.fnmatch_lines(["*at stages.convert.settings.host_api_version: expected '1.0'*, found '0.9'; re-run `kdtrain convert`"])
