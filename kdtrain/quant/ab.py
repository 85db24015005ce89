"""A/B of the INT8 package against the FP16 one, through the same backend and host API.

Accuracy (logit cosine, max |diff|, greedy agreement, NaN/Inf), size (package bytes and the
student's weight bytes in each MIL program) and, when ``timed``, latency and memory: TTFT and
decode tokens/s of each package on the same backend (:mod:`kdtrain.runtime.speed`'s clock and
units), and the peak bytes of a prefill where the backend's are observable (the MIL executor).
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from kdtrain.runtime import speed
from kdtrain.runtime.host import Host

# What `kdtrain quantize` records beyond accuracy and size; `quant_recipe.yaml::ab[L]` judges
# these from quant/ab.json (never re-timed inside the test run).
LATENCY_KEYS = ("ttft_fp16_s", "ttft_int8_s", "decode_fp16_tokens_per_s", "decode_int8_tokens_per_s",
                "peak_fp16_bytes", "peak_int8_bytes")


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
    size_fp16: int  # package bytes on disk
    size_int8: int
    # The student's parameters in each program (weight_bytes); None where not measured.
    weight_bytes_fp16: int | None = None
    weight_bytes_int8: int | None = None
    # Latency on `backend` (measure_ab(timed=True)): median TTFT over the prompts' prefills,
    # and 1 / the median decode step; None where not measured.
    ttft_fp16_s: float | None = None
    ttft_int8_s: float | None = None
    decode_fp16_tokens_per_s: float | None = None
    decode_int8_tokens_per_s: float | None = None
    # Peak bytes of one warm prefill (speed.peak_bytes); None where the backend's are not observable.
    peak_fp16_bytes: int | None = None
    peak_int8_bytes: int | None = None
    timed_threads: int | None = None  # threads while timing: 1 (kdtrain.runtime.speed.threads)

    @property
    def size_ratio(self) -> float:
        return self.size_int8 / self.size_fp16

    @property
    def weight_bytes_ratio(self) -> float | None:
        return _ratio(self.weight_bytes_int8, self.weight_bytes_fp16)

    @property
    def ttft_ratio(self) -> float | None:
        """INT8 TTFT / FP16 TTFT: above 1, INT8 answers later."""
        return _ratio(self.ttft_int8_s, self.ttft_fp16_s)

    @property
    def decode_ratio(self) -> float | None:
        """INT8 tokens/s / FP16 tokens/s: below 1, INT8 decodes slower."""
        return _ratio(self.decode_int8_tokens_per_s, self.decode_fp16_tokens_per_s)

    @property
    def peak_ratio(self) -> float | None:
        return _ratio(self.peak_int8_bytes, self.peak_fp16_bytes)

    def to_json(self) -> dict:
        return {**asdict(self), "size_ratio": self.size_ratio, "weight_bytes_ratio": self.weight_bytes_ratio,
                "ttft_ratio": self.ttft_ratio, "decode_ratio": self.decode_ratio, "peak_ratio": self.peak_ratio}

    def summary(self) -> str:
        text = (f"L={self.length}: INT8/FP16 size {self.size_ratio:.2f} ({self.size_int8 / 1e6:.1f}/{self.size_fp16 / 1e6:.1f} MB), "
                f"cosine min {self.cosine_min:.5f}, max |diff| {self.max_abs:.3f}, greedy agreement {self.greedy_agreement:.0%} "
                f"over {self.prompts} prompt(s) x {self.steps} step(s)")
        if self.weight_bytes_ratio is not None:
            text += f"; weights {self.weight_bytes_ratio:.3f} ({self.weight_bytes_int8 / 1e6:.1f}/{self.weight_bytes_fp16 / 1e6:.1f} MB)"
        if self.ttft_ratio is not None:
            text += f", TTFT {self.ttft_ratio:.2f}x ({self.ttft_int8_s * 1e3:.1f}/{self.ttft_fp16_s * 1e3:.1f} ms)"
        if self.decode_ratio is not None:
            text += (f", decode {self.decode_ratio:.2f}x ({self.decode_int8_tokens_per_s:.1f}/"
                     f"{self.decode_fp16_tokens_per_s:.1f} tokens/s)")
        if self.peak_ratio is not None:
            text += f", prefill peak {self.peak_ratio:.2f}x ({self.peak_int8_bytes / 1e6:.1f}/{self.peak_fp16_bytes / 1e6:.1f} MB)"
        return text + f" [{self.backend}]"


def _ratio(num, den) -> float | None:
    return None if num is None or den is None or not den else num / den


def package_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def weight_bytes(program, function: str = "prefill") -> int:
    """Bytes of the student's parameters in a MIL program: the ``const`` ops of ``function``
    named ``p_student_*`` (INT8 data, their FP16 scales and the FP16 tensors the recipe keeps),
    not the converter's own tables (RoPE, zero biases, a few hundred KB that grow with L). A
    program converted elsewhere, without those names: all its tensor constants."""
    tensors = [op for op in program.functions[function].operations
               if op.op_type == "const" and isinstance(op.outputs[0].val, np.ndarray)]
    student = [op for op in tensors if op.name.startswith("p_student")]
    return sum(op.outputs[0].val.nbytes for op in student or tensors)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / denom) if denom > 0 and np.isfinite(denom) else float("nan")


def measure_ab(fp16, int8, prompts: list[list[int]], steps: int, length: int, pad_id: int, sizes: tuple[int, int],
               weights: tuple[int, int] | None = None, timed: bool = False) -> ABResult:
    """Teacher-forced on FP16's greedy tokens, so one early disagreement does not cascade.

    ``timed``: also the latency, from the same calls (so it costs two warm-up prefills and,
    on the MIL executor, two traced ones, not a second pass). Each session first runs one
    untimed prefill (the first call loads and materialises the weights); then every prompt's
    prefill is a TTFT sample and every decode step but the first after each prefill (the
    warm-up, as :func:`kdtrain.runtime.speed.decode_rate`) a decode sample, FP16's and INT8's
    calls interleaved so that a load on the machine falls on both. Medians: the A/B has a few
    samples on a machine that may be shared, and one slow sample must not decide the ratio.
    Last, one traced prefill of each (:func:`kdtrain.runtime.speed.prefill_peak`). All of it
    single-threaded (:func:`kdtrain.runtime.speed.threads`: the ratio stays stable on a
    machine shared with other work); the logits do not depend on it."""
    usable = [p[: length - steps - 1] for p in prompts if p]
    timed = timed and bool(usable)
    if not timed:
        return _measure(fp16, int8, usable, steps, length, pad_id, sizes, weights, False)
    with speed.threads(1):
        return _measure(fp16, int8, usable, steps, length, pad_id, sizes, weights, True)


def _measure(fp16, int8, usable: list[list[int]], steps: int, length: int, pad_id: int, sizes: tuple[int, int],
             weights: tuple[int, int] | None, timed: bool) -> ABResult:
    a, b = Host(fp16, length, pad_id), Host(int8, length, pad_id)
    cosines, max_abs, agree, total, nonfinite = [], 0.0, 0, 0, 0
    seconds = {"ttft": ([], []), "decode": ([], [])}  # (FP16, INT8) samples
    if timed:
        speed.first_token(a, usable[0])
        speed.first_token(b, usable[0])
    for prompt in usable:
        ta, (sa, la) = speed.timed(a.prefill, prompt)
        tb, (sb, lb) = speed.timed(b.prefill, prompt)
        seconds["ttft"][0].append(ta)
        seconds["ttft"][1].append(tb)
        for step in range(steps + 1):
            nonfinite += int((~np.isfinite(lb)).sum())
            cosines.append(_cosine(la, lb))
            max_abs = max(max_abs, float(np.nanmax(np.abs(la - lb))) if np.isfinite(lb).any() else float("inf"))
            agree += int(np.argmax(la) == np.argmax(lb))
            total += 1
            if step == steps:
                break
            token = int(np.argmax(la))
            ta, (sa, la) = speed.timed(a.decode_step, sa, token)
            tb, (sb, lb) = speed.timed(b.decode_step, sb, token)
            if step:  # the first step after a prefill is the warm-up
                seconds["decode"][0].append(ta)
                seconds["decode"][1].append(tb)
    worst = float(min(cosines)) if cosines and not np.isnan(cosines).any() else float("nan")
    latency = {}
    if timed:
        ttft, decode = seconds["ttft"], seconds["decode"]
        latency = {"ttft_fp16_s": statistics.median(ttft[0]), "ttft_int8_s": statistics.median(ttft[1]),
                   "peak_fp16_bytes": speed.prefill_peak(a, usable[0]), "peak_int8_bytes": speed.prefill_peak(b, usable[0]),
                   "timed_threads": 1}
        if decode[0]:
            latency |= {"decode_fp16_tokens_per_s": 1 / statistics.median(decode[0]),
                        "decode_int8_tokens_per_s": 1 / statistics.median(decode[1])}
    return ABResult(length, getattr(fp16, "backend", "?"), len(usable), steps, worst, max_abs, agree / max(total, 1), nonfinite,
                    *sizes, *(weights or (None, None)), **latency)
