"""atomstore for programs that run an asyncio event loop.

The same operations, guarantees and errors as :mod:`atomstore.atomic` and
:class:`~atomstore.FileStore`, awaited.  Every call that touches the disk
runs in the loop's default executor (a thread), so nothing blocks the loop
longer than a small system call.  Waiting for a message is driven by the
inotify descriptor, registered on the loop as a reader, with the same
polling rules as the blocking API where inotify cannot see (another host's
writes): no thread waits, and nothing polls busily.

Cancellation leaves nothing behind.  A cancelled call lets the system call
under way finish in its thread, then undoes what it did: a claim made as
its caller was cancelled goes back to ``new/`` (no attempt counted), a file
or message being written is discarded.  One already being published
completes (the destination is then the new version; the message is
delivered) before :class:`asyncio.CancelledError` is raised.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time

from . import _watch, atomic
from ._args import seconds
from ._batch import Batch
from ._claim import ClaimLostError
from ._store import FileStore

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
    from typing import IO, Any, TypeVar

    from ._areas import Data
    from ._args import Duration, StrPath
    from ._claim import Claim

    T = TypeVar("T")

__all__ = ["AsyncClaim", "AsyncFile", "AsyncFileStore", "file", "write_bytes", "write_text"]


async def _in_thread(func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``func`` in the loop's executor; when cancelled, let it finish
    first (a system call cannot be interrupted), then raise."""
    loop = asyncio.get_running_loop()
    future = loop.run_in_executor(None, functools.partial(func, *args, **kwargs))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await _settled(future)
        raise


async def _settled(future: Awaitable[Any]) -> Any:
    """Wait for ``future`` even while being cancelled again; its result, or
    None if it raised."""
    while True:
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            if asyncio.isfuture(future) and future.done():
                return None if future.cancelled() or future.exception() else future.result()
        except Exception:
            return None


async def _undoing(
    func: Callable[..., T], undo: Callable[[Any], object], *args: Any, **kwargs: Any
) -> T:
    """:func:`_in_thread`, and when cancelled, ``undo`` what ``func`` did."""
    loop = asyncio.get_running_loop()
    future = loop.run_in_executor(None, functools.partial(func, *args, **kwargs))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        done = await _settled(future)
        if done is not None:
            await _settled(loop.run_in_executor(None, undo, done))
        raise


# -- atomic writes --------------------------------------------------------------------


async def write_bytes(
    path: StrPath,
    data: bytes | bytearray | memoryview,
    *,
    overwrite: bool = False,
    durable: bool = True,
    follow_symlinks: bool = True,
    perms: int | None = None,
) -> None:
    """:func:`atomstore.atomic.write_bytes`, awaited: written, then
    published; cancelled while written, nothing is published."""
    async with file(
        path,
        "wb",
        overwrite=overwrite,
        durable=durable,
        follow_symlinks=follow_symlinks,
        perms=perms,
    ) as f:
        await f.write(data)
        await f.flush()  # written now: what follows publishes it


async def write_text(
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
    """:func:`atomstore.atomic.write_text`, awaited (newlines written as
    given)."""
    async with file(
        path,
        "w",
        overwrite=overwrite,
        durable=durable,
        follow_symlinks=follow_symlinks,
        perms=perms,
        encoding=encoding,
        errors=errors,
        newline="",
    ) as f:
        await f.write(text)
        await f.flush()  # written now: what follows publishes it


class AsyncFile:
    """The file object of :func:`file`: ``write`` and ``flush`` are awaited."""

    def __init__(self, raw: IO[Any]) -> None:
        self._raw = raw

    @property
    def name(self) -> Any:
        """The file object's name (a descriptor number for an unnamed file)."""
        return self._raw.name

    async def write(self, data: Any) -> int:
        """Write ``data`` (str in text mode, bytes in binary mode)."""
        return await _in_thread(self._raw.write, data)

    async def writelines(self, lines: Iterable[Any]) -> None:
        """Write each of ``lines``, as ``IO.writelines``."""
        await _in_thread(self._raw.writelines, list(lines))

    async def flush(self) -> None:
        """Flush the file object's buffer to the file (not to the disk)."""
        await _in_thread(self._raw.flush)


class _AtomicFileContext:
    """The async context manager :func:`file` returns; used once."""

    def __init__(self, path: StrPath, mode: str, options: dict[str, Any]) -> None:
        self._args = (path, mode, options)
        self._writer: Any = None  # the atomic.AtomicFile, made in a thread

    def _open(self) -> IO[Any]:
        path, mode, options = self._args
        # atomic.file() looks at the destination: off the loop too.
        self._writer = atomic.file(path, mode, **options)
        return self._writer.__enter__()  # type: ignore[no-any-return]

    async def __aenter__(self) -> AsyncFile:
        raw = await _undoing(self._open, self._discard)
        return AsyncFile(raw)

    def _discard(self, _raw: object) -> None:
        self._writer.__exit__(asyncio.CancelledError, asyncio.CancelledError(), None)

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        # Published or discarded in its thread, whatever happens to the
        # caller meanwhile: the destination is old or new.
        await _in_thread(self._writer.__exit__, exc_type, exc, tb)


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
) -> _AtomicFileContext:
    """:func:`atomstore.atomic.file` as an async context manager::

        async with aio.file("report.csv") as f:
            await f.write("a,b\\n")

    The file is published when the block ends normally; an exception
    (cancellation included) discards it and leaves the destination as it
    was.  The destination is looked at, and a bad argument refused, when
    the block is entered.
    """
    options = {
        "overwrite": overwrite,
        "durable": durable,
        "follow_symlinks": follow_symlinks,
        "perms": perms,
        "buffering": buffering,
        "encoding": encoding,
        "errors": errors,
        "newline": newline,
    }
    return _AtomicFileContext(path, mode, options)


# -- the store ---------------------------------------------------------------------


class AsyncClaim:
    """A claimed message; the awaited face of :class:`~atomstore.Claim`.

    ``name``, ``path``, ``attempts`` and ``claimed_at`` are the claim's.
    """

    def __init__(self, claim: Claim) -> None:
        self.claim = claim

    def __repr__(self) -> str:
        return f"AsyncClaim({self.claim.path!r})"

    @property
    def name(self) -> str:
        """The message's unique name, the same on every attempt."""
        return self.claim.name

    @property
    def path(self) -> str:
        """Where the claimed file is now, in ``cur/``."""
        return self.claim.path

    @property
    def attempts(self) -> int:
        """Earlier claims of it that ended without :meth:`finish`."""
        return self.claim.attempts

    @property
    def claimed_at(self) -> float:
        """When it was claimed, seconds since the epoch."""
        return self.claim.claimed_at

    async def read_bytes(self) -> bytes:
        """The message's bytes (:meth:`atomstore.Claim.read_bytes`)."""
        return await _in_thread(self.claim.read_bytes)

    async def read_text(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        """The message as text (:meth:`atomstore.Claim.read_text`)."""
        return await _in_thread(self.claim.read_text, encoding, errors)

    async def finish(self) -> None:
        """Remove the message: done (:meth:`atomstore.Claim.finish`)."""
        await _in_thread(self.claim.finish)

    async def release(self, *, count_attempt: bool = True, delay: Duration | None = None) -> str:
        """Give the message back (:meth:`atomstore.Claim.release`); its new path."""
        return await _in_thread(self.claim.release, count_attempt=count_attempt, delay=delay)

    async def renew(self) -> None:
        """Extend the lease from now (:meth:`atomstore.Claim.renew`)."""
        await _in_thread(self.claim.renew)

    async def __aenter__(self) -> AsyncClaim:
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        """Finish when the block ends normally, release when it raises (a
        cancellation gives it back uncounted).  A claim lost meanwhile has
        nothing to give back: the block's own exception goes on."""
        if exc_type is None:
            await self.finish()
            return
        try:
            await self.release(count_attempt=not issubclass(exc_type, asyncio.CancelledError))
        except ClaimLostError:
            pass


def _give_back(claim: Claim) -> None:
    """Undo a claim its caller was cancelled for: back to ``new/``, no
    attempt counted."""
    try:
        claim.release(count_attempt=False)
    except FileNotFoundError:  # recovered meanwhile by another consumer
        pass


class AsyncFileStore:
    """A :class:`~atomstore.FileStore` for coroutines.

    Takes :class:`~atomstore.FileStore`'s arguments; ``store`` is the
    blocking store underneath, for what has no awaited form here.
    """

    def __init__(self, path: StrPath, **options: Any) -> None:
        self.store = FileStore(path, **options)

    def __repr__(self) -> str:
        return f"AsyncFileStore({self.store.path!r})"

    @property
    def path(self) -> str:
        """The store's directory, absolute."""
        return self.store.path

    async def prepare(self) -> None:
        """Create the areas (:meth:`atomstore.FileStore.prepare`)."""
        await _in_thread(self.store.prepare)

    async def add(
        self, data: Data, encoding: str = "utf-8", *, delay: Duration | None = None
    ) -> str:
        """:meth:`atomstore.FileStore.add`, awaited: written, then published.
        Cancelled while the message is written, it is discarded; cancelled
        as it is published, it is delivered before
        :class:`asyncio.CancelledError` is raised."""
        return (await self._deliver([data], encoding, delay))[0]

    async def add_many(
        self, items: Iterable[Data], encoding: str = "utf-8", *, delay: Duration | None = None
    ) -> list[str]:
        """:meth:`atomstore.FileStore.add_many`, awaited: all or none, a
        cancellation included (as :meth:`add`)."""
        return await self._deliver(list(items), encoding, delay)

    async def _deliver(self, items: list[Data], encoding: str, delay: Duration | None) -> list[str]:
        batch = self.store.batch()

        def stage() -> Batch:
            for data in items:
                batch.add(data, encoding, delay=delay)
            return batch

        await _undoing(stage, Batch.discard)
        return await _in_thread(batch.commit)

    async def claim(
        self, wait: Duration | None = None, *, oldest: bool = True
    ) -> AsyncClaim | None:
        """:meth:`atomstore.FileStore.claim`, awaited; ``wait`` waits on the
        loop.

        :returns: the claim, or None when nothing came in time.
        """
        claim = await self._claim_once(oldest)
        if claim is not None or not wait:
            return claim
        deadline = time.monotonic() + seconds(wait, "wait")
        waiter = await _in_thread(self.store._waiter)
        try:
            while True:
                claim = await self._claim_once(oldest, waiting=True)
                if claim is not None:
                    return claim
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                await _wait(waiter, None if remaining == math.inf else remaining)
        finally:
            waiter.close()

    async def _claim_once(self, oldest: bool, waiting: bool = False) -> AsyncClaim | None:
        func: Callable[[], Claim | None]
        if waiting:
            func = functools.partial(self.store._claim_while_waiting, oldest)
        else:
            func = functools.partial(self.store.claim, oldest=oldest)
        claim = await _undoing(func, _give_back)
        return None if claim is None else AsyncClaim(claim)

    def claims(self, *, timeout: Duration | None = None) -> AsyncIterator[AsyncClaim]:
        """Claims as messages arrive, until none came for ``timeout``
        seconds (for ever by default)::

            async for claim in store.claims():
                async with claim:
                    await handle(await claim.read_bytes())
        """
        patience = None if timeout is None else seconds(timeout, "timeout")
        return self._claims(patience)

    async def _claims(self, patience: float | None) -> AsyncIterator[AsyncClaim]:
        waiter = await _in_thread(self.store._waiter)
        try:
            while True:
                deadline = None if patience is None else time.monotonic() + patience
                while True:
                    claim = await self._claim_once(True, waiting=True)
                    if claim is not None:
                        break
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return
                    await _wait(waiter, remaining)
                yield claim
        finally:
            waiter.close()

    async def recover(self, older_than: Duration) -> list[str]:
        """Give back claims older than a lease (:meth:`atomstore.FileStore.recover`)."""
        return await _in_thread(self.store.recover, older_than)

    async def clean(self, older_than: Duration = atomic.DEFAULT_STALE_AGE) -> list[str]:
        """Remove what crashes left (:meth:`atomstore.FileStore.clean`)."""
        return await _in_thread(self.store.clean, older_than)

    async def stats(self) -> dict[str, dict[str, Any]]:
        """Counts and ages per area (:meth:`atomstore.FileStore.stats`)."""
        return await _in_thread(self.store.stats)


async def _wait(waiter: _watch.Waiter, timeout: float | None) -> None:
    """:meth:`Waiter.wait` on the event loop: its descriptors registered as
    readers, no thread."""
    loop = asyncio.get_running_loop()
    woken = asyncio.Event()
    fds = waiter.descriptors
    for fd in fds:
        loop.add_reader(fd, woken.set)
    try:
        try:
            await asyncio.wait_for(woken.wait(), waiter.longest_wait(timeout))
        except asyncio.TimeoutError:
            pass
    finally:
        for fd in fds:
            loop.remove_reader(fd)
    # Which woke it does not matter: both are emptied without blocking.  A
    # look at the path follows (a stat: off the loop).
    await _in_thread(waiter.woken, fds if woken.is_set() else [])
