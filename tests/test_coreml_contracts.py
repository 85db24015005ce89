"""Core ML and export-lint items fail on the right function x length with a clear message:
a renamed output, a wrong dtype, an op dropped from the islands, int64 in the mask."""

from __future__ import annotations

import json

import pytest

from kdtrain.artifact_table import STUDENT_DISTILLED, coreml_package, export_graph
from conftest import reference_teacher

PACKAGE = coreml_package(64).path
SPEC = f"{PACKAGE}/Data/com.apple.CoreML/model.mlmodel"


def _edit_spec(workspace, change) -> None:
    from coremltools.proto import Model_pb2

    spec = Model_pb2.Model()
    spec.ParseFromString((workspace.artifacts / SPEC).read_bytes())
    change(spec)
    from kdtrain import atomic

    atomic.write_bytes(workspace.artifacts / SPEC, spec.SerializeToString())


def _function(spec, name):
    return next(f for f in spec.description.functions if f.name == name)


def test_renamed_output_fails_io_of_that_function_and_length(workspace):
    def rename(spec):
        next(o for o in _function(spec, "decode").output if o.name == "logits").name = "logit"

    _edit_spec(workspace, rename)
    result = workspace.run("-m", "coreml", "-k", "io")
    assert workspace.failed(result) == {"io[decode-64]"}
    result.stdout.fnmatch_lines([
        "*coreml_contract.json: IO of decode-64 in *student-L64.mlpackage",
        "*outputs: 'logits' missing (found [[]'halt', 'logit'[]])",
        "*outputs: unexpected 'logit'",
    ])


def test_wrong_dtype_fails_io(workspace):
    from coremltools.proto import FeatureTypes_pb2

    def retype(spec):
        feature = next(i for i in _function(spec, "prefill").input if i.name == "attention_mask")
        feature.type.multiArrayType.dataType = FeatureTypes_pb2.ArrayFeatureType.FLOAT32

    _edit_spec(workspace, retype)
    result = workspace.run("-m", "coreml", "-k", "io")
    assert workspace.failed(result) == {"io[prefill-64]"}
    result.stdout.fnmatch_lines(["*inputs: 'attention_mask' dtype expected int32, found float32"])


def test_op_dropped_from_the_converter_islands_fails_islands(workspace, reference_artifacts):
    """Convert with softmax missing from the islands the converter used; the contract still lists it."""
    islands = workspace.stage_context().contract("precision_islands.yaml").islands
    workspace.reconvert(reference_artifacts / STUDENT_DISTILLED.path, 64, tuple(i for i in islands if "softmax" not in i.op_types))
    result = workspace.run("-k", "islands")
    assert workspace.failed(result) == {"islands[prefill-64]", "islands[decode-64]"}
    result.stdout.fnmatch_lines([
        "*precision islands of prefill-64 in *student-L64.mlpackage",
        "*expected: every island op FP32, every island matching at least one op",
        "*attention_softmax: softmax * runs in fp16",
    ])


def test_island_that_matches_nothing_fails(workspace):
    import yaml

    path = workspace.contracts / "precision_islands.yaml"
    data = yaml.safe_load(path.read_text())
    data["islands"].append({"name": "typo_island", "op_types": ["sofmax"], "why": "a typo"})
    path.write_text(yaml.safe_dump(data))
    result = workspace.run("-k", "islands and prefill")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["*typo_island: matched no op (an island that matches nothing protects nothing)"])


def test_int64_into_the_mask_fails_lint_of_that_graph(workspace, reference_artifacts):
    from kdtrain.export.graph import summarize_program
    from kdtrain.student.model import StudentLM
    from test_export_lint import Int64MaskPrefill

    import torch

    from kdtrain.export.programs import example_inputs

    student = StudentLM.from_pretrained(reference_artifacts / STUDENT_DISTILLED.path)
    program = torch.export.export(Int64MaskPrefill(student, 64).eval(), example_inputs("prefill", 64)).run_decompositions({})
    workspace.write(export_graph("prefill", 64).path, json.dumps(summarize_program(program, "prefill", 64).to_json()))
    result = workspace.run("-k", "lint")
    assert workspace.failed(result) == {"lint[prefill-64]"}
    result.stdout.fnmatch_lines([
        "*export_lint.yaml: exported graph prefill-64*",
        "*[[]int64-path[]] node 'cumsum' (aten::cumsum) in (top level): int64 tensor reaches softmax/attention/mask arithmetic*",
    ])


@pytest.mark.parametrize("key, value, message", [
    ("enumerated_shapes", {"symbol": "L", "values": []}, "at enumerated_shapes.values: expected at least 1 item(s), found 0 item(s)"),
    ("deployment_target", "iOS17", "at deployment_target: expected one of ['iOS18', 'macOS15'], found \"iOS17\" (string)"),
])
def test_bad_coreml_contract_is_a_collection_error(workspace, key, value, message):
    workspace.edit_contract("coreml_contract.json", lambda d: d.update({key: value}))
    result = workspace.run("--collect-only")
    assert result.ret != 0
    assert message in result.stdout.str()


@pytest.mark.slow
def test_the_full_135m_teacher_converts_at_512(tmp_path, test_contracts):
    """The real SmolLM2-135M (30 layers) through the same export, lint and conversion path."""
    from dataclasses import replace

    from kdtrain.coreml.inspect import functions_io
    from kdtrain.coreml.stage import convert_length
    from kdtrain.stage import StageContext
    from kdtrain.artifacts import ArtifactsFolder
    from kdtrain.student.model import StudentConfig, StudentLM
    from kdtrain.teacher import source

    teacher = source.load_model(reference_teacher().source)
    config = StudentConfig.from_hf({k: v for k, v in teacher.config.to_dict().items() if k != "quantization_config"})
    model = StudentLM(config)
    model.load_state_dict(teacher.state_dict(), strict=False)
    model.init_halt_head()
    ctx = StageContext(ArtifactsFolder.create(tmp_path / "a"), test_contracts)
    coreml = ctx.contract("coreml_contract.json")

    def resized(fn):
        states = tuple(replace(s, shape=(config.num_hidden_layers, *s.shape[1:])) for s in fn.states)
        outputs = tuple(replace(o, shape=(1, config.vocab_size)) if o.name == "logits" else o for o in fn.outputs)
        return replace(fn, states=states, outputs=outputs)

    coreml = replace(coreml, functions={name: resized(fn) for name, fn in coreml.functions.items()})
    out = tmp_path / "teacher-L512.mlpackage"
    convert_length(model.eval(), 512, coreml, ctx.contract("export_lint.yaml").rules, ctx.contract("precision_islands.yaml").islands, out)
    io = functions_io(out)
    assert {s.shape for s in io["decode"].states} == {(30, 3, 512, 64)}
