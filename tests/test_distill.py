"""The trainer on the reference artifacts: the balance gate, the code-mode report, strict
resume, step-for-step reproducibility after a resume, the schema-version refusal, two gloo
processes under torchrun (DDP; FSDP2 is tests/test_fsdp.py), and the data order: the same
whatever the world size, collated alike in DataLoader workers."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_distill_config
from kdtrain.errors import ConfigError, DataError
from kdtrain.train.balance import BalanceError, BalanceMonitor
from kdtrain.train.config import load_config
from kdtrain.train.checkpoint import DataPosition, capture_rng
from kdtrain.train.data import Batches, load_training_data
from kdtrain.train.loop import Distiller, RunResult


# Cheaper than the pipeline's test run: the short samples (plain answers, with and without
# thinking) and the terms they exercise; every measured step costs one backward pass per term.
CHEAP = {"data.max_length": 100, **{f"losses.{n}": 0.0 for n in ("tool_name", "tool_args", "tool_integration",
                                                                   "early_tool_call", "code_mode")}}


def distil(config, run_dir: Path, data, stop_after: int | None = None, **setup) -> tuple[Distiller, RunResult]:
    """What `kdtrain distill` does: setup (resume or gate), train, cleanup."""
    distiller = Distiller(config, run_dir, data=data, progress=False)
    distiller.setup(**setup)
    result = distiller.train(stop_after)
    distiller.cleanup()
    return distiller, result


@pytest.fixture
def config_for(tmp_path, reference_artifacts):
    def make(name: str = "distill.yaml", **changes):
        return load_config(write_distill_config(tmp_path / name, reference_artifacts, **{**CHEAP, **changes}))
    return make


@pytest.fixture(scope="module")
def training_data(tmp_path_factory, reference_artifacts):
    config = load_config(write_distill_config(tmp_path_factory.mktemp("data") / "c.yaml", reference_artifacts, **CHEAP))
    return load_training_data(config)


def test_the_monitor_alerts_on_a_term_that_stays_dominant_not_on_a_spike():
    spiky = BalanceMonitor(ratio=5.0, window=3)
    assert [spiky.observe(s, {"kl": 1.0, "ce": n}) for s, n in enumerate([60.0, 1.0, 1.0, 60.0])] == [None] * 4
    balanced = BalanceMonitor(ratio=5.0, window=2)
    assert [balanced.observe(s, {"kl": 2.0, "ce": 1.0, "halt": 0.0}) for s in range(4)] == [None] * 4
    dominated = BalanceMonitor(ratio=5.0, window=2)
    dominated.observe(0, {"kl": 1.0, "ce": 9.0, "halt": 0.5})
    alert = dominated.observe(1, {"kl": 1.0, "ce": 7.0, "halt": 0.5})
    assert (alert.loss, alert.runner_up, alert.ratio) == ("ce", "kl", 7.0)
    assert "loss 'ce' dominates the gradient: its norm is 7.0x that of 'kl' or more in each of the last 2" in str(alert)


def test_the_smoke_run_refuses_an_overweighted_loss_and_passes_balanced_weights(config_for, training_data, tmp_path, caplog):
    overweighted = config_for("over.yaml", **{"losses.ce": 100.0})
    with pytest.raises(BalanceError) as info:
        distil(overweighted, tmp_path / "over", training_data)
    assert "the smoke run's gradient balance check failed" in str(info.value)
    assert "loss 'ce' dominates the gradient" in str(info.value)
    assert not (tmp_path / "over/checkpoints").exists()  # refused before the first step
    smoke = json.loads((tmp_path / "over/smoke.json").read_text())
    assert smoke["passed"] is False and smoke["override"] is False

    _, result = distil(config_for("balanced.yaml"), tmp_path / "balanced", training_data, stop_after=0)
    assert result.alerts == [] and json.loads((tmp_path / "balanced/smoke.json").read_text())["passed"] is True
    norms = json.loads((tmp_path / "balanced/smoke.json").read_text())["measured"][0]["grad_norms"]
    assert max(norms.values()) < 8.0 * sorted(v for v in norms.values() if v > 0)[-2]

    with caplog.at_level(logging.WARNING, logger="kdtrain.train"):
        distil(overweighted, tmp_path / "overridden", training_data, stop_after=0, override_balance=True)
    assert "balance override: starting despite" in caplog.text
    assert json.loads((tmp_path / "overridden/smoke.json").read_text())["override"] is True


def test_the_smoke_run_puts_every_rng_back(config_for, training_data, tmp_path, monkeypatch):
    """The gated run starts from the random state an ungated one starts from: Python's and
    numpy's too, which a step drawing from them (a user's loss, a data hook) would move."""
    import random

    step = Distiller.step

    def drawing_step(self, *args, **kwargs):
        random.random(), np.random.rand()
        return step(self, *args, **kwargs)

    monkeypatch.setattr(Distiller, "step", drawing_step)
    states = []
    for name, gate in (("gated", True), ("ungated", False)):
        distiller = Distiller(config_for(), tmp_path / name, data=training_data, progress=False)
        distiller.setup(gate=gate)
        states.append(capture_rng())
    (gated, ungated) = states
    assert gated.python == ungated.python and gated.numpy == ungated.numpy
    assert np.array_equal(gated.torch.numpy(), ungated.torch.numpy())


def test_each_step_logs_per_loss_gradient_norms_and_the_eligible_fraction(config_for, training_data, tmp_path):
    distiller, _ = distil(config_for(), tmp_path / "run", training_data, stop_after=3)
    records = distiller.records()
    assert [r["step"] for r in records] == [0, 1, 2]
    assert [sorted(r.get("grad_norms", {})) == sorted(r["weights"]) for r in records] == [True, False, True]  # every 2nd step
    assert all(0.0 <= r["eligible_fraction"] <= 1.0 and 0.0 < r["aligned_fraction"] <= 1.0 for r in records)
    assert (tmp_path / "run/grad_norms.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    smoke = json.loads((tmp_path / "run/smoke.json").read_text())
    assert smoke["eligible_fraction"] == training_data.eligible_fraction
    assert smoke["missing_teacher_ratio"] == 0.0


def test_balance_every_n_steps_null_measures_in_the_smoke_run_only(config_for, training_data, tmp_path):
    distiller, _ = distil(config_for(**{"balance.every_n_steps": None}), tmp_path / "run", training_data, stop_after=2)
    assert [r.get("grad_norms") for r in distiller.records()] == [None, None]
    assert json.loads((tmp_path / "run/smoke.json").read_text())["measured"][0]["grad_norms"]


def test_the_code_mode_mask_is_zero_on_ineligible_samples_of_the_corpus(reference_artifacts, config_for):
    from kdtrain.losses import code_mode_mask

    data = load_training_data(config_for("long.yaml", **{"data.max_length": 512}))
    assert 0.0 < data.eligible_fraction < 1.0
    batch = data.batch(list(range(len(data))))
    mask = code_mode_mask(batch)
    eligible = batch.eligible
    assert mask[~eligible].abs().sum() == 0
    assert (mask[eligible].sum(dim=1) > 0).any()  # an eligible sample with a decision point carries the loss
    assert (mask.sum(dim=1) <= 1).all()  # at most one position per sample


def test_resume_with_a_changed_loss_weight_fails_with_the_diff(config_for, training_data, tmp_path):
    distil(config_for(), tmp_path / "run", training_data, stop_after=1, gate=False)
    changed = config_for("changed.yaml", **{"losses.kl": 2.0})
    with pytest.raises(ConfigError) as info:
        distil(changed, tmp_path / "run", training_data)
    message = str(info.value)
    assert "step-000001/meta.json" in message and "1 change(s) not in resume.allow_changes" in message
    assert "  losses.kl: 1.0 -> 2.0" in message.splitlines()
    assert "resume: {allow_changes: [losses.kl]}" in message


def test_a_resumed_run_matches_an_uninterrupted_one_step_for_step(config_for, training_data, tmp_path):
    config = config_for()
    whole, _ = distil(config, tmp_path / "whole", training_data, gate=False)
    assert distil(config, tmp_path / "split", training_data, stop_after=2, gate=False)[1].step == 2
    again, result = distil(config, tmp_path / "split", training_data)
    assert result.resumed_from == 2 and [r.step for r in result.records] == [2]
    a, b = whole.records(), again.records()
    assert [r["step"] for r in b] == [0, 1, 2]  # the log shows each step once
    for left, right in zip(a, b):
        assert (left["step"], left["loss"], left["terms"], left["data"]) == (right["step"], right["loss"], right["terms"], right["data"])
    for name, tensor in whole.trainee.state_dict().items():
        assert np.array_equal(tensor.numpy(), again.trainee.state_dict()[name].numpy()), name


def test_distillation_refuses_a_corpus_the_runtime_cannot_read(config_for):
    with pytest.raises(DataError) as info:
        load_training_data(config_for("old.yaml", **{"data.tool_schema_version": "1.0"}))
    assert "corpus.json: at tool_schema_version: expected a version the target runtime reads" in str(info.value)
    assert "kdtrain migrate-data" in str(info.value) and "found '2.0'" in str(info.value)


def test_two_gloo_processes_under_torchrun_train_and_checkpoint_once(tmp_path, reference_artifacts):
    config = write_distill_config(tmp_path / "ddp.yaml", reference_artifacts, **{**CHEAP, "data.batch_size": 1, "optim.steps": 2})
    torchrun = Path(sys.executable).with_name("torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "kdtrain.cli", "distill",
                           "--config", str(config), "--run-dir", str(tmp_path / "run"), "--skip-gate"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "step 2 of 2" in done.stdout
    assert [p.name for p in sorted((tmp_path / "run/checkpoints").iterdir())] == ["step-000002"]
    records = [json.loads(line) for line in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1]
    assert records[0]["tokens"] > 0 and "grad_norms" in records[0]


@pytest.mark.slow
def test_intermediate_layer_matching_runs_against_the_live_teacher(config_for, training_data, tmp_path):
    config = config_for("hidden.yaml", **{"losses.intermediate": 0.05, "balance.override": True})
    distiller, result = distil(config, tmp_path / "run", training_data, stop_after=1, gate=False)
    assert result.records[0].terms["intermediate"] > 0
    assert result.records[0].grad_norms["intermediate"] > 0
    assert [n for n, _ in distiller.trainee.named_parameters() if n.startswith("projection.")] == []  # same hidden size: identity


def test_a_token_budget_stops_the_run_and_a_restart_does_not_spend_it_again(config_for, training_data, tmp_path):
    config = config_for("budget.yaml", **{"budgets.tokens": 150, "optim.steps": 6})
    first = distil(config, tmp_path / "run", training_data, gate=False)[1]
    assert first.step < config.optim.steps and first.stopped.startswith("budgets.tokens: spent ")
    spent = sum(r.tokens for r in first.records)
    assert spent >= 150 and spent - first.records[-1].tokens < 150  # stopped at the first step over it
    again = distil(config, tmp_path / "run", training_data)[1]
    assert again.records == [] and again.step == first.step and again.stopped == first.stopped


def test_batches_collated_in_dataloader_workers_equal_those_collated_in_the_training_process(training_data):
    start = DataPosition(0, 0, 1, 2)  # mid-epoch, written by two ranks
    inline = Batches(training_data, 2, 7, start, rank=1, world=2)
    loaded = Batches(training_data, 2, 7, start, rank=1, world=2, workers=2)
    for _ in range(inline.batches_per_epoch + 1):  # across the epoch's end
        (taken, indices, batch), (taken_w, indices_w, batch_w) = inline.next(), loaded.next()
        assert (taken, indices) == (taken_w, indices_w)
        for field in dataclasses.fields(batch):
            left, right = getattr(batch, field.name), getattr(batch_w, field.name)
            assert torch.equal(left, right) if isinstance(left, torch.Tensor) else left == right, field.name
    assert inline.position == loaded.position and inline.position.epoch > start.epoch


def test_each_step_takes_the_same_samples_whatever_the_world_size(training_data):
    one = Batches(training_data, 2, 7, DataPosition())
    two = [Batches(training_data, 1, 7, DataPosition(world=2), rank=r, world=2) for r in (0, 1)]
    for _ in range(3):
        assert sorted(one.next()[1]) == sorted(i for b in two for i in b.next()[1])
    resumed = Batches(training_data, 2, 7, two[0].position)  # three steps of two ranks x one sample, on one rank
    assert resumed.next()[1] == one.next()[1]


def test_a_resume_that_would_split_a_step_across_world_sizes_is_refused(training_data):
    with pytest.raises(DataError) as info:
        Batches(training_data, 1, 7, DataPosition(0, 0, 3, 1), rank=0, world=2)
    assert "resuming at 2 rank(s): expected the samples already taken in epoch 0 (3 batch(es) of 1 on 1 rank(s) = 3)" in str(info.value)
