"""Sharded checkpoints for FSDP2 runs: every rank writes its own shard, nothing is pickled.

The folder keeps the guarantees of :mod:`kdtrain.train.checkpoint` (same ``step-NNNNNN``
name, same ``meta.json`` with the SHA-256 of every file and of itself, same pruning)::

    shards/shard-0000R-model-00001-of-00001.safetensors   rank R-1's shard of every tensor:
                                                            the model under "model.<fqn>", AdamW's
                                                            moments under "optimizer.state.<fqn>.*"
    model.json         the model's aliases: tied weights (lm_head = embed_tokens), stored once
    optimizer.json     the optimizer state without its tensors (param groups, by parameter FQN)
    rng.safetensors    rank 0's RNG states, as in the full layout
    meta.json          "layout": "sharded" and the world size that wrote it

The shards are written with ``torch.distributed.checkpoint`` through its safetensors storage
(``HuggingFaceStorageWriter``): each file's header holds the offsets of its shard, so reading
needs no pickled ``.metadata`` (the default ``FileSystemWriter`` pickles one) and loading
reshards to any world size, one process without a process group included. Every rank writes
into the same hidden ``.step-NNNNNN.sharded.tmp`` folder; rank 0 then hashes and fsyncs
everything and renames it into place (:func:`kdtrain.atomic.publish`), so a kill -9 at any
point leaves the previous checkpoints as they were.

State dicts come from ``torch.distributed.checkpoint.state_dict`` (parameter FQNs as keys,
DTensor shards under FSDP2, plain tensors in one process), so a checkpoint written by two
ranks loads in one and the other way round, bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

SHARDS = "shards"
MODEL = "model.json"  # {"aliases": {alias: name}}: tied weights, stored once


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


@contextlib.contextmanager
def _one_process_is_meant() -> Iterator[None]:
    """Without a process group DCP warns that it assumes one process: here that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def states(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model's and the optimizer's state dicts keyed by parameter FQN (this rank's shards under FSDP2).

    The optimizer's state is created (zeros, AdamW's ``step`` 0) when it has none yet, so that
    a fresh optimizer has the tensors a checkpoint is loaded into."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(model, optimizer)


def flat_tensors(model_state: dict[str, Any], optimizer_state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], Any, dict[str, str]]:
    """One flat ``name -> tensor`` dict for DCP; the optimizer state as JSON with its tensors named;
    the model's aliases (``alias -> name``: tied weights, which safetensors stores once)."""
    from kdtrain.train.checkpoint import _encode

    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[int, str] = {}
    for key, value in model_state.items():
        local = value.to_local() if hasattr(value, "to_local") else value
        ident = local.untyped_storage().data_ptr() if local.numel() else id(value)
        if ident in seen:
            aliases[key] = seen[ident]
        else:
            seen[ident] = key
            tensors[f"model.{key}"] = value
    optimizer_json = _encode(optimizer_state, "optimizer", tensors)
    return tensors, optimizer_json, aliases


def model_state(tensors: dict[str, torch.Tensor], aliases: dict[str, str]) -> dict[str, torch.Tensor]:
    """The model's entries of a flat dict, aliases filled in."""
    state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    return {**state, **{alias: state[name] for alias, name in aliases.items()}}


def write(tmp: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Every rank: its shard of ``tensors`` into ``tmp/shards`` (fsynced by DCP's writer)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    with _one_process_is_meant():
        dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(tmp / SHARDS), save_distributed=True))


def read(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Every rank: fill ``tensors`` (this rank's shards, or whole tensors in one process) from ``folder/shards``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    with _one_process_is_meant():
        dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(folder / SHARDS)))


def building(final: Path) -> Path:
    """The hidden folder every rank writes ``final`` into; rank 0 clears a killed write's leftover first."""
    tmp = final.with_name(f".{final.name}.sharded.tmp")
    if main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    return tmp


def restore(folder: Path, optimizer_json: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a sharded checkpoint into ``model`` and ``optimizer`` at this run's world size (every rank)."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from kdtrain.train.checkpoint import _decode

    tensors, _, aliases = flat_tensors(*states(model, optimizer))
    read(folder, tensors)
    set_state_dict(model, optimizer, model_state_dict=model_state(tensors, read_aliases(folder)),
                   optim_state_dict=_decode(optimizer_json, tensors))


def read_aliases(folder: Path) -> dict[str, str]:
    return json.loads((folder / MODEL).read_text(encoding="utf-8"))["aliases"]


def full_model_state(folder: Path | str) -> dict[str, torch.Tensor]:
    """The whole model state dict of a sharded checkpoint, in this one process (export, tests).

    Shapes and dtypes come from the shards' safetensors headers; the caller should have
    verified the folder (:func:`kdtrain.train.checkpoint.load_latest`)."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    folder = Path(folder)
    found = HuggingFaceStorageReader(str(folder / SHARDS)).read_metadata().state_dict_metadata
    tensors = {key: torch.empty(meta.size, dtype=meta.properties.dtype)
               for key, meta in found.items() if key.startswith("model.")}
    read(folder, tensors)
    return model_state(tensors, read_aliases(folder))
