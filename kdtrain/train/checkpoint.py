"""Atomic, self-verifying checkpoints and strict resume; nothing is ever pickled.

A checkpoint is one folder, ``<run>/<checkpoint.dir>/step-000040/``::

    model.safetensors      the student's state dict (tied weights stored once, as aliases)
    optimizer.safetensors  the optimizer state's tensors, under flattened keys ("optimizer.state.0.exp_avg")
    optimizer.json         the rest of the optimizer state, tensors replaced by their keys
    rng.safetensors        torch's CPU RNG state, and each CUDA device's when there is one
    meta.json              step, config snapshot and fingerprint, data position, Python and
                           numpy RNG states, scheduler state, budgets spent, recent losses,
                           the SHA-256 of every other file, and the SHA-256 of itself

It is built in a hidden sibling folder, every file fsynced, renamed into place and the
parent fsynced (:func:`kdtrain.atomic.directory`): a crash leaves the old set of folders or
the new one. :func:`load_latest` takes the newest folder that verifies; a torn or tampered one
is skipped with a warning that names it and says why, and is never loaded.

JSON cannot hold everything a ``state_dict`` holds; the encoding keeps what it needs exactly:
tuples as ``{"__tuple__": [...]}``, dicts with non-string keys (the optimizer's parameter
indices) as ``{"__dict__": [[key, value], ...]}``, non-finite floats as ``{"__float__": "nan"}``
and tensors as ``{"__tensor__": key}``. Anything else is refused rather than pickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdtrain import atomic
from kdtrain.train import shards
from kdtrain.artifacts import sha256_path
from kdtrain.errors import ArtifactError, ConfigError, located
from kdtrain.train.config import Budgets, Change, DistillConfig, allowed, diff, fingerprint_of

log = logging.getLogger("kdtrain.train")

FORMAT = 2  # 2: budgets without the API teacher's spending (now the teacher stage's)
META = "meta.json"
_STEP = re.compile(r"^step-(\d{6,})$")


@dataclass(frozen=True)
class DataPosition:
    """Where the data loader resumes: ``position`` batches of ``data.batch_size`` taken on each
    of ``world`` ranks in ``epoch`` (``shard``: the rank that recorded it).

    Step ``s`` of an epoch takes samples ``[s * B * w, (s + 1) * B * w)`` of the epoch's order,
    rank ``r`` every ``w``-th of them from ``r``; so ``position * B * world`` samples are done,
    whatever the world size that resumes (:class:`kdtrain.train.data.Batches`)."""

    epoch: int = 0
    shard: int = 0
    position: int = 0
    world: int = 1  # absent from checkpoints before FSDP: single-process runs

    def samples(self, batch_size: int) -> int:
        """Samples of the epoch already taken, over all ranks."""
        return self.position * batch_size * self.world


@dataclass
class Spent:
    """What the whole run has spent so far, resumes included: limits apply to these totals."""

    gpu_hours: float = 0.0
    tokens: int = 0  # training tokens seen by the student (an API teacher's spending is the teacher stage's)

    def exhausted(self, limits: Budgets) -> list[str]:
        """One line per training limit reached (empty while the run may go on)."""
        used = {"gpu_hours": self.gpu_hours, "tokens": self.tokens}
        return [f"budgets.{name}: spent {used[name]} of {getattr(limits, name)}"
                for name in used if getattr(limits, name) is not None and used[name] >= getattr(limits, name)]


@dataclass
class RngStates:
    python: list  # random.getstate() as JSON: [version, internal state, gauss_next]
    numpy: dict  # np.random.get_state(legacy=False) with the key as a list
    torch: torch.Tensor  # torch.get_rng_state()
    cuda: list[torch.Tensor] = field(default_factory=list)  # one per CUDA device


@dataclass
class TrainState:
    step: int  # optimizer steps taken
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]  # torch optimizer state_dict()
    scheduler: dict[str, Any]  # torch LR scheduler state_dict(), JSON-able
    rng: RngStates
    data: DataPosition
    budgets: Spent
    config: dict[str, Any]  # DistillConfig.canonical() of the run that saved it
    fingerprint: str
    history: list[dict[str, Any]] = field(default_factory=list)  # recent steps' losses
    gate: dict[str, Any] | None = None  # a full run's unlock: the verdict it started on, or its logged override
    folder: Path | None = None  # where it was loaded from
    # The sharded layout (kdtrain.train.shards; FSDP2 runs): captured, model and optimizer are
    # FQN-keyed state dicts of this rank's shards; loaded, model is empty and optimizer is
    # optimizer.json as read, its tensors still in the shards until ``restore``.
    sharded: bool = False
    world: int = 1  # the ranks that wrote it

    @classmethod
    def capture(cls, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, config: DistillConfig,
                data: DataPosition = DataPosition(), budgets: Spent | None = None, history: list | tuple = (),
                gate: dict | None = None, sharded: bool = False, world: int = 1) -> "TrainState":
        """The state of a run after ``step`` steps, RNGs included (references, not copies: save it now).

        ``sharded``: every rank captures (and then saves) its own shards."""
        model_state, optimizer_state = shards.states(model, optimizer) if sharded else (model.state_dict(), optimizer.state_dict())
        return cls(step, model_state, optimizer_state, scheduler.state_dict(), capture_rng(), data,
                   budgets or Spent(), config.canonical(), config.fingerprint(), list(history), gate, sharded=sharded, world=world)

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler) -> None:
        """Put model, optimizer, scheduler and every RNG back where the saved run was (sharded: on every rank)."""
        if self.sharded:
            shards.restore(self.folder, self.optimizer, model, optimizer)
        else:
            model.load_state_dict(self.model)
            optimizer.load_state_dict(self.optimizer)
        scheduler.load_state_dict(self.scheduler)
        restore_rng(self.rng)


# --- RNG -----------------------------------------------------------------------------------

def capture_rng() -> RngStates:
    version, internal, gauss_next = random.getstate()
    state = np.random.get_state(legacy=False)
    numpy = dict(state, state={"key": state["state"]["key"].tolist(), "pos": int(state["state"]["pos"])})
    cuda = list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else []
    return RngStates([version, list(internal), gauss_next], numpy, torch.get_rng_state(), cuda)


def restore_rng(states: RngStates) -> None:
    version, internal, gauss_next = states.python
    random.setstate((version, tuple(internal), gauss_next))
    key = np.asarray(states.numpy["state"]["key"], dtype=np.uint32)
    np.random.set_state(dict(states.numpy, state=dict(states.numpy["state"], key=key)))
    torch.set_rng_state(states.torch)
    devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if len(states.cuda) != devices:
        # Other hardware: the run goes on, but GPU randomness (dropout) will not replay bit for bit.
        log.warning("restoring RNG states: saved for %d CUDA device(s), found %d", len(states.cuda), devices)
    for index, state in enumerate(states.cuda[:devices]):
        torch.cuda.set_rng_state(state, index)


# --- JSON and safetensors encoding ---------------------------------------------------------

def _encode(value: Any, path: str, tensors: dict[str, torch.Tensor] | None) -> Any:
    """JSON for ``value``; its tensors go into ``tensors`` (or are refused when that is None)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, torch.Tensor) and tensors is not None:
        tensors[path] = value
        return {"__tensor__": path}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, dict) and all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in value):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, f"{path}.{k}", tensors) for k, v in value.items()}
        return {"__dict__": [[k, _encode(v, f"{path}.{k}", tensors)] for k, v in value.items()]}
    raise TypeError(f"{path}: expected JSON data{' or tensors' if tensors is not None else ''}, "
                    f"found {type(value).__name__} (checkpoints never pickle)")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if value.keys() == {"__tensor__"}:
        return tensors[value["__tensor__"]]
    if value.keys() == {"__float__"}:
        return float(value["__float__"])
    if value.keys() == {"__tuple__"}:
        return tuple(_decode(v, tensors) for v in value["__tuple__"])
    if value.keys() == {"__dict__"}:
        return {k: _decode(v, tensors) for k, v in value["__dict__"]}
    return {k: _decode(v, tensors) for k, v in value.items()}


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """safetensors refuses shared storage: a tensor that is another's exact view is stored as an alias."""
    from safetensors.torch import save_file

    unique, aliases, seen = {}, {}, {}
    for key, tensor in tensors.items():
        ident = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                 tensor.stride(), tensor.dtype)
        if tensor.numel() and ident in seen:
            aliases[key] = seen[ident]
        else:
            seen[ident] = key
            unique[key] = tensor.detach().contiguous()
    save_file(unique, path, metadata={"format": "pt", "aliases": json.dumps(aliases, sort_keys=True)})


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        aliases = json.loads((handle.metadata() or {}).get("aliases", "{}"))
    for alias, key in aliases.items():
        tensors[alias] = tensors[key]
    return tensors


def _dumps(obj: Any) -> str:
    """Keys in insertion order, not sorted: a state_dict comes back in the order it was saved."""
    return json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def _meta_sha256(meta: dict[str, Any]) -> str:
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --- save ----------------------------------------------------------------------------------

def save_checkpoint(run_dir: Path | str, state: TrainState) -> Path:
    """Write ``step-NNNNNN`` atomically under the run's checkpoint folder, then prune; returns it.

    The full layout is written by one process (rank 0); the sharded one by every rank, each
    its shard, and published by rank 0 (:mod:`kdtrain.train.shards`)."""
    settings = DistillConfig.model_validate(state.config).checkpoint
    parent = Path(run_dir) / settings.dir
    final = parent / f"step-{state.step:06d}"
    optimizer_tensors: dict[str, torch.Tensor] = {}
    if state.sharded:
        tmp = shards.building(final)
        tensors, optimizer_json, aliases = shards.flat_tensors(state.model, state.optimizer)
        shards.write(tmp, tensors)
        shards.barrier()
        if shards.main():
            (tmp / shards.MODEL).write_text(_dumps({"aliases": aliases}), encoding="utf-8")
            _write_rest(tmp, state, optimizer_json, optimizer_tensors)
            atomic.publish(tmp, final)
            _prune(parent, state.step, settings.keep_last)
        shards.barrier()
        return final
    optimizer_json = _encode(state.optimizer, "optimizer", optimizer_tensors)
    with atomic.directory(final) as tmp:
        _save_tensors(tmp / "model.safetensors", state.model)
        _write_rest(tmp, state, optimizer_json, optimizer_tensors)
    _prune(parent, state.step, settings.keep_last)
    return final


def _write_rest(tmp: Path, state: TrainState, optimizer_json: Any, optimizer_tensors: dict[str, torch.Tensor]) -> None:
    """Everything but the model's tensors, meta.json (with every file's SHA-256) last."""
    if not state.sharded:
        _save_tensors(tmp / "optimizer.safetensors", optimizer_tensors)
    (tmp / "optimizer.json").write_text(_dumps(optimizer_json), encoding="utf-8")
    _save_tensors(tmp / "rng.safetensors", {"torch": state.rng.torch, **{f"cuda.{i}": s for i, s in enumerate(state.rng.cuda)}})
    meta = {
        "format": FORMAT,
        "step": state.step,
        "fingerprint": state.fingerprint,
        "config": state.config,
        "data": asdict(state.data),
        "rng": {"python": state.rng.python, "numpy": state.rng.numpy},
        "scheduler": _encode(state.scheduler, "scheduler", None),
        "budgets": _encode(asdict(state.budgets), "budgets", None),
        "history": _encode(state.history, "history", None),
        "gate": state.gate,
        **({"layout": "sharded", "world": state.world} if state.sharded else {}),
        "files": {name: sha256_path(tmp / name) for name in _files(tmp)},
    }
    meta["meta_sha256"] = _meta_sha256(meta)
    (tmp / META).write_text(_dumps(meta), encoding="utf-8")


def _files(folder: Path) -> list[str]:
    """Every file under ``folder`` but meta.json, as sorted relative POSIX paths."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() != META)


def _step_folders(parent: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every ``step-*`` folder, newest first."""
    if not parent.is_dir():
        return []
    found = [(int(m[1]), p) for p in parent.iterdir() if p.is_dir() and (m := _STEP.match(p.name))]
    return sorted(found, reverse=True)


def _remove(folder: Path) -> None:
    """Rename out of sight first, so that a crash mid-delete never leaves a half ``step-*`` folder."""
    trash = folder.with_name(f".{folder.name}.trash-{os.getpid()}")
    os.replace(folder, trash)
    shutil.rmtree(trash)


def _prune(parent: Path, step: int, keep_last: int) -> None:
    """Keep the ``keep_last`` newest checkpoints up to ``step``; drop leftovers of killed writes.

    A folder newer than the step just saved can only be one that ``load_latest`` skipped
    (torn or tampered): the run resumed from before it. It is removed so that it can never
    shadow the new line of checkpoints.
    """
    for path in parent.iterdir():
        if path.name.startswith(".step-") and path.is_dir():  # a killed write's temporary or trash folder
            shutil.rmtree(path, ignore_errors=True)
    kept = 0
    for folder_step, folder in _step_folders(parent):
        if folder_step > step:
            log.warning("removing checkpoint %s: newer than step %d just saved, so one the resume skipped", folder, step)
            _remove(folder)
        elif kept < keep_last:
            kept += 1
        else:
            _remove(folder)


# --- load ----------------------------------------------------------------------------------

def _read(folder: Path, step: int) -> TrainState:
    """The state in ``folder``; an :class:`ArtifactError` saying why if it is torn or tampered."""
    meta_file = folder / META
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(located(meta_file, None, "readable JSON", exc)) from None
    if not isinstance(meta, dict) or meta.get("meta_sha256") != _meta_sha256(meta):
        raise ArtifactError(located(meta_file, "meta_sha256", "the SHA-256 of the rest of meta.json", "a mismatch"))
    files = set(_files(folder))
    if files != set(meta["files"]):
        raise ArtifactError(located(folder, "files", f"exactly {sorted(meta['files'])}", sorted(files)))
    for name, digest in meta["files"].items():
        actual = sha256_path(folder / name)
        if actual != digest:
            raise ArtifactError(located(folder / name, None, f"SHA-256 {digest}", actual))
    if meta["step"] != step or meta["format"] != FORMAT or fingerprint_of(meta["config"]) != meta["fingerprint"]:
        raise ArtifactError(located(meta_file, "step, format, fingerprint", f"step {step}, format {FORMAT} and the config's "
                                    "fingerprint", f"{meta['step']}, {meta['format']}, {meta['fingerprint']}"))
    layout = meta.get("layout", "full")
    if layout not in ("full", "sharded"):
        raise ArtifactError(located(meta_file, "layout", "'full' or 'sharded'", repr(layout)))
    optimizer = json.loads((folder / "optimizer.json").read_text(encoding="utf-8"))
    if layout == "full":
        optimizer = _decode(optimizer, _load_tensors(folder / "optimizer.safetensors"))
    rng = _load_tensors(folder / "rng.safetensors")
    cuda = [rng[f"cuda.{i}"] for i in range(len(rng) - 1)]
    return TrainState(
        sharded=layout == "sharded", world=meta.get("world", 1),
        step=step, model=_load_tensors(folder / "model.safetensors") if layout == "full" else {}, optimizer=optimizer,
        scheduler=_decode(meta["scheduler"], {}), rng=RngStates(meta["rng"]["python"], meta["rng"]["numpy"], rng["torch"], cuda),
        data=DataPosition(**meta["data"]), budgets=Spent(**_decode(meta["budgets"], {})), config=meta["config"],
        fingerprint=meta["fingerprint"], history=_decode(meta["history"], {}), gate=meta.get("gate"), folder=folder,
    )


def load_latest(run_dir: Path | str, checkpoint_dir: str = "checkpoints") -> TrainState | None:
    """The newest checkpoint that verifies, or None if the run has none yet.

    Torn or tampered folders are skipped with a warning. If there are checkpoints but none
    verifies, that is an :class:`ArtifactError`: starting over would spend the budgets again.
    """
    from safetensors import SafetensorError

    parent = Path(run_dir) / checkpoint_dir
    skipped = []
    for step, folder in _step_folders(parent):
        try:
            return _read(folder, step)
        except (ArtifactError, OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
            reason = str(exc) if isinstance(exc, ArtifactError) else f"{folder}: unreadable: {type(exc).__name__}: {exc}"
            log.warning("skipping checkpoint %s: %s", folder, reason)
            skipped.append(reason)
    if skipped:
        raise ArtifactError("\n  ".join([located(parent, None, "a checkpoint that verifies (starting over would spend the "
                                                  "budgets twice)", f"{len(skipped)} that do not:"), *skipped]))
    return None


# --- strict resume -------------------------------------------------------------------------

def check_resume(saved: TrainState, config: DistillConfig) -> list[Change]:
    """Changes from the saved configuration that the new one allows; a :class:`ConfigError` otherwise.

    ``resume.*`` itself may always change (allowing a key is such a change); any other key
    must fall under one of the new config's ``resume.allow_changes`` paths.
    """
    if saved.fingerprint == config.fingerprint():
        return []
    changes = diff(saved.config, config.canonical())
    refused = [c for c in changes if not allowed(c, ("resume", *config.resume.allow_changes))]
    if refused:
        where = saved.folder / META if saved.folder else "checkpoint"
        keys = ", ".join(c.key for c in refused)
        raise ConfigError("\n".join([
            located(where, "config", f"the configuration step {saved.step} was saved with ({saved.fingerprint})",
                    f"{len(refused)} change(s) not in resume.allow_changes:"),
            *(f"  {change}" for change in refused),
            f"to resume anyway, add to the new config: resume: {{allow_changes: [{keys}]}}",
        ]))
    return changes
