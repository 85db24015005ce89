"""Where this process stands under ``torchrun``: its rank, the world size, its device, and
the all-reduces the loop needs (a mean of the measured norms, a total of the tokens)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class World:
    rank: int = 0
    size: int = 1

    @classmethod
    def from_env(cls) -> "World":
        """torchrun's environment; initialises the process group when there are several ranks."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size > 1 and not dist.is_initialized():
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
