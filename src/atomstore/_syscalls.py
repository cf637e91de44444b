"""The OS boundary: every call through which atomstore changes a filesystem.

Nothing else in the package opens a file for writing, writes, syncs, renames,
links, unlinks, creates or removes a directory, or changes modes and owners.
Keeping those calls in one place lets the tests record every one of them (to
enumerate what a crash may leave on disk) and inject faults (EIO from fsync,
ENOSPC from write, EINVAL from renameat2) without patching :mod:`os` itself.

A tracer installed with :func:`set_tracer` receives ``(name, func, *args,
**kwargs)`` and must return what ``func(*args, **kwargs)`` returns; it may call ``func``, raise
instead, or call it with changed arguments (a short write).  Without a tracer
each call costs one ``is None`` test over the bare ``os`` function.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

from . import _renameat2

Tracer = Callable[..., Any]

_tracer: Tracer | None = None

if sys.platform == "darwin":  # pragma: no cover - not tested on Linux CI
    import fcntl

    def _full_fsync(fd: int) -> None:
        # fsync() on macOS leaves data in the drive's cache; F_FULLFSYNC asks
        # the drive to flush it (fsync(2) on macOS).  Some filesystems refuse
        # it (ENOTSUP); plain fsync is then the best there is.
        try:
            fcntl.fcntl(fd, fcntl.F_FULLFSYNC)  # type: ignore[attr-defined]
        except OSError:
            os.fsync(fd)

    _fsync: Callable[[int], None] = _full_fsync
else:
    _fsync = os.fsync


def set_tracer(tracer: Tracer | None) -> Tracer | None:
    """Install ``tracer`` (or remove it with None); return the previous one."""
    global _tracer
    previous, _tracer = _tracer, tracer
    return previous


def open(path: str, flags: int, mode: int = 0o666, dir_fd: int | None = None) -> int:
    """Open ``path`` to create or write a file, or a directory to sync.

    Opens are recorded so that a tracer can tell which path a descriptor
    (and a ``dir_fd``) stands for.
    """
    if _tracer is not None:
        return int(_tracer("open", os.open, path, flags, mode, dir_fd=dir_fd))
    return os.open(path, flags, mode, dir_fd=dir_fd)


def write(fd: int, data: Any) -> int:
    """Write once to ``fd``; the count may be short, callers loop."""
    if _tracer is not None:
        return int(_tracer("write", os.write, fd, data))
    return os.write(fd, data)


def fsync(fd: int) -> None:
    """Flush ``fd``'s data and metadata to stable storage."""
    if _tracer is not None:
        _tracer("fsync", _fsync, fd)
        return
    _fsync(fd)


def close(fd: int) -> None:
    """Close ``fd``; not a change on disk, recorded to follow descriptors."""
    if _tracer is not None:
        _tracer("close", os.close, fd)
        return
    os.close(fd)


def fchmod(fd: int, mode: int) -> None:
    """Set the permission bits of the open file ``fd``."""
    if _tracer is not None:
        _tracer("fchmod", os.fchmod, fd, mode)
        return
    os.fchmod(fd, mode)


def fchown(fd: int, uid: int, gid: int) -> None:
    """Set the owner and group of the open file ``fd`` (-1 keeps one)."""
    if _tracer is not None:
        _tracer("fchown", os.fchown, fd, uid, gid)
        return
    os.fchown(fd, uid, gid)


def rename(src: str, dst: str) -> None:
    """rename(2): atomic, and replaces ``dst`` if it exists."""
    if _tracer is not None:
        _tracer("rename", os.rename, src, dst)
        return
    os.rename(src, dst)


def renameat2(src: str, dst: str, flags: int) -> None:
    """renameat2(2) with ``flags`` (RENAME_NOREPLACE, RENAME_EXCHANGE)."""
    if _tracer is not None:
        _tracer("renameat2", _renameat2.renameat2, src, dst, flags)
        return
    _renameat2.renameat2(src, dst, flags)


def link(src: str, dst: str) -> None:
    """link(2): a second name for ``src``; fails if ``dst`` exists."""
    if _tracer is not None:
        _tracer("link", os.link, src, dst)
        return
    os.link(src, dst)


def unlink(path: str, dir_fd: int | None = None) -> None:
    """Remove the name ``path`` (relative to ``dir_fd`` if given)."""
    if _tracer is not None:
        _tracer("unlink", os.unlink, path, dir_fd=dir_fd)
        return
    os.unlink(path, dir_fd=dir_fd)


def mkdir(path: str, mode: int = 0o777) -> None:
    """Create the directory ``path``."""
    if _tracer is not None:
        _tracer("mkdir", os.mkdir, path, mode)
        return
    os.mkdir(path, mode)


def rmdir(path: str, dir_fd: int | None = None) -> None:
    """Remove the empty directory ``path`` (relative to ``dir_fd`` if given)."""
    if _tracer is not None:
        _tracer("rmdir", os.rmdir, path, dir_fd=dir_fd)
        return
    os.rmdir(path, dir_fd=dir_fd)


def chmod(path: str, mode: int) -> None:
    """Set the permission bits of ``path`` (directories the store creates)."""
    if _tracer is not None:
        _tracer("chmod", os.chmod, path, mode)
        return
    os.chmod(path, mode)
