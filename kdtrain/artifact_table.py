"""The one table of artifacts: each one's name, path in the artifacts folder, kind and stage.

A stage records an artifact by its entry (``folder.record(TEACHER_CACHE)``) and every reader,
kdtrain's or the plugin's, asks for it by the same entry (``folder.path(TEACHER_CACHE)``);
nowhere else spells an artifact's name or path. Per-length artifacts are families: a
function here returns the entry for one function/length/precision.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Artifact:
    """One artifact: the manifest's key, where it lives (relative, POSIX), its kind, the stage that writes it."""

    name: str
    path: str
    kind: str
    stage: str


TOKENIZER_TEACHER = Artifact("tokenizer.teacher", "tokenizers/teacher", "tokenizer/transformers", "tokenizers")
TOKENIZER_STUDENT = Artifact("tokenizer.student", "tokenizers/student", "tokenizer/transformers", "tokenizers")
# tokenizer.json alone, in a folder of its own, as a host app loads it
TOKENIZER_RUNTIME = Artifact("tokenizer.runtime", "tokenizers/runtime/tokenizer.json", "tokenizer/runtime", "tokenizers")
MIGRATION_AUDIT = Artifact("migration.audit", "migration/audit.json", "audit/vocab-migration", "tokenizers")

DATA_RAW = Artifact("data.raw", "data/raw", "corpus/jsonl", "data")
DATA_CORPUS = Artifact("data.corpus", "data/corpus", "corpus/jsonl", "data")
DATA_VALIDATION_REPORT = Artifact("data.validation_report", "data/validation_report.json", "report/data-validation", "data")
# Held out from training (disjoint by hash): the halt calibration set and the scenario cases the gates evaluate.
DATA_HALT_SET = Artifact("data.halt_set", "data/halt_set", "corpus/halt-calibration", "data")
DATA_SCENARIOS = Artifact("data.scenarios", "data/scenarios", "corpus/scenario-cases", "data")

STUDENT_CHECKPOINT = Artifact("student.checkpoint", "student/checkpoint", "checkpoint/transformers", "student")
STUDENT_INIT = Artifact("student.init", "student/init.json", "log/student-init", "student")

TEACHER_CACHE = Artifact("teacher.cache", "teacher/cache", "cache/teacher-logits", "teacher")
TEACHER_REPORT = Artifact("teacher.report", "teacher/report.json", "report/teacher-fill", "teacher")
TEACHER_BUDGET = Artifact("teacher.budget", "teacher/budget.json", "state/teacher-budget", "teacher")  # API teachers only

DISTILL_RUN = Artifact("distill.run", "distill/run", "run/distill", "distill")  # checkpoints, log.jsonl, grad_norms.png
DISTILL_REPORT = Artifact("distill.report", "distill/report.json", "report/distill", "distill")
STUDENT_DISTILLED = Artifact("student.distilled", "student/distilled", "checkpoint/transformers", "distill")
# Per curriculum stage: token sources, length against the teacher's, halt by position, alerts (kdtrain.train.telemetry).
DISTILL_CURRICULUM = Artifact("distill.curriculum", "distill/run/curriculum.json", "report/curriculum", "distill")
DISTILL_CURRICULUM_PLOT = Artifact("distill.curriculum_plot", "distill/run/curriculum.png", "plot/curriculum", "distill")

# The gates a checkpoint must pass before a full run (contracts/gates.yaml; kdtrain.gates).
GATES_HALT = Artifact("gates.halt", "gates/halt.json", "report/halt-calibration", "gates")
GATES_HALT_PLOTS = Artifact("gates.halt_plots", "gates/halt", "plot/halt-calibration", "gates")  # roc, reliability, lengths
GATES_SCENARIOS = Artifact("gates.scenarios", "gates/scenarios.json", "report/scenario-evals", "gates")
GATES_SCENARIOS_PLOT = Artifact("gates.scenarios_plot", "gates/scenarios.png", "plot/scenario-evals", "gates")
GATES_VERDICT = Artifact("gates.verdict", "gates/verdict.json", "verdict/gates", "gates")

ABLATIONS_RUNS = Artifact("ablations.runs", "ablations/runs", "run/ablations", "ablations")
ABLATIONS_RESULTS = Artifact("ablations.results", "ablations/results.json", "report/ablations", "ablations")
ABLATIONS_PLOT = Artifact("ablations.plot", "ablations/metrics.png", "plot/ablations", "ablations")

QUANT_CALIBRATION = Artifact("quant.calibration", "quant/calibration.json", "quant/calibration-set", "quantize")
QUANT_ACTIVATION_STATS = Artifact("quant.activation_stats", "quant/activation_stats.json", "quant/activation-stats", "quantize")
QUANT_ACTIVATION_PLOT = Artifact("quant.activation_stats_plot", "quant/activation_stats.png", "plot/activation-stats", "quantize")
QUANT_AB = Artifact("quant.ab", "quant/ab.json", "quant/ab-report", "quantize")
QUANT_SIZE_ACCURACY_PLOT = Artifact("quant.size_accuracy_plot", "quant/size_accuracy.png", "plot/quant-size-accuracy", "quantize")

# The on-device budget per student size and context (contracts/runtime_budget.yaml; kdtrain.runtime.budget).
RUNTIME_CONFIG = Artifact("runtime.config", "runtime/runtime_config.json", "config/runtime-budget", "runtime")
RUNTIME_MEMORY_PLOT = Artifact("runtime.memory_plot", "runtime/memory.png", "plot/runtime-memory", "runtime")

# Speculative decoding of held-out prompts by each drafter/worker pair (contracts/speculative.yaml; kdtrain.runtime.speculative).
SPECULATIVE_REPORT = Artifact("speculative.report", "speculative/report.json", "report/speculative", "speculative")
SPECULATIVE_PLOT = Artifact("speculative.acceptance_plot", "speculative/acceptance.png", "plot/speculative-acceptance", "speculative")

# The judge checked against objective signals (contracts/judge.yaml; kdtrain.judge).
JUDGE_PROBES = Artifact("judge.probes", "judge/probes", "corpus/judge-probes", "judge")
JUDGE_REPORT = Artifact("judge.report", "judge/report.json", "report/judge-sanity", "judge")
JUDGE_PLOT = Artifact("judge.plot", "judge/report.png", "plot/judge-sanity", "judge")
JUDGE_CACHE = Artifact("judge.cache", "judge/cache", "cache/judge-replies", "judge")  # API judges only

# Every artifact of fixed name, in pipeline order (the families below are per length).
FIXED: tuple[Artifact, ...] = (
    TOKENIZER_TEACHER, TOKENIZER_STUDENT, TOKENIZER_RUNTIME, MIGRATION_AUDIT,
    DATA_RAW, DATA_CORPUS, DATA_VALIDATION_REPORT, DATA_HALT_SET, DATA_SCENARIOS,
    STUDENT_CHECKPOINT, STUDENT_INIT,
    TEACHER_CACHE, TEACHER_REPORT, TEACHER_BUDGET,
    DISTILL_RUN, DISTILL_REPORT, STUDENT_DISTILLED, DISTILL_CURRICULUM, DISTILL_CURRICULUM_PLOT,
    ABLATIONS_RUNS, ABLATIONS_RESULTS, ABLATIONS_PLOT,
    QUANT_CALIBRATION, QUANT_ACTIVATION_STATS, QUANT_ACTIVATION_PLOT, QUANT_AB, QUANT_SIZE_ACCURACY_PLOT,
    RUNTIME_CONFIG, RUNTIME_MEMORY_PLOT,
    SPECULATIVE_REPORT, SPECULATIVE_PLOT,
    GATES_HALT, GATES_HALT_PLOTS, GATES_SCENARIOS, GATES_SCENARIOS_PLOT, GATES_VERDICT,
    JUDGE_PROBES, JUDGE_REPORT, JUDGE_PLOT, JUDGE_CACHE,
)

# The stage that writes each precision's mlpackages.
_PACKAGE_STAGES = {"fp16": "convert", "int8": "quantize"}


def export_graph(function: str, length: int) -> Artifact:
    """The exported graph's summary of ``function`` (prefill, decode, verify) at one length."""
    return Artifact(f"export.graph.{function}.{length}", f"export/{function}-{length}/graph.json", "export/graph-summary", "export")


def export_lint(function: str, length: int) -> Artifact:
    """The linter's findings on that graph when it was exported (the plugin re-lints the summary)."""
    return Artifact(f"export.lint.{function}.{length}", f"export/{function}-{length}/lint.json", "export/lint-findings", "export")


def coreml_package(length: int, precision: str = "fp16") -> Artifact:
    """The multifunction mlpackage of one length: FP16 from ``convert``, INT8 from ``quantize``."""
    return Artifact(f"coreml.{precision}.{length}", f"coreml/{precision}/student-L{length}.mlpackage",
                    "coreml/mlpackage-multifunction", _PACKAGE_STAGES[precision])
