"""Trainer throughput (tokens/s) and the KD overhead against plain CE training of the same
student, both from the cached teacher targets, on this machine's device (GPU if present).

Run with ``make bench`` (needs the demo artifacts). Reported as numbers and a ratio, never
asserted. The balance measurement is switched off here (it is amortised over
``balance.every_n_steps``; its cost is (terms - 1) extra backward passes on measured steps).
"""

from __future__ import annotations

from pathlib import Path

import pytest

STEPS = 6
RESULTS: dict[str, float] = {}
CE_ONLY = {"kl": 0.0, "ce": 1.0, "tool_name": 0.0, "tool_args": 0.0, "tool_integration": 0.0, "length": 0.0,
           "halt": 0.0, "early_tool_call": 0.0, "code_mode": 0.0, "intermediate": 0.0}


def _config(root: Path, losses: dict | None):
    from kdtrain.train.config import load_config

    config = load_config(root / "configs/distill_reference.yaml")
    update = {"curriculum": (), "optim": config.optim.model_copy(update={"steps": STEPS}),
              "balance": config.balance.model_copy(update={"every_n_steps": 10**6}),
              "checkpoint": config.checkpoint.model_copy(update={"every_n_steps": 10**6})}
    if losses is not None:
        update["losses"] = config.losses.model_copy(update=losses)
    return config.model_copy(update=update)


@pytest.mark.parametrize("mode", ["ce", "kd"])
def test_distill_tokens_per_second(benchmark, request, bench_artifacts, tmp_path, mode):
    from kdtrain.train.loop import Distiller

    root = Path(request.config.rootpath)
    config = _config(root, CE_ONLY if mode == "ce" else None)
    runs = iter(range(100))

    def train():
        distiller = Distiller(config, tmp_path / f"run-{next(runs)}", artifacts=bench_artifacts, progress=False)
        distiller.setup(gate=False)
        return distiller, distiller.train()

    distiller, result = benchmark.pedantic(train, rounds=1, iterations=1)
    steady = result.records[1:]  # the first step warms up allocators and kernels
    tokens = sum(r.tokens for r in steady)
    RESULTS[mode] = tokens / sum(r.seconds for r in steady)
    print(f"\n{mode}: {tokens} tokens in {len(steady)} steps, {RESULTS[mode]:.0f} tokens/s on {distiller.world.device} "
          f"(step time only; the whole run took {benchmark.stats.stats.mean:.1f} s)")
    if len(RESULTS) == 2:
        print(f"KD overhead: KD {RESULTS['kd']:.0f} tokens/s vs CE {RESULTS['ce']:.0f} tokens/s: "
              f"{RESULTS['ce'] / RESULTS['kd']:.2f}x the time per token")
