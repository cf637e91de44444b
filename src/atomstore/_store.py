"""FileStore: a maildir-style store over ``tmp/``, ``new/`` and ``cur/``.

Producers write in ``tmp/`` and publish by an atomic rename into ``new/``;
consumers claim by an atomic rename into ``cur/``.  Whoever wins the rename
owns the file: no locks.
"""

from __future__ import annotations

import builtins
import errno
import itertools
import math
import os
import socket
import stat
import time
from typing import IO, Any

from . import _fileobj, _names, _rename, _staging, _syscalls, _tree, _watch, atomic
from ._rename import Capabilities

AREAS = ("tmp", "new", "cur")
_NAME_MAX = 255
_COPY_CHUNK = 1 << 20
_DEFAULT_POLL = 0.5
_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)

# Maildir's info part: "<unique>:<version>,<fields>".  atomstore writes
# version 1 ("experimental semantics" in the maildir specification) with
# comma-separated fields, each a letter and a value:
#   A  attempts: claims of this message that ended without finish()
#   C  when the current claim was made, microseconds since the epoch
#   P  the claiming process's id
#   T  a random token that makes each claim's name unique (fencing)
_INFO_SEPARATOR = ":"
_INFO_VERSION = "1,"

_counter = itertools.count()
_pid = os.getpid()


def _reset_after_fork() -> None:
    global _pid
    _pid = os.getpid()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def escape_hostname(hostname: str) -> str:
    """``hostname`` made safe for a maildir name.

    The maildir specification escapes ``/`` as ``\\057`` and ``:`` as
    ``\\072``; atomstore also escapes ``,`` (``\\054``), its info separator,
    and ``\\`` itself.
    """
    return (
        hostname.replace("\\", "\\134")
        .replace("/", "\\057")
        .replace(":", "\\072")
        .replace(",", "\\054")
    )


def split_info(name: str) -> tuple[str, dict[str, str]]:
    """Split a stored name into its unique part and its info fields."""
    base, sep, info = name.rpartition(_INFO_SEPARATOR)
    if not sep or not info.startswith(_INFO_VERSION):
        return name, {}
    fields = {}
    for item in info[len(_INFO_VERSION) :].split(","):
        if item:
            fields[item[0]] = item[1:]
    return base, fields


def join_info(base: str, fields: dict[str, str]) -> str:
    """The stored name of ``base`` with info ``fields`` (none: just base)."""
    if not fields:
        return base
    items = ",".join(f"{key}{value}" for key, value in fields.items())
    return f"{base}{_INFO_SEPARATOR}{_INFO_VERSION}{items}"


def _attempts(fields: dict[str, str]) -> int:
    try:
        return int(fields.get("A", "0"))
    except ValueError:
        return 0


class ClaimLostError(FileNotFoundError):
    """The claim is no longer held: it was recovered, finished or released.

    A subclass of :class:`FileNotFoundError` with ``errno`` ENOENT and the
    claim's path as ``filename``.
    """


def _dir_mode(file_mode: int) -> int:
    """Directory bits for files of ``file_mode``: search where readable."""
    mode = file_mode & 0o777
    for read_bit, exec_bit in ((0o400, 0o100), (0o040, 0o010), (0o004, 0o001)):
        if mode & read_bit:
            mode |= exec_bit
    return mode


class FileStore:
    """A store of files in ``tmp/``, ``new/`` and ``cur/`` under ``path``.

    :param path: the store's directory (``str`` or ``os.PathLike``); nothing
        is created before :meth:`prepare`.
    :param durable: make every change durable before returning (fsync of the
        file and of the directories a change touched).  With False a crash of
        the machine may lose or resurrect recent changes; a crash of the
        process still loses nothing.
    :param mode: permission bits for every file the store creates (for
        example 0o600), set exactly whatever the umask; directories it
        creates get the same bits plus search where readable (0o700).  By
        default files get 0o666 and directories 0o777, minus the umask.
    :param hostname: the host part of :meth:`unique_name`; by default
        :func:`socket.gethostname`.
    :param poll_interval: seconds between looks into ``new/`` while waiting
        for messages.  By default waiting relies on inotify, and polls every
        0.5 s only where inotify cannot see every change: on network and
        FUSE filesystems (another host's writes) and where inotify is
        missing.
    """

    def __init__(
        self,
        path: atomic.StrPath,
        *,
        durable: bool = True,
        mode: int | None = None,
        hostname: str | None = None,
        poll_interval: float | None = None,
    ) -> None:
        self.path = os.path.abspath(atomic.fspath(path))
        self.durable = durable
        if mode is not None and (not isinstance(mode, int) or not 0 <= mode <= 0o777):
            raise ValueError(f"mode must be permission bits 0 to 0o777: {mode!r}")
        self.mode = mode
        if hostname is None:
            hostname = socket.gethostname() or "localhost"
        elif not isinstance(hostname, str) or not hostname:
            raise ValueError(f"hostname must be a non-empty str: {hostname!r}")
        self._host = escape_hostname(hostname)
        if poll_interval is not None:
            poll_interval = atomic.seconds(poll_interval, "poll_interval")
            if poll_interval <= 0:
                raise ValueError(f"poll_interval must be positive: {poll_interval!r}")
        self.poll_interval = poll_interval
        self._dirs = {area: os.path.join(self.path, area) for area in AREAS}
        self._caps: Capabilities | None = None
        # Names of new/ from one listing, oldest last: claims pop from it, so
        # a backlog of n costs one listing per n claims, not one per claim.
        self._backlog: list[str] = []

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r})"

    # -- validation -----------------------------------------------------

    def _area(self, area: object) -> str:
        if not isinstance(area, str) or area not in self._dirs:
            raise ValueError(f"unknown area {area!r}: expected 'tmp', 'new' or 'cur'")
        return self._dirs[area]

    def _name(self, name: object, area: str) -> str:
        """The file name ``name`` stands for in ``area``, validated."""
        if isinstance(name, os.PathLike):
            name = os.fspath(name)
        if not isinstance(name, str):
            raise TypeError(f"name must be str or os.PathLike[str], not {type(name).__name__}")
        if os.sep in name:
            directory, base = os.path.split(name)
            if directory != self._dirs[area]:
                raise ValueError(f"{name!r} is not a file of this store's {area!r} area")
            name = base
        if not name or name in (".", ".."):
            raise ValueError(f"invalid name {name!r}: must be a file name")
        if "\0" in name:
            raise ValueError(f"invalid name {name!r}: contains a NUL character")
        if name.startswith("."):
            raise ValueError(f"invalid name {name!r}: names starting with '.' are reserved")
        if len(os.fsencode(name)) > _NAME_MAX:
            raise ValueError(f"invalid name {name[:40]!r}...: longer than {_NAME_MAX} bytes")
        return name

    def _capabilities(self) -> Capabilities:
        caps = self._caps
        if caps is None:
            caps = self._caps = _rename.capabilities(self._dirs["tmp"])
        return caps

    def _not_prepared(self, area: str) -> FileNotFoundError:
        return FileNotFoundError(
            errno.ENOENT, "no such store area (is the store prepared?)", self._dirs[area]
        )

    # -- the classic API ------------------------------------------------

    def prepare(self) -> None:
        """Create the store's directory, its parents and ``tmp/new/cur``.

        Does nothing where they exist, and creates again what was removed.

        :raises NotADirectoryError: the store path (or a parent) is a file.
        """
        dir_mode = 0o777 if self.mode is None else _dir_mode(self.mode)
        created = _makedirs(self.path, dir_mode, self.mode is not None)
        for area in AREAS:
            if _makedirs(self._dirs[area], dir_mode, self.mode is not None):
                created.append(self._dirs[area])
        self._caps = None
        self._backlog = []
        if self.durable and created:
            # Each new directory's entry lives in its parent.
            for parent in sorted({os.path.dirname(d) for d in created}):
                _tree.sync_dir(parent)

    def create(
        self,
        name: str | None = None,
        mode: str = "w",
        *,
        buffering: int = -1,
        encoding: str | None = None,
        errors: str | None = None,
        newline: str | None = None,
    ) -> IO[Any]:
        """Create a new file in ``tmp/`` and return it open for writing.

        The file object's ``name`` is the full path.  An existing file is
        never truncated and a symlink planted in ``tmp/`` is never followed.

        :param name: the file's name; by default a :meth:`unique_name`.
        :param mode: ``'w'``, ``'wt'`` or ``'wb'``; the keywords are
            ``open()``'s.
        :raises FileExistsError: ``tmp/name`` exists (or is a symlink).
        """
        _fileobj.check_write_mode(mode)
        name = self.unique_name() if name is None else self._name(name, "tmp")
        path = os.path.join(self._dirs["tmp"], name)
        try:
            fd = _staging.open_exclusive(path, self.mode)
        except FileNotFoundError:
            raise self._not_prepared("tmp") from None
        try:
            return _fileobj.open_fd(fd, mode, path, buffering, encoding, errors, newline)
        except BaseException:
            _staging.discard(path, fd)
            raise

    def list(self, area: str) -> builtins.list[str]:
        """The full paths of the files in ``area``, sorted by name.

        Unique names sort by time.  The library's hidden staging files are
        left out.
        """
        directory = self._area(area)
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            raise self._not_prepared(area) from None
        return [os.path.join(directory, n) for n in sorted(names) if not n.startswith(".")]

    def move(self, name: str, src: str, dst: str, *, overwrite: bool = False) -> None:
        """Move the file ``name`` from area ``src`` to area ``dst``, atomically.

        A file leaving ``tmp/`` is fsynced first (``durable``): its data
        must be on disk before its name is published.

        :param overwrite: replace a file of that name in ``dst``.
        :raises FileExistsError: ``dst`` has a file of that name; both stay.
        :raises FileNotFoundError: ``src`` has no such file (perhaps another
            consumer moved it first).
        """
        src_dir, dst_dir = self._area(src), self._area(dst)
        if src_dir == dst_dir:
            raise ValueError(f"src and dst are the same area: {src!r}")
        name = self._name(name, src)
        source, target = os.path.join(src_dir, name), os.path.join(dst_dir, name)
        if self.durable and src == "tmp":
            _sync_file(source)
        if overwrite:
            _syscalls.rename(source, target)
        else:
            _rename.rename_noreplace(source, target, self._capabilities())
        if self.durable:
            _tree.sync_dir(dst_dir)
            _tree.sync_dir(src_dir)

    def copy(self, name: str, src: str, dst: str, *, overwrite: bool = False) -> None:
        """Copy the file ``name`` from area ``src`` to area ``dst``.

        The copy is written under a hidden name and published complete, with
        the source's mode: no half-copied file is ever visible in ``dst``.

        :raises FileExistsError: ``dst`` has a file of that name.
        :raises FileNotFoundError: ``src`` has no such file.
        """
        src_dir, dst_dir = self._area(src), self._area(dst)
        name = self._name(name, src)
        source, target = os.path.join(src_dir, name), os.path.join(dst_dir, name)
        if src_dir == dst_dir:
            raise ValueError(f"src and dst are the same area: {src!r}")
        if not overwrite and os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), target)
        # O_NOFOLLOW: a symlink planted in the store is not copied through.
        with open(os.open(source, _READ_FLAGS), "rb", buffering=0) as src_file:
            st = os.fstat(src_file.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, "not a regular file", source)
            temp, fd = _staging.open_temp(dst_dir, name, stat.S_IMODE(st.st_mode))
            try:
                _copy_stream(src_file, fd)
            except BaseException:
                _staging.discard(temp, fd)
                raise
        try:
            _staging.sync_and_close(fd, self.durable)
        except BaseException:
            _staging.unlink_quietly(temp)
            raise
        _staging.publish(temp, target, None if overwrite else self._capabilities(), self.durable)

    def remove(self, name: str, area: str) -> None:
        """Remove the file ``name`` from ``area``.

        :raises FileNotFoundError: there is no such file.
        """
        directory = self._area(area)
        _syscalls.unlink(os.path.join(directory, self._name(name, area)))
        if self.durable:
            _tree.sync_dir(directory)

    # -- the work queue -------------------------------------------------

    def unique_name(self) -> str:
        """A new maildir-style name, unique across threads, processes and hosts.

        ``<seconds>.M<microseconds>P<pid>Q<counter>R<random>.<host>``: names
        sort by time, the counter separates calls of one process, the host
        separates machines sharing a filesystem, and the random part guards
        against pids reused (containers) and clocks set back.
        """
        now = time.time_ns() // 1000
        seconds, micros = divmod(now, 1_000_000)
        return f"{seconds}.M{micros:06d}P{_pid}Q{next(_counter)}R{_names.token()[:8]}.{self._host}"

    def add(
        self, data: bytes | bytearray | memoryview | str | IO[bytes], encoding: str = "utf-8"
    ) -> str:
        """Deliver ``data`` as a new message into ``new/`` and return its name.

        The message is written in ``tmp/``, fsynced, and moved into ``new/``
        under a :meth:`unique_name`; with ``durable`` it is on disk when this
        returns.  No consumer ever sees part of it.

        :param data: bytes, a str encoded with ``encoding``, or a binary
            file object, which is copied in chunks (memory stays flat).
        """
        if isinstance(data, str):
            data = data.encode(encoding)
        elif not isinstance(data, (bytes, bytearray, memoryview)) and not hasattr(data, "read"):
            raise TypeError(
                f"data must be bytes-like, str or a binary file, not {type(data).__name__}"
            )
        name, temp, fd = self._open_unique()
        try:
            if isinstance(data, (bytes, bytearray, memoryview)):
                _staging.write_all(fd, data)
            else:
                _copy_stream(data, fd)
        except BaseException:
            _staging.discard(temp, fd)
            raise
        self._publish(name, temp, fd)
        return name

    def _open_unique(self) -> tuple[str, str, int]:
        """A new file in ``tmp/`` under a unique name: (name, path, fd)."""
        while True:
            name = self.unique_name()
            temp = os.path.join(self._dirs["tmp"], name)
            try:
                return name, temp, _staging.open_exclusive(temp, self.mode)
            except FileExistsError:  # pragma: no cover - the random part repeated
                continue
            except FileNotFoundError:
                raise self._not_prepared("tmp") from None

    def _publish(self, name: str, temp: str, fd: int) -> None:
        """Sync and close ``fd`` and move ``temp`` into ``new/`` as ``name``."""
        try:
            _staging.sync_and_close(fd, self.durable)
        except BaseException:
            _staging.unlink_quietly(temp)
            raise
        target = os.path.join(self._dirs["new"], name)
        _staging.publish(temp, target, self._capabilities(), self.durable)

    def claim(self, wait: float | None = None) -> Claim | None:
        """Claim the oldest message of ``new/`` by moving it into ``cur/``.

        The rename decides: two consumers, in any processes, never claim the
        same message.  The claimed name records the attempt count, the time
        and the claimant.

        :param wait: seconds to wait for a message when ``new/`` is empty
            (``math.inf``: for ever); it is woken by inotify, not by busy
            polling.  A signal handler that raises interrupts the wait.
        :returns: the :class:`Claim`, or None when ``new/`` is (still) empty.
        """
        claim = self._claim_now()
        if claim is not None or not wait:
            return claim
        deadline = time.monotonic() + atomic.seconds(wait, "wait")
        with self._waiter() as waiter:
            while True:
                claim = self._claim_now()
                if claim is not None:
                    return claim
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                waiter.wait(None if remaining == math.inf else remaining)

    def claims(self, *, timeout: float | None = None) -> Claims:
        """An iterator of claims, waiting for each message as it arrives.

        Stop it from another thread or a signal handler with
        :meth:`Claims.stop`; close it (or use it as a context manager) to
        release its inotify descriptor.

        :param timeout: stop when no message arrived for this many seconds;
            by default wait for ever.
        """
        if timeout is not None:
            timeout = atomic.seconds(timeout, "timeout")
        return Claims(self, self._waiter(), timeout)

    def _waiter(self) -> _watch.Waiter:
        try:
            return _watch.Waiter(self._dirs["new"], self.poll_interval, _DEFAULT_POLL)
        except FileNotFoundError:
            raise self._not_prepared("new") from None

    def claimed(self, name: str) -> Claim:
        """The :class:`Claim` for a claimed file in ``cur/``, by name or path.

        Lets another process (a shell script, say) finish or release a claim
        that :meth:`claim` printed.

        :raises ValueError: ``name`` is not a claim's name.
        """
        name = self._name(name, "cur")
        base, fields = split_info(name)
        try:
            claimed_at = int(fields["C"]) / 1e6
            token = fields["T"]
        except (KeyError, ValueError):
            raise ValueError(f"{name!r} is not the name of a claim") from None
        path = os.path.join(self._dirs["cur"], name)
        return Claim(self, base, path, _attempts(fields), claimed_at, token)

    def _claim_now(self) -> Claim | None:
        new_dir, cur_dir = self._dirs["new"], self._dirs["cur"]
        backlog = self._backlog
        while True:
            if not backlog:
                backlog = self._backlog = self._list_new()
                if not backlog:
                    return None
            try:
                name = backlog.pop()
            except IndexError:  # another thread took the last one
                continue
            base, fields = split_info(name)
            claimed = time.time_ns() // 1000
            attempts = _attempts(fields)
            token = _names.token()
            claim_name = join_info(
                base, {"A": str(attempts), "C": str(claimed), "P": str(_pid), "T": token}
            )
            claim_path = os.path.join(cur_dir, claim_name)
            try:
                # A plain rename: the claim name is new (random token), so it
                # cannot replace anything; the source's disappearance decides
                # between consumers racing for the same message.
                _syscalls.rename(os.path.join(new_dir, name), claim_path)
            except FileNotFoundError:
                if not os.path.isdir(new_dir) or not os.path.isdir(cur_dir):
                    raise self._not_prepared(
                        "new" if not os.path.isdir(new_dir) else "cur"
                    ) from None
                continue  # another consumer was faster
            if self.durable:
                _tree.sync_dir(cur_dir)
                _tree.sync_dir(new_dir)
            return Claim(self, base, claim_path, attempts, claimed / 1e6, token)

    def _list_new(self) -> builtins.list[str]:
        try:
            names = os.listdir(self._dirs["new"])
        except FileNotFoundError:
            raise self._not_prepared("new") from None
        names = [n for n in names if not n.startswith(".")]
        names.sort(reverse=True)
        return names

    def recover(self, older_than: atomic.Duration) -> builtins.list[str]:
        """Return claims older than ``older_than`` to ``new/``.

        Each counts one attempt.  The consumer that held a recovered claim
        can no longer finish or release it (:class:`ClaimLostError`), even
        after another consumer claimed the message again.  Files moved into
        ``cur/`` with :meth:`move` are not claims and stay.

        :param older_than: the lease, in seconds or as a timedelta.
        :returns: the names the recovered messages have in ``new/``.
        """
        limit = time.time_ns() // 1000 - int(atomic.seconds(older_than) * 1e6)
        new_dir, cur_dir = self._dirs["new"], self._dirs["cur"]
        recovered = []
        for name in sorted(os.listdir(cur_dir)):
            base, fields = split_info(name)
            try:
                claimed = int(fields["C"])
            except (KeyError, ValueError):
                continue  # not a claim
            if claimed > limit:
                continue
            back = join_info(base, {"A": str(_attempts(fields) + 1)})
            try:
                _rename.rename_noreplace(
                    os.path.join(cur_dir, name), os.path.join(new_dir, back), self._capabilities()
                )
            except FileNotFoundError:
                continue  # finished or recovered meanwhile
            recovered.append(back)
        if self.durable and recovered:
            _tree.sync_dir(new_dir)
            _tree.sync_dir(cur_dir)
        return recovered

    def clean(self, older_than: atomic.Duration = atomic.DEFAULT_STALE_AGE) -> builtins.list[str]:
        """Remove stale files from ``tmp/`` and stale staging files elsewhere.

        Staleness is judged by mtime (atime lies on noatime mounts).

        :param older_than: seconds or a timedelta; 36 hours by default, as
            the maildir specification advises.
        :returns: the paths removed.
        """
        limit = time.time() - atomic.seconds(older_than)
        tmp_dir = self._dirs["tmp"]
        removed = []
        with os.scandir(tmp_dir) as entries:
            stale = [e for e in entries if _mtime(e) <= limit]
        for entry in stale:
            try:
                _tree.remove_tree(entry.path)
            except FileNotFoundError:  # pragma: no cover - removed meanwhile
                continue
            removed.append(entry.path)
        for area in ("new", "cur"):
            removed.extend(atomic.clean(self._dirs[area], older_than=older_than))
        if self.durable and removed:
            for directory in sorted({os.path.dirname(p) for p in removed}):
                _tree.sync_dir(directory)
        return removed


def _copy_stream(source: IO[bytes], fd: int) -> None:
    while True:
        chunk = source.read(_COPY_CHUNK)
        if not chunk:
            return
        if not isinstance(chunk, (bytes, bytearray)):
            raise TypeError("data must be a binary file, not a text file")
        _staging.write_all(fd, chunk)


def _mtime(entry: os.DirEntry[str]) -> float:
    try:
        return entry.stat(follow_symlinks=False).st_mtime
    except FileNotFoundError:
        return float("inf")


def _sync_file(path: str) -> None:
    fd = _syscalls.open(path, _READ_FLAGS)
    _staging.sync_and_close(fd, True)


def _makedirs(path: str, mode: int, exact: bool) -> list[str]:
    """Create ``path`` and missing parents; return the directories created."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "store path is not a directory", path)
        return []
    parent = os.path.dirname(path)
    created = _makedirs(parent, 0o777, False) if parent != path else []
    try:
        _syscalls.mkdir(path, mode)
    except FileExistsError:
        if not os.path.isdir(path):
            raise NotADirectoryError(errno.ENOTDIR, "store path is not a directory", path) from None
        return created  # another process was faster
    if exact:
        _syscalls.chmod(path, mode)
    created.append(path)
    return created


class Claim:
    """A message claimed from a :class:`FileStore`: finish or release it.

    :ivar name: the message's unique name, the same on every attempt.
    :ivar path: where the claimed file is now, in ``cur/``.
    :ivar attempts: earlier claims of it that ended without :meth:`finish`.
    :ivar claimed_at: when it was claimed, seconds since the epoch.
    :ivar token: the random part that makes this claim's name unique.

    Used as a context manager it finishes the claim when the block ends
    normally and releases it when the block raises.
    """

    __slots__ = ("attempts", "claimed_at", "name", "path", "store", "token")

    def __init__(
        self,
        store: FileStore,
        name: str,
        path: str,
        attempts: int,
        claimed_at: float,
        token: str,
    ) -> None:
        self.store = store
        self.name = name
        self.path = path
        self.attempts = attempts
        self.claimed_at = claimed_at
        self.token = token

    def __repr__(self) -> str:
        return f"<Claim {self.name!r} attempts={self.attempts}>"

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.release()

    def _lost(self) -> ClaimLostError:
        return ClaimLostError(
            errno.ENOENT, "claim is no longer held (recovered, finished or released)", self.path
        )

    def open(self, mode: str = "rb", **kwargs: Any) -> IO[Any]:
        """Open the claimed file for reading; a planted symlink is refused."""
        if mode not in ("r", "rb", "rt"):
            raise ValueError(f"invalid mode {mode!r}: a claim is opened to read")
        try:
            fd = os.open(self.path, _READ_FLAGS)
        except FileNotFoundError:
            raise self._lost() from None
        return open(fd, mode, **kwargs)

    def read_bytes(self) -> bytes:
        """The claimed file's content."""
        with self.open("rb") as f:
            data: bytes = f.read()
            return data

    def read_text(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        """The claimed file's content, decoded."""
        return self.read_bytes().decode(encoding, errors)

    def finish(self) -> None:
        """Done with the message: remove it from ``cur/``.

        :raises ClaimLostError: the claim is no longer held.
        """
        try:
            _syscalls.unlink(self.path)
        except FileNotFoundError:
            raise self._lost() from None
        if self.store.durable:
            _tree.sync_dir(os.path.dirname(self.path))

    def release(self) -> str:
        """Give the message back to ``new/``; this counts one attempt.

        :returns: the message's name in ``new/``.
        :raises ClaimLostError: the claim is no longer held.
        """
        store = self.store
        back = join_info(self.name, {"A": str(self.attempts + 1)})
        try:
            _rename.rename_noreplace(
                self.path, os.path.join(store._dirs["new"], back), store._capabilities()
            )
        except FileNotFoundError:
            raise self._lost() from None
        if store.durable:
            _tree.sync_dir(store._dirs["new"])
            _tree.sync_dir(store._dirs["cur"])
        return back


class Claims:
    """Claims as messages arrive; see :meth:`FileStore.claims`."""

    def __init__(self, store: FileStore, waiter: _watch.Waiter, timeout: float | None) -> None:
        self._store = store
        self._waiter = waiter
        self._timeout = timeout

    def __iter__(self) -> Claims:
        return self

    def __next__(self) -> Claim:
        deadline = None if self._timeout is None else time.monotonic() + self._timeout
        while not self._waiter.stopped:
            claim = self._store._claim_now()
            if claim is not None:
                return claim
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            self._waiter.wait(remaining)
        self.close()
        raise StopIteration

    def stop(self) -> None:
        """End the iteration; safe from other threads and signal handlers."""
        self._waiter.stop()

    @property
    def uses_inotify(self) -> bool:
        """Whether inotify wakes this iterator (else it polls)."""
        return self._waiter.uses_inotify

    def close(self) -> None:
        """Stop and release the inotify descriptor."""
        self._waiter.stop()
        self._waiter.close()

    def __enter__(self) -> Claims:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
