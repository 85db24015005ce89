"""Pipeline stage ``data``: the reference corpus, generated, validated against the tool registry.

``data/raw/`` is the corpus as generated (with any planted noise), ``data/corpus/`` what
validation kept (or marked), ``data/validation_report.json`` what it found: later stages
(the teacher, training) read ``data.corpus`` only, through the manifest.
"""

from __future__ import annotations

from kdcontracts.models.distill_data import CorpusSettings
from kdtrain import atomic
from kdtrain.artifact_table import DATA_CORPUS, DATA_HALT_SET, DATA_RAW, DATA_SCENARIOS, DATA_VALIDATION_REPORT
from kdtrain.data.corpus import build_reference_corpus
from kdtrain.data.noise import plant_noise
from kdtrain.data.validate import validate_corpus
from kdtrain.stage import StageContext


def stage_data(ctx: StageContext, settings: CorpusSettings | None = None) -> None:
    """``settings`` default to the ``corpus`` section of ``distill_data.yaml``."""
    settings = settings or ctx.contract("distill_data.yaml").corpus
    folder = ctx.folder
    registry = ctx.contract("tool_registry.json")
    raw = build_reference_corpus(registry, settings.samples_per_scenario, settings.seed)
    if settings.noise:
        raw = plant_noise(raw, registry, settings.noise, settings.seed)
    raw.save(folder.root / DATA_RAW.path)
    corpus, report = validate_corpus(raw, registry, settings.on_invalid)
    corpus.save(folder.root / DATA_CORPUS.path)
    atomic.write_json(folder.root / DATA_VALIDATION_REPORT.path, report.to_json())
    for artifact in (DATA_RAW, DATA_CORPUS, DATA_VALIDATION_REPORT):
        folder.record(artifact)
    heldout = _held_out(ctx, registry, corpus)
    folder.record_stage("data", {"samples_per_scenario": settings.samples_per_scenario, "seed": settings.seed, "noise": settings.noise,
                                 "on_invalid": settings.on_invalid, "tool_schema_version": registry.tool_schema_version,
                                 "orchestrator_version": registry.orchestrator_version, "samples": report.total,
                                 "invalid": report.invalid, "corruption_rate": round(report.corruption_rate, 6), **heldout})


def _held_out(ctx: StageContext, registry, corpus) -> dict:
    """The gates' data (gates.yaml), disjoint from ``corpus`` by hash: the halt calibration set and the scenario cases."""
    from kdtrain.data.halt_set import build_halt_set
    from kdtrain.data.scenario_cases import build_scenario_cases

    if not (ctx.contracts / "gates.yaml").exists():
        return {}
    gates, folder = ctx.contract("gates.yaml"), ctx.folder
    calibration, scenarios = gates.halt.calibration_set, gates.scenarios
    halt_set = build_halt_set(registry, corpus, calibration.bases_per_scenario, calibration.seed)
    halt_set.save(folder.root / DATA_HALT_SET.path)
    cases = build_scenario_cases(registry, corpus, scenarios.cases_per_scenario, scenarios.seed)
    cases.save(folder.root / DATA_SCENARIOS.path)
    for artifact in (DATA_HALT_SET, DATA_SCENARIOS):
        folder.record(artifact)
    return {"halt_set": len(halt_set.examples), "scenario_cases": len(cases.cases)}
