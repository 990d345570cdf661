"""Timing GPU work from the host: what the benchmarks share."""

from __future__ import annotations

import time
from typing import Callable

import torch


def best_seconds(fn: Callable[[], object], repeats: int = 3) -> float:
    """The fastest of `repeats` calls, each waited for on the device (call it once before, to warm up)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return min(times)
