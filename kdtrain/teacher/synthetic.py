"""Teacher top-k that look like a real teacher's, for the cache's tests and benchmark.

Uniformly random ids and log-probs would misjudge a packing: a real teacher's top-k
concentrate on frequent ids (small ids in a BPE vocabulary) and so sort into small gaps,
and its distributions are peaked. Here each position's full-vocabulary logits are a Zipf
prior over ids (id = frequency rank), Gumbel noise (what the context makes plausible) and a
boost, exponentially distributed, to one token (what the context calls for); the top-k are
taken from their log-softmax as the local teacher takes them, and the target token is drawn
from the same distribution. The text is a conversation the targets end (score mode) of
as many characters per target as in the reference cache, letters that compress less than
its real text. Against the reference teacher (SmolLM2-135M-Instruct scoring
the reference corpus: its cache's 1,722 tokens at k = 8, and the same conversations at
k = 32) it is a little less peaked and packs a little worse, so sizes measured on it err
high: median top-1 probability 0.60 (teacher 0.73), median gap top-1 to top-2 1.6 nats
(2.2), median gap between sorted top-8 ids 250 (347), top-8 ids below 128 35% (34%), target
token the top-1 59% of the time (64%) and outside the top-8 14% (16%); packed with its
text, 31 bytes per token at k = 8 (28) and 83 at k = 32 (81).
"""

from __future__ import annotations

import numpy as np

from kdtrain.teacher.base import TeacherResponse, top_k

VOCAB = 49152  # SmolLM2's
ZIPF = 1.7  # prior log-probability slope per log id
HEAD = 30.0  # ids below about this many share the top of the prior (the special and byte tokens come first)
NOISE = 1.5  # Gumbel scale of the context's noise, in nats
BOOST = 8.0  # mean boost, in nats, of the token the context calls for
SPAN = 3.5  # mean characters per token
PROMPT = 2.7  # characters of conversation before the targets per target character: score mode scores the assistant's
# turns and stores the whole conversation (the reference cache: 13.2 bytes of text per target token)


def teacher_logits(rng: np.random.Generator, tokens: int, vocab: int = VOCAB) -> np.ndarray:
    """float32 [tokens, vocab]: one position's full-vocabulary logits per row."""
    prior = -ZIPF * np.log(np.arange(vocab) + HEAD)
    logits = prior + NOISE * rng.gumbel(size=(tokens, vocab))
    called = np.minimum(rng.zipf(1.3, tokens), vocab) - 1  # the boosted token: frequent ones more often
    logits[np.arange(tokens), called] += rng.exponential(BOOST, tokens)
    return logits.astype(np.float32)


def response(rng: np.random.Generator, tokens: int, k: int, vocab: int = VOCAB) -> tuple[TeacherResponse, np.ndarray]:
    """A scored response of ``tokens`` targets at top-``k``, and the teacher's full logits [tokens, vocab]."""
    logits = teacher_logits(rng, tokens, vocab)
    logprobs = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    k_ids, k_lp = top_k(logprobs, k)
    cdf = np.cumsum(np.exp(logprobs.astype(np.float64)), axis=1)
    drawn = (cdf < rng.random((tokens, 1)) * cdf[:, -1:]).sum(1)
    lengths = rng.geometric(1 / SPAN, tokens)  # >= 1, mean SPAN
    prompt = int(PROMPT * lengths.sum())
    starts = prompt + np.cumsum(lengths) - lengths + np.cumsum(rng.random(tokens) < 0.01)  # 1% follow a skipped character
    offsets = np.stack([starts, starts + lengths], 1).astype(np.int32)
    end = int(offsets[-1, 1]) if tokens else 0
    text = "".join(rng.choice(list("etaoin shrdlu"), end))  # compresses less than a real conversation (about 50% vs 36%)
    return TeacherResponse(text=text, token_ids=drawn.astype(np.int32), offsets=offsets, topk_ids=k_ids,
                           topk_logprobs=k_lp, prompt_tokens=tokens, completion_tokens=0), logits
