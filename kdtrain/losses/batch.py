"""One batch for every loss, built once: ids, labels, aligned teacher targets and masks.

Every [B, S] target or mask is indexed by *predicting position*: entry ``t`` belongs to the
token that the logits (and the hidden state) at ``t`` predict, token ``t + 1``. So
``labels[:, t]`` is ``input_ids[:, t + 1]`` where that token is supervised, the teacher
top-k at ``t`` is the teacher's distribution for token ``t + 1``, and ``halt_targets`` is 1
at the position whose next token is the EOS closing an assistant turn. Turn
tensors [B, T] hold predicting positions too: a turn runs from the position predicting its
first token (``turn_starts``) to the one predicting its closing EOS
(``turn_ends``); -1 pads samples with fewer turns. The teacher's length of a turn is the
number of student tokens it has under teacher forcing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from kdtrain.data.chat import IGNORE_INDEX, ChatFormat, supervised_labels
from kdtrain.data.collate import pad_batch
from kdtrain.data.targets import DistillExample
from kdtrain.errors import DataError
from kdtrain.losses.align import align_targets, overlapping_positions
from kdtrain.losses.code_mode import decision, first_token
from kdtrain.losses.tool import tool_spans
from kdtrain.tokenizers.migration import TAGS

CALL = "<tool_call>"


@dataclass(frozen=True)
class DistillBatch:
    input_ids: torch.Tensor  # [B, S] int64, right-padded with EOS
    attention_mask: torch.Tensor  # [B, S] int64, 1 = real token
    offsets: torch.Tensor  # [B, S, 2] int64: each student token's character span (for live-teacher alignment)
    labels: torch.Tensor  # [B, S] int64: the token predicted at t if supervised, else IGNORE_INDEX
    teacher_ids: torch.Tensor  # [B, S, K] int64: teacher top-k in the student vocabulary, -1 = none
    teacher_logprobs: torch.Tensor  # [B, S, K] float32
    kd_mask: torch.Tensor  # [B, S] bool: a teacher distribution corresponds (same span)
    tool_name_mask: torch.Tensor  # [B, S] bool: the predicted token overlaps a tool name
    tool_args_mask: torch.Tensor  # [B, S] bool: ... a tool call's arguments object
    integration_mask: torch.Tensor  # [B, S] bool: ... an answer span restating a tool result
    halt_targets: torch.Tensor  # [B, S] float32: 1 where the predicted token closes an assistant turn
    turn_starts: torch.Tensor  # [B, T] int64, -1 = no turn
    turn_ends: torch.Tensor  # [B, T] int64: position predicting the turn's closing EOS
    call_positions: torch.Tensor  # [B, T] int64: position predicting the turn's first <tool_call>, -1 = none
    eligible: torch.Tensor  # [B] bool: sample.meta.eligible.code_mode
    decision_positions: torch.Tensor  # [B] int64: position predicting the first call's tool name, -1 = none
    chosen_ids: torch.Tensor  # [B] int64: first token of run_code
    rejected_ids: torch.Tensor  # [B] int64: first token of the direct tool name
    eos_id: int
    call_id: int
    teacher_hidden: tuple[torch.Tensor, ...] = ()  # optional, [B, S, Ht] per layer pair, by token position
    hidden_mask: torch.Tensor | None = None  # [B, S] bool, with teacher_hidden

    @property
    def supervised(self) -> torch.Tensor:
        """[B, S] bool: positions with a label (also the halt head's positions)."""
        return self.labels != IGNORE_INDEX

    @property
    def aligned_fraction(self) -> float:
        """Share of supervised positions that have a teacher distribution (the rest get CE only)."""
        return float(self.kd_mask.sum()) / max(1, int(self.supervised.sum()))

    @property
    def teacher_lengths(self) -> torch.Tensor:
        """[B, T] int64: tokens per assistant turn in the data (the teacher's length), 0 = no turn."""
        return torch.where(self.turn_starts >= 0, self.turn_ends - self.turn_starts + 1, 0)

    def to(self, device: torch.device | str) -> "DistillBatch":
        moved = {f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}
        return dataclasses.replace(self, **moved, teacher_hidden=tuple(h.to(device) for h in self.teacher_hidden))


def _token_range(offsets: np.ndarray, start: int, end: int) -> np.ndarray:
    """Indices of the tokens overlapping the character span [start, end)."""
    return np.flatnonzero((offsets[:, 0] < end) & (offsets[:, 1] > start))


def _pad(rows: Sequence[np.ndarray], length: int, fill, dtype) -> torch.Tensor:
    out = np.full((len(rows), length, *rows[0].shape[1:]), fill, dtype=dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return torch.from_numpy(out)


def _sample(example: DistillExample, tokenizer, chat: ChatFormat, shared_vocab: int, eos_id: int, first_ids) -> dict:
    request = example.request
    if request.mode != "score":
        raise DataError(f"sample {request.sample_id}: at request.mode: expected 'score' (targets on the rendered conversation), found {request.mode!r}")
    rendered = chat.render(request.messages)
    if rendered.text != request.text:
        raise DataError(f"sample {request.sample_id}: at request.text: expected the rendered messages, found different text")
    enc = tokenizer.encode(request.text)
    offsets = np.asarray(enc.offsets, np.int64).reshape(-1, 2)
    labels = np.full(len(enc.ids), IGNORE_INDEX, np.int64)
    labels[:-1] = supervised_labels(enc.ids, enc.offsets, rendered.supervised_spans)[1:]
    supervised = labels != IGNORE_INDEX
    aligned = align_targets(enc.offsets, example.targets, shared_vocab)
    tools = tool_spans(request.messages, rendered)
    halt = np.zeros(len(enc.ids), np.float32)
    starts, ends, calls = [], [], []
    for lo, hi in rendered.supervised_spans:
        tokens = _token_range(offsets, lo, hi)
        if len(tokens) == 0 or enc.ids[tokens[-1]] != eos_id:
            raise DataError(f"sample {request.sample_id}: at assistant turn {request.text[lo:hi][:40]!r}: expected it to end with {chat.end_of_turn}, found no such token")
        starts.append(tokens[0] - 1)
        ends.append(tokens[-1] - 1)
        halt[tokens[-1] - 1] = 1.0
        opens = [c.open_tag for _, c in tools.calls if lo <= c.open_tag[0] < hi]
        calls.append(_token_range(offsets, *opens[0])[0] - 1 if opens else -1)
    choice = decision(tools.calls)
    position, chosen, rejected = -1, 0, 0
    if choice is not None:
        position = _token_range(offsets, choice.name_start, choice.name_start + 1)[0] - 1
        chosen, rejected = first_ids(choice.chosen), first_ids(choice.rejected)
    return {
        "ids": enc.ids, "offsets": offsets, "labels": labels, "teacher_ids": aligned.topk_ids, "teacher_logprobs": aligned.topk_logprobs,
        "kd_mask": aligned.mask, "halt": halt,
        "tool_name_mask": overlapping_positions(enc.offsets, tools.names) & supervised,
        "tool_args_mask": overlapping_positions(enc.offsets, tools.arguments) & supervised,
        "integration_mask": overlapping_positions(enc.offsets, tools.integration) & supervised,
        "turns": (starts, ends, calls), "decision": (position, chosen, rejected),
    }


def collate_distill(examples: Sequence[DistillExample], student_tokenizer, eligible: Sequence[bool]) -> DistillBatch:
    """Encode, align and mask a batch of score-mode examples; ``eligible[i]`` is sample i's ``meta.eligible.code_mode``."""
    if len(examples) != len(eligible):
        raise ValueError(f"collate_distill: expected one eligibility flag per example ({len(examples)}), found {len(eligible)}")
    chat = ChatFormat.of(student_tokenizer)
    eos_id, call_id = student_tokenizer.token_to_id(chat.end_of_turn), student_tokenizer.token_to_id(CALL)
    shared_vocab = min(student_tokenizer.token_to_id(tag) for tag in TAGS)  # the tags are appended after the teacher's ids
    cache: dict[str, int] = {}

    def first_ids(name: str) -> int:
        if name not in cache:
            cache[name] = first_token(student_tokenizer, name)
        return cache[name]

    samples = [_sample(e, student_tokenizer, chat, shared_vocab, eos_id, first_ids) for e in examples]
    padded = pad_batch([s["ids"] for s in samples], pad_id=eos_id)
    length = padded.input_ids.shape[1]
    turns = max(1, max(len(s["turns"][0]) for s in samples))
    k = max(s["teacher_ids"].shape[1] for s in samples)

    def rows(key: str, fill, dtype) -> torch.Tensor:
        return _pad([s[key] for s in samples], length, fill, dtype)

    def turn_rows(i: int) -> torch.Tensor:
        return _pad([np.asarray(s["turns"][i], np.int64) for s in samples], turns, -1, np.int64)

    def topk(key: str, fill) -> list[np.ndarray]:
        return [np.pad(s[key], ((0, 0), (0, k - s[key].shape[1])), constant_values=fill) for s in samples]

    decisions = torch.tensor([s["decision"] for s in samples], dtype=torch.int64).reshape(-1, 3)  # [B, 3]
    return DistillBatch(
        input_ids=padded.input_ids, attention_mask=padded.attention_mask,
        offsets=rows("offsets", 0, np.int64), labels=rows("labels", IGNORE_INDEX, np.int64),
        teacher_ids=_pad(topk("teacher_ids", -1), length, -1, np.int64),
        teacher_logprobs=_pad(topk("teacher_logprobs", 0.0), length, 0.0, np.float32),
        kd_mask=rows("kd_mask", False, bool), tool_name_mask=rows("tool_name_mask", False, bool),
        tool_args_mask=rows("tool_args_mask", False, bool), integration_mask=rows("integration_mask", False, bool),
        halt_targets=rows("halt", 0.0, np.float32),
        turn_starts=turn_rows(0), turn_ends=turn_rows(1), call_positions=turn_rows(2),
        eligible=torch.tensor([bool(e) for e in eligible], dtype=torch.bool),
        decision_positions=decisions[:, 0], chosen_ids=decisions[:, 1], rejected_ids=decisions[:, 2],
        eos_id=eos_id, call_id=call_id,
    )
