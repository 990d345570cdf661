"""The end of a resident run: copying the trained weights off the GPU before the background write.

    python benchmarks/handoff.py            # needs CUDA; SD 1.5's UNet + text encoder: 983M fp32 parameters

Times, in one process, the copy into fresh pageable memory (what each run did before: `.to("cpu",
copy=True)` per tensor) against `handoff.HostWeights.stage` with its pinned buffers reused from the
previous run (what a resident trainer's second and later subjects do). Tensors are shaped like SD 1.5's
(~1,100 tensors, 3.9 GB), without building the model.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atelier.models.dreambooth.handoff import HostWeights  # noqa: E402
from benchmarks.gpu_timing import best_seconds  # noqa: E402


class _Weights(torch.nn.Module):
    config: dict = {}

    def __init__(self, sizes: list[int]) -> None:
        super().__init__()
        self.params = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(n, device="cuda")) for n in sizes)


def _sizes(total: int, count: int) -> list[int]:
    g = torch.Generator().manual_seed(0)
    weights = torch.rand(count, generator=g) ** 4  # a few big tensors, many small ones, as in a UNet
    return [max(1, int(w)) for w in (weights / weights.sum() * total).tolist()]


def main() -> None:
    if not torch.cuda.is_available():
        print("needs CUDA")
        return
    module = _Weights(_sizes(983_000_000, 1100))
    gib = sum(p.numel() * 4 for p in module.parameters()) / 2**30

    def pageable() -> None:
        {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}

    weights = HostWeights()
    weights.stage({"m": module})  # the first subject pins the buffers

    def pinned() -> None:
        weights.stage({"m": module})

    for name, fn in (("pageable, fresh memory (before)", pageable), ("pinned, reused (HostWeights)", pinned)):
        fn()
        torch.cuda.synchronize()
        best = best_seconds(fn)
        print(f"{name:<34} {best:6.3f} s  {gib / best:6.1f} GiB/s", flush=True)
        if name.startswith("pageable"):
            base = best
    print(f"ratio: {base / best:.1f}x less time on the training's path ({gib:.2f} GiB, {torch.cuda.get_device_name()})")


if __name__ == "__main__":
    main()
