"""gates.yaml through the plugin: every gate item passes on the reference artifacts and each planted
fault fails its own item (pytester): a halt head that always fires, never fires or ranks stops
backwards; a curriculum stage whose answers collapse; a student that writes invalid tool JSON
(scripted models, judged with a real run's bounds); a verdict made for another configuration,
which the trainer refuses too."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from kdtrain.artifact_table import DISTILL_CURRICULUM, GATES_VERDICT, STUDENT_DISTILLED
from kdtrain.artifacts import ArtifactsFolder
from kdtrain.gates.verdict import GateError, gate_fingerprint, unlock
from kdtrain.train.config import DistillConfig

HALT_ITEMS = {"halt_auc", "halt_ece", "halt_early_stop", "halt_length"}


def test_every_gate_item_passes_on_the_reference_artifacts(workspace):
    result, failed = workspace.run_family("gates")
    assert failed == set() and result.ret == 0, result.stdout.str()
    out = result.stdout.str()
    for item in ("held_out", *sorted(HALT_ITEMS), "curriculum", "scenario[tool_chain-chain_complete]", "verdict"):
        assert f"PASSED contracts/gates.yaml::{item}" in out
    assert "gate verdict: passed" in out and "gate halt_auc" in out  # the gate table in the kdcontracts summary


def _plant_halt_head(workspace, change) -> None:
    """Replace the distilled student by one whose halt head ``change`` edited, and measure it again."""
    from kdtrain.gates.stage import evaluate_halt
    from kdtrain.student.model import StudentLM
    from kdtrain.tokenizers.load import load_tokenizer

    folder = ArtifactsFolder.open(workspace.artifacts)
    path = folder.path(STUDENT_DISTILLED)
    student = StudentLM.from_pretrained(path)
    with torch.no_grad():
        change(student.halt_head)
    config = {k: v for k, v in json.loads((path / "config.json").read_text()).items() if not k.startswith("kd_")}
    shutil.rmtree(path)  # hard links to the shared reference build: new files, never edits
    path.mkdir()
    student.save_pretrained(path, config)
    folder.record(STUDENT_DISTILLED)
    evaluate_halt(folder, workspace.stage_context().contract("gates.yaml"), student, load_tokenizer(folder, "student"))


def _always(head):
    head.weight.zero_()
    head.bias.fill_(30.0)


def _never(head):
    head.weight.zero_()
    head.bias.fill_(-30.0)


def _inverted(head):
    head.weight.neg_()  # the same level, the ranking reversed


@pytest.mark.parametrize("change, failing", [
    (_always, HALT_ITEMS),  # ranks nothing (AUC 0.5), confident and wrong (ECE), stops at once, far too short
    (_never, {"halt_auc"}),  # a constant head ranks nothing; the reference head's lengths already look like this at 0.5
    (_inverted, {"halt_auc"}),
], ids=["always-fires", "never-fires", "inverted"])
def test_a_planted_halt_head_fails_its_item(workspace, change, failing):
    _plant_halt_head(workspace, change)
    _, failed = workspace.run_family("gates", "-k", "halt_ and not scenario")  # the scenario records name the student replaced
    assert failed == failing


def test_a_stage_whose_answers_collapse_fails_curriculum(workspace):
    def collapse(data):
        first, last = data["stages"][0], data["stages"][-1]
        last["length"]["ratio"] = round(first["length"]["ratio"] * 0.3, 6)  # a 70% fall from the first stage

    workspace.edit_json(DISTILL_CURRICULUM.path, collapse)
    result, failed = workspace.run_family("gates", "-k", "curriculum")
    assert failed == {"curriculum"}
    assert "length fall <= 40%" in result.stdout.str()


class _Scripted:
    """Replays every scenario case's reference turns; ``broken`` writes its tool calls' JSON without the last brace."""

    def __init__(self, cases, name: str, tokenizer, broken: bool = False):
        self.name, self.tokenizer, self.broken = name, tokenizer, broken
        self.cases = {(c.messages[0].content, c.messages[1].content): c for c in cases.cases}

    def turns(self, conversations, max_new_tokens):
        from kdtrain.runtime.generate import Turn

        found = []
        for messages in conversations:
            case = self.cases[(messages[0].content, messages[1].content)]
            turns = [m.content for m in case.reference if m.role == "assistant"]
            text = turns[min(sum(m.role == "assistant" for m in messages), len(turns) - 1)]
            if self.broken:
                text = text.replace("}}\n</tool_call>", "}\n</tool_call>")
            found.append(Turn(text, len(self.tokenizer.encode(text).ids), True))
        return found


def test_a_student_writing_invalid_tool_json_fails_the_tool_items(workspace):
    """Judged with a real run's bounds (90% of the teacher, floor 0.5): the reference pair cannot call tools."""
    from kdtrain.data.scenario_cases import ScenarioCases
    from kdtrain.artifact_table import DATA_SCENARIOS
    from kdtrain.gates.stage import evaluate_on_scenarios
    from kdtrain.tokenizers.load import load_tokenizer

    def real_run_bounds(gates):
        for metrics in gates["scenarios"]["bounds"].values():
            for bound in metrics.values():
                bound.update(relative=0.9, floor=0.5)

    import yaml

    gates_file = workspace.contracts / "gates.yaml"
    gates = yaml.safe_load(gates_file.read_text())
    real_run_bounds(gates)
    gates_file.write_text(yaml.safe_dump(gates))
    ctx = workspace.stage_context()
    folder, contract = ctx.folder, ctx.contract("gates.yaml")
    cases, tokenizer = ScenarioCases.load(folder.path(DATA_SCENARIOS)), load_tokenizer(folder, "student")
    registry = ctx.contract("tool_registry.json")

    evaluate_on_scenarios(folder, contract, {"teacher": _Scripted(cases, "teacher", tokenizer),
                                             "student": _Scripted(cases, "student", tokenizer)}, registry)
    _, failed = workspace.run_family("gates", "-k", "scenario")
    assert failed == set()

    evaluate_on_scenarios(folder, contract, {"teacher": _Scripted(cases, "teacher", tokenizer),
                                             "student": _Scripted(cases, "student", tokenizer, broken=True)}, registry)
    _, failed = workspace.run_family("gates", "-k", "scenario")
    assert {"scenario[tool_chain-tool_call_valid]", "scenario[tool_chain-chain_complete]"} <= failed
    assert not any(item.startswith(("scenario[plain", "scenario[long_reasoning")) for item in failed)


def test_a_verdict_for_another_configuration_fails_and_the_trainer_refuses_it(workspace):
    def other_config(verdict):
        verdict["binding"]["config"] = "sha256:" + "0" * 64

    workspace.edit_json(GATES_VERDICT.path, other_config)
    result, failed = workspace.run_family("gates", "-k", "verdict")
    assert failed == {"verdict"}
    assert "another configuration" in result.stdout.str()

    config = _mini_config(workspace)
    with pytest.raises(GateError, match="a verdict for another run: config"):
        unlock(config, ArtifactsFolder.open(workspace.artifacts), None)


def _mini_config(workspace) -> DistillConfig:
    """The configuration the test build's distill stage ran (the manifest names its file)."""
    from kdtrain.train.config import load_config

    return load_config(ArtifactsFolder.open(workspace.artifacts).manifest.stages["distill"].settings["config"])


def test_a_full_run_of_the_mini_runs_configuration_unlocks_and_a_changed_one_does_not(workspace):
    folder = ArtifactsFolder.open(workspace.artifacts)
    mini = _mini_config(workspace)
    full = DistillConfig.model_validate({**mini.canonical(), "optim": {**mini.canonical()["optim"], "steps": 100_000}})
    assert gate_fingerprint(full) == gate_fingerprint(mini) != full.fingerprint()
    record = unlock(full, folder, None)
    assert record["passed"] and not record["override"]

    changed = DistillConfig.model_validate({**mini.canonical(), "optim": {**mini.canonical()["optim"], "lr": 1e-3}})
    with pytest.raises(GateError, match="--skip-gate"):
        unlock(changed, folder, None)
    skipped = unlock(changed, folder, None, skip=True)
    assert skipped["override"] and "another run" in skipped["reason"]

    def failed_verdict(verdict):
        verdict["passed"], verdict["failed"] = False, ["halt_auc"]

    workspace.edit_json(GATES_VERDICT.path, failed_verdict)
    with pytest.raises(GateError, match="failed halt_auc"):
        unlock(full, folder, None)
    (workspace.artifacts / GATES_VERDICT.path).unlink()
    with pytest.raises(GateError, match="no such file"):
        unlock(full, folder, None)
