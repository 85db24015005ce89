"""Core ML and export-lint items fail on the right function x length with a clear message:
a renamed output, a wrong dtype, an op dropped from the islands, int64 in the mask, a package
without its verify function; a contract without verify (host API 1.0) still loads."""

from __future__ import annotations

import json

import pytest

from kdtrain.artifact_table import STUDENT_DISTILLED, coreml_package, export_graph
from conftest import REPO, reference_teacher

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
    assert workspace.failed(result) == {"islands[prefill-64]", "islands[decode-64]", "islands[verify-64]"}
    result.stdout.fnmatch_lines([
        "*precision islands of prefill-64 in *student-L64.mlpackage",
        "*expected: every island op FP32, every island matching at least one op",
        "*attention_softmax: softmax * runs in fp16",
    ])


def _drop_verify(spec) -> None:
    """A package of host API 1.0: no verify in its description nor in its program."""
    spec.description.functions.remove(_function(spec, "verify"))
    del spec.mlProgram.functions["verify"]


def test_a_package_without_verify_fails_every_item_that_needs_it_naming_it(workspace):
    _edit_spec(workspace, _drop_verify)
    result = workspace.run("-k", "verify and 64")
    # the export lint reads the exported graph and the INT8 package keeps its verify: both pass
    assert workspace.failed(result) == {"io[verify-64]", "golden[verify-64]", "verify_decode[64]", "ane_residency[verify-64]",
                                        "islands[verify-64]"}
    result.stdout.fnmatch_lines([
        "*coreml_contract.json: function 'verify' in *student-L64.mlpackage",
        "*expected: a function named 'verify'",
        "*found:    functions [[]'decode', 'prefill'[]]",
        "*re-convert the package (`kdtrain convert`), or drop the function from coreml_contract.json*",
    ])


def test_a_host_on_a_package_without_verify_names_the_package_and_the_function(workspace):
    """What a speculative decoder meets on a host API 1.0 package, on either runtime."""

    from kdtrain.errors import ArtifactError
    from kdtrain.runtime.backend import CoreMLSession, MILSession
    from kdtrain.runtime.host import Host

    _edit_spec(workspace, _drop_verify)
    package = workspace.artifacts / PACKAGE
    for session in (MILSession(package), CoreMLSession(package)):  # Core ML: refused from the spec, before any runtime
        host = Host(session, 64, pad_id=0)
        with pytest.raises(ArtifactError, match=r"student-L64\.mlpackage: expected a function named 'verify', "
                                                r"found functions \['decode', 'prefill'\]"):
            host.verify(type("S", (), {"position": 3, "cache": None})(), [1, 2], 8)


def test_a_contract_without_verify_checks_a_package_without_it(workspace):
    """A package converted elsewhere for host API 1.0 goes with a contract that declares no verify."""
    def host_api_1_0(contract):
        del contract["functions"]["verify"]
        contract["host_api_version"] = "1.0"

    _edit_spec(workspace, _drop_verify)
    workspace.edit_contract("coreml_contract.json", host_api_1_0)
    (workspace.contracts / "speculative.yaml").unlink(missing_ok=True)  # speculative decoding needs verify
    workspace.edit_json("manifest.json", lambda m: m["stages"]["convert"]["settings"].update(host_api_version="1.0"))
    result = workspace.run("-k", "host_api_version or (64 and (io or islands or prefill_decode))")
    assert workspace.failed(result) == set() and result.ret == 0
    result.stdout.fnmatch_lines(["passed  coreml_contract.json::host_api_version *1 passed",
                                 "passed  coreml_contract.json::io *2 passed",  # prefill and decode: no verify item
                                 "passed  coreml_contract.json::prefill_decode *1 passed",
                                 "passed  precision_islands.yaml::islands *2 passed"])


def test_the_segment_is_verifys_declared_input_length(tmp_path):
    from kdcontracts.errors import ContractFileError
    from kdcontracts.families import load

    reference = json.loads((REPO / "contracts/coreml_contract.json").read_text())
    assert load(REPO / "contracts/coreml_contract.json").segment == 8
    path = tmp_path / "coreml_contract.json"
    without = {**reference, "functions": {k: v for k, v in reference["functions"].items() if k != "verify"}}
    path.write_text(json.dumps(without))
    contract = load(path)
    assert contract.segment is None and "verify" not in dict(contract.items())
    with pytest.raises(ContractFileError, match=r"at functions\.verify: expected a function named 'verify', found functions \['decode', 'prefill'\]"):
        contract.function("verify")
    reference["functions"]["verify"]["inputs"][0]["shape"] = [1, "L"]
    path.write_text(json.dumps(reference))
    with pytest.raises(ContractFileError, match=r"at functions\.verify\.inputs\[0\]\.shape: expected \[1, S\] with S a number of "
                                                r"tokens in 1\.\.512 \(the shortest enumerated length\), found \[1, 'L'\]"):
        load(path)


def test_export_and_conversion_take_the_segment_from_the_contract(monkeypatch, tmp_path, test_contracts):
    """Not SEGMENT, the default for code without a contract: a contract declaring S=3 gets a verify of 3 tokens."""
    from kdcontracts.families import load
    from kdtrain.coreml import stage
    from kdtrain.student.model import StudentConfig, StudentLM

    def three_tokens(contract):
        verify = contract["functions"]["verify"]
        for tensor in verify["inputs"][:1] + verify["outputs"]:
            tensor["shape"][1] = 3

    contract = json.loads((test_contracts / "coreml_contract.json").read_text())
    three_tokens(contract)
    (tmp_path / "coreml_contract.json").write_text(json.dumps(contract))
    shapes = {}
    monkeypatch.setattr(stage, "convert_function", lambda program, io, *a: shapes.update({io: tuple(program.example_inputs[0][0].shape)}))
    monkeypatch.setattr(stage, "save_multifunction", lambda *a, **k: None)
    tiny = StudentConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True)
    coreml = load(tmp_path / "coreml_contract.json")
    stage.convert_length(StudentLM(tiny).eval(), 16, coreml, load(test_contracts / "export_lint.yaml").rules, (), None)
    assert {name: shapes[io] for name, io in coreml.functions.items()} == {"prefill": (1, 16), "decode": (1, 1), "verify": (1, 3)}


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
        outputs = tuple(replace(o, shape=(*o.shape[:-1], config.vocab_size)) if o.name == "logits" else o for o in fn.outputs)
        return replace(fn, states=states, outputs=outputs)

    coreml = replace(coreml, functions={name: resized(fn) for name, fn in coreml.functions.items()})
    out = tmp_path / "teacher-L512.mlpackage"
    convert_length(model.eval(), 512, coreml, ctx.contract("export_lint.yaml").rules, ctx.contract("precision_islands.yaml").islands, out)
    io = functions_io(out)
    assert {s.shape for s in io["decode"].states} == {(30, 3, 512, 64)}
