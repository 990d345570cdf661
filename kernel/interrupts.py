"""Ctrl-C that is never lost.

Python raises KeyboardInterrupt wherever the main thread is when SIGINT arrives. If that is a finalizer
(`__del__`, run by the garbage collector: dulwich's object stores, say), Python prints "Exception ignored
in ..." and carries on: a fine-tune interrupted during registration then registered, promoted and exited
0. So the command line's handler also records the signal, and the steps that commit something (a
model version, an alias move, a ledger row) call `check()` first: an interrupt that was swallowed
still stops the command before anything is registered after it."""

from __future__ import annotations

import signal
import sys
import threading

_interrupted = threading.Event()


def install() -> None:
    """Record every SIGINT, then raise KeyboardInterrupt as Python's own handler does (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):  # noqa: ARG001 (signal handler signature)
        _interrupted.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    default_hook = sys.unraisablehook

    def unraisable(info) -> None:  # the swallowed interrupt is recorded: no "Exception ignored" traceback for it
        if info.exc_type is not None and issubclass(info.exc_type, KeyboardInterrupt):
            return
        default_hook(info)

    sys.unraisablehook = unraisable


def check() -> None:
    """Raise KeyboardInterrupt if SIGINT arrived since `install()`, even if its first raise was swallowed."""
    if _interrupted.is_set():
        raise KeyboardInterrupt
