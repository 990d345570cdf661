"""Training-health evidence for the promotion gate: is the loss finite, are samples non-degenerate?

Until a VLM judge scores fidelity, these are the checks that can refuse a broken model: a NaN loss,
blank or constant images, or a model that draws the same picture for every prompt and seed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from itertools import combinations

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Health:
    steps: int
    loss_finite: bool
    final_loss: float  # mean of the last 10% of steps
    first_loss: float  # mean of the first 10% of steps
    sample_count: int
    min_sample_std: float  # on a 0-1 pixel scale
    blank_samples: int
    distinct_share: float  # share of sample pairs that differ

    def as_dict(self) -> dict:
        return asdict(self)


def _window_mean(values: list[float], head: bool) -> float:
    n = max(1, len(values) // 10)
    part = values[:n] if head else values[-n:]
    return float(sum(part) / len(part)) if part else float("nan")


def assess(losses: list[float], samples: list[Image.Image], blank_std: float = 0.02) -> Health:
    arrays = [np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0 for img in samples]
    stds = [float(a.std()) for a in arrays]
    pairs = list(combinations(range(len(arrays)), 2))
    distinct = sum(1 for i, j in pairs if arrays[i].shape != arrays[j].shape or float(np.abs(arrays[i] - arrays[j]).mean()) > 1e-3)
    return Health(
        steps=len(losses),
        loss_finite=bool(losses) and all(math.isfinite(x) for x in losses),
        final_loss=_window_mean(losses, head=False),
        first_loss=_window_mean(losses, head=True),
        sample_count=len(samples),
        min_sample_std=min(stds) if stds else 0.0,
        blank_samples=sum(1 for s in stds if s < blank_std),
        distinct_share=distinct / len(pairs) if pairs else 0.0,
    )


def sample_grid(samples: list[Image.Image], columns: int) -> Image.Image:
    """One picture of all samples, `columns` per row (a row per prompt)."""
    w, h = samples[0].size
    rows = math.ceil(len(samples) / columns)
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for i, img in enumerate(samples):
        grid.paste(img.convert("RGB"), ((i % columns) * w, (i // columns) * h))
    return grid
