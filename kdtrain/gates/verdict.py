"""The gate verdict and the unlock: a full run starts only after the mini pipeline passed for its configuration.

``gates/verdict.json`` records every gate item's judgement and what was judged (its
:class:`Binding`): the distill config's *gate fingerprint*, the training corpus, the teacher
and the initial student. ``kdtrain distill`` (the full run) computes the same binding for
itself and refuses to start unless a passing verdict carries it; ``--skip-gate`` starts anyway,
logged, and the override is written into every checkpoint of the run.

The gate fingerprint is the config's fingerprint without the keys that only say how long or
where a run goes (:data:`RUN_SCALE`): the mini run is the full run's configuration, shorter.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from kdtrain import atomic
from kdtrain.artifact_table import DATA_CORPUS, GATES_VERDICT, STUDENT_CHECKPOINT
from kdtrain.errors import KDError, located

log = logging.getLogger("kdtrain.gates")

# Keys that scale a run without changing what it learns from or how: step counts, the
# curriculum's step boundaries, checkpoints, budgets, resume rules, where the data lives,
# how often the balance is measured and the telemetry's prompt count.
RUN_SCALE = ("optim.steps", "optim.warmup_steps", "curriculum[].until_step", "checkpoint", "budgets", "resume", "data.artifacts",
             "data.slice", "balance.every_n_steps", "balance.smoke_steps", "balance.override", "telemetry")


class GateError(KDError):
    """A full run refused: no passing verdict for its configuration and data."""


def gate_fingerprint(config) -> str:
    """The fingerprint of ``config`` (a DistillConfig) with the :data:`RUN_SCALE` keys removed."""
    from kdtrain.train.config import fingerprint_of

    tree = copy.deepcopy(config.canonical())
    for key in RUN_SCALE:
        if key.startswith("curriculum[]."):
            for stage in tree.get("curriculum", []):
                stage.pop(key.split(".", 1)[1], None)
            continue
        *parents, last = key.split(".")
        node = tree
        for part in parents:
            node = node.get(part, {})
        node.pop(last, None)
    return fingerprint_of(tree)


@dataclass(frozen=True)
class Binding:
    config: str  # gate fingerprint
    corpus: str  # sha256 of the training corpus's lines
    teacher: str  # name, version, mode, top-k
    student: str  # sha256 of the initial student checkpoint (what distillation starts from)

    @classmethod
    def of(cls, config, folder) -> "Binding":
        """What a run of ``config`` on the artifacts ``folder`` (an ArtifactsFolder) is."""
        t = config.teacher
        return cls(gate_fingerprint(config), f"sha256:{folder.entry(DATA_CORPUS).sha256}",
                   f"{t.name} {t.version} {t.mode} top-{t.top_k}", f"sha256:{folder.entry(STUDENT_CHECKPOINT).sha256}")

    def differences(self, other: "Binding") -> list[str]:
        return [f"{key}: verdict {getattr(other, key)}, this run {value}" for key, value in asdict(self).items()
                if getattr(other, key) != value]


def write_verdict(folder, judgements, binding: Binding, contract: Path, distilled: str) -> dict:
    """``gates/verdict.json``: every judgement, whether all passed, and what was judged."""
    verdict = {"passed": all(j.passed for j in judgements), "binding": asdict(binding), "contract": str(contract),
               "student_distilled": distilled, "failed": [j.item for j in judgements if not j.passed],
               "items": [j.to_json() for j in judgements]}
    atomic.write_json(folder.root / GATES_VERDICT.path, verdict)
    return verdict


def read_verdict(path: Path) -> dict:
    try:
        verdict = json.loads(path.read_text(encoding="utf-8"))
        Binding(**verdict["binding"])
        return verdict
    except FileNotFoundError:
        raise GateError(located(path, None, "the gate verdict of a mini pipeline run (kdtrain pipeline, stage gates)",
                                "no such file")) from None
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise GateError(located(path, "binding", "a verdict written by kdtrain evaluate", f"unreadable: {exc}")) from None


def unlock(config, folder, verdict_path: Path | None, skip: bool = False) -> dict:
    """May a full run of ``config`` on ``folder`` start? The record to keep in its checkpoints.

    Refuses (:class:`GateError`) unless the verdict passed and is bound to this config's gate
    fingerprint, corpus, teacher and initial student; ``skip`` starts anyway, logged."""
    path = Path(verdict_path) if verdict_path else folder.root / GATES_VERDICT.path
    mine = Binding.of(config, folder)
    record = {"verdict": str(path), "binding": asdict(mine), "override": False}
    try:
        verdict = read_verdict(path)
        differences = mine.differences(Binding(**verdict["binding"]))
        if differences:
            raise GateError(located(path, "binding", f"a verdict for this run ({config.file})",
                                    "a verdict for another run: " + "; ".join(differences)
                                    + ". Run the mini pipeline with this configuration (kdtrain pipeline --config …)"))
        if not verdict["passed"]:
            raise GateError(located(path, "passed", "true: every gate item passed",
                                    f"false: failed {', '.join(verdict['failed'])}; the full run does not start"))
    except GateError as exc:
        if not skip:
            raise GateError(f"{exc}\n  start anyway with --skip-gate (logged, and recorded in every checkpoint)") from None
        log.warning("gate override: starting the full run without a passing verdict: %s", exc)
        return {**record, "override": True, "reason": str(exc)}
    log.info("gate verdict %s passed for this configuration (%s)", path, mine.config)
    return {**record, "passed": True}
