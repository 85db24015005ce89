"""Prefill, decode and verify as static-shape modules with an explicit KV cache, ready for torch.export.

Host API (version ``HOST_API_VERSION``; 1.1 adds verify to 1.0), one set per enumerated length L:

- ``prefill(input_ids[1, L] int32, attention_mask[1, L] int32) -> (logits[1, V], halt[1])``
  writes cache slots 0..L-1; the prompt is right-padded, logits are at its last real token.
- ``decode(input_ids[1, 1] int32, position[1] int32) -> (logits[1, V], halt[1])`` writes slot
  ``position`` and attends to slots 0..position; the host passes position = tokens so far.
- ``verify(input_ids[1, S] int32, position[1] int32) -> (logits[1, S, V], halt[1, S])``: S
  tokens at once (S: the contract's segment length), token j written to slot position + j and
  attending to slots 0..position + j: speculative decoding's one worker call per drafted
  segment. Slots past L are not written (a short segment's padding), and nothing is read
  from slots past a token's own, so a host rolls a cache back by moving its position.

The cache is two registered buffers, ``k_cache`` and ``v_cache`` [layers, kv_heads, L,
head_dim], written by whole-slice assignment. They are FP32 in torch and declared FP16
states to Core ML, which inserts the casts (an FP16 buffer written from an FP32 graph does
not convert: slice_update would mix dtypes). The assignment that converts to Core ML states
(read_state / slice_update / coreml_update_state), shared by the functions of one
multifunction mlpackage. Decode blends the new row in with a one-hot select rather than a
data-dependent slice, so every shape stays static.
"""

from __future__ import annotations

import torch
from torch import nn

from kdtrain.student.model import MASK_MIN, StudentLM, rope_tables

HOST_API_VERSION = "1.1"
# Tokens one verify call takes when no contract says: the stages read S from coreml_contract.json's
# verify IO (``CoreMLContract.segment``); this default serves code without a contract.
SEGMENT = 8


class _CachedProgram(nn.Module):
    def __init__(self, student: StudentLM, length: int):
        super().__init__()
        c = student.config
        self.student, self.length = student, length
        cos, sin = rope_tables(c, length)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        shape = (c.num_hidden_layers, c.num_key_value_heads, length, c.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape))
        self.register_buffer("v_cache", torch.zeros(shape))

    def _head(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [1, H] -> logits [1, V], halt [1]."""
        h = self.student.model.norm(hidden)
        return self.student.lm_head(h), self.student.halt_probability(h)


class PrefillProgram(_CachedProgram):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        s = self.student
        # Positions count real tokens (right padding): pads sit after every real token, so
        # "key <= query" masks them, and nothing here is a constant [L, L] for the converter
        # to fold into the package (at L=4096 that would be 16M mask values on disk).
        count = torch.cumsum(attention_mask, dim=-1, dtype=torch.int32)[0]  # [L]
        allowed = torch.logical_and(count[None, :] <= count[:, None], attention_mask > 0)  # [L, L]
        h = s.model.embed_tokens(input_ids)  # [1, L, H]
        # Additive, FP16-safe: 0 where allowed, MASK_MIN elsewhere. Arithmetic, not
        # where(allowed, 0.0, MASK_MIN): Core ML would broadcast both scalars to [L, L] consts.
        mask = (allowed.to(h.dtype) - 1.0) * -MASK_MIN
        for i, layer in enumerate(s.model.layers):
            h, k, v = layer(h, self.rope_cos, self.rope_sin, mask)
            self.k_cache[i] = k[0]
            self.v_cache[i] = v[0]
        total = count[-1:]  # [1] number of real tokens
        select = torch.logical_and(count == total, attention_mask[0] > 0).to(h.dtype)  # [L] one-hot: last real token
        return self._head(torch.matmul(select, h[0])[None])


class DecodeProgram(_CachedProgram):
    def forward(self, input_ids: torch.Tensor, position: torch.Tensor):
        s, L = self.student, self.length
        slots = torch.arange(L, dtype=torch.int32)
        write = (slots == position)[:, None]  # [L, 1]
        mask = torch.where(slots <= position, 0.0, MASK_MIN)[None]  # [1, L]
        cos = torch.index_select(self.rope_cos, 0, position)  # [1, hd]
        sin = torch.index_select(self.rope_sin, 0, position)
        h = s.model.embed_tokens(input_ids)  # [1, 1, H]
        for i, layer in enumerate(s.model.layers):
            h, k, v = layer(h, cos, sin, mask, self.k_cache[i], self.v_cache[i], write)  # k, v: [1, nkv, L, hd]
            self.k_cache[i] = k[0]
            self.v_cache[i] = v[0]
        return self._head(h[:, 0])


class VerifyProgram(_CachedProgram):
    """``segment`` tokens at cache slots position..position + segment - 1 in one call."""

    def __init__(self, student: StudentLM, length: int, segment: int = SEGMENT):
        super().__init__(student, length)
        self.segment = segment

    def forward(self, input_ids: torch.Tensor, position: torch.Tensor):
        s, L, S = self.student, self.length, self.segment
        slots = torch.arange(L, dtype=torch.int32)
        positions = position + torch.arange(S, dtype=torch.int32)  # [S]
        onehot = (slots[:, None] == positions[None, :]).to(self.k_cache.dtype)  # [L, S]: nothing past L
        write = onehot.sum(-1, keepdim=True) > 0  # [L, 1]
        mask = torch.where(slots[None, :] <= positions[:, None], 0.0, MASK_MIN)  # [S, L]
        # A padded tail past L reads the last table row; its outputs are ignored. minimum, not clamp:
        # Core ML's clip is float-only, and a float index does not convert into the gather.
        rows = torch.minimum(positions, slots[-1:])
        cos = torch.index_select(self.rope_cos, 0, rows)  # [S, hd]
        sin = torch.index_select(self.rope_sin, 0, rows)
        h = s.model.embed_tokens(input_ids)  # [1, S, H]
        for i, layer in enumerate(s.model.layers):
            h, k, v = layer(h, cos, sin, mask, self.k_cache[i], self.v_cache[i], write, onehot)
            self.k_cache[i] = k[0]
            self.v_cache[i] = v[0]
        h = s.model.norm(h[0])  # [S, H]
        return s.lm_head(h)[None], s.halt_probability(h)[None]


def example_inputs(function: str, length: int, segment: int = SEGMENT) -> tuple[torch.Tensor, ...]:
    if function == "prefill":
        return torch.ones((1, length), dtype=torch.int32), torch.ones((1, length), dtype=torch.int32)
    if function == "verify":
        return torch.ones((1, segment), dtype=torch.int32), torch.zeros((1,), dtype=torch.int32)
    return torch.ones((1, 1), dtype=torch.int32), torch.zeros((1,), dtype=torch.int32)


PROGRAMS = {"prefill": PrefillProgram, "decode": DecodeProgram, "verify": VerifyProgram}


def build_program(function: str, student: StudentLM, length: int, segment: int = SEGMENT) -> nn.Module:
    """``function``'s program at ``length`` in eval mode; verify's takes ``segment`` tokens a call.
    Looked up in PROGRAMS at each call, so a test can plant a faulty program there."""
    program = PROGRAMS[function]
    return (program(student, length, segment) if function == "verify" else program(student, length)).eval()
