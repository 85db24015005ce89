"""``tool_registry.json``: a malformed file is a collection error at its key path (schema and
cross-references), and its items pass on the corpus the data stage builds and fail, on the
right item with a readable message, for each planted fault."""

from __future__ import annotations

import copy
import importlib
import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from kdcontracts.errors import ContractFileError
from kdcontracts.families import family_for
from kdcontracts.loader import load_contract, schema_validator
from kdcontracts.models.distill_data import CorpusSettings
from kdcontracts.models.tokens import Message
from kdcontracts.models.tool_registry import ToolRegistry
from kdtrain.artifact_table import DATA_CORPUS, DATA_RAW, DATA_VALIDATION_REPORT
from kdtrain.artifacts import ArtifactsFolder
from kdtrain.data.calls import find_blocks
from kdtrain.data.corpus import CORPUS_JSONL, Corpus, Eligibility
from kdtrain.data.stage import stage_data
from kdtrain.stage import StageContext
from schema_faults import apply, fault_strategy, faults

REPO = Path(__file__).resolve().parents[1]
FILE = "tool_registry.json"
REGISTRY = json.loads((REPO / "contracts" / FILE).read_text(encoding="utf-8"))
SCHEMA = schema_validator("tool_registry.schema.json").schema
# The plugin's report header imports numpy; an in-process pytest run forgets the modules first
# imported inside it, and numpy cannot be imported twice in one process: import it out here.
importlib.import_module("numpy")
ITEMS = {"corpus_versions", "scenario_coverage", "corpus_calls[unregistered]", *(f"corpus_calls[{t['name']}]" for t in REGISTRY["tools"])}


def load(tmp_path: Path, doc: dict):
    path = tmp_path / FILE
    path.write_text(json.dumps(doc), encoding="utf-8")
    return family_for(path).load(path)


def test_reference_registry_loads_typed(tmp_path):
    registry = load(tmp_path, REGISTRY)
    assert isinstance(registry, ToolRegistry)
    assert (registry.tool_schema_version, registry.orchestrator_version) == ("2.0", "1.0")
    assert registry.names == ("get_weather", "search_flights", "convert_currency", "lookup_customer", "send_email", "fetch_document", "run_code")
    assert [(m.source, m.target, len(m.steps)) for m in registry.migrations] == [("1.0", "2.0", 3)]


def test_fault_generator_reaches_tools_and_migration_steps():
    kinds = {(f.kind, f.key_path) for f in faults(REGISTRY, SCHEMA)}
    assert ("delete", "tools[0].parameters.required") in kinds
    assert ("replace", "tools[0].parameters.properties.city") in kinds
    assert ("delete", "migrations[0].steps[0].rename_tool.from") in kinds
    assert ("replace", "tool_schema_version") in kinds


@settings(max_examples=120, deadline=None)
@given(fault=fault_strategy(REGISTRY, SCHEMA))
def test_every_planted_schema_fault_is_reported_at_its_key(fault, tmp_path_factory):
    path = tmp_path_factory.mktemp("c") / FILE
    path.write_text(json.dumps(apply(REGISTRY, fault)), encoding="utf-8")
    with pytest.raises(ContractFileError) as info:
        load_contract(path, "tool_registry.schema.json")
    assert fault.key_path in {p.key_path for p in info.value.problems}, (fault, str(info.value))
    assert all(p.expected and p.found for p in info.value.problems)


def _edit(change) -> dict:
    doc = copy.deepcopy(REGISTRY)
    change(doc)
    return doc


def _step(doc: dict, index: int) -> dict:
    return next(iter(doc["migrations"][0]["steps"][index].values()))


CROSS_REFERENCE_FAULTS = [
    ("bad_parameters_schema", lambda d: d["tools"][0]["parameters"]["properties"]["city"].update(type="strng"),
     "at tools[0].parameters.properties.city.type: expected a valid JSON Schema (draft 2020-12), found 'strng' is not valid under any of the given schemas"),
    ("duplicate_tool", lambda d: d["tools"][1].update(name="get_weather"),
     "at tools[1].name: expected a name not used before (also at tools[0]), found 'get_weather'"),
    ("required_not_a_property", lambda d: d["tools"][0]["parameters"]["required"].append("country"),
     "at tools[0].parameters.required[1]: expected a key of parameters.properties ['city', 'unit'], found 'country'"),
    ("chain_not_ending_at_current", lambda d: d["migrations"][0].update(to="1.5"),
     "at migrations[0].to: expected a version on the chain ending at tool_schema_version '2.0' (reachable: ['2.0']), found '1.5'"),
    ("migration_backwards", lambda d: d["migrations"][0].update({"from": "2.0", "to": "1.0"}),
     "at migrations[0].from: expected a version older than its 'to' (1.0), found '2.0'"),
    ("field_step_names_old_tool", lambda d: _step(d, 1).update(tool="weather"),
     "at migrations[0].steps[1].rename_field.tool: expected a tool of version 2.0 after this step ['convert_currency', 'fetch_document', 'get_weather', "),
    ("steps_out_of_order", lambda d: d["migrations"][0]["steps"].reverse(),
     "at migrations[0].steps[1].rename_field.tool: expected a tool of version 2.0 after this step ['convert_currency', 'fetch_document', "
     "'lookup_customer', 'run_code', 'search_flights', 'send_email', 'weather'], found 'get_weather'"),
    ("added_field_missing", lambda d: _step(d, 2).update(field="units"),
     "at migrations[0].steps[2].add_field.field: expected a field of get_weather at version 2.0 ['city', 'unit'], found 'units'"),
    ("default_invalid", lambda d: _step(d, 2).update(default="kelvin"),
     'at migrations[0].steps[2].add_field.default: expected a value valid for get_weather.unit {"enum": ["celsius", "fahrenheit"], '),
    ("renamed_to_unknown_tool", lambda d: _step(d, 0).update(to="get_forecast"),
     "at migrations[0].steps[0].rename_tool.to: expected a tool of version 2.0 after this step"),
]


@pytest.mark.parametrize("change, expected", [f[1:] for f in CROSS_REFERENCE_FAULTS], ids=[f[0] for f in CROSS_REFERENCE_FAULTS])
def test_cross_reference_fault_is_a_located_error(tmp_path, change, expected):
    with pytest.raises(ContractFileError) as info:
        load(tmp_path, _edit(change))
    assert expected in str(info.value), str(info.value)
    assert str(info.value).startswith(f"{tmp_path / FILE}: invalid contract file")


def test_a_longer_chain_of_migrations_is_accepted(tmp_path):
    older = {"from": "0.9", "to": "1.0", "steps": [{"rename_field": {"tool": "weather", "from": "place", "to": "location"}}]}
    registry = load(tmp_path, _edit(lambda d: d["migrations"].insert(0, older)))
    assert [m.source for m in registry.migration_path("0.9")] == ["0.9", "1.0"]
    with pytest.raises(ContractFileError, match=r"migrations\[0\]\.steps\[0\]\.rename_field\.tool: expected a tool of version 1\.0 after this step \['convert_currency', 'fetch_document', "
                                                r"'lookup_customer', 'run_code', 'search_flights', 'send_email', 'weather'\], found 'get_weather'"):
        load(tmp_path, _edit(lambda d: d["migrations"].insert(0, {**older, "steps": [{"rename_field": {"tool": "get_weather", "from": "place", "to": "location"}}]})))


# -- the items, run through pytest on an artifacts folder the data stage built ------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """Contracts (manifest.json + tool_registry.json) and an artifacts folder with the data stage's output."""
    root = tmp_path_factory.mktemp("data")
    contracts = root / "contracts"
    contracts.mkdir()
    for name in ("manifest.json", FILE):
        shutil.copyfile(REPO / "contracts" / name, contracts / name)
    stage_data(StageContext(ArtifactsFolder.create(root / "artifacts"), contracts), CorpusSettings(samples_per_scenario=2, seed=11))
    return contracts, root / "artifacts"


class Run:
    def __init__(self, pytester: pytest.Pytester, built: tuple[Path, Path]):
        self.pytester = pytester
        self.contracts, self.artifacts = pytester.path / "contracts", pytester.path / "artifacts"
        shutil.copytree(built[0], self.contracts)
        shutil.copytree(built[1], self.artifacts)
        self.corpus_dir = ArtifactsFolder.open(self.artifacts).path(DATA_CORPUS)

    def edit_corpus(self, change) -> None:
        """Rewrite the corpus artifact consistently (its checksum still verifies): only the change is wrong."""
        corpus = Corpus.load(self.corpus_dir)
        corpus.replace(samples=tuple(change(list(corpus.samples)))).save(self.corpus_dir)

    def __call__(self) -> tuple[pytest.RunResult, set[str]]:
        result = self.pytester.runpytest_inprocess("--kd-contracts", str(self.contracts), "--kd-artifacts", str(self.artifacts),
                                                   "-p", "no:cacheprovider", "-m", "data")
        prefix = f"FAILED contracts/{FILE}::"
        return result, {line[len(prefix):].split(" - ")[0] for line in result.outlines if line.startswith(prefix)}


@pytest.fixture
def run(pytester, built) -> Run:
    return Run(pytester, built)


def _first_call_of(samples: list, tool: str) -> tuple[int, int, dict]:
    for i, sample in enumerate(samples):
        for j, message in enumerate(sample.messages):
            for block in find_blocks(message.content):
                if json.loads(block.text)["name"] == tool:
                    return i, j, json.loads(block.text)
    raise AssertionError(f"no call of {tool}")


def _with_call(samples: list, tool: str, change) -> list:
    i, j, envelope = _first_call_of(samples, tool)
    change(envelope)
    sample, old = samples[i], samples[i].messages[j].content
    block = next(b for b in find_blocks(old) if json.loads(b.text)["name"] == tool)
    content = old[: block.start] + "\n" + json.dumps(envelope) + "\n" + old[block.end:]
    samples[i] = sample.model_copy(update={"messages": sample.messages[:j] + (Message("assistant", content),) + sample.messages[j + 1:]})
    return samples


def test_items_pass_on_the_corpus_the_data_stage_built(run):
    result, failed = run()
    assert failed == set()
    result.assert_outcomes(passed=len(ITEMS))
    report = json.loads((run.artifacts / DATA_VALIDATION_REPORT.path).read_text())
    assert (report["total"], report["invalid"]) == (14, 0)


def test_noise_the_stage_plants_is_counted_and_kept_out_of_the_corpus(run, tmp_path):
    settings = CorpusSettings(samples_per_scenario=2, seed=11, noise=0.25, on_invalid="drop")
    stage_data(StageContext(ArtifactsFolder.open(run.artifacts), run.contracts), settings)
    folder = ArtifactsFolder.open(run.artifacts)
    report = json.loads(folder.path(DATA_VALIDATION_REPORT).read_text())
    assert (report["total"], report["invalid"], report["corruption_rate"]) == (14, 4, round(4 / 14, 6))
    assert sum(report["by_cause"].values()) >= 4 and set(report["by_cause"]) <= {"truncated_json", "unknown_tool", "missing_field", "wrong_type", "incompatible_version"}
    assert len(Corpus.load(folder.path(DATA_RAW)).samples) == 14 and len(Corpus.load(folder.path(DATA_CORPUS)).samples) == 10
    assert folder.manifest.stages["data"].settings["noise"] == 0.25
    assert folder.entry(DATA_CORPUS).kind == "corpus/jsonl" and folder.entry(DATA_VALIDATION_REPORT).kind == "report/data-validation"
    assert run()[1] == set()


def test_stale_sample_fails_corpus_versions(run):
    def stale(samples):
        samples[3] = samples[3].model_copy(update={"meta": samples[3].meta.model_copy(update={"tool_schema_version": "1.0"})})
        return samples

    run.edit_corpus(stale)
    result, failed = run()
    assert failed == {"corpus_versions"}
    result.stdout.fnmatch_lines([
        "*tool_registry.json: versions of the samples of data.corpus (*data/corpus)",
        "*expected: compatible with tool_schema_version 2.0 and orchestrator_version 1.0 (same major, minor <= the registry's)",
        "*found:    1 incompatible:",
        "*multi_step-0001: tool_schema_version '1.0'",
        "*migrate it (kdtrain migrate-data)",
    ])


def test_wrong_typed_get_weather_call_fails_its_item(run):
    run.edit_corpus(lambda samples: _with_call(samples, "get_weather", lambda e: e["arguments"].update(city=42)))
    result, failed = run()
    assert failed == {"corpus_calls[get_weather]"}
    result.stdout.fnmatch_lines([
        "*tool_registry.json: calls of get_weather in data.corpus*",
        "*expected: arguments valid against the parameters of get_weather",
        "*found:    1 invalid of * call(s):",
        "*: wrong_type: messages[[]*[]] <tool_call> #1: get_weather: at arguments.city: expected string, found 42",
    ])


def test_unknown_tool_fails_unregistered(run):
    run.edit_corpus(lambda samples: _with_call(samples, "lookup_customer", lambda e: e.update(name="crm_lookup")))
    result, failed = run()
    assert failed == {"corpus_calls[unregistered]"}
    result.stdout.fnmatch_lines([
        "*expected: only the registry's tools [[]'get_weather', 'search_flights', *[]]",
        "*found:    1 invalid of 1 call(s):",
        "*pii-0000: unknown_tool: messages[[]2[]] <tool_call> #1: at name: expected a tool of the registry *, found 'crm_lookup'",
    ])


def test_removed_scenario_and_wrong_eligibility_fail_scenario_coverage(run):
    def change(samples):
        first = samples[0].model_copy(update={"meta": samples[0].meta.model_copy(update={"eligible": Eligibility(code_mode=True)})})
        return [first] + [s for s in samples[1:] if s.meta.scenario != "plain_thinking"]

    run.edit_corpus(change)
    result, failed = run()
    assert failed == {"scenario_coverage"}
    result.stdout.fnmatch_lines([
        "*expected: every scenario [[]'single_call', *'plain_thinking'[]] present, code_mode eligible exactly for *",
        "*found:    no sample of scenario 'plain_thinking'",
        "*single_call-0000: scenario 'single_call' with eligible.code_mode True (expected False)",
    ])


def test_tampered_corpus_fails_every_item_with_the_checksum(run):
    path = run.corpus_dir / CORPUS_JSONL
    path.write_text(path.read_text().replace('"seed": 11', '"seed": 12', 1))
    result, failed = run()
    assert failed == ITEMS
    result.stdout.fnmatch_lines(["*corpus.jsonl: expected sha256 * (as corpus.json records), found sha256 *: the file changed after it was written"])
    assert "Traceback" not in result.stdout.str()


def test_samples_marked_invalid_are_not_held_against_the_corpus(run):
    def mark(samples):
        samples[0] = samples[0].model_copy(update={"meta": samples[0].meta.model_copy(update={"tool_schema_version": "1.0", "invalid": ("incompatible_version",)})})
        return samples

    run.edit_corpus(mark)
    assert run()[1] == set()


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fault=fault_strategy(REGISTRY, SCHEMA))
def test_malformed_registry_is_a_collection_error_through_pytest(pytester, fault):
    folder = pytester.path / "contracts"
    folder.mkdir(exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps({"contract_version": 1, "artifacts": "../artifacts"}))
    (folder / FILE).write_text(json.dumps(apply(REGISTRY, fault), indent=2))
    result = pytester.runpytest_inprocess("--kd-contracts", str(folder), "-p", "no:cacheprovider", "--collect-only")
    result.assert_outcomes(errors=1)
    text = result.stdout.str()
    assert f"contracts/{FILE}: invalid contract file" in text and f"at {fault.key_path}: expected " in text
    assert "Traceback" not in text
