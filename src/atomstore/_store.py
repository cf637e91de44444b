"""FileStore: a maildir-style store over ``tmp/``, ``new/`` and ``cur/``.

Producers write in ``tmp/`` and publish by an atomic rename into ``new/``;
consumers claim by an atomic rename into ``cur/``.  Whoever wins the rename
owns the file: no locks.  Messages that failed too often go to ``dead/``.
"""

from __future__ import annotations

import builtins
import errno
import math
import os
import stat
import time

from . import (
    _delays,
    _fileobj,
    _info,
    _log,
    _names,
    _rename,
    _shrink,
    _staging,
    _syscalls,
    _tree,
    _watch,
    atomic,
)
from ._areas import (
    AREAS,
    LATE,
    MESSAGE_NAME_MAX,
    NAME_MAX,
    PREPARED,
    Areas,
    _dir_mode,
    _hostname,
    _makedirs,
)
from ._args import fspath, seconds
from ._batch import Batch
from ._claim import READ_FLAGS, Claim, ClaimLostError, Claims, open_regular
from ._info import escape_hostname, split_info
from ._rename import UNKNOWN_OUTCOME, Capabilities

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from typing import IO, Any, BinaryIO, TextIO, overload

    from ._areas import Data
    from ._args import Area, BinaryWriteMode, Duration, StrPath, TextWriteMode
    from ._work import Report, Worker
else:
    from ._args import overload


__all__ = ["AREAS", "MESSAGE_NAME_MAX", "Claim", "ClaimLostError", "Claims", "FileStore"]

# Where an unknown delay/ is looked at in any case (see _delays).
_DELAY_RELIST = 5.0
# A claim's modification time further ahead than this (a minute) is not a
# renewal but a producer's clock running ahead (see recover()).
_CLOCK_SLACK_US = 60_000_000
# claim(oldest=False) picks among this many of the first names read.
_ANY_AMONG = 16
# Names a consumer keeps from one listing of new/ (about 10 MB of them).
_BACKLOG_MAX = 100_000
# What _take() returns for a message another consumer claimed first.
_LOST: Claim = object()  # type: ignore[assignment]
_DEFAULT_POLL = 0.5
# An emptied new/ (nothing in it at all) is swapped for a fresh one
# (_shrink): a consumer swaps at most every _SHRINK_EVERY seconds, looks at
# the size of an emptied new/ at most every _SHRINK_LOOK_EVERY, and for an
# old new/ another consumer left at most every _LEFTOVER_LOOK_EVERY (every
# _LEFTOVER_STUCK_EVERY when what is left in it cannot be moved): an idle
# look pays a clock read for them.
_SHRINK_EVERY = 10.0
_SHRINK_LOOK_EVERY = 1.0
_LEFTOVER_LOOK_EVERY = 0.5
_LEFTOVER_STUCK_EVERY = 30.0


# How long a claim whose rename left its outcome unknown (EIO) looks for it:
# a client that lost the race to another host (SeaweedFS) may show the
# source a moment longer, until it hears of the other host's rename.
_OUTCOME_PAUSES = (0.01, 0.04, 0.1, 0.25, 0.6)


def _claim_outcome(claim_path: str, source: str, settle: bool) -> bool | None:
    """After a failed claim: True if it took effect, False if another
    consumer took the message, None if neither shows.

    Only the message's own file at the claim name is the claim (the source
    gone, or a second view of that very file).  A race is lost when both
    names are seen missing; with ``settle`` (an unknown outcome) the claim
    name is given up to a second to show, as a client may show a rename's
    two ends one after the other, or hear of another host's late.  A name
    that cannot be looked at (EIO) proves nothing.
    """
    lost = False
    for pause in (*(_OUTCOME_PAUSES if settle else ()), None):
        try:
            claimed, left = _lstat(claim_path), _lstat(source)
        except OSError:
            pass
        else:
            if claimed is not None and stat.S_ISREG(claimed.st_mode):
                if left is None or os.path.samestat(left, claimed):
                    return True
            elif claimed is None and left is None:
                if not settle:
                    return False
                lost = True  # for good, even if the winner gives it back
        if pause is not None:
            time.sleep(pause)
    return False if lost else None


def _lstat(path: str) -> os.stat_result | None:
    """``path``'s lstat, or None if it does not exist; any other failure
    is raised."""
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


class FileStore(Areas):
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
    :param max_attempts: after this many claims ended without finishing
        (released or recovered), a message goes to ``dead/`` instead of back
        to ``new/``; by default it is retried for ever.
    :param retry_delay: a message released or recovered waits this long
        (seconds or a timedelta) before it can be claimed again, doubled
        for each attempt after the first, up to ``max_retry_delay``; by
        default it is claimable again at once.
    :param max_retry_delay: the longest retry delay (default one hour).
    """

    def __init__(
        self,
        path: StrPath,
        *,
        durable: bool = True,
        mode: int | None = None,
        hostname: str | None = None,
        poll_interval: Duration | None = None,
        max_attempts: int | None = None,
        retry_delay: Duration | None = None,
        max_retry_delay: Duration = 3600.0,
    ) -> None:
        self.path = os.path.abspath(fspath(path))
        self.durable = durable
        if mode is not None and (
            not isinstance(mode, int) or isinstance(mode, bool) or not 0 <= mode <= 0o777
        ):
            raise ValueError(f"mode must be permission bits 0 to 0o777: {mode!r}")
        self.mode = mode
        if hostname is None:
            hostname = _hostname() or "localhost"
        elif not isinstance(hostname, str) or not hostname:
            raise ValueError(f"hostname must be a non-empty str: {hostname!r}")
        self._host = escape_hostname(hostname)
        if poll_interval is not None:
            poll_interval = seconds(poll_interval, "poll_interval")
            if poll_interval <= 0:
                raise ValueError(f"poll_interval must be positive: {poll_interval!r}")
        self.poll_interval = poll_interval
        if max_attempts is not None and (
            not isinstance(max_attempts, int) or isinstance(max_attempts, bool) or max_attempts < 1
        ):
            raise ValueError(f"max_attempts must be a positive int: {max_attempts!r}")
        self.max_attempts = max_attempts
        self.retry_delay = 0.0 if retry_delay is None else seconds(retry_delay, "retry_delay")
        self.max_retry_delay = seconds(max_retry_delay, "max_retry_delay")
        self._dirs = {area: os.path.join(self.path, area) for area in AREAS}
        self._due = _delays.DueWatch(
            self._dirs["delay"], poll_interval or _DEFAULT_POLL, _DELAY_RELIST
        )
        self._caps: Capabilities | None = None
        # Names of new/ from one listing, oldest last: claims pop from it, so
        # a backlog of n costs one listing per n claims, not one per claim.
        self._backlog: builtins.list[str] = []
        # Names of new/ that cannot be claimed here (too long for a claim on
        # this filesystem): passed over, so the messages behind them flow.
        self._unclaimable: set[str] = set()
        # When an emptied new/ may be looked at for a swap next, and when an
        # old new/ another consumer swapped out may be looked for (monotonic).
        self._next_shrink = self._next_leftover_look = 0.0
        self._old_new_look_at: float | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r})"

    # -- validation -----------------------------------------------------

    def _name(self, name: object, area: str, *, message: bool = False) -> str:
        """The file name ``name`` stands for in ``area``, validated.

        :param message: the name is given to a file that may become a
            message, so it must leave room for a claim's info part.
        """
        if isinstance(name, os.PathLike):
            name = os.fspath(name)
        if not isinstance(name, str):
            raise TypeError(f"name must be str or os.PathLike[str], not {type(name).__name__}")
        if os.sep in name:
            directory, base = os.path.split(name)
            if directory != self._dirs[area] and not _same_directory(directory, self._dirs[area]):
                raise ValueError(f"{name!r} is not a file of this store's {area!r} area")
            name = base
        if not name or name in (".", ".."):
            raise ValueError(f"invalid name {name!r}: must be a file name")
        if "\0" in name:
            raise ValueError(f"invalid name {name!r}: contains a NUL character")
        if name.startswith("."):
            raise ValueError(f"invalid name {name!r}: names starting with '.' are reserved")
        limit = MESSAGE_NAME_MAX if message else NAME_MAX
        if len(os.fsencode(name)) > limit:
            why = " (a claim adds its info part)" if message else ""
            raise ValueError(f"invalid name {name[:40]!r}...: longer than {limit} bytes{why}")
        return name

    # -- the classic API ------------------------------------------------

    def prepare(self) -> None:
        """Create the store's directory, its parents and ``tmp/new/cur``.

        Does nothing where they exist, and creates again what was removed.

        :raises NotADirectoryError: the store path (or a parent) is a file.
        """
        dir_mode = 0o777 if self.mode is None else _dir_mode(self.mode)
        # A private store's missing parents are made private too: a parent
        # others can write would let them swap the store for another.
        created = _makedirs(self.path, dir_mode, self.mode is not None)
        for area in PREPARED:
            if _makedirs(self._dirs[area], dir_mode, self.mode is not None):
                created.append(self._dirs[area])
        self._caps = None
        self._backlog = []
        self._due.forget()
        if self.durable and created:
            # Each new directory's entry lives in its parent.
            for parent in sorted({os.path.dirname(d) for d in created}):
                _tree.sync_dir(parent)

    @overload
    def create(
        self,
        name: str | None = None,
        mode: TextWriteMode = "w",
        *,
        buffering: int = -1,
        encoding: str | None = None,
        errors: str | None = None,
        newline: str | None = None,
    ) -> TextIO: ...

    @overload
    def create(
        self,
        name: str | None,
        mode: BinaryWriteMode,
        *,
        buffering: int = -1,
        encoding: None = None,
        errors: None = None,
        newline: None = None,
    ) -> BinaryIO: ...

    @overload
    def create(
        self,
        name: str | None = None,
        *,
        mode: BinaryWriteMode,
        buffering: int = -1,
        encoding: None = None,
        errors: None = None,
        newline: None = None,
    ) -> BinaryIO: ...

    @overload
    def create(
        self,
        name: str | None = None,
        mode: str = "w",
        *,
        buffering: int = -1,
        encoding: str | None = None,
        errors: str | None = None,
        newline: str | None = None,
    ) -> IO[Any]: ...

    def create(
        self,
        name: str | None = None,
        mode: str = "w",
        *,
        buffering: int = -1,
        encoding: str | None = None,
        errors: str | None = None,
        newline: str | None = None,
    ) -> Any:
        """Create a new file in ``tmp/`` and return it open for writing.

        The file object's ``name`` is the full path.  An existing file is
        never truncated and a symlink planted in ``tmp/`` is never followed.

        :param name: the file's name; by default a :meth:`unique_name`.
        :param mode: ``'w'``, ``'wt'`` or ``'wb'``; the keywords are
            ``open()``'s.
        :raises FileExistsError: ``tmp/name`` exists (or is a symlink).
        """
        _fileobj.check_write_mode(mode)
        name = self.unique_name() if name is None else self._name(name, "tmp", message=True)
        path = os.path.join(self._checked("tmp"), name)
        try:
            fd = _staging.open_exclusive(path, self.mode)
        except FileNotFoundError:
            raise self._not_prepared("tmp") from None
        try:
            return _fileobj.open_fd(fd, mode, path, buffering, encoding, errors, newline)
        except BaseException:
            _tree.unlink_quietly(path)  # open_fd closed the descriptor
            raise

    def list(self, area: Area) -> builtins.list[str]:
        """The full paths of the files in ``area``, sorted by name.

        ``area`` is ``'tmp'``, ``'new'``, ``'cur'``, ``'dead'`` or
        ``'delay'``.  Unique names sort by time, and names in ``delay/``
        by when they are due (``<due microseconds>.<name>``).  The library's
        hidden staging files are left out.
        """
        directory = self._area(area)
        try:
            self._checked(area)
        except FileNotFoundError:
            if area in LATE and os.path.isdir(self._checked("new")):
                return []  # no message has died (or waited) yet
            raise
        if area == "new":  # what a swap stopped half-way left: back first
            _shrink.finish(self.path, directory, self.durable)
        names = os.listdir(directory)
        return [os.path.join(directory, n) for n in sorted(names) if not n.startswith(".")]

    def stats(self) -> dict[str, dict[str, Any]]:
        """For each area, how many files it holds and how old the oldest is.

        ``{"new": {"count": 2, "oldest_age": 12.5}, ...}``, ages in seconds
        (None for an empty area).  Ages come from the names where they tell
        it, so that a backlog of a million costs one listing and no
        ``stat``: a unique name's time in ``new/`` and ``dead/``, a claim's
        time in ``cur/``.  In ``delay/``, ``oldest_age`` is None and
        ``next_due_in`` tells when the earliest message is due (0 if it is
        due already).  Other names go by their modification time.  Hidden
        names are not counted.
        """
        now = time.time()
        result: dict[str, dict[str, Any]] = {}
        _shrink.finish(self.path, self._checked("new"), self.durable)
        for area in AREAS:
            try:
                names = [n for n in os.listdir(self._checked(area)) if n[:1] != "."]
            except FileNotFoundError:
                if area not in LATE:
                    raise
                names = []
            if area == "new":
                # What a swap stopped half-way left, and this process could
                # not move back (no write permission): still waiting.
                names += _shrink.waiting_in_old_new(self.path, self._dirs["new"])
            row: dict[str, Any] = {"count": len(names), "oldest_age": None}
            if area == "delay":
                dues = [d[0] for d in map(_delays.split, names) if d is not None]
                row["next_due_in"] = max(0.0, min(dues) / 1e6 - now) if dues else None
            else:
                oldest = self._oldest(area, names)
                if oldest is not None:
                    row["oldest_age"] = round(max(0.0, now - oldest), 3)
            result[area] = row
        return result

    def _oldest(self, area: str, names: builtins.list[str]) -> float | None:
        """The time of the oldest of ``names`` in ``area``, from the names
        where they tell it, else from modification times."""
        times = []
        others = names
        if area in ("new", "dead"):
            # Unique names sort by time: only the first of them is read.
            unique = [n for n in names if n[:1].isdigit()]
            first = _info.name_time(min(unique)) if unique else None
            if first is not None or not unique:
                others = [n for n in names if not n[:1].isdigit()]
                if first is not None:
                    times.append(first)
        elif area == "cur":
            others = []
            for name in names:
                claimed = split_info(name)[1].get("C", "")
                if claimed.isdigit():
                    times.append(int(claimed) / 1e6)
                else:
                    others.append(name)
        directory = self._dirs[area]
        for name in others:
            try:
                times.append(os.lstat(os.path.join(directory, name)).st_mtime)
            except FileNotFoundError:  # taken meanwhile
                continue
        return min(times) if times else None

    def move(self, name: str, src: Area, dst: Area, *, overwrite: bool = False) -> None:
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
        name = self._name(name, src, message=dst in ("tmp", "new"))
        self._checked(src), self._checked(dst)
        source, target = os.path.join(src_dir, name), os.path.join(dst_dir, name)
        if self.durable and src == "tmp":
            _sync_file(source)
        if overwrite:
            _tree.retried(lambda: _syscalls.rename(source, target), target, source)
        else:
            _rename.rename_noreplace(source, target, self._capabilities(), durable=self.durable)
        if self.durable:
            _tree.sync_dir(dst_dir)
            _tree.sync_dir(src_dir)

    def copy(self, name: str, src: Area, dst: Area, *, overwrite: bool = False) -> None:
        """Copy the file ``name`` from area ``src`` to area ``dst``.

        The copy is written under a hidden name and published complete, with
        the source's mode: no half-copied file is ever visible in ``dst``.

        :raises FileExistsError: ``dst`` has a file of that name.
        :raises FileNotFoundError: ``src`` has no such file.
        """
        src_dir, dst_dir = self._area(src), self._area(dst)
        if src_dir == dst_dir:
            raise ValueError(f"src and dst are the same area: {src!r}")
        name = self._name(name, src, message=dst in ("tmp", "new"))
        self._checked(src), self._checked(dst)
        source, target = os.path.join(src_dir, name), os.path.join(dst_dir, name)
        if not overwrite and os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), target)
        staged = _staging.Temp()
        try:
            with open_regular(source, "rb", buffering=0) as src_file:
                # As cp(1): the source's mode minus the umask, unless the
                # store sets the mode.
                mode = stat.S_IMODE(os.fstat(src_file.fileno()).st_mode) & 0o777
                temp, _ = _staging.open_temp(staged, dst_dir, name, self.mode, create_mode=mode)
                _staging.fill(staged, src_file, self.durable)
            caps = None if overwrite else self._capabilities()
            _staging.publish(temp, target, caps, self.durable)
            staged.published()
        except BaseException:
            staged.discard()
            raise

    def remove(self, name: str, area: Area) -> None:
        """Remove the file ``name`` from ``area``.

        :raises FileNotFoundError: there is no such file.
        """
        directory = self._area(area)
        name = self._name(name, area)
        _syscalls.unlink(os.path.join(self._checked(area), name))
        if self.durable:
            _tree.sync_dir(directory)

    # -- the work queue -------------------------------------------------

    def add(self, data: Data, encoding: str = "utf-8", *, delay: Duration | None = None) -> str:
        """Deliver ``data`` as a new message into ``new/`` and return its name.

        The message is written complete (and fsynced, with ``durable``)
        before it gets its :meth:`unique_name` in ``new/``: as a file without
        a name in ``new/`` itself (O_TMPFILE), given one by ``link()``, or
        where the filesystem cannot make such a file, in ``tmp/`` and then
        moved.  With ``durable`` it is on disk when this returns.  No
        consumer ever sees part of it, and a process killed at any moment
        leaves nothing behind (on the first way) or a file in ``tmp/`` that
        :meth:`clean` removes.

        :param data: bytes, a str encoded with ``encoding``, or a binary
            file object, which is copied in chunks (memory stays flat).
        :param delay: seconds (or a timedelta) before the message can be
            claimed: until then it waits in ``delay/``.
        """
        due_us = self._due_time(delay)
        staged = _staging.Temp()
        try:
            name = self._stage(staged, data, encoding, unnamed=True)
            if due_us:
                self._publish_delayed(staged, name, due_us)
                return name
            if staged.fd is not None:  # unnamed, in new/
                _staging.link_anonymous(staged, f"{self._dirs['new']}/{name}", self.durable)
                return name
            new_dir = self._checked("new")
            _staging.publish(
                f"{self._dirs['tmp']}/{name}",
                f"{new_dir}/{name}",
                self._capabilities(),
                self.durable,
            )
            staged.published()
        except OSError as e:
            staged.discard()
            if e.filename is None:  # write(2) and fsync(2) name no file
                raise OSError(e.errno, e.strerror, self._dirs["new"]) from e
            raise
        except BaseException:
            staged.discard()
            raise
        return name

    def add_many(
        self, items: Iterable[Data], encoding: str = "utf-8", *, delay: Duration | None = None
    ) -> builtins.list[str]:
        """Deliver several messages with one fsync of ``new/`` for them all.

        Each message is written and fsynced in ``tmp/``; then all are moved
        into ``new/`` and ``new/`` is fsynced once.  The batch is durable when
        this returns; a crash never shows part of a message.  If anything
        fails before the moves, nothing is delivered.

        :returns: the names, in order.
        """
        with self.batch() as batch:
            for data in items:
                batch.add(data, encoding, delay=delay)
        return batch.published

    def batch(self) -> Batch:
        """A :class:`Batch`: add messages, publish them all when it closes."""
        return Batch(self)

    def claim(self, wait: Duration | None = None, *, oldest: bool = True) -> Claim | None:
        """Claim the oldest message of ``new/`` by moving it into ``cur/``.

        The rename decides: two consumers, in any processes, never claim the
        same message.  The claimed name records the attempt count, the time
        and the claimant.

        :param wait: seconds (or a timedelta) to wait for a message when
            ``new/`` is empty (``math.inf``: for ever); it is woken by
            inotify, not by busy polling.  A signal handler that raises
            interrupts the wait.
        :param oldest: False claims any waiting message, found without
            listing ``new/`` (a fresh consumer's first claim costs the same
            with a million waiting as with one); due delayed messages are
            still taken first.
        :returns: the :class:`Claim`, or None when ``new/`` is (still) empty.
        """
        claim = self._claim_now() if oldest else self._claim_any()
        if claim is not None or not wait:
            return claim
        deadline = time.monotonic() + seconds(wait, "wait")
        with self._waiter() as waiter:
            while True:
                claim = self._claim_while_waiting(oldest)
                if claim is not None:
                    return claim
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                waiter.wait(None if remaining == math.inf else remaining)

    def work(
        self,
        handler: Callable[[Claim], object],
        *,
        workers: int = 1,
        lease: Duration | None = None,
        drain: bool = False,
    ) -> Report:
        """Run ``handler(claim)`` for each message, ``workers`` at once.

        Each claim gets a thread of its own.  A handler that returns
        finishes the message; one that raises releases it (the store's
        ``retry_delay`` and ``max_attempts`` apply: it may wait in
        ``delay/`` or go to ``dead/``), and the error is kept in the
        report's ``errors``.

        :param lease: renew each running claim every third of it, and
            recover claims older than it (left by dead workers) every half
            of it.  Without it claims are never renewed nor recovered here.
        :param drain: return once no message is claimable, none waits in
            ``delay/`` and no handler runs; by default run until stopped.
        :returns: the :class:`Report` (done, failed, lost, cancelled).
        :raises KeyboardInterrupt: after the running handlers ended: the
            first Ctrl-C stops claiming and lets them finish; a second one
            gives their messages back, uncounted, as soon as they return; a
            third leaves their claims to :meth:`recover`.
        :raises OSError: an error of the runner itself (a claim or a
            recovery that failed), likewise after the running handlers
            ended and their messages were finished or released.

        Stop it from another thread (or a signal handler) through
        :meth:`worker`, which returns the :class:`Worker` unstarted.
        """
        return self.worker(handler, workers=workers, lease=lease, drain=drain).run()

    def worker(
        self,
        handler: Callable[[Claim], object],
        *,
        workers: int = 1,
        lease: Duration | None = None,
        drain: bool = False,
    ) -> Worker:
        """The :class:`Worker` :meth:`work` runs: ``run()`` it, ``stop()``
        it from anywhere."""
        from ._work import ThreadJob, Worker

        return Worker(
            self,
            lambda claim: ThreadJob(handler, claim),
            workers=workers,
            lease=None if lease is None else seconds(lease, "lease"),
            drain=drain,
        )

    def claims(self, *, timeout: Duration | None = None) -> Claims:
        """An iterator of claims, waiting for each message as it arrives.

        Stop it from another thread or a signal handler with
        :meth:`Claims.stop`; close it (or use it as a context manager) to
        release its inotify descriptor.

        :param timeout: stop when no message arrived for this many seconds;
            by default wait for ever.
        """
        if timeout is not None:
            timeout = seconds(timeout, "timeout")
        return Claims(self._claim_while_waiting, self._waiter(), timeout)

    def _claim_while_waiting(self, oldest: bool = True) -> Claim | None:
        """:meth:`_claim_now` for a waiter: a store being made anew (moved
        aside, not yet prepared again) is waited for, not an error."""
        try:
            return self._claim_now() if oldest else self._claim_any()
        except FileNotFoundError as e:
            if e.filename not in (self._dirs["new"], self._dirs["cur"]):
                raise
            return None

    def _waiter(self) -> _watch.Waiter:
        try:
            return _watch.Waiter(
                self._dirs["new"],
                self.poll_interval,
                _DEFAULT_POLL,
                # A message that reached the old new/ of a swap is moved
                # back after the grace period: a waiter looks then.
                settle=_shrink.GRACE + _LEFTOVER_LOOK_EVERY + 0.1,
                look_again_at=lambda: self._old_new_look_at,
            )
        except FileNotFoundError:
            raise self._not_prepared("new") from None

    def _claim_now(self) -> Claim | None:
        self._promote_due()
        # Checked on every claim, not only when listing: an area swapped for
        # a symlink while a listing is worked through is never followed.
        new_dir, cur_dir = self._checked("new"), self._checked("cur")
        backlog = self._backlog
        lost = 0
        while True:
            if not backlog:
                if lost:
                    # Every rename failed: perhaps cur/ (or new/) went away.
                    new_dir, cur_dir = self._checked("new"), self._checked("cur")
                backlog = self._backlog = self._list_new()
                if not backlog:
                    return None
            try:
                if lost and len(backlog) > 1:
                    # Another consumer works the same oldest names: pick among
                    # the next few instead of following it one by one.
                    name = backlog.pop(-1 - _info.scatter(len(backlog)))
                else:
                    name = backlog.pop()
            except (IndexError, ValueError):  # another thread took the last ones
                continue
            claim = self._take(name, new_dir, cur_dir)
            if claim is _LOST:
                lost += 1
                _skip_taken(backlog, new_dir)
            elif claim is not None:
                return claim

    def _claim_any(self) -> Claim | None:
        """Claim any waiting message: one of the first few a read of
        ``new/`` returns, without listing it all."""
        self._promote_due()
        new_dir, cur_dir = self._checked("new"), self._checked("cur")
        while self._backlog:  # names known already (promoted, listed) first
            try:
                name = self._backlog.pop()
            except IndexError:  # another thread took the last ones
                break
            claim = self._take(name, new_dir, cur_dir)
            if claim is not None and claim is not _LOST:
                return claim
        skip = self._unclaimable
        now = time.monotonic()
        if now >= self._next_leftover_look:
            self._finish_shrink(new_dir, now)
        seen = 0
        with os.scandir(new_dir) as entries:
            while True:
                names = []
                for entry in entries:
                    seen += 1
                    name = entry.name
                    if name[0] != "." and entry.is_file(follow_symlinks=False) and name not in skip:
                        names.append(name)
                        if len(names) == _ANY_AMONG:
                            break
                if not names:
                    break  # the whole directory read: nothing to claim
                # Consumers that all read the same first names start at
                # different ones; names that cannot be claimed here send
                # this one on to the next few.
                start = _names.random_below(len(names))
                for name in names[start:] + names[:start]:
                    claim = self._take(name, new_dir, cur_dir)
                    if claim is not None and claim is not _LOST:
                        return claim
        if not seen and now >= self._next_shrink:
            self._shrink_new(new_dir, now)
        return None

    def _take(self, name: str, new_dir: str, cur_dir: str) -> Claim | None:
        """Claim the message ``name`` of ``new/``.

        :returns: the claim; :data:`_LOST` if another consumer took it
            first; None if it cannot be claimed here (passed over for good).
        """
        base, fields = split_info(name)
        attempts = _info.attempts(fields)
        claimed = time.time_ns() // 1000
        token = _info.token()
        claim_name = _info.claim_name(base, attempts, claimed, token)
        if len(claim_name) > NAME_MAX // 4 and len(os.fsencode(claim_name)) > NAME_MAX:
            # A foreign name too long to carry the info part: claimed under a
            # shortened form of itself.
            base = _info.shorten(
                base, NAME_MAX - (len(os.fsencode(claim_name)) - len(os.fsencode(base)))
            )
            claim_name = _info.claim_name(base, attempts, claimed, token)
        source, claim_path = f"{new_dir}/{name}", f"{cur_dir}/{claim_name}"
        try:
            # A plain rename: the claim name is new (random token), so it
            # cannot replace anything; the source's disappearance decides
            # between consumers racing for the same message.
            _syscalls.rename(source, claim_path)
        except FileNotFoundError:
            # Another consumer was faster.  Not looked at further: on
            # CephFS, consumers that looked into cur/ after each race lost
            # stalled for minutes.
            return _LOST
        except OSError as e:
            if e.errno == errno.ENAMETOOLONG or (
                e.errno == errno.EPERM and _owned_by_another(source)
            ):
                # Longer than this filesystem allows a claim, or another
                # user's file in a sticky new/: never again in this process;
                # it stays in new/ for an operator or its owner.
                self._unclaimable.add(name)
                return None
            # An outcome unknown or refused: look.  The claim name is ours
            # alone; only a file there is our claim (EISDIR: something was
            # planted at it).  EIO and its kind (a network filesystem whose
            # reply was lost, or that lost the race) may take a moment to
            # show.
            won = _claim_outcome(claim_path, source, e.errno in UNKNOWN_OUTCOME)
            if won is None:
                raise
            if not won:
                return _LOST
        if self.durable:
            _tree.sync_dir(cur_dir)
            _tree.sync_dir(new_dir)
        return Claim(self, base, claim_path, attempts, claimed / 1e6, token)

    def _list_new(self) -> builtins.list[str]:
        """The claimable names of ``new/``, oldest last: all of them, or
        the oldest :data:`_BACKLOG_MAX` of a bigger backlog (listed again
        when those are claimed), so that a consumer's memory stays flat
        whatever waits.

        Only regular files are candidates: hidden names (staging files,
        ``.nfsXXXX``, ``.DS_Store``), directories, FIFOs, sockets, devices
        and symlinks stay where they are, as do names this process found
        it cannot claim.
        """
        new_dir = self._dirs["new"]
        now = time.monotonic()
        if now >= self._next_leftover_look:
            self._finish_shrink(new_dir, now)
        skip = self._unclaimable
        names: builtins.list[str] = []
        # Once more than _BACKLOG_MAX were found, only names older than the
        # youngest kept can be kept: the rest are passed over at once.
        youngest = None
        seen = 0
        with os.scandir(new_dir) as entries:
            for seen, entry in enumerate(entries, 1):  # noqa: B007 - counted
                name = entry.name
                if (
                    name[0] == "."
                    or (youngest is not None and name >= youngest)
                    or not entry.is_file(follow_symlinks=False)
                    or name in skip
                ):
                    continue
                names.append(name)
                if len(names) >= 2 * _BACKLOG_MAX:
                    names.sort()
                    del names[_BACKLOG_MAX:]
                    youngest = names[-1]
        if not seen and now >= self._next_shrink:
            self._shrink_new(new_dir, now)
        names.sort(reverse=True)
        if len(names) > _BACKLOG_MAX:
            del names[: len(names) - _BACKLOG_MAX]  # the youngest, at the front
        return names

    def _shrink_new(self, new_dir: str, now: float) -> None:
        """Swap an emptied ``new/`` for a fresh one where the filesystem
        never shrinks a directory (ext4): see :mod:`._shrink`."""
        if _shrink.worth_it(new_dir, self._capabilities):
            self._next_shrink = now + _SHRINK_EVERY
            _shrink.shrink(self.path, new_dir, self.durable)
        else:
            self._next_shrink = now + _SHRINK_LOOK_EVERY

    def _finish_shrink(self, new_dir: str, now: float) -> None:
        """Finish the swap of an emptied ``new/`` that another consumer left
        (see :mod:`._shrink`); one still settling is looked at again once
        its grace period is over, by a waiter too."""
        found = _shrink.finish(self.path, new_dir, self.durable)
        # Entries that cannot be moved back: its owner's consumers will.
        every = _LEFTOVER_STUCK_EVERY if found == _shrink.STUCK else _LEFTOVER_LOOK_EVERY
        self._next_leftover_look = now + every
        self._old_new_look_at = now + _shrink.GRACE + 0.1 if found == _shrink.SETTLING else None

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
        return Claim(self, base, path, _info.attempts(fields), claimed_at, token)

    def _promote_due(self) -> None:
        """Move the delayed messages that are due into ``new/``, claimable
        first (they are the oldest of all)."""
        due = self._due.due()
        if not due:
            return
        new_dir, delay_dir = self._checked("new"), self._checked("delay")
        caps = self._capabilities()
        promoted = []
        for entry in due:
            split = _delays.split(entry)
            assert split is not None
            if split[1][:1] == "." or not _is_regular(f"{delay_dir}/{entry}"):
                continue  # claimed only as new/ would have it: a visible file
            try:
                _rename.rename_noreplace(
                    f"{delay_dir}/{entry}", f"{new_dir}/{split[1]}", caps, durable=self.durable
                )
            except (FileNotFoundError, FileExistsError):
                # Moved by another consumer; or its name is taken in new/:
                # it waits in delay/ for an operator.
                continue
            promoted.append(split[1])
        if promoted:
            self._backlog.extend(reversed(promoted))  # the earliest due last: next
            if self.durable:
                _tree.sync_dir(new_dir)
                _tree.sync_dir(delay_dir)

    def recover(self, older_than: Duration) -> builtins.list[str]:
        """Return claims older than ``older_than`` to ``new/`` (or ``dead/``).

        A claim's age counts from its claim or its last :meth:`Claim.renew`.
        Each counts one attempt.  The consumer that held a recovered claim
        can no longer finish or release it (:class:`ClaimLostError`), even
        after another consumer claimed the message again.  Files moved into
        ``cur/`` with :meth:`move` are not claims and stay.

        :param older_than: the lease, in seconds or as a timedelta.
        :returns: the paths the recovered messages have now.
        :raises FileExistsError: a recovered message's name was taken in
            ``new/`` (the claim stays in ``cur/``), after every other claim
            was recovered.
        """
        lease = seconds(older_than)
        now = time.time_ns() // 1000
        # A lease longer than the epoch (inf, timedelta.max): nothing is
        # that old.
        limit = now - int(lease * 1e6) if lease < now / 1e6 else -1
        cur_dir = self._checked("cur")
        recovered = []
        clash: OSError | None = None
        for name in sorted(os.listdir(cur_dir)):
            base, fields = split_info(name)
            try:
                claimed = int(fields["C"])
            except (KeyError, ValueError):
                continue  # not a claim
            if claimed > limit:
                continue
            source = os.path.join(cur_dir, name)
            try:
                # Claim.renew() moves the file's modification time on.  One
                # far ahead of this clock is a producer's, not a renewal.
                if limit < os.lstat(source).st_mtime_ns // 1000 <= now + _CLOCK_SLACK_US:
                    continue
                path = self._give_back(source, base, _info.attempts(fields) + 1)
            except FileNotFoundError:
                continue  # finished or recovered meanwhile
            except OSError as e:
                # Its name taken in new/ (it stays claimed: never clobber),
                # another user's claim in a sticky cur/, an I/O error: the
                # others are still recovered, and the first error raised.
                clash = clash or e
                continue
            _log.info(
                "recovered %s, claimed %.1f s ago: now %s", source, (now - claimed) / 1e6, path
            )
            recovered.append(path)
        if clash is not None:
            raise clash
        return recovered

    def requeue(self, name: str) -> str:
        """Move a dead letter back to ``new/`` with its attempts reset.

        :param name: a name (or path) of ``dead/``.
        :returns: its path in ``new/``.
        :raises FileNotFoundError: there is no such dead letter.
        """
        name = self._name(name, "dead")
        base, _ = split_info(name)
        source = os.path.join(self._dirs["dead"], name)
        if not os.path.lexists(self._dirs["dead"]):  # no message has died yet
            self._checked("new")  # or the store is not prepared at all
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), source)
        self._checked("dead")
        target = os.path.join(self._checked("new"), base)
        _rename.rename_noreplace(source, target, self._capabilities(), durable=self.durable)
        if self.durable:
            _tree.sync_dir(self._dirs["new"])
            _tree.sync_dir(self._dirs["dead"])
        return target

    def clean(self, older_than: Duration = atomic.DEFAULT_STALE_AGE) -> builtins.list[str]:
        """Remove stale files from ``tmp/`` and stale staging files elsewhere.

        Staleness is judged by mtime (atime lies on noatime mounts).  Besides
        the library's own staging files, the other areas lose the
        ``.fuse_hidden*`` files a FUSE filesystem (sshfs) leaves when a
        message is finished while the kernel still holds it open.

        :param older_than: seconds or a timedelta; 36 hours by default, as
            the maildir specification advises.
        :returns: the paths removed.
        """
        age = seconds(older_than)
        limit = time.time() - age
        removed = _remove_stale(self._checked("tmp"), limit, lambda name: True)
        # An old new/ a consumer swapped out and was stopped before removing.
        _shrink.finish(self.path, self._checked("new"), self.durable)
        for area in ("new", "cur", "dead"):
            if area == "dead" and not os.path.lexists(self._dirs["dead"]):
                continue
            directory = self._checked(area)
            removed.extend(atomic.clean(directory, older_than=older_than))
            removed.extend(_remove_stale(directory, limit, _is_fuse_leftover))
        if self.durable and removed:
            for directory in sorted({os.path.dirname(p) for p in removed}):
                _tree.sync_dir(directory)
        for path in removed:
            _log.info("clean() removed %s", path)
        return removed


def _is_regular(path: str) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _skip_taken(backlog: builtins.list[str], new_dir: str) -> None:
    """After a race lost on the oldest name of ``backlog``: drop the names
    behind it that are gone too.

    Other consumers take the oldest names as well, so those just behind a
    lost one are likely gone: looked at 1, 2, 4, 8... names in with an
    ``lstat`` each, the ones before the first still waiting are dropped
    from this listing, instead of each costing a claim that fails.  (One
    dropped while still waiting is claimed by another consumer, or here
    after the next listing.)
    """
    step = 1
    while step <= len(backlog):
        if os.path.lexists(f"{new_dir}/{backlog[-step]}"):
            break
        step *= 2
    gone = min(step // 2, len(backlog))  # looked at, and gone
    if gone:
        del backlog[-gone:]


def _owned_by_another(path: str) -> bool:
    try:
        return os.lstat(path).st_uid != os.geteuid()
    except OSError:
        return False


def _same_directory(a: str, b: str) -> bool:
    """Whether the paths ``a`` and ``b`` name one directory, however spelled."""
    try:
        return os.path.samestat(os.stat(a), os.stat(b))
    except OSError:
        return False


def _is_fuse_leftover(name: str) -> bool:
    # libfuse renames a file unlinked while open to .fuse_hiddenXXXX and
    # deletes it on release, which can be lost in a race (sshfs cannot turn
    # it off with hard_remove).
    return name.startswith(".fuse_hidden")


def _remove_stale(directory: str, limit: float, pick: Callable[[str], bool]) -> builtins.list[str]:
    """Remove the entries of ``directory`` that ``pick`` names, older than ``limit``."""
    with os.scandir(directory) as entries:
        stale = [e.path for e in entries if pick(e.name) and _mtime(e) <= limit]
    removed = []
    for path in stale:
        try:
            _tree.remove_tree(path)
        except FileNotFoundError:  # pragma: no cover - removed meanwhile
            continue
        except OSError as e:
            if e.errno != errno.ENOTEMPTY:
                raise
            continue  # a directory still being filled (a probe under way)
        removed.append(path)
    return removed


def _mtime(entry: os.DirEntry[str]) -> float:
    try:
        return entry.stat(follow_symlinks=False).st_mtime
    except FileNotFoundError:
        return float("inf")


def _sync_file(path: str) -> None:
    fd = _syscalls.open(path, READ_FLAGS)
    _staging.sync_and_close(fd, True)
