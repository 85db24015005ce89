"""TTFT and decode tokens/s of every converted package: precision x enumerated length x backend.

Generated from the contracts and the artifacts, nothing listed by hand:

- the protocol is ``runtime_budget.yaml``'s ``benchmarks`` section (``--kd-contracts``, else
  ``<rootdir>/contracts``): the prompt fills ``ttft_fill`` of the context, ``decode_steps``
  greedy steps are timed per round, ``warmup_rounds`` and ``rounds`` are pytest-benchmark's,
  ``threads`` and ``clock`` say how rounds are timed, and ``regression`` is the rule
  ``make bench-gate`` fails on;
- the lengths are the artifacts' (``--kd-artifacts``, else ``<rootdir>/artifacts``): ``kdtrain
  convert``'s settings, which must equal the contract's enumerated lengths;
- the backends: ``mil-reference`` (the MIL executor, FP16 and INT8 packages), ``torch`` (the
  PyTorch programs the FP16 package was converted from, eager, in the student's float32: FP16
  only, there is no INT8 PyTorch program) and ``coreml`` (macOS only; elsewhere not generated,
  so never a skip).

Two benchmarks per case, measured as :mod:`kdtrain.runtime.speed` says (the way llama-bench
and mlx-lm measure): ``test_ttft[backend-precision-L]`` times the prefill of the prompt to the
first token; ``test_decode[...]`` times ``decode_steps`` greedy steps, after an untimed prefill
and warm-up step restored from a copy of the state each round (re-run on Core ML, whose state
cannot be copied). Each case loads its package once and runs one untimed cold prefill
(loading, weight materialisation) before any round. pytest-benchmark reports each round's
seconds (mean, stddev, min, max); ``extra_info`` adds tokens/s and, on the MIL executor, the peak
bytes of a warm prefill as tracemalloc sees them (its numpy arrays, not its torch kernels: see
:func:`kdtrain.runtime.speed.peak_bytes`). A table closes the run: TTFT ms and decode tokens/s per length x backend
x precision, with the ratios MIL/torch and INT8/FP16.

``make bench`` runs this module with the other benchmarks; ``make bench-gate`` runs it alone and
fails when a mean regresses past the contract's rule against the last saved run of this machine.

The reference contract times with one thread (``threads: 1``) and counts each round in units of a
reference workload timed just before it (``clock: machine``, :class:`kdtrain.runtime.speed.MachineClock`):
pytest-benchmark's saved and compared means are then those units, steady on a shared runner;
the printed table and ``extra_info`` keep wall milliseconds.

Cost (2 CPU cores, Linux, torch's default 2 threads): at L=512 the MIL executor's prefill takes
0.12-0.19 s (0.18-0.27 s on one thread) and a decode step 25-35 ms, and ``-k 512`` runs in about
35 s. At L=4096 a MIL prefill
takes 5-10 s (20 s or more when other work shares the cores, 37 s cold) and a decode step 70 ms;
each MIL case runs its prefill warmup_rounds + rounds + 2 times (the cold one, the traced one),
so L=4096 costs about a minute per package and the whole module a few minutes.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Callable, Iterator

import pytest

from kdtrain.runtime import speed

PRECISIONS = ("fp16", "int8")
TABLE_PLUGIN = "kdtrain-runtime-speed-table"
# pytest-benchmark's clock for every round here: seconds, or reference workloads where the
# contract says ``clock: machine`` (set by the ``run`` fixture; see speed.MachineClock).
CLOCK = speed.MachineClock()
pytestmark = pytest.mark.benchmark(timer=CLOCK)


@dataclass(frozen=True)
class Case:
    backend: str
    precision: str
    length: int

    @property
    def id(self) -> str:
        return f"{self.backend}-{self.precision}-{self.length}"


def backends() -> tuple[str, ...]:
    return ("mil-reference", "torch", *(("coreml",) if sys.platform == "darwin" else ()))


@dataclass(frozen=True)
class Setup:
    protocol: object  # kdcontracts.models.runtime_budget.Benchmarks
    artifacts: Path
    cases: tuple[Case, ...]


def _folders(config: pytest.Config) -> tuple[Path, Path]:
    contracts, artifacts = config.getoption("kd_contracts"), config.getoption("kd_artifacts")
    return (Path(contracts) if contracts else config.rootpath / "contracts").resolve(), \
        (Path(artifacts) if artifacts else config.rootpath / "artifacts").resolve()


@cache
def _setup(contracts: Path, artifacts: Path) -> Setup:
    from kdcontracts.errors import ContractFileError
    from kdcontracts.families import load
    from kdtrain.artifacts import ArtifactsFolder
    from kdtrain.errors import KDError

    problem = None
    try:
        contract = load(contracts / "runtime_budget.yaml")
        folder = ArtifactsFolder.open(artifacts)
    except (ContractFileError, KDError, FileNotFoundError) as exc:
        problem = str(exc)
    if problem:
        pytest.fail(f"runtime benchmarks: {problem}", pytrace=False)
    convert = folder.manifest.stages.get("convert")
    lengths = list(convert.settings.get("lengths", [])) if convert else []
    if lengths != list(contract.contexts):
        pytest.fail(f"runtime benchmarks: {artifacts} holds packages at lengths {lengths} (stages.convert.settings.lengths), "
                    f"{contracts / 'runtime_budget.yaml'} enumerates {list(contract.contexts)} (coreml_contract.json): "
                    f"rebuild the artifacts or name the matching --kd-contracts", pytrace=False)
    cases = tuple(Case(backend, precision, length) for length in lengths for precision in PRECISIONS for backend in backends()
                  if not (backend == "torch" and precision != "fp16"))
    return Setup(contract.benchmarks, artifacts, cases)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "run" in metafunc.fixturenames:
        cases = _setup(*_folders(metafunc.config)).cases
        # Module scope: pytest orders the items case by case, so one package is loaded at a time.
        metafunc.parametrize("run", cases, ids=[c.id for c in cases], indirect=True, scope="module")


@cache
def _student(path: Path):
    from kdtrain.student.model import StudentLM

    return StudentLM.from_pretrained(path)


@dataclass
class Run:
    """One case's host, the benchmark prompt, where the timed decode rounds start, and its peak."""

    case: Case
    protocol: object
    host: object
    prompt: list[int]
    starts: Callable
    peak_bytes: int | None
    placement: dict | None = None  # Core ML only: the Neural Engine's share of each function's ops

    def info(self) -> dict:
        return {"length": self.case.length, "backend": self.case.backend, "precision": self.case.precision,
                "prompt_tokens": len(self.prompt), "decode_steps": self.protocol.decode_steps,
                "peak_prefill_bytes": self.peak_bytes, "threads": _threads(), "placement": self.placement}


def _placement(case: Case, folder) -> dict | None:
    """Compute-unit placement on macOS: the fraction of each function's ops, and of their estimated
    cost, that Core ML's MLComputePlan puts on the Neural Engine (the ANE residency item's reading)."""
    if case.backend != "coreml":
        return None
    from kdtrain.artifact_table import coreml_package
    from kdtrain.coreml.inspect import functions_io
    from pytest_kdcontracts.contracts.coreml_ane import compute_plan_residency

    package = folder.path(coreml_package(case.length, case.precision))
    return {function: dict(zip(("ane_op_fraction", "ane_cost_fraction"), compute_plan_residency(package, function)[:2]))
            for function in functions_io(package)}


def _threads() -> dict:
    """The thread pools the measurement ran with: torch's intra-op pool (the MIL executor's large
    kernels and the torch backend), BLAS and OpenMP: the contract's ``benchmarks.threads``, or
    the machine's defaults when it says null (see :func:`kdtrain.runtime.speed.threads`)."""
    import torch
    from threadpoolctl import threadpool_info

    return {"torch": torch.get_num_threads(), **{pool["internal_api"]: pool["num_threads"] for pool in threadpool_info()}}


def _session(case: Case, folder, student_path: Path):
    from kdtrain.artifact_table import coreml_package
    from kdtrain.runtime.backend import CoreMLSession, MILSession, TorchSession

    if case.backend == "torch":
        return TorchSession(_student(student_path), case.length)
    package = folder.path(coreml_package(case.length, case.precision))
    return CoreMLSession(package) if case.backend == "coreml" else MILSession(package)


@pytest.fixture(scope="module")
def run(request) -> Iterator[Run]:
    import json

    from kdtrain.artifacts import ArtifactsFolder
    from kdtrain.runtime.host import Host
    from kdtrain.tokenizers.load import load_tokenizer

    case: Case = request.param
    setup = _setup(*_folders(request.config))
    folder = ArtifactsFolder.open(setup.artifacts)
    student = folder.path(folder.exported_student())
    vocab = json.loads((student / "config.json").read_text(encoding="utf-8"))["vocab_size"]
    host = Host(_session(case, folder, student), case.length, load_tokenizer(folder, "student").transformers.pad_token_id)
    protocol = setup.protocol
    # The ids do not change the timing; 3 skips the reference tokenizer's special tokens.
    prompt = speed.prompt_for(case.length, protocol.ttft_fill, 3, vocab, seed=case.length)
    CLOCK.machine = protocol.clock == "machine"
    with speed.threads(protocol.threads):  # the whole case, cold prefill included, in the contract's pools
        starts = speed.decode_starts(host, prompt, protocol.decode_steps)  # the cold prefill: loads, materialises
        yield Run(case, protocol, host, prompt, starts, speed.prefill_peak(host, prompt), _placement(case, folder))


@dataclass
class SpeedTable:
    """TTFT and decode tokens/s per case, printed in the terminal summary."""

    rows: dict[Case, dict] = field(default_factory=dict)
    protocol: object = None

    def record(self, case: Case, **values) -> None:
        self.rows.setdefault(case, {}).update(values)

    def lines(self) -> list[str]:
        p = self.protocol
        lines = [f"TTFT: mean of {p.rounds} round(s), prompt {p.ttft_fill:.0%} of L; decode: {p.decode_steps} steps per round, "
                 f"tokens/s from the mean (pytest-benchmark's table has min, max, stddev)",
                 f"{'L':>6}  {'backend':14s} {'precision':9s} {'TTFT ms':>10} {'decode tok/s':>13} {'numpy peak MB':>14}"]
        cases = sorted(self.rows, key=lambda c: (c.length, backends().index(c.backend), PRECISIONS.index(c.precision)))
        for case in cases:
            row = self.rows[case]
            peak = row.get("peak")
            lines.append(f"{case.length:>6}  {case.backend:14s} {case.precision:9s} {_num(row.get('ttft'), 1e3, '.1f'):>10} "
                         f"{_num(row.get('decode'), 1, '.2f'):>13} {_num(peak, 1e-6, '.2f'):>14}")
        for length in sorted({c.length for c in cases}):
            ratios = []
            pairs = [("MIL/torch", Case("mil-reference", "fp16", length), Case("torch", "fp16", length))]
            pairs += [(f"INT8/FP16 [{b}]", Case(b, "int8", length), Case(b, "fp16", length)) for b in backends()]
            for name, num, den in pairs:
                if num in self.rows and den in self.rows:
                    num, den = self.rows[num], self.rows[den]
                    ratios.append(f"{name} TTFT {_ratio(num.get('ttft'), den.get('ttft'))}, "
                                  f"decode tok/s {_ratio(num.get('decode'), den.get('decode'))}")
            if ratios:
                lines.append(f"L={length}: " + "; ".join(ratios))
        return lines

    @pytest.hookimpl(tryfirst=True)  # before pytest-benchmark's table, which raises on a regression
    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.rows:
            terminalreporter.write_sep("-", "runtime speed (benchmarks/test_runtime_speed.py)")
            for line in self.lines():
                terminalreporter.write_line(line)


def _num(value, scale: float, spec: str) -> str:
    return "-" if value is None else format(value * scale, spec)


def _ratio(num, den) -> str:
    return "-" if num is None or den is None else f"{num / den:.2f}x"


@pytest.fixture(scope="session")
def speed_table(request) -> SpeedTable:
    manager = request.config.pluginmanager
    table = manager.get_plugin(TABLE_PLUGIN)
    if table is None:
        table = SpeedTable(protocol=_setup(*_folders(request.config)).protocol)
        manager.register(table, TABLE_PLUGIN)
    return table


def _mean_seconds(benchmark, seconds: list[float]) -> float | None:
    """The mean round in seconds (wall time, whatever the gate's clock); None when pytest-benchmark
    is disabled (--benchmark-disable, xdist)."""
    return sum(seconds) / len(seconds) if benchmark.stats and seconds else None


def _timed_rounds(benchmark, target: Callable, start: Callable, protocol) -> list[float]:
    """Run the rounds: each round's setup calibrates the clock (``clock: machine``) after its own
    work, so the workload is timed just before the round; returns each timed round's seconds."""
    seconds: list[float] = []

    def setup():
        arguments = start()
        CLOCK.calibrate()
        return arguments

    def round_(*args):
        took, _ = speed.timed(target, *args)
        seconds.append(took)

    benchmark.pedantic(round_, setup=setup, rounds=protocol.rounds, warmup_rounds=protocol.warmup_rounds, iterations=1)
    return seconds[protocol.warmup_rounds:]


def _clock_info(protocol) -> dict:
    """The gate's clock, and the reference workload's mean seconds (its unit) over the timed
    rounds where it counts in them (the warm-up rounds calibrate too, but are not saved)."""
    units = CLOCK.units[protocol.warmup_rounds:]
    return {"clock": "machine" if CLOCK.machine else "wall", "workload_s": sum(units) / len(units) if units else None}


def test_ttft(benchmark, run: Run, speed_table: SpeedTable):
    p = run.protocol
    benchmark.group = f"TTFT L={run.case.length}"
    CLOCK.units.clear()
    seconds = _timed_rounds(benchmark, speed.first_token, lambda: ((run.host, run.prompt), {}), p)
    mean = _mean_seconds(benchmark, seconds)
    benchmark.extra_info.update({**run.info(), **_clock_info(p)}, ttft_ms=mean and mean * 1e3)
    speed_table.record(run.case, ttft=mean, peak=run.peak_bytes)


def test_decode(benchmark, run: Run, speed_table: SpeedTable):
    p = run.protocol

    def start():
        state, token = run.starts()
        return (run.host, state, token, p.decode_steps), {}

    benchmark.group = f"decode {p.decode_steps} steps L={run.case.length}"
    CLOCK.units.clear()
    seconds = _timed_rounds(benchmark, speed.greedy, start, p)
    mean = _mean_seconds(benchmark, seconds)
    rate = p.decode_steps / mean if mean else None
    benchmark.extra_info.update({**run.info(), **_clock_info(p)}, tokens_per_s=rate)
    speed_table.record(run.case, decode=rate, peak=run.peak_bytes)
