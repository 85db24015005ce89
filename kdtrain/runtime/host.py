"""The host API (version ``HOST_API_VERSION``) over any session: what an app does on device.

``prefill(prompt) -> (state, logits)`` right-pads the prompt to the length L and runs the
prefill function; ``decode_step(state, token) -> (state, logits)`` writes cache slot
``state.position`` and advances it by exactly one. Logits come back as float32 [V].
``verify(state, tokens, segment)`` (1.1) feeds up to S tokens in one call, ``rollback`` keeps
a prefix of the cache: speculative decoding's worker.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kdtrain.errors import ArtifactError, KDError
from kdtrain.export.programs import HOST_API_VERSION


@dataclass(frozen=True)
class HostState:
    position: int  # next cache slot to write = tokens in the context so far
    cache: object  # the backend's state (MLState, executor State, torch buffers)


class ContextFull(KDError):
    """The context reached the enumerated length L."""


class Host:
    def __init__(self, session, length: int, pad_id: int):
        self.session, self.length, self.pad_id = session, length, pad_id

    def prefill(self, prompt: list[int]) -> tuple[HostState, np.ndarray]:
        state, out = self.run_prefill(prompt)
        return state, out["logits"]

    def decode_step(self, state: HostState, token: int) -> tuple[HostState, np.ndarray]:
        state, out = self.run_decode(state, token)
        return state, out["logits"]

    def run_prefill(self, prompt: list[int]) -> tuple[HostState, dict[str, np.ndarray]]:
        """Like :meth:`prefill`, with every output of the last real position: ``logits`` [V] and ``halt`` (a float)."""
        if not 0 < len(prompt) <= self.length:
            raise ContextFull(f"prefill: expected 1..{self.length} prompt tokens, found {len(prompt)}")
        ids = np.full((1, self.length), self.pad_id, dtype=np.int32)
        ids[0, : len(prompt)] = prompt
        mask = np.zeros((1, self.length), dtype=np.int32)
        mask[0, : len(prompt)] = 1
        cache = self.session.new_state()
        out = self.session.predict("prefill", {"input_ids": ids, "attention_mask": mask}, cache)
        return HostState(len(prompt), cache), _outputs(out)

    def run_decode(self, state: HostState, token: int) -> tuple[HostState, dict[str, np.ndarray]]:
        if state.position >= self.length:
            raise ContextFull(f"decode_step: the context is full ({self.length} tokens)")
        inputs = {"input_ids": np.array([[token]], dtype=np.int32), "position": np.array([state.position], dtype=np.int32)}
        out = self.session.predict("decode", inputs, state.cache)
        return HostState(state.position + 1, state.cache), _outputs(out)

    def verify(self, state: HostState, tokens: list[int], segment: int) -> tuple[HostState, np.ndarray, np.ndarray]:
        """Feed ``tokens`` (1..``segment``) at ``state.position`` in one call of the package's verify
        function (``segment``: its declared length; a shorter list is padded, the padding's
        outputs dropped). Returns the state advanced past them, logits [len(tokens), V] (row j
        predicts the token after ``tokens[j]``) and halt [len(tokens)]. To keep fewer of them,
        :meth:`rollback`."""
        if not 0 < len(tokens) <= segment:
            raise ValueError(f"verify: expected 1..{segment} tokens, found {len(tokens)}")
        if state.position + len(tokens) > self.length:
            raise ContextFull(f"verify: {len(tokens)} tokens at position {state.position} pass the context ({self.length} tokens)")
        ids = np.full((1, segment), self.pad_id, dtype=np.int32)
        ids[0, : len(tokens)] = tokens
        out = self.session.predict("verify", {"input_ids": ids, "position": np.array([state.position], dtype=np.int32)}, state.cache)
        n = len(tokens)
        logits = np.asarray(out["logits"])[0, :n].astype(np.float32)
        halt = np.asarray(out["halt"]).reshape(-1)[:n].astype(np.float32)
        return HostState(state.position + n, state.cache), logits, halt

    @staticmethod
    def rollback(state: HostState, position: int) -> HostState:
        """Keep the first ``position`` tokens of the cache: every function attends only to slots
        up to its own token's, so later slots are dead and are overwritten when next written."""
        if not 0 <= position <= state.position:
            raise ValueError(f"rollback: expected a position in 0..{state.position}, found {position}")
        return HostState(position, state.cache)


def _outputs(out: dict) -> dict:
    found = {"logits": np.asarray(out["logits"])[0].astype(np.float32)}
    if "halt" in out:
        found["halt"] = float(np.asarray(out["halt"]).reshape(-1)[0])
    return found


def check_host_api(artifacts, expected: str = HOST_API_VERSION) -> str:
    """The host API version the artifacts were converted for; a mismatch fails loudly."""
    stages = artifacts.manifest.stages
    name = "convert" if "convert" in stages else "add"  # kdtrain convert's packages, or ones registered by kdtrain add
    stage = stages.get(name)
    found = stage.settings.get("host_api_version") if stage else None
    if found != expected:
        how = ("re-run `kdtrain convert`" if name == "convert" else
               "the packages were registered with `kdtrain add` without --host-api: a package this code cannot drive "
               "(functions prefill and decode sharing the KV-cache states, and verify from 1.1) has no golden, "
               f"prefill/decode or verify/decode check; declare `--host-api {expected}` only if it speaks that API")
        raise ArtifactError(
            f"{artifacts.root / 'manifest.json'}: at stages.{name}.settings.host_api_version: expected {expected!r} "
            f"(the host API this code and the contract speak), found {found!r}; {how}"
        )
    return found
