"""The validation pass catches each planted malformation, attributes it to the right cause and
tool, counts it exactly, and drops or marks the sample; a clean reference corpus has none."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kdcontracts.models.tokens import Message
from kdtrain.cli import main
from kdtrain.data.calls import CLOSE, OPEN, find_blocks
from kdtrain.data.corpus import Corpus, Sample, build_reference_corpus
from kdtrain.data.noise import CALL_FAULTS, CODE_UNKNOWN_CALL, HALLUCINATED_TOOL, plant, plant_noise
from kdtrain.data.registry import load_registry
from kdtrain.data.templates import tool_call
from kdtrain.data.validate import CAUSES, UNREADABLE, check_sample, validate_corpus
from kdtrain.errors import DataError

REPO = Path(__file__).resolve().parents[1]
REGISTRY = load_registry(REPO / "contracts/tool_registry.json")
CORPUS = build_reference_corpus(REGISTRY, 2, 7)
TARGET = 0  # single_call-0000: its first assistant message is a single call
WITH_CALLS = [s for s in CORPUS.samples if any(find_blocks(m.content) for m in s.messages)]


def planted(sample: Sample, content: str | None = None, **meta) -> Sample:
    """``sample`` with its first assistant message replaced by ``content`` and ``meta`` changed."""
    messages = sample.messages
    if content is not None:
        i = next(i for i, m in enumerate(messages) if m.role == "assistant")
        messages = messages[:i] + (Message("assistant", content),) + messages[i + 1:]
    return sample.model_copy(update={"messages": messages, "meta": sample.meta.model_copy(update=meta)})


def with_sample(index: int, sample: Sample) -> Corpus:
    samples = list(CORPUS.samples)
    samples[index] = sample
    return CORPUS.replace(samples=tuple(samples))


def run_code(code: str) -> str:
    return tool_call("run_code", {"code": code})


def test_clean_reference_corpus_has_no_corruption():
    validated, report = validate_corpus(CORPUS, REGISTRY)
    data = report.to_json()
    assert (data["total"], data["valid"], data["invalid"], data["corruption_rate"]) == (14, 14, 0, 0.0)
    assert data["by_cause"] == {} and data["examples"] == {}
    assert set(data["by_tool"]) == set(REGISTRY.names)
    assert all(t["invalid"] == 0 and t["calls"] > 0 for t in data["by_tool"].values())
    assert validated.samples == tuple(s.model_copy() for s in CORPUS.samples)
    json.dumps(data)


PLANTS = [
    # id, planted assistant content (or meta), cause, tool, what the detail must say
    ("truncated", OPEN + '\n{"name": "get_weather", "arguments": {"city": "Par\n' + CLOSE, "truncated_json", "get_weather", "get_weather: expected a complete JSON object, found it cut off after '{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Par'"),
    ("invalid_json", OPEN + '\n{"name": "get_weather", "arguments": {"city": "Paris",}}\n' + CLOSE, "invalid_json", "get_weather", "expected valid JSON, found Expecting property name enclosed in double quotes at column 55 near '\": {\"city\": \"Paris\",}}\\n'"),
    ("not_an_envelope", OPEN + '\n{"tool": "get_weather", "args": {}}\n' + CLOSE, "invalid_json", None, 'expected {"name": string, "arguments": object}'),
    ("unclosed", OPEN + '\n{"name": "get_weather", "arguments": {"city": "Paris"}}', "unclosed_tool_call", "get_weather", f"expected {CLOSE} after the call"),
    ("unknown_tool", tool_call(HALLUCINATED_TOOL, {"query": "weather Paris"}), "unknown_tool", HALLUCINATED_TOOL, "at name: expected a tool of the registry ['get_weather', "),
    ("missing_field", tool_call("get_weather", {"unit": "celsius"}), "missing_field", "get_weather", "get_weather: at arguments.city: expected a value (required), found no such key"),
    ("wrong_type", tool_call("get_weather", {"city": 42}), "wrong_type", "get_weather", "get_weather: at arguments.city: expected string, found 42"),
    ("enum", tool_call("get_weather", {"city": "Paris", "unit": "kelvin"}), "invalid_value", "get_weather", "at arguments.unit: expected one of ['celsius', 'fahrenheit'], found 'kelvin'"),
    ("pattern", tool_call("search_flights", {"to": "Rome"}), "invalid_value", "search_flights", "at arguments.to: expected a string matching ^[A-Z]{3}$, found 'Rome'"),
    ("bound", tool_call("search_flights", {"to": "FCO", "max_results": 50}), "invalid_value", "search_flights", "at arguments.max_results: expected <= 20, found 50"),
    ("email", tool_call("send_email", {"to": "ana at example", "subject": "s", "body": "b"}), "invalid_value", "send_email", "at arguments.to: expected a valid email"),
    ("unexpected_field", tool_call("get_weather", {"city": "Paris", "verbose": True}), "unexpected_field", "get_weather", "at arguments.verbose: expected only the keys ['city', 'unit'], found unknown key 'verbose'"),
    ("code_wrong_type", run_code("w = get_weather(city=42)\nprint(w)\n"), "wrong_type", "get_weather", "messages[2] run_code line 1: get_weather: at arguments.city: expected string"),
    ("code_missing", run_code('w = get_weather(unit="celsius")\n'), "missing_field", "get_weather", "run_code line 1: get_weather: at arguments.city"),
    ("code_enum", run_code('rows = search_flights(to="FCO", sort="cheapest")\n'), "invalid_value", "search_flights", "at arguments.sort: expected one of ['price', 'duration']"),
    ("code_unknown", run_code('x = 1\n' + CODE_UNKNOWN_CALL), "unknown_tool", "notify_team", "run_code line 2: at name: expected a tool of the registry"),
    ("code_unexpected", run_code('for c in ["Oslo"]:\n    print(get_weather(city=c, units="celsius"))\n'), "unexpected_field", "get_weather", "at arguments.units: expected only the keys"),
    ("code_positional", run_code('print(get_weather("Paris"))\n'), "unexpected_field", "get_weather", "expected keyword arguments only, found 1 positional argument(s)"),
    ("code_syntax", run_code("print(get_weather(city='Paris')\n"), "invalid_value", "run_code", "arguments.code: expected Python, found a syntax error at line 1"),
    ("stale_tool_schema", {"tool_schema_version": "1.0"}, "incompatible_version", None, "at meta.tool_schema_version: expected a version compatible with 2.0 (major 2, minor <= 0; see compatible()), found '1.0'"),
    ("newer_tool_schema", {"tool_schema_version": "2.1"}, "incompatible_version", None, "found '2.1'"),
    ("orchestrator", {"orchestrator_version": "2.0"}, "incompatible_version", None, "at meta.orchestrator_version: expected a version compatible with 1.0"),
]


@pytest.mark.parametrize("plant_, cause, tool, detail", [p[1:] for p in PLANTS], ids=[p[0] for p in PLANTS])
def test_planted_fault_is_caught_counted_and_dropped_or_marked(plant_, cause, tool, detail):
    sample = CORPUS.samples[TARGET]
    bad = planted(sample, **plant_) if isinstance(plant_, dict) else planted(sample, plant_)
    corpus = with_sample(TARGET, bad)

    dropped, report = validate_corpus(corpus, REGISTRY, "drop")
    data = report.to_json()
    assert (data["total"], data["valid"], data["invalid"]) == (14, 13, 1)
    assert data["corruption_rate"] == round(1 / 14, 6)
    assert data["by_cause"] == {cause: 1}
    assert set(data["examples"]) == {cause}
    example = data["examples"][cause][0]
    assert (example["sample"], example["tool"]) == (sample.id, tool)
    assert detail in example["detail"], example["detail"]
    if isinstance(plant_, str):  # a call-level fault: one invalid call, of the tool as written
        stats = data["by_tool"][tool or UNREADABLE]
        assert stats["invalid"] == 1 and stats["by_cause"] == {cause: 1}
    assert sum(t["invalid"] for t in data["by_tool"].values()) == isinstance(plant_, str)
    assert [s.id for s in dropped.samples] == [s.id for s in CORPUS.samples if s.id != sample.id]

    marked, again = validate_corpus(corpus, REGISTRY, "mark")
    assert again.to_json() | {"on_invalid": "drop"} == data
    assert [s.id for s in marked.samples] == [s.id for s in CORPUS.samples]
    assert {s.id: s.meta.invalid for s in marked.samples if s.meta.invalid} == {sample.id: (cause,)}


def test_every_kind_of_noise_at_once_is_counted_exactly():
    kinds = sorted([*CALL_FAULTS, "incompatible_version"], key=lambda k: not k.startswith("code_"))  # few run_code samples: first
    cause_of = {"code_wrong_type": "wrong_type", "code_unknown_tool": "unknown_tool"}
    rng, samples, target = random.Random(0), list(CORPUS.samples), {}
    for kind in kinds:
        index, bad = next((i, b) for i, s in enumerate(samples) if i not in target.values() and (b := plant(s, kind, REGISTRY, rng)))
        samples[index], target[kind] = bad, index
    _, report = validate_corpus(CORPUS.replace(samples=tuple(samples)), REGISTRY)
    assert (report.total, report.invalid) == (14, len(kinds))
    assert report.by_cause == Counter(cause_of.get(k, k) for k in kinds)
    for kind, index in target.items():
        found = {f.cause for _, findings in check_sample(samples[index], REGISTRY) for f in findings}
        assert found == {cause_of.get(kind, kind)}, (kind, samples[index].id)


def test_noise_rate_plants_that_fraction_and_validation_counts_it():
    noisy = plant_noise(CORPUS, REGISTRY, 0.5, 3)
    assert sum(a != b for a, b in zip(noisy.samples, CORPUS.samples)) == 7
    _, report = validate_corpus(noisy, REGISTRY)
    assert report.invalid == 7 and set(report.by_cause) <= set(CAUSES)
    assert plant_noise(CORPUS, REGISTRY, 0.5, 3) == noisy


def _first_call(sample: Sample) -> tuple[int, object]:
    index = next(i for i, m in enumerate(sample.messages) if find_blocks(m.content))
    return index, find_blocks(sample.messages[index].content)[0]


@settings(max_examples=120, deadline=None)
@given(sample=st.sampled_from(WITH_CALLS), data=st.data())
def test_truncating_a_calls_json_anywhere_is_truncated_json(sample, data):
    index, block = _first_call(sample)
    content = sample.messages[index].content
    body = block.text.strip()
    cut = data.draw(st.integers(0, len(body) - 1))
    start = block.start + block.text.index(body)
    broken = content[:start] + body[:cut] + "\n" + content[block.end:]
    messages = sample.messages[:index] + (Message("assistant", broken),) + sample.messages[index + 1:]
    findings = [f for _, fs in check_sample(sample.model_copy(update={"messages": messages}), REGISTRY) for f in fs]
    assert [f.cause for f in findings] == ["truncated_json"]
    name = json.loads(body)["name"]
    assert findings[0].tool == (name if f'"name": "{name}"' in body[:cut] else None)


@settings(max_examples=80, deadline=None)
@given(sample=st.sampled_from(WITH_CALLS), data=st.data())
def test_a_message_cut_inside_a_call_is_never_valid(sample, data):
    index, block = _first_call(sample)
    content = sample.messages[index].content
    cut = data.draw(st.integers(block.start, block.end + len(CLOSE) - 1))  # from just after <tool_call>
    messages = sample.messages[:index] + (Message("assistant", content[:cut]),) + sample.messages[index + 1:]
    causes = {f.cause for _, fs in check_sample(sample.model_copy(update={"messages": messages}), REGISTRY) for f in fs}
    assert causes and causes <= {"truncated_json", "unclosed_tool_call"}, content[:cut]


def test_unknown_on_invalid_is_refused():
    with pytest.raises(DataError, match="expected 'drop' or 'mark', found 'keep'"):
        validate_corpus(CORPUS, REGISTRY, "keep")


def test_cli_validate_data_writes_corpus_and_report(tmp_path, capsys):
    samples = list(CORPUS.samples)
    samples[0] = planted(samples[0], tool_call("get_weather", {"city": 42}))
    samples[1] = planted(samples[1], tool_schema_version="1.0")
    CORPUS.replace(samples=tuple(samples)).save(tmp_path / "in")
    registry = str(REPO / "contracts/tool_registry.json")
    assert main(["validate-data", str(tmp_path / "in"), "--registry", registry, "--out", str(tmp_path / "out"), "--on-invalid", "mark"]) == 0
    printed = capsys.readouterr().out
    assert "14 samples, 2 invalid (corruption rate 14.3%, marked); by cause: incompatible_version 1, wrong_type 1" in printed
    report = json.loads((tmp_path / "out/validation_report.json").read_text())
    assert (report["invalid"], report["by_cause"]) == (2, {"incompatible_version": 1, "wrong_type": 1})
    assert sum(1 for s in Corpus.load(tmp_path / "out").samples if s.meta.invalid) == 2

    assert main(["validate-data", str(tmp_path / "in"), "--registry", registry, "--out", str(tmp_path / "dropped"), "--report", str(tmp_path / "r.json")]) == 0
    assert len(Corpus.load(tmp_path / "dropped").samples) == 12 and json.loads((tmp_path / "r.json").read_text())["on_invalid"] == "drop"

    (tmp_path / "in/corpus.jsonl").write_text("{not json\n")
    assert main(["validate-data", str(tmp_path / "in"), "--registry", registry, "--out", str(tmp_path / "x")]) == 2
    assert "kdtrain: error: " in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
