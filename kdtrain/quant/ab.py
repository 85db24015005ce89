"""A/B of the INT8 package against the FP16 one, through the same backend and host API."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from kdtrain.runtime.host import Host


@dataclass(frozen=True)
class ABResult:
    length: int
    backend: str
    prompts: int
    steps: int
    cosine_min: float  # worst step over all prompts
    max_abs: float
    greedy_agreement: float  # fraction of steps where INT8's greedy token equals FP16's
    nonfinite: int  # NaN/Inf in the INT8 logits
    size_fp16: int
    size_int8: int

    @property
    def size_ratio(self) -> float:
        return self.size_int8 / self.size_fp16

    def to_json(self) -> dict:
        return {**asdict(self), "size_ratio": self.size_ratio}

    def summary(self) -> str:
        return (f"L={self.length}: INT8/FP16 size {self.size_ratio:.2f} ({self.size_int8 / 1e6:.1f}/{self.size_fp16 / 1e6:.1f} MB), "
                f"cosine min {self.cosine_min:.5f}, max |diff| {self.max_abs:.3f}, greedy agreement {self.greedy_agreement:.0%} "
                f"over {self.prompts} prompt(s) x {self.steps} step(s) [{self.backend}]")


def package_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / denom) if denom > 0 and np.isfinite(denom) else float("nan")


def measure_ab(fp16, int8, prompts: list[list[int]], steps: int, length: int, pad_id: int, sizes: tuple[int, int]) -> ABResult:
    """Teacher-forced on FP16's greedy tokens, so one early disagreement does not cascade."""
    a, b = Host(fp16, length, pad_id), Host(int8, length, pad_id)
    cosines, max_abs, agree, total, nonfinite = [], 0.0, 0, 0, 0
    usable = [p[: length - steps - 1] for p in prompts if p]
    for prompt in usable:
        sa, la = a.prefill(prompt)
        sb, lb = b.prefill(prompt)
        for step in range(steps + 1):
            nonfinite += int((~np.isfinite(lb)).sum())
            cosines.append(_cosine(la, lb))
            max_abs = max(max_abs, float(np.nanmax(np.abs(la - lb))) if np.isfinite(lb).any() else float("inf"))
            agree += int(np.argmax(la) == np.argmax(lb))
            total += 1
            if step == steps:
                break
            token = int(np.argmax(la))
            sa, la = a.decode_step(sa, token)
            sb, lb = b.decode_step(sb, token)
    worst = float(min(cosines)) if cosines and not np.isnan(cosines).any() else float("nan")
    return ABResult(length, getattr(fp16, "backend", "?"), len(usable), steps, worst, max_abs, agree / max(total, 1), nonfinite, *sizes)
