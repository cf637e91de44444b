"""Syncing and removing directory trees, never following a symlink.

Both walk with directory descriptors (``openat`` with O_NOFOLLOW), so a
directory swapped for a symlink while the walk runs makes it fail instead of
leading it out of the tree.
"""

from __future__ import annotations

import errno
import os

from . import _names, _syscalls

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    from typing import Callable, TypeVar

    T = TypeVar("T")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
# A directory named by the caller is resolved as open() resolves it: a
# symlink in its path, the last component included (``~/.config`` linked to
# a dotfiles repository), is followed.  Only entries found by a walk are not.
_NAMED_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_SYNC_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)


def sync_dir(path: str) -> None:
    """fsync the directory ``path``, making its entries durable.

    For a store's ``new/``, an old ``new/`` being emptied beside it after a
    swap (``_names.OLD_NEW``) is synced too: a rename or link that looked
    up ``new/`` just before the swap put its entry there.
    """
    fd = _syscalls.open(path, _NAMED_DIR_FLAGS)
    try:
        _syscalls.fsync(fd)
    finally:
        _syscalls.close(fd)
    if path.endswith("/new"):
        old = f"{path[:-3]}{_names.OLD_NEW}"
        try:
            fd = _syscalls.open(old, _DIR_FLAGS)
        except OSError:
            return  # none (the usual case), or not one to follow
        try:
            _syscalls.fsync(fd)
        finally:
            _syscalls.close(fd)


def retried(call: Callable[[], T], dst: str, src: str | None = None) -> T:
    """``call()``, tried up to twice more when it fails with ENOENT while
    the directory of ``dst`` (and ``src``, if given) is still there: the
    directory it looked up was removed as the path came to name another
    (an emptied ``new/`` swapped for a fresh one, see ``_shrink``)."""
    for tries_left in (2, 1, 0):
        try:
            return call()
        except FileNotFoundError:
            if not tries_left or not os.path.isdir(os.path.dirname(dst) or "."):
                raise
            if src is not None and not os.path.lexists(src):
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def sync_tree(path: str) -> int:
    """fsync every regular file and directory below and including ``path``.

    Children are synced before their parent.  Symlinks and special files are
    not opened: their directory entries are made durable with the directory.

    :returns: the number of fsync calls made.
    """
    fd = _syscalls.open(path, _DIR_FLAGS)
    try:
        return _sync_contents(fd)
    finally:
        _syscalls.close(fd)


def _sync_contents(dir_fd: int) -> int:
    count = 0
    with os.scandir(dir_fd) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                flags = _DIR_FLAGS
            elif entry.is_file(follow_symlinks=False):
                flags = _SYNC_FLAGS
            else:
                continue
            fd = _syscalls.open(entry.name, flags, dir_fd=dir_fd)
            try:
                if flags == _DIR_FLAGS:
                    count += _sync_contents(fd)
                else:
                    _syscalls.fsync(fd)
                    count += 1
            finally:
                _syscalls.close(fd)
    _syscalls.fsync(dir_fd)
    return count + 1


def remove_tree(path: str) -> None:
    """Remove ``path`` and, if it is a directory, everything below it.

    Entries that vanish meanwhile are ignored: another cleaner may be at work.
    """
    parent, name = os.path.split(path)
    fd = _syscalls.open(parent or ".", _NAMED_DIR_FLAGS)
    try:
        _remove_entry(fd, name)
    finally:
        _syscalls.close(fd)


def _remove_entry(dir_fd: int, name: str) -> None:
    try:
        _syscalls.unlink(name, dir_fd=dir_fd)
        return
    except FileNotFoundError:
        return
    except OSError as e:
        # unlink(2) of a directory: EISDIR on Linux, EPERM in POSIX.
        if e.errno not in (errno.EISDIR, errno.EPERM):
            raise
        refused = e
    try:
        fd = _syscalls.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    except OSError as e:
        if e.errno in (errno.ENOTDIR, errno.ELOOP):
            raise refused from None  # not a directory after all: keep unlink's error
        raise
    try:
        for child in os.listdir(fd):
            _remove_entry(fd, child)
    finally:
        _syscalls.close(fd)
    try:
        _syscalls.rmdir(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def unlink_quietly(path: str) -> None:
    """Remove the file ``path`` if it is there; errors are ignored (a
    cleanup path)."""
    try:
        _syscalls.unlink(path)
    except OSError:
        pass


def remove_quietly(path: str) -> None:
    """:func:`remove_tree`, errors ignored: what stays keeps its staging
    name, for clean()."""
    try:
        remove_tree(path)
    except OSError:
        pass


def remove_surely(path: str) -> None:
    """:func:`remove_quietly`, finished even when interrupted (and the
    interruption raised again): a tree half removed is no tree to leave."""
    try:
        remove_quietly(path)
    except BaseException:
        remove_quietly(path)
        raise
