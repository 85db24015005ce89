"""The calibration set (tool use, code, long context up to the largest length) and per-module
activation statistics, so a later run can see the distribution drift."""

from __future__ import annotations

import json
import random

import numpy as np
import torch

from kdcontracts.models.tokens import Message
from kdtrain.data.chat import ChatFormat

_TOOLS = ("get_weather", "search_flights", "convert_currency", "run_python", "lookup_customer")
_CITIES = ("Paris", "São Paulo", "Kyoto", "Nairobi", "Reykjavík", "Austin")


_SYSTEM = Message("system", "You are a helpful assistant.")


def _tool_use(rng: random.Random) -> list[Message]:
    tool, city = rng.choice(_TOOLS), rng.choice(_CITIES)
    call = json.dumps({"name": tool, "arguments": {"city": city, "limit": rng.randint(1, 9)}})
    return [_SYSTEM, Message("user", f"Please use {tool} for {city} and summarise."),
            Message("assistant", f"<think>I should call {tool}.</think><tool_call>\n{call}\n</tool_call>"),
            Message("tool", json.dumps({"ok": True, "value": rng.random()}))]


def _code(rng: random.Random) -> list[Message]:
    n = rng.randint(2, 9)
    return [_SYSTEM, Message("user", f"Fix this function.\n```python\ndef total(xs):\n    s = 0\n    for x in xs[:{n}]:\n"
                                     f"        s += x * {n}\n    return s / len(xs)\n```")]


def _long_context(rng: random.Random, tokens: int, tokenizer) -> list[Message]:
    sentences = [f"Record {i}: the shipment to {rng.choice(_CITIES)} weighed {rng.randint(1, 999)} kg." for i in range(4000)]
    out = []
    for sentence in sentences:
        out.append(sentence)
        if len(tokenizer.encode(" ".join(out)).ids) >= tokens - 64:
            break
    return [_SYSTEM, Message("user", "Read the log, then answer.\n" + " ".join(out) + "\nWhich shipment was heaviest?")]


def build_calibration_set(samples: dict[str, int], seed: int, tokenizer, max_length: int) -> list[dict]:
    """Prompts rendered by the tokenizer's chat template, each asking for the assistant's next turn."""
    rng = random.Random(seed)
    chat = ChatFormat.of(tokenizer)
    makers = {"tool_use": lambda: _tool_use(rng), "code": lambda: _code(rng), "long_context": lambda: _long_context(rng, max_length, tokenizer)}
    out = []
    for kind, count in sorted(samples.items()):
        for i in range(count):
            ids = tokenizer.encode(chat.prompt(makers[kind]())).ids[: max_length - 8]
            out.append({"kind": kind, "index": i, "ids": ids})
    return out


def activation_stats(student, calibration: list[dict]) -> dict[str, dict]:
    """Per module output: min, max, percentiles of |x|, fraction beyond 6 standard deviations."""
    collected: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, module in student.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "RMSNorm":
            hooks.append(module.register_forward_hook(lambda m, i, o, name=name: collected.setdefault(name, []).append(o.detach().float().reshape(-1))))
    try:
        with torch.no_grad():
            for sample in calibration:
                student(torch.tensor([sample["ids"]]))
    finally:
        for hook in hooks:
            hook.remove()
    return {name: _summary(torch.cat(parts)) for name, parts in collected.items()}


def _summary(x: torch.Tensor) -> dict:
    """In torch (threaded) but the percentiles: the LM head's output alone is [tokens, vocab],
    2e8 values for one long-context sample, where numpy's single-threaded temporaries took most
    of the stage; ``np.percentile`` takes the three in one partition (``torch.quantile`` is
    limited to 2**24 values)."""
    a = x.abs()
    std, mean = torch.std_mean(x, correction=0)
    p50, p99, p999 = np.percentile(a.numpy(), [50, 99, 99.9])
    outliers = int(((x - mean).abs_() > 6 * std).sum())
    return {
        "min": float(x.min()), "max": float(x.max()),
        "p50_abs": float(p50), "p99_abs": float(p99), "p999_abs": float(p999),
        "outlier_fraction": outliers / x.numel(),
        "fp16_overflow": bool(a.max() > 65504),
    }
