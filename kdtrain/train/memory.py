"""What a callable allocates through torch, on CPU as on CUDA: the peak above the start, the largest block.

CUDA has allocator statistics (``torch.cuda.max_memory_allocated``). The CPU allocator has
none; its allocations and frees are what ``torch.profiler`` records with ``profile_memory``
(one event per block, signed size, in order), so the peak is the running sum's maximum.
That counts tensors only (no Python objects, no allocator caching), which is what the
losses and the LM head change; ``resource``'s max RSS would be process-wide and never go
down, and ``tracemalloc`` does not see torch (:func:`kdtrain.runtime.speed.peak_bytes` uses it
for what it does see: the MIL executor's numpy buffers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Allocations:
    peak: int  # bytes: most held at once during the call, above what was held at its start
    largest: int  # bytes: the largest single block allocated (CPU; on CUDA, the peak)


def measure_allocations(fn: Callable[[], object], device: torch.device | str = "cpu") -> Allocations:
    """Run ``fn()`` once and report what it allocated on ``device`` (synchronous; profiler overhead on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - start
        return Allocations(peak, peak)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    blocks = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    held = peak = largest = 0
    for _, nbytes in blocks:  # + allocated, - freed
        held += nbytes
        peak, largest = max(peak, held), max(largest, nbytes)
    return Allocations(peak, largest)
