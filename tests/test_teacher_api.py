"""The API teacher against a real loopback server: it gets exactly what the teacher said,
survives every fault an API has (retrying what may pass, refusing what cannot), books every
attempt on the budget, waits for the rate limits, and never lets the API key out."""

from __future__ import annotations

import hashlib
import json
import logging
import traceback
from contextlib import ExitStack
from dataclasses import replace

import numpy as np
import pytest
from teacher_server import FAULT_KINDS, Faults, chatml_prompt, teacher_server

from kdcontracts.models.tokens import Message
from kdtrain.teacher import packing
from kdtrain.teacher.base import BudgetExceeded, TeacherError, TeacherRequest, TeacherResponse
from kdtrain.teacher.budget import Budget, BudgetLimits
from kdtrain.teacher.openai_api import OpenAIChatTeacher, RetryPolicy, token_char_spans
from kdtrain.teacher.ratelimit import RateLimits
from conftest import reference_teacher

KEY = "sk-kdtest-7f3a91c2e5b84d06"
KEY_ENV = "KDTRAIN_TEST_TEACHER_KEY"
NO_JITTER = RetryPolicy(max_retries=3, base_delay_s=0.5, max_delay_s=4.0, jitter=0.0)

# A made-up vocabulary of 300 pieces, multi-byte characters included.
PIECES = (["<|im_start|>", "<|im_end|>", "\n", "é", "ß", "日", "本", "🙂", "Re:", " the", " teacher"]
          + [chr(c) for c in range(32, 127)])
PIECES += [f"w{i}" for i in range(300 - len(PIECES))]


class FakeTokenizer:
    """Greedy longest match over :data:`PIECES`; an unknown character reads as "?"."""

    vocab = {piece: i for i, piece in enumerate(PIECES)}
    longest = max(map(len, PIECES))

    def encode(self, text: str) -> list[int]:
        ids, i = [], 0
        while i < len(text):
            n = next((n for n in range(min(self.longest, len(text) - i), 0, -1) if text[i:i + n] in self.vocab), 0)
            ids.append(self.vocab[text[i:i + n]] if n else self.vocab["?"])
            i += max(n, 1)
        return ids

    def decode_token(self, token_id: int) -> str:
        return PIECES[token_id]


class FakeTeacher:
    """Answers "Re: <the last message's words reversed> 日本🙂 é" with seeded top-k log-probs."""

    name, version = "fake", "fake@1"

    def __init__(self, tokenizer: FakeTokenizer):
        self.tokenizer = tokenizer

    def complete(self, request: TeacherRequest) -> TeacherResponse:
        last = request.messages[-1].content
        ids = self.tokenizer.encode("Re: " + " ".join(reversed(last.split())) + " 日本🙂 é")[: request.max_new_tokens]
        pieces = [PIECES[i] for i in ids]
        ends = np.cumsum([len(p) for p in pieces], dtype=np.int64)
        rng = np.random.default_rng(int(hashlib.sha256(request.text.encode()).hexdigest()[:8], 16))
        k = request.top_k
        topk = [[i, *rng.choice([j for j in range(len(PIECES)) if j != i], k - 1, replace=False)] for i in ids]
        return TeacherResponse(
            text="".join(pieces), token_ids=np.asarray(ids, np.int32),
            offsets=np.stack([ends - [len(p) for p in pieces], ends], 1).astype(np.int32).reshape(-1, 2),
            topk_ids=np.asarray(topk, np.int32).reshape(-1, k),
            topk_logprobs=(-np.cumsum(rng.exponential(0.7, (len(ids), k)), axis=1)).astype(np.float32),
            prompt_tokens=len(request.ids), completion_tokens=len(ids),
        )


class FakeClock:
    """Time that passes only when slept; every sleep recorded."""

    def __init__(self):
        self.now, self.sleeps = 0.0, []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


TOKENIZER = FakeTokenizer()
TEACHER = FakeTeacher(TOKENIZER)


def make_request(i: int, content: str | None = None, top_k: int = 4, tool: bool = False) -> TeacherRequest:
    messages = [Message("system", "Be terse."), Message("user", content or f"question {i} about the teacher, é?")]
    if tool:
        messages += [Message("assistant", '<tool_call>{"name": "now"}</tool_call>'), Message("tool", '{"time": "12:00"}')]
    text = chatml_prompt(messages)
    return TeacherRequest(f"s{i:03d}", tuple(messages), text, tuple(TOKENIZER.encode(text)), top_k=top_k, max_new_tokens=24)


def assert_same(got: TeacherResponse, want: TeacherResponse) -> None:
    assert got.text == want.text
    for name in ("token_ids", "offsets", "topk_ids"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    np.testing.assert_array_equal(got.topk_logprobs, want.topk_logprobs)  # float32 -> JSON -> float32 is exact
    assert (got.prompt_tokens, got.completion_tokens) == (want.prompt_tokens, want.completion_tokens)


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def serve():
    """``serve(**options)``: a started server over the fake teacher, stopped after the test whatever happens."""
    with ExitStack() as stack:
        yield lambda **options: stack.enter_context(
            teacher_server(TEACHER, TOKENIZER.encode, TOKENIZER.decode_token, **{"api_key": KEY, **options}))


def make_client(server, clock: FakeClock, **options) -> OpenAIChatTeacher:
    options = {"retry": NO_JITTER, "timeout_s": 5.0, **options}
    return OpenAIChatTeacher(server.base_url, "fake-model", "api:fake@1", api_key_env=KEY_ENV,
                             clock=clock, sleep=clock.sleep, **options)


def test_replies_are_exactly_the_teachers(serve, clock):
    server = serve()
    client = make_client(server, clock)
    for request in (make_request(1), make_request(2, tool=True), make_request(3, content="日本 🙂 ß")):
        assert_same(client.complete(request), TEACHER.complete(request))
    assert server.record.outcomes == ["ok"] * 3 and not server.errors
    assert clock.sleeps == []


def test_token_strings_are_mapped_with_the_vocab_or_refused(serve, clock):
    server = serve(token_ids=False)  # a server without vLLM's return_tokens_as_token_ids
    request = make_request(1)
    assert_same(make_client(server, clock, vocab=FakeTokenizer.vocab).complete(request), TEACHER.complete(request))
    with pytest.raises(TeacherError, match="token_id:<int>.*or a vocab"):
        make_client(server, clock).complete(request)
    assert server.record.requests == 2  # the refusal was not retried


def test_a_server_ignoring_top_logprobs_is_noticed(serve, clock):
    server = serve(top_logprobs_cap=2)
    with pytest.raises(TeacherError, match="expected top_k=4 alternatives, found 2"):
        make_client(server, clock).complete(make_request(1, top_k=4))
    assert server.record.requests == 1


def test_score_requests_are_refused(clock):
    client = OpenAIChatTeacher("http://127.0.0.1:9/v1", "m", "api:m@1", api_key_env=KEY_ENV, clock=clock, sleep=clock.sleep)
    request = make_request(1)
    score = TeacherRequest(request.sample_id, request.messages, request.text, request.ids, mode="score")
    with pytest.raises(TeacherError, match="only the local backend can"):
        client.complete(score)


def test_a_missing_key_is_refused_at_construction(monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(TeacherError, match=f"environment variable {KEY_ENV}"):
        OpenAIChatTeacher("http://127.0.0.1:9/v1", "m", "api:m@1", api_key_env=KEY_ENV)


@pytest.mark.parametrize("fault", FAULT_KINDS)
def test_each_fault_is_retried(serve, clock, fault):
    server = serve(faults=Faults(schedule=[fault]), retry_after_s=7, timeout_delay_s=1.0)
    budget = Budget()
    client = make_client(server, clock, budget=budget, timeout_s=0.2 if fault == "timeout" else 5.0)
    request = make_request(1)
    assert_same(client.complete(request), TEACHER.complete(request))
    assert server.record.outcomes == [fault, "ok"]
    assert clock.sleeps == ([7.0] if fault == "429" else [0.5])  # Retry-After honoured, else the first backoff
    assert (budget.calls, budget.failed_calls) == (2, 1)


@pytest.mark.parametrize("refusal", ["401", "400", "404"])
def test_refusals_are_not_retried(serve, clock, refusal):
    server = serve(api_key="another-key" if refusal == "401" else KEY)
    base_url = server.base_url.replace("/v1", "/v2") if refusal == "404" else server.base_url
    client = OpenAIChatTeacher(base_url, "fake-model", "api:fake@1", api_key_env=KEY_ENV, retry=NO_JITTER,
                               clock=clock, sleep=clock.sleep)
    message = {"401": "invalid API key", "400": "top_logprobs must be an integer", "404": "no route"}[refusal]
    with pytest.raises(TeacherError, match=f"found HTTP {refusal}: {message}.*not retried"):
        client.complete(make_request(1, top_k=21 if refusal == "400" else 4))
    assert server.record.outcomes == [refusal]
    assert clock.sleeps == []


def test_exhausting_retries_names_the_last_cause(serve, clock, caplog):
    server = serve(faults=Faults(schedule=["500", "truncated", "503", "429"]))
    with caplog.at_level(logging.WARNING, "kdtrain.teacher"), pytest.raises(TeacherError) as failure:
        make_client(server, clock).complete(make_request(1))
    assert "within 4 attempts" in str(failure.value) and "HTTP 429" in str(failure.value)
    assert server.record.requests == 4
    retries = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(retries) == 3 and "HTTP 500" in retries[0] and "attempt 1 of 4" in retries[0] and "0.500 s" in retries[0]
    assert [r.levelno for r in caplog.records].count(logging.ERROR) == 1


def test_backoff_doubles_and_is_capped(serve, clock):
    server = serve(faults=Faults(schedule=["500"] * 5))
    policy = RetryPolicy(max_retries=5, base_delay_s=0.5, max_delay_s=2.0, jitter=0.0)
    make_client(server, clock, retry=policy).complete(make_request(1))
    assert clock.sleeps == [0.5, 1.0, 2.0, 2.0, 2.0]


def test_jitter_is_seeded_and_only_shortens():
    import random

    policy = RetryPolicy(base_delay_s=1.0, max_delay_s=8.0, jitter=0.5, seed=3)
    delays = [policy.delay_s(n, random.Random(policy.seed)) for n in range(6)]
    assert delays == [policy.delay_s(n, random.Random(3)) for n in range(6)]
    for n, delay in enumerate(delays):
        assert min(8.0, 2.0 ** n) * 0.5 <= delay <= min(8.0, 2.0 ** n)


def test_the_budget_books_every_attempt(serve, clock):
    server = serve(faults=Faults(schedule=["503", "429"]), retry_after_s=1)
    budget = Budget()
    request = make_request(1)
    make_client(server, clock, budget=budget).complete(request)
    want = TEACHER.complete(request)
    assert (budget.calls, budget.failed_calls) == (3, 2) and server.record.outcomes == ["503", "429", "ok"]
    assert (budget.prompt_tokens, budget.completion_tokens) == (want.prompt_tokens, want.completion_tokens)


def test_the_budget_refuses_before_sending(serve, clock):
    server = serve(faults=Faults(schedule=["500"] * 5))
    with pytest.raises(BudgetExceeded, match="max_calls=2"):
        make_client(server, clock, budget=Budget(BudgetLimits(max_calls=2))).complete(make_request(1))
    assert server.record.requests == 2
    request = make_request(2)
    estimate = len(request.ids) + request.max_new_tokens
    with pytest.raises(BudgetExceeded, match=f"max_tokens={estimate - 1}"):
        make_client(server, clock, budget=Budget(BudgetLimits(max_tokens=estimate - 1))).complete(request)
    assert server.record.requests == 2


def test_a_restored_budget_continues_from_what_was_spent(serve, clock):
    server = serve()
    budget = Budget(BudgetLimits(max_calls=3))
    client = make_client(server, clock, budget=budget)
    client.complete(make_request(1))
    client.complete(make_request(2))
    checkpoint = json.loads(json.dumps(budget.state_dict()))
    restored = Budget.from_state(checkpoint, BudgetLimits(max_calls=3))
    client = make_client(server, clock, budget=restored)
    client.complete(make_request(3))
    with pytest.raises(BudgetExceeded, match="max_calls=3 calls, found 3 spent"):
        client.complete(make_request(4))
    assert server.record.requests == 3 and restored.tokens > budget.tokens


def test_the_client_waits_for_the_rate_limit(serve, clock):
    server = serve()
    client = make_client(server, clock, limits=RateLimits(requests_per_minute=2))
    for i in range(3):
        client.complete(make_request(i))
    assert clock.sleeps == [pytest.approx(30.0)]


def test_the_api_key_never_leaks(serve, clock, caplog):
    caplog.set_level(logging.DEBUG)
    server = serve(faults=Faults(schedule=["429", "500", "truncated", "timeout"]), timeout_delay_s=1.0, retry_after_s=0.1)
    client = make_client(server, clock, timeout_s=0.3, retry=RetryPolicy(max_retries=4, base_delay_s=0.1, max_delay_s=1.0))
    seen = [repr(client), str(client), repr(vars(client)), repr(client.complete(make_request(1)))]
    errors = []
    server.set_faults(Faults(schedule=["503"] * 5))
    with pytest.raises(TeacherError) as exhausted:
        client.complete(make_request(2))
    errors.append(exhausted.value)
    echoing = serve(api_key="another-key")  # answers 401 quoting the Authorization header it got
    with pytest.raises(TeacherError) as refused:
        make_client(echoing, clock).complete(make_request(3))
    errors.append(refused.value)
    assert "invalid API key" in str(refused.value) and "<secret>" in str(refused.value)
    seen += [text for e in errors for text in (str(e), repr(e.args), "".join(traceback.format_exception(e)))]
    seen += [f"{r.getMessage()} {r.args!r} {r.exc_text}" for r in caplog.records]
    assert len(caplog.records) >= 9  # the retries and give-up were logged, and checked
    assert not [text for text in seen if KEY in text]


def test_char_spans_split_characters_to_the_token_that_starts_them():
    text = "a日🙂b"  # "日" is 3 bytes, "🙂" 4; SmolLM2 splits them as below
    raw = [b"a", b"\xe6\x97", b"\xa5", b"\xf0\x9f", b"\x99\x82", b"b"]
    want = [[0, 1], [1, 2], [2, 2], [2, 3], [3, 3], [3, 4]]
    assert token_char_spans(text, raw).tolist() == want
    # vLLM decodes each token alone: a partial character arrives as U+FFFD, still aligned.
    lossy = [p.decode("utf-8", "replace").encode("utf-8") for p in raw]
    assert lossy[1:5] == ["\ufffd".encode()] * 3 + ["\ufffd\ufffd".encode()]
    assert token_char_spans(text, lossy).tolist() == want
    with pytest.raises(TeacherError, match="spell the content"):
        token_char_spans(text, raw[:-1])


def test_lossy_pieces_take_the_split_their_token_ids_agree_on():
    # "🌟🌟" as SmolLM2 splits it (2 + 1 + 1 bytes, ids 10813 230 249), sent by vLLM as six U+FFFD:
    # 3 + 1 | 1 + 1 + 1 + 1 bytes would spell the text too, but gives one id two lengths.
    spans = token_char_spans("🌟🌟", ["\ufffd".encode()] * 6, ids=[10813, 230, 249] * 2)
    assert spans.tolist() == [[0, 1], [1, 1], [1, 1], [1, 2], [2, 2], [2, 2]]


def test_a_vllm_style_reply_is_read_the_same(serve, clock):
    server = serve(vllm_stop_token=FakeTokenizer.vocab["<|im_end|>"])  # the stop token is reported, not printed
    client = make_client(server, clock)
    for request in (make_request(1), replace(make_request(2), max_new_tokens=3)):  # stopped, and cut by max_tokens
        assert_same(client.complete(request), TEACHER.complete(request))


@pytest.mark.parametrize("max_retries", [6, 0])
def test_thirty_percent_of_requests_failing(serve, clock, max_retries):
    server = serve(faults=Faults(fraction=0.3, seed=11), timeout_delay_s=1.5, retry_after_s=0.5)
    budget = Budget()
    client = make_client(server, clock, budget=budget, timeout_s=0.5,
                         retry=RetryPolicy(max_retries=max_retries, base_delay_s=0.1, max_delay_s=1.0, seed=1))
    requests = [make_request(i) for i in range(40)]
    failed = 0
    for request in requests:
        try:
            assert_same(client.complete(request), TEACHER.complete(request))
        except TeacherError:
            failed += 1
    record = server.record
    faults = sum(record.faults.values())
    assert len(record.faults) >= 4, record.faults  # the kinds are mixed
    assert (budget.calls, budget.failed_calls) == (record.requests, faults)
    if max_retries:
        assert failed == 0 and record.ok == 40
    else:
        assert 0.15 * 40 <= failed == faults <= 0.45 * 40 and record.ok == 40 - failed == record.requests - faults
    assert not server.errors


@pytest.mark.slow
def test_the_local_teacher_through_the_server(tmp_path, clock):
    from kdtrain.data.chat import ChatFormat
    from kdtrain.teacher import source
    from kdtrain.teacher.fill import TeacherSettings, build_request
    from kdtrain.teacher.local import LocalTeacher
    from kdtrain.tokenizers.load import Tokenizer

    reference = reference_teacher()
    source.load_tokenizer(reference.source).save_pretrained(tmp_path)
    tokenizer = Tokenizer("teacher", tmp_path, "transformers")
    teacher = LocalTeacher(source.load_model(reference.source), tokenizer, reference.name, reference.version)
    settings = TeacherSettings(reference.name, reference.version, mode="generate", top_k=8, max_new_tokens=24)
    questions = ["What is the capital of France? Answer in one word.",  # ends on the stop token
                 "Reply with three emojis.", "Translate 'good morning' into Japanese."]  # characters split over tokens
    requests = [build_request(f"s{i}", [Message("user", q), Message("assistant", "")], tokenizer, settings)
                for i, q in enumerate(questions)]
    wants = [teacher.complete(request) for request in requests]
    assert any(len(w.token_ids) < settings.max_new_tokens for w in wants)
    assert any((w.offsets[:, 0] == w.offsets[:, 1]).any() for w in wants)  # a token inside one character
    for vllm_stop_token in (None, tokenizer.token_to_id(tokenizer.eos_token)):  # bytes from the text; or as vLLM sends them
        with teacher_server(teacher, lambda text: tokenizer.encode(text).ids, lambda i: tokenizer.decode([i]), api_key=KEY,
                            vllm_stop_token=vllm_stop_token, prompt=ChatFormat.of(tokenizer).prompt) as server:
            client = make_client(server, clock, timeout_s=60.0)
            for request, want in zip(requests, wants):
                got = client.complete(request)
                assert got.text == want.text
                np.testing.assert_array_equal(got.token_ids, want.token_ids)
                np.testing.assert_array_equal(got.topk_ids, want.topk_ids)
                np.testing.assert_allclose(got.topk_logprobs, want.topk_logprobs, atol=1e-4)
                np.testing.assert_array_equal(got.offsets, want.offsets)


def test_a_fill_pass_with_30_percent_of_api_calls_failing_loses_no_sample(serve, clock, tmp_path, caplog):
    """Through the real client and cache: every sample ends cached or on the retry-later
    list, never both, never neither; the next pass (server healthy) completes the list."""
    from kdcontracts.models.distill_data import Accept
    from kdtrain.data.targets import TeacherTargets
    from kdtrain.teacher.cache import TeacherCache
    from kdtrain.teacher.fill import fill_cache, retry_later

    server = serve(faults=Faults(fraction=0.3, seed=5), timeout_delay_s=1.5, retry_after_s=0.5)
    client = make_client(server, clock, timeout_s=0.5, retry=RetryPolicy(max_retries=0))
    accept = Accept(client.name, (client.version,))
    requests = [make_request(i) for i in range(40)]
    cache = TeacherCache(tmp_path / "cache")
    first = fill_cache(cache, client, requests, accept)
    cached = {e.sample_id for e in TeacherCache(cache.folder)}
    listed = set(retry_later(cache))
    assert listed == set(first.retry_later) and len(listed) == sum(server.record.faults.values()) > 0
    assert cached | listed == {r.sample_id for r in requests} and not cached & listed
    with caplog.at_level(logging.INFO, "kdtrain.data"):
        assert len(list(TeacherTargets(requests, TeacherCache(cache.folder), accept))) == 40 - len(listed)
    assert f"missing teacher targets: {len(listed)}/40 samples" in caplog.text

    server.set_faults(Faults())
    second = fill_cache(TeacherCache(cache.folder), client, requests, accept)
    assert second.fetched == len(listed) and second.hits == 40 - len(listed) and not second.retry_later
    for request in requests:  # the cache stores log-probs packed: within a quantisation step (kdtrain.teacher.packing)
        want = TEACHER.complete(request)
        got = TeacherCache(cache.folder).lookup(request, accept).entry.response
        np.testing.assert_allclose(got.topk_logprobs, want.topk_logprobs, rtol=2**-11, atol=packing.STEP)
        assert_same(got, replace(want, topk_logprobs=got.topk_logprobs))
