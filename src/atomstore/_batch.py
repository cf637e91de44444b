"""Batches: many messages published with one fsync of ``new/``."""

from __future__ import annotations

import builtins
import collections

from . import _staging, _syscalls, _tree

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    from ._store import Data, FileStore

# Messages of one batch held as open files without a name; the rest of a
# larger batch is staged in tmp/ (a descriptor each would exhaust the
# process's limit, 1024 by default).
UNNAMED_MAX = 256


class Batch:
    """Messages staged and published together.

    Each :meth:`add` writes one message complete and fsyncs it
    (``durable``), as a file without a name in ``new/`` (O_TMPFILE, for up
    to 256 messages of a batch) or in ``tmp/``; closing the batch gives them
    their names in ``new/`` and fsyncs ``new/`` once.  Used as a context manager,
    the batch is published when the block ends normally and discarded
    (nothing delivered) when it raises.  A process killed before the batch
    is published delivers none of it.

    :ivar published: the names delivered so far, in order.
    """

    def __init__(self, store: FileStore) -> None:
        self._store = store
        # In order: each message's name, and its path in tmp/ or the
        # descriptor of its unnamed file in new/.
        self._staged: collections.deque[tuple[str, str | int]] = collections.deque()
        self._unnamed = 0
        self.published: builtins.list[str] = []

    def add(self, data: Data, encoding: str = "utf-8") -> str:
        """Stage a message; return the name it will have in ``new/``."""
        staged = _staging.Temp()
        try:
            store = self._store
            name = store._stage(staged, data, encoding, unnamed=self._unnamed < UNNAMED_MAX)
            if staged.fd is not None and store.durable:
                _syscalls.fsync(staged.fd)  # synced now, as a message in tmp/ is
            entry = staged.fd if staged.fd is not None else staged.path
            assert entry is not None
            # The batch's to publish or discard from now on (a descriptor
            # lost to an interruption here leaves no file; a name stays held).
            staged.hand_over()
            self._staged.append((name, entry))
            if isinstance(entry, int):
                self._unnamed += 1
        except BaseException:
            staged.discard()
            raise
        return name

    def commit(self) -> builtins.list[str]:
        """Publish what was staged (durable on return); return the names.

        If a move fails midway, the messages before it stay delivered (in
        :attr:`published`) and the rest are discarded.
        """
        store = self._store
        try:
            new_dir = store._checked("new")
        except BaseException:
            self.discard()
            raise
        staged = self._staged
        try:
            while staged:
                name, entry = staged.popleft()
                try:
                    self._publish(entry, f"{new_dir}/{name}")
                except BaseException:
                    staged.appendleft((name, entry))  # still to discard
                    raise
                self.published.append(name)
        finally:
            self.discard()
            if store.durable and self.published:
                _tree.sync_dir(new_dir)
        return self.published

    def _publish(self, entry: str | int, target: str) -> None:
        store = self._store
        if isinstance(entry, str):
            _staging.publish(entry, target, store._capabilities(), False)
            _staging.let_go(entry)
            return
        try:
            _syscalls.link_fd(entry, target)  # never replaces anything
        except OSError as e:
            raise OSError(e.errno, e.strerror, target) from None
        self._unnamed -= 1
        _staging.close_quietly(entry)  # named now: nothing left to discard

    def discard(self) -> None:
        """Remove what is staged and not yet published."""
        staged = self._staged
        while staged:
            _, entry = staged[-1]
            if isinstance(entry, int):
                # Forgotten before it is closed: interrupted in between, a
                # second discard must not close a number reused meanwhile.
                staged.pop()
                self._unnamed -= 1
                _staging.close_quietly(entry)  # an unnamed file dies with it
            else:
                _tree.unlink_quietly(entry)
                _staging.let_go(entry)
                staged.pop()

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()
