"""The distillation losses on small synthetic tensors: each test pins one behaviour a wrong
mask, shift, sign or normalisation would break, against a numpy reference where one exists."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from kdtrain.data.chat import IGNORE_INDEX
from kdtrain.losses import LOSSES, DistillBatch, HiddenProjection, LossConfig, StudentOutputs, weighted_sum
from kdtrain.losses.ce import masked_ce, supervised_ce
from kdtrain.losses.code_mode import code_mode_loss, code_mode_mask, eligible_fraction
from kdtrain.losses.early_tool import early_tool_loss
from kdtrain.losses.head import ChunkedHead, DenseHead
from kdtrain.losses.halt import halt_loss
from kdtrain.losses.intermediate import gather_teacher_hidden, intermediate_loss
from kdtrain.losses.kl import full_kl, topk_kl
from kdtrain.losses.length import EXCESS, HORIZON, expected_length, length_loss
from kdtrain.losses.outputs import student_outputs
from kdtrain.student.model import StudentConfig, StudentLM

V = 16  # vocabulary of the synthetic student
EOS, CALL = 1, 2


# --- numpy references ----------------------------------------------------------------------

def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def kl(log_p: np.ndarray, log_q: np.ndarray) -> np.ndarray:
    return (np.exp(log_p) * (log_p - log_q)).sum(-1)


def teacher_topk(teacher_logits: np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The cache's view of a teacher: its k likeliest ids and their (full-vocabulary) log-probs."""
    logprobs = log_softmax(teacher_logits)
    ids = np.argsort(-logprobs, axis=-1, kind="stable")[..., :k]
    return torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(np.take_along_axis(logprobs, ids, -1).astype(np.float32))


def logits_pair(seed: int, shape=(2, 5, V)) -> tuple[np.ndarray, np.ndarray]:
    """(teacher, student) logits, float32 values, different and peaked enough to matter."""
    rng = np.random.default_rng(seed)
    return (rng.normal(size=shape) * 2.5).astype(np.float32), (rng.normal(size=shape) * 2.5).astype(np.float32)


def everywhere(shape=(2, 5)) -> torch.Tensor:
    return torch.ones(shape, dtype=torch.bool)


# --- top-k KL --------------------------------------------------------------------------------

@pytest.mark.parametrize("rest_bucket", [False, True])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("k", [4, V])
@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_topk_kl_is_zero_when_the_student_logits_equal_the_teachers(rest_bucket, direction, k, tau):
    teacher, _ = logits_pair(0)
    ids, logprobs = teacher_topk(teacher, k)
    shifted = torch.from_numpy(teacher) + 7.0  # logits, not log-probs: any per-position shift is the same distribution
    loss = topk_kl(shifted, ids, logprobs, everywhere(), tau, direction, rest_bucket)
    assert abs(loss.item()) < 1e-5


@pytest.mark.parametrize("rest_bucket", [False, True])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_topk_kl_is_positive_when_the_student_differs(rest_bucket, direction):
    teacher, student = logits_pair(1)
    ids, logprobs = teacher_topk(teacher, 4)
    assert topk_kl(torch.from_numpy(student), ids, logprobs, everywhere(), 1.0, direction, rest_bucket).item() > 1e-2


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_topk_kl_over_the_whole_vocabulary_is_the_full_kl(direction, tau):
    teacher, student = logits_pair(2)
    ids, logprobs = teacher_topk(teacher, V)
    log_p, log_q = log_softmax(teacher.astype(np.float64) / tau), log_softmax(student.astype(np.float64) / tau)
    expected = tau**2 * (kl(log_p, log_q) if direction == "forward" else kl(log_q, log_p)).mean()
    got = topk_kl(torch.from_numpy(student), ids, logprobs, everywhere(), tau, direction)
    full = full_kl(torch.from_numpy(student), torch.from_numpy(teacher), everywhere(), tau, direction)
    assert got.item() == pytest.approx(expected, rel=1e-4)
    assert full.item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_topk_kl_renormalises_both_sides_over_the_teachers_top_k(tau):
    teacher, student = logits_pair(3)
    ids, logprobs = teacher_topk(teacher, 4)
    log_p = log_softmax(logprobs.numpy().astype(np.float64) / tau)
    log_q = log_softmax(np.take_along_axis(student.astype(np.float64), ids.numpy(), -1) / tau)
    got = topk_kl(torch.from_numpy(student), ids, logprobs, everywhere(), tau)
    assert got.item() == pytest.approx(tau**2 * kl(log_p, log_q).mean(), rel=1e-4)


def test_topk_kl_ignores_what_the_student_puts_outside_the_teachers_top_k():
    teacher, student = logits_pair(4)
    ids, logprobs = teacher_topk(teacher, 4)
    outside = torch.ones(2, 5, V, dtype=torch.bool).scatter(-1, ids, False)
    moved = torch.from_numpy(student).masked_fill(outside, 9.0)
    assert topk_kl(moved, ids, logprobs, everywhere()).item() == pytest.approx(topk_kl(torch.from_numpy(student), ids, logprobs, everywhere()).item(), rel=1e-5)


def test_topk_kl_skips_teacher_ids_marked_minus_one():
    teacher, student = logits_pair(5)
    ids, logprobs = teacher_topk(teacher, 5)
    padded_ids = ids.clone()
    padded_ids[..., 3:] = -1  # not in the student vocabulary: the same as a top-3
    padded_lp = logprobs.clone()
    padded_lp[..., 3:] = 0.0
    got = topk_kl(torch.from_numpy(student), padded_ids, padded_lp, everywhere())
    assert got.item() == pytest.approx(topk_kl(torch.from_numpy(student), ids[..., :3], logprobs[..., :3], everywhere()).item(), rel=1e-5)


def test_topk_kl_is_tau_squared_times_the_kl_at_tau_one_of_the_same_tempered_distributions():
    teacher, student = logits_pair(6)
    ids, logprobs = teacher_topk(teacher, 4)
    tau = 3.0
    base = topk_kl(torch.from_numpy(student), ids, logprobs, everywhere(), 1.0)
    scaled = topk_kl(torch.from_numpy(student) * tau, ids, logprobs * tau, everywhere(), tau)  # x*tau / tau = x
    assert scaled.item() == pytest.approx(tau**2 * base.item(), rel=1e-4)


def test_reverse_kl_is_the_swapped_divergence_and_differs_from_forward():
    teacher, student = logits_pair(7)
    ids, logprobs = teacher_topk(teacher, 6)
    log_p = log_softmax(logprobs.numpy().astype(np.float64))
    log_q = log_softmax(np.take_along_axis(student.astype(np.float64), ids.numpy(), -1))
    forward = topk_kl(torch.from_numpy(student), ids, logprobs, everywhere(), direction="forward").item()
    reverse = topk_kl(torch.from_numpy(student), ids, logprobs, everywhere(), direction="reverse").item()
    assert forward == pytest.approx(kl(log_p, log_q).mean(), rel=1e-4)
    assert reverse == pytest.approx(kl(log_q, log_p).mean(), rel=1e-4)
    assert abs(forward - reverse) > 0.05 * forward


@pytest.mark.parametrize("rest_bucket", [False, True])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_topk_kl_gives_zero_gradient_at_unaligned_positions(rest_bucket, direction):
    teacher, student = logits_pair(8)
    ids, logprobs = teacher_topk(teacher, 4)
    mask = torch.tensor([[True, False, True, False, True], [False, True, True, True, False]])
    logits = torch.from_numpy(student).requires_grad_()
    loss = topk_kl(logits, ids, logprobs, mask, 2.0, direction, rest_bucket)
    loss.backward()
    assert torch.equal(logits.grad[~mask], torch.zeros_like(logits.grad[~mask]))
    assert (logits.grad[mask].abs().sum(-1) > 0).all()
    garbage = torch.from_numpy(student).masked_fill(~mask[..., None], 1e4)  # unaligned positions do not count at all
    assert topk_kl(garbage, ids, logprobs, mask, 2.0, direction, rest_bucket).item() == pytest.approx(loss.item(), rel=1e-6)


@pytest.mark.parametrize("rest_bucket", [False, True])
def test_topk_kl_is_the_mean_over_aligned_positions_only(rest_bucket):
    teacher, student = logits_pair(13)
    ids, logprobs = teacher_topk(teacher, 4)
    mask = torch.tensor([[True, False, True, False, True], [False, False, False, False, False]])
    aligned = [0, 2, 4]
    alone = topk_kl(torch.from_numpy(student)[:1, aligned], ids[:1, aligned], logprobs[:1, aligned], everywhere((1, 3)), rest_bucket=rest_bucket)
    assert topk_kl(torch.from_numpy(student), ids, logprobs, mask, rest_bucket=rest_bucket).item() == pytest.approx(alone.item(), rel=1e-6)


@pytest.mark.parametrize("rest_bucket", [False, True])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("nothing", ["mask", "ids"])
def test_topk_kl_without_any_aligned_position_is_zero_with_a_finite_zero_gradient(rest_bucket, direction, nothing):
    teacher, student = logits_pair(9)
    ids, logprobs = teacher_topk(teacher, 4)
    mask = everywhere()
    if nothing == "mask":
        mask = ~mask
    else:  # aligned, but no teacher id is a student token
        ids = torch.full_like(ids, -1)
    logits = torch.from_numpy(student).requires_grad_()
    loss = topk_kl(logits, ids, logprobs, mask, 2.0, direction, rest_bucket)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(logits.grad, torch.zeros_like(logits.grad))


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_rest_bucket_adds_the_tail_mass_as_one_outcome(tau):
    teacher, student = logits_pair(10)
    ids, logprobs = teacher_topk(teacher, 4)

    def with_rest(topk_logprobs: np.ndarray) -> np.ndarray:
        return np.concatenate([topk_logprobs, np.log1p(-np.exp(topk_logprobs).sum(-1, keepdims=True))], -1)

    log_p = log_softmax(with_rest(logprobs.numpy().astype(np.float64)) / tau)
    log_q = log_softmax(with_rest(np.take_along_axis(log_softmax(student.astype(np.float64)), ids.numpy(), -1)) / tau)
    got = topk_kl(torch.from_numpy(student), ids, logprobs, everywhere(), tau, rest_bucket=True)
    assert got.item() == pytest.approx(tau**2 * kl(log_p, log_q).mean(), rel=1e-4)


def test_rest_bucket_penalises_mass_outside_the_top_k_that_plain_top_k_ignores():
    teacher, _ = logits_pair(11)
    ids, logprobs = teacher_topk(teacher, 4)
    outside = torch.ones(2, 5, V, dtype=torch.bool).scatter(-1, ids, False)
    leaky = torch.from_numpy(teacher).masked_fill(outside, 12.0)  # same ratios inside the top-k, most mass outside
    assert abs(topk_kl(leaky, ids, logprobs, everywhere()).item()) < 1e-5
    assert topk_kl(leaky, ids, logprobs, everywhere(), rest_bucket=True).item() > 1.0


def test_rest_bucket_is_finite_when_the_top_k_holds_all_the_mass():
    teacher, student = logits_pair(12)
    ids, logprobs = teacher_topk(teacher, V)  # no tail at all: log(1 - 1) is clamped
    logits = torch.from_numpy(student).requires_grad_()
    loss = topk_kl(logits, ids, logprobs, everywhere(), 2.0, rest_bucket=True)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert torch.isfinite(logits.grad).all()


# --- cross-entropy -----------------------------------------------------------------------------

def labelled(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    logits = torch.from_numpy(rng.normal(size=(2, 6, V)).astype(np.float32))
    labels = torch.from_numpy(rng.integers(0, V, size=(2, 6)))
    labels[0, :2] = IGNORE_INDEX
    labels[1, 4:] = IGNORE_INDEX
    return logits, labels


def test_supervised_ce_is_the_mean_over_labelled_positions_only():
    logits, labels = labelled(0)
    keep = (labels != IGNORE_INDEX).numpy()
    nll = -np.take_along_axis(log_softmax(logits.numpy().astype(np.float64)), labels.clamp(min=0).numpy()[..., None], -1)[..., 0]
    logits.requires_grad_()
    loss = supervised_ce(logits, labels)
    loss.backward()
    assert loss.item() == pytest.approx(nll[keep].mean(), rel=1e-5)
    assert torch.equal(logits.grad[~torch.from_numpy(keep)], torch.zeros(int((~keep).sum()), V))


def test_supervised_ce_without_labels_is_zero_and_still_backpropagates():
    logits, labels = labelled(1)
    logits.requires_grad_()
    loss = supervised_ce(logits, torch.full_like(labels, IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


def test_masked_ce_restricts_to_the_mask_and_never_adds_unlabelled_positions():
    logits, labels = labelled(2)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 1:4] = True  # position 1 has no label: it stays out
    mask[1, 5] = True  # no label either
    only = torch.full_like(labels, IGNORE_INDEX)
    only[0, 2:4] = labels[0, 2:4]
    assert masked_ce(logits, labels, mask).item() == pytest.approx(supervised_ce(logits, only).item(), rel=1e-6)
    logits.requires_grad_()
    masked_ce(logits, labels, mask).backward()
    assert set(map(tuple, logits.grad.abs().sum(-1).nonzero().tolist())) == {(0, 2), (0, 3)}


# --- length ------------------------------------------------------------------------------------

START, END = 3, 12  # one assistant turn: predicting positions 3..12, the teacher's length L = 10
S, L = 16, END - START + 1


def eos_logits(hazards: dict[int, float], default: float = 1e-13) -> torch.Tensor:
    """[1, S, V]: zero logits but EOS, set so that p(EOS) at each position is the given hazard."""
    h = np.full(S, default)
    for position, value in hazards.items():
        h[position] = value
    logits = np.zeros((1, S, V), np.float64)
    logits[0, :, EOS] = np.log(h * (V - 1) / (1 - h))
    return torch.from_numpy(logits.astype(np.float32))


def turn(starts=((START,),), ends=((END,),)) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(starts), torch.tensor(ends)


def test_length_loss_is_exactly_zero_with_zero_gradient_for_a_student_that_ends_where_the_teacher_does():
    logits = eos_logits({END: 1 - 1e-7}).requires_grad_()
    loss = length_loss(logits, EOS, *turn())
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_length_loss_of_a_student_that_never_ends_is_its_overrun_up_to_the_horizon():
    logits = eos_logits({}).requires_grad_()  # p(EOS) ~ 1e-13 everywhere
    loss = length_loss(logits, EOS, *turn())
    loss.backward()
    assert loss.item() == pytest.approx(HORIZON - 1 - EXCESS, abs=1e-3)  # E[N] = horizon x L
    assert (logits.grad[0, START:END + 1, EOS] < 0).all()  # descending the loss raises p(EOS) inside the turn
    assert torch.equal(logits.grad[0, :START], torch.zeros(START, V))


def test_length_threshold_is_fifteen_percent_over_the_teachers_length_by_default():
    assert LossConfig().length_excess == EXCESS == 0.15
    # only the last step may end: E[N] = L + (1 - h)(1 - (1 - h)^m) / h, m = (horizon - 1) L
    ten_percent = eos_logits({END: 0.5})  # E[N] = 1.1 L
    twenty_percent = eos_logits({END: 1 / 3})  # E[N] = 1.2 L
    assert expected_length(torch.log_softmax(ten_percent, -1)[..., EOS], *turn()).item() == pytest.approx(1.1 * L, rel=1e-4)
    assert length_loss(ten_percent, EOS, *turn()).item() == 0.0
    assert length_loss(twenty_percent, EOS, *turn()).item() == pytest.approx(0.05, rel=1e-3)
    assert length_loss(twenty_percent, EOS, *turn(), excess=0.25).item() == 0.0


def test_expected_length_with_a_constant_hazard_is_the_geometric_mean_cut_at_the_horizon():
    h = 0.2
    logits = eos_logits({}, default=h)
    expected = (1 - (1 - h) ** (HORIZON * L)) / h
    assert expected_length(torch.log_softmax(logits, -1)[..., EOS], *turn()).item() == pytest.approx(expected, rel=1e-4)


def test_length_loss_ignores_padded_turns_and_is_zero_without_turns():
    logits = eos_logits({})
    one = length_loss(logits, EOS, *turn())
    padded = length_loss(logits, EOS, *turn(((START, -1),), ((END, -1),)))
    assert padded.item() == pytest.approx(one.item(), rel=1e-6)
    assert length_loss(logits, EOS, *turn(((-1,),), ((-1,),))).item() == 0.0


# --- halt --------------------------------------------------------------------------------------

def test_halt_loss_is_the_bce_on_supervised_positions_only():
    rng = np.random.default_rng(0)
    halt = torch.from_numpy(rng.uniform(0.05, 0.95, size=(2, 6))).requires_grad_()
    targets = torch.zeros(2, 6)
    targets[0, 3] = targets[1, 5] = 1.0
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 1:4] = mask[1, 2:6] = True
    p, y, m = halt.detach().numpy(), targets.numpy(), mask.numpy()
    expected = -(y * np.log(p) + (1 - y) * np.log(1 - p))[m].mean()
    loss = halt_loss(halt, targets, mask)
    loss.backward()
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert torch.equal(halt.grad[~mask], torch.zeros(int((~mask).sum()), dtype=halt.dtype))
    assert (halt.grad[mask] != 0).all()


def test_halt_loss_without_supervised_positions_is_zero():
    halt = torch.full((1, 4), 0.5, requires_grad=True)
    loss = halt_loss(halt, torch.zeros(1, 4), torch.zeros(1, 4, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(halt.grad, torch.zeros(1, 4))


# --- early tool call ---------------------------------------------------------------------------

CALL_START, CALL_AT = 2, 6  # turn 0 starts at 2 and calls at 6; turn 1 (8..11) calls nothing
STARTS, CALLS = torch.tensor([[CALL_START, 8]]), torch.tensor([[CALL_AT, -1]])


def call_logits(p_call: dict[int, float], default: float = 0.9) -> torch.Tensor:
    """[1, 12, V]: zero logits but <tool_call>, set to the given probability per position."""
    p = np.full(12, default)
    for position, value in p_call.items():
        p[position] = value
    logits = np.zeros((1, 12, V))
    logits[0, :, CALL] = np.log(p * (V - 1) / (1 - p))
    return torch.from_numpy(logits.astype(np.float32))


def test_early_tool_loss_is_larger_when_the_call_is_unlikely_at_the_turn_start():
    likely = early_tool_loss(call_logits({}), CALL, STARTS, CALLS)
    unlikely_at_start = early_tool_loss(call_logits({CALL_START: 0.01}), CALL, STARTS, CALLS)
    unlikely_before_call = early_tool_loss(call_logits({CALL_AT - 1: 0.01}), CALL, STARTS, CALLS)
    assert likely.item() < unlikely_before_call.item() < unlikely_at_start.item()


def test_early_tool_loss_is_the_decay_weighted_mean_of_the_call_nll_up_to_the_call():
    p = {CALL_START + i: v for i, v in enumerate([0.1, 0.2, 0.4, 0.6, 0.95])}
    weights = 0.8 ** np.arange(CALL_AT - CALL_START + 1)
    expected = (weights * -np.log(list(p.values()))).sum() / weights.sum()
    assert early_tool_loss(call_logits(p), CALL, STARTS, CALLS, decay=0.8).item() == pytest.approx(expected, rel=1e-4)


def test_turns_without_a_call_contribute_nothing_to_early_tool_loss():
    logits = call_logits({}).requires_grad_()
    loss = early_tool_loss(logits, CALL, STARTS, CALLS)
    loss.backward()
    assert loss.item() == pytest.approx(early_tool_loss(call_logits({}), CALL, STARTS[:, :1], CALLS[:, :1]).item(), rel=1e-6)
    touched = logits.grad.abs().sum(-1)[0].nonzero().flatten().tolist()
    assert touched == list(range(CALL_START, CALL_AT + 1))
    no_calls = early_tool_loss(logits, CALL, STARTS, torch.full_like(CALLS, -1))
    assert no_calls.item() == 0.0


# --- code mode ---------------------------------------------------------------------------------

def synthetic_batch(b: int = 2, s: int = 10, k: int = 4, seed: int = 0, **fields) -> DistillBatch:
    """A coherent small batch: one assistant turn per sample at positions 2..8, every field set."""
    rng = np.random.default_rng(seed)
    labels = torch.full((b, s), IGNORE_INDEX)
    labels[:, 2:9] = torch.from_numpy(rng.integers(3, V, size=(b, 7)))
    labels[:, 8] = EOS
    ids, logprobs = teacher_topk(rng.normal(size=(b, s, V)) * 2, k)
    kd = labels != IGNORE_INDEX
    kd[:, 4] = False  # a tag: CE only
    halt = torch.zeros(b, s)
    halt[:, 8] = 1.0
    values = dict(
        input_ids=torch.from_numpy(rng.integers(3, V, size=(b, s))), attention_mask=torch.ones(b, s, dtype=torch.int64),
        offsets=torch.zeros(b, s, 2, dtype=torch.int64), labels=labels, teacher_ids=ids, teacher_logprobs=logprobs, kd_mask=kd,
        tool_name_mask=torch.zeros(b, s, dtype=torch.bool).index_fill(1, torch.tensor([5]), True),
        tool_args_mask=torch.zeros(b, s, dtype=torch.bool).index_fill(1, torch.tensor([6, 7]), True),
        integration_mask=torch.zeros(b, s, dtype=torch.bool).index_fill(1, torch.tensor([7]), True),
        halt_targets=halt, turn_starts=torch.full((b, 1), 2), turn_ends=torch.full((b, 1), 8),
        call_positions=torch.tensor([[4]] + [[-1]] * (b - 1)),
        eligible=torch.tensor([True] + [False] * (b - 1)), decision_positions=torch.tensor([5] + [-1] * (b - 1)),
        chosen_ids=torch.tensor([3] + [0] * (b - 1)), rejected_ids=torch.tensor([7] + [0] * (b - 1)),
        eos_id=EOS, call_id=CALL,
    )
    values.update(fields)
    return DistillBatch(**values)


def test_batch_properties_count_supervised_aligned_and_turn_positions():
    batch = synthetic_batch()
    assert batch.supervised.sum().item() == 14 and batch.aligned_fraction == 12 / 14
    assert batch.teacher_lengths.tolist() == [[7], [7]]


def test_batch_to_moves_every_tensor_including_teacher_hidden_states():
    batch = synthetic_batch(teacher_hidden=(torch.zeros(2, 10, 3),), hidden_mask=torch.ones(2, 10, dtype=torch.bool))
    moved = batch.to("meta")
    tensors = [v for v in moved.__dict__.values() if isinstance(v, torch.Tensor)] + list(moved.teacher_hidden)
    assert len(tensors) == 20 and all(t.device.type == "meta" for t in tensors)
    assert (moved.eos_id, moved.call_id) == (EOS, CALL)


# sample 0 eligible with a decision; 1 has a decision but is not eligible; 2 is eligible without
# a decision; 3 is eligible but its two names start with the same token (no preference)
DECISIONS = dict(eligible=torch.tensor([True, False, True, True]), decision_positions=torch.tensor([3, 5, -1, 6]),
                 chosen_ids=torch.tensor([4, 4, 0, 4]), rejected_ids=torch.tensor([9, 9, 0, 4]))


def test_code_mode_mask_is_exactly_zero_for_ineligible_samples_and_samples_without_a_decision():
    mask = code_mode_mask(synthetic_batch(b=4, **DECISIONS))
    expected = torch.zeros(4, 10)
    expected[0, 3] = 1.0
    assert torch.equal(mask, expected)


def test_code_mode_loss_gives_exactly_zero_gradient_on_ineligible_samples():
    rng = np.random.default_rng(1)
    logits = torch.from_numpy(rng.normal(size=(4, 10, V)).astype(np.float32)).requires_grad_()
    loss = code_mode_loss(logits, *DECISIONS.values())
    loss.backward()
    assert torch.equal(logits.grad[1:], torch.zeros(3, 10, V))
    assert logits.grad[0].abs().sum(-1).nonzero().flatten().tolist() == [3]
    assert logits.grad[0, 3, 4] < 0 < logits.grad[0, 3, 9]  # descending it prefers run_code over the direct tool


@pytest.mark.parametrize("beta", [1.0, 2.5])
def test_code_mode_loss_is_the_logistic_preference_for_run_code(beta):
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(4, 10, V)).astype(np.float32)
    logp = log_softmax(logits[0, 3].astype(np.float64))
    expected = np.log1p(np.exp(-beta * (logp[4] - logp[9])))  # -logsigmoid(beta * margin)
    assert code_mode_loss(torch.from_numpy(logits), *DECISIONS.values(), beta=beta).item() == pytest.approx(expected, rel=1e-5)


def test_code_mode_loss_without_an_eligible_decision_is_zero():
    logits = torch.zeros(4, 10, V, requires_grad=True)
    eligible = torch.tensor([False, False, True, True])  # the eligible ones have no usable decision
    assert code_mode_loss(logits, eligible, *list(DECISIONS.values())[1:]).item() == 0.0


def test_eligible_fraction_is_the_share_of_eligible_samples():
    assert eligible_fraction(synthetic_batch(b=4, **DECISIONS)) == 0.75
    assert eligible_fraction(synthetic_batch(b=4, **dict(DECISIONS, eligible=torch.zeros(4, dtype=torch.bool)))) == 0.0


# --- intermediate layers ------------------------------------------------------------------------

def test_hidden_projection_maps_student_layers_to_the_teacher_size_when_sizes_differ():
    projection = HiddenProjection([(0, 1), (2, 5)], student_size=6, teacher_size=10)
    assert projection.student_layers == (0, 2) and projection.teacher_layers == (1, 5)
    assert all(isinstance(p, torch.nn.Linear) and p.weight.shape == (10, 6) and p.bias is None for p in projection.projections)
    out = projection([torch.zeros(2, 3, 6), torch.zeros(2, 3, 6)])
    assert [tuple(o.shape) for o in out] == [(2, 3, 10), (2, 3, 10)]
    same = HiddenProjection([(0, 1)], student_size=6, teacher_size=6)
    assert isinstance(same.projections[0], torch.nn.Identity)


def test_intermediate_loss_is_the_masked_mse_and_trains_the_projection():
    rng = np.random.default_rng(3)
    torch.manual_seed(0)
    projection = HiddenProjection([(0, 0), (1, 1)], student_size=6, teacher_size=10)
    student = [torch.from_numpy(rng.normal(size=(2, 5, 6)).astype(np.float32)) for _ in range(2)]
    teacher = [torch.from_numpy(rng.normal(size=(2, 5, 10)).astype(np.float32)) for _ in range(2)]
    mask = torch.tensor([[True, True, False, True, False], [False, True, True, False, False]])
    projected = projection(student)
    loss = intermediate_loss(projected, teacher, mask)
    expected = np.mean([((p.detach().numpy() - t.numpy()) ** 2)[mask.numpy()].mean() for p, t in zip(projected, teacher)])
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert all(p.weight.grad is not None and p.weight.grad.abs().sum() > 0 for p in projection.projections)
    elsewhere = [t.masked_fill(~mask[..., None], 100.0) for t in teacher]  # unmatched positions do not count
    assert intermediate_loss(projected, elsewhere, mask).item() == pytest.approx(loss.item(), rel=1e-6)


def test_intermediate_loss_without_matched_positions_is_zero():
    hidden = torch.ones(1, 3, 4, requires_grad=True)
    assert intermediate_loss([hidden], [torch.zeros(1, 3, 4)], torch.zeros(1, 3, dtype=torch.bool)).item() == 0.0


def test_teacher_hidden_is_gathered_at_student_tokens_with_the_same_span():
    teacher = torch.arange(4 * 2, dtype=torch.float32).reshape(1, 4, 2)  # teacher tokens "ab" "c" "de" "fghi"
    student_offsets = torch.tensor([[[0, 2], [2, 5], [5, 9]]])  # "ab" "cde" "fghi"
    gathered, mask = gather_teacher_hidden(teacher, student_offsets, [[(0, 2), (2, 3), (3, 5), (5, 9)]])
    assert mask.tolist() == [[True, False, True]]
    assert gathered.tolist() == [[[0.0, 1.0], [0.0, 0.0], [6.0, 7.0]]]


def test_intermediate_term_without_teacher_hidden_states_is_refused():
    batch = synthetic_batch()
    out = StudentOutputs(DenseHead(torch.zeros(2, 10, V)), torch.zeros(2, 10, 6), torch.zeros(2, 10), layers=(torch.zeros(2, 10, 8),))
    with pytest.raises(ValueError, match="expected as many teacher hidden states .* found 0"):
        LOSSES["intermediate"](batch, out, LossConfig())


# --- registry ----------------------------------------------------------------------------------

def outputs(batch: DistillBatch, seed: int = 0) -> StudentOutputs:
    rng = np.random.default_rng(seed)
    b, s = batch.input_ids.shape
    logits = torch.from_numpy(rng.normal(size=(b, s, V)).astype(np.float32)).requires_grad_()
    hidden = torch.from_numpy(rng.normal(size=(b, s, 6)).astype(np.float32))
    halt = torch.sigmoid(torch.from_numpy(rng.normal(size=(b, s)).astype(np.float32))).requires_grad_()
    layers = (torch.from_numpy(rng.normal(size=(b, s, 8)).astype(np.float32)).requires_grad_(),)
    return StudentOutputs(DenseHead(logits), hidden, halt, layers)


def with_teacher_hidden(batch: DistillBatch) -> DistillBatch:
    b, s = batch.input_ids.shape
    return dataclasses.replace(batch, teacher_hidden=(torch.ones(b, s, 8),), hidden_mask=batch.kd_mask)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_registered_loss_is_a_positive_finite_scalar_that_backpropagates(name):
    batch = with_teacher_hidden(synthetic_batch())
    out = outputs(batch)
    loss = LOSSES[name](batch, out, LossConfig(temperature=2.0))
    loss.backward()
    assert loss.shape == () and torch.isfinite(loss) and loss.item() > 0
    grads = [t.grad for t in (out.head.logits, out.halt, out.layers[0]) if t.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name, mask", [("tool_name", "tool_name_mask"), ("tool_args", "tool_args_mask"),
                                        ("tool_integration", "integration_mask")])
def test_each_tool_term_is_ce_on_its_own_mask(name, mask):
    batch = synthetic_batch()
    out = outputs(batch)
    LOSSES[name](batch, out, LossConfig()).backward()
    touched = out.head.logits.grad.abs().sum(-1) > 0
    assert torch.equal(touched, getattr(batch, mask) & batch.supervised)


@pytest.mark.parametrize("cfg", [LossConfig(temperature=2.0), LossConfig(kl_direction="reverse"), LossConfig(rest_bucket=True),
                                 LossConfig(temperature=3.0, kl_direction="reverse", rest_bucket=True)])
def test_the_kl_term_follows_the_loss_config(cfg):
    batch = synthetic_batch()
    out = outputs(batch)
    direct = topk_kl(out.head.logits, batch.teacher_ids, batch.teacher_logprobs, batch.kd_mask, cfg.temperature, cfg.kl_direction, cfg.rest_bucket)
    assert LOSSES["kl"](batch, out, cfg).item() == pytest.approx(direct.item(), rel=1e-6)
    assert abs(direct.item() - LOSSES["kl"](batch, out, LossConfig()).item()) > 1e-3


def test_weighted_sum_is_the_weighted_total_of_the_named_terms_and_logs_each():
    batch, cfg = synthetic_batch(), LossConfig()
    out = outputs(batch)
    weights = {"kl": 0.5, "ce": 1.0, "halt": 2.0}
    loss = weighted_sum(batch, out, cfg, weights)
    each = {name: LOSSES[name](batch, out, cfg).item() for name in weights}
    assert loss.values == pytest.approx(each)
    assert {n: t.item() for n, t in loss.terms.items()} == pytest.approx({n: weights[n] * each[n] for n in weights})
    assert loss.total.item() == pytest.approx(sum(weights[n] * each[n] for n in weights), rel=1e-6)


def test_weighted_sum_skips_zero_weights_without_computing_them():
    batch = synthetic_batch()  # no teacher hidden states: the intermediate term would raise
    loss = weighted_sum(batch, outputs(batch), LossConfig(), {"ce": 1.0, "intermediate": 0.0, "length": 0})
    assert set(loss.values) == set(loss.terms) == {"ce"}
    assert loss.total.item() == pytest.approx(loss.values["ce"])


def test_weighted_sum_refuses_unknown_loss_names():
    batch = synthetic_batch()
    with pytest.raises(KeyError, match=r"expected names among \[.*'kl'.*\], found \['kl_div', 'lenght'\]"):
        weighted_sum(batch, outputs(batch), LossConfig(), {"kl": 1.0, "kl_div": 1.0, "lenght": 0.0})


# --- student outputs ---------------------------------------------------------------------------

TINY = StudentConfig(vocab_size=V, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=4, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True)


def test_student_outputs_take_the_hidden_states_the_heads_read_in_one_pass():
    torch.manual_seed(0)
    model = StudentLM(TINY)
    projection = HiddenProjection([(0, 1), (1, 3)], student_size=8, teacher_size=12)
    ids = torch.tensor([[3, 4, 5, 6, 1]])
    out = student_outputs(model, ids, torch.ones_like(ids), projection)
    assert torch.equal(out.head.full(), model(ids, torch.ones_like(ids)))
    assert torch.allclose(model.lm_head(out.hidden), out.head.full(), atol=1e-6)  # the final norm's output
    assert torch.allclose(out.halt, model.halt_probability(out.hidden))
    assert [tuple(t.shape) for t in out.layers] == [(1, 5, 12), (1, 5, 12)]
    assert not model.model.norm._forward_hooks and not any(layer._forward_hooks for layer in model.model.layers)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("cfg", [LossConfig(temperature=2.0), LossConfig(kl_direction="reverse", rest_bucket=True)])
@pytest.mark.parametrize("name", sorted(set(LOSSES) - {"intermediate"}))  # intermediate reads no head
def test_every_loss_reads_the_students_chunked_head_as_it_reads_its_full_logits(name, cfg, tied):
    torch.manual_seed(0)
    model = StudentLM(dataclasses.replace(TINY, tie_word_embeddings=tied))
    batch = synthetic_batch()
    out = student_outputs(model, batch.input_ids, batch.attention_mask)
    chunked = dataclasses.replace(out, head=ChunkedHead(out.hidden, model.lm_head.weight, chunk_tokens=3))  # 20 tokens
    dense = dataclasses.replace(out, head=DenseHead(model.lm_head(out.hidden)))  # the [B, S, V] logits the losses read before
    params = list(model.parameters())
    results = []
    for o in (chunked, dense):
        loss = LOSSES[name](batch, o, cfg)
        results.append((loss, torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)))
    (loss, grads), (expected_loss, expected_grads) = results
    assert loss.item() > 0 and loss.item() == pytest.approx(expected_loss.item(), rel=1e-5)
    for g, e in zip(grads, expected_grads):
        assert (g is None) == (e is None)
        if e is not None:
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
