"""A host-side pool of KV-cache sessions under a memory budget (over any backend's :class:`Host`).

An app that keeps several conversations open cannot keep every KV cache resident: each one
costs the bytes of its state, whatever its fill. The pool keeps a conversation's token
history always and its cache only while the budget allows. Before a session needs memory
(an open, or an evicted session used again) it evicts other resident sessions, lowest
priority first and least recently used within a priority; an evicted session is rebuilt
from its history when next used. Every eviction and rebuild is logged (logger
``kdtrain.runtime.pool``) and kept as a typed record in :attr:`SessionPool.events`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from kdtrain.runtime.host import ContextFull, Host, HostState

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class PoolStats:
    hits: int  # uses (append) of a resident session
    misses: int  # uses of an evicted session: each needs a rebuild
    evictions: int
    reprefills: int  # rebuilds (one prefill and the replayed decodes each)
    reprefill_seconds: float
    peak_bytes: int


@dataclass(frozen=True)
class Eviction:
    session: str
    bytes_freed: int
    reason: str  # the session being served, and why it needed memory
    used_before: int
    used_after: int
    priority: int  # the victim's


@dataclass(frozen=True)
class Rebuild:
    session: str
    tokens: int  # tokens replayed: the prompt and every appended token
    seconds: float


Event = Eviction | Rebuild


@dataclass
class _Conversation:
    prompt: list[int]
    appended: list[int]
    priority: int
    last_use: int
    state: HostState | None  # None: evicted, only the history is kept


def measure_session_bytes(host: Host) -> int:
    """The bytes one session's state takes on ``host``'s backend, measured on a state it creates."""
    return host.session.state_bytes(host.session.new_state())


class SessionPool:
    """Conversations by id over one host, their caches held within ``budget_bytes``."""

    def __init__(self, host: Host, budget_bytes: int, log: logging.Logger | None = None):
        self.host, self.budget_bytes, self.log = host, budget_bytes, log or LOG
        self.session_bytes = measure_session_bytes(host)
        if self.session_bytes > budget_bytes:
            raise ValueError(f"session pool: a budget of {budget_bytes} bytes cannot hold one session "
                             f"({self.session_bytes} bytes of KV-cache state on the {host.session.backend} backend)")
        self._conversations: dict[str, _Conversation] = {}
        self._clock = 0
        self._hits = self._misses = self._evictions = self._reprefills = self._peak = 0
        self._reprefill_seconds = 0.0
        self.events: list[Event] = []

    @property
    def used_bytes(self) -> int:
        return self.session_bytes * sum(c.state is not None for c in self._conversations.values())

    @property
    def resident(self) -> tuple[str, ...]:
        """The resident sessions' ids, next victim first."""
        order = sorted((c.priority, c.last_use, sid) for sid, c in self._conversations.items() if c.state is not None)
        return tuple(sid for _, _, sid in order)

    @property
    def stats(self) -> PoolStats:
        return PoolStats(self._hits, self._misses, self._evictions, self._reprefills, self._reprefill_seconds, self._peak)

    def open(self, sid: str, prompt: list[int], priority: int = 0) -> np.ndarray:
        """Prefill a new conversation; the logits after its prompt."""
        if sid in self._conversations:
            raise ValueError(f"session pool: session {sid!r} is open already")
        if not 0 < len(prompt) <= self.host.length:  # before evicting anything for it
            raise ContextFull(f"prefill: expected 1..{self.host.length} prompt tokens, found {len(prompt)}")
        self._make_room(sid, f"to open {sid!r}")
        state, logits = self.host.prefill(list(prompt))
        self._conversations[sid] = _Conversation(list(prompt), [], priority, self._tick(), state)
        self._peak = max(self._peak, self.used_bytes)
        return logits

    def append(self, sid: str, token: int) -> np.ndarray:
        """One decode step of ``token``; the next token's logits. Rebuilds the session first if it was evicted."""
        conversation = self._get(sid)
        if len(conversation.prompt) + len(conversation.appended) >= self.host.length:  # before a rebuild for nothing
            raise ContextFull(f"decode_step: the context is full ({self.host.length} tokens)")
        if conversation.state is None:
            self._misses += 1
            self._rebuild(sid, conversation)
        else:
            self._hits += 1
        conversation.state, logits = self.host.decode_step(conversation.state, token)
        conversation.appended.append(token)
        conversation.last_use = self._tick()
        return logits

    def close(self, sid: str) -> None:
        """Forget the conversation: its cache (if resident) and its history."""
        self._get(sid)
        del self._conversations[sid]

    def set_priority(self, sid: str, priority: int) -> None:
        """Higher priorities are evicted later; this is not a use (the LRU order stays)."""
        self._get(sid).priority = priority

    def _get(self, sid: str) -> _Conversation:
        if sid not in self._conversations:
            raise KeyError(f"session pool: no open session {sid!r}")
        return self._conversations[sid]

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _make_room(self, served: str, reason: str) -> None:
        """Evict resident sessions other than ``served`` until one more session fits the budget."""
        while self.used_bytes + self.session_bytes > self.budget_bytes:
            victim = next(sid for sid in self.resident if sid != served)  # exists: one session fits the budget
            conversation, before = self._conversations[victim], self.used_bytes
            conversation.state = None
            event = Eviction(victim, self.session_bytes, reason, before, self.used_bytes, conversation.priority)
            self._evictions += 1
            self.events.append(event)
            self.log.info("session pool: evicted %r (priority %d): %d bytes freed %s; used %d -> %d of %d bytes",
                          victim, event.priority, event.bytes_freed, reason, before, event.used_after, self.budget_bytes)

    def _rebuild(self, sid: str, conversation: _Conversation) -> None:
        self._make_room(sid, f"to rebuild {sid!r}")
        start = time.perf_counter()
        conversation.state = self._replay(conversation.prompt, conversation.appended)
        seconds = time.perf_counter() - start
        event = Rebuild(sid, len(conversation.prompt) + len(conversation.appended), seconds)
        self._reprefills += 1
        self._reprefill_seconds += seconds
        self._peak = max(self._peak, self.used_bytes)
        self.events.append(event)
        self.log.info("session pool: rebuilt %r: replayed %d tokens (1 prefill + %d decodes) in %.2f ms",
                      sid, event.tokens, len(conversation.appended), seconds * 1e3)

    def _replay(self, prompt: list[int], appended: list[int]) -> HostState:
        """The very host calls the session was built by: one prefill of its prompt, then one decode
        per appended token. A single prefill of all its tokens would be cheaper, but prefill and
        decode reduce in different orders, so that cache (and the next logits) would differ in the
        last bits from the evicted one's; the replay is bit-identical on a deterministic backend."""
        state, _ = self.host.prefill(prompt)
        for token in appended:
            state, _ = self.host.decode_step(state, token)
        return state


@dataclass(frozen=True)
class PoolDemo:
    conversations: int
    steps: int
    resident: int  # the budget, in sessions
    stats: PoolStats
    events: tuple[Event, ...]
    exact: bool  # every logits vector equals the no-eviction run's, bit for bit
    max_abs_diff: float
    session_bytes: int
    budget_bytes: int
    priorities: tuple[int, ...] = ()

    def lines(self) -> list[str]:
        s = self.stats
        head = [
            f"session pool: {self.conversations} conversations, {self.steps} greedy steps round-robin, budget "
            f"{self.resident} sessions ({_bytes(self.budget_bytes)} = {self.resident} x {_bytes(self.session_bytes)})"
            + (f", priorities {list(self.priorities)}" if any(self.priorities) else ""),
            f"  hits {s.hits}, misses {s.misses}, evictions {s.evictions}, re-prefills {s.reprefills} "
            f"({s.reprefill_seconds * 1e3:.1f} ms), peak {_bytes(s.peak_bytes)}",
            "  logits equal the no-eviction run's bit for bit" if self.exact
            else f"  logits differ from the no-eviction run's: max |diff| {self.max_abs_diff:.3g}",
        ]
        return head + ["  " + _event_line(e) for e in self.events]


def pool_demo(host: Host, prompts: list[list[int]], steps: int, resident: int, priorities: list[int] | None = None) -> PoolDemo:
    """Open one conversation per prompt in a pool of ``resident`` sessions, decode ``steps`` greedy
    tokens round-robin (so sessions are evicted and rebuilt), and compare every logits vector with
    each conversation run alone on the plain host, fed the same tokens (no eviction)."""
    if any(len(p) + steps > host.length for p in prompts):
        raise ValueError(f"pool demo: a prompt of {max(map(len, prompts))} tokens and {steps} steps exceed the context {host.length}")
    priorities = list(priorities or [0] * len(prompts))
    session_bytes = measure_session_bytes(host)
    pool = SessionPool(host, resident * session_bytes)
    sids = [f"c{i}" for i in range(len(prompts))]
    pooled = {sid: [pool.open(sid, prompt, priority)] for sid, prompt, priority in zip(sids, prompts, priorities, strict=True)}
    tokens: dict[str, list[int]] = {sid: [] for sid in sids}
    for _ in range(steps):
        for sid in sids:
            tokens[sid].append(int(np.argmax(pooled[sid][-1])))
            pooled[sid].append(pool.append(sid, tokens[sid][-1]))
    exact, diff = True, 0.0
    for sid, prompt in zip(sids, prompts):
        state, logits = host.prefill(prompt)
        alone = [logits]
        for token in tokens[sid]:
            state, logits = host.decode_step(state, token)
            alone.append(logits)
        for a, b in zip(pooled[sid], alone, strict=True):
            exact &= bool(np.array_equal(a, b))
            diff = max(diff, float(np.max(np.abs(a - b))))
    return PoolDemo(len(prompts), steps, resident, pool.stats, tuple(pool.events), exact, diff, session_bytes,
                    pool.budget_bytes, tuple(priorities))


def _event_line(event: Event) -> str:
    if isinstance(event, Eviction):
        return (f"evict {event.session} (priority {event.priority}) {event.reason}: {_bytes(event.bytes_freed)} freed, "
                f"{_bytes(event.used_before)} -> {_bytes(event.used_after)}")
    return f"rebuild {event.session}: {event.tokens} tokens replayed in {event.seconds * 1e3:.2f} ms"


def _bytes(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.1f} MiB"
