"""``ablations.yaml``: the three canonical mini experiments ran with the contract's protocol,
and each one's metrics and sample outputs agree with its stored baseline.

- ``protocol``: the results artifact holds every experiment, run with this protocol;
- ``baseline[<experiment>]``: metrics within tolerance and greedy outputs mostly the same
  as the snapshot in ``golden/ablations/`` (write it with ``--snapshot-update``).
"""

from __future__ import annotations

import json
from functools import partial
from typing import Iterator

from kdcontracts.models.ablations import AblationsContract
from kdtrain.artifact_table import ABLATIONS_RESULTS
from kdtrain.train.ablations import EXPERIMENTS
from pytest_kdcontracts.check import Check, fail
from pytest_kdcontracts.golden import assert_snapshot, baseline_extension_for


def _results(kd_artifacts) -> dict:
    return json.loads(kd_artifacts.path(ABLATIONS_RESULTS).read_text(encoding="utf-8"))


def check_protocol(c: AblationsContract, kd_artifacts) -> None:
    results = _results(kd_artifacts)
    if results["protocol"] != c.protocol.__dict__ or sorted(results["experiments"]) != sorted(EXPERIMENTS):
        fail(c.file.name, f"ablation results ({kd_artifacts.path(ABLATIONS_RESULTS)})",
             f"experiments {sorted(EXPERIMENTS)} run with protocol {c.protocol.__dict__}",
             f"experiments {sorted(results['experiments'])} run with protocol {results['protocol']}",
             "re-run: kdtrain pipeline --stages ablations")


def check_baseline(c: AblationsContract, experiment: str, kd_artifacts, snapshot) -> None:
    results = _results(kd_artifacts)
    found = results["experiments"].get(experiment)
    if found is None:
        fail(c.file.name, f"ablation {experiment}", "its results in the artifacts", "none")
    record = {"protocol": results["protocol"], "terms": found["terms"], "metrics": found["metrics"], "samples": found["samples"]}
    assert_snapshot(snapshot, baseline_extension_for(c.dir, c.tolerance), record, c.file.name,
                    f"baseline of ablation {experiment}", f"ablation {experiment} against its baseline",
                    f"metrics within ±max({c.tolerance.metric_abs}, {c.tolerance.metric_rel:.0%}), sample outputs "
                    f">= {c.tolerance.sample_agreement:.0%} the same", "ablations")


def checks(c: AblationsContract) -> Iterator[Check]:
    yield Check("protocol", (), partial(check_protocol, c), ("kd_artifacts",),
                doc="every canonical experiment ran with the contract's protocol")
    for experiment in EXPERIMENTS:
        yield Check("baseline", (experiment,), partial(check_baseline, c, experiment), ("kd_artifacts", "snapshot"))
