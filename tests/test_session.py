"""How a run of the plugin starts and reports: one clear error when the artifacts are not
built, the contracts collected from the ini option, the same verdicts under pytest-xdist."""

from __future__ import annotations

import shutil

import pytest


def test_missing_artifacts_is_one_error_naming_the_command_that_builds_them(pytester, test_contracts):
    contracts = pytester.path / "contracts"
    shutil.copytree(test_contracts, contracts)
    result = pytester.runpytest_inprocess("--kd-contracts", str(contracts), "--kd-artifacts", str(pytester.path / "nowhere"),
                                          "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([
        "*kdcontracts: the artifacts that * verifies are not there:",
        "*nowhere/manifest.json: expected an artifacts manifest, found no such file*",
        "*Build them first (`make demo`*or name a built folder with --kd-artifacts DIR.",
    ])
    assert "FAILED" not in result.stdout.str()


def test_collect_only_needs_no_artifacts(pytester, test_contracts):
    contracts = pytester.path / "contracts"
    shutil.copytree(test_contracts, contracts)
    result = pytester.runpytest_inprocess("--kd-contracts", str(contracts), "--kd-artifacts", str(pytester.path / "nowhere"),
                                          "-p", "no:cacheprovider", "--collect-only", "-q", "-k", "single_token")
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["contracts/tokens.json::single_token[[]*"])


def test_ini_option_collects_the_contracts_when_no_paths_are_given(pytester, test_contracts):
    shutil.copytree(test_contracts, pytester.path / "contracts")
    pytester.makeini("[pytest]\nkd_contracts = contracts\n")
    (pytester.path / "tests").mkdir()
    (pytester.path / "tests/test_plain.py").write_text("def test_plain():\n    pass\n")
    contracts = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--collect-only", "-q", "-m", "golden")
    contracts.stdout.fnmatch_lines(["contracts/coreml_contract.json::golden[[]prefill-64[]]"])
    # Naming tests/ runs the project's own tests alone, without needing the artifacts.
    plain = pytester.runpytest_inprocess("-p", "no:cacheprovider", "tests")
    plain.assert_outcomes(passed=1)
    assert "kdcontracts: contracts" not in plain.stdout.str()


def test_xdist_gives_the_same_verdicts_and_summary(workspace):
    workspace.edit_json("tokenizers/runtime/tokenizer.json", lambda t: t["added_tokens"].pop())  # a planted fault
    # Cheap families, one of them (gates) reporting figures for the summary from its workers.
    selection = ("-k", "tokens.json or tool_registry or gates.yaml", "-q")
    serial, parallel = workspace.run(*selection), workspace.run(*selection, "-n", "2")
    assert workspace.failed(serial) and workspace.failed(parallel) == workspace.failed(serial)
    # xdist deselects in its workers, so only the serial run counts the deselected items
    assert {k: v for k, v in serial.parseoutcomes().items() if k != "deselected"} == parallel.parseoutcomes()
    summary = [line for line in serial.outlines if line.startswith(("passed ", "FAILED ", "contracts: "))]
    assert summary and all(line in parallel.outlines for line in summary)
    figures = [line for line in serial.outlines if line.startswith("gate ")]  # reported by items, gathered from the workers
    assert figures and sorted(figures) == sorted(line for line in parallel.outlines if line.startswith("gate "))
