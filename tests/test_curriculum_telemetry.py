"""Curriculum telemetry and on-policy steps: the draw, the student's tokens in an on-policy
batch, the alert rules, and a planted length collapse at a stage boundary that stops a real
run (and an override that lets it finish, recorded)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import _link_unless_appendable, distill_config_data
from kdtrain.artifact_table import DATA_HALT_SET
from kdtrain.artifacts import ArtifactsFolder
from kdtrain.gates.halt import HaltRecord
from kdtrain.train.checkpoint import capture_rng
from kdtrain.train.config import DistillConfig, Telemetry
from kdtrain.train.data import load_training_data
from kdtrain.train.loop import Distiller
from kdtrain.train.on_policy import drawn
from kdtrain.train.telemetry import TelemetryError, halt_by_position, judge, tokens_by_source

# Short samples, the terms they exercise, no balance measurement: each step stays cheap.
CHEAP = {"data.max_length": 100, "balance.every_n_steps": None, "checkpoint.every_n_steps": 100,
         "telemetry": {"prompts": 4, "max_new_tokens": 12},
         **{f"losses.{n}": 0.0 for n in ("tool_name", "tool_args", "tool_integration", "early_tool_call", "code_mode")}}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, reference_artifacts) -> Path:
    """A private copy of the session's reference build (the teacher cache copied, the rest hard-linked; its halt set included)."""
    copy = tmp_path_factory.mktemp("telemetry") / "artifacts"
    shutil.copytree(reference_artifacts, copy, copy_function=_link_unless_appendable)
    assert DATA_HALT_SET.name in ArtifactsFolder.open(copy).manifest.artifacts
    return copy


def config(artifacts: Path | str, **changes) -> DistillConfig:
    return DistillConfig.model_validate(distill_config_data(artifacts, **{**CHEAP, **changes}))


@pytest.fixture(scope="module")
def training_data(artifacts):
    return load_training_data(config(artifacts))


def stages(*spec: tuple[str, int, float]) -> list[dict]:
    return [{"name": name, "until_step": until, "on_policy": share} for name, until, share in spec]


# --- the draw --------------------------------------------------------------------------------

def test_the_on_policy_draw_follows_the_stage_share_and_depends_on_seed_and_step_alone(tmp_path):
    c = config(tmp_path, curriculum=stages(("off", 100, 0.0), ("quarter", 2100, 0.25), ("all", 2200, 1.0)),
               **{"optim.steps": 2200, "optim.warmup_steps": 0})
    draws = [drawn(c, step) for step in range(2200)]
    assert not any(draws[:100]) and all(draws[2100:])
    assert 0.22 < sum(draws[100:2100]) / 2000 < 0.28
    assert [drawn(c, step) for step in reversed(range(2200))] == draws[::-1]  # no state carried from step to step
    resumed = config(tmp_path, curriculum=stages(("off", 100, 0.0), ("quarter", 2100, 0.25), ("all", 2200, 1.0)),
                     **{"optim.steps": 2200, "optim.warmup_steps": 0})
    assert [drawn(resumed, step) for step in range(1500, 2200)] == draws[1500:]
    other_seed = config(tmp_path, curriculum=stages(("off", 100, 0.0), ("quarter", 2100, 0.25), ("all", 2200, 1.0)),
                        **{"optim.steps": 2200, "optim.warmup_steps": 0, "optim.seed": 7})
    assert [drawn(other_seed, step) for step in range(2200)] != draws


# --- an on-policy step ---------------------------------------------------------------------

def test_an_on_policy_step_trains_the_kl_term_on_the_students_own_answer(artifacts, training_data, tmp_path):
    from kdtrain.runtime.generate import StudentGenerator
    from kdtrain.teacher.base import prompt_messages

    c = config(artifacts, curriculum=stages(("own", 1, 1.0)), telemetry=None, **{"optim.steps": 1, "on_policy.max_new_tokens": 10})
    distiller = Distiller(c, tmp_path / "run", data=training_data, progress=False)
    distiller.setup(gate=False)
    student, tokenizer = distiller.trainee.student, training_data.tokenizer
    examples = [training_data.examples[i] for i in (0, 1)]
    batch = distiller._on_policy_batches().batch(student, examples, [False, False])
    assert student.training  # generation ran in eval mode and put it back
    turns = StudentGenerator(student, tokenizer).turns([prompt_messages(e.request.messages) for e in examples], 10)
    student.train()
    eos = batch.eos_id
    for row, turn in enumerate(turns):
        start = int(batch.turn_starts[row].max())
        labels = batch.labels[row, start:][batch.supervised[row, start:]].tolist()
        assert labels == tokenizer.encode(turn.text).ids + [eos]  # the student's own turn, closed
        assert not batch.kd_mask[row, :start].any() and batch.kd_mask[row, start:].any()  # the teacher scored that turn only
    assert tokens_by_source(batch, "student") == {"student": int(sum(len(tokenizer.encode(t.text).ids) + 1 for t in turns))}

    rng = capture_rng()
    record = distiller.train().records[0]
    assert set(record.terms) == {"kl"} and set(record.sources) == {"student"} and record.sources["student"] > 0
    after = capture_rng()  # no random state drawn: a resumed run takes the same steps
    assert torch.equal(after.torch, rng.torch) and (after.python, after.numpy) == (rng.python, rng.numpy)
    assert distiller.records()[0]["sources"] == record.sources  # in log.jsonl too


# --- the alert rules -------------------------------------------------------------------------

def test_a_length_collapse_over_the_threshold_alerts_and_one_under_it_does_not():
    settings = Telemetry(length_collapse=0.4, early_halt=0.25)
    assert judge(settings, "here", ratio=0.7, previous=1.0, early=0.0) == []  # -30%
    collapsed = judge(settings, "curriculum.json: at stages[1] (tools, step 16)", ratio=0.55, previous=1.1, early=0.0)  # -50%
    assert [a.kind for a in collapsed] == ["length_collapse"]
    assert str(collapsed[0]) == ("curriculum.json: at stages[1] (tools, step 16): the student's answers fell from 1.10 to 0.55 of "
                                 "the teacher's length (-50%; telemetry.length_collapse allows -40% a stage)")
    assert judge(settings, "here", ratio=0.59, previous=1.0, early=0.0)[0].kind == "length_collapse"  # -41%
    assert judge(settings, "here", ratio=0.9, previous=None, early=0.0) == []  # the first stage has nothing to compare with
    assert judge(settings, "here", ratio=1.0, previous=1.0, early=0.25) == []
    early = judge(settings, "here", ratio=1.0, previous=1.0, early=0.375)
    assert [a.kind for a in early] == ["early_halt"] and "on 38% of the held-out answers" in str(early[0])


def test_the_halt_head_fires_early_only_before_the_labelled_stop():
    records = [HaltRecord("a", "plain", "good", (0.1, 0.2, 0.3, 0.9), 3),  # fires at its stop: right
               HaltRecord("b", "plain", "good", (0.1, 0.6, 0.1, 0.1), 3),  # fires at token 2 of 4: early
               HaltRecord("c", "plain", "good", (0.0, 0.0, 0.0, 0.0, 0.5), 4)]
    halt = halt_by_position(records, threshold=0.5)
    assert halt["early_ids"] == ["b"] and halt["early"] == pytest.approx(1 / 3)
    positions = halt["positions"]
    assert [(p["from"], p["to"]) for p in positions] == [(b / 10, (b + 1) / 10) for b in range(10)]
    # token i of n is at (i + 1) / n of its answer: every answer's last token in the last bin
    assert [p["n"] for p in positions] == [0, 1, 2, 1, 2, 1, 0, 3, 0, 3]
    assert positions[9]["mean"] == pytest.approx((0.9 + 0.1 + 0.5) / 3) and positions[9]["p90"] > positions[9]["p10"]
    assert positions[0]["mean"] is None and positions[0]["p50"] is None
    assert halt_by_position(records, threshold=0.95)["early"] == 0.0


# --- a planted fault at a stage boundary -------------------------------------------------------

def eos_always(distiller: Distiller):
    """The planted fault: the student's EOS logit raised by 50, so it ends every answer at once."""
    eos = distiller.data.tokenizer.token_to_id(distiller.data.tokenizer.eos_token)

    def bias(module, args, logits):
        logits = logits.clone()
        logits[..., eos] += 50.0
        return logits

    return distiller.trainee.student.lm_head.register_forward_hook(bias)


def test_a_length_collapse_planted_at_a_stage_boundary_stops_the_run_until_overridden(artifacts, training_data, tmp_path):
    c = config(artifacts, curriculum=stages(("imitate", 1, 0.0), ("tools", 2, 0.0), ("latent", 3, 0.0)), **{"optim.steps": 3})
    run = tmp_path / "run"
    distiller = Distiller(c, run, data=training_data, progress=False)
    distiller.setup(gate=False)
    distiller.train(stop_after=1)  # stage imitate ends: measured, no alert
    assert distiller.trainee.student.training  # measured in eval mode, put back
    eos_always(distiller)
    with pytest.raises(TelemetryError) as info:
        distiller.train()
    message = str(info.value)
    assert message.startswith(f"{run / 'curriculum.json'}: the curriculum telemetry of stage 'tools' alerted (1 alert(s)); "
                              "the run stopped at step 2, after the stage's checkpoint and summary:"), message
    assert "at stages[1] (tools, step 2): the student's answers fell from" in message and "(-100%;" in message
    assert "telemetry.override: true (or kdtrain distill --override-alerts)" in message
    assert (run / "checkpoints/step-000002").is_dir() and (run / "curriculum.png").is_file()
    summary = json.loads((run / "curriculum.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == ["imitate", "tools"]
    imitate, tools = summary["stages"]
    assert imitate["alerts"] == [] and imitate["length"]["ratio"] > 0 and imitate["tokens"]["data"] > 0
    assert imitate["fractions"] == {"data": 1.0, "teacher": 0.0, "student": 0.0}
    assert [a["kind"] for a in tools["alerts"]] == ["length_collapse"] and tools["override"] is False
    assert (tools["length"]["student"], tools["length"]["ratio"], tools["length"]["change"]) == (0.0, 0.0, -1.0)
    assert len(summary["teacher"]["lengths"]) == 4 and len(tools["halt"]["positions"]) == 10
    assert [r.get("curriculum", {}).get("stage") for r in distiller.records()] == ["imitate", "tools"]

    with pytest.raises(TelemetryError, match="stage 'tools' alerted"):  # a plain resume stops again
        Distiller(c, run, data=training_data, progress=False).setup()
    resumed = Distiller(c, run, data=training_data, progress=False)
    resumed.setup(override_alerts=True)
    assert resumed.train().step == 3  # the fault is gone: stage latent recovers
    summary = json.loads((run / "curriculum.json").read_text())
    assert [(s["stage"], s["override"], len(s["alerts"])) for s in summary["stages"]] == \
        [("imitate", False, 0), ("tools", True, 1), ("latent", False, 0)]
    assert summary["stages"][2]["length"]["ratio"] > 0


def test_the_distill_command_takes_the_alert_override():
    from kdtrain.cli import build_parser

    args = build_parser().parse_args(["distill", "--config", "c.yaml", "--run-dir", "run", "--override-alerts"])
    assert args.override_alerts is True
    assert build_parser().parse_args(["distill", "--config", "c.yaml", "--run-dir", "run"]).override_alerts is False
