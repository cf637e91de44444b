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
import sys
import time

from . import _log, _names, _syscalls, _tree, _watch
from ._renameat2 import RENAME_EXCHANGE, RENAME_NOREPLACE

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    from typing import Callable

    from ._rename import Capabilities

# The old new/ while it is emptied: hidden, beside the areas.
SHRINK_NAME = _names.OLD_NEW
# An empty new/ this large (sixteen ext4 blocks) is swapped: a look into it
# costs about 1.3x a fresh directory's; twice this, 2.3x.
SHRINK_FROM = 64 * 1024
# The old directory is removed once it has not changed for this long: a
# rename that looked it up as new/ just before the exchange has landed.
GRACE = 2.0

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
# Never blocks on a FIFO, never follows a symlink.
_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)

# Inode flags (chattr, <linux/fs.h>): FS_IOC_GETFLAGS and SETFLAGS take an
# int; FS_IOC_FSGETXATTR fills a struct fsxattr, the project id at byte 12.
_FS_IOC_GETFLAGS = 0x80086601
_FS_IOC_FSGETXATTR = 0x801C581F
# Flags the filesystem sets itself (htree index, extents, inline data,
# huge file, EA inode, EOF blocks, verity): not the user's to copy.
_FS_OWN_FLAGS = 0x1000 | 0x80000 | 0x10000000 | 0x40000 | 0x200000 | 0x400000 | 0x100000
_FS_FROZEN_FLAGS = 0x10 | 0x20  # immutable, append-only
# The exchange refused for good: new/ is a mount point (EBUSY, EXDEV), or
# the filesystem does not exchange after all.
_EXCHANGE_REFUSED = frozenset(
    {errno.EBUSY, errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}
)
# The filesystems whose directories never shrink (as mountinfo names them):
# only there is new/ swapped.  xfs, btrfs and tmpfs give back what emptied
# directories held.
NEVER_SHRINK = frozenset({"ext2", "ext3", "ext4"})

# new/ directories (device, inode) this process found it cannot swap: a
# mount point, a filesystem that refused the exchange after all.
_refused: set[tuple[int, int]] = set()
# The filesystem type of each device looked at (mountinfo's name).
_kinds: dict[int, str] = {}


def worth_it(new_dir: str, capabilities: Callable[[], Capabilities]) -> bool:
    """Whether the emptied ``new_dir`` is large enough, and this process may
    swap it (``capabilities`` asked only then)."""
    try:
        st = os.lstat(new_dir)
    except OSError:
        return False
    if st.st_size < SHRINK_FROM or st.st_uid != os.geteuid():
        return False
    if (st.st_dev, st.st_ino) in _refused:
        return False
    kind = _kinds.get(st.st_dev)
    if kind is None:
        kind = _kinds[st.st_dev] = _watch.filesystem_type(new_dir)
    if kind not in NEVER_SHRINK:
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
    except OSError as e:
        _remove_if_empty(hidden)
        if e.errno in _EXCHANGE_REFUSED:  # a mount point: never tried again here
            _refused.add((old.st_dev, old.st_ino))
        if e.errno != errno.ENOENT:
            _log.info("%s: kept, though emptied: %s", new_dir, e.strerror or e)
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


# What finish() found: nothing (or nothing of ours), an old new/ still
# settling (to be looked at after the grace period), or one holding entries
# that cannot be moved (to be looked at much later).
NONE, SETTLING, STUCK = "", "settling", "stuck"


def finish(root: str, new_dir: str, durable: bool) -> str:
    """Move back into ``new_dir`` what an old ``new/`` still holds, and
    remove it; only once it has not changed for :data:`GRACE` seconds, and
    only a directory of the owner of ``new/``.

    :returns: :data:`NONE`, :data:`SETTLING` or :data:`STUCK`.
    """
    found = _old_new(root, new_dir)
    if found is None:
        return NONE
    hidden, st = found
    age = time.time() - st.st_ctime
    if 0 <= age < GRACE or -1 < age < 0:
        # Being swapped right now: its consumer moves it back.  (Changed
        # more than a second in the future, the clock was set back.)
        return SETTLING
    moved = _move_back(hidden, new_dir, durable)
    if moved:
        _log.info("%s: %d entries moved back from an old new/", new_dir, moved)
    return NONE if _remove_if_empty(hidden) else STUCK


def _old_new(root: str, new_dir: str) -> tuple[str, os.stat_result] | None:
    """The old ``new/`` beside the areas, if there is one of the owner of
    ``new_dir``: anything else at its name is never followed nor emptied."""
    hidden = f"{root}/{SHRINK_NAME}"
    try:
        st = os.lstat(hidden)
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.lstat(new_dir).st_uid:
            return hidden, st
    except OSError:
        pass
    return None


def waiting_in_old_new(root: str, new_dir: str) -> list[str]:
    """The visible names an old ``new/`` still holds (none, usually: one
    ``lstat``)."""
    found = _old_new(root, new_dir)
    try:
        return [] if found is None else [n for n in os.listdir(found[0]) if n[:1] != "."]
    except OSError:
        return []


def _copy_metadata(new_dir: str, hidden: str, old: os.stat_result) -> None:
    """Make ``hidden`` the twin of ``new_dir``: group, extended attributes
    (ACLs, labels) and nothing more, inode flags, project, permissions.
    Raise if anything differs afterwards."""
    old_flags = _flags(new_dir)
    if old_flags & _FS_FROZEN_FLAGS:
        # An immutable or append-only new/ takes no message: nothing to
        # shrink, and a twin made so could not be removed after a failure.
        raise PermissionError(errno.EPERM, "immutable or append-only", new_dir)
    fd = _syscalls.open(hidden, _DIR_FLAGS)
    try:
        if os.fstat(fd).st_gid != old.st_gid:
            _syscalls.fchown(fd, -1, old.st_gid)
        wanted = {
            name: os.getxattr(new_dir, name, follow_symlinks=False) for name in _xattrs(new_dir)
        }
        for name in _xattrs(fd):
            if name not in wanted:  # inherited from the store's directory
                _syscalls.fremovexattr(fd, name)
        for name, value in wanted.items():
            if _xattr(fd, name) != value:  # a security label is given already
                _syscalls.fsetxattr(fd, name, value)
        fresh_flags = _flags(fd)
        if (old_flags ^ fresh_flags) & ~_FS_OWN_FLAGS:
            _syscalls.set_inode_flags(
                fd, (fresh_flags & _FS_OWN_FLAGS) | (old_flags & ~_FS_OWN_FLAGS)
            )
        _syscalls.fchmod(fd, stat.S_IMODE(old.st_mode))
        fresh = os.fstat(fd)
        differs = [
            what
            for what, same in (
                ("mode", stat.S_IMODE(fresh.st_mode) == stat.S_IMODE(old.st_mode)),
                ("group", fresh.st_gid == old.st_gid),
                ("attributes", {n: _xattr(fd, n) for n in _xattrs(fd)} == wanted),
                ("flags", not (_flags(fd) ^ old_flags) & ~_FS_OWN_FLAGS),
                ("project", _project(fd) == _project(new_dir)),
            )
            if not same
        ]
        if differs:
            raise PermissionError(errno.EPERM, f"{', '.join(differs)} not kept", hidden)
    finally:
        _syscalls.close(fd)


def _xattrs(path: str | int) -> list[str]:
    try:
        return (
            os.listxattr(path, follow_symlinks=False)
            if isinstance(path, str)
            else os.listxattr(path)
        )
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return []
        raise


def _xattr(fd: int, name: str) -> bytes | None:
    try:
        return os.getxattr(fd, name)
    except OSError:
        return None


def _flags(path: str | int) -> int:
    """The inode flags of a directory (0 where the filesystem has none)."""
    return int.from_bytes(_ioctl(path, _FS_IOC_GETFLAGS, 4), sys.byteorder)


def _project(path: str | int) -> int:
    """The project id of a directory (0 where the filesystem has none)."""
    return int.from_bytes(_ioctl(path, _FS_IOC_FSGETXATTR, 28)[12:16], sys.byteorder)


def _ioctl(path: str | int, request: int, size: int) -> bytes:
    import fcntl  # only for a swap: rare

    fd = os.open(path, _DIR_FLAGS) if isinstance(path, str) else path
    try:
        return bytes(fcntl.ioctl(fd, request, bytes(size)))
    except OSError as e:
        if e.errno in (errno.ENOTTY, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EINVAL):
            return bytes(size)
        raise
    finally:
        if isinstance(path, str):
            os.close(fd)


def _move_back(hidden: str, new_dir: str, durable: bool) -> int:
    """Move every entry of ``hidden`` into ``new_dir``, never replacing one.

    An entry that cannot be moved (a directory this process may not write,
    a mount point, another user's file in a sticky directory) stays, and
    with it the old directory: its owner's consumers move it later.
    """
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
                try:
                    _syscalls.renameat2(source, f"{new_dir}/{name}", RENAME_NOREPLACE)
                except FileExistsError:
                    _move_twice_named(source, new_dir, name)
            except FileNotFoundError:
                continue  # moved back by another consumer
            except OSError as e:
                _log.info("%s: cannot be moved back into %s: %s", source, new_dir, e.strerror or e)
                continue
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
    (a foreign producer's, named alike) is kept under a name of its own,
    made before its info part (``:2,...``), if any.
    """
    try:
        same = _same_message(source, f"{new_dir}/{name}")
    except FileNotFoundError:
        if not os.path.lexists(source):
            raise  # moved back by another consumer
        # The name in new/ was claimed meanwhile: it is free again.
        _syscalls.renameat2(source, f"{new_dir}/{name}", RENAME_NOREPLACE)
        return
    if same:
        _syscalls.unlink(source)
        return
    base, colon, info = name.partition(":")
    if len(os.fsencode(colon + info)) > 200:
        base, colon, info = name, "", ""  # no room to keep an info part
    for _ in range(100):
        suffix = f".{os.urandom(4).hex()}"
        cut = 255 - len(suffix) - len(os.fsencode(colon + info))
        target = os.fsdecode(os.fsencode(base)[:cut]) + suffix + colon + info
        try:
            _syscalls.renameat2(source, f"{new_dir}/{target}", RENAME_NOREPLACE)
        except FileExistsError:
            continue
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
