"""judge.yaml through the plugin (pytester): every judge item passes on the reference artifacts
(the real SmolLM2 judge, under the reference bounds), and each planted judge fails its own
items under the bounds judge.yaml gives a real run: one that always prefers the first
position, one that prefers the longer answer, one whose scores are random; a judge that knows
the objective answers passes them all. The planted judges are scripted, plugged into the
judge stage's own evaluation, so no model runs here. A report on another probe set or another
judge, and a probe set whose outputs no longer measure as recorded, fail too."""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

import pytest
import yaml

from kdtrain.artifact_table import DATA_CORPUS, JUDGE_PROBES
from kdtrain.artifacts import ArtifactsFolder
from kdtrain.judge.base import PairwiseVerdict
from kdtrain.judge.probes import PROBES_JSON, PROBES_JSONL, ProbeSet

REPO = Path(__file__).resolve().parents[1]
JUDGE_ITEMS = ("consistency", "position_bias", "agreement", "rank_correlation", "length_bias")
# The bounds judge.yaml's comments give a real run ("Real run: ..."); test_the_real_run_bounds_are_the_contracts pins them.
REAL_RUN = {"consistency": {"min": 0.8}, "position_bias": {"min": 0.4, "max": 0.6}, "agreement": {"min": 0.9},
            "agreement_all": {"min": 0.75}, "spearman": {"min": 0.5}, "kendall": {"min": 0.4}, "length_preference": {"max": 0.7}}


def _judge_items(workspace, *args):
    result = workspace.run("-m", "judge", "-rA", *args)
    return result, workspace.failed(result)


def test_every_judge_item_passes_on_the_reference_artifacts(workspace):
    result, failed = _judge_items(workspace)
    out = result.stdout.str()
    assert failed == set() and result.ret == 0, out
    for item in ("probes", *(f"{i}[teacher]" for i in JUDGE_ITEMS)):
        assert f"PASSED contracts/judge.yaml::{item}" in out
    assert "judge consistency[teacher]" in out and "reported, not judged" in out  # the figures in the kdcontracts summary
    assert re.search(r"judge teacher: consistency per kind: code [0-9.]+, tool_call", out)


def test_the_real_run_bounds_are_the_contracts():
    text = (REPO / "contracts/judge.yaml").read_text(encoding="utf-8")
    for metric, bound in REAL_RUN.items():
        line = next(line for line in text.splitlines() if line.strip().startswith(f"{metric}:"))
        written = yaml.safe_load(line.split("Real run:")[1])
        assert written == bound, line


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
    from kdcontracts.families import load
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
    """The reference probe set and real-run bounds in the workspace's contract; ``judge_class`` judged
    through the stage's own evaluation in place of the teacher."""
    from kdtrain.judge.stage import evaluate_judges

    def real_run(data):
        data["bounds"] = REAL_RUN
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
    result, failed = _judge_items(workspace, "-k", "not probes")  # the probe set's own item: below
    assert must <= failed <= must | may, result.stdout.str()
    assert says is None or re.search(says, result.stdout.str()), result.stdout.str()


def test_a_report_on_another_judge_or_probe_set_fails_every_judge_item(workspace):
    from kdtrain.judge.stage import build_probes

    def student_too(data):
        data["judges"] = ["teacher", "student"]

    _edit_judge_contract(workspace, student_too)
    result, failed = _judge_items(workspace, "-k", "not probes")
    assert failed == {f"{i}[student]" for i in JUDGE_ITEMS} and "a report on another judge says nothing" in result.stdout.str()

    def other_seed(data):
        data["judges"] = ["teacher"]
        data["probes"]["seed"] += 1

    _edit_judge_contract(workspace, other_seed)
    ctx = workspace.stage_context()
    build_probes(ctx.folder, ctx.contract("judge.yaml"), ctx.contract("tool_registry.json"))  # probes rebuilt, not re-judged
    result, failed = _judge_items(workspace, "-k", "not probes")
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
    result, failed = _judge_items(workspace)
    assert f"{probe['id']} output {probe['better']}: recorded metric 1.0, measured 0.0" in result.stdout.str()
    assert failed == {"probes", *(f"{i}[teacher]" for i in JUDGE_ITEMS)}  # and the report judged the probe set as it was
