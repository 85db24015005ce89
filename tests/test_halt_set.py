"""The held-out halt set: big enough, reproducible, every kind per scenario, and disjoint from
the training corpus by hash (collisions are real: the templates repeat themselves)."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest

from kdcontracts.families import load
from kdcontracts.models.tokens import Message
from kdtrain.data.corpus import SCENARIOS, Corpus, Sample, build_reference_corpus, example_hash
from kdtrain.data.halt_set import HALT_SET_JSON, HALT_SET_JSONL, KINDS, HaltSet, build_halt_set, overlap
from kdtrain.data.templates import BUILDERS
from kdtrain.errors import DataError

REPO = Path(__file__).resolve().parents[1]
BASES, SEED = 15, 20261130  # the reference settings


@pytest.fixture(scope="module")
def registry():
    return load(REPO / "contracts/tool_registry.json")


@pytest.fixture(scope="module")
def training(registry) -> Corpus:
    settings = load(REPO / "contracts/distill_data.yaml").corpus
    return build_reference_corpus(registry, settings.samples_per_scenario, settings.seed)


@pytest.fixture(scope="module")
def halt_set(registry, training) -> HaltSet:
    return build_halt_set(registry, training, BASES, SEED)


def _training_turn_hashes(corpus: Corpus) -> set[str]:
    """Each sample, and each sample cut after one of its assistant messages (a turn it trains)."""
    return {example_hash(s.messages[:i + 1]) for s in corpus.samples for i, m in enumerate(s.messages)
            if m.role == "assistant" or i == len(s.messages) - 1}


def test_reference_settings_give_300_examples_every_kind_in_every_scenario(halt_set):
    assert len(halt_set.examples) >= 300
    for scenario in SCENARIOS:
        kinds = [e.kind for e in halt_set.examples if e.scenario == scenario]
        assert {k: kinds.count(k) for k in KINDS} == {k: BASES for k in KINDS}, scenario
    assert len({e.id for e in halt_set.examples}) == len(halt_set.examples)
    assert len({e.sha256 for e in halt_set.examples}) == len(halt_set.examples)  # no duplicate inside the set
    assert halt_set.good() == tuple(e for e in halt_set.examples if e.kind == "good") and len(halt_set.good()) == 7 * BASES


def test_kinds_stop_where_they_say(halt_set):
    by_base = {}
    for e in halt_set.examples:
        by_base.setdefault(e.base, {})[e.kind] = e
    for base, kinds in by_base.items():
        good, long, short = kinds["good"], kinds["over_long"], kinds["under_short"]
        assert good.messages == long.messages == short.messages and good.messages[-1].role != "assistant", base
        assert good.stop_char == long.stop_char == len(good.completion) and short.stop_char is None, base
        assert long.completion.startswith(good.completion) and len(long.completion) > len(good.completion) + 3, base
        assert good.completion.startswith(short.completion) and len(short.completion) < len(good.completion), base
        if "<tool_call>" in good.completion:  # cut inside the call's JSON: never a complete call
            assert "</tool_call>" not in short.completion and "{" in short.completion, base
    continuations = {e.completion[e.stop_char:] for e in halt_set.examples if e.kind == "over_long"}
    assert len(continuations) > 10  # repetition, filler and unasked answers, not one suffix


def test_same_seed_same_bytes_another_seed_another_set(registry, training, halt_set, tmp_path):
    first = halt_set.save(tmp_path / "a")
    second = build_halt_set(registry, training, BASES, SEED).save(tmp_path / "b")
    for name in (HALT_SET_JSONL, HALT_SET_JSON):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    other = build_halt_set(registry, training, BASES, SEED + 1)
    assert other.jsonl() != halt_set.jsonl()


def test_shares_no_example_with_the_training_corpus(registry, training, halt_set):
    trained = _training_turn_hashes(training)
    held_out = {e.sha256 for e in halt_set.examples} | {e.base_sha256 for e in halt_set.examples}
    assert not held_out & trained
    assert not held_out & {example_hash(s.messages) for s in training.samples}
    assert overlap(halt_set, training) == []
    info = halt_set.info()
    assert info.training_sha256 == training.info().sha256 and info.training_hashes_checked >= len(training.samples)
    # the check is not idle: drawn without knowing the training corpus, the set would share examples with it
    unaware = build_halt_set(registry, training.replace(samples=()), BASES, SEED)
    assert overlap(unaware, training)
    assert {e.base for e in unaware.examples} != {e.base for e in halt_set.examples}


def _planted(training: Corpus, conversation: tuple[Message, ...]) -> Corpus:
    sample = Sample(id="planted-0000", messages=conversation, meta=training.samples[0].meta)
    return training.replace(samples=(*training.samples, sample))


@pytest.mark.parametrize("scenario", ["plain", "pii"])
def test_a_training_corpus_holding_a_base_conversation_excludes_it(registry, training, halt_set, scenario):
    base = next(e for e in halt_set.examples if e.scenario == scenario and e.kind == "good")
    index = int(base.base.rsplit("-", 1)[1])
    conversation = tuple(BUILDERS[scenario](random.Random(f"halt/{SEED}/{scenario}/{index}"), registry))
    assert example_hash(conversation) == base.base_sha256
    planted = _planted(training, conversation)
    assert overlap(halt_set, planted) == [f"{base.base}/{kind}" for kind in KINDS]
    rebuilt = build_halt_set(registry, planted, BASES, SEED)
    assert base.base not in {e.base for e in rebuilt.examples}
    assert base.base_sha256 not in {e.base_sha256 for e in rebuilt.examples}
    assert len(rebuilt.examples) == len(halt_set.examples) and overlap(rebuilt, planted) == []


def test_a_training_turn_equal_to_a_held_out_good_example_excludes_it(registry, training, halt_set):
    """A training conversation that goes on differently still trained the student on that turn."""
    good = next(e for e in halt_set.examples if e.kind == "good" and e.messages[-1].role == "tool")
    turn = (*good.messages, Message("assistant", good.completion))
    planted = _planted(training, (*turn, Message("user", "Thanks!"), Message("assistant", "You're welcome.")))
    assert good.id in overlap(halt_set, planted)
    assert good.sha256 not in {e.sha256 for e in build_halt_set(registry, planted, BASES, SEED).examples}


def test_load_round_trips_and_refuses_a_tampered_file(halt_set, tmp_path):
    folder = halt_set.save(tmp_path / "halt")
    assert HaltSet.load(folder) == halt_set
    lines_file = folder / HALT_SET_JSONL
    lines = lines_file.read_text(encoding="utf-8").splitlines(keepends=True)
    example = json.loads(lines[4])
    example["completion"] += " And more."
    lines[4] = json.dumps(example, sort_keys=True, ensure_ascii=False) + "\n"
    lines_file.write_text("".join(lines), encoding="utf-8")
    with pytest.raises(DataError, match=rf"{HALT_SET_JSONL}.*expected sha256 .*found sha256"):
        HaltSet.load(folder)
    # the same edit with the recorded sha256 updated: the line's own hash still gives it away
    info = json.loads((folder / HALT_SET_JSON).read_text(encoding="utf-8"))
    info["sha256"] = hashlib.sha256(lines_file.read_bytes()).hexdigest()
    (folder / HALT_SET_JSON).write_text(json.dumps(info), encoding="utf-8")
    with pytest.raises(DataError, match=rf"{HALT_SET_JSONL}: at line 5, sha256: expected [0-9a-f]{{64}} .*found {example['sha256']}"):
        HaltSet.load(folder)
    (folder / HALT_SET_JSON).unlink()
    with pytest.raises(DataError, match=rf"{HALT_SET_JSON}: expected a halt-set folder"):
        HaltSet.load(folder)
