"""Batches: many messages published with one fsync of ``new/``."""

from __future__ import annotations

import builtins
import os
from typing import TYPE_CHECKING

from . import _staging, _tree

if TYPE_CHECKING:
    from ._store import Data, FileStore


class Batch:
    """Messages staged in ``tmp/`` and published together.

    Each :meth:`add` writes and fsyncs one message in ``tmp/``; closing the
    batch moves them all into ``new/`` and fsyncs ``new/`` once.  Used as a
    context manager, the batch is published when the block ends normally
    and discarded (nothing delivered) when it raises.

    :ivar published: the names delivered so far, in order.
    """

    def __init__(self, store: FileStore) -> None:
        self._store = store
        self._staged: builtins.list[tuple[str, str]] = []
        self.published: builtins.list[str] = []

    def add(self, data: Data, encoding: str = "utf-8") -> str:
        """Stage a message; return the name it will have in ``new/``."""
        staged = _staging.Temp()
        try:
            name = self._store._stage(staged, data, encoding)
            self._staged.append((name, f"{self._store._dirs['tmp']}/{name}"))
            staged.hand_over()  # the batch's to publish or discard now
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
        try:
            while self._staged:
                name, temp = self._staged[0]
                _staging.publish(temp, os.path.join(new_dir, name), store._capabilities(), False)
                _staging.let_go(temp)
                self._staged.pop(0)
                self.published.append(name)
        finally:
            self.discard()
            if store.durable and self.published:
                _tree.sync_dir(new_dir)
        return self.published

    def discard(self) -> None:
        """Remove what is staged and not yet published."""
        while self._staged:
            temp = self._staged[-1][1]
            _tree.unlink_quietly(temp)
            _staging.let_go(temp)
            self._staged.pop()

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()
