"""A FUSE passthrough for the filesystem tests, with switchable rename flags.

Run as ``python fuse_passthrough.py MODE SOURCE MOUNTPOINT [LOG]``: it
mounts SOURCE at MOUNTPOINT in the foreground until unmounted, and appends
to LOG one line per rename with flags that reached it: the flags and the
errno it answered (0 for success).  Plain renames always
pass through; a rename with flags (RENAME_NOREPLACE, RENAME_EXCHANGE) is
handled by MODE:

* ``honour``: passed to renameat2(2) on SOURCE, as a local filesystem does;
* ``einval``: refused with EINVAL, as NFS and many FUSE filesystems do;
* ``enosys``: refused with ENOSYS, which the kernel turns into EINVAL for
  the caller and remembers, asking no more (fs/fuse/dir.c, no_rename2);
* ``drop``: a plain rename that reports success, the bug the rename layer's
  probe must catch: the target is replaced, nothing is exchanged.

Built on libfuse 3 through mfusepy: only the FUSE 3 API carries the flags to
the filesystem (libfuse 2 makes the kernel refuse them first).  mfusepy 3.1
drops them on the way to ``Operations.rename``, so :class:`FlagsFUSE` passes
them on.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import sys
from typing import Any

# Before mfusepy loads a library: it prefers libfuse 2 when both are there.
os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")

import mfusepy  # type: ignore[import-untyped,import-not-found,unused-ignore]

MODES = ("honour", "einval", "enosys", "drop")

_AT_FDCWD = -100
_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)
_STAT_FIELDS = (
    "st_mode",
    "st_ino",
    "st_nlink",
    "st_uid",
    "st_gid",
    "st_size",
    "st_blocks",
    "st_rdev",
)
_STATVFS_FIELDS = (
    "f_bsize",
    "f_frsize",
    "f_blocks",
    "f_bfree",
    "f_bavail",
    "f_files",
    "f_ffree",
    "f_favail",
    "f_namemax",
)


def _renameat2(src: str, dst: str, flags: int) -> None:
    # glibc's wrapper; independent of atomstore's own binding under test.
    if _libc.renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), src)


class Passthrough(mfusepy.Operations):  # type: ignore[misc]
    """Every operation is done on the same path below ``root``."""

    use_ns = True  # times as integer nanoseconds, as os.stat gives them

    def __init__(self, root: str, mode: str, log: str | None = None) -> None:
        self.root = root
        self.mode = mode
        self.log = log

    def _path(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        st = os.fstat(fh) if fh is not None else os.lstat(self._path(path))
        attrs: dict[str, Any] = {key: getattr(st, key) for key in _STAT_FIELDS}
        attrs.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)
        return attrs

    def readdir(self, path: str, fh: int) -> list[tuple[str, dict[str, int], int]]:
        # With use_ino each entry needs its inode number: glibc's readdir()
        # skips entries whose d_ino is 0.
        entries = []
        with os.scandir(self._path(path)) as found:
            for entry in found:
                st = entry.stat(follow_symlinks=False)
                entries.append((entry.name, {"st_mode": st.st_mode, "st_ino": st.st_ino}, 0))
        return entries

    def readlink(self, path: str) -> str:
        return os.readlink(self._path(path))

    def mkdir(self, path: str, mode: int) -> int:
        os.mkdir(self._path(path), mode)
        return 0

    def rmdir(self, path: str) -> int:
        os.rmdir(self._path(path))
        return 0

    def unlink(self, path: str) -> int:
        os.unlink(self._path(path))
        return 0

    def symlink(self, target: str, source: str) -> int:
        os.symlink(source, self._path(target))
        return 0

    def link(self, target: str, source: str) -> int:
        os.link(self._path(source), self._path(target))
        return 0

    def rename(self, old: str, new: str, flags: int = 0) -> int:
        if not flags:
            os.rename(self._path(old), self._path(new))
            return 0
        try:
            self._rename_flagged(self._path(old), self._path(new), flags)
        except OSError as e:
            self._record(flags, e.errno or 0)
            raise
        self._record(flags, 0)
        return 0

    def _rename_flagged(self, src: str, dst: str, flags: int) -> None:
        if self.mode == "honour":
            _renameat2(src, dst, flags)
        elif self.mode == "drop":
            os.rename(src, dst)
        else:
            code = errno.EINVAL if self.mode == "einval" else errno.ENOSYS
            raise OSError(code, os.strerror(code))

    def _record(self, flags: int, code: int) -> None:
        if self.log is not None:
            fd = os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, f"{flags} {code}\n".encode())
            finally:
                os.close(fd)

    def chmod(self, path: str, mode: int) -> int:
        os.chmod(self._path(path), mode)
        return 0

    def chown(self, path: str, uid: int, gid: int) -> int:
        os.chown(self._path(path), uid, gid, follow_symlinks=False)
        return 0

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        os.truncate(fh if fh is not None else self._path(path), length)
        return 0

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        if times is None:
            os.utime(self._path(path), follow_symlinks=False)
        else:
            os.utime(self._path(path), ns=times, follow_symlinks=False)
        return 0

    def open(self, path: str, flags: int) -> int:
        return os.open(self._path(path), flags)

    def create(self, path: str, mode: int, flags: int) -> int:
        return os.open(self._path(path), flags | os.O_CREAT, mode)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return os.pread(fh, size, offset)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        return os.pwrite(fh, data, offset)

    def flush(self, path: str, fh: int) -> int:
        return 0

    def release(self, path: str, fh: int) -> int:
        os.close(fh)
        return 0

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        if datasync:
            os.fdatasync(fh)
        else:
            os.fsync(fh)
        return 0

    def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
        fd = os.open(self._path(path), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return 0

    def statfs(self, path: str) -> dict[str, int]:
        st = os.statvfs(self._path(path))
        return {key: getattr(st, key) for key in _STATVFS_FIELDS}


class FlagsFUSE(mfusepy.FUSE):  # type: ignore[misc]
    """mfusepy's FUSE, passing the rename flags on to the operations."""

    def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
        ops: Passthrough = self.operations
        decode = self.encoding, self.errors
        return ops.rename(old.decode(*decode), new.decode(*decode), flags)


def main(argv: list[str]) -> int:
    if len(argv) not in (3, 4) or argv[0] not in MODES:
        modes = ",".join(MODES)
        print(f"usage: fuse_passthrough.py {{{modes}}} SOURCE MOUNTPOINT [LOG]", file=sys.stderr)
        return 2
    mode, source, mountpoint = argv[:3]
    log = os.path.abspath(argv[3]) if len(argv) == 4 else None
    if mfusepy.fuse_version_major != 3:
        print("fuse_passthrough.py: libfuse 3 is needed for rename flags", file=sys.stderr)
        return 1
    # Never outlive the tests that started it: SIGTERM makes libfuse unmount
    # and return.
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    FlagsFUSE(
        Passthrough(os.path.abspath(source), mode, log),
        mountpoint,
        foreground=True,
        fsname=f"atomstore-{mode}",
        # Report the real inode numbers (link() and samestat() rely on them)
        # and unlink an open file at once instead of hiding it as
        # .fuse_hidden*, as a local filesystem does.
        use_ino=True,
        hard_remove=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
