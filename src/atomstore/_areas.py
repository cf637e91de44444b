"""A store's areas, and what its claims and batches need of it.

:class:`Areas` holds a store's directories and the mechanics every part of
the queue shares: areas checked before use, messages staged and published,
claims given back, ``dead/`` and ``delay/`` made when first needed.
:class:`~atomstore.FileStore` is built on it, and so are claims
(:mod:`._claim`) and batches (:mod:`._batch`), which know a store only as
its :class:`Areas`: the imports point one way, ``_areas`` <- ``_claim``,
``_batch`` <- ``_store``.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import time

from . import _delays, _info, _log, _rename, _staging, _syscalls, _tree
from ._args import seconds

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    from typing import IO, Union

    from ._args import Duration
    from ._rename import Capabilities

    Data = Union[bytes, bytearray, memoryview, str, IO[bytes]]

AREAS = ("tmp", "new", "cur", "dead", "delay")
# dead/ is made when the first message dies, delay/ for the first delayed one.
PREPARED = ("tmp", "new", "cur")
LATE = ("dead", "delay")
NAME_MAX = 255
# A claim adds its info part to a message's name (_info.CLAIM_SUFFIX_MAX):
# a name the store accepts for a message must leave room for it.
MESSAGE_NAME_MAX = NAME_MAX - _info.CLAIM_SUFFIX_MAX


class Areas:
    """The areas of a store under ``path``; see :class:`~atomstore.FileStore`,
    which sets these attributes."""

    path: str
    durable: bool
    mode: int | None
    max_attempts: int | None
    retry_delay: float
    max_retry_delay: float
    _dirs: dict[str, str]
    _caps: Capabilities | None
    _host: str

    def _area(self, area: object) -> str:
        if not isinstance(area, str) or area not in self._dirs:
            raise ValueError(
                f"unknown area {area!r}: expected 'tmp', 'new', 'cur', 'dead' or 'delay'"
            )
        return self._dirs[area]

    def _checked(self, area: str) -> str:
        """The directory of ``area``, after checking that it is one.

        An area is never followed through a symlink: anyone who can write
        the store's directory could otherwise point the store at files it
        must not move, consume or delete.

        :raises NotADirectoryError: the area is a symlink or not a directory.
        :raises FileNotFoundError: the area is missing (not prepared).
        """
        directory = self._dirs[area]
        try:
            st = os.lstat(directory)
        except FileNotFoundError:
            raise self._not_prepared(area) from None
        if not stat.S_ISDIR(st.st_mode):
            kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a directory"
            raise NotADirectoryError(errno.ENOTDIR, f"store area is {kind}", directory)
        return directory

    def _capabilities(self) -> Capabilities:
        caps = self._caps
        if caps is None:
            caps = self._caps = _rename.capabilities(self._dirs["tmp"])
        return caps

    def _not_prepared(self, area: str) -> FileNotFoundError:
        return FileNotFoundError(
            errno.ENOENT, "no such store area (is the store prepared?)", self._dirs[area]
        )

    def unique_name(self) -> str:
        """A new maildir-style name, unique across threads, processes and hosts.

        ``<seconds>.M<microseconds>P<pid>Q<counter>R<random>.<host>``.  The
        names one process gives sort in the order it gave them: each gets a
        microsecond of its own, never earlier than the last one's, even when
        the clock is set back.  Names of different processes and hosts sort
        by their clocks.  The counter separates threads, the host separates
        machines sharing a filesystem, and the random part guards against
        pids reused (containers).
        """
        return _info.unique_name(self._host)

    def _due_time(self, delay: Duration | None) -> int:
        """When a message delayed by ``delay`` is due, in microseconds since
        the epoch; 0 for no delay."""
        if delay is None:
            return 0
        wait = seconds(delay, "delay")
        if wait <= 0:
            return 0
        return min(time.time_ns() // 1000 + int(min(wait, 1e12) * 1e6), _delays.LATEST_US)

    def _publish_delayed(self, staged: _staging.Temp, name: str, due_us: int) -> None:
        """Give the complete ``staged`` message its name in ``delay/``."""
        target = f"{self._make_late('delay')}/{_delays.delayed_name(name, due_us)}"
        if staged.fd is not None:
            _staging.link_anonymous(staged, target, self.durable)
            return
        _staging.publish(f"{self._dirs['tmp']}/{name}", target, self._capabilities(), self.durable)
        staged.published()

    def _stage(
        self, staged: _staging.Temp, data: Data, encoding: str, *, unnamed: bool = False
    ) -> str:
        """Write ``data`` complete (and synced) as ``staged``; return the
        message's name.  The caller discards ``staged`` on any error.

        :param unnamed: as a file without a name in ``new/``, left open in
            ``staged.fd`` (not yet synced) for the caller to sync and link,
            where the filesystem allows; otherwise (and always without it)
            in ``tmp/``, synced and closed, at ``staged.path``.
        """
        payload = _payload(data, encoding)
        if unnamed and self._open_unnamed(staged):
            assert staged.fd is not None
            _staging.write_data(staged.fd, payload)
            return self.unique_name()
        name = self._open_unique(staged)
        _staging.fill(staged, payload, self.durable)
        return name

    def _open_unnamed(self, staged: _staging.Temp) -> bool:
        """A file without a name in ``new/`` (O_TMPFILE) as ``staged``, if
        the filesystem allows and the process has a descriptor to spare.
        ``new/`` is never followed through a symlink: the open itself
        refuses one (no lstat is needed)."""
        try:
            return _staging.open_anonymous(
                staged, self._dirs["new"], self.mode, nofollow=True, probe_in=self._dirs["tmp"]
            )
        except (FileNotFoundError, NotADirectoryError):
            self._checked("new")  # says what is wrong with new/
            raise
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE):
                return False  # out of descriptors (a batch holds many): by name
            raise

    def _open_unique(self, staged: _staging.Temp) -> str:
        """A new file in ``tmp/`` under a unique name, as ``staged``."""
        tmp_dir = self._checked("tmp")
        while True:
            name = self.unique_name()
            temp = f"{tmp_dir}/{name}"
            staged.name(temp)
            try:
                _staging.open_exclusive(temp, self.mode, staged)
                return name
            except FileExistsError:  # pragma: no cover - the random part repeated
                staged.unname()  # another's
                continue
            except FileNotFoundError:
                staged.unname()
                raise self._not_prepared("tmp") from None
            except OSError as e:
                staged.discard()  # ours alone, if it was made
                # The fresh name means nothing to the caller: name the area.
                raise OSError(e.errno, e.strerror, self._dirs["tmp"]) from None

    def _give_back(
        self,
        source: str,
        base: str,
        attempts: int,
        *,
        spent: bool = True,
        delay: Duration | None = None,
    ) -> str:
        """Move a claimed file back to ``new/``, to ``delay/`` when it must
        wait, or to ``dead/`` when spent.

        :param spent: whether ``attempts`` counts a failure: it may send the
            message to ``dead/``, and the store's retry delay applies.
        :param delay: the wait before it can be claimed again, instead of
            the store's retry delay.
        :returns: the file's new path.
        """
        limit = self.max_attempts
        name = _info.with_attempts(base, attempts)
        due_us = 0
        if spent and limit is not None and attempts >= limit:
            area = "dead"
        else:
            if delay is None and spent:
                delay = _delays.backoff(self.retry_delay, self.max_retry_delay, attempts)
            due_us = self._due_time(delay)
            area = "delay" if due_us else "new"
        if area in LATE:
            self._make_late(area)
        self._checked("cur"), self._checked(area)
        if due_us:
            name = _delays.delayed_name(name, due_us)
        target = os.path.join(self._dirs[area], name)
        _rename.rename_noreplace(source, target, self._capabilities(), durable=self.durable)
        if self.durable:
            _tree.sync_dir(self._dirs[area])
            _tree.sync_dir(os.path.dirname(source))
        if area == "dead":
            _log.info("%s: %d attempts spent, a dead letter now", target, attempts)
        return target

    def _make_late(self, area: str) -> str:
        """The directory of ``dead/`` or ``delay/``, made on first use."""
        directory = self._dirs[area]
        try:
            st = os.lstat(directory)
        except FileNotFoundError:
            mode = 0o777 if self.mode is None else _dir_mode(self.mode)
            if _makedirs(directory, mode, self.mode is not None) and self.durable:
                _tree.sync_dir(self.path)
            return directory
        if not stat.S_ISDIR(st.st_mode):
            # Made late: until then anyone who can write the store's
            # directory could plant a link there.  Never follow it.
            raise NotADirectoryError(errno.ENOTDIR, "store area is not a directory", directory)
        return directory


def _dir_mode(file_mode: int) -> int:
    """Directory bits for files of ``file_mode``: search where readable."""
    mode = file_mode & 0o777
    for read_bit, exec_bit in ((0o400, 0o100), (0o040, 0o010), (0o004, 0o001)):
        if mode & read_bit:
            mode |= exec_bit
    return mode


def _hostname() -> str:
    """socket.gethostname(), without importing socket where uname(2) tells
    the same (gethostname(2) is uname's nodename on Linux)."""
    if hasattr(os, "uname"):
        return os.uname().nodename
    import socket  # pragma: no cover - no uname

    return socket.gethostname()  # pragma: no cover


def _payload(data: Data, encoding: str) -> bytes | bytearray | memoryview | IO[bytes]:
    """A message's content as bytes, or a binary file to copy."""
    if isinstance(data, str):
        return data.encode(encoding)
    if isinstance(data, io.TextIOBase):
        raise TypeError("data must be a binary file, not a text file")
    if not isinstance(data, (bytes, bytearray, memoryview)) and not hasattr(data, "read"):
        raise TypeError(f"data must be bytes-like, str or a binary file, not {type(data).__name__}")
    return data


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
    created = _makedirs(parent, mode, exact) if parent != path else []
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
