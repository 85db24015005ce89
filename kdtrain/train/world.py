"""Where this process stands under ``torchrun``: its rank, the world size, its device, and
the all-reduces the loop needs (a mean of the measured norms, a total of the tokens)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class World:
    rank: int = 0
    size: int = 1

    @classmethod
    def from_env(cls) -> "World":
        """torchrun's environment; initialises the process group when there are several ranks."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size > 1 and not dist.is_initialized():
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(dist.get_rank() if size > 1 else 0, size)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """This rank's GPU when there is one (torchrun's LOCAL_RANK), else the CPU."""
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")

    def shard(self, root: nn.Module, blocks: Iterable[nn.Module], parallel) -> None:
        """FSDP2 in place: each of ``blocks`` (the decoder layers) its own unit, then ``root`` for the rest.

        Parameters, gradients and optimizer state are sharded over the ranks; a unit's
        parameters are gathered for its forward and backward only. ``parallel`` is the config's
        section (kdtrain.train.config.Parallel): the compute and gradient-reduction dtypes."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(self.device.type, (self.size,))
        policy = MixedPrecisionPolicy(param_dtype=getattr(torch, parallel.param_dtype), reduce_dtype=getattr(torch, parallel.reduce_dtype))
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(root, mesh=mesh, mp_policy=policy)

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        if self.size == 1 or not values:
            return values
        names = sorted(values)
        t = torch.tensor([values[n] for n in names], dtype=torch.float64)
        dist.all_reduce(t)
        return {n: float(v) / self.size for n, v in zip(names, t)}

    def total(self, value: float) -> float:
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t)
