"""The KV-cache session pool (kdtrain.runtime.pool) against a model of itself: random open /
append / greedy decode / close / set_priority sequences keep usage within the budget, evict
exactly the lowest (priority, last use) resident session other than the one served, and
return the logits of a reference host that never evicts, bit for bit."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from hypothesis import Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, initialize, invariant, rule, run_state_machine_as_test

from kdtrain.runtime.backend import TorchSession
from kdtrain.runtime.host import ContextFull, Host
from kdtrain.runtime.pool import Eviction, Rebuild, SessionPool, measure_session_bytes, pool_demo
from kdtrain.student.model import StudentConfig, StudentLM

VOCAB, LENGTH = 61, 12


def _student() -> StudentLM:
    torch.manual_seed(0)
    config = StudentConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=1, head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    return StudentLM(config).eval()


STUDENT = _student()
POOL_HOST = Host(TorchSession(STUDENT, LENGTH), LENGTH, 0)
REFERENCE = Host(TorchSession(STUDENT, LENGTH), LENGTH, 0)  # a separate session: nothing is ever evicted there
SESSION_BYTES = measure_session_bytes(POOL_HOST)
PROMPTS = [[5, 9, 2], [17, 3], [40, 41, 42, 43], [7]]



pytestmark = pytest.mark.usefixtures("one_torch_thread")


tokens = st.integers(0, VOCAB - 1)
priorities = st.integers(0, 2)


class PoolMachine(RuleBasedStateMachine):
    """The model: each session's last use (a clock), priority and residency, and its reference state."""

    sessions = Bundle("sessions")

    @initialize(capacity=st.integers(2, 3))
    def make_pool(self, capacity):
        self.capacity, self.pool = capacity, SessionPool(POOL_HOST, capacity * SESSION_BYTES)
        self.clock, self.names = 0, 0
        self.last_use: dict[str, int] = {}
        self.priority: dict[str, int] = {}
        self.resident: set[str] = set()
        self.reference: dict[str, tuple] = {}  # sid -> (reference HostState, its last logits)
        self.seen_events = 0

    def _serve(self, sid: str) -> list[str]:
        """The model's victims, in order, before ``sid`` is served (``sid`` resident afterwards)."""
        victims = []
        if sid not in self.resident:
            while len(self.resident) + 1 > self.capacity:
                victim = min(self.resident - {sid}, key=lambda s: (self.priority[s], self.last_use[s]))
                victims.append(victim)
                self.resident.discard(victim)
            self.resident.add(sid)
        self.clock += 1
        self.last_use[sid] = self.clock
        return victims

    def _check_events(self, sid: str, victims: list[str], rebuilt: bool) -> None:
        new = self.pool.events[self.seen_events:]
        self.seen_events = len(self.pool.events)
        evictions = [e for e in new if isinstance(e, Eviction)]
        assert [e.session for e in evictions] == victims  # each the lowest (priority, last use) other than sid
        assert all(e.bytes_freed == SESSION_BYTES and e.used_after == e.used_before - e.bytes_freed and repr(sid) in e.reason
                   for e in evictions)
        assert [e.session for e in new if isinstance(e, Rebuild)] == ([sid] if rebuilt else [])

    @rule(target=sessions, prompt=st.lists(tokens, min_size=1, max_size=LENGTH - 2), priority=priorities)
    def open(self, prompt, priority):
        self.names += 1
        sid = f"s{self.names}"
        self.priority[sid] = priority
        victims = self._serve(sid)
        logits = self.pool.open(sid, prompt, priority)
        self._check_events(sid, victims, rebuilt=False)
        state, expected = REFERENCE.prefill(prompt)
        assert np.array_equal(logits, expected)
        self.reference[sid] = (state, expected)
        return sid

    def _append(self, sid: str, token: int) -> None:
        state, _ = self.reference[sid]
        if state.position >= LENGTH:
            used, events = self.pool.used_bytes, len(self.pool.events)
            with pytest.raises(ContextFull):
                self.pool.append(sid, token)
            assert (self.pool.used_bytes, len(self.pool.events)) == (used, events)  # nothing evicted or rebuilt for it
            return
        rebuilt = sid not in self.resident
        victims = self._serve(sid)
        logits = self.pool.append(sid, token)
        self._check_events(sid, victims, rebuilt)
        state, expected = REFERENCE.decode_step(state, token)
        assert np.array_equal(logits, expected), f"{sid}: logits differ from the never-evicted reference's"
        self.reference[sid] = (state, expected)

    @rule(sid=sessions, token=tokens)
    def append(self, sid, token):
        self._append(sid, token)

    @rule(sid=sessions)
    def decode(self, sid):
        self._append(sid, int(np.argmax(self.reference[sid][1])))

    @rule(sid=consumes(sessions))
    def close(self, sid):
        self.pool.close(sid)
        self.resident.discard(sid)
        del self.reference[sid], self.priority[sid], self.last_use[sid]

    @rule(sid=sessions, priority=priorities)
    def set_priority(self, sid, priority):
        self.pool.set_priority(sid, priority)
        self.priority[sid] = priority

    @invariant()
    def within_budget(self):
        if hasattr(self, "pool"):
            assert self.pool.used_bytes <= self.pool.budget_bytes
            assert self.pool.stats.peak_bytes <= self.pool.budget_bytes
            assert set(self.pool.resident) == self.resident


PoolMachine.TestCase.settings = settings(max_examples=25, stateful_step_count=25, deadline=None)
TestSessionPool = PoolMachine.TestCase


def test_a_budget_below_one_session_is_refused():
    with pytest.raises(ValueError, match=rf"budget of {SESSION_BYTES - 1} bytes cannot hold one session \({SESSION_BYTES} bytes"):
        SessionPool(POOL_HOST, SESSION_BYTES - 1)


def test_an_eviction_is_logged(caplog):
    pool = SessionPool(POOL_HOST, SESSION_BYTES)
    pool.open("a", [1, 2, 3])
    with caplog.at_level(logging.INFO, logger="kdtrain.runtime.pool"):
        pool.open("b", [4, 5])
    (record,) = [r for r in caplog.records if r.name == "kdtrain.runtime.pool"]
    assert "evicted 'a'" in record.getMessage() and f"{SESSION_BYTES} bytes freed" in record.getMessage()
    assert "to open 'b'" in record.getMessage()
    assert pool.events == [Eviction("a", SESSION_BYTES, "to open 'b'", SESSION_BYTES, 0, 0)]


def test_a_full_context_raises_before_anything_is_evicted_for_it():
    pool = SessionPool(POOL_HOST, SESSION_BYTES)
    pool.open("full", list(range(LENGTH)))
    pool.open("other", [1])  # evicts "full"
    with pytest.raises(ContextFull):
        pool.append("full", 3)
    assert pool.resident == ("other",) and len(pool.events) == 1 and pool.stats.misses == 0


def test_the_demo_rebuilds_evicted_sessions_bit_for_bit():
    demo = pool_demo(POOL_HOST, PROMPTS, steps=4, resident=2)
    assert demo.exact and demo.max_abs_diff == 0.0
    assert demo.stats.evictions > 0 and demo.stats.reprefills > 0 and demo.stats.misses == demo.stats.reprefills
    assert demo.budget_bytes == 2 * demo.session_bytes and demo.stats.peak_bytes <= demo.budget_bytes
    assert len(demo.lines()) == 3 + len(demo.events)


def _replay_the_prompt_only(self, prompt, appended):
    return self.host.prefill(prompt)[0]  # the planted fault: the appended tokens are not replayed


def test_a_rebuild_that_skips_the_appended_tokens_is_caught(monkeypatch):
    monkeypatch.setattr(SessionPool, "_replay", _replay_the_prompt_only)
    assert not pool_demo(POOL_HOST, PROMPTS, steps=4, resident=2).exact
    found = settings(max_examples=50, stateful_step_count=25, deadline=None, derandomize=True, database=None,
                     phases=[Phase.explicit, Phase.generate], report_multiple_bugs=False)
    with pytest.raises(AssertionError, match="logits differ from the never-evicted reference's"):
        run_state_machine_as_test(PoolMachine, settings=found)
