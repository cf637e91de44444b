"""Giving a store a small ``new/`` again after a large backlog drained.

ext4 never shrinks a directory: after a million messages passed through
``new/``, every look into the emptied directory still reads all the blocks
the million names took (26 ms a look, against 5 µs for a fresh one), and a
waiting consumer looks at every wake-up.  So a consumer that finds ``new/``
empty but large swaps it for a fresh directory:

1. ``mkdir`` of :data:`SHRINK_NAME` beside the areas, with the mode, group
   and extended attributes of ``new/`` (only the owner of ``new/`` swaps it,
   and only where all of that could be copied);
2. ``renameat2(RENAME_EXCHANGE)`` of the two names: ``new/`` is the fresh
   directory from then on, the old one sits at :data:`SHRINK_NAME`;
3. whatever is in the old directory goes back into ``new/`` (a producer's
   rename that looked up ``new/`` before the exchange lands in the old
   directory), each entry with a no-clobber rename.

The old directory is removed by whoever lists ``new/`` once it has not
changed for :data:`GRACE` seconds (:func:`finish`), after moving back what
reached it meanwhile: ``rmdir`` refuses a directory that is not empty, so
nothing in it can be lost, and a rename into a removed directory fails
(ENOENT) rather than vanishing.  A consumer killed between two steps leaves
the same: the next listing finishes its work.

Only where ``RENAME_EXCHANGE`` is honoured (ext4, xfs, btrfs, tmpfs):
without it ``new/`` would be missing for a moment, so on network and FUSE
filesystems ``new/`` stays as it is.
"""

from __future__ import annotations

import errno
import os
import stat
import time

from . import _log, _syscalls, _tree
from ._renameat2 import RENAME_EXCHANGE, RENAME_NOREPLACE

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    from typing import Callable

    from ._rename import Capabilities

# The old new/ while it is emptied: hidden, beside the areas.
SHRINK_NAME = ".new.atomstore-shrink"
# An empty new/ this large (sixteen ext4 blocks) is swapped: a look into it
# costs about 1.3x a fresh directory's; twice this, 2.3x.
SHRINK_FROM = 64 * 1024
# The old directory is removed once it has not changed for this long: a
# rename that looked it up as new/ just before the exchange has landed.
GRACE = 2.0

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
# Never blocks on a FIFO, never follows a symlink.
_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)


def worth_it(new_dir: str, capabilities: Callable[[], Capabilities]) -> bool:
    """Whether the emptied ``new_dir`` is large enough, and this process may
    swap it (``capabilities`` asked only then)."""
    try:
        st = os.lstat(new_dir)
    except OSError:
        return False
    if st.st_size < SHRINK_FROM or st.st_uid != os.geteuid():
        return False
    caps = capabilities()
    return caps.exchange and caps.probed


def shrink(root: str, new_dir: str, durable: bool) -> bool:
    """Swap the emptied ``new_dir`` for a fresh directory.

    :returns: whether it was swapped (False: another consumer is at it, or
        the fresh directory could not be made exactly like the old one).
    """
    hidden = f"{root}/{SHRINK_NAME}"
    try:
        old = os.lstat(new_dir)
        _syscalls.mkdir(hidden, 0o700)
    except OSError:
        return False  # FileExistsError: another consumer swaps it now
    try:
        _copy_metadata(new_dir, hidden, old)
        _syscalls.renameat2(hidden, new_dir, RENAME_EXCHANGE)
    except OSError:
        _remove_if_empty(hidden)
        return False
    if durable:
        _tree.sync_dir(root)
    moved = _move_back(hidden, new_dir, durable)
    _log.info(
        "%s: emptied, %d bytes of directory: swapped for a fresh one (%d entries moved back)",
        new_dir,
        old.st_size,
        moved,
    )
    return True


def finish(root: str, new_dir: str, durable: bool, grace: float | None = None) -> bool:
    """Move back into ``new_dir`` what an old ``new/`` still holds, and
    remove it; only once it has not changed for ``grace`` seconds
    (:data:`GRACE` by default).

    :returns: whether an old ``new/`` is still there (being swapped, or
        not empty yet).
    """
    hidden = f"{root}/{SHRINK_NAME}"
    try:
        st = os.lstat(hidden)
    except OSError:
        return False
    if not stat.S_ISDIR(st.st_mode):
        return False  # not one of ours: never followed, never removed
    if st.st_ctime > time.time() - (GRACE if grace is None else grace):
        return True  # being swapped right now: its consumer moves it back
    moved = _move_back(hidden, new_dir, durable)
    if moved:
        _log.info("%s: %d entries moved back from an old new/", new_dir, moved)
    return not _remove_if_empty(hidden)


def _copy_metadata(new_dir: str, hidden: str, old: os.stat_result) -> None:
    """Give ``hidden`` the permissions, group and extended attributes of
    ``new_dir``; raise if anything could not be copied."""
    fd = _syscalls.open(hidden, _DIR_FLAGS)
    try:
        fresh = os.fstat(fd)
        if fresh.st_gid != old.st_gid:
            _syscalls.fchown(fd, -1, old.st_gid)
        _syscalls.fchmod(fd, stat.S_IMODE(old.st_mode))
        for name in _xattrs(new_dir):
            value = os.getxattr(new_dir, name, follow_symlinks=False)
            try:
                if os.getxattr(fd, name) == value:
                    continue  # given already (a security label, say)
            except OSError:
                pass
            _syscalls.fsetxattr(fd, name, value)
        if stat.S_IMODE(os.fstat(fd).st_mode) != stat.S_IMODE(old.st_mode):
            raise PermissionError(errno.EPERM, "mode not kept", hidden)
    finally:
        _syscalls.close(fd)


def _xattrs(path: str) -> list[str]:
    try:
        return os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return []
        raise


def _move_back(hidden: str, new_dir: str, durable: bool) -> int:
    """Move every entry of ``hidden`` into ``new_dir``, never replacing one."""
    try:
        fd = _syscalls.open(hidden, _DIR_FLAGS)
    except OSError:
        return 0  # removed meanwhile by another consumer, or not a directory
    moved = 0
    try:
        with os.scandir(fd) as entries:
            names = [entry.name for entry in entries]
        for name in names:
            source = f"{hidden}/{name}"
            try:
                _syscalls.renameat2(source, f"{new_dir}/{name}", RENAME_NOREPLACE)
            except FileNotFoundError:
                continue  # moved back by another consumer
            except FileExistsError:
                _move_twice_named(source, new_dir, name)
            moved += 1
        if moved and durable:
            _tree.sync_dir(new_dir)
            _syscalls.fsync(fd)
    finally:
        _syscalls.close(fd)
    return moved


def _move_twice_named(source: str, new_dir: str, name: str) -> None:
    """Move back ``source``, whose name ``new_dir`` holds already.

    The same message under both names (a crash kept both entries of a
    rename between two directories) loses the old directory's; another file
    (a foreign producer's, named alike) is kept under a name of its own.
    """
    try:
        if _same_message(source, f"{new_dir}/{name}"):
            _syscalls.unlink(source)
            return
    except FileNotFoundError:
        return  # moved meanwhile by another consumer: it looks again
    for _ in range(100):
        suffix = f".{os.urandom(4).hex()}"
        target = os.fsdecode(os.fsencode(name)[: 255 - len(suffix)]) + suffix
        try:
            _syscalls.renameat2(source, f"{new_dir}/{target}", RENAME_NOREPLACE)
        except FileExistsError:
            continue
        except FileNotFoundError:
            return
        return


def _same_message(a: str, b: str) -> bool:
    """Whether the regular files ``a`` and ``b`` are one file, or hold the
    same bytes (a message's name is its identity: the same name and bytes
    are the same message)."""
    sa, sb = os.lstat(a), os.lstat(b)
    if os.path.samestat(sa, sb):
        return True
    if not (stat.S_ISREG(sa.st_mode) and stat.S_ISREG(sb.st_mode)) or sa.st_size != sb.st_size:
        return False
    fa = os.open(a, _READ_FLAGS)
    try:
        fb = os.open(b, _READ_FLAGS)
        try:
            if not (stat.S_ISREG(os.fstat(fa).st_mode) and stat.S_ISREG(os.fstat(fb).st_mode)):
                return False  # swapped meanwhile for something else
            while True:
                chunk = os.read(fa, 1 << 16)
                if chunk != os.read(fb, 1 << 16):
                    return False
                if not chunk:
                    return True
        finally:
            os.close(fb)
    finally:
        os.close(fa)


def _remove_if_empty(hidden: str) -> bool:
    """Remove ``hidden`` if it is empty; return whether it is gone."""
    try:
        _syscalls.rmdir(hidden)
    except FileNotFoundError:
        return True  # removed by another consumer
    except OSError:
        return False  # not empty: finished at a later listing
    return True
