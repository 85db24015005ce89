"""The halt gate: metrics on synthetic heads whose answers are known, and the reference student
scored on the held-out halt set."""

from __future__ import annotations

import json
import random

import pytest
import torch

from kdtrain.gates.halt import HaltRecord, halt_metrics, plot_halt, score_halt_set
from kdtrain.errors import DataError

LONGER = 9  # tokens an over_long completion runs past its stop


def _records(head, bases: int = 6) -> list[HaltRecord]:
    """Three records per base: ``head(length, stop)`` gives P(halt) per position (stop None: under_short)."""
    records = []
    for i in range(bases):
        stop = 5 + i
        records += [HaltRecord(f"b{i}/good", "plain", "good", head(stop + 1, stop), stop),
                    HaltRecord(f"b{i}/over_long", "plain", "over_long", head(stop + 1 + LONGER, stop), stop),
                    HaltRecord(f"b{i}/under_short", "plain", "under_short", head(stop - 2, None), None)]
    return records


def perfect(n, stop):
    return tuple(1.0 if t == stop else 0.0 for t in range(n))


def inverted(n, stop):
    return tuple(0.0 if t == stop else 1.0 for t in range(n))


def always(n, stop):
    return (1.0,) * n


def never(n, stop):
    return (0.0,) * n


def test_a_perfect_head_scores_one_and_never_stops_wrong():
    m = halt_metrics(_records(perfect), threshold=0.5, tolerance=2)
    assert m["auc"] == 1.0 and m["ece"] == pytest.approx(0.0, abs=1e-12)
    assert m["early_stop_rate"] == 0.0 and m["late_stop_rate"] == 0.0 and m["length_ratio"] == 1.0
    assert m["positives"] == 12 and m["negatives"] == 2 * sum(range(5, 11)) + sum(s - 2 for s in range(5, 11))
    assert m["kinds"] == {"good": {"examples": 6, "early": 0, "late": None}, "over_long": {"examples": 6, "early": 0, "late": 0},
                          "under_short": {"examples": 6, "early": 0, "late": None}}
    json.dumps(m, allow_nan=False)  # plain JSON values


def test_a_head_that_always_fires_stops_everything_early():
    m = halt_metrics(_records(always), threshold=0.5, tolerance=2)
    assert m["auc"] == 0.5 and m["early_stop_rate"] == 1.0 and m["late_stop_rate"] == 0.0 and m["length_ratio"] < 0.25


def test_a_head_that_never_fires_runs_every_over_long_late():
    m = halt_metrics(_records(never), threshold=0.5, tolerance=2)
    assert m["auc"] == 0.5 and m["early_stop_rate"] == 0.0 and m["late_stop_rate"] == 1.0 and m["length_ratio"] > 1.0
    assert m["kinds"]["good"]["early"] == 0  # a good completion ends at its stop: the EOS stops the host


def test_an_inverted_head_ranks_below_chance():
    assert halt_metrics(_records(inverted), threshold=0.5, tolerance=2)["auc"] < 0.5


@pytest.mark.parametrize(("fires_at", "early", "late"), [(-3, 1, 0), (-2, 0, 0), (2, 0, 0), (3, 0, 1)])
def test_tolerance_bounds_early_and_late(fires_at, early, late):
    stop = 8
    halt = tuple(1.0 if t == stop + fires_at else 0.0 for t in range(stop + 1 + LONGER))
    m = halt_metrics([HaltRecord("a/over_long", "plain", "over_long", halt, stop)], threshold=0.5, tolerance=2)
    assert (m["kinds"]["over_long"]["early"], m["kinds"]["over_long"]["late"]) == (early, late)
    assert m["length_ratio"] == pytest.approx((stop + fires_at + 1) / (stop + 1))


def test_ece_against_a_hand_computation():
    records = [HaltRecord("a/good", "plain", "good", (0.05, 0.15, 0.15, 0.78), 3),
               HaltRecord("b/good", "plain", "good", (0.15, 0.78), 1),
               HaltRecord("c/under_short", "plain", "under_short", (0.78, 0.5), None)]
    m = halt_metrics(records, threshold=0.5, tolerance=2)
    # bins [0, .1]: .05 (0); (.1, .2]: .15 x3 (0); (.4, .5]: .5 (0); (.7, .8]: .78 x3 (1, 1, 0)
    by_hand = (1 * 0.05 + 3 * 0.15 + 1 * 0.5 + 3 * abs(2 / 3 - 0.78)) / 8
    assert m["ece"] == pytest.approx(by_hand, abs=1e-9)
    assert m["reliability"]["count"] == [1, 3, 0, 0, 1, 0, 0, 3, 0, 0]  # 0.5 counted where sklearn puts it
    assert m["reliability"]["accuracy"][7] == pytest.approx(2 / 3, abs=1e-6) and m["reliability"]["confidence"][4] == 0.5


def test_a_constant_head_is_chance_and_its_ece_the_gap_to_the_base_rate():
    m = halt_metrics(_records(lambda n, stop: (0.5,) * n), threshold=0.9, tolerance=2)
    rate = m["positives"] / (m["positives"] + m["negatives"])
    assert m["auc"] == 0.5 and m["ece"] == pytest.approx(0.5 - rate)
    assert m["reliability"]["count"][4] == m["positives"] + m["negatives"]


def test_degenerate_inputs_give_nulls_not_crashes(tmp_path):
    only_short = halt_metrics([r for r in _records(perfect) if r.kind == "under_short"], threshold=0.5, tolerance=2)
    assert only_short["auc"] is None and only_short["roc"] is None and only_short["late_stop_rate"] is None
    assert only_short["early_stop_rate"] == 0.0 and only_short["ece"] == 0.0
    empty = halt_metrics([], threshold=0.5, tolerance=2)
    assert empty["auc"] is None and empty["ece"] is None and empty["early_stop_rate"] is None and empty["length_ratio"] is None
    assert set(plot_halt([], empty, tmp_path)) == {"roc", "reliability", "lengths"}


def test_roc_curve_is_downsampled():
    rng = random.Random(0)
    records = _records(lambda n, stop: tuple(rng.random() for _ in range(n)), bases=200)
    roc = halt_metrics(records, threshold=0.5, tolerance=2)["roc"]
    assert len(roc["fpr"]) == len(roc["tpr"]) == len(roc["threshold"]) <= 200
    assert (roc["fpr"][0], roc["tpr"][0], roc["fpr"][-1], roc["tpr"][-1]) == (0.0, 0.0, 1.0, 1.0)


def test_records_round_trip_through_json_and_refuse_a_missing_stop():
    record = _records(perfect)[1]
    assert HaltRecord.from_json(json.loads(json.dumps(record.to_json()))) == record
    with pytest.raises(DataError, match="stop None"):
        HaltRecord("x/good", "plain", "good", (0.1, 0.2), None)


def test_plots_are_three_pngs(tmp_path):
    records = _records(perfect)
    paths = plot_halt(records, halt_metrics(records, threshold=0.5, tolerance=2), tmp_path / "plots")
    assert {name: p.name for name, p in paths.items()} == {"roc": "roc.png", "reliability": "reliability.png", "lengths": "lengths.png"}
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in paths.values())


# --- the reference student -------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(reference_artifacts):
    """The test build's distilled student, its tokenizer and the halt set its data stage held out."""
    from kdtrain.artifact_table import DATA_HALT_SET, STUDENT_DISTILLED
    from kdtrain.artifacts import ArtifactsFolder
    from kdtrain.data.halt_set import HaltSet
    from kdtrain.student.model import StudentLM
    from kdtrain.tokenizers.load import load_tokenizer

    folder = ArtifactsFolder.open(reference_artifacts)
    return (StudentLM.from_pretrained(folder.path(STUDENT_DISTILLED)), load_tokenizer(folder, "student"),
            HaltSet.load(folder.path(DATA_HALT_SET)))


def test_packed_scores_are_the_students_own_forward(reference):
    """Sharing a prompt across the kinds changes no number: each completion reads what it reads alone."""
    from kdcontracts.models.tokens import Message
    from kdtrain.data.chat import ChatFormat
    from kdtrain.losses.outputs import student_outputs

    student, tokenizer, halt_set = reference
    with_tools = min((e for e in halt_set.examples if e.kind == "good" and "<tool_call>" in e.completion),
                     key=lambda e: sum(len(m.content) for m in e.messages))
    bases = {next(e.base for e in halt_set.examples if e.scenario == "plain"), with_tools.base}
    examples = [e for e in halt_set.examples if e.base in bases]
    records = score_halt_set(student, tokenizer, examples, batch_size=2)
    for example, record in zip(examples, records, strict=True):
        rendered = ChatFormat.of(tokenizer).render((*example.messages, Message("assistant", example.completion)))
        start, end = rendered.message_spans[-1]
        enc = tokenizer.encode(rendered.text)
        inside = [i for i, (s, e) in enumerate(enc.offsets) if s < end and e > start]
        ids = torch.tensor([enc.ids])
        with torch.no_grad():
            alone = student_outputs(student, ids, torch.ones_like(ids)).halt[0, inside]
        assert record.halt == pytest.approx(alone.tolist(), abs=1e-5), example.id
        if record.stop is not None:  # the stop token ends the good answer: its text reaches stop_char
            stop_token = enc.offsets[inside[record.stop]]
            assert stop_token[0] < start + example.stop_char <= stop_token[1], example.id
    by_kind = {r.kind: r for r in records if r.id.startswith(examples[0].base + "/")}
    assert by_kind["good"].stop == len(by_kind["good"].halt) - 1 == by_kind["over_long"].stop
