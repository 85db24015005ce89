"""On-policy steps: the student answers the data's prompts itself and the teacher scores its answers.

As in GKD (Agarwal et al., 2024; TRL's ``GKDTrainer`` and its ``lmbda``), a share of each
curriculum stage's steps (``curriculum[i].on_policy``) trains on sequences the student
generated, so that it learns from the teacher where its own answers go, not only where the
corpus's go. Which steps: a draw from ``(optim.seed, step)`` alone (:func:`drawn`), so a
resumed run takes the same steps on-policy as an uninterrupted one and no other random
state is touched.

An on-policy step takes the data batch's examples, cuts each to the prompt before its last
assistant turn, lets the current student write that turn greedily (eval mode, at most
``on_policy.max_new_tokens``), has the local teacher score the new conversation
(teacher-forced, the config's teacher and top-k) on that turn only, and trains on the KL
term alone: the other terms need the data's labels (tool names and arguments, the halt and
length targets, the code-mode decision), which the student's own answer does not have.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from kdcontracts.models.tokens import Message
from kdtrain.data.targets import DistillExample
from kdtrain.losses import DistillBatch, collate_distill
from kdtrain.runtime.generate import StudentGenerator
from kdtrain.teacher.base import prompt_messages
from kdtrain.teacher.fill import build_request
from kdtrain.train.config import DistillConfig
from kdtrain.train.telemetry import evaluating

TERMS = ("kl",)  # what an on-policy step trains (see the module docstring)


def drawn(config: DistillConfig, step: int) -> bool:
    """Whether ``step`` trains on the student's own answers: its stage's ``on_policy`` share, drawn from (optim.seed, step)."""
    stage = config.stage(step)
    share = stage.on_policy if stage else 0.0
    return share > 0 and float(np.random.default_rng((config.optim.seed, step)).random()) < share


class OnPolicyBatches:
    """Batches of the student's answers to the data's prompts, with the teacher's targets on them."""

    def __init__(self, config: DistillConfig, teacher, teacher_tokenizer, student_tokenizer):
        """``teacher``: a :class:`kdtrain.teacher.local.LocalTeacher` of the config's teacher (on the CPU, as the student decodes)."""
        self.teacher, self.teacher_tokenizer, self.student_tokenizer = teacher, teacher_tokenizer, student_tokenizer
        self.settings = dataclasses.replace(config.teacher.settings(), mode="score")
        self.max_new_tokens = config.on_policy.max_new_tokens

    @classmethod
    def of(cls, config: DistillConfig, artifacts, student_tokenizer) -> "OnPolicyBatches":
        """With the config's local teacher, the process's shared CPU model (the config refuses an API teacher)."""
        from kdtrain.teacher import source
        from kdtrain.teacher.local import LocalTeacher
        from kdtrain.tokenizers.load import load_tokenizer

        tokenizer = load_tokenizer(artifacts, "teacher")
        teacher = LocalTeacher(source.load_model(config.teacher.source), tokenizer, config.teacher.name, config.teacher.version)
        return cls(config, teacher, tokenizer, student_tokenizer)

    def batch(self, student, examples: Sequence[DistillExample], eligible: Sequence[bool]) -> DistillBatch:
        """The student's last assistant turn for each example's prompt, scored by the teacher, collated."""
        prompts = [prompt_messages(e.request.messages) for e in examples]
        with evaluating(student) as model:
            turns = StudentGenerator(model, self.student_tokenizer).turns(prompts, self.max_new_tokens)
        scored = [self._scored(f"{e.request.sample_id}/on-policy", (*prompt, Message("assistant", turn.text)))
                  for e, prompt, turn in zip(examples, prompts, turns)]
        return collate_distill(scored, self.student_tokenizer, eligible)

    def _scored(self, sample_id: str, messages: tuple[Message, ...]) -> DistillExample:
        request = build_request(sample_id, messages, self.teacher_tokenizer, self.settings)
        request = dataclasses.replace(request, score_spans=request.score_spans[-1:])  # the student's turn, not the data's
        return DistillExample(request, self.teacher.complete(request))
