"""The halt head on the held-out halt set (:mod:`kdtrain.data.halt_set`): scores, metrics, plots.

Scoring is teacher-forced: each example's prompt and completion are rendered through the
tokenizer's chat template and read without grad (the kinds of one base share their prompt,
read once); the head's P(turn complete after this token) is kept at every token of the
completion. ``stop`` is the index of the completion's last
token of the good answer, the one after which the turn should end (the halt loss's
positive, :mod:`kdtrain.losses.halt`).

Two views of the same numbers:

- the ROC and calibration over positions: positives are the ``stop`` positions, negatives
  every position before them and every position of an ``under_short`` completion (which
  has no stop). Positions after ``stop`` in an ``over_long`` completion are left out there:
  the host has already stopped or not, which the late-stop rate judges;
- what a host acting on the head does: it stops after the first token whose P(halt) reaches
  the threshold, and that length is compared with the good one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from kdcontracts.models.tokens import Message
from kdtrain.data.chat import ChatFormat
from kdtrain.data.halt_set import KINDS, HaltExample
from kdtrain.errors import DataError
from kdtrain.student.model import MASK_MIN, rope_tables

N_BINS = 10
ROC_POINTS = 200
_DIGITS = 6


@dataclass(frozen=True)
class HaltRecord:
    """The head's P(halt) at each completion token of one example; ``stop`` indexes ``halt`` (None: under_short)."""

    id: str
    scenario: str
    kind: str
    halt: tuple[float, ...]
    stop: int | None

    def __post_init__(self):
        if self.kind not in KINDS or (self.stop is None) != (self.kind == "under_short") or not self.halt \
                or (self.stop is not None and not 0 <= self.stop < len(self.halt)):
            raise DataError(f"halt record {self.id!r}: expected a kind of {list(KINDS)}, a stop inside halt for good and "
                            f"over_long and none for under_short, found kind {self.kind!r}, stop {self.stop}, {len(self.halt)} positions")

    def to_json(self) -> dict:
        return asdict(self) | {"halt": list(self.halt)}

    @classmethod
    def from_json(cls, data: dict) -> "HaltRecord":
        return cls(data["id"], data["scenario"], data["kind"], tuple(float(p) for p in data["halt"]), data["stop"])


@dataclass(frozen=True)
class _Encoded:
    ids: list[int]  # up to and including the completion's last token (nothing after it is read)
    first: int  # position of the completion's first token: ids[:first] is the prompt
    stop: int | None  # into the completion's positions


def _encode(fmt: ChatFormat, tokenizer, example: HaltExample) -> _Encoded:
    rendered = fmt.render((*example.messages, Message("assistant", example.completion)))
    start, end = rendered.message_spans[-1]
    enc = tokenizer.encode(rendered.text)
    positions = [i for i, (s, e) in enumerate(enc.offsets) if s < end and e > start]
    if not positions:
        raise DataError(f"halt example {example.id!r}: expected tokens in its completion, found none")
    stop = None
    if example.stop_char is not None:
        stop = max(k for k, i in enumerate(positions) if enc.offsets[i][0] < start + example.stop_char)
    return _Encoded(enc.ids[:positions[-1] + 1], positions[0], stop)


@dataclass(frozen=True)
class _Row:
    """One shared prompt, then each completion that follows it (a tree packed into one row)."""

    ids: list[int]
    segment: list[int]  # 0: the prompt; j + 1: completion j
    position: list[int]  # each token's position as it would be read alone
    spans: list[tuple[int, int]]  # where completion j lies in the row

    @classmethod
    def pack(cls, prompt: list[int], completions: list[list[int]]) -> "_Row":
        ids, segment, position, spans = list(prompt), [0] * len(prompt), list(range(len(prompt))), []
        for j, tokens in enumerate(completions, start=1):
            spans.append((len(ids), len(ids) + len(tokens)))
            ids += tokens
            segment += [j] * len(tokens)
            position += range(len(prompt), len(prompt) + len(tokens))
        return cls(ids, segment, position, spans)


def _halt_probability(student, rows: Sequence[_Row]) -> torch.Tensor:
    """P(halt) [B, S] of rows packed right-padded: each token sees its own segment and the prompt, causally.

    The student's forward with a tree mask and per-token positions instead of a causal one:
    each completion reads exactly what it reads alone (same tokens, same positions) while the
    prompt they share is read once. The LM head is skipped: the halt head reads only the
    final norm's output (as in :mod:`kdtrain.losses.outputs`), and with a 49k vocabulary the
    logits would be about three quarters of a 3-layer student's work.
    """
    width = max(len(r.ids) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)  # [B, S]; padding is masked, its id unread
    segment = torch.full((len(rows), width), -1)  # [B, S]; -1: padding
    position = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, :len(row.ids)] = torch.tensor(row.ids)
        segment[b, :len(row.ids)] = torch.tensor(row.segment)
        position[b, :len(row.ids)] = torch.tensor(row.position)
    causal = torch.ones((width, width), dtype=torch.bool).tril()  # [S, S] key <= query
    same = (segment[:, None, :] == 0) | (segment[:, None, :] == segment[:, :, None])  # [B, S(query), S(key)]
    allowed = causal[None] & same & (segment[:, None, :] >= 0)
    mask = torch.where(allowed, 0.0, MASK_MIN)[:, None]  # [B, 1, S, S]
    cos, sin = rope_tables(student.config, int(position.max()) + 1)  # [P, hd]
    cos, sin = cos[position][:, None], sin[position][:, None]  # [B, 1, S, hd]
    h = student.model.embed_tokens(ids)  # [B, S, H]
    for layer in student.model.layers:
        h = layer(h, cos, sin, mask)[0]
    return student.halt_probability(student.model.norm(h))  # [B, S]


def _batches(rows: list, batch_size: int, tokens_per_batch: int) -> list[list]:
    """Consecutive (length-sorted) rows: at most ``batch_size``, and at most ``tokens_per_batch`` once padded.

    Attention's scores are [B, heads, S, S]: a batch of eight 1,300-token rows is slower than
    the same rows three at a time on two cores.
    """
    batches, current = [], []
    for row in rows:
        if current and (len(current) == batch_size or (len(current) + 1) * len(row[0].ids) > tokens_per_batch):
            batches.append(current)
            current = []
        current.append(row)
    return batches + [current] if current else batches


def score_halt_set(student, tokenizer, examples: Sequence[HaltExample], batch_size: int = 8,
                   tokens_per_batch: int = 4096) -> list[HaltRecord]:
    """Teacher-forced P(halt) at every completion token, without grad.

    Examples whose prompts tokenize the same (the three kinds of a base) share one row, the
    prompt read once; rows of similar lengths are batched (see :func:`_batches`), right-padded.
    """
    fmt = ChatFormat.of(tokenizer)
    encoded = [_encode(fmt, tokenizer, e) for e in examples]
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, enc in enumerate(encoded):
        groups.setdefault(tuple(enc.ids[:enc.first]), []).append(i)
    rows = sorted(((_Row.pack(list(prompt), [encoded[i].ids[encoded[i].first:] for i in members]), members)
                   for prompt, members in groups.items()), key=lambda rm: len(rm[0].ids))
    halts: list[tuple[float, ...]] = [()] * len(examples)
    with torch.inference_mode():
        for batch in _batches(rows, batch_size, tokens_per_batch):
            probs = _halt_probability(student, [row for row, _ in batch]).float()  # [B, S]
            for b, (row, members) in enumerate(batch):
                for (first, end), i in zip(row.spans, members):
                    halts[i] = tuple(round(p, _DIGITS) for p in probs[b, first:end].tolist())
    return [HaltRecord(e.id, e.scenario, e.kind, halt, enc.stop) for e, enc, halt in zip(examples, encoded, halts)]


def _roc_samples(records: Sequence[HaltRecord]) -> tuple[np.ndarray, np.ndarray]:
    """(labels, scores) over positions: each stop a positive, every position before it (all of an under_short) a negative."""
    labels, scores = [], []
    for r in records:
        before = r.halt if r.stop is None else r.halt[:r.stop]
        labels += [0] * len(before)
        scores += before
        if r.stop is not None:
            labels.append(1)
            scores.append(r.halt[r.stop])
    return np.asarray(labels, dtype=int), np.asarray(scores, dtype=float)


def _roc(labels: np.ndarray, scores: np.ndarray) -> tuple[float | None, dict | None]:
    """AUC and the ROC curve (at most ROC_POINTS points); None without both classes, where neither is defined."""
    from sklearn.metrics import roc_auc_score, roc_curve

    if len(set(labels.tolist())) < 2:
        return None, None
    fpr, tpr, thresholds = roc_curve(labels, scores)
    keep = np.unique(np.linspace(0, len(fpr) - 1, min(len(fpr), ROC_POINTS)).round().astype(int))
    curve = {"fpr": [round(float(v), _DIGITS) for v in fpr[keep]], "tpr": [round(float(v), _DIGITS) for v in tpr[keep]],
             "threshold": [None if math.isinf(v) else round(float(v), _DIGITS) for v in thresholds[keep]]}
    return float(roc_auc_score(labels, scores)), curve


def reliability(labels: np.ndarray, scores: np.ndarray, n_bins: int = N_BINS) -> tuple[float | None, dict]:
    """ECE and the reliability diagram over ``n_bins`` equal-width bins of P(halt).

    ECE = Σ_b (count_b / N) · |accuracy_b − confidence_b|. scikit-learn's
    ``calibration_curve(strategy="uniform")`` gives each non-empty bin's accuracy and mean
    confidence but not its count, so the counts are taken with ``np.histogram`` on the same
    edges. The two close their bins on opposite sides (sklearn: ``(a, b]``, the first
    ``[0, b]``; numpy: ``[a, b)``, the last ``[a, 1]``), so the histogram is of −P over the
    negated edges, which closes them as sklearn does: a P of exactly 0.5 counts in (0.4, 0.5]
    for both. Empty bins are null in the diagram.
    """
    from sklearn.calibration import calibration_curve

    edges = np.linspace(0.0, 1.0, n_bins + 1)
    counts = np.histogram(-scores, bins=-edges[::-1])[0][::-1] if len(scores) else np.zeros(n_bins, dtype=int)
    accuracy, confidence = [None] * n_bins, [None] * n_bins
    ece = None
    if len(scores):
        prob_true, prob_pred = calibration_curve(labels, scores, n_bins=n_bins, strategy="uniform")
        filled = np.flatnonzero(counts)
        assert len(filled) == len(prob_true), "np.histogram and calibration_curve binned differently"
        for b, acc, conf in zip(filled, prob_true, prob_pred):
            accuracy[b], confidence[b] = round(float(acc), _DIGITS), round(float(conf), _DIGITS)
        ece = float(np.sum(counts[filled] / counts.sum() * np.abs(prob_true - prob_pred)))
    return ece, {"bin_edges": [round(float(e), _DIGITS) for e in edges], "accuracy": accuracy, "confidence": confidence,
                 "count": [int(c) for c in counts]}


def first_firing(halt: Sequence[float], threshold: float) -> int | None:
    """Index of the first token whose P(halt) reaches ``threshold``: the host stops after it."""
    return next((i for i, p in enumerate(halt) if p >= threshold), None)


def effective_length(record: HaltRecord, threshold: float) -> int:
    """Completion tokens a host acting on the head keeps: up to its first firing, else all of them."""
    fired = first_firing(record.halt, threshold)
    return len(record.halt) if fired is None else fired + 1


def _rate(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def halt_metrics(records: Sequence[HaltRecord], threshold: float, tolerance: int) -> dict:
    """ROC/AUC and calibration over positions, and the early/late stops of a host acting on the head.

    For good and over_long the reference length is ``stop + 1``: a stop more than
    ``tolerance`` tokens before it is early, more than ``tolerance`` after it late. Late stops
    are counted on over_long only: a good completion ends at its stop, and a host whose head
    never fires there still stops at the EOS, so a good example cannot run late. In an
    under_short completion the answer is not complete yet: any firing is an early stop.
    ``early_stop_rate`` is over all examples, ``late_stop_rate`` over over_long,
    ``length_ratio`` the mean of effective / reference over good and over_long. A rate with
    nothing to count over, and an AUC without both classes, are null.
    """
    labels, scores = _roc_samples(records)
    auc, roc = _roc(labels, scores)
    ece, diagram = reliability(labels, scores)
    kinds = {k: {"examples": 0, "early": 0, "late": 0 if k == "over_long" else None} for k in KINDS}
    ratios = []
    for r in records:
        counts = kinds[r.kind]
        counts["examples"] += 1
        if r.stop is None:
            counts["early"] += first_firing(r.halt, threshold) is not None
            continue
        effective, reference = effective_length(r, threshold), r.stop + 1
        ratios.append(effective / reference)
        counts["early"] += effective < reference - tolerance
        if r.kind == "over_long":
            counts["late"] += effective > reference + tolerance
    early = sum(c["early"] for c in kinds.values())
    return {
        "threshold": threshold, "tolerance": tolerance, "examples": len(records), "kinds": kinds,
        "positives": int(labels.sum()), "negatives": int(len(labels) - labels.sum()),
        "auc": auc, "ece": ece, "roc": roc, "reliability": diagram,
        "early_stop_rate": _rate(early, len(records)),
        "late_stop_rate": _rate(kinds["over_long"]["late"], kinds["over_long"]["examples"]),
        "length_ratio": float(np.mean(ratios)) if ratios else None,
    }


def plot_halt(records: Sequence[HaltRecord], metrics: dict, folder: Path | str) -> dict[str, Path]:
    """``roc.png``, ``reliability.png`` and ``lengths.png`` in ``folder``, each written atomically."""
    from kdtrain.plots import pyplot, save_png

    folder, plt = Path(folder), pyplot()
    written = {}

    fig, ax = plt.subplots(figsize=(5, 5))
    if metrics["roc"] is not None:
        ax.plot(metrics["roc"]["fpr"], metrics["roc"]["tpr"], label=f"halt head (AUC = {metrics['auc']:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="chance (AUC = 0.5)")
    ax.set_xlabel("false positive rate (positions before the stop)")
    ax.set_ylabel("true positive rate (stop positions)")
    ax.set_title(f"Halt head ROC: {metrics['positives']} stops, {metrics['negatives']} non-stops")
    ax.legend(fontsize=8, loc="lower right")
    written["roc"] = save_png(fig, folder / "roc.png")

    diagram = metrics["reliability"]
    edges = np.asarray(diagram["bin_edges"])
    centers, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
    filled = [b for b, c in enumerate(diagram["count"]) if c]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfectly calibrated")
    top.plot([diagram["confidence"][b] for b in filled], [diagram["accuracy"][b] for b in filled], marker="o", label="halt head")
    top.set_ylabel("fraction of stops")
    ece = "n/a" if metrics["ece"] is None else f"{metrics['ece']:.4f}"
    top.set_title(f"Halt head reliability (ECE = {ece})")
    top.legend(fontsize=8)
    if filled:
        bottom.bar(centers, diagram["count"], width=width * 0.9, log=True)
        bottom.set_ylim(bottom=0.5)
    bottom.set_ylabel("positions")
    bottom.set_xlabel("P(halt), 10 equal-width bins")
    written["reliability"] = save_png(fig, folder / "reliability.png")

    fig, ax = plt.subplots(figsize=(6, 5))
    threshold, tolerance = metrics["threshold"], metrics["tolerance"]
    for kind, marker in zip(KINDS, ("o", "^", "x")):
        chosen = [r for r in records if r.kind == kind]
        # an under_short completion has no stop: its own length is what a host should keep
        reference = [len(r.halt) if r.stop is None else r.stop + 1 for r in chosen]
        ax.scatter(reference, [effective_length(r, threshold) for r in chosen], marker=marker, s=18, alpha=0.7,
                   label=kind + (" (x: its cut length)" if kind == "under_short" else ""))
    top_length = max([len(r.halt) for r in records], default=1)
    line = np.array([0, top_length])
    ax.plot(line, line, color="grey", linewidth=1, label="y = x")
    ax.fill_between(line, line - tolerance, line + tolerance, color="grey", alpha=0.15, label=f"± {tolerance} tokens")
    ax.set_xlabel("reference length (tokens to the good stop)")
    ax.set_ylabel(f"effective length (first P(halt) ≥ {threshold:g})")
    ax.set_title("Where a host acting on the head stops")
    ax.legend(fontsize=8)
    written["lengths"] = save_png(fig, folder / "lengths.png")
    return written
