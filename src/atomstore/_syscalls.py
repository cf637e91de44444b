"""The OS boundary: every call through which atomstore changes a filesystem.

Nothing else in the package opens a file for writing, writes, syncs, renames,
links, unlinks, creates or removes a directory, or changes modes and owners.
Keeping those calls in one place lets the tests record every one of them (to
enumerate what a crash may leave on disk) and inject faults (EIO from fsync,
ENOSPC from write, EINVAL from renameat2) without patching :mod:`os` itself.

A tracer installed with :func:`set_tracer` receives ``(name, func, *args,
**kwargs)`` and must return what ``func(*args, **kwargs)`` returns; it may
call ``func``, raise instead, or call it with changed arguments (a short
write).  Without a tracer the names below are the bare ``os`` functions, so
the boundary costs nothing.
"""

from __future__ import annotations

import os
import sys

from . import _renameat2

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    from typing import Any, Callable

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


# Whether /proc/self/fd is there to link an open file through (None: not
# looked yet).  A path, looked up afresh at each call, never a cached
# descriptor: a descriptor number can be closed and reused by the
# application, a forked child would see its parent's table through it.
_proc_fd_dir: bool | None = None


def can_link_fd() -> bool:
    """Whether :func:`link_fd` can work here (a /proc to link through)."""
    global _proc_fd_dir
    if _proc_fd_dir is None:
        _proc_fd_dir = os.path.isdir("/proc/self/fd")
    return _proc_fd_dir


def _link_fd(fd: int, dst: str) -> None:
    """Give the open file ``fd`` the name ``dst``: linkat(2) of
    /proc/self/fd/N with AT_SYMLINK_FOLLOW (open(2), "O_TMPFILE").  Never
    replaces (EEXIST).

    ``src_dir_fd`` only makes os.link() call linkat() with the flag: the
    kernel ignores it for an absolute path.
    """
    os.link(f"/proc/self/fd/{fd}", dst, src_dir_fd=fd, follow_symlinks=True)


def _fsetxattr(fd: int, name: str, value: bytes) -> None:
    """Set the extended attribute ``name`` of the open file ``fd``."""
    os.setxattr(fd, name, value)  # Linux only: os has no setxattr elsewhere


def _fremovexattr(fd: int, name: str) -> None:
    """Remove the extended attribute ``name`` of the open file ``fd``."""
    os.removexattr(fd, name)


def _set_inode_flags(fd: int, flags: int) -> None:
    """Set the inode flags (chattr) of the open file ``fd``: FS_IOC_SETFLAGS."""
    import fcntl  # rare: only where a directory's twin is made

    fcntl.ioctl(fd, 0x40086602, flags.to_bytes(4, sys.byteorder))  # FS_IOC_SETFLAGS


# The calls, by the names tracers see.  ``open`` is used to create or write a
# file, and to open a directory to sync (so that a tracer can tell which path
# a descriptor and a ``dir_fd`` stand for); ``write`` writes once, and the
# count may be short: callers loop.  ``close`` changes nothing on disk and is
# there to follow descriptors.
_CALLS: dict[str, Callable[..., Any]] = {
    "open": os.open,
    "write": os.write,
    "fsync": _fsync,
    "close": os.close,
    "fchmod": os.fchmod,
    "fchown": os.fchown,
    "fsetxattr": _fsetxattr,
    "fremovexattr": _fremovexattr,
    "set_inode_flags": _set_inode_flags,
    "rename": os.rename,
    "renameat2": _renameat2.renameat2,
    "link": os.link,
    "link_fd": _link_fd,
    "unlink": os.unlink,
    "mkdir": os.mkdir,
    "rmdir": os.rmdir,
    "chmod": os.chmod,
    "utime": os.utime,
}

open: Callable[..., int] = os.open
write: Callable[[int, Any], int] = os.write
fsync: Callable[[int], None] = _fsync
close: Callable[[int], None] = os.close
fchmod: Callable[[int, int], None] = os.fchmod
fchown: Callable[[int, int, int], None] = os.fchown
fsetxattr: Callable[[int, str, bytes], None] = _fsetxattr
fremovexattr: Callable[[int, str], None] = _fremovexattr
set_inode_flags: Callable[[int, int], None] = _set_inode_flags
rename: Callable[[str, str], None] = os.rename
renameat2: Callable[[str, str, int], None] = _renameat2.renameat2
link: Callable[[str, str], None] = os.link
link_fd: Callable[[int, str], None] = _link_fd
unlink: Callable[..., None] = os.unlink
mkdir: Callable[..., None] = os.mkdir
rmdir: Callable[..., None] = os.rmdir
chmod: Callable[[str, int], None] = os.chmod
utime: Callable[..., None] = os.utime


def set_tracer(tracer: Tracer | None) -> Tracer | None:
    """Install ``tracer`` (or remove it with None); return the previous one."""
    global _tracer
    previous, _tracer = _tracer, tracer
    namespace = globals()
    for name, func in _CALLS.items():
        namespace[name] = func if tracer is None else _traced(name, func)
    return previous


def _traced(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        tracer = _tracer
        if tracer is None:  # removed meanwhile, by another thread
            return func(*args, **kwargs)
        return tracer(name, func, *args, **kwargs)

    return call
