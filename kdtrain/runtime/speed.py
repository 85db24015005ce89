"""Time to first token (TTFT) and steady-state decode tokens/s of a :class:`~kdtrain.runtime.host.Host`.

The two numbers llama-bench (``pp``/``tg``) and mlx-lm (prompt and generation tokens-per-sec)
report, measured the way they measure them, for any session (Core ML, the MIL reference
executor, the PyTorch programs). Shared by the micro-benchmarks
(``benchmarks/test_runtime_speed.py``) and the INT8-vs-FP16 A/B (:mod:`kdtrain.quant.ab`).

- **TTFT** (:func:`ttft`): from handing the prompt to :meth:`Host.prefill` to holding the first
  token (the argmax of the prefill logits): a fresh KV state, the right-padded inputs, the
  prefill function, the logits read back, the argmax. That is what a user waits for before the
  first token appears (mlx-lm's prompt phase; llama-bench's ``pp`` run). A package of enumerated
  length L always runs its prefill over all L positions (the host right-pads), so TTFT depends
  on L, not on how much of it the prompt fills; the fill only decides where decoding starts.
- **Decode tokens/s** (:func:`decode_rate`): the prefill untimed, one decode step untimed (the
  first call of the decode function may load, compile or materialise it: llama-bench and mlx-lm
  warm up too), then ``steps`` greedy steps timed, each feeding back the argmax as any generation
  loop does: llama-bench's ``tg``, mlx-lm's generation tokens-per-sec.
- **Repetitions**: these functions time one run. Warm-up rounds, repeated rounds and the mean
  and spread (stddev, min, max, IQR) are pytest-benchmark's
  (``benchmark.pedantic(rounds=, warmup_rounds=)``, with ``runtime_budget.yaml``'s protocol),
  as llama-bench's ``-r`` repetitions and its mean +- stddev. The clock is
  :func:`time.perf_counter` (monotonic, the highest resolution the OS offers).
- **Peak memory** (:func:`peak_bytes`): tracemalloc's peak above the start of the call; see
  there for what it sees and what it does not (only the MIL executor's numpy arrays: reported
  for that backend alone, as a lower bound for comparisons).
"""

from __future__ import annotations

import time
import tracemalloc
from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np

from kdtrain.runtime.host import Host, HostState

# Backends whose working set is (in part) numpy arrays, which tracemalloc sees (peak_bytes).
PEAK_OBSERVABLE = frozenset({"mil-reference"})


@contextmanager
def threads(count: int | None) -> Iterator[None]:
    """Run with ``count`` threads in torch's intra-op pool and in every BLAS/OpenMP pool
    (threadpoolctl); ``None`` leaves the machine's defaults.

    The MIL executor computes its large kernels in torch, whose pool runs one OpenMP thread per
    core; on a machine shared with other work those threads spin-wait against it. At L=512 on 2
    cores beside two busy processes the same prefill took 1,560-1,600 ms with torch's 2 threads
    and 240-350 ms with one (117 ms and 195 ms on the quiet machine), and the INT8/FP16 median
    ratio of four interleaved prefills came out 0.73-1.27 with 2 threads, 0.98-1.06 with one.
    For a figure compared across runs on a shared machine (the A/B's ratio, the regression gate),
    one thread is the stable choice."""
    if count is None:
        yield
        return
    import torch
    from threadpoolctl import threadpool_limits  # scikit-learn's dependency

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        with threadpool_limits(count):
            yield
    finally:
        torch.set_num_threads(before)


class MachineClock:
    """A clock for pytest-benchmark (its ``timer``) that counts in reference workloads, not seconds.

    On a shared runner the whole machine's speed drifts between processes: on this two-core VM
    the same single-threaded L=512 MIL prefill averaged 183 ms in one process and 273 ms in
    another (no steal time: the CPU time moved with the wall time), so a mean compared across two
    runs moved by up to 49% with nothing changed, past any useful regression rule. A fixed
    workload like the measured one (the matmuls and FP16 element-wise work a prefill does) slows
    down with it: prefill / workload moved by 11% where the prefill alone moved by 49%. So with
    ``clock: machine`` each round starts by timing that workload (:meth:`calibrate`, in the
    round's untimed setup) and the round is measured in its units: a commit that slows the
    prefill still moves the ratio, a slower machine does not. pytest-benchmark times with one
    clock and cannot divide by another measurement, hence this clock; its storage and
    ``--benchmark-compare-fail`` work on the ratios unchanged. ``clock: wall`` (fixed hardware,
    a macOS CI job) leaves it :func:`time.perf_counter`. :attr:`units` keeps each round's unit;
    the benchmarks keep each round's wall time for the milliseconds they print."""

    __name__ = "MachineClock"  # pytest-benchmark names its timer in the saved runs

    def __init__(self, machine: bool = False) -> None:
        self.machine = machine
        self.unit = 1.0  # seconds per reference workload, this round
        self.units: list[float] = []
        self._workload = None

    def __call__(self) -> float:
        return time.perf_counter() / self.unit

    def calibrate(self) -> None:
        """Time the reference workload now; the next round counts in its units."""
        if self.machine:
            seconds, _ = timed(self._reference_workload)
            self.unit = seconds
            self.units.append(seconds)

    def _reference_workload(self) -> float:
        """Fixed, seeded, about 40 ms on one core: five fp32 matmuls of a small model's MLP width
        (torch, as the executor's large kernels) and two FP16 element-wise passes (numpy)."""
        import torch

        if self._workload is None:
            generator = torch.Generator().manual_seed(0)
            self._workload = (torch.randn(512, 576, generator=generator), torch.randn(576, 1536, generator=generator),
                              np.random.default_rng(0).random((512, 576), dtype=np.float32).astype(np.float16))
        a, b, x = self._workload
        total = sum(float((a @ b)[0, 0]) for _ in range(5))
        for _ in range(2):
            total += float(np.exp(x.astype(np.float32)).astype(np.float16)[0, 0])
        return total


def prompt_for(length: int, fill: float, vocab_low: int, vocab_high: int, seed: int = 0) -> list[int]:
    """Deterministic token ids in ``[vocab_low, vocab_high)`` filling ``fill`` of a context of
    ``length`` (at least one token). The ids do not change the timing: the prefill runs over all
    L positions and the decode over the whole cache whatever the tokens are."""
    if not 0 < fill <= 1:
        raise ValueError(f"fill: expected a fraction in (0, 1], found {fill}")
    count = max(1, min(length, round(length * fill)))
    return np.random.default_rng(seed).integers(vocab_low, vocab_high, count).tolist()


def first_token(host: Host, prompt: list[int]) -> tuple[HostState, int]:
    """Prefill ``prompt`` and pick the first token (greedy): the unit :func:`ttft` times."""
    state, logits = host.prefill(prompt)
    return state, int(np.argmax(logits))


def greedy(host: Host, state: HostState, token: int, steps: int) -> tuple[HostState, int]:
    """``steps`` greedy decode steps from ``state`` feeding ``token`` first: the unit :func:`decode_rate` times."""
    for _ in range(steps):
        state, logits = host.decode_step(state, token)
        token = int(np.argmax(logits))
    return state, token


def timed(fn: Callable, *args):
    """``(seconds, fn(*args))``, on :func:`time.perf_counter`."""
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def ttft(host: Host, prompt: list[int]) -> tuple[float, int]:
    """Seconds from the prompt to the first token, and that token."""
    seconds, (_, token) = timed(first_token, host, prompt)
    return seconds, token


def warm_start(host: Host, prompt: list[int]) -> tuple[HostState, int]:
    """The prefill of ``prompt`` and one decode step, untimed: where a timed decode starts
    (:class:`~kdtrain.runtime.host.ContextFull` if the prompt fills the context)."""
    state, token = first_token(host, prompt)
    return greedy(host, state, token, 1)


def decode_rate(host: Host, prompt: list[int], steps: int) -> float:
    """Steady-state greedy decode tokens/s after ``prompt``: prefill and first step untimed."""
    _check_room(host, prompt, steps)
    state, token = warm_start(host, prompt)
    seconds, _ = timed(greedy, host, state, token, steps)
    return steps / seconds


def decode_starts(host: Host, prompt: list[int], steps: int) -> Callable[[], tuple[HostState, int]]:
    """A function returning, on every call, a fresh :func:`warm_start` of ``prompt`` to time
    ``steps`` decode steps from (a benchmark round's untimed setup).

    The prefill runs once where the session can copy its state (the MIL executor, torch): each
    call restores a copy into a new state. An ``MLState`` cannot be copied, so on Core ML each
    call runs the prefill and the warm-up step again."""
    _check_room(host, prompt, steps)
    state, token = warm_start(host, prompt)
    saved = host.session.copy_state(state.cache)
    if saved is None:
        return lambda: warm_start(host, prompt)

    def restored() -> tuple[HostState, int]:
        cache = host.session.new_state()
        host.session.restore_state(cache, saved)
        return HostState(state.position, cache), token

    return restored


def peak_bytes(fn: Callable, *args):
    """``(peak, result)``: the most bytes tracemalloc saw allocated while ``fn(*args)`` ran,
    above what was allocated when it started.

    What it sees: allocations through Python's allocators and numpy's data buffers (numpy
    reports them to tracemalloc). For the MIL reference executor that is the part of a call's
    working set held in numpy arrays: the fresh state (the KV cache), the inputs, casts, slices
    and state updates, and whatever a call materialises with numpy (coremltools dequantising
    INT8 weights, were it done per call). Weights materialised by an earlier call are not
    counted: measure a warm call for the steady state.

    What it does not see: torch's CPU allocator (c10 allocates outside Python's tracked
    allocators), and the executor computes its large kernels in torch (matmul, linear, softmax,
    large elementwise ops; their results are torch buffers viewed as numpy arrays), so the
    attention scores and the MLP activations are missing: a lower bound that grows with L, not
    the process's peak. Nor BLAS workspaces, the Core ML runtime (native buffers, the GPU and
    the Neural Engine) or memory-mapped files. So it is reported only for the MIL executor
    (:data:`PEAK_OBSERVABLE`), None elsewhere, and is meant for comparisons on that backend
    (INT8 against FP16, one commit against another). Tracing slows every Python allocation:
    never trace a timed call."""
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        result = fn(*args)
        return tracemalloc.get_traced_memory()[1] - base, result
    finally:
        if started:
            tracemalloc.stop()


def prefill_peak(host: Host, prompt: list[int]) -> int | None:
    """Peak bytes of one prefill (:func:`peak_bytes`) where the backend's are observable, else None."""
    if getattr(host.session, "backend", None) not in PEAK_OBSERVABLE:
        return None
    return peak_bytes(first_token, host, prompt)[0]


def _check_room(host: Host, prompt: list[int], steps: int) -> None:
    if len(prompt) + 1 + steps > host.length:
        raise ValueError(f"a prompt of {len(prompt)} tokens, one warm-up step and {steps} timed steps need "
                         f"{len(prompt) + 1 + steps} positions; the context has {host.length}")
