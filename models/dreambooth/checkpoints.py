"""Training checkpoints that cost the GPU well under a second: what resume needs, written in the background.

A checkpoint holds exactly what the loop needs to continue as if it had never stopped: the weights
that train (all of the UNet and a trained text encoder; a LoRA run's adapters only), the optimizer's
state, the LR scheduler's, the loop's (step, losses, the generator) and, for fp16, the grad scaler's.
The frozen VAE and a frozen text encoder are not in it: they are the base model's.

`save` copies every tensor to host memory (pinned, reused from one checkpoint to the next, so on a
GPU the copy runs at PCIe speed: about half a second for SD 1.5 with its Adam states, 12 GB) and
hands the write to a background thread; training goes on meanwhile. The write goes to a temporary
folder that is renamed into place when whole, so a kill at any moment leaves the previous checkpoint
intact, and a full disk is a `DiskError` (at the next checkpoint or the end of training) with nothing
partial left. Files are read back with `torch.load(weights_only=True)`: tensors and plain values, no
code.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path
from typing import Any

import torch

CKPT_PREFIX = "checkpoint-"
STATE_FILE = "state.pt"


class LoopState:
    """What the loop needs besides weights and optimizer to continue exactly: step, losses, RNG."""

    def __init__(self, seed: int, device: torch.device | str = "cpu") -> None:
        # on the training device: drawing noise there needs no host-to-device copy (each copy from
        # pageable memory would synchronise the stream and stall the GPU every step)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.step = 0
        self.losses: list[float] = []

    def state_dict(self) -> dict:
        return {"step": self.step, "losses": list(self.losses), "rng": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.losses = list(state["losses"])
        self.generator.set_state(state["rng"])


def trained_tensors(model) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of a model: its trainable parameters (all of them, or a LoRA's adapters)."""
    inner = getattr(model, "_orig_mod", model)
    inner = getattr(inner, "module", inner)  # DDP
    return {n: p.detach() for n, p in inner.named_parameters() if p.requires_grad}


def model_tensor_name(model: str, tensor: str) -> str:
    """The name under which a checkpoint's host buffers keep a model's trained tensor (`_tensors` of
    `checkpoint_state`): the end of a run stages the weights into those same buffers by this name."""
    return f"/models/{model}/{tensor}"


def checkpoint_state(state: LoopState, trained: dict, optimizer, scheduler, scaler) -> dict:
    """Everything a checkpoint holds (the module docstring), as tensors still on the device."""
    return {
        "models": {k: trained_tensors(m) for k, m in trained.items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler else None,
        "loop": state.state_dict(),
    }


def restore(ckpt: dict, trained: dict, optimizer, scheduler, scaler, state: LoopState) -> None:
    """Load a checkpoint into the run's models, optimizer, scheduler, scaler and loop state, in place."""
    for name, model in trained.items():
        params = dict(getattr(model, "module", model).named_parameters())
        saved = ckpt["models"].get(name, {})
        missing = [n for n, p in params.items() if p.requires_grad and n not in saved]
        if missing:
            raise ValueError(
                f"checkpoint lacks {len(missing)} trained tensors of the {name} (first: {missing[0]}): "
                "it was written by another configuration; remove it to start over"
            )
        with torch.no_grad():
            for n, tensor in saved.items():
                params[n].copy_(tensor)
    # a captured step reads its LR from a device tensor: loading must refill that tensor, not replace it
    # with the checkpoint's (host) copy, and the scheduler's base LRs come back as plain numbers
    kept = [{k: g[k] for k in ("lr", "initial_lr") if isinstance(g.get(k), torch.Tensor)} for g in optimizer.param_groups]
    optimizer.load_state_dict(ckpt["optimizer"])
    for group, tensors in zip(optimizer.param_groups, kept):
        for key, tensor in tensors.items():
            tensor.fill_(float(group[key]))
            group[key] = tensor
    for p in (p for g in optimizer.param_groups for p in g["params"]):
        for key, value in optimizer.state.get(p, {}).items():  # moments in their parameter's layout (fused AdamW needs it)
            if isinstance(value, torch.Tensor) and value.shape == p.shape and value.stride() != p.stride():
                optimizer.state[p][key] = torch.empty_like(p, dtype=value.dtype).copy_(value)
    scheduler.load_state_dict(ckpt["scheduler"])
    scheduler.base_lrs = [float(x) for x in scheduler.base_lrs]
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    state.load_state_dict(ckpt["loop"])


def latest_checkpoint(work_dir: Path) -> Path | None:
    root = Path(work_dir) / "checkpoints"
    found = sorted(p for p in root.glob(f"{CKPT_PREFIX}*") if (p / STATE_FILE).is_file()) if root.is_dir() else []
    return found[-1] if found else None


def load_checkpoint(path: Path) -> dict:
    return torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=True)


def copy_to_host(buffers: dict[str, torch.Tensor], name: str, tensor: torch.Tensor, pin: bool = True) -> torch.Tensor:
    """`tensor` copied into the host buffer kept in `buffers` under `name`, made when missing or shaped
    otherwise: pinned for a device tensor (unless `pin` is False), with the tensor's strides (channels_last
    weights and their Adam moments stay so: the fused optimizer refuses moments whose layout differs from
    their parameter's).
    From a device the copy is asynchronous: synchronize before the buffer is read."""
    buf = buffers.get(name)
    if buf is None or buf.shape != tensor.shape or buf.dtype != tensor.dtype or buf.stride() != tensor.stride():
        buf = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device="cpu", pin_memory=pin and tensor.is_cuda)
        buffers[name] = buf
    return buf.copy_(tensor.detach(), non_blocking=tensor.is_cuda)


def _tensors(tree: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    if isinstance(tree, torch.Tensor):
        return [(prefix, tree)]
    if isinstance(tree, dict):
        return [item for k, v in tree.items() for item in _tensors(v, f"{prefix}/{k}")]
    if isinstance(tree, (list, tuple)):
        return [item for i, v in enumerate(tree) for item in _tensors(v, f"{prefix}/{i}")]
    return []


def _replace(tree: Any, copies: dict[str, torch.Tensor], prefix: str = "") -> Any:
    if isinstance(tree, torch.Tensor):
        return copies[prefix]
    if isinstance(tree, dict):
        return {k: _replace(v, copies, f"{prefix}/{k}") for k, v in tree.items()}
    if isinstance(tree, list):
        return [_replace(v, copies, f"{prefix}/{i}") for i, v in enumerate(tree)]
    if isinstance(tree, tuple):
        return tuple(_replace(v, copies, f"{prefix}/{i}") for i, v in enumerate(tree))
    return tree


class AsyncCheckpointer:
    """One checkpoint in flight at a time; `keep` whole checkpoints kept, the oldest removed."""

    def __init__(self, work_dir: Path, keep: int, buffers: dict[str, torch.Tensor] | None = None) -> None:
        self.root = Path(work_dir) / "checkpoints"
        self.keep = keep
        # host buffers by tensor name; a resident trainer passes the same dict run after run (pinned once)
        self._buffers: dict[str, torch.Tensor] = {} if buffers is None else buffers
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._reserving: threading.Thread | None = None
        self.copy_seconds = 0.0  # time the training loop spent copying to host memory
        self.wait_seconds = 0.0  # time it waited for the previous write (the interval was shorter than a write)

    def reserve(self, state: dict) -> None:
        """Allocate the host buffers for checkpoints shaped like `state` in the background, so the first
        checkpoint does not wait for pinning 12 GB of memory (seconds) in the middle of training."""
        shapes = [(name, t.shape, t.stride(), t.dtype, t.is_cuda) for name, t in _tensors(state)]

        def allocate() -> None:
            for name, shape, stride, dtype, pinned in shapes:
                buf = self._buffers.get(name)
                if buf is None or buf.shape != shape or buf.stride() != stride or buf.dtype != dtype:
                    self._buffers[name] = torch.empty_strided(shape, stride, dtype=dtype, device="cpu", pin_memory=pinned)

        self._reserving = threading.Thread(target=allocate, name="checkpoint-buffers", daemon=True)
        self._reserving.start()

    def reserved(self) -> None:
        """Wait until `reserve`'s buffers exist: before a checkpoint uses them, and before a CUDA graph is
        captured (a capture in CUDA's global mode must not have driver calls such as allocations beside it)."""
        if self._reserving is not None:
            self._reserving.join()
            self._reserving = None

    def save(self, step: int, state: dict) -> None:
        """Copy `state`'s tensors off the device now; write them in the background."""
        import time

        t0 = time.perf_counter()
        self.wait()  # the previous write must be done before its buffers are reused
        self.reserved()
        t1 = time.perf_counter()
        self.wait_seconds += t1 - t0
        copies = {name: copy_to_host(self._buffers, name, tensor) for name, tensor in _tensors(state)}
        if torch.cuda.is_available():
            torch.cuda.current_stream().synchronize()  # the copies have landed before the thread reads them
        self.copy_seconds += time.perf_counter() - t1
        snapshot = _replace(state, copies)
        self._thread = threading.Thread(target=self._write, args=(step, snapshot), name=f"checkpoint-{step}", daemon=True)
        self._thread.start()

    def _write(self, step: int, snapshot: dict) -> None:
        final = self.root / f"{CKPT_PREFIX}{step:07d}"
        tmp = self.root / f".tmp-{step:07d}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            with open(tmp / STATE_FILE, "wb") as f:
                torch.save(snapshot, f)
                f.flush()
                os.fsync(f.fileno())
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in sorted(p for p in self.root.glob(f"{CKPT_PREFIX}*"))[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException as exc:  # noqa: BLE001 (raised in the training thread by wait())
            shutil.rmtree(tmp, ignore_errors=True)  # never leave a partial checkpoint behind
            self._error = _disk_error(self.root, step, exc)

    def wait(self) -> None:
        """Block until the write in flight is done; raise what it failed with."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def _disk_error(root: Path, step: int, exc: BaseException) -> BaseException:
    free = shutil.disk_usage(root if root.exists() else root.parent).free
    if isinstance(exc, OSError) or "No space left" in str(exc) or free < 64 * 2**20:
        from atelier.kernel.errors import DiskError

        return DiskError(
            f"disk holding {root}",
            f"could not take checkpoint {step} ({free // 2**20} MiB free: {exc})"[:300],
            "free some space and rerun: training resumes from the last whole checkpoint",
        )
    return exc
