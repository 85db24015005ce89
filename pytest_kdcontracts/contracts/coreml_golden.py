"""Golden vectors and prefill/decode/verify consistency for ``coreml_contract.json``.

- ``golden[<fn>-<L>]``: the backend's outputs against live PyTorch (same host API, same
  inputs), then both against the stored syrupy snapshot. Verify is fed S greedy tokens.
- ``prefill_decode[<L>]``: prefill, then N greedy decode steps through the backend, each
  step against PyTorch *without a cache* (a full forward over the sequence so far), so a
  cache bug on either side shows; the cache position advances by exactly one slot per step.
- ``verify_decode[<L>]``: one verify call over S greedy tokens gives, row by row, what S
  decode steps of the same package give (bit for bit on the MIL executor, within the golden
  tolerance on Core ML), writing exactly slots position..position+S-1; and
  after a draft rejected half-way (rollback to the middle of the segment, stale slots left
  behind) the next decode and verify still agree: what speculative decoding relies on.
"""

from __future__ import annotations

from functools import partial
from typing import Iterator

import numpy as np

from pytest_kdcontracts.check import Check, fail
from pytest_kdcontracts.contracts.coreml import require_function
from pytest_kdcontracts.golden import GoldenArrays, GoldenRecord, agreement, assert_snapshot, extension_for, identity_changes


def _verify_steps(segment: int | None) -> int:
    """Decode steps verify_decode takes as its reference: a segment, then half of one past a rollback."""
    return segment + segment // 2 + 1 if segment else 0


def _prompt(c, kd_tokenizers, length: int) -> list[int]:
    ids = kd_tokenizers["student"].encode(c.golden.prompt).ids
    return ids[: max(1, length - max(c.golden.decode_steps, _verify_steps(c.segment)) - 1)]


def _greedy(host, prompt: list[int], count: int) -> list[int]:
    """``count`` greedy tokens after ``prompt``: the prefill's, then each decode step's."""
    state, logits = host.prefill(prompt)
    tokens = [int(np.argmax(logits))]
    while len(tokens) < count:
        state, logits = host.decode_step(state, tokens[-1])
        tokens.append(int(np.argmax(logits)))
    return tokens


def _run(host, function: str, prompt: list[int], tokens: list[int], segment: int | None) -> np.ndarray:
    """Logits of ``function`` after prefilling ``prompt``: the prefill's [V]; decode fed
    ``tokens[0]`` [V]; verify fed all of ``tokens`` [S, V]."""
    state, logits = host.prefill(prompt)
    if function == "decode":
        state, logits = host.decode_step(state, tokens[0])
    elif function == "verify":
        state, logits, _ = host.verify(state, tokens, segment)
    return logits


def check_golden(c, function: str, length: int, kd_runtime, kd_coreml, kd_tokenizers, snapshot, kd_report) -> None:
    require_function(c.file.name, kd_coreml, function, length)
    runtime = kd_runtime.for_length(length, c.host_api_version, c.segment)
    prompt = _prompt(c, kd_tokenizers, length)
    tokens = _greedy(runtime.torch_host, prompt, c.segment if function == "verify" else 1)
    expected = _run(runtime.torch_host, function, prompt, tokens, c.segment)
    found = _run(runtime.host, function, prompt, tokens, c.segment)
    subject = f"{function}-{length} logits, {runtime.backend} vs PyTorch"
    agree = agreement(expected, found)
    if not agree.ok(c.golden.cosine_min):
        fail(c.file.name, subject, f"cosine >= {c.golden.cosine_min}, no NaN or Inf", str(agree))
    model, numerics = kd_runtime.identity
    record = GoldenRecord(
        {"input_prompt": np.asarray(prompt, dtype=np.int32), "input_token": np.asarray(tokens, dtype=np.int32),
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


def _written(session, before: np.ndarray, state) -> list[int]:
    """Cache slots whose keys changed since ``before``."""
    after = session.read_state(state.cache, "k_cache")
    return sorted(set(np.nonzero(np.any(before != after, axis=(0, 1, 3)))[0].tolist()))


def check_prefill_decode(c, length: int, kd_runtime, kd_tokenizers) -> None:
    import torch

    runtime = kd_runtime.for_length(length, c.host_api_version, c.segment)
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
        written = _written(runtime.session, before, new_state)
        if new_state.position != state.position + 1 or written != [state.position]:
            fail(c.file.name, f"KV cache after decode step {step + 1} at L={length}",
                 f"position {state.position} -> {state.position + 1}, slot {state.position} written",
                 f"position {new_state.position}, slots written {written}")
        sequence.append(token)
        state = new_state


# Backends whose verify must give decode's logits bit for bit: the MIL executor computes a few rows
# one at a time (kdtrain.runtime.kernels._by_row), which is what makes speculative decoding exact
# there with no tie allowance (speculative.yaml). Core ML's device programs are held to the golden
# tolerance; torch's verify is a program of its own and is not what this item reads.
BIT_EXACT = frozenset({"mil-reference"})


def _same_rows(c, length: int, backend: str, what: str, first: int, decoded: list[np.ndarray], found_rows: np.ndarray) -> None:
    """Rows of ``what`` against the decode steps ``first``.. of the same tokens: bit for bit on a
    :data:`BIT_EXACT` backend, else cosine and greedy token."""
    for j, (expected, found) in enumerate(zip(decoded, found_rows)):
        agree = agreement(expected, found)
        want, got = int(np.argmax(expected)), int(np.argmax(found))
        if backend in BIT_EXACT and not np.array_equal(expected, found):
            fail(c.file.name, f"{what} at L={length}, {backend}: row {j}",
                 f"the logits of decode step {first + j}, bit for bit (what makes speculative decoding exact on {backend})",
                 f"{agree}; {int(np.sum(expected != found))} of {expected.size} logits differ, greedy token {got} (decode's {want})")
        if not agree.ok(c.golden.cosine_min) or want != got:
            fail(c.file.name, f"{what} at L={length}, {backend}: row {j}",
                 f"the logits of decode step {first + j}: cosine >= {c.golden.cosine_min}, greedy token {want}",
                 f"{agree}; greedy token {got}")


def check_verify_decode(c, length: int, kd_runtime, kd_coreml, kd_tokenizers) -> None:
    require_function(c.file.name, kd_coreml, "verify", length)
    runtime = kd_runtime.for_length(length, c.host_api_version, c.segment)
    host, segment, half = runtime.host, c.segment, c.segment // 2
    prompt = _prompt(c, kd_tokenizers, length)
    state, logits = host.prefill(prompt)
    tokens, decoded = [], []  # the reference: greedy decode steps through the same package
    for _ in range(_verify_steps(segment)):
        tokens.append(int(np.argmax(logits)))
        state, logits = host.decode_step(state, tokens[-1])
        decoded.append(logits)

    start, _ = host.prefill(prompt)
    p = start.position
    before = runtime.session.read_state(start.cache, "k_cache")
    state, verified, _ = host.verify(start, tokens[:segment], segment)
    written = _written(runtime.session, before, state)
    if state.position != p + segment or written != list(range(p, p + segment)):
        fail(c.file.name, f"KV cache after verify of {segment} tokens at position {p}, L={length}",
             f"position {p} -> {p + segment}, slots {p}..{p + segment - 1} written",
             f"position {state.position}, slots written {written}")
    _same_rows(c, length, runtime.backend, f"verify of {segment} greedy tokens at position {p}", 0, decoded[:segment], verified)

    # A draft rejected half-way: its second half is wrong, the host keeps the first half.
    vocab = verified.shape[-1]
    draft = tokens[:half] + [(t + 1) % vocab for t in tokens[half:segment]]
    state, _ = host.prefill(prompt)
    state, verified, _ = host.verify(state, draft, segment)
    _same_rows(c, length, runtime.backend, f"verify of a draft wrong from token {half}", 0, decoded[:half], verified[:half])
    state = host.rollback(state, p + half)
    state, logits = host.decode_step(state, tokens[half])
    _same_rows(c, length, runtime.backend, f"decode after a rollback to position {p + half}", half, decoded[half:half + 1], logits[None])
    state, verified, _ = host.verify(state, tokens[half + 1:half + 1 + segment], segment)
    _same_rows(c, length, runtime.backend, f"verify after a rollback to position {p + half} and a decode step",
               half + 1, decoded[half + 1:], verified)


def checks(c) -> Iterator[Check]:
    fixtures = ("kd_runtime", "kd_tokenizers")
    for function, length in c.items():
        yield Check("golden", (function, str(length)), partial(check_golden, c, function, length),
                    fixtures + ("kd_coreml", "snapshot", "kd_report"), marks=("golden",))
    for length in c.lengths:
        yield Check("prefill_decode", (str(length),), partial(check_prefill_decode, c, length), fixtures, marks=("golden",))
        if c.segment is not None:
            yield Check("verify_decode", (str(length),), partial(check_verify_decode, c, length), fixtures + ("kd_coreml",), marks=("golden",))
