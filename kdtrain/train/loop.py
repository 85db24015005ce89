"""The distillation loop: one step = collate, forward, weighted losses, backward, clip, step.

A :class:`Distiller` owns one run folder::

    <run>/checkpoints/step-NNNNNN/   atomic, verified (kdtrain.train.checkpoint)
    <run>/log.jsonl                  one line per step: losses, weights, lr, grad norms, alerts
    <run>/smoke.json                 the smoke run that gated the start (balance check)
    <run>/grad_norms.png             per-loss gradient norms over steps
    <run>/curriculum.json, .png      per curriculum stage: token sources, lengths, halt head, alerts
                                     (kdtrain.train.telemetry; with a ``telemetry`` section)

A stage's ``on_policy`` share of steps trains on the student's own answers
(kdtrain.train.on_policy).

Starting in a folder that holds a checkpoint resumes from the newest one that verifies,
after :func:`kdtrain.train.checkpoint.check_resume` has accepted the configuration; the
log is cut back to that step, so it never shows a step twice. A fresh start first runs the
smoke gate (:func:`smoke_gate`).

Under ``torchrun`` (``WORLD_SIZE`` > 1) the trainee is wrapped in DDP (gloo on CPU, NCCL
on GPU), or sharded with FSDP2 (``parallel.strategy: fsdp``: each decoder layer and the root);
each rank reads its stride of each step's samples and rank 0 alone writes the logs. Under DDP
rank 0 writes checkpoints; under FSDP2 every rank writes its shard of one
(kdtrain.train.shards), which resumes at any world size.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from kdtrain import atomic
from kdtrain.artifacts import ArtifactsFolder
from kdtrain.errors import ConfigError, located
from kdtrain.losses import (DistillBatch, HiddenProjection, LossConfig, WeightedLoss, eligible_fraction, student_outputs,
                            weighted_sum)
from kdtrain.student.model import StudentLM
from kdtrain.train.balance import BalanceError, BalanceMonitor, DominanceAlert, measure, measure_sharded
from kdtrain.train.checkpoint import (DataPosition, Spent, TrainState, capture_rng, check_resume, load_latest, restore_rng,
                                      save_checkpoint)
from kdtrain.train.config import DistillConfig
from kdtrain.train.data import Batches, TrainingData, load_training_data
from kdtrain.train.on_policy import TERMS as ON_POLICY_TERMS, OnPolicyBatches, drawn
from kdtrain.train.telemetry import CurriculumTelemetry, digest, tokens_by_source
from kdtrain.train.world import World

log = logging.getLogger("kdtrain.train")

LOG, SMOKE, PLOT = "log.jsonl", "smoke.json", "grad_norms.png"
HISTORY = 50  # recent steps kept in a checkpoint's metadata


class Trainee(nn.Module):
    """What is optimised: the student and, for intermediate-layer matching, its projections."""

    def __init__(self, student: StudentLM, projection: HiddenProjection | None):
        super().__init__()
        self.student, self.projection = student, projection

    def forward(self, batch: DistillBatch, weights: dict[str, float], cfg: LossConfig) -> WeightedLoss:
        """The weighted loss terms of one batch, computed inside the forward.

        DDP and FSDP see every parameter the loss uses during this call (an untied LM head is
        read by the losses, not by the backbone), and the losses read the head lazily
        (:class:`kdtrain.losses.StudentOutputs`): the whole ``[tokens, vocab]`` logits are
        never held in full precision."""
        out = student_outputs(self.student, batch.input_ids, batch.attention_mask, self.projection)
        return weighted_sum(batch, out, cfg, weights)


@dataclass
class StepRecord:
    step: int
    stage: str | None
    lr: float
    loss: float  # the weighted sum
    terms: dict[str, float]  # unweighted value of each active term
    weights: dict[str, float]  # active terms' weights at this step
    tokens: int
    sources: dict[str, int]  # supervised tokens by source: data, teacher (generate-mode targets), student (on-policy)
    eligible_fraction: float  # code-mode eligible share of the batch
    aligned_fraction: float  # supervised positions with a teacher distribution
    data: dict
    seconds: float  # wall time of the step (the data's collate excluded; on-policy: the answers and their scoring included)
    grad_norms: dict[str, float] | None = None  # weighted terms, on measured steps
    alert: DominanceAlert | None = None
    curriculum: dict | None = None  # on a stage's last step: its telemetry (curriculum.json has the whole summary)

    def to_json(self) -> dict:
        return {k: str(v) if k == "alert" else v for k, v in self.__dict__.items() if v is not None}


@dataclass(frozen=True)
class StepOutcome:
    loss: float  # the weighted sum
    values: dict[str, float]  # unweighted value of each active term
    weights: dict[str, float]
    norms: dict[str, float] | None  # each weighted term's gradient norm, on measured steps
    lr: float


@dataclass
class RunResult:
    run_dir: Path
    step: int  # steps taken, resumes included
    records: list[StepRecord] = field(default_factory=list)  # this invocation's steps
    alerts: list[DominanceAlert] = field(default_factory=list)
    resumed_from: int | None = None
    stopped: str | None = None  # why it stopped before optim.steps (a budget)


def _stage_name(config: DistillConfig, step: int) -> str | None:
    stage = config.stage(step)
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
    """One run, shaped like a torchtune recipe: ``setup()``, ``train()`` (the loop alone), ``cleanup()``.

    ``setup`` leaves every piece of the run in place (model, optimizer, data position, spent
    budgets), resumed or gated; ``train`` only steps, logs and checkpoints through the small
    methods below it. See the module docstring for the run folder.
    """

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
        self._on_policy: OnPolicyBatches | None = None

    # --- setup ---------------------------------------------------------------------------

    def setup(self, *, gate: bool = True, override_balance: bool = False, override_alerts: bool = False,
              unlock: Callable[[], dict] | None = None) -> None:
        """Build the trainee, then resume from the newest checkpoint or, fresh, pass the smoke gate.

        ``gate=False`` skips the gate (the ablations: their alerts are results to compare,
        not reasons to stop); ``override_balance`` starts despite its alerts (logged);
        ``override_alerts`` continues past the curriculum telemetry's alerts (logged, recorded),
        one already raised at the step resumed from included. ``unlock`` (a full run's,
        :func:`kdtrain.gates.verdict.unlock`) is asked before a fresh start; what it returns, the
        verdict or its logged override, goes into every checkpoint.
        """
        config = self.config
        self.trainee, self.optimizer, self.scheduler = self._build()
        saved = load_latest(self.run_dir, config.checkpoint.dir)
        self.spent, self.history, position, start = Spent(), [], DataPosition(shard=self.world.rank, world=self.world.size), 0
        if saved is not None:
            for change in check_resume(saved, config):
                log.warning("resume: allowed configuration change %s (resume.allow_changes)", change)
            saved.restore(self.trainee, self.optimizer, self.scheduler)
            self.spent, self.history, position, start = saved.budgets, list(saved.history), saved.data, saved.step
            log.info("resuming %s at step %d (%s)", self.run_dir, start, saved.folder)
            self._cut_log(start)
            self.gate = saved.gate
        else:
            self.gate = unlock() if unlock is not None else None
            self._truncate_log()
            if gate:
                smoke_gate(self, override_balance or config.balance.override)
        self.model: nn.Module = self.trainee  # under FSDP2 the trainee itself is sharded (_build)
        if self.world.size > 1 and not self.sharded:
            device_ids = [self.world.device.index] if self.world.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.trainee, device_ids=device_ids, find_unused_parameters=True)
        self.batches = Batches(self.data, config.data.batch_size, config.data.seed, position, self.world.rank, self.world.size,
                               workers=config.data.workers)
        self.monitor = BalanceMonitor(config.balance.ratio, config.balance.window)
        self.result = RunResult(self.run_dir, start, resumed_from=start if saved is not None else None)
        self.override_alerts = override_alerts
        self.telemetry = CurriculumTelemetry.open(config, self.run_dir, self.artifacts, self.data.tokenizer, self.world.main)
        if self.telemetry is not None:
            self.telemetry.start(start, override_alerts)

    @property
    def sharded(self) -> bool:
        """FSDP2 (``parallel.strategy: fsdp``): sharded modules under torchrun, sharded checkpoints always."""
        return self.config.parallel.strategy == "fsdp"

    def _build(self) -> tuple[Trainee, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        """The trainee from the initial student, seeded (the same weights every time), sharded under FSDP2, and its optimizer."""
        _seed_everything(self.config.optim.seed)
        student = StudentLM.from_pretrained(self.artifacts.path(self.config.student.artifact)).train()
        projection = None
        if self.config.losses.intermediate > 0:
            teacher = self._live_teacher()
            projection = HiddenProjection(self.config.losses.intermediate_layers, student.config.hidden_size, teacher.config.hidden_size)
        trainee = Trainee(student, projection).to(self.world.device)
        if self.sharded and self.world.size > 1:
            self.world.shard(trainee, trainee.student.model.layers, self.config.parallel)
        return (trainee, *_optimizer(self.config, trainee))

    def _live_teacher(self):
        if self._teacher is None:
            from kdtrain.teacher import source

            if self.config.teacher.backend != "local":
                raise ConfigError(located(self.config.file, "losses.intermediate", "0 since teacher.backend is not local "
                                          "(matching hidden states needs the teacher's weights)", self.config.losses.intermediate))
            teacher = source.load_model(self.config.teacher.source)  # shared in this process: moved to another device as a copy
            self._teacher = teacher if self.world.device.type == "cpu" else copy.deepcopy(teacher).to(self.world.device)
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

    # --- one optimizer step (the run's and the smoke gate's) -------------------------------

    def step(self, model: nn.Module, optimizer, scheduler, batch: DistillBatch, indices: list[int], step: int,
             measure_norms: bool, terms: tuple[str, ...] | None = None) -> StepOutcome:
        """Forward, the weighted losses (:func:`kdtrain.losses.weighted_sum`), backward, clip, step.

        ``terms``: only these of the step's weighted terms (an on-policy step's KL)."""
        weights = {n: w for n, w in self.config.loss_weights(step).items() if w > 0 and (terms is None or n in terms)}
        if "intermediate" in weights:
            batch = self._teacher_hidden(batch, [self.data.examples[i].request.text for i in indices])
        optimizer.zero_grad(set_to_none=True)
        loss = model(batch, weights, self.loss_config)
        norms = None
        params = [p for p in model.parameters() if p.requires_grad]
        if measure_norms and self.sharded and self.world.size > 1:
            norms = measure_sharded(loss.terms, params)  # the gradients hold the total after it
        elif measure_norms:
            distributed = self.world.size > 1
            norms = self.world.mean(measure(loss.terms, params, accumulate=not distributed))
            if distributed:
                loss.total.backward()
        else:
            loss.total.backward()
        if self.config.optim.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, self.config.optim.grad_clip)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        return StepOutcome(float(loss.total.detach()), loss.values, weights, norms, lr)

    # --- the run -------------------------------------------------------------------------

    def train(self, stop_after: int | None = None) -> RunResult:
        """The loop: to ``optim.steps`` (or ``stop_after`` more steps), stopping early when a budget is spent."""
        config, result = self.config, self.result
        end = config.optim.steps if stop_after is None else min(config.optim.steps, result.step + stop_after)
        if self.spent.exhausted(config.budgets):  # spent before a restart: never spent again
            result.stopped = "; ".join(self.spent.exhausted(config.budgets))
            log.warning("not training: budget already reached at step %d (%s)", result.step, result.stopped)
            return result
        bar = tqdm(range(result.step, end), desc="kdtrain distill", unit="step", disable=not self.progress,
                   initial=result.step, total=config.optim.steps)
        self._clock = time.monotonic()
        with bar:
            for step in bar:
                record = self._train_step(step)
                bar.set_postfix(loss=f"{record.loss:.3f}")
                stage = self._measure_stage(record)
                self._log_step(record)
                exhausted = self._spend(record)
                self._maybe_checkpoint(step + 1, end, bool(exhausted) or stage is not None)
                result.step = step + 1
                if stage is not None:  # after the stage's checkpoint and summary
                    self.telemetry.stop_on_alerts(stage, self.override_alerts)
                if exhausted:
                    result.stopped = "; ".join(exhausted)
                    log.warning("stopping at step %d: budget reached (%s)", result.step, result.stopped)
                    break
        return result

    def cleanup(self) -> None:
        """After the run: the gradient-norm plot (rank 0)."""
        if self.world.main:
            self.plot()

    def _train_step(self, step: int) -> StepRecord:
        """One step on the data's batch or, drawn on-policy (kdtrain.train.on_policy), on the student's answers to its prompts.

        An on-policy step is not balance-measured: its one term has no other to be weighed against."""
        taken, indices, batch = self.batches.next()
        on_policy = drawn(self.config, step)
        tick = time.perf_counter()
        if on_policy:
            batch = self._on_policy_batches().batch(self.trainee.student, [self.data.examples[i] for i in indices],
                                                    [self.data.eligible[i] for i in indices])
        source = "student" if on_policy else "teacher" if self.config.teacher.mode == "generate" else "data"
        sources = {k: int(self.world.total(float(v))) for k, v in tokens_by_source(batch, source).items()}
        batch = batch.to(self.world.device)
        out = self.step(self.model, self.optimizer, self.scheduler, batch, indices, step,
                        measure_norms=self._measured(step) and not on_policy, terms=ON_POLICY_TERMS if on_policy else None)
        seconds = time.perf_counter() - tick
        alert = self.monitor.observe(step, out.norms) if out.norms is not None else None
        tokens = int(self.world.total(float(batch.attention_mask.sum())))
        return StepRecord(step, _stage_name(self.config, step), out.lr, out.loss, out.values, out.weights, tokens, sources,
                          eligible_fraction(batch), batch.aligned_fraction, {"epoch": taken.epoch, "position": taken.position},
                          round(seconds, 4), out.norms, alert)

    def _on_policy_batches(self) -> OnPolicyBatches:
        if self._on_policy is None:  # the teacher is loaded at the first on-policy step, not before
            self._on_policy = OnPolicyBatches.of(self.config, self.artifacts, self.data.tokenizer)
        return self._on_policy

    def _measure_stage(self, record: StepRecord) -> dict | None:
        """At a curriculum stage's end (telemetry on): its summary, a digest of it in the step's record."""
        if self.telemetry is None:
            return None
        records = self.records() + [record.to_json()] if self.world.main else []
        summary = self.telemetry.measure(record.step + 1, self.trainee.student, records)
        if summary is not None:
            record.curriculum = digest(summary)
        return summary

    def _measured(self, step: int) -> bool:
        every = self.config.balance.every_n_steps
        return every is not None and step % every == 0

    def _log_step(self, record: StepRecord) -> None:
        """The step's line in log.jsonl, its losses in the checkpoint history, its alert and norms in the log."""
        self._log(record)
        self.result.records.append(record)
        self.history = (self.history + [{"step": record.step, "loss": record.loss,
                                         **{f"loss.{k}": v for k, v in record.terms.items()}}])[-HISTORY:]
        if record.alert:
            self.result.alerts.append(record.alert)
            log.warning("gradient balance: %s", record.alert)
        if record.grad_norms is not None:
            log.info("step %d grad norms: %s", record.step, ", ".join(f"{k}={v:.3g}" for k, v in sorted(record.grad_norms.items())))

    def _spend(self, record: StepRecord) -> list[str]:
        """Book the step's tokens (and GPU time); the budgets now exhausted."""
        self.spent.tokens += record.tokens
        if torch.cuda.is_available():
            now = time.monotonic()
            self.spent.gpu_hours += self.world.size * (now - self._clock) / 3600
            self._clock = now
        return self.spent.exhausted(self.config.budgets)

    def _maybe_checkpoint(self, done: int, end: int, now: bool) -> None:
        """Every ``checkpoint.every_n_steps``, at the last step, and ``now`` (a budget stops the run, a measured stage
        ends: a run its alert stops resumes there); rank 0 writes, or under FSDP2 every rank its shard."""
        if done % self.config.checkpoint.every_n_steps == 0 or done == end or now:
            state = TrainState.capture(done, self.trainee, self.optimizer, self.scheduler, self.config, self.batches.position,
                                       self.spent, self.history, self.gate, sharded=self.sharded, world=self.world.size)
            if self.world.main or self.sharded:
                save_checkpoint(self.run_dir, state)

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


def smoke_gate(distiller: Distiller, override: bool) -> list[DominanceAlert]:
    """A few dozen measured steps on a second trainee; refuse to start if a term dominates.

    The second trainee is built as the first was (same seed, same weights; sharded the same
    way under FSDP2, where a deep copy of a sharded module is not an option), then thrown away,
    and every RNG (Python, numpy, torch CPU and CUDA) is put back, so the run starts from the
    untouched weights and random state. With ``override`` the run
    starts anyway and the override is logged with the alerts.
    """
    config = distiller.config
    steps = config.balance.smoke_steps
    rng = capture_rng()
    model, optimizer, scheduler = distiller._build()
    batches = Batches(distiller.data, config.data.batch_size, config.data.seed, DataPosition(world=distiller.world.size),
                      distiller.world.rank, distiller.world.size)
    monitor = BalanceMonitor(config.balance.ratio, config.balance.window)
    measured = []
    for step in tqdm(range(steps), desc="kdtrain smoke run", unit="step", disable=not distiller.progress):
        _, indices, batch = batches.next()
        batch = batch.to(distiller.world.device)
        out = distiller.step(model, optimizer, scheduler, batch, indices, step, measure_norms=True)
        monitor.observe(step, out.norms)
        measured.append({"step": step, "grad_norms": out.norms, "terms": out.values})
    restore_rng(rng)
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
