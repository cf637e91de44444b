"""The rename layer: no-clobber rename and exchange, with fallbacks.

What a filesystem supports is probed once per device (``st_dev``) per
process, in a hidden scratch directory, and cached.  The probe also catches
filesystems that accept the renameat2 flags but silently ignore them (a
libfuse 3 passthrough returns 0 for RENAME_NOREPLACE and overwrites the
target): those are treated as not supporting the flags at all, so a flag that
would be dropped is never passed to them.

Fallbacks, in order:

* no-clobber rename: ``link(src, dst)`` then ``unlink(src)``; where links are
  refused (EPERM on some FUSE and shared folders, and always for
  directories), a check that ``dst`` is absent followed by a plain rename.
  That last resort can clobber a name created between the check and the
  rename; callers that make unique names are not affected.
* exchange: none.  :func:`exchange` raises and the caller decides.
"""

from __future__ import annotations

import errno
import os
import select
import threading
import time

from . import _log, _names, _renameat2, _syscalls, _tree
from ._renameat2 import RENAME_EXCHANGE, RENAME_NOREPLACE

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    from typing import Callable

# renameat2 flags unsupported: EINVAL (FUSE, NFS, ZFS < 2.2, or a kernel that
# rejects the flag), ENOSYS (old kernel, seccomp), EOPNOTSUPP.
_FLAGS_REFUSED = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP})
# link(2) refused by the filesystem rather than failing for this one call.
_LINK_REFUSED = frozenset(
    {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK}
)

# The errors that leave a call's outcome unknown (a reply lost on the way, a
# connection gone, GlusterFS's answer to a link whose source another host
# removes meanwhile); any other is a refusal.
UNKNOWN_OUTCOME = frozenset(
    getattr(errno, code)
    for code in (
        "EIO",
        "ETIMEDOUT",
        "ESTALE",
        "ECONNRESET",
        "ECONNABORTED",
        "ENOTCONN",
        "ESHUTDOWN",
        "EREMOTEIO",
        "ECOMM",
        "EPROTO",
    )
    if hasattr(errno, code)
)
# How long a link answered EIO that made nothing is tried again, and the
# pauses between: GlusterFS answered EIO for 1.2 s while another host
# removed the source.
_RELINK_FOR = 2.5
_RELINK_PAUSES = (0.01, 0.04, 0.1, 0.25, 0.6, 1.0)
# A plain rename onto a name made since it was checked, as servers (and
# rename(2): a directory onto a file is ENOTDIR) refuse it.
_TAKEN_MEANWHILE = frozenset(
    {errno.EPERM, errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR}
)
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)


class Capabilities:
    """What the filesystem holding a path supports, as probed.

    :ivar noreplace: a rename that refuses to replace (RENAME_NOREPLACE) is
        honoured.
    :ivar exchange: an atomic exchange of two names (RENAME_EXCHANGE) is
        honoured.
    :ivar hardlinks: ``link()`` works, so a no-clobber rename can fall back to
        link and unlink.
    :ivar ignores_flags: the filesystem reported success for a flagged rename
        but ignored the flag; atomstore never passes it flags.
    :ivar probed: the answer comes from a probe on this filesystem.  False
        where no probe could run (a read-only mount, a directory the process
        may not write): the answer is then assumed, not cached, and every
        operation tries the native call and falls back on its error.
    """

    # A plain class, not a dataclass: importing dataclasses costs the
    # command line more than the rest of its start-up.
    __slots__ = ("exchange", "hardlinks", "ignores_flags", "noreplace", "probed")
    _FIELDS = ("noreplace", "exchange", "hardlinks", "ignores_flags", "probed")

    noreplace: bool
    exchange: bool
    hardlinks: bool
    ignores_flags: bool
    probed: bool

    def __init__(
        self,
        noreplace: bool,
        exchange: bool,
        hardlinks: bool,
        ignores_flags: bool = False,
        probed: bool = True,
    ) -> None:
        for name, value in zip(
            self._FIELDS, (noreplace, exchange, hardlinks, ignores_flags, probed)
        ):
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r}: Capabilities are frozen")

    def _values(self) -> tuple[bool, ...]:
        return tuple(getattr(self, name) for name in self._FIELDS)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Capabilities):
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._FIELDS)
        return f"Capabilities({fields})"


# Used where no probe could run (no write permission), and not cached: try
# the native call and fall back on its error.
_ASSUMED = Capabilities(noreplace=True, exchange=True, hardlinks=True, probed=False)
_ASSUMED_WITHOUT_RENAMEAT2 = Capabilities(
    noreplace=False, exchange=False, hardlinks=True, probed=False
)

_cache: dict[int, Capabilities] = {}
_lock = threading.Lock()


class _MountWatch:
    """Tells whether the mount table changed since it last looked.

    The kernel gives a freed device number to the next mount, which may be
    another filesystem: a cached answer must not outlive its mount.
    /proc/self/mountinfo reports every mount and unmount of the process's
    mount namespace as a priority event to poll(2) (proc(5)), at the cost of
    one non-blocking poll per look.
    """

    def __init__(self) -> None:
        self._fd = -1
        self._unwatchable = False

    def changed(self) -> bool:
        # select(), not a shared select.poll object: threads look at once,
        # and poll objects refuse concurrent use (RuntimeError).  POLLPRI is
        # select's "exceptional condition".
        fd = self._fd
        if fd >= 0:
            return bool(select.select((), (), (fd,), 0)[2])
        if self._unwatchable:  # pragma: no cover - no /proc
            return False
        try:
            fd = os.open("/proc/self/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:  # pragma: no cover - no /proc: nothing to watch
            self._unwatchable = True
            return False
        with _lock:
            if self._fd < 0:
                self._fd, fd = fd, -1
        if fd >= 0:
            os.close(fd)  # another thread opened it first
        return False  # nothing is cached before the first look (forget())

    def reset(self) -> None:
        """Stop watching; the next look starts afresh."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


_mounts = _MountWatch()
_mount_change_hooks: list[Callable[[], object]] = []


def on_mount_change(hook: Callable[[], object]) -> None:
    """Call ``hook`` when a look finds the mount table changed: another
    layer's answers, cached by device number, are forgotten with these."""
    _mount_change_hooks.append(hook)


def forget() -> None:
    """Forget every probed answer, and watch the mount table afresh.

    For a process that forked (a child must not consume its parent's mount
    events: they share the open file) or a thread that moved to another mount
    namespace.
    """
    global _lock
    # A thread of the parent may have held the lock while another forked:
    # the child's copy would stay locked for ever.
    _lock = threading.Lock()
    _mounts.reset()
    _cache.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=forget)


def capabilities(directory: str, device: int | None = None) -> Capabilities:
    """The capabilities of the filesystem of ``directory`` (probed once)."""
    if device is None:
        device = os.stat(directory).st_dev
    if _mounts.changed():
        _cache.clear()
        for forget_answer in _mount_change_hooks:
            forget_answer()
    caps = _cache.get(device)
    if caps is not None:
        return caps
    with _lock:
        caps = _cache.get(device)
        if caps is not None:
            return caps
        probed = _probe(directory)
        if probed is not None:
            _cache[device] = probed
    # Logged once the lock is let go: a handler may use atomstore itself.
    if probed is None:
        _log.debug(
            "%s: no probe could run (not writable): renameat2 flags tried, "
            "falling back on their error",
            directory,
        )
        return _ASSUMED if _renameat2.available() else _ASSUMED_WITHOUT_RENAMEAT2
    if _log.enabled(_log.INFO):
        _log.info("%s: %s", directory, describe(probed))
    return probed


def describe(caps: Capabilities) -> str:
    """What ``caps`` make atomstore do, in words (for the log)."""
    if caps.noreplace and caps.exchange:
        return "renameat2 flags honoured: no-clobber renames and exchanges are native"
    if caps.noreplace:
        return (
            "no RENAME_EXCHANGE: no-clobber renames are native, a folder is replaced "
            "by moving the old tree aside"
        )
    what = (
        "accepts renameat2 flags but ignores them, so it never gets any"
        if caps.ignores_flags
        else "no renameat2 flags"
    )
    how = (
        "link then unlink"
        if caps.hardlinks
        else "a check then a plain rename (a name made meanwhile can be replaced)"
    )
    return f"{what}: no-clobber renames by {how}, a folder is replaced by moving the old tree aside"


def _write_small(path: str, data: bytes) -> None:
    fd = _syscalls.open(path, _FILE_FLAGS, 0o600)
    try:
        _syscalls.write(fd, data)
    finally:
        _syscalls.close(fd)


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _probe(directory: str) -> Capabilities | None:
    """Probe in a scratch directory; None where none can be made or used."""
    scratch: str | None = os.path.join(directory, _names.staging_name("probe", "tmp"))
    assert scratch is not None
    # One try from before the directory exists: interrupted anywhere, the
    # probe leaves nothing behind.
    try:
        try:
            _syscalls.mkdir(scratch, 0o700)
        except OSError:
            scratch = None  # not made: nothing of the probe's to remove
            return None  # cannot write here: the operation will say why
        if not _renameat2.available():
            _write_small(os.path.join(scratch, "a"), b"a")
            return Capabilities(False, False, _takes_links(scratch))
        return _probe_in(scratch)
    except OSError:
        return None
    finally:
        # A probe must not fail the operation that asked for it: a scratch
        # directory that cannot be removed now is a staging name clean()
        # removes.
        if scratch is not None:
            _tree.remove_surely(scratch)


def _probe_in(scratch: str) -> Capabilities:
    a, b = os.path.join(scratch, "a"), os.path.join(scratch, "b")
    _write_small(a, b"a")
    _write_small(b, b"b")
    noreplace = exchange = ignores = False
    try:
        _syscalls.renameat2(a, b, RENAME_NOREPLACE)
    except OSError as e:
        if e.errno == errno.EEXIST:
            # The VFS refuses RENAME_NOREPLACE onto an existing name itself
            # (fs/namei.c), before the filesystem sees the flag: only a
            # rename onto a free name tells whether the filesystem takes it.
            noreplace = _takes_noreplace(a, os.path.join(scratch, "d"))
        elif e.errno not in _FLAGS_REFUSED:
            raise
    else:
        ignores = True  # returned 0 and replaced b
        _write_small(a, b"a")
    if not ignores:
        try:
            _syscalls.renameat2(a, b, RENAME_EXCHANGE)
        except OSError as e:
            if e.errno not in _FLAGS_REFUSED:
                raise
        else:
            if _read(a) == b"b" and _read(b) == b"a":
                exchange = True
            else:
                ignores, noreplace = True, False
    if not os.path.lexists(a):
        _write_small(a, b"a")
    return Capabilities(noreplace, exchange, _takes_links(scratch), ignores)


def _takes_links(scratch: str) -> bool:
    """Whether ``scratch/a`` can get a second name."""
    try:
        _syscalls.link(os.path.join(scratch, "a"), os.path.join(scratch, "c"))
    except OSError as e:
        if e.errno not in _LINK_REFUSED:
            raise
        return False
    return True


def _takes_noreplace(src: str, free: str) -> bool:
    try:
        _syscalls.renameat2(src, free, RENAME_NOREPLACE)
    except OSError as e:
        if e.errno in _FLAGS_REFUSED:
            return False
        raise
    _syscalls.rename(free, src)
    return True


def _exists_error(dst: str) -> FileExistsError:
    return FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)


def rename_noreplace(
    src: str, dst: str, caps: Capabilities, *, durable: bool = False, private: bool = False
) -> None:
    """Rename ``src`` to ``dst``, atomically refusing to replace ``dst``.

    Safe against any number of processes moving the same file at once, on
    every fallback: at most one of them moves it, the others get
    FileNotFoundError, and no interleaving removes the file's last name.

    :param durable: on the link fallback, fsync the directory of ``dst``
        between the link and the unlink, so that a crash cannot persist the
        unlink without the link.  (The caller still fsyncs both directories
        afterwards, as after a rename.)
    :param private: no other process moves ``src`` (a staging file of the
        caller's own): on the link fallback, ``dst`` found naming the same
        inode can only be the caller's own link, retransmitted by NFS.
    :raises FileExistsError: ``dst`` exists; ``src`` is left in place.
    :raises FileNotFoundError: ``src`` is gone (another process moved it).
    """
    if caps.noreplace:
        for tries_left in (2, 1, 0):
            try:
                _syscalls.renameat2(src, dst, RENAME_NOREPLACE)
                return
            except OSError as e:
                if e.errno == errno.EEXIST:
                    if _source_taken(src, dst):
                        raise _missing_error(src, dst) from None
                    raise _exists_error(dst) from None
                if e.errno == errno.ENOENT and tries_left and _target_dir_went(src, dst):
                    continue
                if e.errno not in _FLAGS_REFUSED:
                    raise
                break
    if caps.hardlinks and _link_then_unlink(src, dst, durable, private):
        return
    # Last resort: no atomic way to refuse a replacement exists here.
    if os.path.lexists(dst):
        if not os.path.lexists(src):  # as rename(2): a missing source comes first
            raise _missing_error(src, dst)
        raise _exists_error(dst)
    try:
        _syscalls.rename(src, dst)
    except OSError as e:
        # Made meanwhile, and refused by the server (SFTP answers EPERM for
        # a directory moved onto one): the name is taken.
        if e.errno in _TAKEN_MEANWHILE and os.path.lexists(src) and os.path.lexists(dst):
            raise _exists_error(dst) from None
        raise


def _source_taken(src: str, dst: str) -> bool:
    """After EEXIST: whether another mover took ``src``, to ``dst`` itself
    (the same file, under a name that is not the same entry) or away.

    A network filesystem (JuiceFS) may look at the target before the
    source, where rename(2) on a local one answers ENOENT first.  An error
    other than a missing name tells nothing: EEXIST stands.
    """
    try:
        source = os.lstat(src)
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:
        return False
    try:
        return os.path.samestat(source, os.lstat(dst)) and not _same_entry(src, dst)
    except OSError:
        return False


def _target_dir_went(src: str, dst: str) -> bool:
    """After ENOENT: whether ``src`` is still there, and the directory of
    ``dst`` is too, so that the one ``dst`` was looked up in has gone
    (an emptied ``new/`` swapped for a fresh one, see ``_shrink``): then
    a second try goes to the directory the path names now."""
    return os.path.lexists(src) and os.path.isdir(os.path.dirname(dst))


def _link_then_unlink(src: str, dst: str, durable: bool, private: bool) -> bool:
    """The no-clobber fallback; False if this filesystem refuses links.

    The protocol between movers of one file: each relies only on the name
    its own link made, and whoever's ``unlink(src)`` succeeds has moved the
    file.  A mover whose link finds ``dst`` already there lost: to another
    mover of the same file (same inode, or ``src`` gone), or to another file.
    A mover whose ``unlink(src)`` fails takes its own link back, since no
    other mover relies on it: the file lives on under the name the winner
    made, or was removed on purpose (a claim finished meanwhile stays
    finished).  A link whose outcome is unknown (EIO) is judged by the names
    it leaves, like one refused EEXIST: never taken for this mover's own.

    The price: a link that NFS retransmitted and answered EEXIST (nfs(5)),
    or a mover killed between its link and its unlink, leaves the file under
    both names.  Nothing is lost; the message may be delivered once more.
    Only a ``private`` source, which no other mover touches, takes such a
    name for its own.
    """
    try:
        _link(src, dst)
    except OSError as e:
        if e.errno in _LINK_REFUSED:
            return False
        if e.errno != errno.EEXIST:
            raise
        if _same_entry(src, dst):
            raise _exists_error(dst) from None
        if not _same_file(src, dst):
            if named(src) is False:
                raise _missing_error(src, dst) from None  # moved meanwhile
            raise _exists_error(dst) from None
        if not private:
            raise _missing_error(src, dst) from None  # another mover was first
    try:
        if durable:
            _tree.sync_dir(os.path.dirname(dst) or ".")
        _syscalls.unlink(src)
    except OSError as e:
        if e.errno != errno.ENOENT:
            # An unknown outcome (EIO): looked at.  A source that cannot be
            # looked at either may be gone: the file keeps both names, and
            # the caller hears the error.
            source = named(src)
            if source is False:
                return True  # src is gone: moved
            if source is None:
                raise e from None
        _tree.unlink_quietly(dst)
        if e.errno == errno.ENOENT:
            # Another process moved or removed src between our link and
            # unlink: it won.
            raise _missing_error(src, dst) from None
        raise
    except BaseException:
        # Interrupted (KeyboardInterrupt): take the link back only while the
        # source surely still names the file.
        if os.path.lexists(src):
            _tree.unlink_quietly(dst)
        raise
    return True


def _link(src: str, dst: str) -> None:
    """link(2), whose unknown outcome (EIO) is judged by the names it leaves.

    A name at ``dst`` is judged as a link refused EEXIST: made by another
    mover or by this link, never taken for this mover's own.  A source gone
    is a race lost.  A name that cannot be looked at proves nothing: the
    link's error is raised.  With neither name changed, an EIO is tried
    again for about 2 s (2.5 s at most): GlusterFS answers so to a link
    whose source another host is removing, and shows the source a moment
    longer.
    """
    deadline = time.monotonic() + _RELINK_FOR
    for pause in (*_RELINK_PAUSES, None):
        try:
            _syscalls.link(src, dst)
            return
        except OSError as e:
            if e.errno not in UNKNOWN_OUTCOME:
                raise
            at_dst = named(dst)
            at_src = named(src) if at_dst is not None else None
            if at_dst is None or at_src is None:
                raise  # a name that cannot be looked at proves nothing
            if at_dst:
                raise _exists_error(dst) from None
            if not at_src:
                raise _missing_error(src, dst) from None
            if e.errno != errno.EIO or pause is None or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)


def named(path: str) -> bool | None:
    """Whether ``path`` names something; None if it cannot be looked at
    (EIO, ESTALE, a connection gone): only a missing name is an answer."""
    try:
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return None
    return True


def _missing_error(src: str, dst: str) -> FileNotFoundError:
    return FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), src, None, dst)


def _same_entry(a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` are one name, however spelled."""
    a, b = a.rstrip("/") or "/", b.rstrip("/") or "/"
    if os.path.basename(a) != os.path.basename(b):
        return False
    try:
        return os.path.samestat(
            os.stat(os.path.dirname(a) or "."), os.stat(os.path.dirname(b) or ".")
        )
    except OSError:
        return False


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samestat(os.lstat(a), os.lstat(b))
    except OSError:
        return False


def exchange_unsupported(a: str, b: str, cause: OSError | None = None) -> OSError:
    """The error for a filesystem that cannot exchange ``a`` and ``b``."""
    detail = f" ({errno.errorcode.get(cause.errno or 0, cause.errno)})" if cause else ""
    return OSError(
        errno.EOPNOTSUPP,
        f"atomic exchange is not supported on this filesystem{detail}",
        a,
        None,
        b,
    )


def exchange(a: str, b: str, caps: Capabilities) -> None:
    """Atomically exchange the names ``a`` and ``b`` (RENAME_EXCHANGE).

    :raises OSError: errno EOPNOTSUPP where the filesystem cannot do it
        atomically (or, on overlayfs, not for a lower-layer directory); no
        name is changed then.
    """
    if not caps.exchange:
        raise exchange_unsupported(a, b)
    try:
        _syscalls.renameat2(a, b, RENAME_EXCHANGE)
    except OSError as e:
        # overlayfs answers EXDEV for a directory that is not purely in the
        # upper layer (Documentation/filesystems/overlayfs.rst, "Renaming
        # directories").
        if e.errno in _FLAGS_REFUSED or e.errno == errno.EXDEV:
            raise exchange_unsupported(a, b, e) from e
        raise
