"""FSDP2 under torchrun with two gloo processes, and its sharded checkpoints resumed at
another world size: two ranks write step 2, one process resumes it (the state bit for bit
what the ranks held), writes it again, and two ranks resume that to step 4, bit for bit
the run that never stopped."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_distill_config
from kdtrain.train import shards
from kdtrain.train.checkpoint import TrainState, load_latest, save_checkpoint
from kdtrain.train.config import load_config
from kdtrain.train.loop import Distiller
from test_distill import CHEAP

FSDP = {**CHEAP, "parallel.strategy": "fsdp", "data.batch_size": 1, "optim.steps": 4, "checkpoint.every_n_steps": 2,
        "checkpoint.keep_last": 2, "optim.warmup_steps": 1, "curriculum": []}


def torchrun(config: Path, run_dir: Path, *extra: str) -> str:
    command = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2", "-m", "kdtrain.cli",
               "distill", "--config", str(config), "--run-dir", str(run_dir), "--skip-gate", *extra]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def optimizer_state(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """optimizer.json and the optimizer's tensors, consolidated from the shards."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    found = HuggingFaceStorageReader(str(folder / shards.SHARDS)).read_metadata().state_dict_metadata
    tensors = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in found.items() if k.startswith("optimizer.")}
    shards.read(folder, tensors)
    return json.loads((folder / "optimizer.json").read_text()), tensors


def assert_same_checkpoint(left: Path, right: Path) -> None:
    a, b = shards.full_model_state(left), shards.full_model_state(right)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    (ja, ta), (jb, tb) = optimizer_state(left), optimizer_state(right)
    assert ja == jb and ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, reference_artifacts) -> tuple[Path, Path]:
    """(config, run folder): four FSDP2 steps on two ranks, checkpoints at 2 and 4."""
    root = tmp_path_factory.mktemp("fsdp")
    config = write_distill_config(root / "fsdp.yaml", reference_artifacts, **FSDP)
    out = torchrun(config, root / "whole")
    assert "step 4 of 4" in out
    return config, root / "whole"


def test_two_ranks_train_with_fsdp2_and_write_one_sharded_checkpoint(uninterrupted):
    _, run = uninterrupted
    folder = run / "checkpoints/step-000004"
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["layout"] == "sharded" and meta["world"] == 2 and meta["data"]["world"] == 2
    assert sorted(meta["files"]) == ["model.json", "optimizer.json", "rng.safetensors", "shards/shard-00001-model-00001-of-00001.safetensors",
                                     "shards/shard-00002-model-00001-of-00001.safetensors"]
    weight = "model.student.model.layers.0.mlp.up_proj.weight"  # each rank holds half of every sharded tensor
    halves = [load_file(folder / f"shards/shard-0000{r}-model-00001-of-00001.safetensors")[weight] for r in (1, 2)]
    whole = shards.full_model_state(folder)[weight.removeprefix("model.")]
    assert torch.equal(torch.cat(halves), whole) and halves[0].shape[0] == whole.shape[0] // 2
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3] and "grad_norms" in records[0]
    assert all(r["tokens"] > 0 and r["loss"] == r["loss"] for r in records)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000004"]


def test_a_sharded_checkpoint_resumes_in_one_process_and_again_on_two_ranks_bit_for_bit(uninterrupted, tmp_path):
    config_file, whole = uninterrupted
    config = load_config(config_file)
    # 2 -> 1: one process (no process group) loads what two ranks wrote at step 2.
    alone = tmp_path / "alone"
    shutil.copytree(whole / "checkpoints/step-000002", alone / "checkpoints/step-000002")
    distiller = Distiller(config, alone, progress=False)
    distiller.setup()
    saved = shards.full_model_state(whole / "checkpoints/step-000002")
    state = distiller.trainee.state_dict()
    assert all(torch.equal(state[k], saved[k]) for k in saved) and state.keys() == saved.keys()
    assert distiller.batches.position.position == 2 * 2  # two steps of two ranks x one sample
    # 1 -> 2: the one process writes the same state again; two ranks resume it and train on.
    again = tmp_path / "again"
    save_checkpoint(again, TrainState.capture(2, distiller.trainee, distiller.optimizer, distiller.scheduler, config,
                                              distiller.batches.position, distiller.spent, distiller.history, distiller.gate,
                                              sharded=True, world=1))
    assert load_latest(again).world == 1
    assert_same_checkpoint(whole / "checkpoints/step-000002", again / "checkpoints/step-000002")
    assert "step 4 of 4" in torchrun(config_file, again)
    assert_same_checkpoint(whole / "checkpoints/step-000004", again / "checkpoints/step-000004")
    resumed = [json.loads(line) for line in (again / "log.jsonl").read_text().splitlines()]
    uninterrupted_log = [json.loads(line) for line in (whole / "log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"], r["data"]) for r in resumed] == [(r["step"], r["loss"], r["data"]) for r in uninterrupted_log[2:]]
