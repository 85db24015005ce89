"""The trainer's plots: what people would rather look at than read in ``log.jsonl``."""

from __future__ import annotations

from pathlib import Path

from kdtrain.plots import pyplot, save_png


def plot_grad_norms(records: list[dict], path: Path, ratio: float) -> Path | None:
    """Each weighted loss term's gradient norm over the measured steps, log scale; alerts marked.

    A term drawn ``ratio`` times above all the others for a while is the one the balance
    check alerts on. Nothing is written when no step was measured.
    """
    measured = [r for r in records if r.get("grad_norms")]
    if not measured:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name in sorted({n for r in measured for n in r["grad_norms"]}):
        points = [(r["step"], r["grad_norms"][name]) for r in measured if r["grad_norms"].get(name, 0) > 0]
        if points:
            ax.plot(*zip(*points), marker="o", markersize=3, label=name)
    for r in measured:
        if r.get("alert"):
            ax.axvline(r["step"], color="red", alpha=0.3, linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("‖∇θ (weight × loss)‖₂")
    ax.set_title(f"Per-loss gradient norms (alert at {ratio:g}× over the others; red: alerts)")
    ax.legend(fontsize=7, ncol=2)
    return save_png(fig, path)


def plot_ablations(results: dict, path: Path) -> Path:
    """Each metric per ablation experiment, side by side (losses: lower is better; accuracies: higher)."""
    import numpy as np

    experiments = list(results["experiments"])
    metrics = sorted(results["experiments"][experiments[0]]["metrics"])
    fig, ax = pyplot().subplots(figsize=(10, 4))
    width = 0.8 / len(experiments)
    for i, name in enumerate(experiments):
        values = [results["experiments"][name]["metrics"][m] for m in metrics]
        ax.bar(np.arange(len(metrics)) + i * width, values, width, label=name)
    ax.set_xticks(np.arange(len(metrics)) + 0.4 - width / 2, metrics, rotation=30, ha="right", fontsize=8)
    ax.set_title(f"Ablations after {results['protocol']['steps']} steps on {results['protocol']['slice']} samples")
    ax.legend(fontsize=8)
    return save_png(fig, path)


def plot_curriculum(curriculum: dict, path: Path) -> Path:
    """Per curriculum stage: P(halt) by relative position in the held-out answers, and the
    student's mean answer length against the teacher's (kdtrain.train.telemetry's curriculum.json)."""
    import numpy as np

    stages = curriculum["stages"]
    fig, (halt, length) = pyplot().subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    for stage in stages:
        points = [((b["from"] + b["to"]) / 2, b["mean"]) for b in stage["halt"]["positions"] if b["mean"] is not None]
        line, = halt.plot(*zip(*points), marker="o", markersize=3, label=f"{stage['stage']} (step {stage['steps'][1]})")
        bands = [((b["from"] + b["to"]) / 2, b["p10"], b["p90"]) for b in stage["halt"]["positions"] if b["mean"] is not None]
        halt.fill_between(*zip(*bands), color=line.get_color(), alpha=0.12)
    threshold = stages[0]["halt"]["threshold"]
    halt.axhline(threshold, color="red", alpha=0.4, linewidth=1, linestyle="--", label=f"threshold {threshold:g}")
    halt.set_xlim(0, 1)
    halt.set_ylim(0, 1)
    halt.set_xlabel("relative position in the reference answer (1 = its end)")
    halt.set_ylabel("P(halt): mean, p10–p90 band")
    halt.set_title("Halt head by position, end of each stage")
    halt.legend(fontsize=7)
    x = np.arange(len(stages))
    length.bar(x - 0.2, [s["length"]["student"] for s in stages], 0.4, label="student")
    length.bar(x + 0.2, [s["length"]["teacher"] for s in stages], 0.4, label="teacher")
    for i, stage in enumerate(stages):
        if stage["alerts"]:
            length.annotate("alert" + (" (overridden)" if stage["override"] else ""), (i, 0), color="red", fontsize=7,
                            ha="center", va="bottom")
    length.set_xticks(x, [s["stage"] for s in stages], fontsize=8)
    length.set_ylabel("mean greedy answer length (student tokens)")
    length.set_title("Answer length on held-out prompts")
    length.legend(fontsize=8)
    return save_png(fig, path)
