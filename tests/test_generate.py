"""The gates' batched greedy decoder (kdtrain.runtime.generate) against the host API's own
prefill/decode programs: the same tokens and halt probabilities, row for row, whatever the
batch's padding."""

from __future__ import annotations

import numpy as np
import torch

from kdcontracts.models.tokens import Message
from kdtrain.data.chat import ChatFormat
from kdtrain.runtime.backend import TorchSession
from kdtrain.runtime.generate import StudentGenerator
from kdtrain.runtime.host import Host
from kdtrain.student.model import StudentConfig, StudentLM
from kdtrain.tokenizers.load import Tokenizer

CONVERSATIONS = [
    [Message("user", "Hi")],
    [Message("system", "You are terse."), Message("user", "What is the weather in Paris, and should I take an umbrella?")],
    [Message("user", "Count: one two three four five six seven")],
]


def _student(vocab: int, eos: int) -> StudentLM:
    torch.manual_seed(0)
    config = StudentConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    student = StudentLM(config).eval()
    with torch.no_grad():
        student.lm_head.weight[eos] -= 5.0  # a random model ends a turn at once too often for a useful comparison
        student.halt_head.bias.fill_(0.0)
    return student


def _host_greedy(student, tokenizer, messages, max_new_tokens):
    host = Host(TorchSession(student, 256), 256, tokenizer.token_to_id(tokenizer.eos_token))
    eos = tokenizer.token_to_id(tokenizer.eos_token)
    state, out = host.run_prefill(tokenizer.encode(ChatFormat.of(tokenizer).prompt(messages)).ids)
    ids, halts = [], []
    while len(ids) < max_new_tokens:
        token = int(np.argmax(out["logits"]))
        if token == eos:
            break
        ids.append(token)
        state, out = host.run_decode(state, token)
        halts.append(out["halt"])
    return ids, halts


def test_batched_turns_equal_the_host_apis_greedy_decoding(tmp_path):
    from tiny_family import build_tokenizer

    tokenizer = Tokenizer("student", build_tokenizer(tmp_path / "tok"), "transformers")
    student = _student(len(tokenizer.vocab), tokenizer.token_to_id(tokenizer.eos_token))
    turns = StudentGenerator(student, tokenizer, batch_size=3).turns(CONVERSATIONS, max_new_tokens=12)
    for messages, turn in zip(CONVERSATIONS, turns, strict=True):
        ids, halts = _host_greedy(student, tokenizer, messages, 12)
        assert turn.tokens == len(ids) and turn.text == tokenizer.decode(ids)
        assert turn.stopped == (len(ids) < 12)
        np.testing.assert_allclose(turn.halt, halts, atol=1e-5)
