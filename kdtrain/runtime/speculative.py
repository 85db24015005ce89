"""Greedy speculative decoding: a drafter proposes a segment, the worker verifies it in one call.

Both sides implement :class:`Side` (prefill, decode_step, verify, rollback, and the halt
head's output where a side has one): :class:`HostSide` over the package host API (any
backend: Core ML, the MIL executor, PyTorch) and :class:`CausalLMSide` over a local
transformers causal LM (the reference teacher). One round of :func:`speculative_decode`:

- both sides have consumed the context except its last token ``x``;
- the drafter feeds ``x`` and proposes ``d1..dk`` greedily: at least ``min_tokens`` and at
  most ``max_tokens`` (and the worker's segment less one), ending early after a token whose
  halt probability reaches ``halt_threshold`` (the boundary it predicts), at an EOS, or
  before an id the worker's vocabulary lacks (it could never be accepted);
- the worker verifies ``[x, d1..dk]`` in one call (row j of its logits predicts the token
  after the j-th); the longest prefix of drafts equal to its argmax is accepted, then its
  own next token, so every call yields at least one token;
- both caches are rolled back to the accepted position; the drafter feeds ``dk`` when all
  were accepted and it had not fed it yet.

Every token is the worker's argmax after the tokens before it, so the output is the worker's
plain greedy decoding (:func:`greedy_decode`) token for token, provided verify's logits are
decode's: on the MIL executor they are, bit for bit (:func:`kdtrain.runtime.kernels._by_row`);
Core ML runs them as different device programs, and where plain decoding chose between FP16
logits that tie, verify there may choose the other. :func:`preference` measures a divergence's
margin, which ``speculative.yaml``'s per-backend tie tolerance judges. Where a context ends before the drafter can propose, the worker goes on alone with
plain decode steps.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Iterable, Protocol, Sequence

import numpy as np

from kdtrain.errors import ConfigError
from kdtrain.runtime.host import Host, HostState


class Side(Protocol):
    """What the decoder drives. ``logits`` are float32 ([V] for one token, [n, V] for a segment);
    ``halt`` is P(boundary after the token) in the same layout, or None for a side without a halt head."""

    name: str
    length: int  # tokens its context holds
    vocab_size: int  # ids it can read
    segment: int  # most tokens one verify call takes

    def prefill(self, prompt: list[int]) -> tuple[object, np.ndarray, float | None]: ...

    def decode_step(self, state, token: int) -> tuple[object, np.ndarray, float | None]: ...

    def verify(self, state, tokens: list[int]) -> tuple[object, np.ndarray, np.ndarray | None]: ...

    def rollback(self, state, position: int): ...


class HostSide:
    """A converted package through the host API, on any backend (its verify function takes ``segment`` tokens)."""

    def __init__(self, host: Host, segment: int, vocab_size: int, name: str = "student"):
        self.host, self.segment, self.vocab_size, self.name = host, segment, vocab_size, name
        self.length = host.length

    def prefill(self, prompt):
        state, out = self.host.run_prefill(prompt)
        return state, out["logits"], out.get("halt")

    def decode_step(self, state, token):
        state, out = self.host.run_decode(state, token)
        return state, out["logits"], out.get("halt")

    def verify(self, state, tokens):
        return self.host.verify(state, tokens, self.segment)

    def rollback(self, state: HostState, position: int) -> HostState:
        return Host.rollback(state, position)


@dataclass(frozen=True)
class LMState:
    position: int
    cache: object  # the model's transformers DynamicCache (cropped in place on rollback)


class CausalLMSide:
    """A local transformers causal LM on torch: verify is one forward over the segment with its
    cache (transformers 5's ``cache``, formerly ``past_key_values``), rollback crops the
    ``DynamicCache``. It has no halt head."""

    def __init__(self, model, segment: int, name: str = "teacher", length: int | None = None):
        self.model, self.segment, self.name = model.eval(), segment, name
        self.length = length or model.config.max_position_embeddings
        self.vocab_size = model.get_input_embeddings().num_embeddings

    def _forward(self, cache, position: int, tokens: list[int]) -> tuple[LMState, np.ndarray]:
        import torch

        with torch.no_grad():
            out = self.model(input_ids=torch.tensor([tokens]), cache=cache, use_cache=True)
        return LMState(position + len(tokens), out.cache), out.logits[0].float().numpy()

    def prefill(self, prompt):
        from transformers import DynamicCache

        state, logits = self._forward(DynamicCache(config=self.model.config), 0, list(prompt))
        return state, logits[-1], None

    def decode_step(self, state: LMState, token):
        state, logits = self._forward(state.cache, state.position, [token])
        return state, logits[0], None

    def verify(self, state: LMState, tokens):
        if not 0 < len(tokens) <= self.segment:
            raise ValueError(f"verify: expected 1..{self.segment} tokens, found {len(tokens)}")
        state, logits = self._forward(state.cache, state.position, list(tokens))
        return state, logits, None

    def rollback(self, state: LMState, position: int) -> LMState:
        if not 0 <= position <= state.position:
            raise ValueError(f"rollback: expected a position in 0..{state.position}, found {position}")
        state.cache.crop(position - state.position)  # transformers 5: a negative count of tokens to remove
        return LMState(position, state.cache)


@dataclass(frozen=True)
class SegmentPolicy:
    """How long a drafter's segments are: the contract's bounds and the halt head's threshold."""

    min_tokens: int
    max_tokens: int
    halt_threshold: float


@dataclass(frozen=True)
class Verification:
    """One worker call over a drafted segment."""

    drafted: int  # k: tokens the drafter proposed (0 when its first one was outside the worker's vocabulary)
    accepted: int  # m: drafted tokens the worker agreed with, from the first
    ended: str  # why the segment ended: "halt", "eos", "vocab" (next id outside the worker's) or "length" (its allowed length)
    margin: float | None = None  # how far the worker preferred its own token to the first draft it rejected (logits)


@dataclass(frozen=True)
class Decoding:
    """One prompt decoded speculatively: the tokens and how they were made."""

    tokens: tuple[int, ...]  # new tokens, up to and including an EOS
    verifications: tuple[Verification, ...]
    worker_calls: int  # the prefill, the verifications and any plain decode steps

    def to_json(self) -> dict:
        return {"tokens": list(self.tokens), "worker_calls": self.worker_calls,
                "verifications": [[v.drafted, v.accepted, v.ended, v.margin] for v in self.verifications]}

    @classmethod
    def from_json(cls, data: dict) -> "Decoding":
        return cls(tuple(data["tokens"]), tuple(Verification(*v) for v in data["verifications"]), data["worker_calls"])


def _argmax(logits: np.ndarray) -> int:
    return int(np.argmax(logits))


def _more(out: list[int], max_new_tokens: int, eos_id: int, state, side: Side) -> bool:
    """Whether plain greedy decoding would make another token: below the bound, no EOS, room in the context."""
    return len(out) < max_new_tokens and out[-1] != eos_id and state.position < side.length


def greedy_decode(side: Side, prompt: list[int], max_new_tokens: int, eos_id: int) -> list[int]:
    """Plain greedy decoding: one prefill, then a decode step per token (what speculation must equal)."""
    state, logits, _ = side.prefill(list(prompt))
    out = [_argmax(logits)]
    while _more(out, max_new_tokens, eos_id, state, side):
        state, logits, _ = side.decode_step(state, out[-1])
        out.append(_argmax(logits))
    return out


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Where two token sequences first differ (one ending early counts), or None when equal."""
    if list(a) == list(b):
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def preference(side: Side, prompt: list[int], tokens: Sequence[int], at: int, other: int) -> float:
    """By how much ``side``'s plain greedy decoding preferred ``tokens[at]`` to ``other`` there (logits),
    replaying the same calls: a divergence by a tie (FP16 logits equal to the last bit or two) is
    numerics, not a verifier's mistake."""
    state, logits, _ = side.prefill(list(prompt))
    for token in tokens[:at]:
        state, logits, _ = side.decode_step(state, token)
    return float(logits[tokens[at]] - logits[other])


def accepted_prefix(drafts: list[int], predicted: np.ndarray) -> int:
    """How many drafts, from the first, equal the worker's argmax (``predicted[j]``: after the j-th token fed)."""
    m = 0
    while m < len(drafts) and drafts[m] == int(predicted[m]):
        m += 1
    return m


def _draft(drafter: Side, state, x: int, budget: int, worker_vocab: int, eos_id: int, policy: SegmentPolicy):
    """The drafter feeds ``x`` and proposes up to ``budget`` tokens; (state, drafts, why it ended)."""
    state, logits, _ = drafter.decode_step(state, x)
    drafts: list[int] = []
    while True:
        token = _argmax(logits)
        if token >= worker_vocab:
            return state, drafts, "vocab"
        drafts.append(token)
        if token == eos_id:
            return state, drafts, "eos"
        if len(drafts) >= budget:
            return state, drafts, "length"
        state, logits, halt = drafter.decode_step(state, token)
        if halt is not None and halt >= policy.halt_threshold and len(drafts) >= policy.min_tokens:
            return state, drafts, "halt"


def speculative_decode(drafter: Side, worker: Side, prompt: list[int], max_new_tokens: int, eos_id: int,
                       policy: SegmentPolicy) -> Decoding:
    """The worker's greedy decoding of ``prompt`` (at most ``max_new_tokens``, or to an EOS or the
    end of its context), made by verifying the drafter's segments."""
    prompt = list(prompt)
    wstate, logits, _ = worker.prefill(prompt)
    out, verifications, calls = [_argmax(logits)], [], 1
    dstate = drafter.prefill(prompt)[0] if len(prompt) < drafter.length else None
    while _more(out, max_new_tokens, eos_id, wstate, worker):
        budget = 0 if dstate is None else min(policy.max_tokens, worker.segment - 1, max_new_tokens - len(out) - 1,
                                               worker.length - wstate.position - 1, drafter.length - dstate.position - 1)
        if budget < 1:  # a context's end or the last token: the worker alone, as plain decoding
            wstate, logits, _ = worker.decode_step(wstate, out[-1])
            out.append(_argmax(logits))
            calls += 1
            continue
        start = wstate.position
        dstate, drafts, ended = _draft(drafter, dstate, out[-1], budget, worker.vocab_size, eos_id, policy)
        wstate, logits, _ = worker.verify(wstate, [out[-1], *drafts])
        predicted = np.argmax(logits, axis=-1)
        m = accepted_prefix(drafts, predicted)
        position = start + 1 + m
        wstate = worker.rollback(wstate, position)
        dstate = drafter.rollback(dstate, position) if dstate.position > position else dstate
        while dstate.position < position:  # all accepted and the last one not fed
            dstate = drafter.decode_step(dstate, drafts[dstate.position - start - 1])[0]
        new = [*drafts[:m], int(predicted[m])]
        out += new[: new.index(eos_id) + 1] if eos_id in new else new
        margin = float(logits[m, predicted[m]] - logits[m, drafts[m]]) if m < len(drafts) else None
        verifications.append(Verification(len(drafts), m, ended, margin))
        calls += 1
    return Decoding(tuple(out), tuple(verifications), calls)


@dataclass(frozen=True)
class SpeculativeMetrics:
    """What serving engines report for speculative decoding, over one run's prompts."""

    prompts: int
    tokens: int  # new tokens
    verifications: int
    drafted: int
    accepted: int
    acceptance_rate: float | None  # accepted / drafted
    mean_accepted_length: float | None  # tokens per verification: accepted drafts + the worker's own
    per_position: tuple[float, ...]  # P(the i-th drafted token is accepted | drafted), i = 1, 2, ...
    worker_calls: int
    plain_calls: int  # plain greedy decoding's calls for the same tokens: a prefill, then one per token after the first
    segment_lengths: dict[int, int]  # drafted tokens -> verifications
    segment_accepted_fraction: float | None  # mean over segments (k >= 1) of accepted / drafted
    halted: float | None  # share of segments the drafter's halt head ended
    rejections: int  # verifications that rejected a draft
    max_rejection_margin: float | None  # the most a worker preferred its own token to a rejected draft (ties: about 0)

    @property
    def calls_saved(self) -> float:
        return 1 - self.worker_calls / self.plain_calls if self.plain_calls else 0.0

    @classmethod
    def of_records(cls, records: Iterable[dict]) -> "SpeculativeMetrics":
        """Over recorded runs (speculative/report.json's ``runs``), every prompt's decoding pooled."""
        return cls.of([Decoding.from_json(p["speculative"]) for record in records for p in record["prompts"]])

    @classmethod
    def of(cls, decodings: Sequence[Decoding]) -> "SpeculativeMetrics":
        vs = [v for d in decodings for v in d.verifications]
        drafted, accepted = sum(v.drafted for v in vs), sum(v.accepted for v in vs)
        longest = max((v.drafted for v in vs), default=0)
        per_position = tuple(sum(v.accepted >= i for v in vs if v.drafted >= i) / sum(v.drafted >= i for v in vs)
                             for i in range(1, longest + 1))
        segments = [v for v in vs if v.drafted]
        rejected = [v.margin for v in vs if v.accepted < v.drafted]
        return cls(
            prompts=len(decodings), tokens=sum(len(d.tokens) for d in decodings), verifications=len(vs),
            drafted=drafted, accepted=accepted,
            acceptance_rate=accepted / drafted if drafted else None,
            mean_accepted_length=(accepted + len(vs)) / len(vs) if vs else None,
            per_position=per_position,
            worker_calls=sum(d.worker_calls for d in decodings), plain_calls=sum(len(d.tokens) for d in decodings),
            segment_lengths=dict(sorted(Counter(v.drafted for v in vs).items())),
            segment_accepted_fraction=sum(v.accepted / v.drafted for v in segments) / len(segments) if segments else None,
            halted=sum(v.ended == "halt" for v in segments) / len(segments) if segments else None,
            rejections=len(rejected), max_rejection_margin=max(rejected) if rejected else None,
        )

    def to_json(self) -> dict:
        return {**asdict(self), "calls_saved": round(self.calls_saved, 6)}

    def line(self) -> str:
        """One line for a log or the kdcontracts summary."""
        def number(value):
            return "n/a" if value is None else f"{value:.3f}"

        positions = " ".join(f"{p:.2f}" for p in self.per_position)
        return (f"acceptance {number(self.acceptance_rate)} ({self.accepted}/{self.drafted}), "
                f"{number(self.mean_accepted_length)} tokens/verification, per position [{positions}], "
                f"worker calls {self.worker_calls} vs {self.plain_calls} plain ({self.calls_saved:.0%} saved), "
                f"segments {self.segment_lengths}, accepted fraction {number(self.segment_accepted_fraction)}, "
                f"halted {number(self.halted)}, {self.rejections} rejection(s)"
                + ("" if self.max_rejection_margin is None else f" (worker's margin up to {self.max_rejection_margin:.3g})"))


def check_shared_vocabulary(drafter, worker) -> None:
    """A pair must read the ids both tokenizers have the same way: a token in both with another id
    in each, or an id below both sizes naming different tokens, is an error naming both."""
    dv, wv = drafter.vocab, worker.vocab
    by_id = {i: t for t, i in wv.items()}
    shared = min(len(dv), len(wv))
    differ = sorted({(t, i, wv[t]) for t, i in dv.items() if t in wv and wv[t] != i}
                    | {(t, i, wv.get(t)) for t, i in dv.items() if i < shared and by_id.get(i) not in (None, t)})
    if differ:
        shown = "; ".join(f"{t!r}: {i} in {drafter.name}, {w} in {worker.name}" for t, i, w in differ[:5])
        raise ConfigError(f"speculative pair {drafter.name} -> {worker.name}: tokenizers {drafter.path} and {worker.path}: "
                          f"expected the same id for every token both have, found {len(differ)} that differ ({shown})")
