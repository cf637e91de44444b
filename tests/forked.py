"""Forked child processes for the concurrency and permission tests.

Children are forked, not started afresh: they inherit the test's imports and
cost no interpreter start-up.  A child never returns into pytest: it ends
with ``os._exit``.  :class:`Children` kills and reaps whatever is still
running when the test ends, passed or failed.
"""

from __future__ import annotations

import os
import pickle
import signal
import time
import traceback
from typing import Any, Callable, TypeVar

T = TypeVar("T")

FAILED = 70  # the exit status of a child whose function raised


def _run_and_exit(func: Callable[[], object]) -> None:  # pragma: no cover - in the child
    status = 0
    try:
        func()
    except BaseException:
        traceback.print_exc()
        status = FAILED
    finally:
        os._exit(status)


class Children:
    """Forked children of one test; a context manager that reaps them all."""

    def __init__(self) -> None:
        self.running: set[int] = set()

    def start(self, func: Callable[[], object]) -> int:
        """Run ``func`` in a new child; return its pid."""
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            _run_and_exit(func)
        self.running.add(pid)
        return pid

    def kill(self, pid: int) -> int:
        """SIGKILL ``pid`` and reap it; return its wait status."""
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # pragma: no cover - a zombie is still there
            pass
        return self.wait(pid)

    def wait(self, pid: int, timeout: float | None = None) -> int:
        """Reap ``pid``; return its wait status.

        :raises TimeoutError: it still runs after ``timeout`` seconds (it is
            left running, and killed when the block ends).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, 0 if deadline is None else os.WNOHANG)
            if done:
                self.running.discard(pid)
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"child {pid} still runs after {timeout} s")
            time.sleep(0.005)

    def poll(self, pid: int) -> int | None:
        """The wait status of ``pid`` if it has ended (reaped), else None."""
        done, status = os.waitpid(pid, os.WNOHANG)
        if not done:
            return None
        self.running.discard(pid)
        return status

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc: object) -> None:
        for pid in list(self.running):
            self.kill(pid)


def exit_code(status: int) -> int | str:
    """A wait status as an exit code, or the signal's name."""
    if os.WIFSIGNALED(status):
        return signal.Signals(os.WTERMSIG(status)).name
    return os.WEXITSTATUS(status)


def call_as(uid: int, gid: int, func: Callable[[], T]) -> T:
    """Run ``func`` in a child under ``uid``/``gid``; return what it returned.

    The child drops every supplementary group, then the group, then the
    user (root is needed to start it).  An exception raised in the child is
    raised here again (pickled: an ``OSError`` keeps errno and filenames).
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read_end)
        outcome: tuple[str, Any]
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            outcome = ("returned", func())
        except BaseException as e:
            outcome = ("raised", e)
        try:
            payload = pickle.dumps(outcome)
        except Exception as e:
            payload = pickle.dumps(("raised", RuntimeError(f"unpicklable outcome: {e!r}")))
        with os.fdopen(write_end, "wb") as pipe:
            pipe.write(payload)
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        payload = pipe.read()
    _, status = os.waitpid(pid, 0)
    if not payload:
        raise RuntimeError(f"the child died without an answer ({exit_code(status)})")
    kind, value = pickle.loads(payload)
    if kind == "raised":
        raise value
    result: T = value
    return result
