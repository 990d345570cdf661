"""The end of a run in a resident trainer: the trained weights handed to a background writer, so the
session trains the next subject while this one's pipeline is written."""

from __future__ import annotations

import functools
from typing import Callable

import torch

from atelier.models.dreambooth.checkpoints import copy_to_host, model_tensor_name


class Pending:
    """A pipeline being written in the background; `wait()` returns when it is whole (or raises its error)."""

    def __init__(self, write: Callable[[], None]) -> None:
        import threading

        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(write,), name="pipeline-writer", daemon=True)
        self.thread.start()

    def _run(self, write: Callable[[], None]) -> None:
        try:
            write()
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits
            self.error = exc

    def wait(self) -> None:
        self.thread.join()
        if self.error is not None:
            raise self.error


class HostWeights:
    """Host memory for a session's trained weights at the end of each run, kept run after run: pinned when
    the weights are on a GPU, so the copy off the device runs at the bus's speed instead of into fresh
    pageable memory, and allocated once per session instead of once per subject. The module is built
    around the copies (on the meta device: nothing initialised) by the writer thread, off the training's
    path. A run's copy waits until the previous run's writer is done reading the buffers.

    A single run that writes its pipeline before it returns passes `buffers`: its checkpoints' host
    buffers, already pinned and free once the last checkpoint is on disk (a trained tensor's buffer has
    the checkpoint's name for it), and `pin=False`, so a tensor no checkpoint holds (a frozen text
    encoder) goes to pageable memory rather than pinning new memory for one copy."""

    def __init__(self, buffers: dict[str, torch.Tensor] | None = None, pin: bool = True) -> None:
        self.buffers: dict[str, torch.Tensor] = {} if buffers is None else buffers
        self.pin = pin
        self.reader: Pending | None = None  # the writer still reading the buffers

    def stage(self, modules: dict[str, torch.nn.Module]) -> dict[str, Callable[[], torch.nn.Module]]:
        """Copy each module's tensors into the buffers now; returns, by name, what builds its host module."""
        if self.reader is not None:
            self.reader.thread.join()  # its own errors go to its own client (Pending.wait)
            self.reader = None
        built: dict[str, Callable[[], torch.nn.Module]] = {}
        for name, module in modules.items():
            inner = getattr(module, "_orig_mod", module)
            state = {
                key: copy_to_host(self.buffers, model_tensor_name(name, key), tensor, self.pin)
                for key, tensor in inner.state_dict().items()
            }
            built[name] = functools.partial(module_around, inner.__class__, inner.config, state)
        if torch.cuda.is_available():
            torch.cuda.current_stream().synchronize()  # the copies have landed before anyone reads them
        return built


def module_around(cls, config, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A diffusers or transformers model of `cls` built on the meta device (no weight is initialised) and
    given `state`'s tensors as its own."""
    from diffusers import ModelMixin
    from transformers import PreTrainedModel

    with torch.device("meta"):
        if issubclass(cls, ModelMixin):
            clone = cls.from_config(config)
        elif issubclass(cls, PreTrainedModel):
            clone = cls._from_config(config)
        else:
            raise TypeError(f"cannot copy a {cls.__name__} to the host")
    clone.load_state_dict(state, assign=True)
    return clone
