"""Speculative decoding (kdtrain.runtime.speculative) on tiny random models: the output is the
worker's plain greedy decoding token for token whatever the drafter, prompt, bound and segment
policy; rollback leaves a cache as if the rejected tokens were never fed; a segment near the
context's end shrinks, then the worker goes on alone; a drafted id the worker cannot read ends
the segment; the halt head ends segments within their bounds; the metrics count as serving
engines report them."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdtrain.errors import ConfigError
from kdtrain.runtime.backend import TorchSession
from kdtrain.runtime.host import Host
from kdtrain.runtime.speculative import (CausalLMSide, Decoding, HostSide, SegmentPolicy, SpeculativeMetrics, Verification,
                                        check_shared_vocabulary, first_difference, greedy_decode, preference, speculative_decode)
from kdtrain.student.model import StudentConfig, StudentLM

VOCAB, LENGTH, SEGMENT, EOS = 61, 24, 8, 2


def _student(seed: int, vocab: int = VOCAB, noise_of: StudentLM | None = None) -> StudentLM:
    """A random student; with ``noise_of``, that student's weights plus noise (a drafter that agrees often, not always)."""
    torch.manual_seed(seed)
    config = StudentConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    student = StudentLM(config).eval()
    if noise_of is not None:
        with torch.no_grad():
            for mine, theirs in zip(student.parameters(), noise_of.parameters()):
                mine.copy_(theirs + 0.3 * theirs.abs().mean() * torch.randn_like(theirs))
    return student


def _side(student: StudentLM, length: int = LENGTH) -> HostSide:
    return HostSide(Host(TorchSession(student, length, SEGMENT), length, 0), SEGMENT, student.config.vocab_size)


WORKER = _student(0)
SIDES = {"worker": _side(WORKER), "noisy": _side(_student(1, noise_of=WORKER)), "stranger": _side(_student(2))}
SIDES["self"] = _side(WORKER)  # the worker's own weights, another session


pytestmark = pytest.mark.usefixtures("one_torch_thread")


policies = st.builds(lambda lo, extra, threshold: SegmentPolicy(lo, lo + extra, threshold),
                     st.integers(1, 3), st.integers(0, SEGMENT - 4), st.sampled_from([0.0001, 0.5, 1.0]))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(drafter=st.sampled_from(["noisy", "stranger", "self"]), prompt=st.lists(st.integers(3, VOCAB - 1), min_size=1, max_size=LENGTH - 1),
       new_tokens=st.integers(1, LENGTH), policy=policies)
def test_speculative_output_is_the_workers_plain_greedy_decoding(drafter, prompt, new_tokens, policy):
    worker = SIDES["worker"]
    plain = greedy_decode(worker, prompt, new_tokens, EOS)
    decoding = speculative_decode(SIDES[drafter], worker, prompt, new_tokens, EOS, policy)
    assert list(decoding.tokens) == plain
    assert decoding.worker_calls <= len(plain)  # never more calls than plain decoding: each verification yields a token or more
    for v in decoding.verifications:
        assert 0 <= v.accepted <= v.drafted <= min(policy.max_tokens, SEGMENT - 1)
        assert (v.margin is None) == (v.accepted == v.drafted) and (v.margin or 0) >= 0  # the worker's argmax beat the draft
        assert v.drafted >= policy.min_tokens or v.ended in ("eos", "length")


def test_a_drafter_drafting_for_itself_accepts_every_token():
    decoding = speculative_decode(SIDES["self"], SIDES["worker"], [5, 6, 7], 16, EOS, SegmentPolicy(1, 7, 1.0))
    metrics = SpeculativeMetrics.of([decoding])
    assert metrics.acceptance_rate == 1.0 and set(metrics.per_position) == {1.0}
    assert metrics.worker_calls < metrics.plain_calls


def test_rollback_leaves_the_cache_as_if_the_rejected_tokens_were_never_fed():
    worker, prompt, tokens = SIDES["worker"], [4, 9, 11], [7, 8, 9, 10, 11]
    state, _, _ = worker.prefill(prompt)
    state, _, _ = worker.verify(state, [20, 21, 22, 23, 24, 25])  # six tokens, all rejected
    state = worker.rollback(state, len(prompt))
    state, logits, halt = worker.verify(state, tokens)
    fresh, _, _ = worker.prefill(prompt)
    for j, token in enumerate(tokens):
        fresh, step, step_halt = worker.decode_step(fresh, token)
        np.testing.assert_allclose(logits[j], step, atol=1e-4)
        assert halt[j] == pytest.approx(step_halt, abs=1e-5)


@pytest.mark.parametrize("room", [1, 2, 3, 5])
def test_a_segment_at_the_contexts_end_shrinks_and_the_worker_finishes_alone(room):
    """``room`` free slots after the prompt: segments fit the slots left, decoding stops where plain decoding does."""
    prompt = list(range(3, 3 + LENGTH - room))
    plain = greedy_decode(SIDES["worker"], prompt, 50, EOS)
    decoding = speculative_decode(SIDES["self"], SIDES["worker"], prompt, 50, EOS, SegmentPolicy(1, 7, 1.0))
    assert list(decoding.tokens) == plain and len(plain) == room + 1  # the last token is made, never fed
    assert all(v.drafted <= room - 1 for v in decoding.verifications)


def test_a_shorter_drafter_context_leaves_the_rest_to_plain_decode_steps():
    drafter, prompt = _side(WORKER, length=10), [5, 6, 7, 8, 9, 10]
    decoding = speculative_decode(drafter, SIDES["worker"], prompt, 14, EOS, SegmentPolicy(1, 7, 1.0))
    assert list(decoding.tokens) == greedy_decode(SIDES["worker"], prompt, 14, EOS)
    fed = len(prompt) + sum(1 + v.accepted for v in decoding.verifications)
    assert fed <= drafter.length and decoding.worker_calls > 1 + len(decoding.verifications)  # then plain steps


class _WiderVocabulary:
    """The worker's own weights behind a tokenizer with more ids: every third proposal is an id the worker lacks."""

    def __init__(self, side: HostSide, extra: int = 4):
        self.side, self.calls, self.name, self.length, self.segment = side, 0, "drafter", side.length, side.segment
        self.vocab_size = side.vocab_size + extra

    def prefill(self, prompt):
        return self.side.prefill(prompt)

    def decode_step(self, state, token):
        state, logits, halt = self.side.decode_step(state, token)
        self.calls += 1
        extra = np.full(self.vocab_size - self.side.vocab_size, -1e9, dtype=np.float32)
        extra[1] = 1e9 if self.calls % 3 == 0 else -1e9
        return state, np.concatenate([logits, extra]), halt

    def rollback(self, state, position):
        return self.side.rollback(state, position)


def test_a_drafted_id_outside_the_workers_vocabulary_ends_the_segment_before_it():
    drafter, worker = _WiderVocabulary(SIDES["self"]), SIDES["worker"]
    decoding = speculative_decode(drafter, worker, [5, 6, 7], 20, EOS, SegmentPolicy(1, 7, 1.0))
    assert list(decoding.tokens) == greedy_decode(worker, [5, 6, 7], 20, EOS)
    ended = [v for v in decoding.verifications if v.ended == "vocab"]
    assert ended and all(v.accepted == v.drafted for v in ended)  # what came before it was the worker's own choice


@pytest.mark.parametrize("bias", [30.0, -30.0], ids=["always-fires", "never-fires"])
def test_the_halt_head_ends_segments_within_min_and_max(bias):
    drafter_model = _student(1, noise_of=WORKER)
    with torch.no_grad():
        drafter_model.halt_head.weight.zero_()
        drafter_model.halt_head.bias.fill_(bias)
    decoding = speculative_decode(_side(drafter_model), SIDES["worker"], [5], 22, EOS, SegmentPolicy(2, 6, 0.5))
    lengths = [v.drafted for v in decoding.verifications]
    if bias > 0:  # ends every segment at the minimum (the last ones end where the tokens still wanted do)
        assert max(lengths) == 2 and all(v.ended == "halt" for v in decoding.verifications[:-2])
    else:  # never ends one: segments run to the maximum
        assert "halt" not in {v.ended for v in decoding.verifications} and max(lengths) == 6


def test_a_transformers_worker_verifies_in_one_forward_and_crops_its_cache():
    """A Llama with the student's weights (the same parameter names) as the worker: the student
    drafts for it on the host API; its DynamicCache is cropped on rollback."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = WORKER.config
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                                         num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                                         num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
                                         rope_theta=c.rope_theta, tie_word_embeddings=False, max_position_embeddings=64))
    llama.load_state_dict({k: v for k, v in WORKER.state_dict().items() if not k.startswith("halt_head")}, strict=False)
    worker = CausalLMSide(llama, SEGMENT)
    for prompt in ([5, 6, 7], list(range(3, 20))):
        plain = greedy_decode(worker, prompt, 30, EOS)
        for drafter in ("self", "noisy"):
            decoding = speculative_decode(SIDES[drafter], worker, prompt, 30, EOS, SegmentPolicy(1, 7, 1.0))
            assert list(decoding.tokens) == plain
    own = speculative_decode(SIDES["self"], worker, [5, 6, 7], 20, EOS, SegmentPolicy(1, 7, 1.0))
    assert SpeculativeMetrics.of([own]).acceptance_rate > 0.9  # the same weights in another implementation
    state, _, _ = worker.prefill([5, 6, 7])
    state, _, _ = worker.verify(state, [8, 9, 10, 11])
    assert worker.rollback(state, 4).cache.get_seq_length() == 4


def test_metrics_count_as_serving_engines_report_them():
    decodings = [Decoding((1, 2, 3, 4, 5, 6), (Verification(3, 1, "length", 0.5), Verification(2, 2, "halt")), 3),
                 Decoding((7, 8, 9), (Verification(4, 0, "length", 2.0), Verification(0, 0, "vocab")), 3)]
    m = SpeculativeMetrics.of(decodings)
    assert (m.drafted, m.accepted, m.verifications) == (9, 3, 4)
    assert m.acceptance_rate == pytest.approx(3 / 9)
    assert m.mean_accepted_length == pytest.approx((3 + 4) / 4)  # accepted drafts + the worker's own token, per verification
    assert m.per_position == pytest.approx((2 / 3, 1 / 3, 0 / 2, 0 / 1))  # P(i-th accepted | i-th drafted)
    assert (m.worker_calls, m.plain_calls, m.calls_saved) == (6, 9, pytest.approx(1 / 3))
    assert m.segment_lengths == {0: 1, 2: 1, 3: 1, 4: 1}
    assert m.segment_accepted_fraction == pytest.approx((1 / 3 + 1 + 0) / 3)  # segments with a drafted token
    assert m.halted == pytest.approx(1 / 3)
    assert (m.rejections, m.max_rejection_margin) == (2, 2.0)


def test_a_divergence_at_a_tie_is_measured_as_a_zero_margin():
    """Two tokens with the same LM-head row tie everywhere: plain decoding preferred either by about 0
    (the last bits of the matmul), while a real choice shows as a positive margin."""
    twin = _student(0)
    with torch.no_grad():
        twin.lm_head.weight[VOCAB - 1] = twin.lm_head.weight[VOCAB - 2]
    side = _side(twin)
    tokens = greedy_decode(side, [5], 6, EOS)
    assert first_difference(tokens, tokens) is None and first_difference(tokens, [*tokens[:2], -1]) == 2
    assert first_difference(tokens, tokens[:3]) == 3  # one ending early counts
    assert preference(side, [5, *tokens[:2]], [VOCAB - 2], 0, VOCAB - 1) == pytest.approx(0, abs=1e-6)  # BLAS rounds rows apart
    assert preference(side, [5], tokens, 2, (tokens[2] + 1) % VOCAB) > 0


def _tokenizer(name: str, vocab: dict[str, int]):
    return SimpleNamespace(name=name, path=f"tokenizers/{name}", vocab=vocab)


def test_tokenizers_that_disagree_on_shared_ids_are_an_error_naming_both():
    teacher = _tokenizer("teacher", {"a": 0, "b": 1, "c": 2})
    check_shared_vocabulary(_tokenizer("student", {"a": 0, "b": 1, "c": 2, "<think>": 3}), teacher)  # adds ids: fine
    with pytest.raises(ConfigError, match=r"tokenizers/student and tokenizers/teacher.*'b': 2 in student, 1 in teacher"):
        check_shared_vocabulary(_tokenizer("student", {"a": 0, "c": 1, "b": 2}), teacher)
