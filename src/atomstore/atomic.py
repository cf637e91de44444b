"""Atomic replacement of files and directory trees.

Whatever happens to the process or the machine, a destination written with
this module is either its old version or the complete new one:

* :func:`file` and :func:`write_bytes`/:func:`write_text` write a file;
* :func:`folder` writes a whole directory tree;
* :func:`rename` renames without replacing; :func:`swap` exchanges two names;
* :func:`capabilities` tells what a path's filesystem supports;
* :func:`clean` removes what a crash left behind.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import stat
import time

from . import _fileobj, _names, _rename, _staging, _syscalls, _tree
from ._args import check_perms, fspath, seconds
from ._rename import Capabilities

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    from contextlib import AbstractContextManager
    from pathlib import Path
    from typing import IO, Any, BinaryIO, TextIO, overload

    from ._args import BinaryWriteMode, Duration, StrPath, TextWriteMode
else:
    from ._args import overload

__all__ = [
    "AtomicFile",
    "AtomicFolder",
    "Capabilities",
    "capabilities",
    "clean",
    "file",
    "folder",
    "rename",
    "swap",
    "write_bytes",
    "write_text",
]


DEFAULT_STALE_AGE = 36 * 3600.0
"""Staging files older than this (36 hours, as maildir) are stale."""


_NAME_MAX = 255  # bytes, on every Linux filesystem
_DEFAULT_OPEN = (-1, None, None, None)  # buffering, encoding, errors, newline


def _split(dest: str) -> tuple[str, str]:
    # str.rpartition: os.path.split costs more on this hot path.
    directory, slash, base = dest.rpartition("/")
    if not base or base in (".", ".."):
        raise IsADirectoryError(errno.EISDIR, "names a directory, not a file", dest)
    if len(base) > _NAME_MAX // 4 and len(os.fsencode(base)) > _NAME_MAX:
        # Found now, not by the final rename, which would name the temporary.
        raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), dest)
    if not slash:
        return ".", base
    return directory or "/", base


# A symlink followed by the kernel (O_PATH: nothing is opened for reading).
_FOLLOW_FLAGS = getattr(os, "O_PATH", os.O_RDONLY | os.O_NONBLOCK) | os.O_CLOEXEC


def _target(path: object, follow_symlinks: bool) -> tuple[str, os.stat_result | None]:
    """The path to replace and its current status (None if missing).

    A symlink at ``path`` is followed as ``open()`` follows it, by the
    kernel itself, so its rules hold (``fs.protected_symlinks`` refuses a
    link planted by another user in a sticky world-writable directory such
    as ``/tmp``, with EACCES).  Anything but a regular file (a directory, a
    FIFO, a socket, a device) is refused before anything is written.
    """
    dest = fspath(path)
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        return dest, None
    if follow_symlinks and stat.S_ISLNK(st.st_mode):
        # Replace the link's target and keep the link, as open() writes
        # through it.
        dest, target_st = _follow(dest)
        if target_st is None:
            return dest, None
        st = target_st
    elif stat.S_ISLNK(st.st_mode):
        return dest, st  # the link itself is replaced
    if not stat.S_ISREG(st.st_mode):
        _check_replaceable(dest, st)
    return dest, st


def _follow(link: str) -> tuple[str, os.stat_result | None]:
    """Where ``open()`` writes through the symlink ``link``, and its status."""
    try:
        fd = os.open(link, _FOLLOW_FLAGS)
    except FileNotFoundError:
        # Dangling (the kernel found it may follow it): open(O_CREAT) would
        # create the target.
        return os.path.realpath(link), None
    try:
        st = os.fstat(fd)
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # pragma: no cover - no /proc
            target = os.path.realpath(link)
        if not target.startswith("/"):
            # Not in any directory ("pipe:[4026]", "socket:[...]": what
            # /dev/stdout leads to): name it as the caller did.
            target = link
    finally:
        os.close(fd)
    return target, st


_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _check_replaceable(dest: str, st: os.stat_result) -> None:
    """Refuse to replace anything but a regular file (or a symlink itself)."""
    mode = st.st_mode
    if stat.S_ISREG(mode) or stat.S_ISLNK(mode):
        return
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), dest)
    kind = next((name for test, name in _KINDS if test(mode)), "a special file")
    raise OSError(errno.EINVAL, f"not a regular file ({kind}): refusing to replace it", dest)


def _recheck(dest: str) -> os.stat_result | None:
    """``dest``'s status now (None if missing), if it may be replaced."""
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        return None
    _check_replaceable(dest, st)
    return st if stat.S_ISREG(st.st_mode) else None


def _metadata_changed(now: os.stat_result, then: os.stat_result) -> bool:
    return (now.st_mode, now.st_uid, now.st_gid) != (then.st_mode, then.st_uid, then.st_gid)


def _refuse_existing(dest: str) -> None:
    """Raise if any name is at ``dest``: a symlink counts, dangling or not."""
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), dest)
    raise _exists(dest)


def _exists(dest: str) -> FileExistsError:
    return FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dest)


def _no_clobber_caps(directory: str, fd: int, overwrite: bool) -> Capabilities | None:
    if overwrite:
        return None
    return _rename.capabilities(directory, os.fstat(fd).st_dev)


@overload
def file(
    path: StrPath,
    mode: TextWriteMode = "w",
    *,
    overwrite: bool = False,
    durable: bool = True,
    follow_symlinks: bool = True,
    perms: int | None = None,
    buffering: int = -1,
    encoding: str | None = None,
    errors: str | None = None,
    newline: str | None = None,
) -> AbstractContextManager[TextIO]: ...


@overload
def file(
    path: StrPath,
    mode: BinaryWriteMode,
    *,
    overwrite: bool = False,
    durable: bool = True,
    follow_symlinks: bool = True,
    perms: int | None = None,
    buffering: int = -1,
    encoding: None = None,
    errors: None = None,
    newline: None = None,
) -> AbstractContextManager[BinaryIO]: ...


@overload
def file(
    path: StrPath,
    mode: str,
    *,
    overwrite: bool = False,
    durable: bool = True,
    follow_symlinks: bool = True,
    perms: int | None = None,
    buffering: int = -1,
    encoding: str | None = None,
    errors: str | None = None,
    newline: str | None = None,
) -> AbstractContextManager[IO[Any]]: ...


def file(
    path: StrPath,
    mode: str = "w",
    *,
    overwrite: bool = False,
    durable: bool = True,
    follow_symlinks: bool = True,
    perms: int | None = None,
    buffering: int = -1,
    encoding: str | None = None,
    errors: str | None = None,
    newline: str | None = None,
) -> AtomicFile:
    """Write a file atomically: on success it appears complete at ``path``.

    A context manager: its file object is like ``open(path, mode, ...)``'s,
    writing to a new file in ``path``'s directory that has no name yet
    (O_TMPFILE) or, where the filesystem cannot make one or when replacing,
    a hidden temporary name.  When the ``with`` block ends normally the data
    is flushed, fsynced (``durable``) and given the name ``path`` (a link, or
    a rename over the old file), then the directory is fsynced
    (``durable``).  When it raises, ``KeyboardInterrupt`` included, the new
    file is removed and ``path`` is untouched; only an error after the file
    got its name (the directory's fsync) leaves the new file in place.
    Closing the file object inside the block is allowed.

    :param mode: ``'w'`` (or ``'wt'``) for text, ``'wb'`` for bytes.
    :param overwrite: replace an existing file; by default an existing file
        is a :class:`FileExistsError`, raised before anything is written and
        again, atomically, if the name appears while writing.
    :param durable: fsync the file and its directory.  Without it, a crash of
        the machine (not of the process) may lose the new version or, on some
        filesystems, leave an empty file.
    :param follow_symlinks: with ``overwrite``, replace the target of a
        symlink at ``path`` (the link stays), following it as ``open()``
        does: where the kernel would refuse (``fs.protected_symlinks``), so
        does this, with EACCES.  With False the link itself is replaced.
        Without ``overwrite`` a symlink at ``path``, dangling or not, is an
        existing name, as for ``O_EXCL``.
    :param perms: permission bits of the new file (exactly, whatever the
        umask); by default a new file gets 0o666 minus the umask and a
        replaced file keeps its mode, owner and group.
    :raises FileExistsError: ``path`` exists and ``overwrite`` is False.
    :raises FileNotFoundError: the parent directory is missing (named).
    :raises IsADirectoryError: ``path`` is a directory.
    :raises OSError: ``path`` is a FIFO, socket or device (EINVAL): only a
        regular file is ever replaced.
    """
    _fileobj.check_write_mode(mode)
    check_perms(perms)
    if overwrite:
        dest, current = _target(path, follow_symlinks)
    else:
        dest, current = fspath(path), None
        _refuse_existing(dest)
    directory, base = _split(dest)
    return AtomicFile(
        dest,
        directory,
        base,
        current,
        mode,
        overwrite,
        durable,
        perms,
        (buffering, encoding, errors, newline),
    )


class AtomicFile:
    """The context manager :func:`file` returns; used once."""

    __slots__ = (
        "_base",
        "_current",
        "_dest",
        "_directory",
        "_durable",
        "_file",
        "_mode",
        "_open_args",
        "_overwrite",
        "_perms",
        "_staged",
        "_temp",
    )

    def __init__(
        self,
        dest: str,
        directory: str,
        base: str,
        current: os.stat_result | None,
        mode: str,
        overwrite: bool,
        durable: bool,
        perms: int | None,
        open_args: tuple[int, str | None, str | None, str | None],
    ) -> None:
        self._dest, self._directory, self._base = dest, directory, base
        self._current, self._mode, self._overwrite = current, mode, overwrite
        self._durable, self._perms, self._open_args = durable, perms, open_args
        self._staged: _staging.Temp | None = None
        self._temp: str | None = None  # the hidden name, on the named path
        self._file: IO[Any] | None = None

    def __enter__(self) -> Any:  # TextIO or BinaryIO, as file()'s overloads say
        if self._staged is not None:
            raise RuntimeError("atomic.file() can be entered only once")
        staged = self._staged = _staging.GuardedTemp()
        try:
            if self._overwrite or not _staging.open_anonymous(staged, self._directory, self._perms):
                self._temp, _ = _staging.open_temp(
                    staged, self._directory, self._base, self._perms, self._current
                )
            fd = staged.fd
            assert fd is not None
            # The file object does not own the descriptor: closed inside the
            # block, it leaves the descriptor to sync and name the file.
            plain = self._mode == "wb" and self._open_args == _DEFAULT_OPEN
            if plain and _syscalls._tracer is None:
                # open(path, "wb")'s file object, built the short way.
                raw = io.FileIO(fd, "wb", closefd=False)
                raw.name = self._temp or self._dest
                staged.raw = raw
                self._file = io.BufferedWriter(raw, max(raw._blksize, io.DEFAULT_BUFFER_SIZE))  # type: ignore[attr-defined]
            else:
                self._file = _fileobj.open_fd(
                    fd, self._mode, self._temp or self._dest, *self._open_args, closefd=False
                )
                staged.raw = getattr(getattr(self._file, "buffer", self._file), "raw", self._file)
        except BaseException:
            staged.discard()
            raise
        return self._file

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        staged, f = self._staged, self._file
        assert staged is not None
        assert f is not None
        if exc_type is not None:
            with contextlib.suppress(Exception):
                f.close()
            staged.discard()  # the raw file object first, then the descriptor
            return
        try:
            f.close()  # flushes first; nothing if closed in the block
            staged.close_raw()  # detached from its buffer, say
            if self._temp is None:
                _staging.link_anonymous(staged, self._dest, self._durable)
                return
            fd = staged.fd
            assert fd is not None
            caps = _no_clobber_caps(self._directory, fd, self._overwrite)
            if self._overwrite:
                # The block may have run long: whatever took the name
                # meanwhile must still be a file this may replace, and its
                # mode and owner now are the ones to keep.
                now = _recheck(self._dest)
                if (
                    now is not None
                    and self._current is not None
                    and _metadata_changed(now, self._current)
                ):
                    staged.special = _staging.keep_metadata(fd, now, self._perms)
            _staging.settle_mode(staged)
            if self._durable:
                _syscalls.fsync(fd)
            staged.close_fd()
            _staging.publish(self._temp, self._dest, caps, self._durable)
            staged.published()
        except BaseException:
            with contextlib.suppress(Exception):
                f.close()
            staged.discard()  # the raw file object first, then the descriptor
            raise


def write_bytes(
    path: StrPath,
    data: bytes | bytearray | memoryview,
    *,
    overwrite: bool = False,
    durable: bool = True,
    follow_symlinks: bool = True,
    perms: int | None = None,
) -> None:
    """Write ``data`` to ``path`` atomically; the keywords are :func:`file`'s.

    The shortest path to a file on disk: no file object is built.  Without
    ``overwrite`` an existing name at ``path`` (a symlink included, dangling
    or not, as for ``O_EXCL``) is found by the no-clobber rename itself,
    after the data was written to the temporary file (which is then
    removed), rather than by a look beforehand.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes-like, not {type(data).__name__}")
    if perms is not None:
        check_perms(perms)
    if overwrite:
        dest, current = _target(path, follow_symlinks)
    else:
        dest, current = fspath(path), None
    directory, base = _split(dest)
    if current is not None and perms is None and stat.S_ISREG(current.st_mode):
        try:
            _staging.replace_with_bytes(dest, current, data, durable, directory, base)
        except OSError as e:
            if e.filename is None:  # write(2) and fsync(2) name no file
                raise OSError(e.errno, e.strerror, dest) from e
            raise
        if durable:
            _tree.sync_dir(directory)
        return
    staged = _staging.Temp()
    try:
        if not overwrite and _staging.open_anonymous(staged, directory, perms):
            # A new name: the file needs no name before it is complete, and
            # link() never replaces anything.
            _staging.write_all(staged.fd, data)  # type: ignore[arg-type]
            _staging.link_anonymous(staged, dest, durable)
            return
        temp, fd = _staging.open_temp(staged, directory, base, perms, current)
        _staging.write_all(fd, data)
        _staging.settle_mode(staged)
        if durable:
            _syscalls.fsync(fd)
        if overwrite:
            staged.close_fd()
            _syscalls.rename(temp, dest)
        else:
            caps = _rename.capabilities(directory, os.fstat(fd).st_dev)
            staged.close_fd()
            _rename.rename_noreplace(temp, dest, caps, private=True)
        staged.published()
    except FileExistsError:
        staged.discard()
        _refuse_existing(dest)  # a directory is named as such
        raise
    except OSError as e:
        staged.discard()
        if e.filename is None:  # write(2) and fsync(2) name no file
            raise OSError(e.errno, e.strerror, dest) from e
        raise
    except BaseException:
        staged.discard()
        raise
    if durable:
        _tree.sync_dir(directory)


def write_text(
    path: StrPath,
    text: str,
    encoding: str | None = None,
    errors: str | None = None,
    *,
    overwrite: bool = False,
    durable: bool = True,
    follow_symlinks: bool = True,
    perms: int | None = None,
) -> None:
    """Write ``text`` to ``path`` atomically, encoded as ``open()`` would.

    The keywords are :func:`file`'s; newlines are written as given.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be str, not {type(text).__name__}")
    if hasattr(io, "text_encoding"):  # Python 3.10+: EncodingWarning as open()
        encoding = io.text_encoding(encoding, 2)
    if encoding is None or encoding == "locale":
        import locale  # only here: its import costs the command's start-up

        encoding = locale.getpreferredencoding(False)
    data = text.encode(encoding, errors or "strict")
    write_bytes(
        path,
        data,
        overwrite=overwrite,
        durable=durable,
        follow_symlinks=follow_symlinks,
        perms=perms,
    )


def _existing_dir(dest: str) -> os.stat_result | None:
    """The status of the directory ``dest``, None if missing.

    :raises NotADirectoryError: ``dest`` is something else, a symlink
        included: a link is never followed out of its directory.
    """
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a directory"
        raise NotADirectoryError(errno.ENOTDIR, f"destination is {kind}", dest)
    return st


def _make_staging(into: list[str], parent: str, base: str, current: os.stat_result | None) -> str:
    """Make the staging directory; its name is in ``into`` before it exists,
    so that an interruption at any moment leaves nothing behind."""
    for _ in range(100):
        staging = os.path.join(parent, _names.staging_name(base, "new"))
        into.append(staging)
        _staging.hold(staging, tree=True)
        try:
            _syscalls.mkdir(staging, 0o777)
        except FileExistsError:
            into.pop()  # another's
            _staging.let_go(staging)
            continue
        except OSError as e:
            raise OSError(e.errno, e.strerror, parent) from None
        if current is not None:
            _syscalls.chmod(staging, stat.S_IMODE(current.st_mode))
        return staging
    raise FileExistsError(errno.EEXIST, "no free staging name", parent)


def folder(
    path: StrPath,
    *,
    overwrite: bool = False,
    durable: bool = True,
    allow_fallback: bool = True,
) -> AtomicFolder:
    """Write a directory tree atomically: on success it appears complete.

    Yields the :class:`~pathlib.Path` of an empty hidden staging directory
    next to ``path``; fill it.  When the ``with`` block ends normally every
    file and directory of the tree is fsynced (``durable``), then the tree is
    published: renamed to ``path`` if that is free, or exchanged with the
    existing tree in one atomic step (RENAME_EXCHANGE) when ``overwrite`` is
    set, after which the old tree is removed.  When the block raises, the
    staging tree is removed and ``path`` is untouched.

    :param overwrite: replace an existing directory.
    :param durable: fsync the whole tree before publishing it, and the parent
        directory after.
    :param allow_fallback: where the filesystem cannot exchange atomically
        (see :func:`capabilities`), replace in steps: move the old tree
        aside, move the new one in, remove the old.  A crash between the two
        moves leaves ``path`` missing and the old tree under a hidden name;
        :func:`clean` puts it back.  A directory that exists only in the
        lower layer of an overlayfs cannot even be moved: it is removed in
        place before the new tree is moved in, and readers may see it
        partly removed.  With False such filesystems raise OSError
        (EOPNOTSUPP) instead and nothing changes.
    :raises FileExistsError: ``path`` exists and ``overwrite`` is False.
    :raises NotADirectoryError: ``path`` is not a directory (a symlink
        included).
    :raises FileNotFoundError: the parent directory is missing (named).
    """
    dest = fspath(path).rstrip(os.sep) or os.sep
    parent, base = _split(dest)
    current = _existing_dir(dest)
    if current is not None and not overwrite:
        raise _exists(dest)
    return AtomicFolder(dest, parent, base, current, overwrite, durable, allow_fallback)


class AtomicFolder:
    """The context manager :func:`folder` returns; used once."""

    __slots__ = (
        "_allow_fallback",
        "_base",
        "_current",
        "_dest",
        "_durable",
        "_made",
        "_overwrite",
        "_parent",
        "_staging",
    )

    def __init__(
        self,
        dest: str,
        parent: str,
        base: str,
        current: os.stat_result | None,
        overwrite: bool,
        durable: bool,
        allow_fallback: bool,
    ) -> None:
        self._dest, self._parent, self._base, self._current = dest, parent, base, current
        self._overwrite, self._durable, self._allow_fallback = overwrite, durable, allow_fallback
        # The staging directory's name, known before it exists: whatever
        # interrupts, it is removed (at the latest when this is collected).
        self._made: list[str] = []
        self._staging: str | None = None

    def __enter__(self) -> Path:
        from pathlib import Path  # only here: its import costs start-up

        if self._staging is not None or self._made:
            raise RuntimeError("atomic.folder() can be entered only once")
        try:
            self._staging = _make_staging(self._made, self._parent, self._base, self._current)
        except BaseException:
            self._remove_made()
            raise
        return Path(self._staging)

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        old: str | None = None
        try:
            if exc_type is not None:
                return
            staging = self._staging
            assert staging is not None
            if self._durable:
                _tree.sync_tree(staging)
            old = _publish_tree(staging, self._dest, self._overwrite, self._allow_fallback)
            if self._durable:
                _tree.sync_dir(self._parent)
        finally:
            # Published or not, what is under a staging name goes: the
            # staging tree, or the old tree it holds after an exchange.
            self._remove_made()
            if old is not None:
                # The old tree the fallback moved aside.
                _tree.remove_surely(old)

    def _remove_made(self) -> None:
        while self._made:
            _tree.remove_surely(self._made[-1])
            _staging.let_go(self._made.pop())

    def __del__(self) -> None:
        if self._made:
            try:
                self._remove_made()
            except BaseException:  # interrupted in turn: finish, quietly
                self._remove_made()


def _publish_tree(staging: str, dest: str, overwrite: bool, allow_fallback: bool) -> str | None:
    """Put the tree ``staging`` at ``dest``; return where the old tree went."""
    parent = os.path.dirname(staging)
    caps = _rename.capabilities(parent)
    if _existing_dir(dest) is None:
        try:
            _rename.rename_noreplace(staging, dest, caps)
            return None
        except OSError as e:
            # A plain rename onto a non-empty directory: ENOTEMPTY on ext4,
            # EEXIST on xfs (rename(2)).
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            if not overwrite:
                raise _exists(dest) from None
        _existing_dir(dest)
    elif not overwrite:
        raise _exists(dest)
    try:
        _rename.exchange(staging, dest, caps)
        return staging
    except OSError as e:
        if e.errno != errno.EOPNOTSUPP or not allow_fallback:
            raise
    return _replace_in_steps(staging, dest, caps)


def _replace_in_steps(staging: str, dest: str, caps: Capabilities) -> str | None:
    """The fallback without an atomic exchange; returns the old tree's path."""
    parent, base = os.path.split(dest)
    aside = os.path.join(parent, _names.staging_name(base, "old"))
    try:
        _syscalls.rename(dest, aside)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        # overlayfs cannot rename a directory of the lower layer at all
        # (without redirect_dir): the old tree can only be removed in place.
        _tree.remove_tree(dest)
        _rename.rename_noreplace(staging, dest, caps)
        return None
    try:
        _rename.rename_noreplace(staging, dest, caps)
    except BaseException:
        with contextlib.suppress(OSError):
            _rename.rename_noreplace(aside, dest, caps)
        raise
    return aside


def rename(src: StrPath, dst: StrPath, *, overwrite: bool = False, durable: bool = True) -> None:
    """Rename ``src`` to ``dst`` atomically, by default never replacing ``dst``.

    Where the filesystem lacks RENAME_NOREPLACE, a no-clobber rename falls
    back to ``link()`` and ``unlink()`` (for a moment both names exist), and
    where links are refused too, to a check followed by a plain rename,
    which cannot stop a name that appears in between from being replaced.

    :param durable: fsync the directories of both names.
    :raises FileExistsError: ``dst`` exists and ``overwrite`` is False.
    :raises FileNotFoundError: ``src`` does not exist.
    """
    src, dst = fspath(src, "src"), fspath(dst, "dst")
    dst_dir = os.path.dirname(dst) or "."
    if overwrite:
        _syscalls.rename(src, dst)
    else:
        _rename.rename_noreplace(src, dst, _rename.capabilities(dst_dir), durable=durable)
    if durable:
        _sync_dirs(dst_dir, os.path.dirname(src) or ".")


def swap(a: StrPath, b: StrPath, *, durable: bool = True) -> None:
    """Exchange the names ``a`` and ``b`` in one atomic step.

    Both must exist; they may be files or directories.  There is no
    fallback: a non-atomic swap would expose a moment where one name is
    missing.

    :param durable: fsync the directories of both names.
    :raises OSError: errno EOPNOTSUPP where the filesystem cannot exchange
        atomically (nothing changed); :func:`capabilities` tells beforehand.
    :raises FileNotFoundError: ``a`` or ``b`` does not exist.
    """
    a, b = fspath(a, "a"), fspath(b, "b")
    a_dir = os.path.dirname(a) or "."
    _rename.exchange(a, b, _rename.capabilities(a_dir))
    if durable:
        _sync_dirs(a_dir, os.path.dirname(b) or ".")


def _sync_dirs(first: str, second: str) -> None:
    _tree.sync_dir(first)
    if os.path.abspath(second) != os.path.abspath(first):
        _tree.sync_dir(second)


def capabilities(path: StrPath) -> Capabilities:
    """What the filesystem holding the name ``path`` supports.

    The answer is probed once per filesystem and process, in a hidden
    scratch directory beside ``path``.  :func:`folder` gets an atomic
    exchange where ``exchange`` is true, with one exception: on overlayfs a
    directory that exists only in the lower layer cannot be exchanged, and
    the fallback is used for it.

    :raises FileNotFoundError: the directory holding ``path`` is missing.
    """
    directory = os.path.dirname(os.path.abspath(fspath(path)))
    return _rename.capabilities(directory)


def clean(directory: StrPath, *, older_than: Duration = DEFAULT_STALE_AGE) -> list[str]:
    """Remove what interrupted writes left in ``directory``.

    Temporary files and staging trees of this library (hidden names marked
    ``.atomstore-``) whose mtime is older than ``older_than`` are removed.
    An old tree that the :func:`folder` fallback had moved aside is put back
    if its destination is missing, else removed.  Younger entries may belong
    to a writer still at work and are kept.

    :param older_than: seconds or a :class:`datetime.timedelta`; 0 cleans
        everything, for when no writer can be running.
    :returns: the paths removed or put back.
    """
    top = fspath(directory, "directory")
    limit = time.time() - seconds(older_than)
    with os.scandir(top) as entries:
        stale = [entry for entry in entries if _names.is_staging(entry.name)]
    cleaned = []
    for entry in stale:
        try:
            if entry.stat(follow_symlinks=False).st_mtime > limit:
                continue
            if _restore_aside(entry.path):
                if os.path.lexists(entry.path):
                    continue  # kept
            else:
                _tree.remove_tree(entry.path)
        except FileNotFoundError:
            continue  # another cleaner was faster
        cleaned.append(entry.path)
    return cleaned


def _restore_aside(path: str) -> bool:
    """Put back an old tree whose destination went missing.

    :returns: True if ``path`` was put back or must be kept, False if it is
        to be removed.
    """
    match = _names.STAGING_RE.match(os.path.basename(path))
    if match is None or match["kind"] != "old":
        return False
    if _names.shortened(match["base"]):
        # Its destination's name was cut short: keep what may be the only
        # copy of the old tree for a human to place.
        return True
    dest = os.path.join(os.path.dirname(path), match["base"])
    if os.path.lexists(dest):
        return False
    caps = _rename.capabilities(os.path.dirname(path) or ".")
    try:
        _rename.rename_noreplace(path, dest, caps)
    except FileExistsError:
        return False
    return True
