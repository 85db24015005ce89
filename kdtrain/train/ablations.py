"""Three canonical mini experiments on a fixed slice, kept as a regression suite.

- ``base_kd``: KL + CE;
- ``kd_tool``: + tool name, JSON arguments and result integration;
- ``kd_tool_length_halt``: + length-aware KD and the halt head.

Each starts from the initial student, trains ``protocol.steps`` steps on the first
``protocol.slice`` usable samples with the reference config's weights for its terms (all
others 0, no curriculum: the terms are what is compared), then is evaluated on the same
slice: every loss as a metric, tool-name accuracy, and greedy sample outputs. The results
(``ablations/results.json``) are what ``contracts/ablations.yaml`` compares with the stored
baselines, so a change that silently breaks one supervision signal shows as a regression of
that experiment alone.
"""

from __future__ import annotations

from pathlib import Path

from kdcontracts.models.ablations import Protocol
from kdtrain.train.config import LOSS_NAMES, DistillConfig

EXPERIMENTS: dict[str, tuple[str, ...]] = {
    "base_kd": ("kl", "ce"),
    "kd_tool": ("kl", "ce", "tool_name", "tool_args", "tool_integration"),
    "kd_tool_length_halt": ("kl", "ce", "tool_name", "tool_args", "tool_integration", "length", "halt"),
}
METRICS = ("kl", "ce", "tool_name", "tool_args", "tool_integration", "length", "halt")  # every loss but the gated ones


def experiment_config(base: DistillConfig, terms: tuple[str, ...], protocol: Protocol) -> DistillConfig:
    losses = base.losses.model_copy(update={n: getattr(base.losses, n) if n in terms else 0.0 for n in LOSS_NAMES})
    data = base.data.model_copy(update={"slice": protocol.slice})
    optim = base.optim.model_copy(update={"steps": protocol.steps, "warmup_steps": min(base.optim.warmup_steps, protocol.steps)})
    checkpoint = base.checkpoint.model_copy(update={"every_n_steps": protocol.steps, "keep_last": 1})
    balance = base.balance.model_copy(update={"every_n_steps": None})  # outcomes are compared, not gradient balance
    return base.model_copy(update={"losses": losses, "curriculum": (), "data": data, "optim": optim, "checkpoint": checkpoint,
                                   "balance": balance})


def evaluate(distiller, protocol: Protocol) -> dict:
    """Metrics of the trained student on the slice, and greedy outputs for its first prompts."""
    import torch

    with torch.no_grad():
        return _evaluate(distiller, protocol)


def _evaluate(distiller, protocol: Protocol) -> dict:
    import torch

    from kdtrain.data.chat import ChatFormat
    from kdtrain.losses import LOSSES, student_outputs
    from kdtrain.teacher.base import prompt_messages

    model = distiller.trainee.eval()
    data = distiller.data
    batch = data.batch(list(range(len(data))))
    out = student_outputs(model.student, batch.input_ids, batch.attention_mask, model.projection)
    metrics = {name: float(LOSSES[name](batch, out, distiller.loss_config)) for name in METRICS}
    predicted = out.head.full().argmax(-1)
    names = batch.tool_name_mask
    metrics["tool_name_accuracy"] = float((predicted[names] == batch.labels[names]).float().mean()) if names.any() else 0.0
    supervised = batch.supervised
    metrics["token_accuracy"] = float((predicted[supervised] == batch.labels[supervised]).float().mean())
    tokenizer, eos = data.tokenizer, batch.eos_id
    chat = ChatFormat.of(tokenizer)
    samples = []
    for example in data.examples[: protocol.samples]:
        prompt = chat.prompt(prompt_messages(example.request.messages))
        ids = list(tokenizer.encode(prompt).ids)
        new = []
        for _ in range(protocol.sample_tokens):
            token = int(model.student(torch.tensor([ids + new]))[0, -1].argmax())
            new.append(token)
            if token == eos:
                break
        samples.append({"sample": example.request.sample_id, "tokens": new, "text": tokenizer.decode(new)})
    return {"metrics": {k: round(v, 6) for k, v in metrics.items()}, "samples": samples}


def run_ablations(base: DistillConfig, artifacts: Path, out: Path, protocol: Protocol) -> dict:
    """Train and evaluate every experiment under ``out/<name>/``; the results as JSON data."""
    from kdtrain.train.loop import Distiller

    results = {}
    for name, terms in EXPERIMENTS.items():
        config = experiment_config(base, terms, protocol)
        distiller = Distiller(config, out / name, artifacts=artifacts)
        distiller.setup(gate=False)
        run = distiller.train()
        distiller.cleanup()
        results[name] = {"terms": list(terms), "fingerprint": config.fingerprint(), "steps": run.step,
                         "train_loss": [round(r.loss, 6) for r in run.records], **evaluate(distiller, protocol)}
    return {"protocol": protocol.__dict__, "experiments": results}

