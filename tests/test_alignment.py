"""Teacher targets on student positions, and the batch every loss reads.

The student reads ``<think>``, ``</think>``, ``<tool_call>`` and ``</tool_call>`` as one token
each; the teacher splits them (``<`` ``tool`` ``_`` ``call`` ``>``). A teacher distribution is
used only where both predict the same characters; CE covers the rest. Checked on synthetic
spans, then on the reference artifacts: the real tokenizers, corpus and teacher cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from kdtrain.artifact_table import DATA_CORPUS, TEACHER_CACHE
from kdtrain.artifacts import ArtifactsFolder
from kdtrain.data.calls import CODE_TOOL
from kdtrain.data.chat import IGNORE_INDEX, ChatFormat
from kdtrain.data.corpus import Corpus, Sample
from kdtrain.data.targets import DistillExample, TeacherTargets
from kdtrain.losses import LOSSES, DistillBatch, LossConfig, StudentOutputs, code_mode_mask, collate_distill, weighted_sum
from kdtrain.losses.align import align_targets, match_spans, overlapping_positions
from kdtrain.losses.code_mode import first_token
from kdtrain.losses.tool import call_spans
from kdtrain.teacher.base import TeacherResponse
from kdtrain.teacher.cache import TeacherCache
from kdtrain.teacher.stage import filled_settings, teacher_requests
from kdtrain.tokenizers.load import Tokenizer, load_tokenizer

ASSISTANT_TAGS = ("<think>", "</think>", "<tool_call>", "</tool_call>")


# --- synthetic spans ---------------------------------------------------------------------------

def test_match_spans_pairs_only_tokens_with_identical_character_spans():
    # text "<tool_call>{" : student  "<tool_call>" "{"; teacher "<" "tool" "_call" ">{" and an empty span
    student = [(0, 11), (11, 12)]
    teacher = [(0, 1), (1, 5), (5, 10), (10, 12), (12, 12)]
    assert match_spans(student, teacher).tolist() == [-1, -1]
    assert match_spans([(0, 1), (1, 5), (5, 12), (12, 12)], teacher).tolist() == [0, 1, -1, -1]


def response(offsets, ids, logprobs) -> TeacherResponse:
    ids = np.asarray(ids, np.int32)
    return TeacherResponse("", ids[:, 0].copy(), np.asarray(offsets, np.int32), ids, np.asarray(logprobs, np.float32), 0, len(ids))


def test_align_targets_places_each_teacher_distribution_at_the_position_predicting_its_token():
    # student tokens: "ab" "<tag>" "c" "d"; the teacher splits the tag and scores every token but the first
    student = [(0, 2), (2, 7), (7, 8), (8, 9)]
    targets = response(
        offsets=[(2, 3), (3, 6), (6, 7), (7, 8), (8, 9)],
        ids=[[10, 11], [12, 13], [14, 15], [20, 99], [98, 97]],  # 97..99 are not student tokens (shared vocab = 50)
        logprobs=[[-0.1, -2.0], [-0.2, -2.1], [-0.3, -2.2], [-0.4, -2.3], [-0.5, -2.4]],
    )
    aligned = align_targets(student, targets, shared_vocab=50)
    assert aligned.mask.tolist() == [False, True, False, False]  # "<tag>" has no teacher twin; "d" no shared id
    assert aligned.topk_ids.tolist() == [[-1, -1], [20, -1], [-1, -1], [-1, -1]]  # "c", predicted at position 1
    assert np.array_equal(aligned.topk_logprobs, np.float32([[0, 0], [-0.4, 0], [0, 0], [0, 0]]))
    assert aligned.aligned == 1


def test_overlapping_positions_mark_the_position_predicting_each_overlapping_token():
    offsets = [(0, 2), (2, 5), (5, 6), (6, 9)]
    assert overlapping_positions(offsets, [(3, 5)]).tolist() == [True, False, False, False]
    assert overlapping_positions(offsets, [(5, 7)]).tolist() == [False, True, True, False]


# --- the reference artifacts -------------------------------------------------------------------

@dataclass
class Reference:
    student: Tokenizer
    teacher: Tokenizer
    examples: list[DistillExample]
    samples: list[Sample]  # in the examples' order
    batch: DistillBatch

    @property
    def shared_vocab(self) -> int:
        return min(self.student.token_to_id(tag) for tag in ASSISTANT_TAGS)

    def rows(self):
        """(row, example, sample, student ids) of every sample in the batch."""
        for i, (example, sample) in enumerate(zip(self.examples, self.samples)):
            yield i, example, sample, self.student.encode(example.request.text).ids


@pytest.fixture(scope="module")
def reference(reference_artifacts) -> Reference:
    folder = ArtifactsFolder.open(reference_artifacts)
    settings = filled_settings(folder)
    requests, teacher = teacher_requests(folder, settings)
    targets = TeacherTargets(requests, TeacherCache(reference_artifacts / TEACHER_CACHE.path), settings.accept)
    examples = list(targets)
    assert examples and not targets.missing
    by_id = {s.id: s for s in Corpus.load(reference_artifacts / DATA_CORPUS.path).samples}
    samples = [by_id[e.request.sample_id] for e in examples]
    student = load_tokenizer(folder, "student")
    batch = collate_distill(examples, student, [s.meta.eligible.code_mode for s in samples])
    return Reference(student, teacher, examples, samples, batch)


def assistant_contents(sample: Sample) -> list[str]:
    return [m.content for m in sample.messages if m.role == "assistant"]


def test_the_student_reads_each_tag_as_one_token_that_the_teacher_splits(reference):
    for tag in ASSISTANT_TAGS:
        assert len(reference.student.encode(tag).ids) == 1
        assert reference.student.token_to_id(tag) >= reference.shared_vocab
        assert len(reference.teacher.encode(tag).ids) > 1
    assert reference.student.encode("<|im_end|>").ids == reference.teacher.encode("<|im_end|>").ids


def test_kl_positions_are_exactly_those_whose_next_token_has_a_teacher_token_with_the_same_span(reference):
    batch = reference.batch
    for i, example, _, ids in reference.rows():
        n, targets = len(ids), example.targets
        match = match_spans(reference.student.encode(example.request.text).offsets, targets.offsets.tolist())
        kd = batch.kd_mask[i, :n].numpy()
        assert kd[:-1].tolist() == (match[1:] >= 0).tolist() and not kd[-1]
        t = np.flatnonzero(kd)
        teacher_token = match[t + 1]
        assert batch.labels[i, t].tolist() == targets.token_ids[teacher_token].tolist()  # both predict the same token
        assert batch.teacher_ids[i, t].numpy().tolist() == targets.topk_ids[teacher_token].tolist()
        assert np.array_equal(batch.teacher_logprobs[i, t].numpy(), targets.topk_logprobs[teacher_token].astype(np.float32))
    assert not batch.kd_mask[batch.attention_mask == 0].any()


def test_every_position_predicting_a_tag_has_a_label_but_no_teacher_distribution(reference):
    batch, tag_ids = reference.batch, [reference.student.token_to_id(tag) for tag in ASSISTANT_TAGS]
    for i, _, sample, ids in reference.rows():
        predicts_tag = np.flatnonzero(np.isin(ids[1:], tag_ids))
        assert len(predicts_tag) == sum(c.count(tag) for c in assistant_contents(sample) for tag in ASSISTANT_TAGS)
        assert not batch.kd_mask[i, predicts_tag].any()
        assert batch.labels[i, predicts_tag].tolist() == [ids[t + 1] for t in predicts_tag]
    assert any(sum(c.count("<tool_call>") for c in assistant_contents(s)) for s in reference.samples)


def test_ce_alone_covers_exactly_the_tag_positions_and_kl_stays_inside_the_supervised_text(reference):
    batch, tag_ids = reference.batch, [reference.student.token_to_id(tag) for tag in ASSISTANT_TAGS]
    assert not (batch.kd_mask & ~batch.supervised).any()
    for i, _, _, ids in reference.rows():
        ce_only = np.flatnonzero((batch.supervised[i] & ~batch.kd_mask[i]).numpy())
        assert np.isin([ids[t + 1] for t in ce_only], tag_ids).all()
    assert 0.8 < batch.aligned_fraction < 1.0


# --- collate_distill on the reference examples -------------------------------------------------

def test_collate_pads_every_field_to_the_longest_sample(reference):
    batch = reference.batch
    lengths = [len(ids) for *_, ids in reference.rows()]
    b, s = len(lengths), max(lengths)
    turns = max(len(assistant_contents(sample)) for sample in reference.samples)
    assert batch.input_ids.shape == batch.labels.shape == batch.kd_mask.shape == batch.halt_targets.shape == (b, s)
    assert batch.teacher_ids.shape == batch.teacher_logprobs.shape == (b, s, reference.examples[0].request.top_k)
    assert batch.offsets.shape == (b, s, 2)
    assert batch.turn_starts.shape == batch.turn_ends.shape == batch.call_positions.shape == (b, turns)
    assert batch.eligible.shape == batch.decision_positions.shape == batch.chosen_ids.shape == (b,)
    assert batch.attention_mask.sum(1).tolist() == lengths
    padding = batch.attention_mask == 0
    assert (batch.input_ids[padding] == batch.eos_id).all() and (batch.labels[padding] == IGNORE_INDEX).all()
    assert (batch.teacher_ids[padding] == -1).all() and not batch.halt_targets[padding].any()


def test_labels_are_the_next_token_at_each_predicting_position(reference):
    batch = reference.batch
    for i, _, sample, ids in reference.rows():
        labels = batch.labels[i, : len(ids)].tolist()
        supervised = [t for t, label in enumerate(labels) if label != IGNORE_INDEX]
        assert all(labels[t] == ids[t + 1] for t in supervised) and labels[-1] == IGNORE_INDEX
        assert reference.student.decode([labels[t] for t in supervised]) == "".join(c + "<|im_end|>" for c in assistant_contents(sample))


def test_halt_targets_mark_one_end_per_assistant_turn(reference):
    batch = reference.batch
    for i, _, sample, ids in reference.rows():
        ends = batch.halt_targets[i].nonzero().flatten().tolist()
        assert len(ends) == len(assistant_contents(sample))
        assert ends == [e for e in batch.turn_ends[i].tolist() if e >= 0]
        assert all(ids[e + 1] == batch.eos_id and batch.labels[i, e] == batch.eos_id for e in ends)


def test_turns_start_at_their_first_token_and_calls_at_their_tool_call(reference):
    batch = reference.batch
    for i, example, sample, _ in reference.rows():
        offsets = batch.offsets[i]
        rendered = ChatFormat.of(reference.student).render(sample.messages)
        contents = [(span, m.content) for span, m in zip(rendered.message_spans, sample.messages) if m.role == "assistant"]
        starts, ends, calls = batch.turn_starts[i].tolist(), batch.turn_ends[i].tolist(), batch.call_positions[i].tolist()
        for k, ((lo, _), content) in enumerate(contents):
            assert offsets[starts[k] + 1, 0] <= lo < offsets[starts[k] + 1, 1]  # position starts[k] predicts the content's first token
            assert starts[k] < ends[k]
            if "<tool_call>" in content:
                assert starts[k] <= calls[k] < ends[k] and batch.input_ids[i, calls[k] + 1] == batch.call_id
            else:
                assert calls[k] == -1
        assert starts[len(contents):] == ends[len(contents):] == calls[len(contents):] == [-1] * (len(starts) - len(contents))


def decoded(reference: Reference, row: int, mask: torch.Tensor) -> str:
    """The text of the tokens predicted at the masked positions of one row."""
    return reference.student.decode((reference.batch.input_ids[row, 1:][mask[row, :-1]]).tolist())


def test_tool_masks_cover_the_names_and_arguments_of_samples_with_tool_calls_only(reference):
    batch = reference.batch
    for mask in (batch.tool_name_mask, batch.tool_args_mask, batch.integration_mask):
        assert not (mask & ~batch.supervised).any()
    with_calls = 0
    for i, _, sample, _ in reference.rows():
        calls = [(c, call) for c in assistant_contents(sample) for call in call_spans(c)]
        if not calls:
            assert not (batch.tool_name_mask[i].any() or batch.tool_args_mask[i].any() or batch.integration_mask[i].any())
            continue
        with_calls += 1
        names, arguments = decoded(reference, i, batch.tool_name_mask), decoded(reference, i, batch.tool_args_mask)
        for content, call in calls:
            assert call.tool in names and content[slice(*call.arguments)] in arguments
        assert '"name"' not in names and "<tool_call>" not in arguments
        if any(m.role == "tool" for m in sample.messages):
            assert batch.integration_mask[i].any()
    assert with_calls and with_calls < len(reference.samples)


def test_eligible_flags_and_code_mode_decisions_come_from_each_sample(reference):
    batch = reference.batch
    run_code = first_token(reference.student, CODE_TOOL)
    assert batch.eligible.tolist() == [s.meta.eligible.code_mode for s in reference.samples]
    assert batch.eligible.any() and not batch.eligible.all()
    for i, _, sample, ids in reference.rows():
        calls = [call for c in assistant_contents(sample) for call in call_spans(c)]
        position = batch.decision_positions[i].item()
        if not calls:
            assert position == -1
            continue
        assert batch.chosen_ids[i] == run_code
        first_name_token = ids[position + 1]  # the decision position predicts the first call's name
        assert first_name_token == (run_code if calls[0].tool == CODE_TOOL else batch.rejected_ids[i])
        assert batch.rejected_ids[i] != run_code


def test_code_mode_mask_on_the_reference_batch_is_zero_outside_eligible_decisions(reference):
    batch = reference.batch
    mask = code_mode_mask(batch)
    acting = batch.eligible & (batch.decision_positions >= 0)
    assert torch.equal(mask[~acting], torch.zeros_like(mask[~acting]))
    assert mask[acting].sum(1).tolist() == [1.0] * int(acting.sum())
    assert mask[acting].argmax(1).tolist() == batch.decision_positions[acting].tolist()
    assert (~batch.eligible & (batch.decision_positions >= 0)).any()  # an ineligible sample with a decision is masked


def test_collate_refuses_a_flag_per_example_mismatch(reference):
    with pytest.raises(ValueError, match=r"expected one eligibility flag per example \(2\), found 1"):
        collate_distill(reference.examples[:2], reference.student, [True])


def test_every_loss_but_intermediate_is_finite_and_positive_on_a_real_eligible_sample(reference):
    eligible_with_call = (i for i, *_ in reference.rows() if reference.batch.eligible[i] and reference.batch.call_positions[i, 0] >= 0)
    row = min(eligible_with_call, key=lambda i: reference.batch.attention_mask[i].sum().item())
    batch = collate_distill([reference.examples[row]], reference.student, [True])
    torch.manual_seed(0)
    logits = (torch.randn(*batch.input_ids.shape, len(reference.student.vocab)) * 0.1).requires_grad_()
    halt = torch.full(batch.input_ids.shape, 0.1, requires_grad=True)
    out = StudentOutputs(logits, torch.zeros(*batch.input_ids.shape, 4), halt)
    weights = {name: 1.0 for name in LOSSES if name != "intermediate"}
    loss = weighted_sum(batch, out, LossConfig(temperature=2.0, rest_bucket=True), weights)
    loss.total.backward()
    assert set(loss.values) == set(weights) and all(np.isfinite(v) and v > 0 for v in loss.values.values())
    assert torch.isfinite(logits.grad).all() and torch.isfinite(halt.grad).all()
