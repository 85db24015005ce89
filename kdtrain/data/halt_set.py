"""The held-out halt calibration set: one assistant turn per example, stopped right, late or early.

Each base conversation is drawn from the reference corpus's templates
(:data:`kdtrain.data.templates.BUILDERS`) with generators seeded ``halt/{seed}/{scenario}/{i}``,
never the training corpus's ``{seed}/{scenario}/{index}``. One of its assistant turns (an
answer or a tool call, drawn) becomes the completion; everything before it is the prompt.
Three examples per base:

- ``good``: the turn as written; it should stop at its end (``stop_char`` = its length);
- ``over_long``: the turn, then more (the answer again, filler, a second unasked answer):
  it should still stop at ``stop_char``;
- ``under_short``: the turn cut before it is complete (inside the tool call's JSON, or before
  the answer's final number or word): any stop in it is early (``stop_char`` null).

The templates have little variety ("Say hi." recurs), so disjointness from the training data
is checked by hash, not assumed: a base whose conversation, or any of whose examples, hashes
like a training sample or one of its turns (a training conversation cut after an assistant
message) is skipped and another drawn; so is a base repeating one already in the set.

On disk: ``halt_set.jsonl`` (one example per line, sorted keys) and ``halt_set.json`` (the
generator's settings, counts per kind, SHA-256 of the lines, the training corpus's SHA-256
and how many training hashes were checked). The same seed gives byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field

from kdcontracts.models.tokens import Message
from kdtrain.data import store
from kdtrain.data.corpus import SCENARIOS, Corpus, Scenario, example_hash
from kdtrain.errors import DataError, located

HALT_SET_JSONL = "halt_set.jsonl"
HALT_SET_JSON = "halt_set.json"

Kind = Literal["good", "over_long", "under_short"]
KINDS: tuple[str, ...] = Kind.__args__

FILLERS = (
    "Let me know if there is anything else I can help with.",
    "I hope this helps!",
    "Is there anything else you would like to know?",
    "Feel free to ask if you have more questions.",
    "Happy to help with anything else.",
)
UNASKED = (  # a second answer nobody asked for
    "Also, the capital of Peru is Lima.",
    "By the way, 17 + 25 = 42.",
    "Also, it is 21.5 °C with clear skies in Lisbon.",
    "Fun fact: the cheapest flight to Tokyo today is JL 404.",
    "Also, 100 EUR is about 108.0 USD.",
)
_DRAWS_PER_BASE = 40  # how many draws a scenario may use per accepted base before giving up
_FINAL_FACT = re.compile(r"\d+(?:\.\d+)?")  # an answer's final number, else its final word
_WORD = re.compile(r"\w+")


def training_hashes(corpus: Corpus) -> frozenset[str]:
    """Every training sample's hash and those of its turns (the sample cut after each assistant message).

    A held-out example equal to a turn the student was trained on is not held out, even when
    the rest of that training conversation differs.
    """
    hashes = set()
    for sample in corpus.samples:
        hashes.add(example_hash(sample.messages))
        hashes.update(example_hash(sample.messages[:i + 1]) for i, m in enumerate(sample.messages) if m.role == "assistant")
    return frozenset(hashes)


class HaltExample(BaseModel):
    """One line of ``halt_set.jsonl``: a prompt and one assistant turn to complete it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1)
    scenario: Scenario
    kind: Kind
    messages: tuple[Message, ...] = Field(min_length=1)  # the prompt
    completion: str = Field(min_length=1)
    stop_char: int | None = Field(ge=1)  # where the good answer ends in ``completion``; null for under_short
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")  # example_hash(prompt + completion as an assistant message)
    base: str = Field(min_length=1)
    base_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")  # example_hash of the whole base conversation

    def conversation(self) -> tuple[Message, ...]:
        return (*self.messages, Message("assistant", self.completion))

    def line(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, ensure_ascii=False)


class HaltSetInfo(BaseModel):
    """``halt_set.json``."""

    model_config = ConfigDict(extra="forbid")

    seed: int
    bases_per_scenario: int = Field(ge=1)
    scenarios: tuple[Scenario, ...]
    counts: dict[Kind, int]
    examples: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    training_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    training_hashes_checked: int = Field(ge=0)


@dataclass(frozen=True)
class HaltSet:
    examples: tuple[HaltExample, ...]
    seed: int
    bases_per_scenario: int
    scenarios: tuple[str, ...]
    training_sha256: str
    training_hashes_checked: int

    def good(self) -> tuple[HaltExample, ...]:
        """The held-out turns as written: also the prompts the curriculum telemetry samples."""
        return tuple(e for e in self.examples if e.kind == "good")

    def jsonl(self) -> bytes:
        return "".join(e.line() + "\n" for e in self.examples).encode("utf-8")

    def info(self) -> HaltSetInfo:
        return HaltSetInfo(seed=self.seed, bases_per_scenario=self.bases_per_scenario, scenarios=self.scenarios,
                           counts={k: sum(e.kind == k for e in self.examples) for k in KINDS}, examples=len(self.examples),
                           sha256=hashlib.sha256(self.jsonl()).hexdigest(), training_sha256=self.training_sha256,
                           training_hashes_checked=self.training_hashes_checked)

    def save(self, folder: Path | str) -> Path:
        """Both files in a fresh folder swapped in whole."""
        return store.save(folder, HALT_SET_JSONL, self.jsonl(), HALT_SET_JSON, self.info())

    @classmethod
    def load(cls, folder: Path | str) -> "HaltSet":
        """Read and verify a halt-set folder; a DataError names the file, key, expected and found."""
        folder = Path(folder)
        info, data = store.read_info(folder, HALT_SET_JSON, HALT_SET_JSONL, HaltSetInfo, "a halt-set folder")
        store.check_sha256(folder / HALT_SET_JSONL, data, info.sha256, HALT_SET_JSON)
        examples = []
        for where, example in store.records(folder / HALT_SET_JSONL, data, HaltExample.model_validate):
            if example.sha256 != example_hash(example.conversation()):
                raise DataError(located(folder / HALT_SET_JSONL, f"{where}sha256", f"{example_hash(example.conversation())} (the hash "
                                        "of its messages and completion)", example.sha256))
            examples.append(example)
        store.check_count(folder / HALT_SET_JSON, "examples", HALT_SET_JSONL, len(examples), info.examples)
        return cls(tuple(examples), info.seed, info.bases_per_scenario, info.scenarios, info.training_sha256, info.training_hashes_checked)


def overlap(halt_set: HaltSet, corpus: Corpus) -> list[str]:
    """Ids of the examples that are (or whose base conversation is) a training sample or turn of ``corpus``."""
    seen = training_hashes(corpus)
    return [e.id for e in halt_set.examples if e.sha256 in seen or e.base_sha256 in seen]


def _tool_call_json(turn: str) -> tuple[int, int] | None:
    """Span of the last tool call's JSON object in ``turn`` (``{`` … ``}``), if it has one."""
    open_tag, close_tag = turn.rfind("<tool_call>"), turn.rfind("</tool_call>")
    if open_tag < 0 or close_tag < open_tag:
        return None
    return turn.index("{", open_tag), turn.rindex("}", 0, close_tag) + 1


def _answer_start(turn: str) -> int:
    """Where the turn's visible part begins (after its ``<think>`` block, if any)."""
    end = turn.find("</think>")
    return 0 if end < 0 else end + len("</think>")


def over_long(rng: random.Random, turn: str) -> str:
    """The turn, then more of one drawn sort: itself again, filler, or an answer nobody asked for."""
    call = _tool_call_json(turn)
    separator = "\n" if call is not None else " "
    sort = rng.choice(("repeat", "filler", "unasked"))
    if sort == "repeat":
        more = turn[turn.rfind("<tool_call>"):] if call is not None else turn[_answer_start(turn):]
    else:
        more = rng.choice(FILLERS if sort == "filler" else UNASKED)
    return turn + separator + more


def under_short(rng: random.Random, turn: str) -> str:
    """The turn cut before it is complete: inside the tool call's JSON, else before the answer's final fact."""
    call = _tool_call_json(turn)
    if call is not None:
        return turn[:rng.randint(call[0] + 1, call[1] - 1)]  # at least "{", never the closing "}"
    start = _answer_start(turn)
    facts = list(_FINAL_FACT.finditer(turn, start)) or list(_WORD.finditer(turn, start))
    fact = facts[-1]
    if fact.start() > start:
        return turn[:rng.randint(start + 1, fact.start())]
    return turn[:rng.randint(fact.start() + 1, fact.end() - 1)]  # the answer is the fact itself: cut inside it


def _base_examples(rng: random.Random, scenario: str, base: str, conversation: Sequence[Message]) -> list[HaltExample]:
    turn_index = rng.choice([i for i, m in enumerate(conversation) if m.role == "assistant"])
    prompt, turn = tuple(conversation[:turn_index]), conversation[turn_index].content
    completions = {"good": (turn, len(turn)), "over_long": (over_long(rng, turn), len(turn)), "under_short": (under_short(rng, turn), None)}
    base_sha = example_hash(conversation)
    return [HaltExample(id=f"{base}/{kind}", scenario=scenario, kind=kind, messages=prompt, completion=text, stop_char=stop,
                        sha256=example_hash((*prompt, Message("assistant", text))), base=base, base_sha256=base_sha)
            for kind, (text, stop) in completions.items()]


def build_halt_set(registry, training: Corpus, bases_per_scenario: int, seed: int) -> HaltSet:
    """``bases_per_scenario`` held-out bases per scenario, three examples each; reproducible from ``seed``.

    ``registry`` is the ToolRegistry the templates write calls against (as for the training
    corpus); a DataError if a scenario cannot yield enough bases that are new.
    """
    from kdtrain.data.templates import BUILDERS

    excluded = set(training_hashes(training))
    checked = len(excluded)
    examples = []
    for scenario in SCENARIOS:
        accepted, draws = 0, bases_per_scenario * _DRAWS_PER_BASE
        for i in range(draws):
            rng = random.Random(f"halt/{seed}/{scenario}/{i}")
            conversation = BUILDERS[scenario](rng, registry)
            drawn = _base_examples(rng, scenario, f"{scenario}-{i:04d}", conversation)
            hashes = {drawn[0].base_sha256, *(e.sha256 for e in drawn)}
            if hashes & excluded:
                continue  # a training sample or turn, or a repeat of a base already taken
            excluded |= hashes
            examples += drawn
            accepted += 1
            if accepted == bases_per_scenario:
                break
        if accepted < bases_per_scenario:
            raise DataError(located(f"halt set (seed {seed})", f"scenario {scenario}",
                                    f"{bases_per_scenario} bases new to the training corpus and to the set",
                                    f"{accepted} after {draws} draws"))
    return HaltSet(tuple(examples), seed, bases_per_scenario, SCENARIOS, training.info().sha256, checked)
