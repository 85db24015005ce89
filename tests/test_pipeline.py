"""The reference pipeline's outputs: migration audit log and the student checkpoint."""

from __future__ import annotations

import json

from kdtrain.artifact_table import (FIXED, JUDGE_CACHE, MIGRATION_AUDIT, QUANT_SIZE_ACCURACY_PLOT, STUDENT_CHECKPOINT, STUDENT_DISTILLED,
                                    STUDENT_INIT, TEACHER_BUDGET, coreml_package, export_graph, export_lint)
from kdtrain.artifacts import ArtifactsFolder
from kdtrain.tokenizers.migration import TAGS
from conftest import reference_teacher


def test_manifest_lists_every_reference_artifact(reference_artifacts):
    from conftest import TEST_LENGTHS

    folder = ArtifactsFolder.open(reference_artifacts)
    per_length = {family(fn, n) for family in (export_graph, export_lint) for fn in ("prefill", "decode", "verify") for n in TEST_LENGTHS}
    per_length |= {coreml_package(n, p) for p in ("fp16", "int8") for n in TEST_LENGTHS}
    expected = {a for a in FIXED if a not in (TEACHER_BUDGET, JUDGE_CACHE)} | per_length  # the reference teacher is local: no budget, no API replies
    assert {name: (e.path, e.kind, e.stage) for name, e in folder.manifest.artifacts.items()} == {
        a.name: (a.path, a.kind, a.stage) for a in expected}
    assert set(folder.manifest.stages) == {"tokenizers", "data", "student", "teacher", "distill", "ablations", "export",
                                           "convert", "quantize", "runtime", "speculative", "gates", "judge"}
    assert folder.exported_student() == STUDENT_DISTILLED
    assert folder.path(QUANT_SIZE_ACCURACY_PLOT).stat().st_size > 0
    assert all(folder.path(name).exists() for name in folder.manifest.artifacts)


def test_audit_log_records_the_teacher_splits_named_in_the_issue(reference_artifacts):
    audit = json.loads((reference_artifacts / MIGRATION_AUDIT.path).read_text())
    added = {a["text"]: a for a in audit["added_tokens"]}
    assert list(added) == list(TAGS)
    assert added["<think>"]["teacher_pieces"] == ["<", "think", ">"]
    assert len(added["<tool_call>"]["teacher_ids"]) == 5
    assert [a["id"] for a in added.values()] == list(range(49152, 49158))
    assert audit["from"]["vocab_sha256"] != audit["to"]["vocab_sha256"]
    unchanged = [s for s in audit["samples"] if not s["changed"]]
    assert unchanged and all("<think>" not in s["text"] for s in unchanged)


def test_student_checkpoint_is_small_and_its_new_rows_are_teacher_means(reference_artifacts):
    import torch
    from safetensors.torch import load_file

    config = json.loads((reference_artifacts / STUDENT_CHECKPOINT.path / "config.json").read_text())
    assert config["num_hidden_layers"] == 3 and config["hidden_size"] <= 576 and config["vocab_size"] == 49158
    weights = load_file(reference_artifacts / STUDENT_CHECKPOINT.path / "model.safetensors")
    embed = weights["model.embed_tokens.weight"]
    init = json.loads((reference_artifacts / STUDENT_INIT.path).read_text())
    row = init["embedding_init"]["rows"]["<think>"]
    assert torch.allclose(embed[row["id"]], embed[row["teacher_ids"]].mean(dim=0))
    assert init["teacher_layers"] == [0, 14, 29] and init["teacher"] == reference_teacher().version
    assert init["method"] == "teacher_layers" and init["teacher_family"] == "llama"
