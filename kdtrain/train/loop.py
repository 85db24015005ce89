"""The distillation loop: one step = collate, forward, weighted losses, backward, clip, step.

A :class:`Distiller` owns one run folder::

    <run>/checkpoints/step-NNNNNN/   atomic, verified (kdtrain.train.checkpoint)
    <run>/log.jsonl                  one line per step: losses, weights, lr, grad norms, alerts
    <run>/smoke.json                 the smoke run that gated the start (balance check)
    <run>/grad_norms.png             per-loss gradient norms over steps

Starting in a folder that holds a checkpoint resumes from the newest one that verifies,
after :func:`kdtrain.train.checkpoint.check_resume` has accepted the configuration; the
log is cut back to that step, so it never shows a step twice. A fresh start first runs the
smoke gate (:func:`smoke_gate`).

Under ``torchrun`` (``WORLD_SIZE`` > 1) the trainee is wrapped in DDP (gloo on CPU, NCCL
on GPU); each rank reads its stride of the data, rank 0 alone writes checkpoints and logs.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from kdtrain import atomic
from kdtrain.artifacts import ArtifactsFolder
from kdtrain.losses import LOSSES, DistillBatch, HiddenProjection, LossConfig, StudentOutputs, eligible_fraction, student_outputs
from kdtrain.student.model import StudentLM
from kdtrain.train.balance import BalanceError, BalanceMonitor, DominanceAlert, measure
from kdtrain.train.checkpoint import DataPosition, Spent, TrainState, check_resume, load_latest, save_checkpoint
from kdtrain.train.config import DistillConfig
from kdtrain.train.data import Batches, TrainingData, load_training_data

log = logging.getLogger("kdtrain.train")

LOG, SMOKE, PLOT = "log.jsonl", "smoke.json", "grad_norms.png"
HISTORY = 50  # recent steps kept in a checkpoint's metadata


class Trainee(nn.Module):
    """What is optimised: the student and, for intermediate-layer matching, its projections."""

    def __init__(self, student: StudentLM, projection: HiddenProjection | None):
        super().__init__()
        self.student, self.projection = student, projection

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple:
        """StudentOutputs' fields as a tuple: DDP finds the tensors (and the unused parameters) in it."""
        out = student_outputs(self.student, input_ids, attention_mask, self.projection)
        return out.logits, out.hidden, out.halt, out.layers


@dataclass
class World:
    rank: int = 0
    size: int = 1

    @classmethod
    def from_env(cls) -> "World":
        """torchrun's environment; initialises the process group when there are several ranks."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(dist.get_rank() if size > 1 else 0, size)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """This rank's GPU when there is one (torchrun's LOCAL_RANK), else the CPU."""
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        if self.size == 1 or not values:
            return values
        names = sorted(values)
        t = torch.tensor([values[n] for n in names], dtype=torch.float64)
        dist.all_reduce(t)
        return {n: float(v) / self.size for n, v in zip(names, t)}

    def total(self, value: float) -> float:
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t)


@dataclass
class StepRecord:
    step: int
    stage: str | None
    lr: float
    loss: float  # the weighted sum
    terms: dict[str, float]  # unweighted value of each active term
    weights: dict[str, float]  # active terms' weights at this step
    tokens: int
    eligible_fraction: float  # code-mode eligible share of the batch
    aligned_fraction: float  # supervised positions with a teacher distribution
    data: dict
    seconds: float  # wall time of the step (collate excluded)
    grad_norms: dict[str, float] | None = None  # weighted terms, on measured steps
    alert: str | None = None

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class RunResult:
    run_dir: Path
    step: int  # steps taken, resumes included
    records: list[StepRecord] = field(default_factory=list)  # this invocation's steps
    alerts: list[DominanceAlert] = field(default_factory=list)
    resumed_from: int | None = None
    stopped: str | None = None  # why it stopped before optim.steps (a budget)


def _stage_name(config: DistillConfig, step: int) -> str | None:
    stage = next((s for s in config.curriculum if step < s.until_step), config.curriculum[-1] if config.curriculum else None)
    return stage.name if stage else None


def _optimizer(config: DistillConfig, model: nn.Module):
    """AdamW and its warmup/cosine schedule, as ``optim`` says."""
    o = config.optim
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, o.lr_scale)


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Distiller:
    """One run: ``Distiller(config, run_dir).train()``; see the module docstring for the folder."""

    def __init__(self, config: DistillConfig, run_dir: Path | str, *, artifacts: Path | str | None = None,
                 data: TrainingData | None = None, world: World | None = None, progress: bool = True):
        self.config, self.run_dir = config, Path(run_dir)
        self.world = world or World()
        self.artifacts = ArtifactsFolder.open(artifacts or config.data.artifacts)
        self.data = data or load_training_data(config, self.artifacts.root)
        self.progress = progress and self.world.main
        self.loss_config = LossConfig(temperature=config.losses.kl_temperature, kl_direction=config.losses.kl_direction,
                                      length_excess=config.losses.length_excess)
        self._teacher = self._teacher_tokenizer = None  # the live teacher, only for intermediate-layer matching

    # --- setup ---------------------------------------------------------------------------

    def _build(self) -> tuple[Trainee, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        _seed_everything(self.config.optim.seed)
        student = StudentLM.from_pretrained(self.artifacts.path(self.config.student.artifact)).train()
        projection = None
        if self.config.losses.intermediate > 0:
            teacher = self._live_teacher()
            projection = HiddenProjection(self.config.losses.intermediate_layers, student.config.hidden_size, teacher.config.hidden_size)
        trainee = Trainee(student, projection).to(self.world.device)
        return (trainee, *_optimizer(self.config, trainee))

    def _live_teacher(self):
        if self._teacher is None:
            from kdtrain.teacher import gguf

            self._teacher = gguf.load_model().eval().to(self.world.device)
        return self._teacher

    def _teacher_hidden(self, batch: DistillBatch, examples_text: list[str]) -> DistillBatch:
        """Teacher hidden states on student positions for intermediate-layer matching (live teacher)."""
        import dataclasses

        from kdtrain.data.collate import pad_batch
        from kdtrain.losses.intermediate import gather_teacher_hidden
        from kdtrain.tokenizers.load import load_tokenizer

        if self._teacher_tokenizer is None:  # once, not per step
            self._teacher_tokenizer = load_tokenizer(self.artifacts, "teacher")
        tokenizer = self._teacher_tokenizer
        encoded = [tokenizer.encode(text) for text in examples_text]
        padded = pad_batch([e.ids for e in encoded], pad_id=0)
        with torch.no_grad():
            device = self.world.device
            states = self._live_teacher()(padded.input_ids.to(device), attention_mask=padded.attention_mask.to(device),
                                          output_hidden_states=True).hidden_states
        layers, mask = [], None
        for layer in self.config.losses.intermediate_layers:
            gathered, mask = gather_teacher_hidden(states[layer[1] + 1], batch.offsets, [e.offsets for e in encoded])
            layers.append(gathered)
        return dataclasses.replace(batch, teacher_hidden=tuple(layers), hidden_mask=mask & batch.attention_mask.bool())

    # --- one step ------------------------------------------------------------------------

    def losses(self, model: nn.Module, batch: DistillBatch, weights: dict[str, float]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """(weighted terms, unweighted values) of the active losses on ``batch``."""
        out = StudentOutputs(*model(batch.input_ids, batch.attention_mask))
        values = {name: LOSSES[name](batch, out, self.loss_config) for name in weights}
        return {n: weights[n] * v for n, v in values.items()}, {n: float(v.detach()) for n, v in values.items()}

    def step(self, model: nn.Module, optimizer, scheduler, batch: DistillBatch, indices: list[int], step: int, measure_norms: bool):
        """One optimizer step; (weighted total, unweighted terms, weights, grad norms or None, lr)."""
        weights = {n: w for n, w in self.config.loss_weights(step).items() if w > 0}
        if "intermediate" in weights:
            batch = self._teacher_hidden(batch, [self.data.examples[i].request.text for i in indices])
        optimizer.zero_grad(set_to_none=True)
        weighted, values = self.losses(model, batch, weights)
        total = sum(weighted.values())
        norms = None
        params = [p for p in model.parameters() if p.requires_grad]
        if measure_norms:
            distributed = self.world.size > 1
            norms = self.world.mean(measure(weighted, params, accumulate=not distributed))
            if distributed:
                total.backward()
        else:
            total.backward()
        if self.config.optim.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, self.config.optim.grad_clip)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        return float(total.detach()), values, weights, norms, lr

    # --- the run -------------------------------------------------------------------------

    def train(self, stop_after: int | None = None, override_balance: bool = False, gate: bool = True) -> RunResult:
        """Train to ``optim.steps`` (or ``stop_after`` more steps), resuming if the run folder has a checkpoint.

        A fresh run is gated by the smoke run unless ``gate`` is False (the ablations: their
        alerts are results to compare, not reasons to stop).
        """
        config = self.config
        trainee, optimizer, scheduler = self._build()
        saved = load_latest(self.run_dir, config.checkpoint.dir)
        spent, history, position, start = Spent(), [], DataPosition(shard=self.world.rank), 0
        if saved is not None:
            for change in check_resume(saved, config):
                log.warning("resume: allowed configuration change %s (resume.allow_changes)", change)
            saved.restore(trainee, optimizer, scheduler)
            spent, history, position, start = saved.budgets, list(saved.history), saved.data, saved.step
            log.info("resuming %s at step %d (%s)", self.run_dir, start, saved.folder)
            self._cut_log(start)
        else:
            self._truncate_log()
            if gate:
                smoke_gate(self, trainee, override_balance or config.balance.override)
        model: nn.Module = trainee
        if self.world.size > 1:
            device_ids = [self.world.device.index] if self.world.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(trainee, device_ids=device_ids, find_unused_parameters=True)
        batches = Batches(self.data, config.data.batch_size, config.data.seed, DataPosition(position.epoch, self.world.rank, position.position),
                          self.world.rank, self.world.size)
        monitor = BalanceMonitor(config.balance.ratio, config.balance.window)
        result = RunResult(self.run_dir, start, resumed_from=start if saved is not None else None)
        end = config.optim.steps if stop_after is None else min(config.optim.steps, start + stop_after)
        if spent.exhausted(config.budgets):  # spent before a restart: never spent again
            result.stopped = "; ".join(spent.exhausted(config.budgets))
            log.warning("not training: budget already reached at step %d (%s)", start, result.stopped)
            end = start
        bar = tqdm(range(start, end), desc="kdtrain distill", unit="step", disable=not self.progress, initial=start, total=config.optim.steps)
        started = time.monotonic()
        for step in bar:
            taken, indices, batch = batches.next()
            batch = batch.to(self.world.device)
            measured = step % config.balance.every_n_steps == 0
            tick = time.perf_counter()
            loss, values, weights, norms, lr = self.step(model, optimizer, scheduler, batch, indices, step, measured)
            seconds = time.perf_counter() - tick
            alert = monitor.observe(step, norms) if norms is not None else None
            tokens = int(self.world.total(float(batch.attention_mask.sum())))
            spent.tokens += tokens
            record = StepRecord(step, _stage_name(config, step), lr, loss, values, weights, tokens, eligible_fraction(batch),
                                batch.aligned_fraction, {"epoch": taken.epoch, "position": taken.position}, round(seconds, 4), norms,
                                str(alert) if alert else None)
            self._log(record)
            result.records.append(record)
            history = (history + [{"step": step, "loss": loss, **{f"loss.{k}": v for k, v in values.items()}}])[-HISTORY:]
            bar.set_postfix(loss=f"{loss:.3f}")
            if alert:
                result.alerts.append(alert)
                log.warning("gradient balance: %s", alert)
            if norms is not None:
                log.info("step %d grad norms: %s", step, ", ".join(f"{k}={v:.3g}" for k, v in sorted(norms.items())))
            if torch.cuda.is_available():
                spent.gpu_hours += self.world.size * (time.monotonic() - started) / 3600
                started = time.monotonic()
            done = step + 1
            exhausted = spent.exhausted(config.budgets)
            if done % config.checkpoint.every_n_steps == 0 or done == end or exhausted:
                state = TrainState.capture(done, trainee, optimizer, scheduler, config, batches.position, spent, history)
                if self.world.main:
                    save_checkpoint(self.run_dir, state)
            result.step = done
            if exhausted:
                result.stopped = "; ".join(exhausted)
                log.warning("stopping at step %d: budget reached (%s)", done, result.stopped)
                break
        bar.close()
        if self.world.main:
            self.plot()
        self.trainee = trainee
        return result

    # --- the log -------------------------------------------------------------------------

    def records(self) -> list[dict]:
        """The log's steps; a last line cut by a crash mid-append is left out."""
        path = self.run_dir / LOG
        if not path.exists():
            return []
        lines = path.read_text(encoding="utf-8").splitlines()
        records = []
        for number, line in enumerate(lines):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if number < len(lines) - 1:
                    raise
        return records

    def _log(self, record: StepRecord) -> None:
        """Appended, not rewritten (a long run has many steps); resume cuts it back atomically."""
        if not self.world.main:
            return
        with open(self.run_dir / LOG, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record.to_json(), sort_keys=True) + "\n")

    def _cut_log(self, step: int) -> None:
        """Drop the lines of steps after the checkpoint resumed from: they are done again."""
        if self.world.main and (self.run_dir / LOG).exists():
            kept = [r for r in self.records() if r["step"] < step]
            atomic.write_text(self.run_dir / LOG, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))

    def _truncate_log(self) -> None:
        if self.world.main:
            atomic.write_text(self.run_dir / LOG, "")

    def plot(self) -> Path | None:
        """grad_norms.png: each weighted term's gradient norm over the measured steps (log scale)."""
        from kdtrain.train.plots import plot_grad_norms

        return plot_grad_norms(self.records(), self.run_dir / PLOT, self.config.balance.ratio)


def smoke_gate(distiller: Distiller, trainee: Trainee, override: bool) -> list[DominanceAlert]:
    """A few dozen measured steps on a copy of the model; refuse to start if a term dominates.

    The copy is thrown away (the run starts from the untouched weights and RNG state). With
    ``override`` the run starts anyway and the override is logged with the alerts.
    """
    config = distiller.config
    steps = config.balance.smoke_steps
    rng = torch.get_rng_state()
    model = copy.deepcopy(trainee)
    optimizer, scheduler = _optimizer(config, model)
    batches = Batches(distiller.data, config.data.batch_size, config.data.seed, DataPosition(), distiller.world.rank, distiller.world.size)
    monitor = BalanceMonitor(config.balance.ratio, config.balance.window)
    measured = []
    for step in tqdm(range(steps), desc="kdtrain smoke run", unit="step", disable=not distiller.progress):
        _, indices, batch = batches.next()
        batch = batch.to(distiller.world.device)
        _, values, _, norms, _ = distiller.step(model, optimizer, scheduler, batch, indices, step, measure_norms=True)
        monitor.observe(step, norms)
        measured.append({"step": step, "grad_norms": norms, "terms": values})
    torch.set_rng_state(rng)
    alerts = monitor.alerts
    report = {"steps": steps, "ratio": config.balance.ratio, "window": config.balance.window, "passed": not alerts,
              "override": bool(alerts) and override, "alerts": [str(a) for a in alerts], "measured": measured,
              "eligible_fraction": distiller.data.eligible_fraction, "missing_teacher_ratio": distiller.data.missing_ratio}
    if distiller.world.main:
        atomic.write_json(distiller.run_dir / SMOKE, report)
    log.info("smoke run: %d steps, code-mode eligible fraction %.2f, missing-teacher ratio %.2f, %d alert(s)",
             steps, distiller.data.eligible_fraction, distiller.data.missing_ratio, len(alerts))
    if alerts and not override:
        raise BalanceError("\n  ".join([
            f"{distiller.run_dir / SMOKE}: the smoke run's gradient balance check failed ({len(alerts)} alert(s)); the run does not start:",
            *map(str, alerts[:3]),
            "fix the loss weights, or start anyway with balance.override: true (or --override-balance); the override is logged"]))
    if alerts:
        log.warning("balance override: starting despite %d alert(s) in the smoke run: %s", len(alerts), alerts[0])
    return alerts
