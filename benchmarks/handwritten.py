"""The baselines: the shortest correct sequences of ``os`` calls for each job.

They are what a careful programmer writes by hand, and what atomstore must
stay close to.  None of them handles errors, cleans up after a failure, keeps
a replaced file's mode or refuses to clobber; that is the work atomstore
adds, and its price is what the benchmarks measure.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import os
import shutil
import stat

FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_AT_FDCWD = -100

_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = _libc.renameat2
_renameat2.restype = ctypes.c_int
_renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]


def renameat2(src: str, dst: str, flags: int) -> None:
    """renameat2(2) through glibc (2.28 and later)."""
    if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), src, None, dst)


def sync_dir(path: str) -> None:
    fd = os.open(path, DIR_FLAGS)
    os.fsync(fd)
    os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    written = os.write(fd, data)
    while written < len(data):
        written += os.write(fd, data[written:])


def write_file(temp: str, dest: str, data: bytes, durable: bool, mode: int = 0o666) -> None:
    """Replace ``dest``: O_EXCL temp, write, [fsync], close, rename, [fsync dir]."""
    fd = os.open(temp, FILE_FLAGS, mode)
    write_all(fd, data)
    if durable:
        os.fsync(fd)
    os.close(fd)
    os.rename(temp, dest)
    if durable:
        sync_dir(os.path.dirname(dest))


def write_new_file(temp: str, dest: str, data: bytes, durable: bool) -> None:
    """Create ``dest``, never replacing it: as above, RENAME_NOREPLACE."""
    fd = os.open(temp, FILE_FLAGS, 0o666)
    write_all(fd, data)
    if durable:
        os.fsync(fd)
    os.close(fd)
    renameat2(temp, dest, RENAME_NOREPLACE)
    if durable:
        sync_dir(os.path.dirname(dest))


def write_new_unnamed(directory: str, dest: str, data: bytes, durable: bool) -> None:
    """Create ``dest``, never replacing it, with no temporary name: an
    unnamed file (O_TMPFILE) in its directory, written, then linked."""
    fd = os.open(directory, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o666)
    write_all(fd, data)
    if durable:
        os.fsync(fd)
    os.link(f"/proc/self/fd/{fd}", dest, src_dir_fd=fd, follow_symlinks=True)
    os.close(fd)
    if durable:
        sync_dir(directory)


def write_file_keeping_mode(temp: str, dest: str, data: bytes, durable: bool) -> None:
    """As :func:`write_file`, keeping ``dest``'s mode the cheapest way: its
    lstat, and the temp created in that mode (owner and umask left aside)."""
    try:
        mode = stat.S_IMODE(os.lstat(dest).st_mode)
    except FileNotFoundError:  # the first write
        mode = 0o666
    write_file(temp, dest, data, durable, mode)


def write_file_object(temp: str, dest: str, data: bytes, flags: int) -> None:
    """As :func:`write_file` with ``open()``'s file object (``'xb'``), as a
    caller writing through a file object does; ``flags``: 0 for a plain
    rename, ``RENAME_NOREPLACE`` for a new name."""
    with open(temp, "xb") as f:
        f.write(data)
    if flags:
        renameat2(temp, dest, flags)
    else:
        os.rename(temp, dest)


def write_tree(directory: str, count: int, data: bytes, fsync: bool) -> None:
    """The user's part of a folder replacement: ``count`` files in ``directory``.

    Every contender of the folder benchmark fills its staging directory with
    this; only the hand-written durable sequence passes ``fsync``, since it
    has no later pass that syncs the tree for it.
    """
    for i in range(count):
        fd = os.open(os.path.join(directory, f"f{i:03d}"), FILE_FLAGS, 0o666)
        write_all(fd, data)
        if fsync:
            os.fsync(fd)
        os.close(fd)


def write_tree_synced_late(directory: str, count: int, data: bytes) -> None:
    """Write all ``count`` files, keeping them open, then fsync and close each.

    Faster than an fsync per file as it is written: the filesystem gets all
    the data before the first flush and commits it in fewer journal
    transactions (ext4 here).
    """
    fds = []
    for i in range(count):
        fd = os.open(os.path.join(directory, f"f{i:03d}"), FILE_FLAGS, 0o666)
        write_all(fd, data)
        fds.append(fd)
    for fd in fds:
        os.fsync(fd)
        os.close(fd)


def replace_tree(
    dest: str, count: int, data: bytes, durable: bool, serial: int, sync_late: bool = False
) -> None:
    """Write a new tree beside ``dest``, exchange the two, remove the old."""
    parent = os.path.dirname(dest)
    staging = os.path.join(parent, f".{os.path.basename(dest)}.{serial}.new")
    os.mkdir(staging)
    if durable and sync_late:
        write_tree_synced_late(staging, count, data)
    else:
        write_tree(staging, count, data, durable)
    if durable:
        sync_dir(staging)
    renameat2(staging, dest, RENAME_EXCHANGE)
    if durable:
        sync_dir(parent)
    shutil.rmtree(staging)


class Spool:
    """A maildir-style queue over ``tmp/``, ``new/`` and ``cur/``, by hand.

    Unique names come from the pid and a counter (one process, one writer
    per name); a claim is a plain rename from ``new/`` to ``cur/`` of the
    oldest name, listed afresh for every claim.
    """

    def __init__(self, root: str, durable: bool) -> None:
        self.durable = durable
        self.tmp, self.new, self.cur = (os.path.join(root, a) for a in ("tmp", "new", "cur"))
        for area in (self.tmp, self.new, self.cur):
            os.makedirs(area, exist_ok=True)
        self._prefix = f"{os.getpid()}."
        self._counter = itertools.count()

    def add(self, data: bytes) -> str:
        name = f"{self._prefix}{next(self._counter):012d}"
        temp = os.path.join(self.tmp, name)
        fd = os.open(temp, FILE_FLAGS, 0o666)
        write_all(fd, data)
        if self.durable:
            os.fsync(fd)
        os.close(fd)
        os.rename(temp, os.path.join(self.new, name))
        if self.durable:
            sync_dir(self.new)
        return name

    def claim(self) -> str | None:
        """Move the oldest message into ``cur/``; return its path there."""
        while True:
            names = os.listdir(self.new)
            if not names:
                return None
            name = min(names)
            claimed = os.path.join(self.cur, name)
            try:
                os.rename(os.path.join(self.new, name), claimed)
            except FileNotFoundError:
                continue  # another consumer was faster
            if self.durable:
                sync_dir(self.cur)
                sync_dir(self.new)
            return claimed

    def finish(self, claimed: str) -> None:
        os.unlink(claimed)
        if self.durable:
            sync_dir(self.cur)


class CheckedSpool(Spool):
    """:class:`Spool` with what atomstore's safety costs at the least: a
    message written with no name (O_TMPFILE) in ``new/``, linked, whose
    open refuses a symlinked ``new/``; an ``lstat`` of each area a claim,
    a read and a finish use, that none is a symlink."""

    def add(self, data: bytes) -> str:
        name = f"{self._prefix}{next(self._counter):012d}"
        flags = os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW
        fd = os.open(self.new, flags, 0o666)
        write_all(fd, data)
        if self.durable:
            os.fsync(fd)
        os.link(f"/proc/self/fd/{fd}", f"{self.new}/{name}", src_dir_fd=fd, follow_symlinks=True)
        os.close(fd)
        if self.durable:
            sync_dir(self.new)
        return name

    def claim(self) -> str | None:
        _is_directory(self.new)
        _is_directory(self.cur)
        return super().claim()

    def read(self, claimed: str) -> bytes:
        _is_directory(self.cur)
        return read_file(claimed)

    def finish(self, claimed: str) -> None:
        _is_directory(self.cur)
        super().finish(claimed)


def _is_directory(path: str) -> None:
    if not stat.S_ISDIR(os.lstat(path).st_mode):
        raise NotADirectoryError(path)


def read_file(path: str) -> bytes:
    fd = os.open(path, READ_FLAGS)
    chunks = []
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


def listing_is(directory: str, expected: set[str]) -> None:
    """Raise unless ``directory`` holds exactly ``expected`` (nothing left over)."""
    found = set(os.listdir(directory))
    if found != expected:
        raise AssertionError(f"{directory} holds {sorted(found)}, expected {sorted(expected)}")


def same_content(path: str, data: bytes) -> None:
    content = read_file(path)
    if content != data:
        raise AssertionError(f"{path} holds {len(content)} bytes, not the {len(data)} written")


def remove_all(directory: str, keep: set[str] | frozenset[str] = frozenset()) -> None:
    """Empty ``directory`` except ``keep`` (untimed housekeeping)."""
    for name in os.listdir(directory):
        if name in keep:
            continue
        path = os.path.join(directory, name)
        try:
            os.unlink(path)
        except IsADirectoryError:
            shutil.rmtree(path)
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise
