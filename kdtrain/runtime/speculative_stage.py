"""Pipeline stage ``speculative``: decode held-out prompts with each drafter/worker pair of
``speculative.yaml`` and record every token.

The contract deals its held-out prompts over its lengths, so each run (pair x length x
backend) decodes its share. For every run and prompt, ``speculative/report.json`` keeps the
worker's plain greedy tokens and the speculative decoding's, with every verification (drafted,
accepted, why the segment ended), and binds the run to what it measured: the SHA-256 of the
packages (or of the exported student, on torch), the tokenizers and the held-out cases, the
teacher's version, the contract's settings. ``speculative/acceptance.png`` plots per-position
acceptance and the segment lengths of each pair and backend over every length. The plugin
recomputes every figure from these records with the contract's current bounds, and fails a run
another build or other settings made. A project without ``speculative.yaml`` has nothing to
measure: the stage logs so and writes nothing.

The worker's plain decoding is what speculation must equal, so it is measured here too; the
teacher's does not depend on the drafter's length or backend and is decoded once per prompt.
"""

from __future__ import annotations

import logging
import time

from kdcontracts.models.speculative import TEACHER
from kdtrain import atomic
from kdtrain.artifact_table import (DATA_SCENARIOS, SPECULATIVE_PLOT, SPECULATIVE_REPORT, TOKENIZER_STUDENT, TOKENIZER_TEACHER,
                                    coreml_package)
from kdtrain.errors import ConfigError, located
from kdtrain.stage import StageContext

log = logging.getLogger("kdtrain.speculative")
CONTRACT = "speculative.yaml"


def held_out_prompts(folder, tokenizer, count: int, length: int, contract=CONTRACT) -> list[tuple[str, list[int]]]:
    """``count`` scenario cases (held out from training), round-robin over the scenarios, whose
    prompt (system + user, in ``tokenizer``'s chat format) leaves room in a context of ``length``:
    (case id, ids). Too few is an error naming ``contract``'s ``prompts.count``."""
    from kdtrain.data.chat import ChatFormat
    from kdtrain.data.scenario_cases import SCENARIOS, ScenarioCases

    chat = ChatFormat.of(tokenizer)
    by_scenario = {s: [] for s in SCENARIOS}
    for case in ScenarioCases.load(folder.path(DATA_SCENARIOS)).cases:
        ids = tokenizer.encode(chat.prompt(case.messages)).ids
        if len(ids) < length:
            by_scenario[case.scenario].append((case.id, ids))
    lists = list(by_scenario.values())
    fitting = [v[i] for i in range(max(map(len, lists), default=0)) for v in lists if i < len(v)]  # round-robin
    if len(fitting) < count:
        raise ConfigError(located(contract, "prompts.count", f"at most the {len(fitting)} held-out scenario cases whose prompt "
                                  f"fits a context of {length} tokens ({folder.path(DATA_SCENARIOS)})", count))
    return fitting[:count]


class Sides:
    """The drafters and workers of the runs, over what each run needs loaded once: a session per
    package, length and backend, the exported student, the teacher, the tokenizers."""

    def __init__(self, ctx: StageContext, segment: int):
        from kdtrain.tokenizers.load import load_tokenizer

        self.ctx, self.folder, self.segment = ctx, ctx.folder, segment
        self.tokenizers = {name: load_tokenizer(ctx.folder, name) for name in ("student", "teacher")}
        self._hosts, self._student, self._teacher, self._held_out = {}, None, None, {}

    def drafter(self, run):
        return self._package(run.pair.drafter, run.length, run.backend)

    def worker(self, run):
        return self._teacher_side() if run.pair.worker == TEACHER else self._package(run.pair.worker, run.length, run.backend)

    def tokenizer(self, run):
        """The worker's tokenizer: it encodes the prompts and names the EOS."""
        return self.tokenizers["teacher" if run.pair.worker == TEACHER else "student"]

    def held_out(self, run, contract) -> list[tuple[str, list[int]]]:
        """:func:`held_out_prompts` in the run's worker's tokenizer, encoded once per tokenizer."""
        name = "teacher" if run.pair.worker == TEACHER else "student"
        if name not in self._held_out:
            self._held_out[name] = held_out_prompts(self.folder, self.tokenizers[name], contract.prompts, min(contract.lengths),
                                                    contract.file)
        return self._held_out[name]

    @property
    def student(self):
        from kdtrain.student.model import StudentLM

        if self._student is None:
            self._student = StudentLM.from_pretrained(self.folder.path(self.folder.exported_student()))
        return self._student

    def _package(self, precision: str, length: int, backend: str):
        """The student's package (on torch, the programs it was converted from) as a :class:`HostSide`."""
        from kdtrain.runtime.backend import TorchSession, open_package
        from kdtrain.runtime.host import Host
        from kdtrain.runtime.speculative import HostSide

        key = (backend, length) if backend == "torch" else (backend, length, precision)
        if key not in self._hosts:
            session = (TorchSession(self.student, length, self.segment) if backend == "torch"
                       else open_package(self.folder.path(coreml_package(length, precision)), backend))
            self._hosts[key] = Host(session, length, self.tokenizers["student"].transformers.pad_token_id)
        return HostSide(self._hosts[key], self.segment, self.student.config.vocab_size, "student")

    def _teacher_side(self):
        from kdtrain.runtime.speculative import CausalLMSide
        from kdtrain.teacher import source

        config = self.ctx.config
        if config.teacher.backend != "local":
            raise ConfigError(located(config.file, "teacher.backend", f"a local teacher ({CONTRACT} has the teacher verify "
                                      "segments with its own forward)", repr(config.teacher.backend)))
        if self._teacher is None:
            self._teacher = CausalLMSide(source.load_model(config.teacher.source), self.segment, TEACHER)
        return self._teacher

    def inputs(self, run) -> dict[str, str]:
        """What a run measured, by artifact name (and the teacher by version): the report's binding."""
        used = [TOKENIZER_STUDENT, DATA_SCENARIOS]
        used += [self.folder.exported_student()] if run.backend == "torch" else [coreml_package(run.length, run.pair.drafter)]
        if run.pair.worker == TEACHER:
            used.append(TOKENIZER_TEACHER)
        elif run.backend != "torch":
            used.append(coreml_package(run.length, run.pair.worker))
        found = {a.name: f"sha256:{self.folder.entry(a).sha256}" for a in used}
        if run.pair.worker == TEACHER:
            found[TEACHER] = self.ctx.config.teacher.version
        return found


def divergence(worker, prompt: list[int], plain: list[int], tokens) -> dict | None:
    """Where the speculative tokens first leave the plain ones, and by how much the worker's plain
    decoding preferred its token there (None when they never differ): the exactness items judge it."""
    from kdtrain.runtime.speculative import first_difference, preference

    at = first_difference(plain, tokens)
    if at is None:
        return None
    margin = preference(worker, prompt, plain, at, tokens[at]) if at < min(len(plain), len(tokens)) else None
    log.warning("speculative decoding left the worker's plain greedy tokens at new token %d (its margin there: %s)", at, margin)
    return {"at": at, "margin": margin}


def measure_run(sides: Sides, contract, run, plain: dict) -> dict:
    """One run's record: every prompt's plain and speculative tokens, the metrics, the binding.
    ``plain`` keeps the worker's plain decodings across runs (the teacher's is the same for all)."""
    from kdtrain.runtime.speculative import (SegmentPolicy, SpeculativeMetrics, check_shared_vocabulary, greedy_decode,
                                             speculative_decode)

    pair, start = run.pair, time.perf_counter()
    drafter, worker, tokenizer = sides.drafter(run), sides.worker(run), sides.tokenizer(run)
    check_shared_vocabulary(sides.tokenizers["student"], tokenizer)
    eos = tokenizer.token_to_id(tokenizer.eos_token)
    policy = SegmentPolicy(pair.segments.min, pair.segments.max, pair.segments.halt_threshold)
    worker_key = TEACHER if pair.worker == TEACHER else (pair.worker, run.length, run.backend)
    prompts, decodings = [], []
    held_out = sides.held_out(run, contract)
    for case, prompt in (held_out[i] for i in contract.prompt_indices(run.length)):
        if (worker_key, case) not in plain:
            plain[worker_key, case] = greedy_decode(worker, prompt, contract.max_new_tokens, eos)
        decoding = speculative_decode(drafter, worker, prompt, contract.max_new_tokens, eos, policy)
        decodings.append(decoding)
        prompts.append({"case": case, "prompt_tokens": len(prompt), "plain": plain[worker_key, case], "speculative": decoding.to_json(),
                        "divergence": divergence(worker, prompt, plain[worker_key, case], decoding.tokens)})
    metrics = SpeculativeMetrics.of(decodings)
    seconds = time.perf_counter() - start
    log.info("speculative %s L=%d [%s] (%.1f s): %s", pair.name, run.length, run.backend, seconds, metrics.line())
    return {"pair": pair.name, "length": run.length, "backend": run.backend, "settings": contract.settings(pair),
            "inputs": sides.inputs(run), "seconds": round(seconds, 2), "prompts": prompts, "metrics": metrics.to_json()}


def pooled(runs: list[dict]) -> dict[str, dict]:
    """Each pair's figures on each backend over its runs at every length (what the contract judges),
    by label ``<pair> [<backend>]``."""
    from kdtrain.runtime.speculative import SpeculativeMetrics

    pools: dict[str, list[dict]] = {}
    for run in runs:
        pools.setdefault(f"{run['pair']} [{run['backend']}]", []).append(run)
    return {label: SpeculativeMetrics.of_records(pool).to_json() for label, pool in pools.items()}


def plot_acceptance(pools: dict[str, dict], segment: int, path) -> None:
    """Per-position acceptance (P(the i-th drafted token is accepted | drafted)) and the share of
    verifications per drafted segment length (0 to S - 1), one colour per pair and backend."""
    import numpy as np

    from kdtrain.plots import pyplot, save_png

    fig, (left, right) = pyplot().subplots(1, 2, figsize=(11, 4.5))
    width, lengths = 0.8 / max(len(pools), 1), np.arange(segment)
    for i, (label, m) in enumerate(pools.items()):
        left.plot(range(1, len(m["per_position"]) + 1), m["per_position"], marker="o", label=label)
        drafted = {int(k): n for k, n in m["segment_lengths"].items()}  # JSON keys are strings
        counts = np.array([drafted.get(k, 0) for k in lengths], dtype=float)
        right.bar(lengths - 0.4 + (i + 0.5) * width, counts / max(counts.sum(), 1), width, label=label)
    left.set(xlabel="position in the drafted segment", ylabel="P(accepted | drafted)", ylim=(-0.02, 1.02),
             title="per-position acceptance", xticks=range(1, segment))
    right.set(xlabel="drafted tokens per verification", ylabel="share of verifications", title="segment lengths",
              xticks=lengths)
    left.legend(fontsize=7)
    save_png(fig, path)


def stage_speculative(ctx: StageContext) -> None:
    from tqdm import tqdm

    from kdtrain.runtime.backend import backend_name

    folder = ctx.folder
    if not (ctx.contracts / CONTRACT).exists():
        log.warning("stage speculative: nothing to measure, %s has no %s", ctx.contracts, CONTRACT)
        return
    contract = ctx.contract(CONTRACT)
    sides, plain, runs = Sides(ctx, contract.segment), {}, []
    for run in tqdm(list(contract.runs(backend_name())), desc="speculative", unit="run"):
        runs.append(measure_run(sides, contract, run, plain))
    atomic.write_json(folder.root / SPECULATIVE_REPORT.path, {"contract": str(contract.file), "runs": runs})
    folder.record(SPECULATIVE_REPORT)
    pools = pooled(runs)
    for label, metrics in pools.items():
        log.info("speculative %s over L=%s: acceptance %s, %s tokens/verification", label, "/".join(map(str, contract.lengths)),
                 metrics["acceptance_rate"], metrics["mean_accepted_length"])
    plot_acceptance(pools, contract.segment, folder.root / SPECULATIVE_PLOT.path)
    folder.record(SPECULATIVE_PLOT)
    exact = sum(p["plain"] == p["speculative"]["tokens"] for r in runs for p in r["prompts"])
    total = sum(len(r["prompts"]) for r in runs)
    (log.info if exact == total else log.warning)("speculative: %d of %d decodings equal the worker's plain greedy decoding", exact, total)
    folder.record_stage("speculative", {"runs": [f"{r['pair']}-{r['length']}-{r['backend']}" for r in runs], "exact": f"{exact}/{total}"})
