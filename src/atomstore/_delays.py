"""Delayed messages: waiting in ``delay/`` until they are due.

A delayed message's name in ``delay/`` is its due time, in microseconds
since the epoch (17 digits), a dot, and the name it will have in ``new/``:
the directory's names sort by due time.  Any consumer moves a due message
into ``new/`` (a no-clobber rename: one of them wins) as it claims.

A consumer does not list ``delay/`` for every claim: it keeps the earliest
entries of one listing, looks at the directory's modification time every
half second and lists it again when it changed, and every five seconds in
any case (a change within the same clock tick as a listing leaves the time
as it was).  A message is claimable at most that long after it is due.
"""

from __future__ import annotations

import os
import stat
import time

_DIGITS = 17
LATEST_US: int = 10**_DIGITS - 1  # a due time this late is never reached (year 5138)
# Entries of one listing kept in memory: the earliest, enough for a burst
# of due messages between two listings.
_KEEP = 1024


def delayed_name(name: str, due_us: int) -> str:
    """The name in ``delay/`` of ``name``, due at ``due_us``."""
    return f"{due_us:0{_DIGITS}d}.{name}"


def split(entry: str) -> tuple[int, str] | None:
    """``(due_us, name)`` of a ``delay/`` entry; None for anything else."""
    due = entry[:_DIGITS]
    # isascii(): isdigit() takes other scripts' digits, which int() refuses.
    if len(entry) > _DIGITS + 1 and entry[_DIGITS] == "." and due.isascii() and due.isdigit():
        return int(entry[:_DIGITS]), entry[_DIGITS + 1 :]
    return None


def backoff(base: float, cap: float, attempts: int) -> float:
    """The delay before attempt ``attempts`` + 1: ``base`` doubled per
    attempt after the first, at most ``cap``."""
    if attempts < 1 or base <= 0:
        return 0.0
    return float(min(cap, base * 2.0 ** min(attempts - 1, 64)))


class DueWatch:
    """What one process knows of a ``delay/`` directory.

    :param look: seconds between looks at the directory's modification time.
    :param relist: seconds after which it is listed again in any case.
    """

    def __init__(self, directory: str, look: float, relist: float) -> None:
        self._directory = directory
        self._look = look
        self._relist = relist
        self._next_look = 0.0  # time.monotonic() of the next look
        self._next_relist = 0.0
        self._seen: tuple[int, int, int] | None = None  # the listed directory
        # The earliest entries of the last listing, latest first: due ones
        # are popped from the end.
        self._entries: list[str] = []

    def due(self) -> list[str]:
        """The entries due now (by this host's wall clock), as far as this
        process knows; each is returned once.

        A ``delay/`` that is a symlink or a file is never followed: it holds
        nothing due.
        """
        now = time.monotonic()
        if now >= self._next_look:
            self._refresh(now)
        entries = self._entries
        if not entries:  # the common case: no clock read, nothing to do
            return []
        now_us = time.time_ns() // 1000
        found = []
        while entries and int(entries[-1][:_DIGITS]) <= now_us:
            found.append(entries.pop())
        return found

    def forget(self) -> None:
        """List the directory at the next look (it changed: the store was
        made anew, say)."""
        self._next_look = self._next_relist = 0.0
        self._seen = None

    def _refresh(self, now: float) -> None:
        self._next_look = now + self._look
        try:
            st = os.lstat(self._directory)
        except FileNotFoundError:
            self._entries, self._seen = [], None
            return
        if not stat.S_ISDIR(st.st_mode):
            # Never followed, and no reason to refuse claims of new/: a
            # delay/ planted as a symlink delays nothing.
            self._entries, self._seen = [], None
            return
        seen = (st.st_ino, st.st_mtime_ns, st.st_size)
        if seen == self._seen and now < self._next_relist:
            return
        try:
            names = os.listdir(self._directory)
        except FileNotFoundError:
            names = []
        names.sort()  # by due time: only the first few are looked at
        entries = []
        for name in names:
            if split(name) is not None:
                entries.append(name)
                if len(entries) == _KEEP:
                    break
        entries.reverse()
        self._entries, self._seen = entries, seen
        self._next_relist = now + self._relist
