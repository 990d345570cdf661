"""Timing GPU work from the host: what the benchmarks share."""

from __future__ import annotations

import re
import time
from collections import defaultdict
from typing import Callable

import torch

KINDS = [  # first match wins
    ("attention", r"flash|fmha|attention|sdpa|cudnn.*(mha|sdp)"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("norm", r"_gn_|group_norm|layer_norm|norm_kernel|welford|GroupNorm|LayerNorm|RowwiseMoments|ComputeFused|cuComputePartGrad|GammaBeta"),
    ("conv", r"conv|implicit|wgrad|dgrad|fprop|nhwc|nchw"),
    ("gemm", r"gemm|sm90|cutlass|xmma|cublas|matmul|splitK"),
    ("copy/cast", r"copy|cast|Copy|to_dtype"),
    ("reduce", r"reduce|Reduce|sum|norm"),
    ("elementwise", r"elementwise|vectorized|unrolled|silu|gelu|mul|add|Elementwise"),
]


def best_seconds(fn: Callable[[], object], repeats: int = 3) -> float:
    """The fastest of `repeats` calls, each waited for on the device (call it once before, to warm up)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return min(times)


def kernels_by_kind(prof, per: int = 1, top: int = 45, indent: str = "  ") -> tuple[dict[str, float], list[tuple]]:
    """A CUDA profile's kernel time in ms (divided by `per`, the steps or batches profiled) summed by kind
    (KINDS), printed with the `top` kernels (ms, calls, kind, name); returns both. Kernels only: an
    operator's self time repeats its kernels'."""
    from torch.autograd import DeviceType

    by_kind: dict[str, float] = defaultdict(float)
    kernels = []
    for evt in prof.key_averages():
        us = evt.self_device_time_total
        if us <= 0 or evt.device_type != DeviceType.CUDA:
            continue
        kind = next((k for k, pat in KINDS if re.search(pat, evt.key)), "other")
        by_kind[kind] += us / per / 1000
        kernels.append((us / per / 1000, evt.count // per, kind, evt.key[:110]))
    kernels.sort(reverse=True)
    total = sum(by_kind.values())
    for kind, ms in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"{indent}{kind:<12} {ms:7.2f} ms  {100 * ms / total:5.1f}%")
    print(f"{indent}top kernels (ms, calls, kind, name):")
    for ms, n, kind, name in kernels[:top]:
        print(f"{indent}{ms:7.2f} {n:5d} {kind:<11} {name}")
    return dict(by_kind), kernels[:top]
