"""Timers for tests: a deadline for calls that must not block, an
interruption at a chosen moment, and a scratch directory on tmpfs."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


class Hung(Exception):
    """A call still blocked at its deadline (not an OSError: never expected)."""


@contextlib.contextmanager
def _alarm(seconds: float, raised: Callable[[], BaseException]) -> Iterator[None]:
    def fire(signum: int, frame: object) -> None:
        # A fresh exception each time: one kept here would keep every frame
        # it went through alive, and what they hold unfinalised.
        raise raised()

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def deadline(seconds: float) -> contextlib.AbstractContextManager[None]:
    """Fail a block that still runs (blocks) after ``seconds``: :class:`Hung`."""
    return _alarm(seconds, lambda: Hung(f"still blocked after {seconds} s"))


def interrupt_after(seconds: float) -> contextlib.AbstractContextManager[None]:
    """Raise KeyboardInterrupt in the block after ``seconds``, as Ctrl-C would."""
    return _alarm(seconds, KeyboardInterrupt)


@contextlib.contextmanager
def scratch_on_tmpfs(prefix: str, fallback: Path) -> Iterator[Path]:
    """A scratch directory on tmpfs if there is one (fast: no disk), else
    ``fallback``; removed afterwards."""
    if not (os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK)):
        yield fallback
        return
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/dev/shm"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
