"""Confidence calibration: map a backend's raw line confidence to the measured chance that the line
is read exactly, by isotonic regression (pool adjacent violators), and the expected calibration
error (ECE) that shows whether it worked."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class IsotonicMap:
    """Piecewise-linear, non-decreasing map from raw confidence to P(line correct)."""

    x: tuple[float, ...]
    y: tuple[float, ...]

    def __call__(self, confidence: float) -> float:
        if not self.x:
            return float(confidence)
        return float(np.interp(confidence, self.x, self.y))

    def to_dict(self) -> dict:
        return {"kind": "isotonic", "x": list(self.x), "y": list(self.y)}

    @classmethod
    def from_dict(cls, data: dict) -> "IsotonicMap":
        return cls(tuple(data["x"]), tuple(data["y"]))

    @classmethod
    def identity(cls) -> "IsotonicMap":
        return cls((0.0, 1.0), (0.0, 1.0))


def fit_isotonic(confidence: list[float], correct: list[bool]) -> IsotonicMap:
    if not confidence:
        return IsotonicMap.identity()
    order = np.argsort(confidence)
    xs = np.asarray(confidence, dtype=float)[order]
    ys = np.asarray(correct, dtype=float)[order]
    blocks: list[list[float]] = []  # [sum_y, count, x_min, x_max]
    for x, y in zip(xs, ys):
        blocks.append([y, 1.0, x, x])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, n, lo, hi = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += n
            blocks[-1][3] = hi
    px, py = [], []
    for s, n, lo, hi in blocks:
        px.append((lo + hi) / 2)
        py.append(s / n)
    return IsotonicMap(tuple(float(v) for v in px), tuple(float(v) for v in py))


def expected_calibration_error(confidence: list[float], correct: list[bool], bins: int = 10) -> float:
    if not confidence:
        return 0.0
    conf = np.clip(np.asarray(confidence, dtype=float), 0, 1)
    hit = np.asarray(correct, dtype=float)
    idx = np.minimum((conf * bins).astype(int), bins - 1)
    ece = 0.0
    for b in range(bins):
        mask = idx == b
        if mask.any():
            ece += mask.mean() * abs(conf[mask].mean() - hit[mask].mean())
    return float(ece)
