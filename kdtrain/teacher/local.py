"""The local teacher: a transformers causal LM (the config's ``teacher.source``), full logits
reduced to top-k log-probs.

It serves both request modes. ``score`` is one forward pass over the whole conversation:
the distribution that predicts token *i* comes from position *i - 1*, and only tokens that
overlap the requested character spans (the assistant's turns) are reported. ``generate``
is greedy decoding to the tokenizer's EOS (the token that closes a turn) or ``max_new_tokens``, as an API teacher at
temperature 0 would answer; the stop token is not part of the text, as in an API reply.
"""

from __future__ import annotations

import numpy as np
import torch

from kdtrain.teacher.base import TeacherError, TeacherRequest, TeacherResponse, top_k
from kdtrain.tokenizers.load import Tokenizer


class LocalTeacher:
    def __init__(self, model, tokenizer: Tokenizer, name: str, version: str):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.name, self.version = name, version
        self.stop_id = tokenizer.token_to_id(tokenizer.eos_token)

    def complete(self, request: TeacherRequest) -> TeacherResponse:
        enc = self.tokenizer.encode(request.text)
        if tuple(enc.ids) != tuple(request.ids):
            raise TeacherError(
                f"request {request.sample_id}: expected prompt ids from this teacher's tokenizer "
                f"({len(enc.ids)} tokens), found {len(request.ids)} different ids: the request was built "
                "with another tokenizer and its cache entry would not match what the teacher saw"
            )
        with torch.inference_mode():
            if request.mode == "score":
                return self._score(request, enc.offsets)
            return self._generate(request)

    def _score(self, request: TeacherRequest, offsets: list[tuple[int, int]]) -> TeacherResponse:
        wanted = [i for i in range(1, len(request.ids))
                  if any(offsets[i][0] < end and offsets[i][1] > start for start, end in request.score_spans)]
        # The vocabulary projection only where a target is wanted: [N, V] logits of a
        # several-KB tool result would cost more than the whole transformer.
        hidden = self.model.model(torch.tensor([request.ids])).last_hidden_state[0]  # [N, H]
        logits = self.model.lm_head(hidden[[i - 1 for i in wanted]]).float()  # [T, V]
        k_ids, k_lp = top_k(torch.log_softmax(logits, -1).numpy(), request.top_k)
        return TeacherResponse(
            text=request.text,
            token_ids=np.asarray([request.ids[i] for i in wanted], np.int32),
            offsets=np.asarray([offsets[i] for i in wanted], np.int32).reshape(-1, 2),
            topk_ids=k_ids, topk_logprobs=k_lp,
            prompt_tokens=len(request.ids), completion_tokens=0,
        )

    def _generate(self, request: TeacherRequest) -> TeacherResponse:
        out = self.model.generate(
            torch.tensor([request.ids]), attention_mask=torch.ones(1, len(request.ids), dtype=torch.long),
            max_new_tokens=request.max_new_tokens, do_sample=False, eos_token_id=self.stop_id,
            pad_token_id=self.stop_id, output_scores=True, return_dict_in_generate=True,
        )
        new = out.sequences[0, len(request.ids):].tolist()
        scores = torch.log_softmax(torch.stack(out.scores)[:, 0].float(), -1).numpy()  # [T, V]
        if new and new[-1] == self.stop_id:
            new, scores = new[:-1], scores[:-1]
        spans, previous = [], 0
        for i in range(len(new)):
            end = len(self.tokenizer.decode(new[: i + 1]))
            spans.append((previous, max(previous, end)))
            previous = max(previous, end)
        k_ids, k_lp = top_k(scores, request.top_k) if new else (np.zeros((0, request.top_k), np.int32),) * 2
        return TeacherResponse(
            text=self.tokenizer.decode(new),
            token_ids=np.asarray(new, np.int32),
            offsets=np.asarray(spans, np.int32).reshape(-1, 2),
            topk_ids=k_ids, topk_logprobs=k_lp.astype(np.float32),
            prompt_tokens=len(request.ids), completion_tokens=len(new),
        )
