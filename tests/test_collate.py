"""kdtrain's padding: the mask comes from lengths, so an EOS that shares PAD's id stays visible."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kdtrain.data.collate import pad_batch

EOS = PAD = 2


@given(st.lists(st.lists(st.integers(0, 5), min_size=1, max_size=8), min_size=1, max_size=5), st.sampled_from(["right", "left"]))
def test_mask_marks_exactly_the_real_tokens_whatever_their_ids(sequences, side):
    batch = pad_batch(sequences, pad_id=PAD, side=side)
    for row, seq in enumerate(sequences):
        mask = batch.attention_mask[row].tolist()
        assert sum(mask) == len(seq)
        assert [i for i, m in zip(batch.input_ids[row].tolist(), mask) if m] == seq


def test_eos_equal_to_pad_is_not_masked():
    batch = pad_batch([[5, 6, EOS], [5]], pad_id=PAD)
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_pad_to_shorter_than_a_sequence_is_refused():
    with pytest.raises(ValueError, match="expected pad_to >= the longest sequence \\(3\\), found 2"):
        pad_batch([[1, 2, 3]], pad_id=PAD, pad_to=2)
