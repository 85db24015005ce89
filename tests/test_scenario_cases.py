"""The held-out scenario cases (kdtrain.data.scenario_cases): what each scenario holds, the same
bytes from the same seed, disjoint from training corpora by hash (a planted collision is redrawn),
and a folder changed after it was written is refused."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from kdcontracts.families import load
from kdtrain.data.calls import read_calls
from kdtrain.data.corpus import Corpus, Eligibility, Sample, SampleMeta, build_reference_corpus
from kdtrain.data.corpus import example_hash
from kdtrain.data.scenario_cases import (CASES_JSON, CASES_JSONL, SCENARIOS, ScenarioCases, build_scenario_cases, contains,
                                         normalise, overlap, visible)
from kdtrain.data.validate import check_call
from kdtrain.errors import DataError

REGISTRY = load(Path(__file__).parents[1] / "contracts" / "tool_registry.json")
SEED, PER_SCENARIO = 20261130, 10  # the reference settings (contracts/gates.yaml)


@pytest.fixture(scope="module")
def training() -> Corpus:
    return build_reference_corpus(REGISTRY, 2, 1234)


@pytest.fixture(scope="module")
def cases(training) -> ScenarioCases:
    return build_scenario_cases(REGISTRY, training, PER_SCENARIO, SEED)


def test_each_scenario_holds_its_reference_settings_worth_of_checkable_cases(cases):
    assert cases.info().counts == {s: PER_SCENARIO for s in SCENARIOS}
    assert len({c.id for c in cases.cases}) == len({c.sha256 for c in cases.cases}) == len(cases.cases) == 4 * PER_SCENARIO
    for case in cases.cases:
        assert [m.role for m in case.messages] == ["system", "user"] and case.reference[-1].content == case.answer
        assert case.sha256 == example_hash(case.conversation())
        assert case.facts and all(f == normalise(f) and contains(visible(case.answer), f) for f in case.facts), case.id
        calls = [c for i, m in enumerate(case.reference) if m.role == "assistant" for c in read_calls(i, m.content, set(REGISTRY.names))]
        assert not [f for c in calls for f in check_call(c, REGISTRY)], case.id  # the reference calls are valid ones
        results = [m.content for m in case.reference if m.role == "tool"]
        assert [s.result for s in case.steps] == results
    by = {s: [c for c in cases.cases if c.scenario == s] for s in SCENARIOS}
    assert all(len(c.steps) == 2 and c.steps[1].name != "run_code" for c in by["tool_chain"])
    assert all([s.name for s in c.steps] == ["run_code"] and "run_code" in c.messages[0].content for c in by["code_mode"])
    assert all(not c.steps and c.answer.startswith("<think>") and c.answer.count(".") >= 4 for c in by["long_reasoning"])
    assert all(not c.steps and "<think>" not in c.answer for c in by["plain"])


def test_the_same_seed_writes_the_same_bytes_and_loads_back(tmp_path, training, cases):
    again = build_scenario_cases(REGISTRY, training, PER_SCENARIO, SEED)
    cases.save(tmp_path / "a")
    again.save(tmp_path / "b")
    for name in (CASES_JSONL, CASES_JSON):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    loaded = ScenarioCases.load(tmp_path / "a")
    assert loaded == cases and loaded.settings == {"seed": SEED, "cases_per_scenario": PER_SCENARIO, "scenarios": list(SCENARIOS)}
    assert build_scenario_cases(REGISTRY, training, PER_SCENARIO, SEED + 1).jsonl() != cases.jsonl()


@pytest.mark.parametrize("per_scenario, seed", [(2, 1234), (20, 1234), (20, SEED)])
def test_no_case_is_a_training_sample(per_scenario, seed):
    corpus = build_reference_corpus(REGISTRY, per_scenario, seed)
    built = build_scenario_cases(REGISTRY, corpus, PER_SCENARIO, SEED)
    assert overlap(built, corpus) == []
    assert not {c.sha256 for c in built.cases} & {example_hash(s.messages) for s in corpus.samples}


def test_a_planted_collision_is_redrawn(training, cases):
    planted = [cases.cases[i * PER_SCENARIO] for i in range(len(SCENARIOS))]  # the first case of each scenario
    meta = SampleMeta(tool_schema_version=REGISTRY.tool_schema_version, orchestrator_version=REGISTRY.orchestrator_version,
                      scenario="multi_step", eligible=Eligibility(code_mode=False), seed=0)
    samples = training.samples + tuple(Sample(id=f"planted-{i}", messages=c.conversation(), meta=meta) for i, c in enumerate(planted))
    poisoned = training.replace(samples=samples)
    assert overlap(cases, poisoned) == [c.id for c in planted]
    rebuilt = build_scenario_cases(REGISTRY, poisoned, PER_SCENARIO, SEED)
    assert overlap(rebuilt, poisoned) == [] and rebuilt.info().counts == {s: PER_SCENARIO for s in SCENARIOS}
    assert not {c.sha256 for c in planted} & {c.sha256 for c in rebuilt.cases}
    kept = {c.id for c in cases.cases} - {c.id for c in planted}
    assert kept <= {c.id for c in rebuilt.cases}  # the others are the same draws
    assert rebuilt.training_sha256 == poisoned.info().sha256 != cases.training_sha256


def test_a_changed_file_is_refused(tmp_path, cases):
    folder = cases.save(tmp_path / "cases")
    lines = (folder / CASES_JSONL).read_text(encoding="utf-8")
    first = json.loads(lines.splitlines()[0])
    (folder / CASES_JSONL).write_text(lines.replace(first["facts"][0], "nowhere", 1), encoding="utf-8")
    with pytest.raises(DataError, match=rf"{CASES_JSONL}: expected sha256 {cases.info().sha256} \(as {CASES_JSON} records\), found sha256 "):
        ScenarioCases.load(folder)

    # Rewritten consistently at the file level, a case still has to hash as its conversation.
    changed = json.loads(lines.splitlines()[0])
    changed["answer"] = changed["reference"][-1]["content"] = "Something else."
    data = (json.dumps(changed, sort_keys=True, ensure_ascii=False) + "\n" + "\n".join(lines.splitlines()[1:]) + "\n").encode()
    (folder / CASES_JSONL).write_bytes(data)
    info = json.loads((folder / CASES_JSON).read_text())
    info["sha256"] = hashlib.sha256(data).hexdigest()
    (folder / CASES_JSON).write_text(json.dumps(info))
    with pytest.raises(DataError, match=rf"{CASES_JSONL}: at line 1, sha256: expected [0-9a-f]{{64}} \(the hash of its messages and reference\), found {first['sha256']}"):
        ScenarioCases.load(folder)

    (folder / CASES_JSON).unlink()
    with pytest.raises(DataError, match=rf"{CASES_JSON}: expected a scenario-cases folder .*, found no such file"):
        ScenarioCases.load(folder)
