"""An OpenAI-compatible endpoint as the judge, through the teacher's own client.

The request is the scoring prompt (:mod:`kdtrain.judge.prompts`) as a one-token ``generate``
request with top-k log-probs; the verdict is read from the first token's alternatives, where
the answer tokens' ids are found with the served model's tokenizer, as for a local judge. The
client brings what an API needs: the rate limiter, retries with backoff, and the budget the
run's teacher calls are booked on; the key comes from the environment variable the distill
config names and goes into the request header only (never into the cache, the report or a log).

An answer token missing from the top-k gets the lowest log-probability listed (an upper
bound on its own); when both are missing the orders tie. Replies can be kept in a
:class:`kdtrain.teacher.cache.TeacherCache`, so that judging the same probe set again costs
nothing: an entry is used only for the same prompt and the same model name and version.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

from tqdm import tqdm

from kdcontracts.models.distill_data import Accept
from kdcontracts.models.tokens import Message
from kdtrain.data.chat import ChatFormat
from kdtrain.judge import prompts
from kdtrain.judge.base import PairwiseVerdict, answer_token_ids, two_way
from kdtrain.teacher.base import TeacherRequest, TeacherResponse
from kdtrain.teacher.cache import TeacherCache, TeacherId

MAX_TOP_LOGPROBS = 20  # OpenAI's limit on top_logprobs


class OpenAIJudge:
    """``client``: a :class:`kdtrain.teacher.openai_api.OpenAIChatTeacher`; ``tokenizer``: the served model's."""

    def __init__(self, client, tokenizer, name: str, cache: TeacherCache | None = None, top_k: int = MAX_TOP_LOGPROBS,
                 progress: bool = True):
        self.client, self.tokenizer, self.name, self.cache = client, tokenizer, name, cache
        self.chat, self.top_k, self.progress = ChatFormat.of(tokenizer), top_k, progress
        self._answers: dict[tuple[str, ...], list[int]] = {}

    def compare(self, items: Sequence[tuple[str, str, str]]) -> list[PairwiseVerdict]:
        found = self._ask([prompts.pairwise(*item) for item in items], prompts.PAIRWISE_ANSWERS, "pairs")
        return [PairwiseVerdict(a, b) for a, b in found]

    def score(self, items: Sequence[tuple[str, str]]) -> list[float]:
        return [two_way(yes, no) for yes, no in self._ask([prompts.pointwise(*item) for item in items], prompts.POINTWISE_ANSWERS, "scores")]

    def _ask(self, conversations: list[tuple[Message, ...]], answers: tuple[str, ...], what: str) -> list[list[float]]:
        found = []
        for messages in tqdm(conversations, desc=f"judge {self.name} {what}", unit="prompt", disable=not self.progress):
            text = self.chat.prompt(messages)
            if answers not in self._answers:
                self._answers[answers] = answer_token_ids(self.tokenizer, text, answers, self.name)
            request = TeacherRequest(f"judge-{hashlib.sha256(text.encode('utf-8')).hexdigest()[:24]}", tuple(messages), text,
                                     tuple(self.tokenizer.encode(text).ids), "generate", (), max_new_tokens=1, top_k=self.top_k)
            found.append(first_token_logprobs(self._reply(request), self._answers[answers]))
        return found

    def _reply(self, request: TeacherRequest) -> TeacherResponse:
        who = TeacherId(self.client.name, self.client.version)
        if self.cache is not None:
            hit = self.cache.lookup(request, Accept(who.name, (who.version,)))
            if hit.entry is not None:
                return hit.entry.response
        response = self.client.complete(request)
        if self.cache is not None:
            self.cache.append(request, who, response)
        return response


def first_token_logprobs(response: TeacherResponse, ids: Sequence[int]) -> list[float]:
    """Each id's log-probability at the reply's first token; one not listed gets the lowest listed."""
    if len(response.token_ids) == 0:
        return [0.0 for _ in ids]  # no token at all: nothing preferred
    listed = dict(zip(response.topk_ids[0].tolist(), response.topk_logprobs[0].tolist()))
    floor = min(listed.values())
    return [float(listed.get(i, floor)) for i in ids]
