"""Which variant of a recogniser to serve on this CPU: the shipped fp32 model, its exact fp32 rewrite
(graph.py) or int8 (quantize.py).

Which one is fastest depends on the CPU: int8 ran 1.3x the rewrite on one Xeon and 0.9x on another
(with AMX), 1.75x on an AMD EPYC with AVX-512 VNNI. The calibration flow measures every variant on the
machine it runs on and records the choice with that machine's CPU signature. int8 is served only when
it holds accuracy (the gate checks that) and is at least `min_speedup` times the fastest fp32 variant:
it reads slightly differently, so it has to pay for that. A recalibration of the same models on the
same CPU keeps the earlier choice unless the new timing clears the gate by a margin the other way
(`choose`). A machine whose CPU signature differs re-measures at load time on a fixed synthetic batch
(well under a second) and applies the same rule.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import numpy as np

FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile", "asimd", "sve")


def cpu_signature() -> str:
    """CPU model and the vector extensions ONNX Runtime's kernels choose by, e.g. 'AMD EPYC | avx2 avx512f avx512_vnni'."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name":
                model = value.strip()
            elif key in ("flags", "Features"):
                flags.update(value.split())
            if model and flags and key in ("flags", "Features"):
                break
    except OSError:
        pass
    return f"{model} | {' '.join(f for f in FLAGS if f in flags)}"


STICKY = 0.10  # how far past the gate a re-measurement must move before the served variant changes


def choose(speeds: dict[str, float], min_speedup: float, previous: str | None = None) -> str:
    """The variant to serve: int8 when it is at least `min_speedup` x the fastest fp32 variant, else
    the fastest fp32 variant.

    `previous` is what the same models served when last measured on the same CPU. A timing near the
    gate is noise, so the earlier choice stands unless the new one clears the gate by `STICKY` the
    other way: int8 stays while it runs at least (1 - STICKY) x min_speedup, fp32 stays until int8
    runs (1 + STICKY) x min_speedup. A rerun then registers the same engine instead of flipping."""
    fp32 = {k: v for k, v in speeds.items() if k != "int8"}
    best_fp32 = max(fp32, key=lambda k: fp32[k]) if fp32 else "int8"
    if "int8" not in speeds or not fp32:
        return best_fp32
    margin = {None: 0.0, "int8": -STICKY}.get(previous, STICKY)
    return "int8" if speeds["int8"] >= min_speedup * (1 + margin) * fp32[best_fp32] else best_fp32


def synthetic_lines(count: int = 16, seed: int = 0) -> list[np.ndarray]:
    """Line-shaped images for timing (a recogniser's speed depends on the input's size, not its text)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (48, int(w), 3), dtype=np.uint8) for w in rng.integers(160, 720, count)]


def measure(readers: dict, images: list[np.ndarray] | None = None, repeats: int = 3) -> dict[str, float]:
    """Lines/s of each `reader(images)`, the median of `repeats` interleaved passes after a warm-up."""
    images = images if images is not None else synthetic_lines()
    for read in readers.values():
        read(images[:4])
    passes: dict[str, list[float]] = {k: [] for k in readers}
    for _ in range(repeats):
        for name, read in readers.items():
            t = time.perf_counter()
            read(images)
            passes[name].append(len(images) / max(time.perf_counter() - t, 1e-9))
    return {k: float(np.median(v)) for k, v in passes.items()}
