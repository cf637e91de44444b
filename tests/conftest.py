from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Callable

import pytest

from atomstore import _rename, _syscalls
from atomstore._rename import Capabilities
from clocks import Clock
from tracing import Recorder


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


@pytest.fixture
def fresh_probe() -> Iterator[None]:
    """Forget the probed capabilities before and after the test."""
    _rename.forget()
    try:
        yield
    finally:
        _rename.forget()


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
