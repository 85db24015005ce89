"""ablations.yaml fails on the right item: no stored baseline, an experiment whose metric
regressed (a supervision signal that broke), sample outputs that changed, results run with
another protocol; and passes on the real results once their baselines are stored."""

from __future__ import annotations

import json

import numpy as np
import yaml

RESULTS = "ablations/results.json"


def _update(workspace):
    result = workspace.run("--snapshot-update", "-m", "ablations")
    result.assert_outcomes(passed=4)
    return sorted(p.name for p in (workspace.pytester.path / "golden/ablations").iterdir())


def test_the_real_results_pass_against_the_baselines_they_wrote(workspace):
    assert _update(workspace) == ["baseline[base_kd].json", "baseline[kd_tool].json", "baseline[kd_tool_length_halt].json"]
    result = workspace.run("-m", "ablations")
    assert result.ret == 0
    result.stdout.fnmatch_lines(["passed  ablations.yaml::baseline *3 passed", "passed  ablations.yaml::protocol *1 passed"],
                                consecutive=False)


def test_a_missing_baseline_fails_and_says_how_to_write_it(workspace):
    result = workspace.run("-m", "ablations")
    assert workspace.failed(result) == {"baseline[base_kd]", "baseline[kd_tool]", "baseline[kd_tool_length_halt]"}
    result.stdout.fnmatch_lines(["*found:    none (write it with: pytest --kd-contracts … -m ablations --snapshot-update)"])


def test_a_regressed_tool_metric_fails_only_that_experiment(workspace):
    _update(workspace)

    def broken_tool_supervision(results):
        metrics = results["experiments"]["kd_tool"]["metrics"]
        metrics["tool_name"] *= 1.5

    workspace.edit_json(RESULTS, broken_tool_supervision)
    result = workspace.run("-m", "ablations")
    assert workspace.failed(result) == {"baseline[kd_tool]"}
    result.stdout.fnmatch_lines(["*ablation kd_tool against its baseline*", "*metric tool_name: *, baseline * (allowed ±*)"])


def test_changed_sample_outputs_fail(workspace):
    _update(workspace)

    def other_tokens(results):
        for sample in results["experiments"]["base_kd"]["samples"]:
            sample["tokens"] = [t + 1 for t in sample["tokens"]]

    workspace.edit_json(RESULTS, other_tokens)
    result = workspace.run("-m", "ablations")
    assert workspace.failed(result) == {"baseline[base_kd]"}
    result.stdout.fnmatch_lines(["*sample *: 0% of greedy tokens as the baseline's (need 50%)*"])


def test_results_of_another_protocol_fail_the_protocol_item(workspace):
    contract = workspace.contracts / "ablations.yaml"
    data = yaml.safe_load(contract.read_text())
    data["protocol"]["steps"] = 99
    contract.write_text(yaml.safe_dump(data))
    result = workspace.run("-k", "protocol", "-m", "ablations")
    assert workspace.failed(result) == {"protocol"}
    result.stdout.fnmatch_lines(["*expected: experiments [[]*[]] run with protocol {*'steps': 99*",
                                 "*re-run: kdtrain pipeline --stages ablations*"])


def test_the_experiments_differ_in_their_terms_and_the_metrics_are_finite(reference_artifacts):
    results = json.loads((reference_artifacts / RESULTS).read_text())
    experiments = results["experiments"]
    assert [e["terms"] for e in experiments.values()] == [
        ["kl", "ce"], ["kl", "ce", "tool_name", "tool_args", "tool_integration"],
        ["kl", "ce", "tool_name", "tool_args", "tool_integration", "length", "halt"]]
    assert all(np.isfinite(list(e["metrics"].values())).all() for e in experiments.values())
    assert experiments["base_kd"]["train_loss"] != experiments["kd_tool"]["train_loss"]
    assert (reference_artifacts / "ablations/metrics.png").read_bytes()[:4] == b"\x89PNG"
