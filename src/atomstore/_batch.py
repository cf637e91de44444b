"""Batches: many messages published with one fsync of ``new/``."""

from __future__ import annotations

import builtins
import collections
import errno
import os

from . import _delays, _staging, _syscalls, _tree

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
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
    first :data:`UNNAMED_MAX` messages of a batch: 64 with the usual limit
    of 1024 descriptors) or in ``tmp/``; closing the batch gives them their
    names in ``new/`` and fsyncs ``new/`` once.  Used as a context manager,
    the batch is published when the block ends normally and discarded
    (nothing delivered) when it raises.  A process killed before the batch
    is published delivers none of it.

    :ivar published: the names delivered so far, in order.
    """

    def __init__(self, store: Areas) -> None:
        self._store = store
        # In order: each message's name, its staging file (open and without
        # a name in new/, or closed under a name in tmp/), and when it is
        # due (0: not delayed).  The batch holds the staging files
        # themselves: nothing moves from one holder to another, where an
        # interruption could lose it.
        self._staged: collections.deque[tuple[str, _staging.Temp, int]] = collections.deque()
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
        # Guarded: held by the batch from here on, collected with it.
        staged = _staging.GuardedTemp()
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
            # Interrupted right after, the discard below empties the file,
            # and an empty one is passed over.
            self._staged.append((name, staged, due_us))
        except BaseException:
            staged.discard()
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
            if fd is None or entry.path is not None:
                continue
            temp = f"{tmp_dir}/{name}"
            entry.name(temp)  # held before it exists
            try:
                _syscalls.link_fd(fd, temp)
            except OSError as e:
                raise OSError(e.errno, e.strerror, temp) from None
            self._unnamed -= 1
            entry.close()  # named now: published by its name

    def commit(self) -> builtins.list[str]:
        """Publish what was staged (durable on return); return the names.

        If a move fails midway, the messages before it stay delivered (in
        :attr:`published`) and the rest are discarded.
        """
        store = self._store
        staged = self._staged
        try:
            new_dir = store._checked("new")
            delay_dir = store._make_late("delay") if any(due for _, _, due in staged) else None
        except BaseException:
            self.discard()
            raise
        synced: set[str] = set()
        try:
            while staged:
                name, entry, due_us = staged[0]
                if entry.fd is None and entry.path is None:
                    staged.popleft()  # emptied by an interrupted add()
                    continue
                if due_us:
                    target = f"{delay_dir}/{_delays.delayed_name(name, due_us)}"
                else:
                    target = f"{new_dir}/{name}"
                try:
                    self._publish(entry, target)
                except FileExistsError:
                    raise  # the name is another's: nothing of ours is there
                except BaseException:
                    # Interrupted as the move returned, the message is
                    # delivered: it must be said, or a retry sends it twice.
                    moved = entry.fd is not None or not os.path.lexists(entry.path or "")
                    if moved and os.path.lexists(target):
                        self._published(name, entry)
                        synced.add(os.path.dirname(target))
                    raise
                self._published(name, entry)
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
        try:
            _syscalls.link_fd(fd, target)  # never replaces anything
        except OSError as e:
            raise OSError(e.errno, e.strerror, target) from None

    def _published(self, name: str, entry: _staging.Temp) -> None:
        """The first staged message is in its area: say so, then let go of
        its staging file (a name a spill cut short gave it too goes)."""
        self._staged.popleft()
        self.published.append(name)
        if entry.fd is not None:
            self._unnamed -= 1
            entry.discard()  # closed, and its name in tmp/, if any, removed
        else:
            entry.unname()  # renamed: nothing left under that name

    def discard(self) -> None:
        """Remove what is staged and not yet published."""
        staged = self._staged
        while staged:
            _, entry, _ = staged[-1]
            if entry.fd is not None:
                self._unnamed -= 1
            entry.discard()  # twice is harmless
            staged.pop()

    def __enter__(self) -> Batch:
        return self

    def __del__(self) -> None:
        # A batch dropped without commit() or discard() delivers nothing and
        # holds nothing: its descriptors are closed, its files in tmp/ go.
        # (Not a forked child's copy: its files are its parent's.)
        if getattr(self, "_staged", None) and getattr(self, "_pid", None) == os.getpid():
            try:
                self.discard()
            except BaseException:  # interrupted in turn: finish, quietly
                self.discard()

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()
