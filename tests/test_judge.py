"""The judge's parts, without the 135M model: the probe set (seeded, held out, every output worth
what its objective check measures), the sandbox that runs its code, the metrics on scripted
verdicts, the contract's rule for undefined figures, and the local and API judges on a tiny
model and a loopback server."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest

from kdcontracts.families import load
from kdcontracts.models.tokens import Message
from kdtrain.data.registry import load_registry
from kdtrain.errors import DataError
from kdtrain.judge.checks import measure
from kdtrain.judge.metrics import judge_metrics, rank_correlation
from kdtrain.judge.probes import PAIR_KINDS, PROBES_JSON, PROBES_JSONL, ProbeSet, build_probe_set, remeasure
from kdtrain.judge.sandbox import Candidate, run_candidate

REPO = Path(__file__).resolve().parents[1]
REGISTRY = load_registry(REPO / "contracts/tool_registry.json")
SEED = 7


@pytest.fixture(scope="module")
def probes() -> ProbeSet:
    return build_probe_set(REGISTRY, pairs_per_kind=3, graded_tasks=2, seed=SEED)


def test_the_probe_set_is_byte_identical_for_a_seed_and_differs_for_another(probes):
    """Same settings, same bytes: in this process and in others with other hash seeds (no set order leaks in)."""
    import subprocess
    import sys

    code = ("from pathlib import Path; from kdtrain.data.registry import load_registry; "
            "from kdtrain.judge.probes import build_probe_set; "
            f"print(build_probe_set(load_registry(Path('contracts/tool_registry.json')), 3, 2, {SEED}).info().sha256)")
    for hash_seed in ("1", "2"):
        done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONHASHSEED": hash_seed})
        assert done.stdout.strip() == probes.info().sha256, done.stderr[-2000:]
    other = build_probe_set(REGISTRY, pairs_per_kind=3, graded_tasks=2, seed=SEED + 1)
    assert other.info().sha256 != probes.info().sha256


def test_every_probe_is_worth_what_its_objective_check_measures(probes, tmp_path):
    assert {k: n for k, n in probes.info().counts.items()} == {**{k: 3 for k in PAIR_KINDS}, "graded": 2}
    for pair in probes.pairs:
        good, other = (pair.outputs[pair.better], pair.outputs[1 - pair.better]) if pair.better is not None else pair.outputs
        if pair.kind == "length":
            assert good.metric == other.metric == 1.0
            assert len(pair.outputs[pair.longer].text) > len(pair.outputs[1 - pair.longer].text)
        else:
            assert good.metric == 1.0 and other.metric < 1.0, pair.id
        if pair.kind == "code" and pair.better is not None:
            bad = pair.outputs[1 - pair.better].evidence
            assert not bad["compiles"] or bad["passed"] < bad["total"]
    assert {p.better for p in probes.pairs if p.better is not None} == {0, 1}  # positions shuffled
    assert {g.source for g in probes.graded} == {"code", "tool_call"}
    assert all(len({o.metric for o in g.outputs}) >= 2 for g in probes.graded)
    assert remeasure(probes, REGISTRY) == []
    loaded = ProbeSet.load(probes.save(tmp_path / "probes"))
    assert loaded.jsonl() == probes.jsonl() and loaded.settings == probes.settings


def test_a_probe_set_edited_after_it_was_written_is_refused_or_measures_otherwise(probes, tmp_path):
    folder = probes.save(tmp_path / "probes")
    lines = (folder / PROBES_JSONL).read_text().splitlines()
    pair = next(i for i, line in enumerate(lines) if json.loads(line)["kind"] == "tool_call")
    probe = json.loads(lines[pair])
    good = probe["outputs"][probe["better"]]
    good["text"] = good["text"].replace("}}\n", "}\n")  # the winner's JSON cut, its recorded metric kept
    lines[pair] = json.dumps(probe, sort_keys=True, ensure_ascii=False)
    (folder / PROBES_JSONL).write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="the file changed after it was written"):
        ProbeSet.load(folder)
    info = json.loads((folder / PROBES_JSON).read_text())
    info["sha256"] = hashlib.sha256((folder / PROBES_JSONL).read_bytes()).hexdigest()
    (folder / PROBES_JSON).write_text(json.dumps(info))
    problems = remeasure(ProbeSet.load(folder), REGISTRY)
    assert len(problems) == 1 and problems[0].startswith(f"{probe['id']} output {probe['better']}: recorded metric 1.0, measured 0.0")


def test_a_probe_task_equal_to_a_training_prompt_is_drawn_again(probes):
    task = probes.pairs[0].task

    class Corpus:  # what the builder reads of a corpus
        samples = [type("Sample", (), {"messages": (Message("user", task),)})()]

        @staticmethod
        def info():
            return type("Info", (), {"sha256": "0" * 64})()

    held_out = build_probe_set(REGISTRY, pairs_per_kind=3, graded_tasks=2, seed=SEED, corpus=Corpus())
    assert task not in {p.task for p in held_out.pairs} and held_out.training_sha256 == "0" * 64


def test_the_sandbox_runs_a_candidate_away_from_this_process(monkeypatch):
    monkeypatch.setenv("KD_JUDGE_TEST_SECRET", "sk-not-for-candidates")
    tests = (((1,), 1),)
    env = run_candidate(Candidate("import os\ndef f(x):\n    return 'sk-not-for-candidates' in str(dict(os.environ))\n", "f",
                                  (((1,), False),)))
    assert env.correct  # no environment variable reaches the candidate (an API key cannot be read)
    spin = run_candidate(Candidate("def f(x):\n    while True:\n        pass\n", "f", tests))
    assert not spin.correct and "killed by signal" in spin.error  # its CPU limit, not our timeout
    broken = run_candidate(Candidate("def f(x)\n    return x\n", "f", tests))
    assert (broken.compiles, broken.passed) == (False, 0) and broken.error.startswith("SyntaxError")
    raising = run_candidate(Candidate("def f(x):\n    return 1 / 0\n", "f", tests))
    assert raising.compiles and raising.passed == 0 and raising.error.startswith("ZeroDivisionError")
    writer = run_candidate(Candidate("def f(x):\n    with open('out.txt', 'w') as fh:\n        return fh.write('x' * 99)\n", "f",
                                     (((1,), 99),)))
    assert writer.passed == 0 and "File too large" in writer.error  # no file writes


def test_the_objective_checks_say_what_is_wrong():
    check = {"kind": "tool_call", "name": "get_weather", "arguments": {"city": "Oslo"}}
    (right, _), (cut, cut_why), (other, other_why) = measure(check, [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "oslo"}}\n</tool_call>',  # strings compare normalised
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}\n</tool_call>',
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'], REGISTRY)
    assert (right, cut, other) == (1.0, 0.0, 0.0) and not cut_why["valid"] and other_why["valid"] and not other_why["matches"]
    graded = {"kind": "tool_arguments", "name": "convert_currency", "arguments": {"amount": 40.0, "from": "EUR", "to": "JPY"}}
    texts = ['<tool_call>\n{"name": "convert_currency", "arguments": {"amount": 40, "from": "EUR"}}\n</tool_call>',
             '<tool_call>\n{"name": "convert_currency", "arguments": {}}\n</tool_call>']
    assert [m for m, _ in measure(graded, texts, REGISTRY)] == [pytest.approx(2 / 3), 0.0]
    exact = {"kind": "exact", "expected": "42"}
    assert [m for m, _ in measure(exact, ["17 + 25 = 42.", "17 + 25 = 43.", "It is 42, or 43."], REGISTRY)] == [1.0, 0.0, 0.0]


# --- metrics on scripted verdicts --------------------------------------------------------------

def _records(probes: ProbeSet, choose) -> list[dict]:
    """One record per pair and order; ``choose(pair, first)`` -> the position preferred, "A" or "B"."""
    return [{"pair": p.id, "first": first, "logprob_a": -0.1 if choose(p, first) == "A" else -2.0,
             "logprob_b": -2.0 if choose(p, first) == "A" else -0.1} for p in probes.pairs for first in (0, 1)]


def _scores(probes: ProbeSet, score) -> list[dict]:
    return [{"item": g.id, "output": i, "score": score(o)} for g in probes.graded for i, o in enumerate(g.outputs)]


def _oracle(pair, first) -> str:
    target = pair.better if pair.better is not None else 1 - pair.longer  # the shorter of two correct answers
    return "A" if first == target else "B"


def test_an_always_first_judge_is_never_consistent(probes):
    m = judge_metrics(probes, _records(probes, lambda p, first: "A"), _scores(probes, lambda o: o.metric))["overall"]
    assert (m["consistency"], m["position_bias"], m["agreement"], m["agreement_all"], m["length_preference"]) == (0.0, 1.0, None, 0.0, None)
    assert m["spearman"] > 0.5  # its pointwise scores are another matter


def test_an_objective_judge_agrees_and_one_preferring_length_shows_it(probes):
    oracle = judge_metrics(probes, _records(probes, _oracle), _scores(probes, lambda o: o.metric))["overall"]
    assert (oracle["consistency"], oracle["position_bias"], oracle["agreement"], oracle["agreement_all"]) == (1.0, 0.5, 1.0, 1.0)
    assert oracle["length_preference"] == 0.0
    longer = judge_metrics(probes, _records(probes, lambda p, first: "A" if first == p.longer else "B"), _scores(probes, lambda o: 0.5))
    assert longer["kinds"]["length"]["length_preference"] == 1.0 and longer["overall"]["consistency"] == 1.0


def test_rank_correlation_is_scipys_and_undefined_on_constant_scores():
    from scipy.stats import kendalltau, spearmanr

    scores, metric = [0.9, 0.2, 0.5, 0.4, 0.8], [1.0, 0.0, 0.5, 0.5, 0.75]
    found = rank_correlation(scores, metric)
    assert found["spearman"] == pytest.approx(spearmanr(scores, metric).statistic)
    assert found["kendall"] == pytest.approx(kendalltau(scores, metric).statistic)
    constant = rank_correlation([0.5] * 5, metric)
    assert constant["spearman"] is None and constant["kendall"] is None


def test_an_undefined_figure_fails_a_floor_and_passes_a_ceiling():
    contract = load(REPO / "contracts/judge.yaml")
    undefined = {"consistency": 0.0, "position_bias": 1.0, "agreement": None, "agreement_all": 0.0, "spearman": 0.1,
                 "kendall": 0.1, "length_preference": None}
    verdicts = {(j.item, j.expected.split()[0]): j.passed for j in contract.judge("teacher", undefined, {})}
    assert verdicts[("agreement[teacher]", "agreement")] is False  # a floor asks for evidence
    assert verdicts[("length_bias[teacher]", "length_preference")] is True  # no verdict shows the bias a ceiling caps
    assert len(verdicts) == 7 and sum(verdicts.values()) == 1  # every bound judged: none only reports


# --- the local judge on a tiny model; the API judge on a loopback server -------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama teacher and its Zephyr-template tokenizer (tests/tiny_family.py), as kdtrain loads them."""
    from tiny_family import build_teacher, build_tokenizer
    from transformers import AutoModelForCausalLM

    from kdtrain.tokenizers.load import Tokenizer

    root = tmp_path_factory.mktemp("tiny")
    tokenizer_folder = build_tokenizer(root / "tokenizer")
    teacher = build_teacher(root / "teacher", tokenizer_folder, arch="llama")
    return AutoModelForCausalLM.from_pretrained(teacher).eval(), Tokenizer("teacher", tokenizer_folder, "transformers")


ITEMS = [("What is 17 + 25?", "17 + 25 = 42.", "17 + 25 = 43."),
         ("Write a Python function f(x) that returns x + 1.", "def f(x):\n    return x + 1\n", "def f(x)\n    return x\n"),
         ("What is the capital of Kenya?", "Nairobi.", "The capital of Kenya is Nairobi, the seat of its government.")]


def test_the_local_judge_reads_the_same_verdicts_through_its_shared_prefix(tiny):
    import torch

    from kdtrain.judge import prompts
    from kdtrain.judge.base import answer_token_ids
    from kdtrain.judge.local import LocalJudge

    model, tokenizer = tiny
    judge = LocalJudge(model, tokenizer, "tiny", batch_size=2, progress=False)
    found = judge.compare(ITEMS)
    for item, verdict in zip(ITEMS, found):  # one prompt alone, whole, no padding and no cache
        text = judge.chat.prompt(prompts.pairwise(*item))
        with torch.no_grad():
            logits = model(torch.tensor([tokenizer.encode(text).ids])).logits[0, -1]
        a, b = torch.log_softmax(logits, -1)[answer_token_ids(tokenizer, text, prompts.PAIRWISE_ANSWERS, "tiny")].tolist()
        assert (verdict.logprob_a, verdict.logprob_b) == (pytest.approx(a, abs=1e-4), pytest.approx(b, abs=1e-4))
    scores = judge.score([(task, a) for task, a, _ in ITEMS])
    assert all(0.0 < s < 1.0 for s in scores)


def test_a_student_checkpoint_judges_through_the_same_local_path(tiny):
    import torch

    from kdtrain.judge.local import LocalJudge
    from kdtrain.student.model import StudentConfig, StudentLM

    model, tokenizer = tiny
    torch.manual_seed(0)
    config = dataclasses.replace(StudentConfig.from_hf(model.config.to_dict()), num_hidden_layers=1)
    student = StudentLM(config).eval()
    batched = LocalJudge(student, tokenizer, "student", batch_size=3, progress=False).compare(ITEMS)
    alone = LocalJudge(student, tokenizer, "student", batch_size=1, progress=False).compare(ITEMS)
    for x, y in zip(batched, alone):  # left padding changes nothing but rounding
        assert math.isclose(x.logprob_a, y.logprob_a, abs_tol=1e-4) and math.isclose(x.logprob_b, y.logprob_b, abs_tol=1e-4)


KEY, KEY_ENV = "sk-kdjudge-5e1f0c77a2", "KDTRAIN_TEST_JUDGE_KEY"


RIGHT = tuple(right for _, right, _ in ITEMS)


class ScriptedAPIJudge:
    """Behind the server: a one-token reply whose top-k puts first the position holding the right
    answer; on the Kenya prompt the other answer is left out of the top-k."""

    name, version = "scripted", "scripted@1"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def complete(self, request):
        from kdtrain.teacher.base import TeacherResponse

        a, b = (self.tokenizer.encode(f"{request.text}{x}").ids[len(request.ids)] for x in "AB")
        best, second = (a, b) if any(f"[Response A]\n{right}" in request.text for right in RIGHT) else (b, a)
        listed = [best, second, *[i for i in range(40, 80) if i not in (a, b)]][:request.top_k]
        if "Kenya" in request.text:
            listed = [i for i in listed if i != second] + [7]
        text = self.tokenizer.decode([best])
        return TeacherResponse(text=text, token_ids=np.asarray([best], np.int32), offsets=np.asarray([[0, len(text)]], np.int32),
                               topk_ids=np.asarray([listed], np.int32),
                               topk_logprobs=np.asarray([[-0.25 - i for i in range(request.top_k)]], np.float32),
                               prompt_tokens=len(request.ids), completion_tokens=1)


def test_the_api_judge_reads_verdicts_from_top_logprobs_and_pays_for_each_prompt_once(tiny, tmp_path, monkeypatch):
    from teacher_server import teacher_server

    from kdtrain.data.chat import ChatFormat
    from kdtrain.judge.api import MAX_TOP_LOGPROBS, OpenAIJudge
    from kdtrain.teacher.cache import TeacherCache
    from kdtrain.teacher.openai_api import OpenAIChatTeacher

    _, tokenizer = tiny
    monkeypatch.setenv(KEY_ENV, KEY)
    swapped = [(task, b, a) for task, a, b in ITEMS]
    with ExitStack() as stack:
        server = stack.enter_context(teacher_server(ScriptedAPIJudge(tokenizer), lambda t: tokenizer.encode(t).ids,
                                                    lambda i: tokenizer.decode([i]), api_key=KEY, prompt=ChatFormat.of(tokenizer).prompt))
        client = OpenAIChatTeacher(server.base_url, "judge-model", "scripted@1", api_key_env=KEY_ENV, name="scripted")
        cache = stack.enter_context(TeacherCache(tmp_path / "cache"))
        judge = OpenAIJudge(client, tokenizer, "teacher", cache, progress=False)
        first = judge.compare(ITEMS + swapped)
        assert [v.choice for v in first] == ["A", "A", "A", "B", "B", "B"]
        kenya = first[2]  # "B" not listed: the lowest listed log-probability stands in for it
        assert (kenya.logprob_a, kenya.logprob_b) == (-0.25, -0.25 - (MAX_TOP_LOGPROBS - 1))
        again = judge.compare(ITEMS + swapped)
        assert server.record.requests == client.budget.calls == 2 * len(ITEMS)  # the second pass came from the cache
        assert [v.choice for v in again] == [v.choice for v in first]
    assert KEY.encode() not in (tmp_path / "cache" / "entries.sqlite3").read_bytes()
