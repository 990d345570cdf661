"""Progress of long work, reported where the work happens and shown by whoever listens.

A task or a loop calls `report(label, done, total, unit)`; the command line listens and draws bars
with counts and an ETA; with no listener a report costs one list lookup. The kernel holds only the
hand-off, so no layer below the command line needs to know how progress is drawn.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator

Listener = Callable[[str, int, int, str], None]  # label, done, total, unit

_listeners: list[Listener] = []
_lock = threading.Lock()


def report(label: str, done: int, total: int, unit: str = "items") -> None:
    """`done` of `total` `unit` of the work called `label` are finished."""
    for listener in tuple(_listeners):
        listener(label, done, total, unit)


@contextlib.contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Call `listener` with every report made while the block runs (in any thread of the process)."""
    with _lock:
        _listeners.append(listener)
    try:
        yield
    finally:
        with _lock:
            _listeners.remove(listener)
