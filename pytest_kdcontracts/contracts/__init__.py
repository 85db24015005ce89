"""The checks of each contract family, one module per family of :data:`kdcontracts.families.FAMILIES`.

``contracts/<file>`` declares, ``kdcontracts/models/<family>.py`` types it,
``pytest_kdcontracts/contracts/<family>.py`` verifies it, and ``kdtrain/<stage>/`` produces
the artifact: a reader who knows one family knows where the next lives.
"""

from __future__ import annotations

import importlib
from typing import Any, Iterator

from kdcontracts.families import Family

MARKERS = {
    "kdcontract": "an item generated from a kdcontracts contract file",
    "tokens": "tokenizer contracts (tokens.json)",
    "export": "exported-graph lint (export_lint.yaml)",
    "coreml": "converted mlpackages: IO, islands, ANE residency (coreml_contract.json, precision_islands.yaml)",
    "golden": "golden vectors and prefill/decode consistency through the execution backend",
    "quant": "INT8 packages: recipe conformance, A/B against FP16, finite outputs (quant_recipe.yaml)",
    "data": "distillation data and teacher targets: tool registry, corpus versions and calls, corruption rate, logit cache (tool_registry.json, distill_data.yaml)",
    "ablations": "the trainer's canonical mini experiments against their stored baselines (ablations.yaml)",
    "runtime": "on-device runtime: memory budget per size and context, the runtime config, the session pool (runtime_budget.yaml)",
    "gates": "checkpoint gates before a full run: halt calibration, curriculum telemetry, scenario evals, the verdict (gates.yaml)",
    "judge": "the judge against objective signals: consistency in both orders, agreement, rank correlation, length and position bias (judge.yaml)",
    "speculative": "speculative decoding: drafter/worker pairs exact against greedy, acceptance, segment lengths (speculative.yaml)",
}


def checks(family: Family, contract: Any) -> Iterator:
    """The checks of a loaded contract: ``pytest_kdcontracts.contracts.<family.name>.checks``."""
    return importlib.import_module(f"{__name__}.{family.name}").checks(contract)
