"""``distill_data.yaml``: the validation pass found no more malformed data than allowed; the
teacher that filled the cache (as its report records the distill config's settings) is one
the contract accepts, with enough top-k; every sample of the corpus has teacher targets that
verify (hashes, prompt, teacher version) and look like log-probabilities."""

from __future__ import annotations

from functools import partial
from typing import Iterator

import numpy as np

from kdcontracts.models.distill_data import DataContract
from kdtrain.artifact_table import DATA_VALIDATION_REPORT, TEACHER_CACHE, TEACHER_REPORT
from pytest_kdcontracts.check import Check, fail


def check_corruption_rate(c: DataContract, kd_artifacts) -> None:
    import json

    path = kd_artifacts.path(DATA_VALIDATION_REPORT)
    report = json.loads(path.read_text(encoding="utf-8"))
    rate = report["corruption_rate"]
    if rate > c.corpus.max_corruption_rate:
        causes = ", ".join(f"{cause} {n}" for cause, n in sorted(report["by_cause"].items()))
        fail(c.file.name, f"corruption rate of the incoming corpus ({path})", f"<= {c.corpus.max_corruption_rate}",
             f"{rate:.3f} ({report['invalid']} of {report['total']} samples: {causes})",
             "a data source that breaks must be fixed, not silently filtered")


def check_teacher(c: DataContract, kd_artifacts) -> None:
    from kdtrain.teacher.stage import filled_settings

    filled = filled_settings(kd_artifacts)
    if filled.teacher not in c.accept or filled.top_k < c.min_top_k:
        fail(c.file.name, f"the teacher that filled the cache ({kd_artifacts.path(TEACHER_REPORT)}: the distill config's "
             "teacher section)", f"{c.accept} with top-k >= {c.min_top_k}", f"{filled.name} {filled.version} with top-k {filled.top_k}",
             "set the distill config's teacher to one the contract accepts and re-run the teacher stage")


def _targets(c: DataContract, kd_artifacts):
    """The corpus's requests as the cache was filled, looked up for the teachers the contract accepts."""
    from kdtrain.data.targets import TeacherTargets
    from kdtrain.teacher.cache import TeacherCache
    from kdtrain.teacher.stage import filled_settings, teacher_requests

    filled = filled_settings(kd_artifacts)
    requests, _ = teacher_requests(kd_artifacts, filled)
    return filled.top_k, TeacherTargets(requests, TeacherCache(kd_artifacts.path(TEACHER_CACHE)), c.accept)


def check_integrity(c: DataContract, kd_artifacts) -> None:
    from kdtrain.teacher.cache import TeacherCache

    cache = TeacherCache(kd_artifacts.path(TEACHER_CACHE))
    problems = [f"entry {row}: {why}" for row, why in cache.verify().damaged]  # an unreadable file raises ArtifactError
    if problems:
        fail(c.file.name, f"integrity of the teacher cache {cache.file}", "every entry's content hash verifies",
             "\n    " + "\n    ".join(problems[:12]))


def check_coverage(c: DataContract, kd_artifacts) -> None:
    _, targets = _targets(c, kd_artifacts)
    for _ in targets:
        pass
    if targets.missing_ratio > c.max_missing_ratio:
        listed = [f"{sample}: {why}" for sample, why in sorted(targets.missing.items())]
        fail(c.file.name, "samples of the corpus with trusted teacher targets",
             f"missing ratio <= {c.max_missing_ratio} (teacher {c.accept})",
             f"{targets.missing_ratio:.3f} ({len(targets.missing)} of {len(targets.requests)} samples)\n    " + "\n    ".join(listed[:12]))


def check_log_probs(c: DataContract, kd_artifacts) -> None:
    """Stored values must be log-probabilities: finite-or--inf, <= 0, best first, mass <= 1."""
    problems = []
    top_k, targets = _targets(c, kd_artifacts)
    for example in targets:
        lp, sample = example.targets.topk_logprobs, example.request.sample_id
        mass = np.exp(lp.astype(np.float64)).sum(-1)
        if lp.shape[1] != top_k:
            problems.append(f"{sample}: top-{lp.shape[1]} stored")
        elif np.isnan(lp).any() or (lp > 0).any():
            problems.append(f"{sample}: values outside [-inf, 0] (max {np.nanmax(lp):.3g})")
        elif (np.diff(lp, axis=-1) > 0).any():
            problems.append(f"{sample}: top-k not sorted best first")
        elif (mass > 1 + 2e-3).any():
            problems.append(f"{sample}: probability mass {mass.max():.4f} > 1 at token {int(mass.argmax())}")
    if problems:
        fail(c.file.name, "teacher targets in the cache", f"top-{top_k} log-probabilities (<= 0, best first, mass <= 1)",
             "\n    " + "\n    ".join(problems[:12]))


def checks(c: DataContract) -> Iterator[Check]:
    yield Check("corruption_rate", (), partial(check_corruption_rate, c), ("kd_artifacts",),
                doc="the validation pass found no more malformed samples than allowed")
    for name, run in (("teacher", check_teacher), ("integrity", check_integrity), ("coverage", check_coverage),
                      ("log_probs", check_log_probs)):
        yield Check("teacher_targets", (name,), partial(run, c), ("kd_artifacts",))
