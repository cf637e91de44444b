"""Claims: a message a consumer owns until it finishes or releases it."""

from __future__ import annotations

import errno
import os
import stat
import threading
import time

from . import _syscalls, _tree, _watch
from ._args import seconds

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    from typing import IO, Any, BinaryIO, Callable, TextIO, overload

    from ._areas import Areas
    from ._args import BinaryReadMode, Duration, TextReadMode
else:
    from ._args import overload

READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
# Opening a FIFO to read blocks until a writer comes: never wait on one.
_OPEN_REGULAR_FLAGS = READ_FLAGS | os.O_NONBLOCK


def _open_regular_fd(path: str) -> tuple[int, os.stat_result]:
    """A descriptor to read ``path`` and its status, if it is a regular file.

    A symlink is refused (ELOOP), and so are a directory (EISDIR) and a FIFO
    or device (EINVAL), without blocking.
    """
    fd = os.open(path, _OPEN_REGULAR_FLAGS)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            if stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
            raise OSError(errno.EINVAL, "not a regular file", path)
    except BaseException:
        os.close(fd)
        raise
    # O_NONBLOCK means nothing to a regular file's reads.
    return fd, st


def open_regular(path: str, mode: str = "rb", **kwargs: Any) -> IO[Any]:
    """Open ``path`` for reading as ``open()`` would, if it is a regular file."""
    fd, _ = _open_regular_fd(path)
    try:
        f = open(fd, mode, **kwargs)  # noqa: SIM115 - the caller closes it
    except BaseException:
        try:
            os.close(fd)
        except OSError:
            pass  # closed already, by the file object open() had made
        raise
    raw: Any = getattr(getattr(f, "buffer", f), "raw", f)
    raw.name = path  # open() of a descriptor names the file by its number
    return f


def read_regular(path: str) -> bytes:
    """The content of the regular file ``path`` (see :func:`open_regular`)."""
    fd, st = _open_regular_fd(path)
    try:
        # One read of one byte more than the size sees the end in one call.
        data = os.read(fd, st.st_size + 1)
        if len(data) <= st.st_size:
            return data
        chunks = [data]
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    finally:
        os.close(fd)


class ClaimLostError(FileNotFoundError):
    """The claim is no longer held: it was recovered, finished or released.

    A subclass of :class:`FileNotFoundError` with ``errno`` ENOENT and the
    claim's path as ``filename``.
    """


class Claim:
    """A message claimed from a :class:`FileStore`: finish or release it.

    :ivar name: the message's unique name, the same on every attempt.
    :ivar path: where the claimed file is now, in ``cur/``.
    :ivar attempts: earlier claims of it that ended without :meth:`finish`.
    :ivar claimed_at: when it was claimed, seconds since the epoch.
    :ivar token: the random part that makes this claim's name unique.
    :ivar renewed_at: when this process last renewed it (:meth:`renew`),
        or None.

    Used as a context manager it finishes the claim when the block ends
    normally and releases it when the block raises.
    """

    __slots__ = ("attempts", "claimed_at", "name", "path", "renewed_at", "store", "token")

    def __init__(
        self,
        store: Areas,
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
        self.renewed_at: float | None = None

    def __repr__(self) -> str:
        return f"<Claim {self.name!r} attempts={self.attempts}>"

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.finish()
            return
        try:
            self.release()
        except ClaimLostError:
            pass  # nothing to give back: the block's own exception goes on

    def lost(self) -> ClaimLostError:
        """The error for a claim that is no longer held."""
        return ClaimLostError(
            errno.ENOENT, "claim is no longer held (recovered, finished or released)", self.path
        )

    @overload
    def open(self, mode: BinaryReadMode = "rb", *, buffering: int = -1) -> BinaryIO: ...

    @overload
    def open(
        self,
        mode: TextReadMode,
        *,
        buffering: int = -1,
        encoding: str | None = None,
        errors: str | None = None,
        newline: str | None = None,
    ) -> TextIO: ...

    @overload
    def open(self, mode: str = "rb", **kwargs: Any) -> IO[Any]: ...

    def open(self, mode: str = "rb", **kwargs: Any) -> Any:
        """Open the claimed file for reading (``'rb'``, ``'r'`` or ``'rt'``,
        with ``open()``'s keywords); a planted symlink is refused."""
        if mode not in ("r", "rb", "rt"):
            raise ValueError(f"invalid mode {mode!r}: a claim is opened to read")
        self.store._checked("cur")
        try:
            return open_regular(self.path, mode, **kwargs)
        except FileNotFoundError:
            raise self.lost() from None

    def read_bytes(self) -> bytes:
        """The claimed file's content."""
        self.store._checked("cur")
        try:
            return read_regular(self.path)
        except FileNotFoundError:
            raise self.lost() from None

    def read_text(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        """The claimed file's content, decoded."""
        return self.read_bytes().decode(encoding, errors)

    def finish(self) -> None:
        """Done with the message: remove it from ``cur/``.

        :raises ClaimLostError: the claim is no longer held.
        """
        self.store._checked("cur")
        try:
            _syscalls.unlink(self.path)
        except FileNotFoundError:
            raise self.lost() from None
        if self.store.durable:
            _tree.sync_dir(os.path.dirname(self.path))

    def renew(self) -> None:
        """Extend the lease from now: :meth:`FileStore.recover` measures a
        claim's age from its last renewal, not from the claim.

        The renewal is the claimed file's modification time, set to this
        host's clock (the claim's time in its name is too): across hosts the
        clocks must agree to well within the lease.  It is not fsynced: after
        a crash of the machine a claim may count from an earlier renewal.

        :raises ClaimLostError: the claim is no longer held (recovered,
            finished or released): a claim cannot be renewed back.
        """
        self.store._checked("cur")
        now = time.time_ns()
        try:
            _syscalls.utime(self.path, ns=(now, now), follow_symlinks=False)
        except FileNotFoundError:
            raise self.lost() from None
        self.renewed_at = now / 1e9

    def keep_alive(self, interval: Duration) -> KeepAlive:
        """Renew the claim every ``interval`` seconds from a background
        thread while a ``with`` block runs::

            with claim, claim.keep_alive(60):
                run_a_long_job(claim.path)

        Choose ``interval`` well below the lease given to
        :meth:`FileStore.recover` (a third, say).  The thread stops when the
        block ends, and at the first renewal that fails (see
        its ``error``).
        """
        return KeepAlive(self, seconds(interval, "interval"))

    def release(self, *, count_attempt: bool = True, delay: Duration | None = None) -> str:
        """Give the message back; this counts one attempt.

        It goes back to ``new/``, or to ``delay/`` to wait for the store's
        ``retry_delay`` (or ``delay``), or to ``dead/`` once it has used the
        store's ``max_attempts``.

        :param count_attempt: False for a claim nobody worked on (its
            claimant could not even hand it on): it goes back to ``new/``
            under the name it had, with its attempts as they were, and
            without the store's retry delay.
        :param delay: seconds (or a timedelta) before it can be claimed
            again, instead of the store's retry delay (0: at once).
        :returns: the message's new path.
        :raises ClaimLostError: the claim is no longer held.
        """
        attempts = self.attempts + 1 if count_attempt else self.attempts
        try:
            return self.store._give_back(
                self.path, self.name, attempts, spent=count_attempt, delay=delay
            )
        except FileNotFoundError as e:
            if e.filename == self.path:
                raise self.lost() from None
            raise


class KeepAlive:
    """Renews a claim from a background thread; see :meth:`Claim.keep_alive`.

    :ivar error: why renewing stopped before the block ended (a
        :class:`ClaimLostError` when the claim was lost), or None.
    """

    def __init__(self, claim: Claim, interval: float) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be positive: {interval!r}")
        self._claim = claim
        self._interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    @property
    def lost(self) -> bool:
        """Whether a renewal found the claim no longer held."""
        return isinstance(self.error, ClaimLostError)

    def _renew_until_stopped(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._claim.renew()
            except BaseException as e:  # kept for the owner to see
                self.error = e
                return

    def __enter__(self) -> KeepAlive:
        if self._thread is not None:
            raise RuntimeError("keep_alive() can be entered only once")
        self._thread = threading.Thread(
            target=self._renew_until_stopped,
            name=f"atomstore keep_alive {self._claim.name}",
            daemon=True,
        )
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


class Claims:
    """Claims as messages arrive; see :meth:`FileStore.claims`."""

    def __init__(
        self,
        claim_next: Callable[[], Claim | None],
        waiter: _watch.Waiter,
        timeout: float | None,
    ) -> None:
        self._claim_next = claim_next
        self._waiter = waiter
        self._timeout = timeout

    def __iter__(self) -> Claims:
        return self

    def __next__(self) -> Claim:
        deadline = None if self._timeout is None else time.monotonic() + self._timeout
        while not self._waiter.stopped:
            claim = self._claim_next()
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
