"""How fast a run's steps went, from the loop's own synchronisation points (no extra device sync)."""

from __future__ import annotations

import statistics
import time


class Pace:
    """Milliseconds a step between loss read-backs (each read-back waits for the device, so the wall
    clock between two is the device's time for the steps between), apart from checkpoints and
    validations. The first window holds the eager steps and the capture; the median of the others is
    the steady pace, which a benchmark of the step alone should match."""

    def __init__(self, step: int) -> None:
        self.since, self.step, self.windows = time.perf_counter(), step, []
        self.first: dict[str, float] = {}  # the first window: its seconds and the step it ended at

    def read_back(self, step: int) -> None:
        now = time.perf_counter()
        if step > self.step:
            if not self.first:
                self.first = {"first_steps_s": round(now - self.since, 3), "first_steps": float(step)}
            else:
                self.windows.append(1000 * (now - self.since) / (step - self.step))
        self.since, self.step = now, step

    def restart(self, step: int) -> None:
        """After work that is not a step (it synchronised): the next window starts now."""
        self.since, self.step = time.perf_counter(), step

    def summary(self) -> dict[str, float]:
        out = dict(self.first)
        if self.windows:
            out["steady_ms_per_step"] = round(statistics.median(self.windows), 2)
            out["slowest_window_ms_per_step"] = round(max(self.windows), 2)
        return out
