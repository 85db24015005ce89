"""Greedy assistant turns from a student or a teacher, for the gates and the curriculum telemetry.

One interface, :class:`Generator`: ``turn(messages, max_new_tokens)`` renders the
conversation with the model's chat template, asks for the next assistant turn and decodes
greedily to the EOS that closes a turn or to the bound. Whatever a gate judges (a tool call,
an answer's length, where the halt head fires) is measured on these turns, the same way for
every model.

- :class:`StudentGenerator` decodes a batch of conversations at once over a KV cache and
  keeps the halt head's probability after every generated token.
- :class:`LocalModelGenerator` batches a local transformers model's greedy decoding;
  :class:`TeacherGenerator` asks any :class:`kdtrain.teacher.base.Teacher` (an
  OpenAI-compatible endpoint) for ``generate`` requests: temperature 0, as the cache does, so
  an API teacher answers the same way it wrote the targets. :func:`teacher_generator` picks
  one from the distill config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from kdcontracts.models.tokens import Message
from kdtrain.data.chat import ChatFormat


@dataclass(frozen=True)
class Turn:
    text: str  # the turn's content, the closing EOS excluded
    tokens: int  # generated tokens, the EOS excluded (the generating model's tokenizer)
    stopped: bool  # it closed the turn with the EOS (False: it reached max_new_tokens or the context)
    halt: tuple[float, ...] | None = None  # the student's P(turn complete) after each generated token


class Generator(Protocol):
    name: str

    def turn(self, messages: Sequence[Message], max_new_tokens: int) -> Turn: ...

    def turns(self, conversations: Sequence[Sequence[Message]], max_new_tokens: int) -> list[Turn]: ...


class _Batched:
    """Rendering and batching shared by the local generators; ``_greedy(prompt ids, bound)`` decodes one batch."""

    def __init__(self, tokenizer, name: str, batch_size: int):
        self.name, self.tokenizer, self.chat = name, tokenizer, ChatFormat.of(tokenizer)
        self.eos_id = tokenizer.token_to_id(tokenizer.eos_token)
        self.batch_size = batch_size

    def turn(self, messages: Sequence[Message], max_new_tokens: int) -> Turn:
        return self.turns([messages], max_new_tokens)[0]

    def turns(self, conversations: Sequence[Sequence[Message]], max_new_tokens: int) -> list[Turn]:
        prompts = [self.tokenizer.encode(self.chat.prompt(m)).ids for m in conversations]
        found: list[Turn] = []
        for i in range(0, len(prompts), self.batch_size):
            found += self._greedy(prompts[i:i + self.batch_size], max_new_tokens)
        return found


class StudentGenerator(_Batched):
    """The student's greedy turns, a batch at a time, over a KV cache.

    Written here rather than through the host API's batch-1 programs because the gates decode
    hundreds of turns on CPU: prompts are left-padded into one batch (RoPE makes attention
    depend on relative positions only, so the padding shift changes nothing but rounding),
    prefilled once, then decoded one token per step for the whole batch, each row stopping at
    its EOS. ``tests/test_generate.py`` holds it to the host API's own prefill/decode tokens.
    """

    def __init__(self, student, tokenizer, name: str = "student", batch_size: int = 64):
        super().__init__(tokenizer, name, batch_size)
        self.student = student.eval()

    @torch.no_grad()
    def _greedy(self, prompts: list[list[int]], max_new_tokens: int) -> list[Turn]:
        from kdtrain.student.model import MASK_MIN, rope_tables

        s, c = self.student, self.student.config
        b, width = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((b, width), self.eos_id, dtype=torch.long)
        real = torch.zeros((b, width + max_new_tokens), dtype=torch.bool)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            real[row, width - len(prompt):width] = True
        cos, sin = rope_tables(c, width + max_new_tokens)
        causal = torch.arange(width)[None, :] <= torch.arange(width)[:, None]
        mask = torch.where(causal[None] & real[:, None, :width], 0.0, MASK_MIN)[:, None]  # [B, 1, T, T]
        h, cache = s.model.embed_tokens(ids), []
        for layer in s.model.layers:
            h, k, v = layer(h, cos[:width], sin[:width], mask)
            cache.append((k, v))
        last = s.model.norm(h[:, -1])
        out_ids: list[list[int]] = [[] for _ in range(b)]
        halts: list[list[float]] = [[] for _ in range(b)]
        done = torch.zeros(b, dtype=torch.bool)
        for step in range(max_new_tokens):
            token = s.lm_head(last).argmax(-1)  # [B]
            done |= token == self.eos_id
            if bool(done.all()):
                break
            pos = width + step
            real[:, pos] = ~done
            for row in torch.nonzero(~done).flatten().tolist():
                out_ids[row].append(int(token[row]))
            mask = torch.where(real[:, None, None, :pos + 1], 0.0, MASK_MIN)  # [B, 1, 1, S]
            h = s.model.embed_tokens(token[:, None])
            for i, layer in enumerate(s.model.layers):
                q, k, v = layer.self_attn.project(layer.input_layernorm(h), cos[pos:pos + 1], sin[pos:pos + 1])
                k, v = torch.cat([cache[i][0], k], 2), torch.cat([cache[i][1], v], 2)
                cache[i] = (k, v)
                h = h + layer.self_attn.attend(q, k, v, mask)
                h = h + layer.mlp(layer.post_attention_layernorm(h))
            last = s.model.norm(h[:, 0])
            halt = s.halt_probability(last)
            for row in torch.nonzero(~done).flatten().tolist():
                halts[row].append(round(float(halt[row]), 6))
        return [Turn(self.tokenizer.decode(out_ids[r]), len(out_ids[r]), bool(done[r]), tuple(halts[r])) for r in range(b)]


class TeacherGenerator:
    """Any teacher's greedy turns: generate-mode requests (kdtrain.teacher.fill.build_request) to
    ``teacher.complete``, one conversation at a time (an API teacher; its client retries and books the budget)."""

    def __init__(self, teacher, tokenizer, settings, name: str = "teacher"):
        self.name, self.teacher, self.tokenizer = name, teacher, tokenizer
        self.settings = dataclasses.replace(settings, mode="generate")

    def turn(self, messages: Sequence[Message], max_new_tokens: int) -> Turn:
        from kdtrain.teacher.fill import build_request

        settings = dataclasses.replace(self.settings, max_new_tokens=max_new_tokens)
        response = self.teacher.complete(build_request(f"{self.name}-turn", messages, self.tokenizer, settings))
        tokens = int(len(response.token_ids))
        return Turn(response.text, tokens, tokens < max_new_tokens)

    def turns(self, conversations: Sequence[Sequence[Message]], max_new_tokens: int) -> list[Turn]:
        return [self.turn(m, max_new_tokens) for m in conversations]


class LocalModelGenerator(_Batched):
    """A local transformers causal LM's greedy turns, batched (left padding, ``model.generate``):
    the same answers as the local teacher's generate mode, many at once."""

    def __init__(self, model, tokenizer, name: str = "teacher", batch_size: int = 64):
        super().__init__(tokenizer, name, batch_size)
        self.model = model.eval()

    @torch.no_grad()
    def _greedy(self, prompts: list[list[int]], max_new_tokens: int) -> list[Turn]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.eos_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):], mask[row, width - len(prompt):] = torch.tensor(prompt), 1
        out = self.model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                  eos_token_id=self.eos_id, pad_token_id=self.eos_id)
        turns = []
        for row in out[:, width:].tolist():
            stopped = self.eos_id in row
            new = row[: row.index(self.eos_id)] if stopped else row
            turns.append(Turn(self.tokenizer.decode(new), len(new), stopped))
        return turns


def teacher_generator(config, folder, name: str = "teacher") -> Generator:
    """The distill config's teacher as a generator: the local model batched, or the API endpoint
    (``teacher.openai``) through its client and budget."""
    from kdtrain.tokenizers.load import load_tokenizer

    tokenizer = load_tokenizer(folder, "teacher")
    if config.teacher.backend == "local":
        from kdtrain.teacher import source

        return LocalModelGenerator(source.load_model(config.teacher.source), tokenizer, name)
    from kdtrain.teacher.stage import _api_teacher

    return TeacherGenerator(_api_teacher(config, folder), tokenizer, config.teacher.settings(), name)
