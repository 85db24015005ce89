"""The lazily evaluated LM head (kdtrain.losses.head): the normaliser and the logits at ids equal
the materialised computation, values and gradients, whatever the chunking; and it never holds
the [tokens, vocab] logits."""

from __future__ import annotations

import pytest
import torch

from kdtrain.losses.head import ChunkedHead, DenseHead, as_head
from kdtrain.train.memory import measure_allocations


def head_inputs(b: int, s: int, h: int, v: int, k: int, dtype=torch.float32, seed: int = 0):
    """hidden [b, s, h], weight [v, h] (both requiring grad) and ids [b, s, k] with about a fifth -1."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, s, h, generator=g, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g, dtype=dtype) * 2.0).requires_grad_()
    ids = torch.randint(0, v, (b, s, k), generator=g)
    ids = ids.masked_fill(torch.rand(b, s, k, generator=g) < 0.2, -1)
    return hidden, weight, ids


def reads(head, ids: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A scalar that weighs every output of the head differently (so any wrong gradient shows)."""
    lse, at = head.logsumexp(), head.logits_at(ids)
    return (lse * torch.randn(lse.shape, generator=g, dtype=lse.dtype)).sum() + (at * torch.randn(at.shape, generator=g, dtype=at.dtype)).sum()


@pytest.mark.parametrize("chunk", [1, 3, 4, 14, 50])  # 3 and 4 do not divide the 14 tokens; 50 > tokens
def test_chunked_head_passes_gradcheck_in_float64(chunk):
    hidden, weight, ids = head_inputs(2, 7, 5, 11, 3, torch.float64)

    def outputs(hidden, weight):
        head = ChunkedHead(hidden, weight, chunk)
        return head.logsumexp(), head.logits_at(ids)

    assert torch.autograd.gradcheck(outputs, (hidden, weight))


@pytest.mark.parametrize("chunk", [None, 1, 7, 64, 96, 500])  # 96 tokens: 7 and 64 leave a short last chunk
def test_chunked_head_equals_the_materialised_logits_in_float32(chunk):
    hidden, weight, ids = head_inputs(3, 32, 48, 1000, 8, seed=1)
    dense = DenseHead(hidden @ weight.T)
    chunked = ChunkedHead(hidden, weight, chunk)
    torch.testing.assert_close(chunked.logsumexp(), dense.logsumexp(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked.logits_at(ids), dense.logits_at(ids), rtol=1e-5, atol=1e-5)
    expected = torch.autograd.grad(reads(dense, ids, torch.Generator().manual_seed(2)), (hidden, weight))
    found = torch.autograd.grad(reads(chunked, ids, torch.Generator().manual_seed(2)), (hidden, weight))
    for e, f in zip(expected, found):
        torch.testing.assert_close(f, e, rtol=1e-4, atol=1e-4)


def test_minus_one_ids_read_zero_and_carry_no_gradient():
    hidden, weight, _ = head_inputs(1, 4, 6, 9, 2)
    ids = torch.tensor([[[3, -1], [-1, -1], [0, 8], [-1, 5]]])
    head = ChunkedHead(hidden, weight, chunk_tokens=3)
    at = head.logits_at(ids)
    assert torch.equal(at[ids < 0], torch.zeros(int((ids < 0).sum())))
    at[ids < 0].sum().backward()  # only the -1 entries
    assert torch.equal(hidden.grad, torch.zeros_like(hidden)) and torch.equal(weight.grad, torch.zeros_like(weight))


def test_every_read_of_a_head_reaches_the_weight_through_one_gradient_per_pass():
    hidden, weight, ids = head_inputs(2, 9, 6, 40, 4, seed=4)
    labels = ids[..., :1]

    def loss(head):
        return (head.logsumexp() - head.logits_at(labels)[..., 0]).mean() + head.logits_at(ids).square().mean()

    expected = torch.autograd.grad(loss(DenseHead(hidden @ weight.T)), (hidden, weight))
    chunked = loss(ChunkedHead(hidden, weight, chunk_tokens=4))
    torch.autograd.grad(chunked, hidden, retain_graph=True)  # a pass that does not reach the weight leaves nothing behind
    for _ in range(2):  # nor does a full pass (retain_graph: the balance check backpropagates each term alone)
        found = torch.autograd.grad(chunked, (hidden, weight), retain_graph=True)
        for f, e in zip(found, expected):
            torch.testing.assert_close(f, e, rtol=1e-5, atol=1e-6)


def test_the_normaliser_is_computed_once_and_shared():
    hidden, weight, _ = head_inputs(1, 4, 6, 9, 1)
    head = ChunkedHead(hidden, weight)
    assert head.logsumexp() is head.logsumexp()


def test_rows_whose_normaliser_gets_no_gradient_get_none_back():
    hidden, weight, _ = head_inputs(2, 5, 6, 9, 1)
    lse = ChunkedHead(hidden, weight, chunk_tokens=2).logsumexp()
    lse[0, 1].backward()  # one position read: the others (skipped in backward) get exactly 0
    touched = hidden.grad.abs().sum(-1) > 0
    assert touched.nonzero().tolist() == [[0, 1]]
    torch.testing.assert_close(weight.grad, torch.autograd.grad(torch.logsumexp(hidden[0, 1] @ weight.T, -1), weight)[0])


def test_a_tied_head_adds_its_gradient_to_the_embedding():
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(50, 8)
    ids = torch.randint(0, 50, (2, 6))
    targets = torch.randint(0, 50, (2, 6, 1))

    def loss(make_head):
        head = make_head(torch.tanh(embedding(ids)), embedding.weight)
        return (head.logsumexp()[..., None] - head.logits_at(targets)).mean()

    expected = torch.autograd.grad(loss(lambda h, w: DenseHead(h @ w.T)), embedding.weight)[0]
    found = torch.autograd.grad(loss(lambda h, w: ChunkedHead(h, w, chunk_tokens=5)), embedding.weight)[0]
    torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-6)


def test_full_materialises_the_logits_and_as_head_wraps_a_tensor():
    hidden, weight, _ = head_inputs(2, 3, 4, 7, 1)
    head = ChunkedHead(hidden, weight)
    torch.testing.assert_close(head.full(), hidden @ weight.T)
    assert head.shape == (2, 3, 7)
    logits = torch.zeros(2, 3, 7)
    assert as_head(head) is head and as_head(logits).full() is logits


def test_the_zero_of_a_head_reaches_the_hidden_state_and_the_weight():
    hidden, weight, _ = head_inputs(1, 2, 3, 5, 1)
    ChunkedHead(hidden, weight).zero().backward()
    assert torch.equal(hidden.grad, torch.zeros_like(hidden)) and torch.equal(weight.grad, torch.zeros_like(weight))


TOKENS, VOCAB, HIDDEN, CHUNK = 2048, 4096, 32, 256
FULL = TOKENS * VOCAB * 4  # bytes of the float32 [tokens, vocab] logits: 32 MiB, 32x the hidden state


def ce_step(make_head) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs for a CE-like forward + backward through a head built by ``make_head(hidden, weight)``."""
    hidden, weight, ids = head_inputs(1, TOKENS, HIDDEN, VOCAB, 8, seed=3)

    def step():
        head = make_head(hidden, weight)
        loss = (head.logsumexp() - head.logits_at(ids[..., :1])[..., 0]).mean() + head.logits_at(ids).mean()
        loss.backward()

    return step


def test_the_chunked_head_never_allocates_the_tokens_by_vocabulary_logits():
    chunked = measure_allocations(ce_step(lambda h, w: ChunkedHead(h, w, CHUNK)))
    dense = measure_allocations(ce_step(lambda h, w: DenseHead(h @ w.T)))  # what the measurement sees otherwise
    assert dense.largest >= FULL and dense.peak >= 2 * FULL
    assert chunked.largest <= CHUNK * VOCAB * 4  # one chunk's logits, nothing bigger
    assert chunked.peak < FULL / 2  # a few chunks' temporaries at once, never the whole
