"""A local causal LM as the judge: the teacher (a transformers model) or a student checkpoint.

The scoring prompt is rendered with the model's own chat template up to the assistant header,
and one forward pass gives the next-token distribution, from which both answers' log-
probabilities are read at the same position: a pair costs two passes (one per order), a
pointwise score one. Prompts are batched, sorted by length and left-padded (explicit
positions for a transformers model; the student's RoPE attends by relative position), and
the vocabulary projection runs on the last position only where the model allows it. The
tokens every prompt starts with (the system prompt and the template's headers) are run once
and their KV cache shared by every batch.

The answer tokens are found in context (:func:`kdtrain.judge.base.answer_token_ids`).
"""

from __future__ import annotations

import copy
import os
from typing import Sequence

import torch
from tqdm import tqdm

from kdtrain.data.chat import ChatFormat
from kdtrain.judge import prompts
from kdtrain.judge.base import PairwiseVerdict, answer_token_ids, two_way


class LocalJudge:
    """``model``: a transformers causal LM or a :class:`kdtrain.student.model.StudentLM`; ``tokenizer``: its
    :class:`kdtrain.tokenizers.Tokenizer` (transformers kind, with a chat template)."""

    def __init__(self, model, tokenizer, name: str, batch_size: int = 16, progress: bool = True):
        from kdtrain.student.model import StudentLM

        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.chat, self.batch_size, self.progress = ChatFormat.of(tokenizer), batch_size, progress
        self._student = isinstance(model, StudentLM)
        self._answers: dict[tuple[str, ...], list[int]] = {}

    def compare(self, items: Sequence[tuple[str, str, str]]) -> list[PairwiseVerdict]:
        texts = [self.chat.prompt(prompts.pairwise(*item)) for item in items]
        found = self._answer_logprobs(texts, prompts.PAIRWISE_ANSWERS, "pairs")
        return [PairwiseVerdict(float(a), float(b)) for a, b in found]

    def score(self, items: Sequence[tuple[str, str]]) -> list[float]:
        texts = [self.chat.prompt(prompts.pointwise(*item)) for item in items]
        return [two_way(float(yes), float(no)) for yes, no in self._answer_logprobs(texts, prompts.POINTWISE_ANSWERS, "scores")]

    @torch.inference_mode()
    def _answer_logprobs(self, texts: list[str], answers: tuple[str, ...], what: str) -> list[list[float]]:
        """Each prompt's next-token log-probabilities of ``answers``, in input order."""
        if not texts:
            return []
        if answers not in self._answers:  # the same header ends every prompt: found once
            self._answers[answers] = answer_token_ids(self.tokenizer, texts[0], answers, self.name)
        wanted = torch.tensor(self._answers[answers])
        encoded = [self.tokenizer.encode(t).ids for t in texts]
        prefix = self._shared_prefix(encoded)
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))  # similar lengths share a batch
        found: list[list[float]] = [[] for _ in texts]
        with tqdm(total=len(texts), desc=f"judge {self.name} {what}", unit="prompt", disable=not self.progress) as bar:
            for start in range(0, len(order), self.batch_size):
                rows = order[start:start + self.batch_size]
                logits = self._last_logits([encoded[i][len(prefix[0]):] for i in rows], *prefix)  # [B, V]
                chosen = torch.log_softmax(logits.float(), -1)[:, wanted]  # [B, answers]
                for row, values in zip(rows, chosen.tolist()):
                    found[row] = values
                bar.update(len(rows))
        return found

    def _shared_prefix(self, encoded: list[list[int]]) -> tuple[list[int], object]:
        """The tokens every prompt starts with (system prompt, template, the prompt's opening) and their KV cache,
        computed once: a quarter to a third of every prompt. The student has no cache API: it reads whole prompts."""
        common = os.path.commonprefix(encoded)[:min(map(len, encoded)) - 1]  # each prompt keeps a token to predict from
        if self._student or not common:
            return [], None
        return common, self.model(input_ids=torch.tensor([common]), use_cache=True).cache

    def _last_logits(self, batch: list[list[int]], prefix: list[int], cache) -> torch.Tensor:
        """The logits after each prompt's last token, [B, V], for a left-padded batch of the prompts after ``prefix``."""
        width = max(len(ids) for ids in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros((len(batch), len(prefix) + width), dtype=torch.long)  # [B, prefix + padding + prompt]
        mask[:, :len(prefix)] = 1
        for row, prompt in enumerate(batch):
            ids[row, width - len(prompt):], mask[row, mask.shape[1] - len(prompt):] = torch.tensor(prompt), 1
        if self._student:
            return self.model(ids, mask)[:, -1]
        positions = (mask.cumsum(-1) - 1)[:, len(prefix):].clamp(min=0)  # every prompt continues its prefix, padding aside
        if cache is not None:
            cache = copy.deepcopy(cache)
            cache.batch_repeat_interleave(len(batch))
        return self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, logits_to_keep=1).logits[:, -1]
