"""A malformed contract file is a collection error naming the file, the key path, what was
expected and what was found: never a plugin traceback, never a silent skip."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from kdcontracts.errors import ContractFileError
from kdcontracts.families import FAMILIES, load
from kdcontracts.loader import load_contract, schema_validator
from schema_faults import apply, fault_strategy, faults

REPO = Path(__file__).resolve().parents[1]
# The plugin's report header imports numpy; an in-process pytest run forgets the modules first
# imported inside it, and numpy cannot be imported twice in one process: import it out here.
importlib.import_module("numpy")
TOKENS = json.loads((REPO / "contracts/tokens.json").read_text(encoding="utf-8"))
TOKENS_SCHEMA = schema_validator("tokens.schema.json").schema


def test_reference_contracts_are_valid():
    load_contract(REPO / "contracts/tokens.json", "tokens.schema.json")
    load_contract(REPO / "contracts/manifest.json", "manifest.schema.json")


def test_fault_generator_covers_the_issue_list():
    kinds = {(f.kind, f.key_path) for f in faults(TOKENS, TOKENS_SCHEMA)}
    assert ("delete", "special_tokens[0].ids") in kinds  # a missing key
    assert ("replace", "special_tokens[0].ids.teacher") in kinds  # an id that is not an integer
    assert ("replace", "tokenizers[0]") in kinds  # an unknown tokenizer name
    assert ("replace", "round_trip_prompts") in kinds  # an emptied list


@settings(max_examples=150, deadline=None)
@given(fault=fault_strategy(TOKENS, TOKENS_SCHEMA))
def test_every_planted_fault_is_reported_at_its_key(fault, tmp_path_factory):
    path = tmp_path_factory.mktemp("c") / "tokens.json"
    path.write_text(json.dumps(apply(TOKENS, fault)), encoding="utf-8")
    with pytest.raises(ContractFileError) as info:
        load_contract(path, "tokens.schema.json")
    reported = {p.key_path for p in info.value.problems}
    assert fault.key_path in reported, (fault, str(info.value))
    assert all(p.expected and p.found for p in info.value.problems)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fault=fault_strategy(TOKENS, TOKENS_SCHEMA))
def test_malformed_tokens_json_is_a_collection_error_through_pytest(pytester, fault):
    folder = pytester.path / "contracts"
    folder.mkdir(exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps({"contract_version": 1, "artifacts": "../artifacts"}))
    (folder / "tokens.json").write_text(json.dumps(apply(TOKENS, fault), indent=2))
    result = pytester.runpytest_inprocess("--kd-contracts", str(folder), "-p", "no:cacheprovider", "--collect-only")
    result.assert_outcomes(errors=1)
    text = result.stdout.str()
    assert "contracts/tokens.json: invalid contract file" in text
    assert f"at {fault.key_path}: expected " in text and ", found " in text
    assert "Traceback" not in text and "site-packages" not in text


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"contract_version": 1,', "at (document): expected valid JSON, found Expecting property name enclosed in double quotes at line 1 column 24"),
        ('{"a": 1, "a": 2}', "at (document): expected unique keys in every object, found duplicate key 'a'"),
        ("[]", "at (top level): expected object, found [] (array)"),
    ],
)
def test_unparsable_contract_names_what_and_where(tmp_path, text, expected):
    path = tmp_path / "tokens.json"
    path.write_text(text)
    with pytest.raises(ContractFileError, match=".*") as info:
        load_contract(path, "tokens.schema.json")
    assert expected in str(info.value)


def test_integer_ids_written_as_floats_are_rejected(tmp_path):
    doc = json.loads(json.dumps(TOKENS))
    doc["special_tokens"][0]["ids"]["student"] = 1.0
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ContractFileError) as info:
        load_contract(path, "tokens.schema.json")
    assert "at special_tokens[0].ids.student: expected integer or null, found 1.0 (number)" in str(info.value)


def test_cross_references_are_checked(workspace):
    def break_refs(doc):
        doc["tokenizers"] = ["teacher", "student"]
        doc["special_tokens"][1]["roles"] = ["eos"]

    workspace.edit_contract("tokens.json", break_refs)
    result = workspace.run("--collect-only")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([
        "*at special_tokens[[]0[]].ids.runtime: expected a tokenizer listed in tokenizers [[]'teacher', 'student'[]], found 'runtime'",
        "*at fingerprints.runtime: expected a tokenizer listed in tokenizers*",
        "*at special_tokens: expected exactly one token with role 'pad', found 0: [[][]]",
    ])


def test_unknown_contract_file_is_an_error_not_ignored(workspace):
    (workspace.contracts / "token.json").write_text("{}")
    result = workspace.run("--collect-only")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*token.json: invalid contract file", "*at (file name): expected one of [[]*'tokens.json'*[]], found 'token.json'"])


def test_bad_yaml_reports_line_and_column(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("a: [1, 2\nb: 3\n")
    from kdcontracts.loader import parse_document

    with pytest.raises(ContractFileError) as info:
        parse_document(path)
    assert "expected valid YAML, found" in str(info.value) and "line 2" in str(info.value)


YAML_CONTRACTS = [f.file_name for f in FAMILIES if f.file_name.endswith(".yaml")]


@pytest.mark.parametrize("name", YAML_CONTRACTS)
def test_a_duplicate_yaml_key_names_the_key_and_both_lines(tmp_path, name):
    shutil.copytree(REPO / "contracts", tmp_path, dirs_exist_ok=True)
    path = tmp_path / name
    lines = path.read_text(encoding="utf-8").splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("contract_version:"))
    path.write_text("\n".join(lines + ["contract_version: 2"]) + "\n", encoding="utf-8")
    with pytest.raises(ContractFileError) as info:
        load(path)
    expected = f"at contract_version: expected unique keys in every mapping, found 'contract_version' at line {first + 1} and again at line {len(lines) + 1}"
    assert expected in str(info.value)


def test_a_duplicate_key_inside_a_nested_mapping_is_refused(tmp_path):
    path = tmp_path / "ablations.yaml"
    path.write_text("contract_version: 1\ntolerance:\n  metric_rel: 0.1\n  metric_abs: 0.02\n  metric_rel: 0.5\n")
    with pytest.raises(ContractFileError, match="found 'metric_rel' at line 3 and again at line 5"):
        load(path)


def test_overriding_a_merged_key_is_not_a_duplicate(tmp_path):
    from kdcontracts.loader import parse_document

    path = tmp_path / "x.yaml"
    path.write_text("base: &b {a: 1, b: 2}\nderived:\n  <<: *b\n  a: 3\n")
    assert parse_document(path)["derived"] == {"a": 3, "b": 2}


def test_duplicate_yaml_key_is_a_collection_error_through_pytest(pytester):
    folder = pytester.path / "contracts"
    shutil.copytree(REPO / "contracts", folder)
    path = folder / "precision_islands.yaml"
    text = path.read_text(encoding="utf-8")
    line = text.splitlines().index("contract_version: 1") + 1
    path.write_text(text + "contract_version: 1\n", encoding="utf-8")
    result = pytester.runpytest_inprocess("--kd-contracts", str(folder), "-p", "no:cacheprovider", "--collect-only")
    result.assert_outcomes(errors=1)
    text = result.stdout.str()
    assert "contracts/precision_islands.yaml: invalid contract file" in text
    assert f"found 'contract_version' at line {line} and again at line {len(path.read_text().splitlines())}" in text
    assert "Traceback" not in text


# Every path a contract names, as (file, key path, how to plant a NUL byte in it).
NUL_PATHS = [
    ("manifest.json", "artifacts", lambda d: d.update(artifacts="../arti\x00facts")),
    ("coreml_contract.json", "golden.dir", lambda d: d["golden"].update(dir="../gol\x00den")),
    ("ablations.yaml", "baselines.dir", lambda d: d["baselines"].update(dir="../gol\x00den")),
]


def _plant(folder: Path, name: str, edit) -> Path:
    import yaml

    path = folder / name
    doc = json.loads(path.read_text()) if name.endswith(".json") else yaml.safe_load(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc) if name.endswith(".json") else yaml.safe_dump(doc), encoding="utf-8")
    return path


@pytest.mark.parametrize("name, key, edit", NUL_PATHS, ids=[f"{n}:{k}" for n, k, _ in NUL_PATHS])
def test_a_nul_byte_in_a_path_is_a_located_error(tmp_path, name, key, edit):
    shutil.copytree(REPO / "contracts", tmp_path, dirs_exist_ok=True)
    path = _plant(tmp_path, name, edit)
    with pytest.raises(ContractFileError) as info:
        load(path)
    assert f"at {key}: expected a file-system path, found " in str(info.value) and "null byte" in str(info.value)


def test_a_nul_byte_in_the_artifacts_path_is_a_collection_error_through_pytest(pytester):
    folder = pytester.path / "contracts"
    shutil.copytree(REPO / "contracts", folder)
    for name in ("coreml_contract.json", "export_lint.yaml", "precision_islands.yaml", "quant_recipe.yaml",
                 "tokens.json", "tool_registry.json", "distill_data.yaml", "ablations.yaml", "runtime_budget.yaml",
                 "speculative.yaml"):
        (folder / name).unlink()
    _plant(folder, "manifest.json", NUL_PATHS[0][2])
    result = pytester.runpytest_inprocess("--kd-contracts", str(folder), "-p", "no:cacheprovider", "--collect-only")
    result.assert_outcomes(errors=1)
    text = result.stdout.str()
    assert "contracts/manifest.json: invalid contract file" in text and "at artifacts: expected a file-system path" in text
    assert "Traceback" not in text and "ValueError" not in text
