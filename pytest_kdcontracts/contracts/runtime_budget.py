"""``runtime_budget.yaml``: the memory budget holds on the real packages, the runtime config
says what the contract does, and the session pool evicts and rebuilds exactly.

- ``weights[<precision>-<L>]``: the computed weight bytes of the reference size against the
  package's weight constants (its MIL program), within ``weight_tolerance``;
- ``kv_state[<L>]``: the computed KV bytes per session against the states the runtime allocates;
- ``runtime_config``: ``runtime/runtime_config.json`` is the table recomputed from this
  contract, the quant recipe and the exported student (a stale or edited one fails);
- ``table``: every size fits at least one session at every context on the device (the table
  is printed in the summary);
- ``pool[<L>]``: conversations under a budget of fewer sessions than they need, on the INT8
  package: sessions are evicted and rebuilt, and every logit equals an unevicted run's.
"""

from __future__ import annotations

import json
from functools import partial
from typing import Iterator

from kdcontracts.models.runtime_budget import GIB, RuntimeBudgetContract
from kdtrain.artifact_table import QUANT_CALIBRATION, RUNTIME_CONFIG
from pytest_kdcontracts.check import Check, fail

PRECISIONS = ("fp16", "int8")


def _recipe(c: RuntimeBudgetContract):
    from kdcontracts.families import load_sibling

    return load_sibling(c.file, "quant_recipe.yaml").recipe


def _reference(c: RuntimeBudgetContract, kd_artifacts):
    from kdtrain.runtime.budget import reference_shape, size_budget

    size = next((s for s in c.sizes if s.from_artifacts), None)
    return size_budget(c, size.name if size else "student", "artifacts", reference_shape(kd_artifacts), _recipe(c))


def check_weights(c: RuntimeBudgetContract, precision: str, length: int, kd_artifacts, kd_coreml) -> None:
    from kdtrain.quant.ab import weight_bytes

    reference = _reference(c, kd_artifacts)
    computed = reference.weights_int8 if precision == "int8" else reference.weights_fp16
    found = weight_bytes(kd_coreml.mil(length, precision))
    if abs(found - computed) > c.weight_tolerance * computed:
        fail(c.file.name, f"weight bytes of {kd_coreml.package(length, precision)}",
             f"{computed:,} (computed from the exported student's shape and quant_recipe.yaml) within {c.weight_tolerance:.1%}",
             f"{found:,} ({found / computed - 1:+.2%})",
             "the budget table sizes every student with this arithmetic: a package it does not predict makes every row wrong")


def check_kv_state(c: RuntimeBudgetContract, length: int, kd_artifacts, kd_coreml) -> None:
    session = kd_coreml.session(length, "int8")
    found = session.state_bytes(session.new_state())
    expected = _reference(c, kd_artifacts).kv_bytes_per_token * length
    if found != expected:
        fail(c.file.name, f"KV-cache state bytes of one session at L={length} [{session.backend}]",
             f"{expected:,} (2 x layers x KV heads x head dim x {c.kv_bytes} bytes x {length})", f"{found:,}")


def _expected_config(c: RuntimeBudgetContract, kd_artifacts) -> dict:
    from kdtrain.runtime.budget import budget_table, reference_shape, runtime_config

    return json.loads(json.dumps(runtime_config(c, budget_table(c, _recipe(c), reference_shape(kd_artifacts)))))


def _differences(expected, found, path: str = "") -> list[str]:
    if isinstance(expected, dict) and isinstance(found, dict):
        return [d for key in sorted(set(expected) | set(found))
                for d in _differences(expected.get(key), found.get(key), f"{path}.{key}" if path else key)]
    if isinstance(expected, list) and isinstance(found, list) and len(expected) == len(found):
        return [d for i, (e, f) in enumerate(zip(expected, found)) for d in _differences(e, f, f"{path}[{i}]")]
    return [] if expected == found else [f"{path}: expected {expected!r}, found {found!r}"]


def check_runtime_config(c: RuntimeBudgetContract, kd_artifacts) -> None:
    path = kd_artifacts.path(RUNTIME_CONFIG)
    differences = _differences(_expected_config(c, kd_artifacts), json.loads(path.read_text(encoding="utf-8")))
    if differences:
        fail(c.file.name, f"runtime config {path}", "the table this contract, quant_recipe.yaml and the exported student give",
             f"{len(differences)} difference(s):\n    " + "\n    ".join(differences[:10]),
             "re-run: kdtrain pipeline --stages runtime")


def check_table(c: RuntimeBudgetContract, kd_artifacts, kd_report) -> None:
    from kdtrain.runtime.budget import table_lines

    config = _expected_config(c, kd_artifacts)
    kd_report("\n".join(table_lines(config)))  # one note: the summary sorts notes, and the table keeps its order
    short = [f"{s['name']} at L={x['length']} (INT8 weights {s['weights_int8'] / GIB:.2f} GiB + workspace "
             f"{x['workspace_bytes'] / GIB:.2f} GiB + one session {x['kv_bytes_per_session'] / GIB:.2f} GiB)"
             for s in config["sizes"] for x in s["contexts"] if x["max_sessions"] < 1]
    if short:
        fail(c.file.name, f"sessions that fit on {c.device.name}", f"at least one per size and context, in "
             f"{c.device.available_bytes / GIB:.1f} GiB after the reserve", "none for " + "; ".join(short))


def check_pool(c: RuntimeBudgetContract, length: int, kd_artifacts, kd_coreml, kd_tokenizers, kd_report) -> None:
    from kdtrain.runtime.host import Host
    from kdtrain.runtime.pool import pool_demo

    samples = json.loads(kd_artifacts.path(QUANT_CALIBRATION).read_text(encoding="utf-8"))["samples"]
    room = length - c.pool.steps - 1
    prompts = [samples[i % len(samples)]["ids"][: max(1, room // (2 + i))] for i in range(c.pool.sessions)]  # distinct lengths
    session = kd_coreml.session(length, "int8")
    host = Host(getattr(session, "session", session), length, kd_tokenizers["student"].transformers.pad_token_id)  # not PrefillOnce: rebuilds run for real
    priorities = [1] + [0] * (len(prompts) - 1)  # the first conversation is pinned: it stays resident, the others take turns
    demo = pool_demo(host, prompts, c.pool.steps, c.pool.resident, priorities)
    kd_report("\n".join(f"pool L={length} [{session.backend}]: {line}" for line in demo.lines()))
    if not demo.exact:
        fail(c.file.name, f"session pool at L={length} [{session.backend}]", "rebuilt sessions give exactly the logits of an unevicted run",
             f"max |difference| {demo.max_abs_diff:g}")
    if demo.stats.evictions < 1 or demo.stats.reprefills < 1:
        fail(c.file.name, f"session pool at L={length}", f"evictions and rebuilds with {c.pool.sessions} sessions in a budget of {c.pool.resident}",
             f"{demo.stats.evictions} eviction(s), {demo.stats.reprefills} rebuild(s)")


def checks(c: RuntimeBudgetContract) -> Iterator[Check]:
    for length in c.contexts:
        for precision in PRECISIONS:
            yield Check("weights", (precision, str(length)), partial(check_weights, c, precision, length), ("kd_artifacts", "kd_coreml"))
        yield Check("kv_state", (str(length),), partial(check_kv_state, c, length), ("kd_artifacts", "kd_coreml"))
    yield Check("runtime_config", (), partial(check_runtime_config, c), ("kd_artifacts",))
    yield Check("table", (), partial(check_table, c), ("kd_artifacts", "kd_report"))
    length = min(c.contexts)
    yield Check("pool", (str(length),), partial(check_pool, c, length), ("kd_artifacts", "kd_coreml", "kd_tokenizers", "kd_report"))
