"""Batches: many messages published with one fsync of ``new/``."""

from __future__ import annotations

import builtins
import collections
import errno
import os

from . import _delays, _staging, _syscalls, _tree

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    from typing import Any

    from ._areas import Areas, Data
    from ._args import Duration

# Messages of one batch held as open files without a name: at most a
# sixteenth of the process's descriptor limit (64 of the usual 1024), so
# that several batches at once leave the application its descriptors.  The
# rest of a larger batch is staged in tmp/, as is everything once the
# process runs out of descriptors.
try:
    UNNAMED_MAX = max(1, min(256, os.sysconf("SC_OPEN_MAX") // 16))
except (AttributeError, ValueError, OSError):  # pragma: no cover - no sysconf
    UNNAMED_MAX = 64


class Batch:
    """Messages staged and published together.

    Each :meth:`add` writes one message complete and fsyncs it
    (``durable``), as a file without a name in ``new/`` (O_TMPFILE, for the
    first messages of a batch, a sixteenth of the descriptor limit: 64 with
    the usual limit of 1024) or in ``tmp/``; closing the batch gives them their
    names in ``new/`` and fsyncs ``new/`` once.  Used as a context manager,
    the batch is published when the block ends normally and discarded
    (nothing delivered) when it raises.  A process killed before the batch
    is published delivers none of it.

    :ivar published: the names delivered so far, in order.
    """

    def __init__(self, store: Areas) -> None:
        self._store = store
        # In order: [each message's name (None until it is staged), its
        # staging file (open and without a name in new/, or closed under a
        # name in tmp/), when it is due (0: not delayed)].  An entry is
        # held before its file is made: nothing moves from one holder to
        # another, where an interruption could lose it.
        self._staged: collections.deque[list[Any]] = collections.deque()
        self._unnamed = 0  # descriptors held
        self._named_only = False  # the filesystem or the process said no
        self._pid = os.getpid()  # a forked child's copy is not its own
        self.published: builtins.list[str] = []

    def add(self, data: Data, encoding: str = "utf-8", *, delay: Duration | None = None) -> str:
        """Stage a message; return the name it will have in ``new/``.

        :param delay: as :meth:`FileStore.add`'s: it is published into
            ``delay/``, to wait there.
        """
        store = self._store
        due_us = store._due_time(delay)
        staged = _staging.Temp()
        entry: list[Any] = [None, staged, due_us]
        self._staged.append(entry)  # held by the batch before anything exists
        try:
            unnamed = not self._named_only and self._unnamed < UNNAMED_MAX
            try:
                name = store._stage(staged, data, encoding, unnamed=unnamed)
            except OSError as e:
                # Out of descriptors for the message's own file in tmp/ (the
                # error names tmp/: nothing of ``data`` was read yet), with
                # some of them ours: name those in tmp/ to close them, and
                # try again.  A stream that ran out while it was read is
                # not read twice: that error is the caller's.
                if (
                    e.errno not in (errno.EMFILE, errno.ENFILE)
                    or e.filename != store._dirs["tmp"]
                    or not self._unnamed
                ):
                    raise
                staged.discard()
                self._spill()
                name = store._stage(staged, data, encoding)
            if unnamed and staged.fd is None:
                self._named_only = True  # no use asking again
            if staged.fd is not None:
                if store.durable:
                    _syscalls.fsync(staged.fd)  # synced now, as a message in tmp/ is
                self._unnamed += 1
            entry[0] = name  # staged: to be published
        except BaseException:
            staged.discard()  # the entry stays, empty: passed over
            raise
        return name

    def _spill(self) -> None:
        """Give every message held as a descriptor a name in ``tmp/`` (where
        no consumer looks) and close the descriptor: for a process short of
        them.  The rest of the batch is staged in ``tmp/``."""
        self._named_only = True
        tmp_dir = self._store._checked("tmp")
        for name, entry, _ in self._staged:
            fd = entry.fd
            if name is None or fd is None or entry.path is not None:
                continue
            temp = f"{tmp_dir}/{name}"
            entry.name(temp)  # held before it exists
            _staging.link_unnamed(fd, temp)
            self._unnamed -= 1
            entry.close()  # named now: published by its name

    def commit(self) -> builtins.list[str]:
        """Publish what was staged (durable on return); return the names.

        If a move fails midway, the messages before it stay delivered (in
        ``published``) and the rest are discarded.
        """
        store = self._store
        staged = self._staged
        try:
            new_dir = store._checked("new")
            delay_dir = store._make_late("delay") if any(e[2] for e in staged) else None
        except BaseException:
            self.discard()
            raise
        synced: set[str] = set()
        try:
            while staged:
                name, entry, due_us = staged[0]
                if name is None or (entry.fd is None and entry.path is None):
                    staged.popleft()  # emptied by an interrupted add()
                    continue
                if due_us:
                    target = f"{delay_dir}/{_delays.delayed_name(name, due_us)}"
                else:
                    target = f"{new_dir}/{name}"
                try:
                    self._publish(entry, target)
                    self._published(name, entry)
                except FileExistsError:
                    raise  # the name is another's: nothing of ours is there
                except BaseException:
                    # Interrupted as the move returned, the message is
                    # delivered: it must be said, or a retry sends it twice.
                    said = bool(self.published) and self.published[-1] == name
                    if not said and staged and staged[0][1] is entry and _delivered(entry, target):
                        self._published(name, entry)
                    if self.published and self.published[-1] == name:
                        synced.add(os.path.dirname(target))
                    raise
                synced.add(os.path.dirname(target))
        finally:
            self.discard()
            if store.durable:
                for directory in sorted(synced):
                    _tree.sync_dir(directory)
        return self.published

    def _publish(self, entry: _staging.Temp, target: str) -> None:
        fd = entry.fd
        if fd is None:
            assert entry.path is not None
            _staging.publish(entry.path, target, self._store._capabilities(), False)
            return
        _staging.link_unnamed(fd, target)  # never replaces anything

    def _published(self, name: str, entry: _staging.Temp) -> None:
        """The first staged message is in its area: say so first, then let
        go of its staging file (a name a spill cut short gave it too goes)."""
        self.published.append(name)
        # Let go of the file before the entry: interrupted in between, the
        # entry is left empty, never a descriptor nobody holds.
        if entry.fd is not None:
            self._unnamed -= 1
            entry.discard()  # closed, and its name in tmp/, if any, removed
        else:
            entry.unname()  # renamed: nothing left under that name
        self._staged.popleft()

    def discard(self) -> None:
        """Remove what is staged and not yet published.

        In a forked child the files are its parent's: they are only closed
        here, never removed.
        """
        staged = self._staged
        ours = os.getpid() == self._pid
        while staged:
            entry = staged[-1][1]
            if entry.fd is not None:
                self._unnamed -= 1
            if ours:
                entry.discard()  # twice is harmless
            else:
                entry.close()
            staged.pop()

    def __enter__(self) -> Batch:
        return self

    def __del__(self) -> None:
        # A batch dropped without commit() or discard() delivers nothing and
        # holds nothing: its descriptors are closed, its files in tmp/ go.
        if getattr(self, "_staged", None):
            try:
                self.discard()
            except BaseException:  # interrupted in turn: finish, quietly
                self.discard()

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def _delivered(entry: _staging.Temp, target: str) -> bool:
    """Whether the staged file was given its name, as an interruption
    struck: an open unnamed file has a link once it got one (even if a
    consumer claimed it since); a file in tmp/ is gone from there and
    found at its name."""
    if entry.fd is not None:
        # A name in tmp/ that a spill cut short gave it is one link more.
        spilled = entry.path is not None and os.path.lexists(entry.path)
        try:
            return os.fstat(entry.fd).st_nlink > (1 if spilled else 0)
        except OSError:
            return False
    return entry.path is not None and not os.path.lexists(entry.path) and os.path.lexists(target)
