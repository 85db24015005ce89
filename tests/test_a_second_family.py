"""Your own models: a second family through ``kdtrain init`` -> ``kdtrain pipeline`` -> the contracts.

The teacher is a tiny, randomly initialised Qwen3 (another architecture: its attention has
per-head norms, so the student's layers start fresh from its embeddings) with a
SentencePiece-style tokenizer unlike SmolLM2's: byte fallback, BOS added by the tokenizer,
PAD different from EOS, a Zephyr chat template. Both are built in the test (tests/tiny_family.py).
Green on the real build; red, on the right items, on planted faults.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import Workspace
from kdtrain.add import add_artifact
from tiny_family import build_teacher, build_tokenizer

LENGTHS = "64"  # one length keeps the build under a minute; the reference covers several
STEPS = 6


def _env() -> dict:
    """Commands this test starts are not xdist workers (syrupy would keep its report for a controller)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{args}: exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _build(root: Path) -> Path:
    tokenizer = build_tokenizer(root / "tokenizer")
    teacher = build_teacher(root / "teacher", tokenizer, arch="qwen3")
    project = root / "project"
    _run("-m", "kdtrain.cli", "init", "--teacher", str(teacher), "--lengths", LENGTHS, "--steps", str(STEPS),
         "--samples-per-scenario", "2", str(project), cwd=root)
    _run("-m", "kdtrain.cli", "pipeline", "--config", str(project / "distill.yaml"), "--contracts", str(project / "contracts"),
         "--out", str(project / "artifacts"), cwd=root)
    _run("-m", "pytest", "--kd-contracts", "contracts", "-m", "golden", "--snapshot-update", "-p", "no:cacheprovider", "-q", cwd=project)
    assert sorted(p.name for p in (project / "golden/coreml_contract").iterdir()) == [
        "golden[decode-64].npz", "golden[prefill-64].npz", "golden[verify-64].npz"]
    return project


@pytest.fixture(scope="session")
def own_project(tmp_path_factory, worker_id) -> Path:
    """The second family's project, built once a run (shared by xdist workers under a lock)."""
    if worker_id == "master":
        return _build(tmp_path_factory.mktemp("own"))
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp().parent / "own"
    with FileLock(f"{root}.lock"):
        if not (root / "built").exists():
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir()
            _build(root)
            (root / "built").touch()
    return root / "project"


@pytest.fixture
def own_workspace(pytester, own_project) -> Workspace:
    workspace = Workspace(pytester, own_project / "contracts", own_project / "artifacts")
    shutil.copytree(own_project / "golden", pytester.path / "golden")
    return workspace


def test_init_writes_contracts_from_the_real_tokenizers(own_project):
    tokens = json.loads((own_project / "contracts/tokens.json").read_text())
    roles = {tuple(t["roles"]): t for t in tokens["special_tokens"]}
    assert roles[("bos",)]["text"] == "<s>" and roles[("eos",)]["text"] == "</s>" and roles[("pad",)]["text"] == "<pad>"
    assert roles[("pad",)]["ids"]["student"] != roles[("eos",)]["ids"]["student"]
    think = next(t for t in tokens["special_tokens"] if t["text"] == "<think>")
    assert think["ids"]["teacher"] is None and think["ids"]["student"] == think["ids"]["runtime"] >= 1200
    prompt = next(p["text"] for p in tokens["round_trip_prompts"] if p["name"] == "think_then_answer")
    assert prompt.startswith("<|user|>\n") and "<|im_start|>" not in prompt  # the tokenizer's chat format, not ChatML
    coreml = json.loads((own_project / "contracts/coreml_contract.json").read_text())
    assert coreml["enumerated_shapes"]["values"] == [64]
    assert coreml["functions"]["decode"]["states"][0]["shape"] == [3, 2, "L", 16]  # layers, KV heads, L, head dim
    assert coreml["golden"]["prompt"].endswith("<|assistant|>\n<think>")


def test_the_student_starts_from_the_teachers_embeddings_when_the_family_differs(own_project):
    from safetensors.torch import load_file

    init = json.loads((own_project / "artifacts/student/init.json").read_text())
    assert init["method"] == "teacher_embeddings" and init["teacher_family"] == "qwen3" and init["teacher_layers"] == []
    assert "qwen3" in init["why"]
    student = load_file(own_project / "artifacts/student/checkpoint/model.safetensors")
    teacher = load_file(own_project.parent / "teacher/model.safetensors")
    rows = teacher["model.embed_tokens.weight"].shape[0]
    assert (student["model.embed_tokens.weight"][:rows] == teacher["model.embed_tokens.weight"]).all()


def test_the_second_family_passes_every_contract(own_workspace):
    result = own_workspace.run("-q")
    summary = next(line for line in result.outlines if line.startswith("contracts: "))
    assert "failed" not in summary and result.ret == 0, summary
    for family in ("tokens.json::", "coreml_contract.json::golden", "quant_recipe.yaml::ab", "distill_data.yaml::teacher_targets"):
        assert any(line.startswith("passed") and family in line for line in result.outlines), family


def test_a_tag_that_splits_in_its_runtime_tokenizer_fails_single_token(own_workspace):
    def demote(data):
        data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<tool_call>"]

    own_workspace.edit_json("tokenizers/runtime/tokenizer.json", demote)
    result = own_workspace.run("-k", "single_token and runtime")
    assert "single_token[runtime-<tool_call>]" in own_workspace.failed(result)
    result.stdout.fnmatch_lines(["*'<tool_call>' alone in tokenizer 'runtime'*"])


def test_pad_set_to_eos_fails_the_pad_role(own_workspace):
    """The classic fine-tuning fix ``tokenizer.pad_token = tokenizer.eos_token``: a collator that
    masks by id would then hide every real EOS; tokens.json says PAD is <pad>."""
    own_workspace.edit_json("tokenizers/student/tokenizer_config.json", lambda data: data.update(pad_token="</s>"))
    result = own_workspace.run("-k", "role_id and student")
    assert own_workspace.failed(result) == {"role_id[student-pad]"}
    result.stdout.fnmatch_lines(["*role_id*pad*"])


def test_an_io_name_change_in_its_package_fails_io(own_workspace):
    from coremltools.proto import Model_pb2

    from kdtrain import atomic

    spec_file = own_workspace.artifacts / "coreml/fp16/student-L64.mlpackage/Data/com.apple.CoreML/model.mlmodel"
    spec = Model_pb2.Model()
    spec.ParseFromString(spec_file.read_bytes())
    decode = next(f for f in spec.description.functions if f.name == "decode")
    next(i for i in decode.input if i.name == "position").name = "cache_position"
    atomic.write_bytes(spec_file, spec.SerializeToString())
    result = own_workspace.run("-m", "coreml", "-k", "io")
    assert own_workspace.failed(result) == {"io[decode-64]"}
    result.stdout.fnmatch_lines(["*inputs: 'position' missing*"])


@pytest.mark.slow
def test_an_api_teacher_project_passes_its_contracts(own_project, tmp_path, monkeypatch):
    """The README's API walkthrough: the loopback server in front of the tiny teacher, ``kdtrain init``
    with the endpoint, the pipeline (its answers as sequence-level KD targets), the contracts."""
    teacher = own_project.parent / "teacher"
    env = dict(_env(), TEACHER_API_KEY="loopback-key")
    server = subprocess.Popen([sys.executable, str(Path(__file__).parent / "teacher_server.py"), "--teacher", str(teacher)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = server.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), url
        student = tmp_path / "student.yaml"
        student.write_text("shape: {num_hidden_layers: 2, hidden_size: 64, intermediate_size: 128, num_attention_heads: 4, "
                           "num_key_value_heads: 2, head_dim: 16}\n")
        project = tmp_path / "api"
        monkeypatch.setenv("TEACHER_API_KEY", "loopback-key")  # what the client sends, read from the environment
        _run("-m", "kdtrain.cli", "init", "--teacher", url, "--teacher-model", "tiny", "--tokenizer", str(teacher),
             "--student", str(student), "--api-key-env", "TEACHER_API_KEY", "--lengths", LENGTHS, "--steps", str(STEPS),
             "--samples-per-scenario", "2", str(project), cwd=tmp_path)
        _run("-m", "kdtrain.cli", "pipeline", "--config", str(project / "distill.yaml"), "--contracts", str(project / "contracts"),
             "--out", str(project / "artifacts"), cwd=tmp_path)
        _run("-m", "pytest", "--kd-contracts", "contracts", "-m", "golden", "--snapshot-update", "-p", "no:cacheprovider", "-q", cwd=project)
        result = _run("-m", "pytest", "--kd-contracts", "contracts", "-p", "no:cacheprovider", "-q", cwd=project)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert "failed" not in next(line for line in result.stdout.splitlines() if line.startswith("contracts: "))
    report = json.loads((project / "artifacts/teacher/report.json").read_text())
    assert report["teacher"]["backend"] == "openai" and report["fill"]["fetched"] > 0 and not report["fill"]["retry_later"]
    init = json.loads((project / "artifacts/student/init.json").read_text())
    assert init["method"] == "fresh" and init["teacher_family"] == "api"
    assert "loopback-key" not in (project / "distill.yaml").read_text()


def _package_from_elsewhere(pytester, own_project: Path, host_api: str | None) -> Path:
    """A folder of artifacts kdtrain did not build, registered with ``kdtrain add``: the tokenizers,
    the reference checkpoint, and the FP16 packages (as if the user's own script converted them)."""
    out = pytester.path / "artifacts"
    built = own_project / "artifacts"
    added = {"tokenizer.teacher": built / "tokenizers/teacher", "tokenizer.student": built / "tokenizers/student",
             "tokenizer.runtime": built / "tokenizers/runtime/tokenizer.json", "student.checkpoint": built / "student/distilled"}
    added.update({f"coreml.fp16.{n}": built / f"coreml/fp16/student-L{n}.mlpackage" for n in LENGTHS.split(",")})
    for name, path in added.items():  # kdtrain add's function (the command is run by test_kdtrain_add_command)
        add_artifact(name, path, out, host_api if name.startswith("coreml.") else None)
    contracts = pytester.path / "contracts"
    contracts.mkdir()
    for file in ("manifest.json", "coreml_contract.json", "precision_islands.yaml"):
        shutil.copy(own_project / "contracts" / file, contracts / file)
    shutil.copytree(own_project / "golden", pytester.path / "golden")
    return contracts


def test_a_package_converted_elsewhere_is_verified_against_the_checkpoint_the_user_names(pytester, own_project):
    contracts = _package_from_elsewhere(pytester, own_project, "1.1")
    manifest = json.loads((pytester.path / "artifacts/manifest.json").read_text())
    assert manifest["artifacts"]["coreml.fp16.64"]["stage"] == "add" and manifest["artifacts"]["coreml.fp16.64"]["kind"].startswith("coreml/")
    result = pytester.runpytest_inprocess("--kd-contracts", str(contracts), "-p", "no:cacheprovider")
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) == 0 and outcomes.get("error", 0) == 0 and outcomes["passed"] >= 8, result.stdout.str()[-3000:]
    result.stdout.fnmatch_lines(["*coreml_contract.json::golden*3 passed*", "*coreml_contract.json::io*3 passed*",
                                 "*coreml_contract.json::verify_decode*1 passed*"])


def test_a_package_without_a_declared_host_api_fails_golden_saying_why(pytester, own_project):
    contracts = _package_from_elsewhere(pytester, own_project, None)
    result = pytester.runpytest_inprocess("--kd-contracts", str(contracts), "-p", "no:cacheprovider")
    failed = {line.split("::")[1].split(" ")[0] for line in result.outlines if line.startswith("FAILED contracts/")}
    assert failed == {"host_api_version", "golden[prefill-64]", "golden[decode-64]", "golden[verify-64]", "prefill_decode[64]",
                      "verify_decode[64]"}
    result.stdout.fnmatch_lines(["*registered with `kdtrain add` without --host-api*"])
    # IO and the islands do not need the host API: the packages are still checked.
    result.stdout.fnmatch_lines(["*coreml_contract.json::io*3 passed*", "*precision_islands.yaml::islands*3 passed*"])


def test_kdtrain_add_command_registers_and_refuses(own_project, tmp_path):
    from kdtrain.errors import ConfigError

    out = tmp_path / "artifacts"
    done = _run("-m", "kdtrain.cli", "add", "student.checkpoint", str(own_project / "artifacts/student/distilled"), "--out", str(out), cwd=tmp_path)
    assert "registered" in done.stdout
    entry = json.loads((out / "manifest.json").read_text())["artifacts"]["student.checkpoint"]
    assert entry["stage"] == "add" and entry["kind"] == "checkpoint/transformers" and (out / entry["path"] / "config.json").is_file()
    with pytest.raises(ConfigError, match=r"expected an \.mlpackage folder \(with its Manifest\.json\) for coreml\.fp16\.64"):
        add_artifact("coreml.fp16.64", own_project / "contracts", out)
    with pytest.raises(ConfigError, match="found 'student.weights'"):
        add_artifact("student.weights", tmp_path, out)
    with pytest.raises(ConfigError, match="--host-api: expected only with a Core ML package"):
        add_artifact("student.checkpoint", own_project / "artifacts/student/distilled", out, host_api="1.0")


def test_the_gates_measure_the_second_family(own_project):
    """The gates' machinery on another tokenizer, chat template and teacher: a held-out halt set
    and scenario cases from its corpus, its student's halt head scored, its teacher (a local
    Qwen3) and student run through the agent loops. (`kdtrain init` writes no gates.yaml: the
    bounds come from a run the project trusts; what they are judged on must work already.)"""
    from kdcontracts.families import load
    from kdtrain.artifact_table import DATA_CORPUS
    from kdtrain.artifacts import ArtifactsFolder
    from kdtrain.data.corpus import Corpus
    from kdtrain.data.halt_set import build_halt_set, overlap
    from kdtrain.data.scenario_cases import build_scenario_cases
    from kdtrain.gates.halt import halt_metrics, score_halt_set
    from kdtrain.gates.scenarios import METRICS, evaluate_scenarios, rates_from_cases
    from kdtrain.runtime.generate import StudentGenerator, teacher_generator
    from kdtrain.student.model import StudentLM
    from kdtrain.tokenizers.load import load_tokenizer
    from kdtrain.train.config import load_config

    folder = ArtifactsFolder.open(own_project / "artifacts")
    registry = load(own_project / "contracts/tool_registry.json")
    corpus = Corpus.load(folder.path(DATA_CORPUS))
    tokenizer = load_tokenizer(folder, "student")
    student = StudentLM.from_pretrained(folder.path(folder.exported_student()))

    halt_set = build_halt_set(registry, corpus, 1, 7)
    assert overlap(halt_set, corpus) == []
    records = score_halt_set(student, tokenizer, halt_set.examples)
    assert [r.id for r in records] == [e.id for e in halt_set.examples]
    metrics = halt_metrics(records, 0.5, 2)
    assert metrics["positives"] == sum(e.kind != "under_short" for e in halt_set.examples) and 0.0 <= metrics["auc"] <= 1.0

    cases = build_scenario_cases(registry, corpus, 1, 7)
    generators = {"teacher": teacher_generator(load_config(own_project / "distill.yaml"), folder),
                  "student": StudentGenerator(student, tokenizer)}
    results = evaluate_scenarios(cases, generators, registry, max_new_tokens=8, max_rounds=2, progress=False)
    assert {r["model"] for r in results["cases"]} == {"teacher", "student"} and len(results["cases"]) == 2 * len(cases.cases)
    assert rates_from_cases(results["cases"]) == results["scenarios"]
    assert all(set(results["scenarios"][s]["student"]) == set(m) for s, m in METRICS.items())
