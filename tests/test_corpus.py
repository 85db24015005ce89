"""The reference corpus: reproducible from its seed, every scenario present with the right
eligibility, realistic calls, and a folder that refuses to load when a line or a byte is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdtrain.data.corpus import CODE_MODE_SCENARIOS, CORPUS_JSON, CORPUS_JSONL, SCENARIOS, Corpus, build_reference_corpus
from kdtrain.data.registry import load_registry
from kdtrain.errors import DataError

REPO = Path(__file__).resolve().parents[1]
REGISTRY = load_registry(REPO / "contracts/tool_registry.json")


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return build_reference_corpus(REGISTRY, 3, 1234)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, corpus):
    again = build_reference_corpus(REGISTRY, 3, 1234)
    corpus.save(tmp_path / "a")
    again.save(tmp_path / "b")
    for name in (CORPUS_JSONL, CORPUS_JSON):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert build_reference_corpus(REGISTRY, 3, 1235).info().sha256 != corpus.info().sha256


def test_every_scenario_present_with_its_eligibility(corpus):
    assert [s.meta.scenario for s in corpus.samples] == [name for name in SCENARIOS for _ in range(3)]
    for sample in corpus.samples:
        assert sample.meta.eligible.code_mode == (sample.meta.scenario in CODE_MODE_SCENARIOS), sample.id
        assert (sample.meta.tool_schema_version, sample.meta.orchestrator_version, sample.meta.seed) == ("2.0", "1.0", 1234)
    assert CODE_MODE_SCENARIOS == {"multi_step", "code_mode", "large_payload", "pii"}
    assert corpus.samples[3].id == "multi_step-0000"


def test_scenarios_look_like_what_they_claim(corpus):
    by = {s.id: s for s in corpus.samples}
    code = by["code_mode-0000"].messages[2].content
    assert '"name": "run_code"' in code and ("get_weather(city=" in code or "search_flights(to=" in code)
    payload = [m for m in by["large_payload-0001"].messages if m.role == "tool"][0]
    assert len(payload.content) > 3000
    pii = " ".join(m.content for m in by["pii-0002"].messages)
    assert "@example.com" in pii and "C-" in pii and '"name": "send_email"' in pii
    assert "<think>" in by["plain_thinking-0000"].messages[-1].content
    assert all("<tool_call>" not in m.content for m in by["plain-0001"].messages)
    assert all(m.role in ("system", "user", "assistant", "tool") for s in corpus.samples for m in s.messages)


def test_save_load_round_trip(tmp_path, corpus):
    assert Corpus.load(corpus.save(tmp_path / "c")) == corpus
    info = json.loads((tmp_path / "c" / CORPUS_JSON).read_text())
    assert info["dataset_version"] == 1 and info["samples"] == 21 and info["seed"] == 1234
    lines = (tmp_path / "c" / CORPUS_JSONL).read_text().splitlines()
    assert json.loads(lines[0])["id"] == "single_call-0000" and len(lines) == 21


@pytest.mark.parametrize("edit, where, expected", [
    (lambda lines: lines.__setitem__(4, lines[4][:-7]), "line 5", "expected valid JSON"),
    (lambda lines: lines.__setitem__(1, lines[1].replace('"role": "user"', '"role": "robot"', 1)), "line 2, messages[1].role", "expected input should be 'system', 'user', 'assistant' or 'tool', found 'robot'"),
    (lambda lines: lines.__setitem__(2, lines[2].replace('"scenario": "single_call"', '"scenario": "chitchat"')), "line 3, meta.scenario", "found 'chitchat'"),
    (lambda lines: lines.__setitem__(6, lines[6].replace('"meta": {', '"meta": {"extra": 1, ', 1)), "line 7, meta.extra", "expected extra inputs are not permitted"),
    (lambda lines: lines.__setitem__(3, lines[0]), "line 4, id", "expected a sample id not used before (also at line 1), found 'single_call-0000'"),
])
def test_bad_line_names_file_line_and_key(tmp_path, corpus, edit, where, expected):
    folder = corpus.save(tmp_path / "c")
    lines = (folder / CORPUS_JSONL).read_text().splitlines()
    edit(lines)
    (folder / CORPUS_JSONL).write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        Corpus.load(folder)
    assert f"{folder / CORPUS_JSONL}: at {where}: " in str(info.value) and expected in str(info.value)


def test_sha_mismatch_is_detected(tmp_path, corpus):
    folder = corpus.save(tmp_path / "c")
    text = (folder / CORPUS_JSONL).read_text()
    (folder / CORPUS_JSONL).write_text(text.replace('"seed": 1234', '"seed": 4321', 1))  # still a valid sample
    with pytest.raises(DataError, match=r"corpus.jsonl: expected sha256 [0-9a-f]{64} \(as corpus.json records\), found sha256 [0-9a-f]{64}: the file changed"):
        Corpus.load(folder)


def test_missing_line_and_missing_folder(tmp_path, corpus):
    folder = corpus.save(tmp_path / "c")
    lines = (folder / CORPUS_JSONL).read_text().splitlines(keepends=True)
    (folder / CORPUS_JSONL).write_text("".join(lines[:-1]))
    with pytest.raises(DataError, match=r"corpus.json: at samples: expected the number of lines of corpus.jsonl \(20\), found 21"):
        Corpus.load(folder)
    with pytest.raises(DataError, match="expected a corpus folder"):
        Corpus.load(tmp_path / "nowhere")


def test_registry_without_a_reference_tool_is_refused():
    from dataclasses import replace

    registry = replace(REGISTRY, tools=tuple(t for t in REGISTRY.tools if t.name != "fetch_document"))
    with pytest.raises(DataError, match=r"tool_registry.json: at tools: expected the reference corpus's tools .*, found no tool named \['fetch_document'\]"):
        build_reference_corpus(registry, 1, 0)
