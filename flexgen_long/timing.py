"""The one timing helper of the benchmarks (analysis/*.py): warm-up first, then repeated timed calls, median/min/max.

On a GPU each call is timed with CUDA events around it (after a synchronize), so host overhead before the launch does
not count but every kernel of the call does; on the CPU with ``time.perf_counter``. The first call is never timed: it
compiles (torch.compile, Triton autotuning, cuDNN plan selection) and allocates, and an unwarmed timing measures that
instead of the kernel (an unwarmed first check of this project once reversed a comparison: analysis/README.md).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

__all__ = ["measure", "time_call"]


def time_call(fn: Callable[[], object], device: torch.device | str) -> float:
    """Milliseconds of one call of ``fn`` on ``device`` (everything it queued on the GPU included)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def measure(fn: Callable[[], object], device: torch.device | str, *, budget_ms: float = 2000.0, warmup: int = 1,
            min_reps: int = 3, max_reps: int = 100) -> dict:
    """``warmup`` untimed calls, then timed calls until ``budget_ms`` of timed calls is spent (at least ``min_reps``,
    at most ``max_reps``). Returns median, min and max in ms, the repetitions, and on a GPU the peak memory allocated
    during the calls (GiB)."""
    if warmup < 1 or min_reps < 1 or max_reps < min_reps:
        raise ValueError(f"need warmup >= 1 and 1 <= min_reps <= max_reps, got warmup={warmup}, "
                         f"min_reps={min_reps}, max_reps={max_reps}")
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        time_call(fn, device)
    times: list[float] = []
    while len(times) < max_reps and (len(times) < min_reps or sum(times) < budget_ms):
        times.append(time_call(fn, device))
    out = {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "reps": len(times),
           "warmup_calls": warmup}
    if cuda:
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out
