from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import Callable

import pytest

from atomstore import _rename, _shrink, _staging, _store, _syscalls
from atomstore._rename import Capabilities
from clocks import Clock
from tracing import Recorder

# A run started in the background of a shell (``tox &``, nohup) inherits
# SIGINT ignored, and so would every Python the tests start: the tests of
# Ctrl-C would see nothing.  Handled here, SIGINT is reset to its default in
# every program the tests run (exec resets handled signals).
signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def trace() -> Iterator[Recorder]:
    """Record every call through the OS boundary (and inject faults)."""
    recorder = Recorder()
    previous = _syscalls.set_tracer(recorder)
    try:
        yield recorder
    finally:
        _syscalls.set_tracer(previous)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """Time stands still until the test moves it (see :mod:`clocks`)."""
    fake = Clock()
    monkeypatch.setattr(time, "time_ns", fake.time_ns)
    monkeypatch.setattr(time, "monotonic", fake.monotonic)
    return fake


class _Everything:
    def __contains__(self, item: object) -> bool:
        return True


@pytest.fixture
def eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every empty look swaps new/ for a fresh one, at once, on any
    filesystem with RENAME_EXCHANGE; an old new/ is finished as soon as it
    has not changed for 50 ms (see atomstore._shrink)."""
    monkeypatch.setattr(_shrink, "SHRINK_FROM", 0)
    monkeypatch.setattr(_shrink, "NEVER_SHRINK", _Everything())
    monkeypatch.setattr(_store, "_SHRINK_EVERY", 0.0)
    monkeypatch.setattr(_store, "_SHRINK_LOOK_EVERY", 0.0)
    monkeypatch.setattr(_store, "_LEFTOVER_LOOK_EVERY", 0.0)
    monkeypatch.setattr(_shrink, "GRACE", 0.05)


@pytest.fixture
def fresh_probe() -> Iterator[None]:
    """Forget the probed capabilities before and after the test."""
    _rename.forget()
    _staging.forget_probes()
    try:
        yield
    finally:
        _rename.forget()
        _staging.forget_probes()


class _SteadyMounts(_rename._MountWatch):
    """A mount watch that never sees a change: forced answers stay."""

    def changed(self) -> bool:
        return False


@pytest.fixture
def force_caps(
    tmp_path: os.PathLike[str], fresh_probe: None, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Capabilities]:
    """Pretend the test's filesystem has the given capabilities.

    Mounts elsewhere on the machine (other tests) do not undo the pretence.
    """
    monkeypatch.setattr(_rename, "_mounts", _SteadyMounts())

    def force(**flags: bool) -> Capabilities:
        caps = Capabilities(
            noreplace=flags.get("noreplace", True),
            exchange=flags.get("exchange", True),
            hardlinks=flags.get("hardlinks", True),
            ignores_flags=flags.get("ignores_flags", False),
        )
        _rename._cache[os.stat(tmp_path).st_dev] = caps
        return caps

    return force
