"""A controlled clock for leases and delays: the wall clock (``time.time_ns``,
which claims, renewals, due times and ``recover()`` read) and the
monotonic one (when a consumer looks at ``delay/`` again) move only when
told to."""

from __future__ import annotations

import time

SECOND = 1_000_000_000


class Clock:
    """Wall and monotonic clocks that move only when told to."""

    def __init__(self) -> None:
        self.wall_ns = time.time_ns()
        self.mono = time.monotonic()

    def time_ns(self) -> int:
        return self.wall_ns

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.wall_ns += int(seconds * SECOND)
        self.mono += seconds
