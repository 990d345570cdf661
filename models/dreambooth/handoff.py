"""The end of a run in a resident trainer: the trained weights handed to a background writer, so the
session trains the next subject while this one's pipeline is written."""

from __future__ import annotations

from typing import Callable

import torch


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


def host_copy(module: torch.nn.Module) -> torch.nn.Module:
    """The module with its weights copied to host memory: built on the meta device (no weight is
    initialised) and given the copies, so the device's module trains on while this one is written."""
    from diffusers import ModelMixin
    from transformers import PreTrainedModel

    inner = getattr(module, "_orig_mod", module)
    state = {k: v.detach().to("cpu", copy=True) for k, v in inner.state_dict().items()}
    with torch.device("meta"):
        if isinstance(inner, ModelMixin):
            clone = inner.__class__.from_config(inner.config)
        elif isinstance(inner, PreTrainedModel):
            clone = inner.__class__._from_config(inner.config)
        else:
            raise TypeError(f"cannot copy a {inner.__class__.__name__} to the host")
    clone.load_state_dict(state, assign=True)
    return clone
