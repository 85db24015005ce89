"""Golden vectors and ablation baselines as syrupy snapshots under the top-level ``golden/``.

Golden vectors are ``.npz``, compared by cosine with the contract's tolerance (never a NaN
or an Inf), not byte equality; ablation baselines are JSON, compared metric by metric within
a tolerance and by greedy-token agreement.

Following syrupy's split: :class:`GoldenRecord` (or a dict) is the value, the extension
(a ``SingleFileSnapshotExtension``) says where and how it is stored and how it is compared.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from syrupy.extensions.single_file import SingleFileSnapshotExtension, WriteMode

from kdcontracts.models.ablations import Tolerance
from pytest_kdcontracts.check import fail


@dataclass(frozen=True)
class Agreement:
    cosine: float
    max_abs: float
    nonfinite: int
    worst: list[tuple[int, float, float]]  # (position, expected, found), largest |difference| first

    def ok(self, cosine_min: float) -> bool:
        return self.nonfinite == 0 and self.cosine >= cosine_min

    def __str__(self) -> str:
        worst = ", ".join(f"[{i}] {e:.4g} vs {f:.4g}" for i, e, f in self.worst)
        return f"cosine {self.cosine:.6f}, max |diff| {self.max_abs:.4g}, non-finite {self.nonfinite}; worst positions: {worst}"


def agreement(expected: np.ndarray, found: np.ndarray, top: int = 3) -> Agreement:
    e = np.asarray(expected, dtype=np.float64).ravel()
    f = np.asarray(found, dtype=np.float64).ravel()
    nonfinite = int((~np.isfinite(f)).sum())
    finite = np.isfinite(f) & np.isfinite(e)
    if e.shape != f.shape:
        return Agreement(float("nan"), float("inf"), nonfinite, [])
    diff = np.where(finite, np.abs(e - f), np.inf)
    denom = np.linalg.norm(e[finite]) * np.linalg.norm(f[finite])
    cosine = float(e[finite] @ f[finite] / denom) if denom > 0 and nonfinite == 0 else float("nan")
    order = np.argsort(-diff, kind="stable")[:top]
    return Agreement(cosine, float(diff.max()) if diff.size else 0.0, nonfinite, [(int(i), float(e[i]), float(f[i])) for i in order])


@dataclass(frozen=True)
class GoldenRecord:
    arrays: dict[str, np.ndarray]  # inputs and outputs by name
    meta: dict  # model identity, function, length, backend


class _ToleranceSnapshot(SingleFileSnapshotExtension):
    """Stored under the contract's golden folder; matches when the subclass's ``problems``
    (how its values are compared, within which tolerance) finds none."""

    golden_dir: Path | None = None

    @classmethod
    def dirname(cls, *, test_location) -> str:
        return str(Path(cls.golden_dir or super().dirname(test_location=test_location)) / test_location.basename)

    def matches(self, *, serialized_data, snapshot_data) -> bool:
        return not self.problems(serialized_data, snapshot_data)

    def diff_lines(self, serialized_data, snapshot_data):
        yield from self.problems(serialized_data, snapshot_data)


def identity_changes(old: dict, new: dict) -> list[str]:
    """What made two golden records, input by input, where they differ.

    ``model`` holds the inputs that define the model (checkpoint, config, data, teacher,
    steps); ``numerics`` those whose bytes vary with the CPU (a teacher cache's FP16
    log-probs, the distilled weights). A snapshot of the format before this split holds a
    plain string under ``model``: it is compared as one input.
    """
    changes = []
    for part in ("model", "numerics"):
        before, after = old.get(part) or {}, new.get(part) or {}
        if not isinstance(before, dict) or not isinstance(after, dict):
            before, after = {part: before}, {part: after}
        for key in sorted(before.keys() | after.keys()):
            if before.get(key) != after.get(key):
                changes.append(f"{key}: {_short(before.get(key, '(absent)'))} -> {_short(after.get(key, '(absent)'))}")
    return changes


def _short(value) -> str:
    """A SHA-256 cut to 12 hex digits: enough to tell two inputs apart in a message."""
    return re.sub(r"([0-9a-f]{12})[0-9a-f]{52}", r"\1…", str(value))


class GoldenArrays(_ToleranceSnapshot):
    """Golden vectors judged by their values: cosine within the contract's bound, never a
    NaN or Inf. What made the snapshot is recorded beside the values and shown when they
    disagree, so a person can tell a changed model from drifted numerics; it never decides.

    ``update`` (``--snapshot-update``) also rewrites a snapshot whose values agree but whose
    model inputs changed, so the record stays true; numerics alone never cause a rewrite, so a
    snapshot made on one machine does not churn on another whose values agree.
    """

    file_extension = "npz"
    _write_mode = WriteMode.BINARY
    cosine_min = 0.999  # overridden per item through :func:`extension_for`
    update = False

    def serialize(self, data: GoldenRecord, **kwargs) -> bytes:
        buffer = io.BytesIO()
        meta = np.frombuffer(json.dumps(data.meta, sort_keys=True).encode(), dtype=np.uint8)
        np.savez_compressed(buffer, __meta__=meta, **data.arrays)
        return buffer.getvalue()

    @staticmethod
    def deserialize(blob: bytes) -> GoldenRecord:
        with np.load(io.BytesIO(blob), allow_pickle=False) as npz:  # never unpickle a snapshot
            arrays = {k: npz[k] for k in npz.files if k != "__meta__"}
            meta = json.loads(npz["__meta__"].tobytes().decode()) if "__meta__" in npz.files else {}
        return GoldenRecord(arrays, meta)

    def _value_problems(self, new: GoldenRecord, old: GoldenRecord) -> list[str]:
        found = []
        for name in sorted(old.arrays.keys() | new.arrays.keys()):
            if name not in old.arrays or name not in new.arrays:
                found.append(f"{name}: only in the {'snapshot' if name in old.arrays else 'new run'}")
            elif name.startswith("input"):
                if not np.array_equal(old.arrays[name], new.arrays[name]):
                    found.append(f"{name}: inputs differ from the snapshot's")
            else:
                agree = agreement(old.arrays[name], new.arrays[name])
                if not agree.ok(self.cosine_min):
                    found.append(f"{name}: {agree} (need cosine >= {self.cosine_min})")
        return found

    def problems(self, serialized_data: bytes, snapshot_data: bytes) -> list[str]:
        new, old = self.deserialize(serialized_data), self.deserialize(snapshot_data)
        found = self._value_problems(new, old)
        changes = identity_changes(old.meta, new.meta)
        if found:
            found.append("made from other inputs than the snapshot: " + "; ".join(changes) if changes
                         else "made from the same inputs as the snapshot: the numerics moved past the bound")
        elif self.update and old.meta.get("model") != new.meta.get("model"):
            found.append("values agree, but the model inputs changed: " + "; ".join(changes))
        return found


def extension_for(golden_dir: Path, cosine_min: float, update: bool = False) -> type[GoldenArrays]:
    """A GoldenArrays bound to one contract's folder and tolerance (syrupy takes a class)."""
    return type("GoldenArrays", (GoldenArrays,), {"golden_dir": golden_dir, "cosine_min": cosine_min, "update": update})


class BaselineResults(_ToleranceSnapshot):
    """One ablation experiment's results (metrics, sample outputs) as a JSON snapshot,
    compared within the contract's tolerance: training numerics differ across CPUs."""

    file_extension = "json"
    _write_mode = WriteMode.TEXT
    tolerance = Tolerance(0.1, 0.02, 0.5)

    def serialize(self, data: dict, **kwargs) -> str:
        return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"

    def problems(self, serialized_data: str, snapshot_data: str) -> list[str]:
        new, old = json.loads(serialized_data), json.loads(snapshot_data)
        t, found = self.tolerance, []
        if new.get("terms") != old.get("terms") or new.get("protocol") != old.get("protocol"):
            found.append(f"experiment changed: terms {old.get('terms')} -> {new.get('terms')}, "
                         f"protocol {old.get('protocol')} -> {new.get('protocol')}")
            return found
        for name in sorted(old["metrics"].keys() | new["metrics"].keys()):
            before, after = old["metrics"].get(name), new["metrics"].get(name)
            if before is None or after is None:
                found.append(f"metric {name}: only in the {'baseline' if after is None else 'new run'}")
            elif not abs(after - before) <= max(t.metric_abs, t.metric_rel * abs(before)):
                found.append(f"metric {name}: {after:.4g}, baseline {before:.4g} "
                             f"(allowed ±{max(t.metric_abs, t.metric_rel * abs(before)):.3g})")
        for before, after in zip(old["samples"], new["samples"]):
            a, b = before["tokens"], after["tokens"]
            same = sum(x == y for x, y in zip(a, b)) / max(len(a), len(b), 1)
            if same < t.sample_agreement:
                found.append(f"sample {before['sample']}: {same:.0%} of greedy tokens as the baseline's "
                             f"(need {t.sample_agreement:.0%}): {after['text']!r}, baseline {before['text']!r}")
        if len(old["samples"]) != len(new["samples"]):
            found.append(f"{len(new['samples'])} sample outputs, baseline {len(old['samples'])}")
        return found


def baseline_extension_for(golden_dir: Path, tolerance: Tolerance) -> type[BaselineResults]:
    return type("BaselineResults", (BaselineResults,), {"golden_dir": golden_dir, "tolerance": tolerance})


def assert_snapshot(snapshot, extension: type, value, contract: str, missing: str, mismatch: str, expected: str, mark: str):
    """``value`` against its stored snapshot through ``extension``; the standard violation if it
    is missing (``missing`` names it) or does not match (``mismatch``, with the extension's problems).
    Returns syrupy's result of the assertion that passed (what was recalled, whether it was written)."""
    assertion = snapshot.use_extension(extension)
    matched = assertion == value
    result = assertion.executions[assertion.num_executions - 1]
    if matched:
        return result
    if result.recalled_data is None:
        fail(contract, missing, f"a snapshot at {result.snapshot_location}",
             f"none (write it with: pytest --kd-contracts … -m {mark} --snapshot-update)")
    problems = assertion.extension.problems(result.asserted_data, result.recalled_data)
    fail(contract, f"{mismatch} ({result.snapshot_location})", expected, "\n    " + "\n    ".join(problems))
