"""Staging a file and publishing it: the core of every atomic write.

The persistence rules this follows (``DESIGN.md``): the temporary file lives
in the destination's own directory or on its filesystem; everything is
written, then the file is fsynced, then renamed; then the directory holding
the new name is fsynced.  A failed fsync is reported, never retried.
"""

from __future__ import annotations

import atexit
import errno
import os
import stat
import time

from . import _log, _names, _rename, _syscalls, _tree
from ._rename import Capabilities
from ._tree import unlink_quietly

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    from typing import IO

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | _O_NOFOLLOW
_O_TMPFILE = getattr(os, "O_TMPFILE", 0)
ANONYMOUS_FLAGS = _O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC
# O_TMPFILE refused: by the filesystem (EOPNOTSUPP: NFS, most FUSE), or by a
# kernel older than 3.11, which sees O_DIRECTORY|O_RDWR (EISDIR, EINVAL).
_TMPFILE_REFUSED = frozenset({errno.EOPNOTSUPP, errno.ENOTSUP, errno.EISDIR, errno.EINVAL})
# Directories whose filesystem refused O_TMPFILE: they stage under names.
_named_only: set[str] = set()
# Whether each filesystem (st_dev) loses a linked unnamed file, as probed.
_unnamed_lost: dict[int, bool] = {}
_device_of: dict[str, int] = {}  # the filesystem of each absolute directory
_rename.on_mount_change(_unnamed_lost.clear)  # a device number may be reused
_rename.on_mount_change(_device_of.clear)
_UNNAMED_SETTLE = 0.05
_NAMED_ONLY_MAX = 4096
_ATTEMPTS = 100
_COPY_CHUNK = 1 << 20


# Every staging name this process has made and not yet published or removed
# (True: a tree), so that one an interruption kept from its cleanup still
# goes when the process exits: a last resort behind the callers' own.
_live: dict[str, bool] = {}


def hold(path: str, tree: bool = False) -> None:
    """Remember the staging name ``path`` until :func:`let_go`."""
    _live[path] = tree


def let_go(path: str) -> None:
    """Forget ``path``: published, or removed."""
    _live.pop(path, None)


def _remove_live() -> None:
    for path, tree in list(_live.items()):
        (_tree.remove_quietly if tree else unlink_quietly)(path)
    _live.clear()


atexit.register(_remove_live)
if hasattr(os, "register_at_fork"):
    # A child's exit must not remove what its parent is still writing.
    os.register_at_fork(after_in_child=_live.clear)


class Temp:
    """A staging file as it is made: its name, then its descriptor.

    The caller makes one before anything exists and discards it if anything
    raises: the name is known (and held, see :func:`hold`) before the file
    is created, so an interruption at any moment (KeyboardInterrupt, a
    signal handler's SystemExit) leaves no file behind.
    """

    __slots__ = ("_fds", "path", "raw", "special")

    def __init__(self) -> None:
        # The staging name, while there may be a file under it.
        self.path: str | None = None
        # The descriptor, kept in a list that open_into() fills from C code.
        self._fds: list[int] = []
        # A mode with set-user-ID, set-group-ID or sticky bits, to set again
        # after the last write (see settle_mode).
        self.special: int | None = None
        # A raw file object over ``fd`` that does not own it (atomic.file's).
        # It is closed first: a buffer or wrapper still around it would
        # otherwise write, when collected, to whatever file reuses the number.
        self.raw: IO[bytes] | None = None

    @property
    def fd(self) -> int | None:
        """The open descriptor of the file, or None."""
        fds = self._fds
        return fds[-1] if fds else None

    @fd.setter
    def fd(self, value: int | None) -> None:
        # None: closed, or someone else's to close now.
        self._fds[:] = () if value is None else (value,)

    def open_into(self, path: str, flags: int, mode: int) -> int:
        """``os.open()``, its descriptor kept here before any signal handler
        can run.

        An interruption (KeyboardInterrupt, a handler's SystemExit) strikes
        between two Python instructions: after ``open()`` returned and before
        its result was stored, the descriptor would be lost, and with it a
        file system that cannot be unmounted.  Here ``list.extend`` stores
        what ``map`` gets from ``os.open``, all in C.
        """
        self._fds.extend(map(_syscalls.open, (path,), (flags,), (mode,)))
        return self._fds[-1]

    def close_fd(self) -> None:
        """Close the descriptor (an error of close(2) is raised), forgotten
        as it is closed: ``map`` pops it and closes it in C, so that no
        interruption leaves it open and forgotten, or closed and still
        held (a second close could hit a number reused meanwhile)."""
        fds = self._fds
        any(map(_syscalls.close, map(fds.pop, [-1] * len(fds))))

    def name(self, path: str) -> None:
        """Take ``path`` as the staging name, held before the file exists."""
        _live[path] = False
        self.path = path

    def unname(self) -> None:
        """Forget the staging name: published, removed, or never ours."""
        path, self.path = self.path, None
        if path is not None:
            _live.pop(path, None)

    def close(self) -> None:
        """Close the descriptor, once (and the raw file object over it first)."""
        try:
            self.close_raw()
        except Exception:
            pass
        try:
            self.close_fd()
        except OSError:
            self.close()  # the rest, if several

    def close_raw(self) -> None:
        """Close the raw file object over the descriptor, not the descriptor."""
        raw, self.raw = self.raw, None
        if raw is not None:
            raw.close()

    def discard(self) -> None:
        """Close the descriptor and remove the file: a cleanup path.

        Interrupted, it can be called again to finish.
        """
        self.close()
        path = self.path
        if path is not None:
            unlink_quietly(path)
            self.unname()

    def published(self) -> None:
        """The file has its final name: nothing is left to clean up."""
        self.unname()
        self.fd = self.raw = None


class GuardedTemp(Temp):
    """A :class:`Temp` that discards itself when collected undiscarded.

    For a staging file that lives while the caller's code runs (an
    ``atomic.file()`` block, a batch): an interruption can strike where no
    handler of the caller's runs (entering ``__exit__``, say).  The short
    writes, whose every step is inside their own ``try``, do without the
    cost of a finalizer.  A forked child's copy is never discarded: the
    file is its parent's.
    """

    __slots__ = ("_pid",)

    def __init__(self) -> None:
        super().__init__()
        self._pid = os.getpid()

    def __del__(self) -> None:
        # In __init__ the attributes may not even be set yet.
        if getattr(self, "_pid", None) != os.getpid():
            return
        if getattr(self, "path", None) is not None or getattr(self, "_fds", None):
            try:
                self.discard()
            except BaseException:  # interrupted in turn: finish, quietly
                self.discard()


def open_anonymous(
    into: Temp,
    directory: str,
    perms: int | None = None,
    *,
    nofollow: bool = False,
    probe_in: str | None = None,
) -> bool:
    """Create an unnamed file in ``directory`` (O_TMPFILE) as ``into``.

    Nothing is ever left of it unless :func:`link_anonymous` names it: a
    process killed at any moment leaves no file.

    :param nofollow: refuse ``directory`` if it is a symlink (ENOTDIR).
    :param probe_in: where the probe of unnamed files (see
        :func:`_keeps_unnamed`) runs, on the filesystem of ``directory``:
        JuiceFS lists an unnamed file under a name while it is open, which
        a store's consumers must not see in ``new/``.

    :returns: False where the filesystem, the kernel or a missing /proc do
        not allow it (remembered for ``directory``): stage under a name.
    :raises OSError: naming ``directory`` (missing, not writable).
    """
    if not _O_TMPFILE or directory in _named_only or not _syscalls.can_link_fd():
        return False
    if not _keeps_unnamed(directory, nofollow, probe_in):
        return False
    try:
        fd = into.open_into(
            directory,
            ANONYMOUS_FLAGS | _O_NOFOLLOW if nofollow else ANONYMOUS_FLAGS,
            0o666 if perms is None else perms,
        )
    except OSError as e:
        if e.errno in _TMPFILE_REFUSED:
            if len(_named_only) >= _NAMED_ONLY_MAX:
                _named_only.clear()
            _named_only.add(directory)
            _log.info(
                "%s: no unnamed files here (%s): new files are staged under names",
                directory,
                errno.errorcode.get(e.errno, e.errno),
            )
            return False
        raise OSError(e.errno, e.strerror, directory) from None
    if perms is not None:
        _syscalls.fchmod(fd, perms)
        if perms & 0o7000:
            into.special = perms
    return True


def forget_probes() -> None:
    """Forget what was found of each directory and filesystem."""
    _named_only.clear()
    _unnamed_lost.clear()
    _device_of.clear()


def _keeps_unnamed(directory: str, nofollow: bool, probe_in: str | None) -> bool:
    """Whether the filesystem of ``directory`` keeps an unnamed file once it
    is linked and closed.

    JuiceFS 1.4 takes ``O_TMPFILE`` and the link, then frees the file when it
    is closed: the name stays, and opens with ENOENT.  On a FUSE or network
    filesystem a probe, once per filesystem (``st_dev``), links a file of
    one byte under a hidden name and reads it back.  The answers, and the
    filesystem of each absolute directory, are forgotten when the mount
    table changes.
    """
    device = _device_of.get(directory)
    if device is None:
        try:
            found = os.lstat(directory) if nofollow else os.stat(directory)
        except OSError:
            return True  # the open says what is wrong
        device = found.st_dev
        if os.path.isabs(directory):
            if len(_device_of) >= _NAMED_ONLY_MAX:
                _device_of.clear()
            _device_of[directory] = device
    lost = _unnamed_lost.get(device)
    if lost is None:
        lost = _loses_unnamed(probe_in or directory, device, nofollow)
        if lost is None:
            return False  # the probe could not tell (a full disk?): by name, this once
        _unnamed_lost[device] = lost
        if lost:
            _log.info(
                "%s: unnamed files are lost here once closed: new files are staged under names",
                directory,
            )
    return not lost


def _loses_unnamed(directory: str, device: int, nofollow: bool) -> bool | None:
    """The probe of :func:`_keeps_unnamed`; None if it cannot tell.

    It works through a descriptor of ``directory`` on ``device``: a
    directory swapped meanwhile for a symlink or for another filesystem
    steers nothing.  What it reads back must be its own file.
    """
    from . import _watch  # only here: once per filesystem

    if not _watch.is_remote_or_fuse(directory):
        return False  # a local filesystem keeps the files it links
    flags = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC | (_O_NOFOLLOW if nofollow else 0)
    try:
        dfd = os.open(directory, flags)
    except OSError:
        return None
    probe = Temp()
    inode = -1
    try:
        if os.fstat(dfd).st_dev != device:
            return None
        at = f"/proc/self/fd/{dfd}"
        name = _names.staging_name("probe", "tmp")
        try:
            fd = probe.open_into(at, ANONYMOUS_FLAGS, 0o600)
            _syscalls.write(fd, b"u")
            inode = os.fstat(fd).st_ino
            probe.name(os.path.join(directory, name))
            _syscalls.link_fd(fd, f"{at}/{name}")
        except FileExistsError:
            probe.unname()  # not this probe's file: left alone
            return None
        except OSError:
            return None
        probe.close_fd()
        # FUSE answers a close before the filesystem lets the file go, and a
        # read-back that comes first holds it open again: a second look,
        # after that one let go too, tells.
        for _ in range(2):
            time.sleep(_UNNAMED_SETTLE)
            lost = _read_back_lost(dfd, name, inode)
            if lost is not False:
                return lost
        return False
    finally:
        try:
            if probe.path is not None:
                _remove_probe(dfd, os.path.basename(probe.path), inode)
                probe.unname()
        finally:
            probe.discard()
            os.close(dfd)


def _remove_probe(dfd: int, name: str, inode: int) -> None:
    """Remove the probe's name, unless another file holds it now."""
    try:
        if os.stat(name, dir_fd=dfd, follow_symlinks=False).st_ino != inode:
            return
    except FileNotFoundError:
        pass  # a name that only lists (JuiceFS): removed all the same
    except OSError:
        return
    unlink_quietly(f"/proc/self/fd/{dfd}/{name}")


def _read_back_lost(dfd: int, name: str, inode: int) -> bool | None:
    """Whether the probe's file ``name`` in ``dfd`` lost its byte."""
    try:
        fd = os.open(name, os.O_RDONLY | _O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
    except FileNotFoundError:
        return True
    except OSError:
        return None
    try:
        found = os.fstat(fd)
        if not stat.S_ISREG(found.st_mode) or found.st_ino != inode:
            return None  # not the probe's file
        return os.read(fd, 2) != b"u"
    except OSError:
        return None
    finally:
        os.close(fd)


def settle_mode(staged: Temp) -> None:
    """Set the file's special bits again, after its last write: ``write(2)``
    by an unprivileged process clears set-user-ID and set-group-ID."""
    if staged.special is not None and staged.fd is not None:
        _syscalls.fchmod(staged.fd, staged.special)


def link_anonymous(staged: Temp, dest: str, durable: bool) -> None:
    """Sync the unnamed ``staged`` file (``durable``), name it ``dest``, close
    it, and sync the directory (``durable``).  Never replaces: EEXIST.

    On any failure ``staged`` is discarded.
    """
    fd = staged.fd
    assert fd is not None
    try:
        settle_mode(staged)
        if durable:
            _syscalls.fsync(fd)
        link_unnamed(fd, dest)
        staged.close_fd()
    except BaseException:
        staged.discard()
        raise
    if durable:
        _tree.sync_dir(os.path.dirname(dest) or ".")


def link_unnamed(fd: int, dest: str) -> None:
    """Name the unnamed file open as ``fd`` ``dest``; never replaces: EEXIST.

    The file is this process's alone, so a link whose outcome is unknown
    (EIO) made a name if the file has one now (a consumer may have taken it
    already), or if ``dest`` is that file.  Errors name ``dest``, not the
    descriptor's number.
    """
    try:
        _tree.retried(lambda: _syscalls.link_fd(fd, dest), dest)
    except OSError as e:
        if e.errno in _rename.UNKNOWN_OUTCOME:
            try:
                mine = os.fstat(fd)
                if mine.st_nlink or os.path.samestat(os.lstat(dest), mine):
                    return
            except OSError:
                pass  # nothing at dest, or nothing can be told
            else:
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dest) from None
        raise OSError(e.errno, e.strerror, dest) from None


def open_exclusive(path: str, perms: int | None = None, into: Temp | None = None) -> int:
    """Create ``path`` for writing; never an existing file, never a symlink.

    ``perms`` is set exactly (fchmod); without it the file gets 0o666 minus
    the umask, as ``open()`` gives.  With ``into`` the descriptor is kept
    there as it is opened (see :meth:`Temp.open_into`).
    """
    mode = 0o666 if perms is None else perms
    if into is None:
        fd = _syscalls.open(path, FILE_FLAGS, mode)
    else:
        fd = into.open_into(path, FILE_FLAGS, mode)
    if perms is not None:
        try:
            _syscalls.fchmod(fd, perms)
        except BaseException:
            if into is None:  # else the caller discards ``into``
                discard(path, fd)
            raise
    return fd


def open_temp(
    into: Temp,
    directory: str,
    base: str,
    perms: int | None = None,
    like: os.stat_result | None = None,
    create_mode: int = 0o666,
) -> tuple[str, int]:
    """Create a hidden temporary file for ``base`` in ``directory``.

    Its name is in ``into`` before it exists, its descriptor as soon as it
    is open: the caller discards ``into`` on any error.

    :param perms: exact permission bits for the file.
    :param like: the file being replaced: its owner, group and (unless
        ``perms`` is given) mode are kept (see :func:`keep_metadata`).  A
        symlink replaced by the file gives it nothing: the file is new.
    :param create_mode: the mode to create with, minus the umask, when
        neither ``perms`` nor ``like`` decides.
    :returns: the temporary file's path and its open descriptor.
    :raises OSError: naming ``directory`` (missing, not a directory, not
        writable).
    """
    if like is not None and not stat.S_ISREG(like.st_mode):
        like = None
    if like is not None:
        # The group's bits wait until the group is right: a file made in
        # another group (a set-group-ID directory's, the process's) must not
        # let that group open it meanwhile.
        create = (like.st_mode if perms is None else perms) & 0o707
    elif perms is not None:
        create = perms & 0o777
    else:
        create = create_mode
    for _ in range(_ATTEMPTS):
        temp = f"{directory}/{_names.staging_name(base, 'tmp')}"
        _live[temp] = False  # into.name(temp), inline
        into.path = temp
        try:
            fd = into.open_into(temp, FILE_FLAGS, create)
        except FileExistsError:
            into.unname()  # another's: never ours to remove
            continue
        except OSError as e:
            # The name is ours alone: if the error came after the file was
            # made (a lost reply), it goes.
            into.discard()
            # The temporary name means nothing to the caller: name the directory.
            raise OSError(e.errno, e.strerror, directory) from None
        if like is not None:
            into.special = keep_metadata(fd, like, perms)
        elif perms is not None:
            _syscalls.fchmod(fd, perms)
            if perms & 0o7000:
                into.special = perms
        return temp, fd
    raise FileExistsError(errno.EEXIST, "no free temporary name", directory)


def keep_metadata(fd: int, like: os.stat_result, perms: int | None = None) -> int | None:
    """Give the new file ``fd`` the owner and group of ``like``, where the
    process may, and its mode (or exactly ``perms``).

    The file was created with the mode's bits for its owner and others; one
    ``fstat`` tells what the umask, a default ACL or a set-group-ID
    directory made of it, so ``fchown`` and ``fchmod`` run only where
    something differs (the group's bits are always added once the group is
    right).  No process-wide state (the umask, the effective ids) is read,
    so nothing another thread does can mislead it.

    :returns: the mode again if it has set-user-ID, set-group-ID or sticky
        bits, which must be set after the last write (:func:`settle_mode`);
        else None.
    """
    mode = stat.S_IMODE(like.st_mode) if perms is None else perms
    st = os.fstat(fd)
    if st.st_uid != like.st_uid or st.st_gid != like.st_gid:
        _give_owner(fd, like)
        # After the chown, which clears the set-user-ID bit.
        _syscalls.fchmod(fd, mode)
    elif stat.S_IMODE(st.st_mode) != mode:
        _syscalls.fchmod(fd, mode)
    return mode if mode & 0o7000 else None


def replace_with_bytes(
    dest: str,
    like: os.stat_result,
    data: bytes | bytearray | memoryview,
    durable: bool,
    directory: str,
    base: str,
) -> None:
    """The hot path of a replace, as :func:`open_temp`, :func:`fill` and
    :func:`publish` together but in one function: ``data`` written (and
    fsynced, with ``durable``) to a temporary file that keeps the metadata
    of ``like`` (a regular file), renamed over ``dest``.  The directory is
    not synced.

    :raises OSError: as :func:`open_temp` and :func:`fill`; the temporary
        file is removed.
    """
    temp = f"{directory}/{_names.staging_name(base, 'tmp')}"
    _live[temp] = False  # held before it exists
    opened: list[int] = []  # kept from C code, as Temp.open_into does
    # One try around it all: no moment between two of them where an
    # interruption would find the descriptor or the file unguarded.
    try:
        try:
            opened.extend(map(_syscalls.open, (temp,), (FILE_FLAGS,), (like.st_mode & 0o707,)))
        except FileExistsError:  # another's name (a collision): never ours to remove
            _live.pop(temp, None)
            temp = ""
        except OSError as e:
            raise OSError(e.errno, e.strerror, directory) from None
        if not temp:
            staged = Temp()
            try:
                temp, fd = open_temp(staged, directory, base, None, like)
            except BaseException:
                staged.discard()
                raise
            opened.append(fd)  # ours from here on
            staged.fd = None
        fd = opened[0]  # see open_temp for the mode
        special = keep_metadata(fd, like)
        write_all(fd, data)
        if special is not None:
            _syscalls.fchmod(fd, special)  # after the last write
        if durable:
            _syscalls.fsync(fd)
        any(map(_syscalls.close, map(opened.pop, [-1])))  # forgotten as it is closed
        _syscalls.rename(temp, dest)
    except BaseException:
        while opened:
            close_quietly(opened.pop())
        if temp:
            _forget(temp)
        raise
    _live.pop(temp, None)


def _forget(temp: str) -> None:
    """Remove the staging file ``temp``, if made, and let its name go."""
    unlink_quietly(temp)
    _live.pop(temp, None)


def _give_owner(fd: int, like: os.stat_result) -> None:
    """The owner and group of ``like``, or its group alone, where allowed."""
    try:
        _syscalls.fchown(fd, like.st_uid, like.st_gid)
    except PermissionError:
        try:  # a member of the group may keep at least the group
            _syscalls.fchown(fd, -1, like.st_gid)
        except PermissionError:
            pass


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write all of ``data``, looping over short writes."""
    written = _syscalls.write(fd, data)
    if written == len(data) or not data:  # the common case: one write
        return
    view = memoryview(data).cast("B")[written:]
    while view:
        written = _syscalls.write(fd, view)
        if written <= 0:  # pragma: no cover - write(2) returns >0 or fails
            raise OSError(errno.EIO, "write made no progress")
        view = view[written:]


def fill(staged: Temp, data: bytes | bytearray | memoryview | IO[bytes], durable: bool) -> None:
    """Write ``data`` to the open ``staged`` file, fsync it if ``durable``,
    and close it.

    ``data`` is bytes, or a binary file copied in chunks.  On any failure the
    file is discarded.
    """
    fd = staged.fd
    assert fd is not None
    try:
        write_data(fd, data)
        if durable:
            _syscalls.fsync(fd)
        staged.close_fd()
    except BaseException:
        staged.discard()
        raise


def write_data(fd: int, data: bytes | bytearray | memoryview | IO[bytes]) -> None:
    """Write bytes, or a binary file copied in chunks, to ``fd``."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        write_all(fd, data)
    else:
        copy_stream(data, fd)


def copy_stream(source: IO[bytes], fd: int) -> None:
    """Copy the binary file ``source`` to ``fd`` in chunks (memory stays flat)."""
    while True:
        chunk = source.read(_COPY_CHUNK)
        if not chunk:
            return
        if not isinstance(chunk, (bytes, bytearray)):
            raise TypeError("data must be a binary file, not a text file")
        write_all(fd, chunk)


def sync_and_close(fd: int, durable: bool) -> None:
    """fsync ``fd`` if ``durable``, then close it (closed even on failure)."""
    try:
        if durable:
            _syscalls.fsync(fd)
    except BaseException:
        close_quietly(fd)
        raise
    _syscalls.close(fd)


def publish(
    temp: str,
    dest: str,
    caps: Capabilities | None,
    durable: bool,
) -> None:
    """Rename the complete, closed file ``temp`` to ``dest``.

    :param caps: the capabilities of the filesystem for a no-clobber rename,
        or None to replace ``dest`` if it exists.
    :raises FileExistsError: ``dest`` exists and ``caps`` is given; ``temp``
        is removed.
    """
    try:
        if caps is None:
            _syscalls.rename(temp, dest)
        else:
            _rename.rename_noreplace(temp, dest, caps, private=True)
    except BaseException:
        unlink_quietly(temp)
        raise
    if durable:
        _tree.sync_dir(os.path.dirname(dest) or ".")


def discard(temp: str, fd: int | None) -> None:
    """Close ``fd`` and remove ``temp``, ignoring errors: a cleanup path."""
    if fd is not None:
        close_quietly(fd)
    unlink_quietly(temp)


def close_quietly(fd: int) -> None:
    try:
        _syscalls.close(fd)
    except OSError:
        pass
