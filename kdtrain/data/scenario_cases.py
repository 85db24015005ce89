"""Held-out cases of the four scenarios the evaluation gates judge: tool chains, code mode, long
reasoning, plain answers.

Each case is a reference conversation drawn from the corpus templates
(:data:`kdtrain.data.templates.BUILDERS`) with generators seeded
``scenarios/{seed}/{scenario}/{i}``, never the training corpus's ``{seed}/{scenario}/{index}``;
long reasoning has a builder of its own here (a sum of several numbers or a multi-digit product,
worked step by step in ``<think>``). The model sees the prompt (system + user); the rest of the
reference is what a gate judges against:

- ``steps``: the expected tool calls in order, each with its recorded result (what the loop
  feeds back when the model makes that call);
- ``answer``: the reference final assistant turn (its length is the halt tolerance's reference);
- ``facts``: what a correct answer must contain, normalised (:func:`normalise`). For tool
  scenarios, the scalars of the recorded results that the reference answer contains (strings
  whole, numbers as numbers; for ``run_code``, the words of its stdout); otherwise the answer's
  last number, or the answer itself when it is one word. A draw without a fact (a greeting)
  is redrawn.

The templates have little variety, so disjointness is checked by hash
(:func:`kdtrain.data.corpus.example_hash` of the whole reference conversation): a draw equal
to a training sample or to a case already taken is skipped and another drawn.

On disk: ``cases.jsonl`` (one case per line, sorted keys) and ``cases.json`` (the generator's
settings, counts per scenario, SHA-256 of the lines and of the training corpus). The same seed
gives byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kdcontracts.models.tokens import Message
from kdtrain.data import store
from kdtrain.data.calls import CODE_TOOL, find_blocks
from kdtrain.data.corpus import Corpus, example_hash
from kdtrain.errors import DataError, located

CASES_JSONL = "cases.jsonl"
CASES_JSON = "cases.json"

ScenarioName = Literal["tool_chain", "code_mode", "long_reasoning", "plain"]
SCENARIOS: tuple[str, ...] = ScenarioName.__args__
TEMPLATES = {"tool_chain": ("multi_step", "pii"), "code_mode": ("code_mode",), "plain": ("plain",)}
_DRAWS_PER_CASE = 40  # how many draws a scenario may use per accepted case before giving up
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:,\d{3})*(?:\.\d+)?")
_WORD = re.compile(r"[^\W_]+(?:[.'][^\W_]+)*", re.UNICODE)


def normalise(text: str) -> str:
    """Unicode NFKC, case-folded, whitespace collapsed: how answers, facts and string arguments compare."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def numbers(text: str) -> list[float]:
    """The numbers written in ``text`` (``1,234.5`` is one number)."""
    return [float(m.replace(",", "")) for m in _NUMBER.findall(text)]


def as_number(fact: str) -> float | None:
    try:
        return float(fact)
    except ValueError:
        return None


def contains(text: str, fact: str) -> bool:
    """Whether ``text`` states ``fact``: a number as a number (``12.50`` states ``12.5``), else the
    normalised string as whole words."""
    value = as_number(fact)
    if value is not None:
        return any(abs(n - value) <= 1e-9 * max(1.0, abs(value)) for n in numbers(normalise(text)))
    return re.search(rf"(?<!\w){re.escape(normalise(fact))}(?!\w)", normalise(text)) is not None


def visible(turn: str) -> str:
    """A turn's answer: what follows its ``<think>`` block (all of it when there is none)."""
    end = turn.rfind("</think>")
    return turn if end < 0 else turn[end + len("</think>"):]


def scalars(value: Any) -> list[str]:
    """The strings and numbers inside a JSON value, as text, in order."""
    if isinstance(value, dict):
        return [s for v in value.values() for s in scalars(v)]
    if isinstance(value, list):
        return [s for v in value for s in scalars(v)]
    if isinstance(value, bool) or value is None:
        return []
    return [value if isinstance(value, str) else repr(value)]


def result_values(tool: str, result: str) -> list[str]:
    """What a recorded tool result says: its scalars; for ``run_code``, the words of its stdout."""
    data = json.loads(result)
    if tool == CODE_TOOL and isinstance(data, dict) and isinstance(data.get("stdout"), str):
        return _WORD.findall(data["stdout"])
    return scalars(data)


class Step(BaseModel):
    """One expected tool call and the result recorded for it (a ``tool`` message's content)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    arguments: dict[str, Any]
    result: str


class ScenarioCase(BaseModel):
    """One line of ``cases.jsonl``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1)
    scenario: ScenarioName
    messages: tuple[Message, ...] = Field(min_length=2)  # the prompt: system + user
    reference: tuple[Message, ...] = Field(min_length=1)  # the reference turns after the prompt (calls, results, answer)
    steps: tuple[Step, ...]
    answer: str = Field(min_length=1)
    facts: tuple[str, ...] = Field(min_length=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")  # example_hash(messages + reference)

    def conversation(self) -> tuple[Message, ...]:
        return (*self.messages, *self.reference)

    def line(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, ensure_ascii=False)


class ScenarioCasesInfo(BaseModel):
    """``cases.json``."""

    model_config = ConfigDict(extra="forbid")

    seed: int
    cases_per_scenario: int = Field(ge=1)
    scenarios: tuple[ScenarioName, ...]
    counts: dict[ScenarioName, int]
    cases: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    training_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    training_hashes_checked: int = Field(ge=0)


@dataclass(frozen=True)
class ScenarioCases:
    cases: tuple[ScenarioCase, ...]
    seed: int
    cases_per_scenario: int
    scenarios: tuple[str, ...]
    training_sha256: str
    training_hashes_checked: int

    @property
    def settings(self) -> dict:
        """What the generator was asked for (``cases.json`` records it)."""
        return {"seed": self.seed, "cases_per_scenario": self.cases_per_scenario, "scenarios": list(self.scenarios)}

    def jsonl(self) -> bytes:
        return "".join(c.line() + "\n" for c in self.cases).encode("utf-8")

    def info(self) -> ScenarioCasesInfo:
        return ScenarioCasesInfo(seed=self.seed, cases_per_scenario=self.cases_per_scenario, scenarios=self.scenarios,
                                 counts={s: sum(c.scenario == s for c in self.cases) for s in self.scenarios},
                                 cases=len(self.cases), sha256=hashlib.sha256(self.jsonl()).hexdigest(),
                                 training_sha256=self.training_sha256, training_hashes_checked=self.training_hashes_checked)

    def save(self, folder: Path | str) -> Path:
        """Both files in a fresh folder swapped in whole."""
        return store.save(folder, CASES_JSONL, self.jsonl(), CASES_JSON, self.info())

    @classmethod
    def load(cls, folder: Path | str) -> "ScenarioCases":
        """Read and verify a cases folder; a DataError names the file, key, expected and found."""
        folder = Path(folder)
        info, data = store.read_info(folder, CASES_JSON, CASES_JSONL, ScenarioCasesInfo, "a scenario-cases folder")
        store.check_sha256(folder / CASES_JSONL, data, info.sha256, CASES_JSON)
        cases = []
        for where, case in store.records(folder / CASES_JSONL, data, ScenarioCase.model_validate):
            if case.sha256 != example_hash(case.conversation()):
                raise DataError(located(folder / CASES_JSONL, f"{where}sha256", f"{example_hash(case.conversation())} (the hash of "
                                        "its messages and reference)", case.sha256))
            cases.append(case)
        store.check_count(folder / CASES_JSON, "cases", CASES_JSONL, len(cases), info.cases)
        return cls(tuple(cases), info.seed, info.cases_per_scenario, info.scenarios, info.training_sha256,
                   info.training_hashes_checked)


def sample_hashes(corpus: Corpus) -> set[str]:
    """The hash of every training sample's conversation (what a case must differ from)."""
    return {example_hash(s.messages) for s in corpus.samples}


def overlap(cases: ScenarioCases, corpus: Corpus) -> list[str]:
    """Ids of the cases whose whole reference conversation is a sample of ``corpus``."""
    seen = sample_hashes(corpus)
    return [c.id for c in cases.cases if c.sha256 in seen]


def long_reasoning(rng: random.Random, registry) -> list[Message]:
    """A sum of four to six numbers, or a three-digit by two-digit product, worked step by step."""
    if rng.random() < 0.5:
        terms = [rng.randint(11, 999) for _ in range(rng.randint(4, 6))]
        steps, total = [], terms[0]
        for term in terms[1:]:
            steps.append(f"{total} + {term} = {total + term}.")
            total += term
        user, answer = f"What is {' + '.join(map(str, terms))}? Work it out step by step.", f"The sum is {total}."
    else:
        a, b = rng.randint(102, 989), rng.randint(12, 98)
        tens, ones = b // 10 * 10, b % 10
        steps = [f"{a} × {tens} = {a * tens}.", f"{a} × {ones} = {a * ones}.", f"{a * tens} + {a * ones} = {a * b}."]
        user, answer = f"What is {a} × {b}? Work it out step by step.", f"{a} × {b} = {a * b}."
    thought = " ".join(steps)
    return [Message("system", "You are a helpful assistant. Think step by step before you answer."),
            Message("user", user), Message("assistant", f"<think>{thought}</think>{answer}")]


def _steps(reference: list[Message]) -> tuple[Step, ...]:
    """The expected calls: each assistant tool call with the tool message that answers it."""
    steps = []
    for message, reply in zip(reference, reference[1:]):
        if message.role == "assistant" and reply.role == "tool":
            call = json.loads(find_blocks(message.content)[0].text)
            steps.append(Step(name=call["name"], arguments=call["arguments"], result=reply.content))
    return tuple(steps)


def _facts(steps: tuple[Step, ...], answer: str) -> tuple[str, ...]:
    if steps:
        found = [v for s in steps for v in result_values(s.name, s.result) if contains(answer, v)]
    else:
        said = visible(answer)
        last = _NUMBER.findall(said)
        words = _WORD.findall(said)
        found = last[-1:] or (words if len(words) == 1 else [])
    return tuple(dict.fromkeys(normalise(v) for v in found))


def draw_case(scenario: str, seed: int, index: int, registry) -> ScenarioCase | None:
    """Draw ``index`` of a scenario, or None when it has no fact to check."""
    from kdtrain.data.templates import BUILDERS

    rng = random.Random(f"scenarios/{seed}/{scenario}/{index}")
    builder = long_reasoning if scenario == "long_reasoning" else BUILDERS[rng.choice(TEMPLATES[scenario])]
    conversation = builder(rng, registry)
    prompt, reference = tuple(conversation[:2]), conversation[2:]
    steps, answer = _steps(reference), reference[-1].content
    facts = _facts(steps, answer)
    if not facts:
        return None
    return ScenarioCase(id=f"{scenario}-{index:04d}", scenario=scenario, messages=prompt, reference=tuple(reference),
                        steps=steps, answer=answer, facts=facts, sha256=example_hash(conversation))


def build_scenario_cases(registry, training: Corpus, cases_per_scenario: int, seed: int) -> ScenarioCases:
    """``cases_per_scenario`` held-out cases of each scenario, none equal to a training sample or to
    another case; reproducible from ``seed``. A DataError if a scenario cannot yield enough."""
    excluded = sample_hashes(training)
    checked = len(excluded)
    cases = []
    for scenario in SCENARIOS:
        accepted, draws = 0, cases_per_scenario * _DRAWS_PER_CASE
        for index in range(draws):
            case = draw_case(scenario, seed, index, registry)
            if case is None or case.sha256 in excluded:
                continue  # no fact to check, a training sample, or a repeat of a case already taken
            excluded.add(case.sha256)
            cases.append(case)
            accepted += 1
            if accepted == cases_per_scenario:
                break
        if accepted < cases_per_scenario:
            raise DataError(located(f"scenario cases (seed {seed})", f"scenario {scenario}",
                                    f"{cases_per_scenario} cases new to the training corpus and to the set",
                                    f"{accepted} after {draws} draws"))
    return ScenarioCases(tuple(cases), seed, cases_per_scenario, SCENARIOS, training.info().sha256, checked)
