"""judge.yaml through the plugin (pytester). Every bound is the real one a judge worth trusting
must meet; the reference judge (the real SmolLM2 teacher) is declared ``known_unfit`` for the
items it fails, which run as strict xfails: they XFAIL with the contract's reason and their
figures still print, the item it passes passes, and a known-unfit item that passes fails the run
(strict XPASS). Each planted judge fails its own items under the same bounds, without the
allowance: one that always prefers the first position, one that prefers the longer answer, one
whose scores are random; a judge that knows the objective answers passes them all. The planted
judges are scripted, plugged into the judge stage's own evaluation, so no model runs here. A
report on another probe set or another judge, and a probe set whose outputs no longer measure as
recorded, fail too (a known-unfit entry does not excuse those), and a malformed ``known_unfit``
or a null bound is a contract-file error."""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from pathlib import Path

import pytest
import yaml

from kdcontracts.errors import ContractFileError
from kdcontracts.families import load
from kdtrain.artifact_table import DATA_CORPUS, JUDGE_PROBES
from kdtrain.artifacts import ArtifactsFolder
from kdtrain.judge.base import PairwiseVerdict
from kdtrain.judge.probes import PROBES_JSON, PROBES_JSONL, ProbeSet

REPO = Path(__file__).resolve().parents[1]
JUDGE_ITEMS = ("consistency", "position_bias", "agreement", "rank_correlation", "length_bias")
# What the reference teacher fails under the real bounds (judge.yaml's known_unfit): it always picks position A.
UNFIT = ("consistency", "position_bias", "agreement", "rank_correlation")
# The bounds a judge worth trusting must meet; test_the_real_run_bounds_are_the_contracts pins judge.yaml's to them.
REAL_RUN = {"consistency": {"min": 0.8}, "position_bias": {"min": 0.4, "max": 0.6}, "agreement": {"min": 0.9},
            "agreement_all": {"min": 0.75}, "spearman": {"min": 0.5}, "kendall": {"min": 0.4}, "length_preference": {"max": 0.7}}


def test_the_reference_judge_fails_exactly_the_items_it_is_declared_unfit_for(workspace):
    result, failed = workspace.run_family("judge")
    out = result.stdout.str()
    assert failed == set() and result.ret == 0, out
    for item in ("probes", "length_bias[teacher]"):
        assert f"PASSED contracts/judge.yaml::{item}" in out, out
    for item in UNFIT:
        assert re.search(rf"XFAIL contracts/judge\.yaml::{item}\[teacher\] - known unfit: SmolLM2-135M-Instruct chose position A in 80 of 80", out), out
    # the figures still print in the kdcontracts summary, the unfit ones marked so
    assert re.search(r"judge consistency\[teacher\] +[0-9.]+ +known unfit +consistency >= 0\.8", out), out
    assert re.search(r"judge length_bias\[teacher\] +undefined +ok +length_preference <= 0\.7", out), out
    assert re.search(r"judge teacher: consistency per kind: code [0-9.]+, tool_call", out)


def test_a_known_unfit_item_that_passes_fails_the_run(workspace):
    _edit_judge_contract(workspace, lambda data: data["known_unfit"]["teacher"]["items"].append("length_bias"))
    result, failed = workspace.run_family("judge", "-k", "length_bias")
    out = result.stdout.str()
    assert failed == {"length_bias[teacher]"} and result.ret != 0, out
    assert "FAILED contracts/judge.yaml::length_bias[teacher]" in out and "[XPASS(strict)]" in out, out


def _malformed(tmp_path, change) -> str:
    data = yaml.safe_load((REPO / "contracts/judge.yaml").read_text(encoding="utf-8"))
    change(data)
    path = tmp_path / "judge.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.raises(ContractFileError) as info:
        load(path)
    assert str(info.value).startswith(f"{path}: invalid contract file")
    return str(info.value)


@pytest.mark.parametrize("change, expected", [
    (lambda d: d["known_unfit"]["teacher"]["items"].append("length"),
     "at known_unfit.teacher.items[4]: expected an item of ['consistency', 'position_bias', 'agreement', "
     "'rank_correlation', 'length_bias'], found 'length'"),
    (lambda d: d["known_unfit"].update(student={"reason": "r", "items": ["consistency"]}),
     "at known_unfit.student: expected a judge listed in judges ['teacher'], found 'student'"),
    (lambda d: d["known_unfit"].update(critic={"reason": "r", "items": ["consistency"]}),
     "at known_unfit.critic: expected keys from ['teacher', 'student'], found unknown key 'critic'"),
    (lambda d: d["known_unfit"]["teacher"].update(reason=""),
     'at known_unfit.teacher.reason: expected a string of at least 1 character(s), found "" (string)'),
    (lambda d: d["known_unfit"]["teacher"].update(items=[]), "at known_unfit.teacher.items: expected at least 1 item(s), found 0 item(s)"),
    (lambda d: d["bounds"].update(consistency=None), "at bounds.consistency: expected object, found null (null)"),
    (lambda d: d["bounds"].update(consistency={"min": 0.9, "max": 0.5}), "at bounds.consistency: expected min <= max, found min 0.9 > max 0.5"),
], ids=["unknown-item", "judge-not-listed", "unknown-judge", "empty-reason", "no-items", "null-bound", "inverted-bound"])
def test_a_malformed_known_unfit_or_a_bad_bound_is_a_located_contract_error(tmp_path, change, expected):
    assert expected in _malformed(tmp_path, change)


def test_the_real_run_bounds_are_the_contracts():
    bounds = load(REPO / "contracts/judge.yaml").bounds
    assert {m: {k: v for k, v in vars(b).items() if v is not None} for m, b in bounds.items()} == REAL_RUN


# --- scripted judges ----------------------------------------------------------------------------

class Oracle:
    """Knows every output's objective metric: prefers the better output firmly, the more concise of two
    equally correct ones, and scores a graded output by its metric."""

    name = "teacher"

    def __init__(self, probes: ProbeSet):
        self.metric = {(p.task, o.text): o.metric for p in (*probes.pairs, *probes.graded) for o in p.outputs}

    def prefers_a(self, task: str, a: str, b: str) -> bool:
        ma, mb = self.metric[(task, a)], self.metric[(task, b)]
        return ma > mb if ma != mb else len(a) < len(b)

    def compare(self, items):
        return [PairwiseVerdict(-0.05, -3.0) if self.prefers_a(*item) else PairwiseVerdict(-3.0, -0.05) for item in items]

    def score(self, items):
        return [0.1 + 0.8 * self.metric[item] for item in items]


class AlwaysFirst(Oracle):
    def compare(self, items):
        return [PairwiseVerdict(-0.05, -3.0) for _ in items]


class PrefersLonger(Oracle):
    def prefers_a(self, task: str, a: str, b: str) -> bool:
        return len(a) > len(b)


class RandomScores(Oracle):
    def __init__(self, probes: ProbeSet):
        super().__init__(probes)
        self.rng = random.Random(0)

    def compare(self, items):
        return [PairwiseVerdict(-self.rng.uniform(0, 3), -self.rng.uniform(0, 3)) for _ in items]

    def score(self, items):
        return [self.rng.random() for _ in items]


@pytest.fixture(scope="module")
def reference_probes(reference_artifacts) -> ProbeSet:
    """The reference contract's probe set (10 pairs per kind, 6 graded tasks), held out from the test corpus: built once."""
    from kdtrain.data.corpus import Corpus
    from kdtrain.judge.probes import build_probe_set

    p = load(REPO / "contracts/judge.yaml").probes
    corpus = Corpus.load(ArtifactsFolder.open(reference_artifacts).path(DATA_CORPUS))
    return build_probe_set(load(REPO / "contracts/tool_registry.json"), p.pairs_per_kind, p.graded_tasks, p.seed, corpus)


def _edit_judge_contract(workspace, change) -> None:
    path = workspace.contracts / "judge.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(yaml.safe_dump(data), encoding="utf-8")


def _plant(workspace, probes: ProbeSet, judge_class) -> None:
    """The reference probe set in the workspace's contract, without its known_unfit allowance (a planted
    judge is measured under the real bounds alone); ``judge_class`` judged through the stage's own
    evaluation in place of the teacher."""
    from kdtrain.judge.stage import evaluate_judges

    def real_run(data):
        assert data["bounds"] == REAL_RUN
        del data["known_unfit"]
        data["probes"].update(probes.settings)

    _edit_judge_contract(workspace, real_run)
    ctx = workspace.stage_context()
    probes.save(ctx.folder.root / JUDGE_PROBES.path)
    ctx.folder.record(JUDGE_PROBES)
    evaluate_judges(ctx.folder, ctx.contract("judge.yaml"), {"teacher": judge_class(probes)}, probes)


@pytest.mark.parametrize("judge_class, must, may, says", [
    (Oracle, set(), set(), None),
    # never consistent: no verdict counts, so it agrees with no objective winner either
    (AlwaysFirst, {"consistency[teacher]", "position_bias[teacher]", "agreement[teacher]"}, set(),
     r"position_bias in \[0\.4, 0\.6\]\n +found: +1\.0 \(over 80 verdicts"),
    # its agreement fails by accident of the probe set: a cut tool call or a missing argument is
    # shorter than the right call, a wrong capital or sum is not
    (PrefersLonger, {"length_bias[teacher]"}, {"agreement[teacher]"},
     r"length_preference <= 0\.7\n +found: +1\.0 \(over 10 consistent verdicts of 10 length pairs"),
    # on 80 verdicts and a few consistent length verdicts, a random judge may also look biased
    (RandomScores, {"consistency[teacher]", "agreement[teacher]", "rank_correlation[teacher]"},
     {"position_bias[teacher]", "length_bias[teacher]"}, r"spearman >= 0\.5\n +found: +-?0\.\d"),
], ids=["objective", "always-first", "prefers-longer", "random-scores"])
def test_a_planted_judge_fails_its_own_items(workspace, reference_probes, judge_class, must, may, says):
    _plant(workspace, reference_probes, judge_class)
    result, failed = workspace.run_family("judge", "-k", "not probes")  # the probe set's own item: below
    assert must <= failed <= must | may, result.stdout.str()
    assert says is None or re.search(says, result.stdout.str()), result.stdout.str()


def test_the_stage_logs_a_known_unfit_judgement_and_goes_on(workspace, caplog):
    """Stage judge logs each judgement and raises for none: FAILED, or known unfit with the contract's reason."""
    from kdtrain.judge.stage import evaluate_judges

    _edit_judge_contract(workspace, lambda data: data["known_unfit"]["teacher"].update(items=["consistency"]))
    ctx = workspace.stage_context()
    probes = ProbeSet.load(ctx.folder.path(JUDGE_PROBES))
    with caplog.at_level(logging.INFO, logger="kdtrain.judge"):
        evaluate_judges(ctx.folder, ctx.contract("judge.yaml"), {"teacher": AlwaysFirst(probes)}, probes)
    logged = {r.getMessage().split(":")[0]: r.getMessage() for r in caplog.records if r.getMessage().startswith("judge ")}
    assert re.search(r"0\.000 known unfit \(SmolLM2-135M-Instruct chose position A in 80 of 80 verdicts", logged["judge consistency[teacher]"])
    assert "1.000 FAILED, position_bias in [0.4, 0.6]" in logged["judge position_bias[teacher]"]
    assert "undefined ok, length_preference <= 0.7" in logged["judge length_bias[teacher]"]


def test_a_report_on_another_judge_or_probe_set_fails_every_judge_item(workspace):
    """Known-unfit items too: the allowance covers a figure out of its bound, not a report about something else."""
    from kdtrain.judge.stage import build_probes

    def student_too(data):
        data["judges"] = ["teacher", "student"]

    _edit_judge_contract(workspace, student_too)
    result, failed = workspace.run_family("judge", "-k", "not probes")
    assert failed == {f"{i}[student]" for i in JUDGE_ITEMS} and "a report on another judge says nothing" in result.stdout.str()

    def other_seed(data):
        data["judges"] = ["teacher"]
        data["probes"]["seed"] += 1

    _edit_judge_contract(workspace, other_seed)
    ctx = workspace.stage_context()
    build_probes(ctx.folder, ctx.contract("judge.yaml"), ctx.contract("tool_registry.json"))  # probes rebuilt, not re-judged
    result, failed = workspace.run_family("judge", "-k", "not probes")
    assert failed == {f"{i}[teacher]" for i in JUDGE_ITEMS}
    assert "a report on other probes says nothing about these" in result.stdout.str()


def test_a_probe_set_whose_outputs_no_longer_measure_as_recorded_fails_probes(workspace):
    folder = workspace.artifacts / JUDGE_PROBES.path
    lines = (folder / PROBES_JSONL).read_text(encoding="utf-8").splitlines()
    index = next(i for i, line in enumerate(lines) if json.loads(line)["kind"] == "code")
    probe = json.loads(lines[index])
    good = probe["outputs"][probe["better"]]
    good["text"] = good["text"].replace("return", "retur", 1)  # the winner no longer compiles; its metric still says 1.0
    lines[index] = json.dumps(probe, sort_keys=True, ensure_ascii=False)
    workspace.write(f"{JUDGE_PROBES.path}/{PROBES_JSONL}", "\n".join(lines) + "\n")
    workspace.edit_json(f"{JUDGE_PROBES.path}/{PROBES_JSON}",
                        lambda info: info.update(sha256=hashlib.sha256((folder / PROBES_JSONL).read_bytes()).hexdigest()))
    ArtifactsFolder.open(workspace.artifacts).record(JUDGE_PROBES)  # as a re-recording editor would
    result, failed = workspace.run_family("judge")
    assert f"{probe['id']} output {probe['better']}: recorded metric 1.0, measured 0.0" in result.stdout.str()
    assert failed == {"probes", *(f"{i}[teacher]" for i in JUDGE_ITEMS)}  # and the report judged the probe set as it was
