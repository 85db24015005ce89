"""speculative.yaml through the plugin: every item passes on the reference artifacts and each
planted fault fails its own item (pytester): a drafter whose tokens are shifted by one
(acceptance collapses, exactness holds), a verifier that accepts a mismatching token (exactness
fails), a drafter whose halt head never fires (the segment bound fails); a report measured on
other packages or with other settings fails as stale; a pair the packages cannot honour does not
load. The faults are planted in copies of the teacher pair measured on torch in one stage run:
the teacher's forward is what costs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import yaml

from kdcontracts.errors import ContractFileError
from kdcontracts.families import load
from kdtrain.artifact_table import SPECULATIVE_REPORT
from kdtrain.runtime.backend import backend_name
from kdtrain.runtime.speculative_stage import Sides

from conftest import REPO

TEACHER_PAIR, SELF_PAIR = "student->teacher", "student->student"
LENGTHS = (64, 128)  # the test contracts' speculative lengths (tests/conftest.py), one prompt each


def test_every_speculative_item_passes_on_the_reference_artifacts(workspace):
    result, failed = workspace.run_family("speculative")
    assert failed == set() and result.ret == 0, result.stdout.str()
    out, package = result.stdout.str(), backend_name()
    for backend in (package, "torch"):
        assert f"PASSED contracts/speculative.yaml::self[{SELF_PAIR}-{backend}]" in out
        for length in LENGTHS:  # exact at every length, each on its own share of the prompts
            assert f"PASSED contracts/speculative.yaml::exact[{SELF_PAIR}-{length}-{backend}]" in out
    for item in ("acceptance", "segments"):
        assert f"PASSED contracts/speculative.yaml::{item}[{TEACHER_PAIR}-{package}]" in out
    # the summary: each run's exactness, each pool's figures
    assert f"speculative pair {TEACHER_PAIR} at L=64 [{package}]: 1/1 prompts token for token" in out
    assert f"speculative pair {TEACHER_PAIR} [{package}] over L=64/128: acceptance " in out and "per position [" in out


class _Planted:
    """A side with one of its calls changed: ``call`` is wrapped by ``change(result, *arguments)``."""

    def __init__(self, side, call: str, change):
        self.side, self.call, self.change = side, call, change

    def __getattr__(self, name):
        method = getattr(self.side, name)
        return (lambda *args: self.change(method(*args), *args)) if name == self.call else method


def _shifted(result, state, token):
    state, logits, halt = result
    return state, np.roll(logits, 1), halt  # every proposal is the drafter's choice + 1


def _never_halts(result, state, token):
    state, logits, halt = result
    return state, logits, 0.0


def _accepts_the_first_draft(result, state, tokens):
    state, logits, halt = result
    if len(tokens) > 1:  # its first row now agrees with the first draft, whatever the worker computed
        logits = logits.copy()
        logits[0, tokens[1]] = logits[0].max() + 1.0
    return state, logits, halt


# pair name -> the side and call the fault is planted in, and the items it must fail
FAULTS = {
    "shifted-drafter": ("drafter", "decode_step", _shifted, {"acceptance", "segments"}),  # its segments are all rejected too
    "accepting-verifier": ("worker", "verify", _accepts_the_first_draft, {"exact"}),
    "silent-halt-head": ("drafter", "decode_step", _never_halts, {"segments"}),
}


def test_each_planted_fault_fails_its_own_item(workspace, monkeypatch):
    """Three copies of the teacher pair, one fault planted in each, measured again on torch in one
    stage run (the teacher's plain decoding is shared): each fails its own items and stays exact
    unless the fault is in the verifier."""
    from kdtrain.pipeline import run_pipeline

    path = workspace.contracts / "speculative.yaml"
    contract = yaml.safe_load(path.read_text())
    teacher_pair = next(p for p in contract["pairs"] if p["name"] == TEACHER_PAIR)
    segments = dict(teacher_pair["segments"], max=4)  # a never-firing head's segments cost 4 drafts, not 7
    contract["pairs"] = [dict(teacher_pair, name=name, backends=["torch"], segments=segments) for name in FAULTS]
    path.write_text(yaml.safe_dump(contract, sort_keys=False))
    for role in ("drafter", "worker"):
        original = getattr(Sides, role)

        def planted(self, run, role=role, original=original):
            where, call, change, _ = FAULTS[run.pair.name]
            side = original(self, run)
            return _Planted(side, call, change) if where == role else side

        monkeypatch.setattr(Sides, role, planted)
    run_pipeline(workspace.artifacts, ["speculative"], workspace.contracts, REPO / "configs/distill_reference.yaml")

    result, failed = workspace.run_family("speculative")
    assert failed == {f"{item}[{name}-torch]" if item != "exact" else f"exact[{name}-{length}-torch]"
                      for name, (*_, items) in FAULTS.items() for item in items for length in LENGTHS}
    result.stdout.fnmatch_lines([
        "*speculative pair accepting-verifier at L=64 [[]torch[]], prompt *, new token *",
        "*expected: the worker's plain greedy token *",
        "*speculative pair shifted-drafter [[]torch[]] over L=64/128: acceptance[[]mean_accepted_length[]]",
        "*expected: mean_accepted_length >= 1.1",
        "*speculative pair silent-halt-head [[]torch[]] over L=64/128: segments[[]segment_accepted_fraction[]]",
    ])


def test_a_divergence_at_a_tie_fails_without_an_allowance_and_passes_within_one(workspace):
    """The MIL executor's verify equals its decode bit for bit (tests/test_mil_executor.py), so the
    reference contract allows no tie there, nor on torch: a divergence fails even at an exact tie
    (margin 0, which a bit-exact verify could not have broken). Only Core ML, whose verify and decode are different device programs, has one."""
    assert load(REPO / "contracts/speculative.yaml").tie_tolerance == {"coreml": 0.125, "mil-reference": 0.0, "torch": 0.0}
    package = backend_name()

    def diverge(report):
        run = next(r for r in report["runs"] if r["pair"] == SELF_PAIR and r["backend"] == package)
        prompt = run["prompts"][0]
        tokens = prompt["speculative"]["tokens"]
        tokens[1] = (tokens[1] + 1) % 100
        prompt["divergence"] = {"at": 1, "margin": 0.0}

    def tolerate(allowance):
        path = workspace.contracts / "speculative.yaml"
        contract = yaml.safe_load(path.read_text())
        contract["tie_tolerance"][package] = allowance
        path.write_text(yaml.safe_dump(contract, sort_keys=False))

    workspace.edit_json(SPECULATIVE_REPORT.path, diverge)
    for allowance, failed_items, line in ((0.0, {f"exact[{SELF_PAIR}-64-{package}]"}, "*or a tie (its margin < 0)*"),
                                          (0.125, set(), "*1 left it at a tie (worker's margin 0 < 0.125)*")):
        tolerate(allowance)
        result, failed = workspace.run_family("speculative", "-k", "exact")  # -k cannot spell "->"
        assert failed == failed_items
        result.stdout.fnmatch_lines([line])


def test_a_report_of_other_packages_or_settings_fails_as_stale(workspace):
    def other_student(report):
        run = next(r for r in report["runs"] if r["pair"] == SELF_PAIR and r["backend"] == "torch")
        run["inputs"]["student.distilled"] = "sha256:" + "0" * 64

    workspace.edit_json(SPECULATIVE_REPORT.path, other_student)
    result, failed = workspace.run_family("speculative", "-k", "torch")
    assert failed == {f"exact[{SELF_PAIR}-64-torch]", f"self[{SELF_PAIR}-torch]"}  # the pool fails with its stale run
    result.stdout.fnmatch_lines(["*expected: a measurement of this folder's artifacts",
                                 "*found:    {'student.distilled': 'recorded sha256:0000*, now sha256:*'}",
                                 "*re-run: kdtrain pipeline --stages speculative"])

    path = workspace.contracts / "speculative.yaml"
    contract = yaml.safe_load(path.read_text())
    contract["prompts"]["max_new_tokens"] += 1
    path.write_text(yaml.safe_dump(contract, sort_keys=False))
    _, failed = workspace.run_family("speculative", "-k", "acceptance")
    assert failed == {f"acceptance[{TEACHER_PAIR}-{backend_name()}]"}


def test_a_pair_the_packages_cannot_honour_is_a_located_error(tmp_path):
    """Segments longer than verify's S - 1, a length the packages lack, fewer prompts than lengths,
    a non-self pair without bounds, or packages without a verify function: one located problem
    each, at collection."""
    for name in ("speculative.yaml", "coreml_contract.json"):
        shutil.copy(REPO / "contracts" / name, tmp_path / name)
    path = tmp_path / "speculative.yaml"
    contract = yaml.safe_load(path.read_text())
    contract["lengths"] = [512, 300]
    contract["prompts"]["count"] = 1
    contract["pairs"][0]["segments"]["max"] = 8
    del contract["pairs"][0]["bounds"]
    path.write_text(yaml.safe_dump(contract, sort_keys=False))
    with pytest.raises(ContractFileError) as info:
        load(path)
    assert [p.key_path for p in info.value.problems] == ["lengths[1]", "prompts.count", "pairs[0].segments.max", "pairs[0].bounds"]
    assert "at most 7 (coreml_contract.json's verify takes S = 8 tokens" in str(info.value)

    coreml = json.loads((tmp_path / "coreml_contract.json").read_text())
    del coreml["functions"]["verify"]
    (tmp_path / "coreml_contract.json").write_text(json.dumps(coreml))
    with pytest.raises(ContractFileError, match=r"at \(coreml_contract.json\): expected a verify function"):
        load(path)


def test_the_prompts_are_dealt_over_the_lengths():
    """Prompt i runs at length i mod n: every length has its own, and a pair's figures pool them."""
    from dataclasses import replace

    contract = replace(load(REPO / "contracts/speculative.yaml"), prompts=6, lengths=(512, 1024, 2048, 4096))
    assert {n: list(contract.prompt_indices(n)) for n in contract.lengths} == {512: [0, 4], 1024: [1, 5], 2048: [2], 4096: [3]}
    pools = list(contract.pools("mil-reference"))
    assert [p.params for p in pools] == [("student->teacher", "mil-reference"), ("student->student", "mil-reference"),
                                         ("student->student", "torch")]
    assert all([r.length for r in p.runs] == [512, 1024, 2048, 4096] for p in pools)
