"""Waiting for a directory to gain entries, without busy polling.

On Linux an inotify watch (through ctypes: no dependency) wakes the waiter
when a name is created in or moved into the directory.  inotify sees only
changes made through this kernel: on a network or FUSE filesystem another
host's writes go unseen, so there the waiter also polls.  Where inotify is
missing (other systems, or the per-user instance limit is reached) it only
polls.

A waiter is stopped from any thread, or from a signal handler, by
:meth:`Waiter.stop`, which writes to a self-pipe the waiter selects on.
"""

from __future__ import annotations

import errno
import os
import re
import select
import sys
import threading
import time

from . import _log

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    from typing import Any, Callable

# <sys/inotify.h>
_IN_CREATE = 0x100
_IN_MOVED_TO = 0x80
# The watched directory itself renamed (exchanged for a fresh one) or removed.
_IN_MOVE_SELF = 0x800
_IN_DELETE_SELF = 0x400
_MASK = _IN_CREATE | _IN_MOVED_TO | _IN_MOVE_SELF | _IN_DELETE_SELF
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC

# Filesystems whose changes may come from another host (mount types as
# /proc/self/mountinfo names them); every FUSE filesystem is counted in.
_REMOTE_TYPES = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "ceph",
        "9p",
        "afs",
        "gfs2",
        "ocfs2",
        "lustre",
        "glusterfs",
        "beegfs",
        "gpfs",
        "fuse",
        "fuseblk",
    }
)


_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def _inotify() -> Any:
    if not sys.platform.startswith("linux"):
        return None  # pragma: no cover - Linux only
    import ctypes  # only for a waiter: its import costs every start-up

    libc = ctypes.CDLL(None, use_errno=True)
    try:
        libc.inotify_init1.argtypes = [ctypes.c_int]
        libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    except AttributeError:  # pragma: no cover - a C library without inotify
        return None
    return libc


# The C library with inotify, loaded by the first waiter (None: none here).
_UNLOADED: Any = object()
_libc: Any = _UNLOADED


def _inotify_lib() -> Any:
    global _libc
    if _libc is _UNLOADED:
        _libc = _inotify()
    return _libc


def filesystem_type(path: str) -> str:
    """The type of the filesystem mounted at ``path`` ("" if unknown)."""
    target = os.path.realpath(path)
    best, best_type = "", ""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                # "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw"
                fields, _, rest = line.partition(" - ")
                parts = fields.split()
                if len(parts) < 5 or not rest:
                    continue
                mount_point = _unescape(parts[4])
                inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
                if inside and len(mount_point) >= len(best):
                    best, best_type = mount_point, rest.split()[0]
    except OSError:  # pragma: no cover - no /proc
        return ""
    return best_type


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m[1], 8)), field)


def is_remote(path: str) -> bool:
    """Whether changes under ``path`` may come from another host."""
    kind = filesystem_type(path)
    return kind in _REMOTE_TYPES or kind.startswith("fuse.")


def is_remote_or_fuse(path: str) -> bool:
    """Whether ``path`` is on a network filesystem or a FUSE one of any kind."""
    kind = filesystem_type(path)
    return kind in _REMOTE_TYPES or kind.startswith("fuse")


# Directories whose polling waits were logged (once each).
_polling_said: set[str] = set()

# select(2) refuses a timeout beyond what a C long holds: a longer wait is
# made of waits this long.
_LONGEST_WAIT = 86400.0


class Waiter:
    """Wakes when names appear in ``directory``, a poll is due, or on stop.

    The path is looked at again every ``default_poll`` seconds at the most,
    and at once when inotify reports the watched directory renamed or
    removed: when it names another directory (the store was moved aside
    and made anew, or an emptied ``new/`` swapped for a fresh one), the
    waiter watches that one from then on.

    :param poll_interval: seconds between polls where inotify cannot see
        every change (None: only where needed, at ``default_poll``).
    :param settle: after the path named another directory, wake once more
        this many seconds later, whatever the poll interval (a swapped
        ``new/`` moves back what reached the old one by then).
    :param look_again_at: asked at each wait: a monotonic time to wake at
        in any case (None: no such time).
    """

    def __init__(
        self,
        directory: str,
        poll_interval: float | None,
        default_poll: float,
        settle: float | None = None,
        look_again_at: Callable[[], float | None] | None = None,
    ) -> None:
        self._read, self._write = os.pipe()  # not inherited by children
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._stopped = threading.Event()
        self._inotify = -1
        self._lock = threading.Lock()
        self._directory = directory
        self._settle = settle
        self._look_again_when = look_again_at
        self._asked_done: float | None = None
        self._look_again_at: float | None = None  # monotonic, after a swap
        self._identity = self._look()
        try:
            self._watch()
        except BaseException:
            self.close()
            raise
        if poll_interval is None and (self._inotify < 0 or is_remote(directory)):
            poll_interval = default_poll
            if directory not in _polling_said and _log.enabled(_log.INFO):
                _polling_said.add(directory)
                _log.info(
                    "%s: waiting polls every %s s (%s)",
                    directory,
                    poll_interval,
                    "no inotify" if self._inotify < 0 else "another host's changes go unseen",
                )
        self.poll_interval = poll_interval
        self._recheck = default_poll if poll_interval is None else poll_interval

    def _look(self) -> tuple[int, int] | None:
        """The identity of the directory the path names now (None: missing)."""
        try:
            st = os.stat(self._directory)
        except (FileNotFoundError, NotADirectoryError):
            return None
        return st.st_dev, st.st_ino

    def _watch(self) -> None:
        """Watch the directory the path names now (inotify where it can)."""
        libc = _inotify_lib()
        if libc is None:
            return  # pragma: no cover - Linux only
        fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            return
        wd = libc.inotify_add_watch(fd, os.fsencode(self._directory), _MASK)
        if wd < 0:
            import ctypes  # loaded with the library already

            code = ctypes.get_errno()
            os.close(fd)
            if code in (errno.ENOENT, errno.ENOTDIR):
                raise OSError(code, os.strerror(code), self._directory)
            return
        with self._lock:
            previous, self._inotify = self._inotify, fd
        if previous >= 0:
            os.close(previous)

    def _follow(self) -> None:
        """Watch the path's new directory if it names another one now."""
        identity = self._look()
        if identity is None or identity == self._identity:
            return
        try:
            self._watch()
        except OSError:
            return  # gone again meanwhile: the next look tries again
        self._identity = identity
        if self._settle is not None:
            self._look_again_at = time.monotonic() + self._settle

    @property
    def uses_inotify(self) -> bool:
        """Whether inotify wakes this waiter (else it only polls)."""
        return self._inotify >= 0

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def stop(self) -> None:
        """Wake the waiter for good; safe from other threads and signal handlers."""
        self._stopped.set()
        # Never block: a signal handler may interrupt close() in this thread.
        if self._lock.acquire(blocking=False):
            try:
                if self._write >= 0:
                    os.write(self._write, b"x")
            except OSError:  # the pipe is full: already woken
                pass
            finally:
                self._lock.release()

    def wait(self, timeout: float | None) -> None:
        """Return after a change, a poll interval, ``timeout`` or :meth:`stop`."""
        if self._stopped.is_set():
            return
        readable, _, _ = select.select(self.descriptors, [], [], self.longest_wait(timeout))
        self.woken(readable)

    def longest_wait(self, timeout: float | None) -> float:
        """How long a wait of at most ``timeout`` seconds may block."""
        # Never longer than the look at the path is due: a wait on a
        # directory that was moved aside would otherwise never end.
        timeout = self._recheck if timeout is None else min(timeout, self._recheck)
        now = time.monotonic()
        if self._look_again_at is not None:
            # Once more after a swap settled, whatever the poll interval.
            left = self._look_again_at - now
            if left <= 0:
                self._look_again_at = None
            timeout = min(timeout, max(left, 0.0))
        asked = None if self._look_again_when is None else self._look_again_when()
        if asked is not None and asked != self._asked_done:
            if asked <= now:
                self._asked_done = asked  # honoured once, not in a loop
            timeout = min(timeout, max(asked - now, 0.0))
        return min(timeout, _LONGEST_WAIT)

    def woken(self, readable: list[int]) -> None:
        """After a wait: empty what woke it, and follow the path."""
        for fd in readable:
            _drain(fd)
        self._follow()

    @property
    def descriptors(self) -> list[int]:
        """What a wait waits on: the stop pipe, and inotify's where it works."""
        return [self._read] + ([self._inotify] if self._inotify >= 0 else [])

    def close(self) -> None:
        """Release the descriptors."""
        with self._lock:
            for fd in (self._inotify, self._read, self._write):
                if fd >= 0:
                    os.close(fd)
            self._inotify = self._read = self._write = -1

    def __enter__(self) -> Waiter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass
