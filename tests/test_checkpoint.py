"""Checkpoints: a resumed run is bit-identical to an uninterrupted one; strict resume refuses
configuration changes that are not allow-listed; budgets carry over; a kill -9 mid-write or
a tampered file never yields a checkpoint that loads."""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from kdtrain.errors import ArtifactError, ConfigError
from kdtrain.train import checkpoint as ck
from kdtrain.train.checkpoint import DataPosition, Spent, TrainState, check_resume, load_latest, save_checkpoint
from kdtrain.train.config import Change, DistillConfig

REFERENCE = Path(__file__).resolve().parents[1] / "configs" / "distill_reference.yaml"


def make_config(**changes) -> DistillConfig:
    """The reference config with dotted keys replaced: ``make_config(**{"losses.kl": 2.0})``."""
    data = yaml.safe_load(REFERENCE.read_text())
    for key, value in changes.items():
        *parents, last = key.split(".")
        node = data
        for part in parents:
            node = node[part]
        node[last] = value
    return DistillConfig.model_validate(data)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup(config: DistillConfig):
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.2), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr, betas=config.optim.betas, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, config.optim.lr_scale)
    return model, optimizer, scheduler


def train_step(model, optimizer, scheduler) -> float:
    """Draws from all three RNGs (data from torch, numpy and random; dropout from torch)."""
    x = torch.randn(4, 8)
    target = x.sum(1, keepdim=True) * random.uniform(0.5, 1.5) + float(np.random.normal())
    loss = F.mse_loss(model(x), target)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.item()


def assert_identical(a, b, path="state"):
    """Same structure, same Python types (tuples stay tuples), tensors equal in dtype and bits."""
    assert type(a) is type(b), f"{path}: {type(a)} vs {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for key in a:
            assert_identical(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def saved_run(tmp_path: Path, config: DistillConfig, steps: int = 2, budgets: Spent | None = None) -> TrainState:
    seed_all(0)
    model, optimizer, scheduler = setup(config)
    for _ in range(steps):
        train_step(model, optimizer, scheduler)
    save_checkpoint(tmp_path, TrainState.capture(steps, model, optimizer, scheduler, config, budgets=budgets))
    return load_latest(tmp_path)


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    config = make_config()
    seed_all(0)
    model, optimizer, scheduler = setup(config)
    straight = [train_step(model, optimizer, scheduler) for _ in range(6)]
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    seed_all(0)
    model, optimizer, scheduler = setup(config)
    first = [train_step(model, optimizer, scheduler) for _ in range(3)]
    history = [{"step": i, "loss": loss} for i, loss in enumerate(first)] + [{"step": 3, "loss": float("nan")}]
    saving = TrainState.capture(3, model, optimizer, scheduler, config, DataPosition(1, 2, 30), history=history)
    folder = save_checkpoint(tmp_path, saving)
    assert folder == tmp_path / "checkpoints" / "step-000003"
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "model.safetensors", "optimizer.json",
                                                       "optimizer.safetensors", "rng.safetensors"]

    seed_all(12345)  # a fresh process: other RNG states, another model, an untouched optimizer
    model, optimizer, scheduler = setup(config)
    state = load_latest(tmp_path)
    assert state.step == 3 and state.data == DataPosition(1, 2, 30) and state.folder == folder
    assert_identical(state.optimizer, saving.optimizer)  # AdamW round-trips exactly: step tensors, betas tuple
    assert_identical(state.scheduler, saving.scheduler)
    assert state.history[:3] == history[:3] and np.isnan(state.history[3]["loss"])
    assert check_resume(state, config) == []
    state.restore(model, optimizer, scheduler)
    resumed = first + [train_step(model, optimizer, scheduler) for _ in range(3)]

    assert resumed == straight  # exact float equality, step by step
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_tied_weights_are_stored_once_and_restored(tmp_path):
    config = make_config()
    model = torch.nn.Module()
    model.embed = torch.nn.Embedding(10, 4)
    model.head = torch.nn.Linear(4, 10, bias=False)
    model.head.weight = model.embed.weight
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, config.optim.lr_scale)
    save_checkpoint(tmp_path, TrainState.capture(1, model, optimizer, scheduler, config))
    from safetensors import safe_open

    with safe_open(tmp_path / "checkpoints" / "step-000001" / "model.safetensors", "pt") as handle:
        assert list(handle.keys()) == ["embed.weight"]
    state = load_latest(tmp_path)
    assert torch.equal(state.model["head.weight"], model.embed.weight.detach())
    model.load_state_dict(state.model)


def test_resume_with_a_changed_loss_weight_fails_with_the_diff(tmp_path):
    state = saved_run(tmp_path, make_config())
    changed = make_config(**{"losses.kl": 2.0, "optim.schedule": "constant"})
    with pytest.raises(ConfigError) as info:
        check_resume(state, changed)
    assert str(info.value).splitlines() == [
        f"{tmp_path / 'checkpoints' / 'step-000002' / 'meta.json'}: at config: expected the configuration step 2 was "
        f"saved with ({state.fingerprint}), found 2 change(s) not in resume.allow_changes:",
        "  losses.kl: 1.0 -> 2.0",
        '  optim.schedule: "cosine" -> "constant"',
        "to resume anyway, add to the new config: resume: {allow_changes: [losses.kl, optim.schedule]}",
    ]


def test_allow_listed_changes_pass_and_are_returned(tmp_path):
    state = saved_run(tmp_path, make_config())
    config = make_config(**{"optim.lr": 1e-4, "budgets.gpu_hours": 2.0, "resume.allow_changes": ["optim.lr", "budgets"]})
    assert check_resume(state, config) == [
        Change("budgets.gpu_hours", 0.5, 2.0),
        Change("optim.lr", 3e-4, 1e-4),
        Change("resume.allow_changes", ["budgets", "checkpoint.keep_last"], ["optim.lr", "budgets"]),
    ]
    with pytest.raises(ConfigError, match="found 1 change"):  # only optim.lr is allowed, not optim.schedule
        check_resume(state, make_config(**{"optim.lr": 1e-4, "optim.schedule": "constant", "resume.allow_changes": ["optim.lr"]}))


def test_budget_counters_continue_across_resume(tmp_path):
    config = make_config(**{"budgets.tokens": 1000, "budgets.gpu_hours": 1.0})
    state = saved_run(tmp_path, config, budgets=Spent(gpu_hours=0.25, tokens=600))
    assert state.budgets.gpu_hours == 0.25 and state.budgets.tokens == 600
    spent = Spent(gpu_hours=state.budgets.gpu_hours + 0.25, tokens=state.budgets.tokens + 400)
    assert spent.exhausted(config.budgets) == ["budgets.tokens: spent 1000 of 1000"]

    seed_all(0)
    model, optimizer, scheduler = setup(config)
    state.restore(model, optimizer, scheduler)
    save_checkpoint(tmp_path, TrainState.capture(3, model, optimizer, scheduler, config, budgets=spent))
    again = load_latest(tmp_path)
    assert again.step == 3 and (again.budgets.gpu_hours, again.budgets.tokens) == (0.5, 1000)


def test_keep_last_prunes_older_checkpoints(tmp_path):
    config = make_config(**{"checkpoint.keep_last": 2, "checkpoint.dir": "ckpt"})
    seed_all(0)
    model, optimizer, scheduler = setup(config)
    for step in range(1, 5):
        train_step(model, optimizer, scheduler)
        save_checkpoint(tmp_path, TrainState.capture(step, model, optimizer, scheduler, config))
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-000003", "step-000004"]
    assert load_latest(tmp_path, "ckpt").step == 4
    assert load_latest(tmp_path) is None  # no checkpoint under the default folder


def _damage_model(folder: Path) -> None:
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-3] ^= 0x01
    (folder / "model.safetensors").write_bytes(bytes(data))


def _truncate_optimizer(folder: Path) -> None:
    path = folder / "optimizer.safetensors"
    path.write_bytes(path.read_bytes()[:100])


def _edit_meta(folder: Path) -> None:
    path = folder / "meta.json"
    path.write_text(path.read_text().replace('"lr": 0.0003', '"lr": 0.003'))


def three_checkpoints(run: Path, sharded: bool = False) -> torch.nn.Module:
    """Steps 1 to 3 of a run saved (keep_last 3) in the full or the sharded layout; the model after step 3."""
    config = make_config(**{"checkpoint.keep_last": 3})
    seed_all(0)
    model, optimizer, scheduler = setup(config)
    for step in range(1, 4):
        train_step(model, optimizer, scheduler)
        save_checkpoint(run, TrainState.capture(step, model, optimizer, scheduler, config, sharded=sharded))
    return model


@pytest.mark.parametrize("damage, reason", [
    (_damage_model, "model.safetensors: expected SHA-256"),
    (_truncate_optimizer, "optimizer.safetensors: expected SHA-256"),
    (lambda folder: (folder / "rng.safetensors").unlink(), "at files: expected exactly"),
    (lambda folder: (folder / "stray.bin").write_bytes(b"x"), "at files: expected exactly"),
    (lambda folder: (folder / "meta.json").write_text('{"step": 3'), "meta.json: expected readable JSON"),
    (_edit_meta, "meta.json: at meta_sha256: expected the SHA-256 of the rest of meta.json"),
])
def test_tampered_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog, damage, reason):
    three_checkpoints(tmp_path)
    newest = tmp_path / "checkpoints" / "step-000003"
    damage(newest)
    with caplog.at_level(logging.WARNING, logger="kdtrain.train"):
        state = load_latest(tmp_path)
    assert state.step == 2
    [warning] = [r.getMessage() for r in caplog.records]
    assert warning.startswith(f"skipping checkpoint {newest}: ") and reason in warning, warning


SHARD = "shards/shard-00001-model-00001-of-00001.safetensors"


def _damage_shard(folder: Path) -> None:
    data = bytearray((folder / SHARD).read_bytes())
    data[-3] ^= 0x01
    (folder / SHARD).write_bytes(bytes(data))


@pytest.mark.parametrize("damage, reason", [
    (_damage_shard, f"{SHARD}: expected SHA-256"),
    (lambda folder: (folder / SHARD).unlink(), "at files: expected exactly"),
    (lambda folder: (folder / "shards" / "shard-00002-model-00001-of-00001.safetensors").write_bytes(b"x"), "at files: expected exactly"),
    (lambda folder: (folder / "model.json").write_text('{"aliases": {}}'), "model.json: expected SHA-256"),
])
def test_a_tampered_sharded_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog, damage, reason):
    model = three_checkpoints(tmp_path, sharded=True)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    damage(tmp_path / "checkpoints" / "step-000003")
    with caplog.at_level(logging.WARNING, logger="kdtrain.train"):
        state = load_latest(tmp_path)
    assert state.step == 2 and state.sharded
    [warning] = [r.getMessage() for r in caplog.records if r.name == "kdtrain.train"]
    assert reason in warning, warning
    assert_identical(dict(model.state_dict()), expected)  # nothing was loaded into the live model


def test_no_checkpoint_that_verifies_is_an_error(tmp_path):
    saved_run(tmp_path, make_config())
    _damage_model(tmp_path / "checkpoints" / "step-000002")
    with pytest.raises(ArtifactError) as info:
        load_latest(tmp_path)
    assert str(info.value).splitlines()[0] == (f"{tmp_path / 'checkpoints'}: expected a checkpoint that verifies "
                                               "(starting over would spend the budgets twice), found 1 that do not:")
    assert "step-000002/model.safetensors: expected SHA-256" in str(info.value).splitlines()[1]


# --- kill -9 during a write ----------------------------------------------------------------

CHILD = """
import shutil, sys, time
import torch
from kdtrain.train import checkpoint as ck, shards
from kdtrain.train.config import DistillConfig

run, config_file, kill_point = sys.argv[1:4]
sharded = kill_point.endswith("-sharded")
config = DistillConfig.model_validate_json(open(config_file).read())
saves = 0

def pause():
    print("paused", flush=True)
    time.sleep(120)

if kill_point == "writing":  # inside the temporary folder, model written, the rest not yet
    save_tensors = ck._save_tensors
    def _save_tensors(path, tensors):
        save_tensors(path, tensors)
        if saves >= 2 and path.name == "model.safetensors":
            pause()
    ck._save_tensors = _save_tensors
elif kill_point == "writing-sharded":  # the shards written (DCP fsynced them), the rest not yet
    write = shards.write
    def write_then_pause(tmp, tensors):
        write(tmp, tensors)
        if saves >= 2:
            pause()
    shards.write = write_then_pause
elif kill_point == "pruning":  # an old checkpoint renamed away and half deleted
    rmtree = shutil.rmtree
    def half_rmtree(path, *args, **kwargs):
        if ".trash-" in str(path):
            for file in sorted(path.iterdir())[::2]:
                file.unlink()
            pause()
        rmtree(path, *args, **kwargs)
    shutil.rmtree = half_rmtree

torch.manual_seed(0)
model = torch.nn.Linear(1024, 1024)  # 4 MB of weights, 12 MB with AdamW's two moments
optimizer = torch.optim.AdamW(model.parameters())
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, config.optim.lr_scale)
for step in range(1, 1000):
    model(torch.randn(2, 1024)).square().mean().backward()
    optimizer.step()
    scheduler.step()
    ck.save_checkpoint(run, ck.TrainState.capture(step, model, optimizer, scheduler, config, sharded=sharded))
    saves += 1
    print("saved", step, flush=True)
"""


@pytest.mark.parametrize("kill_point", ["writing", "pruning", "anytime", "writing-sharded", "anytime-sharded"])
def test_kill_9_during_a_checkpoint_write_leaves_the_last_good_one(tmp_path, kill_point):
    config = make_config(**{"checkpoint.keep_last": 2})
    config_file = tmp_path / "config.json"
    config_file.write_text(config.model_dump_json())
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    run = tmp_path / "run"
    child = subprocess.Popen([sys.executable, str(script), str(run), str(config_file), kill_point],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(120, child.kill)
    watchdog.start()
    saved = []
    try:
        for line in child.stdout:
            if line.startswith("saved"):
                saved.append(int(line.split()[1]))
            if line.startswith("paused") or (kill_point.startswith("anytime") and len(saved) == 2):
                break
        if kill_point.startswith("anytime"):
            time.sleep(random.uniform(0.0, 0.05))  # somewhere inside the third save, most likely
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    finally:
        watchdog.cancel()
    assert child.returncode == -signal.SIGKILL, child.stderr.read()
    assert len(saved) >= 2

    folders = ck._step_folders(run / "checkpoints")
    for step, folder in folders:  # every visible checkpoint is whole: torn ones never appear under step-*
        ck._read(folder, step)
    state = load_latest(run)
    assert state.step >= saved[-1] and state.step == folders[0][0]
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".step-")]
    if kill_point.startswith("writing"):  # the third save never became visible
        assert state.step == saved[-1] and len(leftovers) == 1
        assert leftovers[0].startswith(f".step-{saved[-1] + 1:06d}.") and leftovers[0].endswith(".tmp")
    if kill_point == "pruning":  # the third save was complete; the first was being deleted
        assert state.step == saved[-1] + 1 and len(leftovers) == 1 and ".step-000001.trash-" in leftovers[0]

    model = torch.nn.Linear(1024, 1024)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, config.optim.lr_scale)
    state.restore(model, optimizer, scheduler)
    save_checkpoint(run, TrainState.capture(state.step + 1, model, optimizer, scheduler, config, sharded=kill_point.endswith("-sharded")))
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == [f"step-{state.step:06d}", f"step-{state.step + 1:06d}"]  # leftovers cleaned, keep_last = 2
    assert load_latest(run).step == state.step + 1
