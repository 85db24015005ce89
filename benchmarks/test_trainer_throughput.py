"""Trainer step time and peak memory: KD against plain CE training of the same student, both
from the cached teacher targets, on this machine's device (GPU if present).

One run of the reference config trains the student; each of its batches is stepped three
times, once per loss set, in an order rotated per batch: ``ce`` (CE alone), ``kd`` (KL and
CE: the distillation step proper, against which issue #17 sets KD <= 1.1x CE's step time and
no more memory) and ``reference`` (every term the reference config trains). The three share
the student, the optimizer and the batches, and interleaving them spreads a busy machine's
noise over all three. A step is the loop's own (:meth:`Distiller.step`: forward, losses,
backward, clip, optimizer step); its time is wall time. A ratio is the median over the
batches of the two modes' times on the same batch (the first round, allocator and kernel
warm-up, excluded): batches differ in length, and a step slowed by another process on a
shared machine does not decide it. Its peak memory is measured on further rounds, apart from the
timed ones, by :func:`kdtrain.train.memory.measure_allocations`: CUDA's allocator statistics,
or on CPU the profiler's allocation events, i.e. torch tensors only (not the process's RSS,
which is process-wide and never goes down), gradients from none at the step's start.

On a GPU it also prints each mode's tokens/s and MFU (model FLOPs per token from the student's
shape, :func:`training_flops_per_token`, over the GPU's dense bf16 peak). Run with ``make bench``
(needs the demo artifacts). Reported as numbers and ratios, never asserted. The balance measurement is switched off here (it is amortised over
``balance.every_n_steps``; its cost is (terms - 1) extra backward passes on measured steps).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

ROUNDS = 11  # batches stepped and timed, the first one a warm-up
MEMORY_ROUNDS = 2
MODES = {"ce": ("ce",), "kd": ("kl", "ce"), "reference": None}  # the terms a step trains; None: all of the config's


def _config(root: Path):
    from kdtrain.train.config import load_config

    config = load_config(root / "configs/distill_reference.yaml")
    return config.model_copy(update={
        "curriculum": (), "optim": config.optim.model_copy(update={"steps": ROUNDS + MEMORY_ROUNDS}),
        "balance": config.balance.model_copy(update={"every_n_steps": 10**6}),
        "checkpoint": config.checkpoint.model_copy(update={"every_n_steps": 10**6})})


def test_kd_step_time_and_peak_memory_against_ce(request, bench_artifacts, tmp_path):
    import torch

    from kdtrain.train.loop import Distiller
    from kdtrain.train.memory import measure_allocations

    distiller = Distiller(_config(Path(request.config.rootpath)), tmp_path / "run", artifacts=bench_artifacts, progress=False)
    distiller.setup(gate=False)
    device = distiller.world.device
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    seconds = {mode: [] for mode in MODES}
    peaks = {mode: [] for mode in MODES}
    tokens = 0
    for step in range(ROUNDS + MEMORY_ROUNDS):
        _, indices, batch = distiller.batches.next()
        batch = batch.to(device)
        timed = 0 < step < ROUNDS
        tokens += int(batch.attention_mask.sum()) if timed else 0
        order = list(MODES)[step % 3:] + list(MODES)[:step % 3]
        for mode in order:
            def one_step():
                distiller.step(distiller.model, distiller.optimizer, distiller.scheduler, batch, indices, step,
                               measure_norms=False, terms=MODES[mode])

            distiller.optimizer.zero_grad(set_to_none=True)
            if step < ROUNDS:
                sync()
                tick = time.perf_counter()
                one_step()
                sync()
                if timed:
                    seconds[mode].append(time.perf_counter() - tick)
            else:
                peaks[mode].append(measure_allocations(one_step, device).peak)
    terms = sorted(n for n, w in distiller.config.loss_weights(0).items() if w > 0)
    print(f"\n{tokens} tokens in {ROUNDS - 1} timed batches on {device}, each stepped as ce, kd (kl + ce) and the reference "
          f"loss set ({', '.join(terms)}); peak memory over {MEMORY_ROUNDS} more batches")
    median = {mode: statistics.median(seconds[mode]) for mode in MODES}
    for mode in MODES:
        print(f"{mode}: median {median[mode]:.2f} s/step (min {min(seconds[mode]):.2f}, max {max(seconds[mode]):.2f}), "
              f"{tokens / sum(seconds[mode]):.0f} tokens/s, peak {max(peaks[mode]) / 2**20:.0f} MiB")
    for label, mode in (("KD overhead (kl + ce against ce)", "kd"), ("reference loss set against ce", "reference")):
        ratio = statistics.median(t / c for t, c in zip(seconds[mode], seconds["ce"]))
        print(f"{label}: step time {ratio:.2f}x, peak memory {max(peaks[mode]) / max(peaks['ce']):.2f}x")
    if device.type == "cuda":
        student = distiller.trainee.student
        per_token = training_flops_per_token(student, int(batch.input_ids.shape[1]))
        peak = peak_flops(torch.cuda.get_device_name(device))
        for mode in MODES:
            rate = tokens / sum(seconds[mode])
            mfu = f"MFU {rate * per_token / peak:.1%} of {peak / 1e12:.0f} TFLOP/s" if peak else "MFU: peak unknown (set KD_PEAK_FLOPS)"
            print(f"{mode} on {torch.cuda.get_device_name(device)}: {rate:.0f} tokens/s, {mfu}")


# Dense bf16 tensor-core peaks (vendor datasheets), by a substring of torch.cuda.get_device_name().
PEAK_BF16 = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}


def peak_flops(name: str) -> float | None:
    """The GPU's dense bf16 peak in FLOP/s: ``KD_PEAK_FLOPS`` if set, else the datasheet's (None if unknown)."""
    import os

    if os.environ.get("KD_PEAK_FLOPS"):
        return float(os.environ["KD_PEAK_FLOPS"])
    return next((flops for key, flops in PEAK_BF16.items() if key in name), None)


def training_flops_per_token(student, context: int) -> float:
    """Model FLOPs of one trained token (PaLM's MFU convention): 6 per weight of every matmul, the
    LM head included and the embedding lookup not, plus 12 x layers x width x context for
    attention. The chunked head's recomputed logits are not counted: MFU counts the model's
    FLOPs, not the ones an implementation chooses to spend."""
    c = student.config
    matmul = sum(p.numel() for n, p in student.named_parameters() if p.dim() == 2 and "embed_tokens" not in n)
    if c.tie_word_embeddings:
        matmul += c.vocab_size * c.hidden_size  # the head shares the embedding's weight but is a matmul
    return 6 * matmul + 12 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * context
