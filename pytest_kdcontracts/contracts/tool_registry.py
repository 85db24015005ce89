"""``tool_registry.json``: the corpus artifact was written for the target runtime's tool schema
(versions compatible), every tool call in it validates against the registry, and every
scenario kind is present with consistent code-mode eligibility.

The checks look at the samples a trainer would use: those not marked invalid by the
validation pass (marked ones are counted in ``data.validation_report`` instead).
"""

from __future__ import annotations

from collections import Counter
from functools import partial
from typing import Iterator

from kdcontracts.models.tool_registry import ToolRegistry
from kdtrain.artifact_table import DATA_CORPUS
from pytest_kdcontracts.check import Check, fail

UNREGISTERED = "unregistered"


def _usable_samples(r: ToolRegistry, kd_artifacts):
    """The corpus artifact's samples not marked invalid; an unreadable corpus fails the item."""
    from kdtrain.data.corpus import Corpus
    from kdtrain.errors import DataError

    path = kd_artifacts.path(DATA_CORPUS)
    try:
        corpus = Corpus.load(path)
    except DataError as exc:
        fail(r.file.name, f"the corpus artifact {DATA_CORPUS.name}", "a readable, unmodified corpus folder", f"\n    {exc}")
    return path, [s for s in corpus.samples if not s.meta.invalid]


def _listed(lines: list[str], limit: int = 12) -> str:
    more = f"\n    … {len(lines) - limit} more" if len(lines) > limit else ""
    return "\n    " + "\n    ".join(lines[:limit]) + more


def check_versions(r: ToolRegistry, kd_artifacts) -> None:
    from kdtrain.data.validate import incompatible_versions

    path, samples = _usable_samples(r, kd_artifacts)
    found = [f"{s.id}: {key} {version!r}" for s in samples for key, version, _ in incompatible_versions(s, r)]
    if found:
        fail(r.file.name, f"versions of the samples of {DATA_CORPUS.name} ({path})",
             f"compatible with tool_schema_version {r.tool_schema_version} and orchestrator_version {r.orchestrator_version} (same major, minor <= the registry's)",
             f"{len(found)} incompatible:" + _listed(found),
             "distillation refuses data whose version is incompatible with the target runtime's: migrate it (kdtrain migrate-data)")


def check_calls(r: ToolRegistry, tool: str | None, kd_artifacts) -> None:
    """Every call of ``tool`` (None: of any name the registry does not have) validates."""
    from kdtrain.data.validate import check_call, incompatible_versions, sample_calls

    path, samples = _usable_samples(r, kd_artifacts)
    calls, problems = 0, []
    for sample in samples:
        if incompatible_versions(sample, r):
            continue  # read against another schema: corpus_versions reports it
        for call in sample_calls(sample, r):
            if (call.tool if call.tool in r.names else None) == tool:
                calls += 1
                problems += [f"{sample.id}: {f.cause}: {f.detail}" for f in check_call(call, r)]
    if problems:
        subject = f"calls of {tool}" if tool else "calls of tools the registry does not have"
        expected = f"arguments valid against the parameters of {tool}" if tool else f"only the registry's tools {list(r.names)}"
        fail(r.file.name, f"{subject} in {DATA_CORPUS.name} ({path})", expected, f"{len(problems)} invalid of {calls} call(s):" + _listed(problems))


def check_scenarios(r: ToolRegistry, kd_artifacts) -> None:
    from kdtrain.data.corpus import CODE_MODE_SCENARIOS, SCENARIOS

    path, samples = _usable_samples(r, kd_artifacts)
    counts = Counter(s.meta.scenario for s in samples)
    problems = [f"no sample of scenario {name!r}" for name in SCENARIOS if not counts[name]]
    problems += [f"{s.id}: scenario {s.meta.scenario!r} with eligible.code_mode {s.meta.eligible.code_mode} (expected {s.meta.scenario in CODE_MODE_SCENARIOS})"
                 for s in samples if s.meta.eligible.code_mode != (s.meta.scenario in CODE_MODE_SCENARIOS)]
    if problems:
        fail(r.file.name, f"scenarios of {DATA_CORPUS.name} ({path})",
             f"every scenario {list(SCENARIOS)} present, code_mode eligible exactly for {sorted(CODE_MODE_SCENARIOS)}",
             _listed(problems).lstrip(), f"present: {dict(sorted(counts.items()))}")


def checks(r: ToolRegistry) -> Iterator[Check]:
    yield Check("corpus_versions", (), partial(check_versions, r), ("kd_artifacts",), doc="every sample's versions are compatible with the registry's")
    for tool in r.names:
        yield Check("corpus_calls", (tool,), partial(check_calls, r, tool), ("kd_artifacts",), doc=f"every call of {tool} in the corpus validates")
    yield Check("corpus_calls", (UNREGISTERED,), partial(check_calls, r, None), ("kd_artifacts",), doc="the corpus calls no tool the registry lacks")
    yield Check("scenario_coverage", (), partial(check_scenarios, r), ("kd_artifacts",), doc="every scenario present, eligibility consistent")
