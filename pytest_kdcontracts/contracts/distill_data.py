"""``distill_data.yaml``: the validation pass found no more malformed data than allowed, and
every sample of the corpus has teacher targets that verify (hashes, prompt, teacher version)
and look like log-probabilities."""

from __future__ import annotations

from functools import partial
from typing import Iterator

import numpy as np

from kdcontracts.models.distill_data import DataContract
from pytest_kdcontracts.check import Check, fail


def check_corruption_rate(c: DataContract, kd_artifacts) -> None:
    import json

    path = kd_artifacts.path("data.validation_report")
    report = json.loads(path.read_text(encoding="utf-8"))
    rate = report["corruption_rate"]
    if rate > c.corpus.max_corruption_rate:
        causes = ", ".join(f"{cause} {n}" for cause, n in sorted(report["by_cause"].items()))
        fail(c.file.name, f"corruption rate of the incoming corpus ({path})", f"<= {c.corpus.max_corruption_rate}",
             f"{rate:.3f} ({report['invalid']} of {report['total']} samples: {causes})",
             "a data source that breaks must be fixed, not silently filtered")


def _targets(c: DataContract, kd_artifacts):
    from kdtrain.data.targets import TeacherTargets
    from kdtrain.teacher.cache import TeacherCache
    from kdtrain.teacher.stage import teacher_requests

    requests, _ = teacher_requests(kd_artifacts, c.teacher)
    return TeacherTargets(requests, TeacherCache(kd_artifacts.path("teacher.cache")), c.teacher.accept)


def check_integrity(c: DataContract, kd_artifacts) -> None:
    from kdtrain.teacher.cache import TeacherCache

    cache = TeacherCache(kd_artifacts.path("teacher.cache"))
    problems = [f"entry {row}: {why}" for row, why in cache.verify().damaged]  # an unreadable file raises ArtifactError
    if problems:
        fail(c.file.name, f"integrity of the teacher cache {cache.file}", "every entry's content hash verifies",
             "\n    " + "\n    ".join(problems[:12]))


def check_coverage(c: DataContract, kd_artifacts) -> None:
    targets = _targets(c, kd_artifacts)
    for _ in targets:
        pass
    if targets.missing_ratio > c.max_missing_ratio:
        listed = [f"{sample}: {why}" for sample, why in sorted(targets.missing.items())]
        fail(c.file.name, "samples of the corpus with trusted teacher targets",
             f"missing ratio <= {c.max_missing_ratio} (teacher {c.teacher.accept})",
             f"{targets.missing_ratio:.3f} ({len(targets.missing)} of {len(targets.requests)} samples)\n    " + "\n    ".join(listed[:12]))


def check_log_probs(c: DataContract, kd_artifacts) -> None:
    """Stored values must be log-probabilities: finite-or--inf, <= 0, best first, mass <= 1."""
    problems = []
    for example in _targets(c, kd_artifacts):
        lp, sample = example.targets.topk_logprobs, example.request.sample_id
        mass = np.exp(lp.astype(np.float64)).sum(-1)
        if lp.shape[1] != c.teacher.top_k:
            problems.append(f"{sample}: top-{lp.shape[1]} stored")
        elif np.isnan(lp).any() or (lp > 0).any():
            problems.append(f"{sample}: values outside [-inf, 0] (max {np.nanmax(lp):.3g})")
        elif (np.diff(lp, axis=-1) > 0).any():
            problems.append(f"{sample}: top-k not sorted best first")
        elif (mass > 1 + 2e-3).any():
            problems.append(f"{sample}: probability mass {mass.max():.4f} > 1 at token {int(mass.argmax())}")
    if problems:
        fail(c.file.name, "teacher targets in the cache", f"top-{c.teacher.top_k} log-probabilities (<= 0, best first, mass <= 1)",
             "\n    " + "\n    ".join(problems[:12]))


def checks(c: DataContract) -> Iterator[Check]:
    yield Check("corruption_rate", (), partial(check_corruption_rate, c), ("kd_artifacts",),
                doc="the validation pass found no more malformed samples than allowed")
    for name, run in (("integrity", check_integrity), ("coverage", check_coverage), ("log_probs", check_log_probs)):
        yield Check("teacher_targets", (name,), partial(run, c), ("kd_artifacts",))
