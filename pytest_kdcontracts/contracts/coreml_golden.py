"""Golden vectors and prefill/decode consistency for ``coreml_contract.json``.

- ``golden[<fn>-<L>]``: the backend's outputs against live PyTorch (same host API, same
  inputs), then both against the stored syrupy snapshot.
- ``prefill_decode[<L>]``: prefill, then N greedy decode steps through the backend, each
  step against PyTorch *without a cache* (a full forward over the sequence so far), so a
  cache bug on either side shows; the cache position advances by exactly one slot per step.
"""

from __future__ import annotations

from functools import partial
from typing import Iterator

import numpy as np

from pytest_kdcontracts.check import Check, fail
from pytest_kdcontracts.golden import GoldenArrays, GoldenRecord, agreement, assert_snapshot, extension_for, identity_changes


def _prompt(c, kd_tokenizers, length: int) -> list[int]:
    ids = kd_tokenizers["student"].encode(c.golden.prompt).ids
    return ids[: max(1, length - c.golden.decode_steps - 1)]


def _run(host, function: str, prompt: list[int], token: int | None = None) -> tuple[np.ndarray, int]:
    """Logits of ``function`` after prefilling ``prompt``; decode feeds ``token`` (default: the
    prefill's greedy token). Returns the logits and the token decode was fed."""
    state, logits = host.prefill(prompt)
    token = int(np.argmax(logits)) if token is None else token
    if function == "decode":
        state, logits = host.decode_step(state, token)
    return logits, token


def check_golden(c, function: str, length: int, kd_runtime, kd_tokenizers, snapshot, kd_report) -> None:
    runtime = kd_runtime.for_length(length, c.host_api_version)
    prompt = _prompt(c, kd_tokenizers, length)
    expected, token = _run(runtime.torch_host, function, prompt)
    found, _ = _run(runtime.host, function, prompt, token)
    subject = f"{function}-{length} logits, {runtime.backend} vs PyTorch"
    agree = agreement(expected, found)
    if not agree.ok(c.golden.cosine_min):
        fail(c.file.name, subject, f"cosine >= {c.golden.cosine_min}, no NaN or Inf", str(agree))
    model, numerics = kd_runtime.identity
    record = GoldenRecord(
        {"input_prompt": np.asarray(prompt, dtype=np.int32), "input_token": np.asarray([token], dtype=np.int32),
         "torch_logits": expected.astype(np.float32), "backend_logits": found.astype(np.float32)},
        {"model": model, "numerics": numerics, "function": function, "length": length, "host_api_version": c.host_api_version},
    )
    extension = extension_for(c.golden.dir, c.golden.cosine_min, snapshot.update_snapshots)
    result = assert_snapshot(snapshot, extension, record, c.file.name, f"golden snapshot of {function}-{length}",
                             f"{function}-{length} against its golden snapshot", f"agreement within cosine {c.golden.cosine_min}", "golden")
    if result.recalled_data is not None and not result.updated:
        changes = identity_changes(GoldenArrays.deserialize(result.recalled_data).meta, record.meta)
        if changes:
            kd_report(f"golden[{function}-{length}]: values agree with the snapshot made from other inputs ({'; '.join(changes)})")


def check_prefill_decode(c, length: int, kd_runtime, kd_tokenizers) -> None:
    import torch

    runtime = kd_runtime.for_length(length, c.host_api_version)
    prompt = _prompt(c, kd_tokenizers, length)
    sequence = list(prompt)
    state, logits = runtime.host.prefill(prompt)
    for step in range(c.golden.decode_steps + 1):
        with torch.no_grad():
            reference = runtime.student(torch.tensor([sequence]))[0, -1].numpy()
        agree = agreement(reference, logits)
        where = f"step {step} ({'prefill' if step == 0 else 'decode'}) at L={length}, {runtime.backend} vs PyTorch without a cache"
        if not agree.ok(c.golden.cosine_min):
            fail(c.file.name, where, f"cosine >= {c.golden.cosine_min}", str(agree))
        if int(np.argmax(logits)) != int(np.argmax(reference)):
            fail(c.file.name, where, f"greedy token {int(np.argmax(reference))}", f"greedy token {int(np.argmax(logits))}")
        if step == c.golden.decode_steps:
            return
        token = int(np.argmax(reference))
        before = runtime.session.read_state(state.cache, "k_cache")
        new_state, logits = runtime.host.decode_step(state, token)
        after = runtime.session.read_state(new_state.cache, "k_cache")
        written = sorted(set(np.nonzero(np.any(before != after, axis=(0, 1, 3)))[0].tolist()))
        if new_state.position != state.position + 1 or written != [state.position]:
            fail(c.file.name, f"KV cache after decode step {step + 1} at L={length}",
                 f"position {state.position} -> {state.position + 1}, slot {state.position} written",
                 f"position {new_state.position}, slots written {written}")
        sequence.append(token)
        state = new_state


def checks(c) -> Iterator[Check]:
    fixtures = ("kd_runtime", "kd_tokenizers")
    for function, length in c.items():
        yield Check("golden", (function, str(length)), partial(check_golden, c, function, length), fixtures + ("snapshot", "kd_report"), marks=("golden",))
    for length in c.lengths:
        yield Check("prefill_decode", (str(length),), partial(check_prefill_decode, c, length), fixtures, marks=("golden",))
