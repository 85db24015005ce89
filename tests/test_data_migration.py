"""Data written for tool schema 1.0 (tool ``weather``, field ``location``) is refused by the 2.0
runtime, migrated through the declared steps into data that validates, and migrating again
changes nothing (same bytes, same dataset_version); a version with no path is an error."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from kdcontracts.models.tokens import Message
from kdcontracts.models.tool_registry import Migration, RenameField, RenameTool
from kdtrain.cli import main
from kdtrain.data.corpus import CORPUS_JSON, CORPUS_JSONL, Corpus, Eligibility, Sample, SampleMeta
from kdtrain.data.migrate import migrate_code, migrate_corpus
from kdtrain.data.registry import load_registry
from kdtrain.data.templates import tool_call
from kdtrain.data.validate import require_compatible, validate_corpus
from kdtrain.errors import DataError

REPO = Path(__file__).resolve().parents[1]
REGISTRY = load_registry(REPO / "contracts/tool_registry.json")

V1_CODE = '''# compare two cities
a = weather(location="Oslo")
b = weather(
    location="Lima",
)
print(max(a["temperature"], b["temperature"]))  # weather(location=...) in a comment stays
'''


def v1_sample(index: int, scenario: str, *assistant: str, version: str = "1.0") -> Sample:
    meta = SampleMeta(tool_schema_version=version, orchestrator_version="1.0", scenario=scenario,
                      eligible=Eligibility(code_mode=scenario in ("multi_step", "code_mode")), seed=0)
    messages = [Message("user", "What's the weather?")]
    for content in assistant:
        messages += [Message("assistant", content), Message("tool", '{"temperature": 12}')]
    return Sample(id=f"{scenario}-{index:04d}", messages=(*messages, Message("assistant", "Done.")), meta=meta)


def v1_corpus() -> Corpus:
    samples = (
        v1_sample(0, "single_call", tool_call("weather", {"location": "Paris"})),
        v1_sample(1, "single_call", "<think>Fahrenheit asked.</think>" + tool_call("weather", {"location": "Denver", "unit": "fahrenheit"})),
        v1_sample(2, "multi_step", tool_call("search_flights", {"to": "FCO"}), tool_call("weather", {"location": "Rome"})),
        v1_sample(3, "code_mode", tool_call("run_code", {"code": V1_CODE})),
        v1_sample(4, "plain_thinking", "<think>No tool needed.</think>Hello."),
    )
    return Corpus(samples, "1.0", "1.0", 0)


def test_v1_corpus_is_refused_by_require_compatible():
    with pytest.raises(DataError) as info:
        require_compatible(v1_corpus(), REGISTRY, "corpus v1")
    message = str(info.value)
    assert message.startswith("corpus v1: at samples[].meta: expected versions compatible with the target runtime's")
    assert "5 incompatible: single_call-0000: tool_schema_version '1.0' (runtime 2.0); single_call-0001:" in message
    _, report = validate_corpus(v1_corpus(), REGISTRY)
    assert report.by_cause == {"incompatible_version": 5}


def test_migration_rewrites_calls_and_then_validates():
    migrated, report = migrate_corpus(v1_corpus(), REGISTRY)
    by = {s.id: s for s in migrated.samples}
    assert by["single_call-0000"].messages[1].content == tool_call("get_weather", {"city": "Paris", "unit": "celsius"})
    assert by["single_call-0001"].messages[1].content == "<think>Fahrenheit asked.</think>" + tool_call("get_weather", {"city": "Denver", "unit": "fahrenheit"})
    assert by["multi_step-0002"].messages[1].content == tool_call("search_flights", {"to": "FCO"})
    code = json.loads(by["code_mode-0003"].messages[1].content.split("\n")[1])["arguments"]["code"]
    assert code == '''# compare two cities
a = get_weather(city="Oslo", unit="celsius")
b = get_weather(
    city="Lima", unit="celsius"
)
print(max(a["temperature"], b["temperature"]))  # weather(location=...) in a comment stays
'''
    assert {s.meta.tool_schema_version for s in migrated.samples} == {"2.0"}
    assert (migrated.dataset_version, migrated.tool_schema_version) == (2, "2.0")
    assert report.to_json() == {
        "target": "2.0", "dataset_version": {"before": 1, "after": 2}, "samples": {"1.0 -> 2.0": 5},
        "calls": {"rename_tool weather -> get_weather": 5, "rename_field get_weather.location -> get_weather.city": 5,
                  "add_field get_weather.unit = 'celsius'": 4},
    }
    require_compatible(migrated, REGISTRY, "migrated")
    _, validation = validate_corpus(migrated, REGISTRY)
    assert (validation.invalid, validation.total) == (0, 5)


def test_migrating_twice_is_byte_identical(tmp_path):
    once, _ = migrate_corpus(v1_corpus(), REGISTRY)
    twice, report = migrate_corpus(once, REGISTRY)
    assert twice is once and not report.changed and report.samples == {}
    once.save(tmp_path / "once")
    twice.save(tmp_path / "twice")
    for name in (CORPUS_JSONL, CORPUS_JSON):
        assert (tmp_path / "once" / name).read_bytes() == (tmp_path / "twice" / name).read_bytes()
    assert json.loads((tmp_path / "twice" / CORPUS_JSON).read_text())["dataset_version"] == 2


@pytest.mark.parametrize("version", ["0.9", "3.0", "2.1"])
def test_version_without_a_path_names_sample_and_versions(version):
    corpus = v1_corpus()
    corpus = corpus.replace(samples=corpus.samples[:2] + (v1_sample(7, "single_call", tool_call("weather", {"location": "Oslo"}), version=version),))
    with pytest.raises(DataError) as info:
        migrate_corpus(corpus, REGISTRY)
    assert str(info.value) == (f"sample single_call-0007: at meta.tool_schema_version: expected a version compatible with 2.0 or with a "
                               f"migration path to it (declared in {REGISTRY.file}: ['1.0 -> 2.0']), found '{version}'")


def test_a_chain_of_migrations_applies_in_order():
    registry = replace(REGISTRY, tool_schema_version="3.0",
                       migrations=REGISTRY.migrations + (Migration("2.0", "3.0", (RenameField("get_weather", "unit", "units"), RenameTool("get_weather", "weather_now"))),))
    migrated, report = migrate_corpus(v1_corpus(), registry)
    assert migrated.samples[0].messages[1].content == tool_call("weather_now", {"city": "Paris", "units": "celsius"})
    assert report.samples == {"1.0 -> 3.0": 5}
    assert migrated.samples[0].meta.tool_schema_version == "3.0"


def test_code_keywords_named_like_python_keywords():
    step = RenameField("convert_currency", "source", "from")
    code, changed = migrate_code('x = convert_currency(amount=3, source="EUR", to="JPY")\n', step)
    assert (code, changed) == ('x = convert_currency(amount=3, from_="EUR", to="JPY")\n', 1)
    assert migrate_code("not python (", step) == ("not python (", 0)


def test_cli_migrate_data(tmp_path, capsys):
    v1_corpus().save(tmp_path / "v1")
    registry = str(REPO / "contracts/tool_registry.json")
    assert main(["migrate-data", str(tmp_path / "v1"), "--registry", registry, "--out", str(tmp_path / "v2")]) == 0
    assert "migrated to tool schema 2.0 (1.0 -> 2.0: 5); dataset_version 1 -> 2" in capsys.readouterr().out
    assert main(["migrate-data", str(tmp_path / "v2"), "--registry", registry, "--out", str(tmp_path / "v2again")]) == 0
    assert "(nothing to migrate); dataset_version 2 -> 2" in capsys.readouterr().out
    assert (tmp_path / "v2" / CORPUS_JSONL).read_bytes() == (tmp_path / "v2again" / CORPUS_JSONL).read_bytes()
    assert main(["migrate-data", str(tmp_path / "missing"), "--registry", registry, "--out", str(tmp_path / "x")]) == 2
