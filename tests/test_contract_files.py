"""A malformed contract file is a collection error naming the file, the key path, what was
expected and what was found: never a plugin traceback, never a silent skip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from kdcontracts.errors import ContractFileError
from kdcontracts.loader import load_contract, schema_validator
from schema_faults import apply, fault_strategy, faults

REPO = Path(__file__).resolve().parents[1]
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
