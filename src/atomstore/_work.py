"""A worker runner: claim messages, run a job for each, finish or release.

Built on the public API of :class:`FileStore` and :class:`Claim` only.  A
job is started for a claim and polled until it ends: a function run in a
thread (:meth:`FileStore.work`), or a command run as a process
(``atomstore work``).
"""

from __future__ import annotations

import os
import signal
import threading
import time

from . import _delays
from ._claim import ClaimLostError

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    import builtins
    from typing import Callable, Protocol

    from ._args import Area, Duration
    from ._claim import Claim, KeepAlive

    class Queue(Protocol):
        """What the runner uses of a :class:`~atomstore.FileStore`."""

        def claim(self, wait: Duration | None = ..., *, oldest: bool = ...) -> Claim | None: ...

        def recover(self, older_than: Duration) -> builtins.list[str]: ...

        def list(self, area: Area) -> builtins.list[str]: ...

    class Job(Protocol):
        """One claim's work, as the runner sees it."""

        def result(self) -> bool | None:
            """None while it runs; then whether it succeeded."""

        def cancel(self) -> None:
            """Stop it now, if it can be stopped (a process is terminated)."""


# How long the runner sleeps between looks at its jobs while all its slots
# are busy, and at most while it waits for a message.
_TICK = 0.05
# A delayed message this long overdue is stuck (its name taken in new/): a
# draining runner does not wait for it.
_OVERDUE = 30.0


class Report:
    """What a run did.

    :ivar done: jobs that succeeded (their messages finished).
    :ivar failed: jobs that failed (their messages released, or sent to
        ``dead/`` once spent).
    :ivar lost: claims lost before their job ended (recovered by another
        consumer: the job ran on, its outcome was not recorded).
    :ivar cancelled: jobs stopped by a second stop request (their messages
        given back without counting an attempt).
    :ivar errors: ``(name, exception)`` of the last 100 functions that
        raised (:meth:`FileStore.work`).
    """

    __slots__ = ("cancelled", "done", "errors", "failed", "lost", "started_at")

    def __init__(self) -> None:
        self.done = self.failed = self.lost = self.cancelled = 0
        self.errors: list[tuple[str, BaseException]] = []
        self.started_at = time.monotonic()

    def rate(self) -> float:
        """Jobs ended per second so far."""
        elapsed = time.monotonic() - self.started_at
        ended = self.done + self.failed
        return ended / elapsed if elapsed > 0 else 0.0

    def __repr__(self) -> str:
        return (
            f"<Report done={self.done} failed={self.failed} lost={self.lost} "
            f"cancelled={self.cancelled}>"
        )


class Worker:
    """Runs up to ``workers`` jobs at once until stopped (or drained); see
    :meth:`FileStore.work`.

    :param start: starts the job for a claim.
    :param lease: renew each running claim's lease every third of it, and
        recover claims older than it (of workers that died) every half of
        it.  None: no renewal, no recovery.
    :param drain: return once no message is claimable, none waits in
        ``delay/`` and no job runs.
    :param progress: called with the report about twice a second.
    """

    def __init__(
        self,
        store: Queue,
        start: Callable[[Claim], Job],
        *,
        workers: int = 1,
        lease: float | None = None,
        drain: bool = False,
        progress: Callable[[Report], None] | None = None,
    ) -> None:
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise ValueError(f"workers must be a positive int: {workers!r}")
        if lease is not None and not lease > 0:
            raise ValueError(f"lease must be positive: {lease!r}")
        self._store = store
        self._start = start
        self._workers = workers
        self._lease = lease
        self._drain = drain
        self._progress = progress
        # Plain flags, not Events: set from signal handlers, which must
        # take no lock (a handler run inside another would wait on its own).
        self._stopping = False
        self._cancelling = False
        self._running: list[tuple[Claim, Job, KeepAlive | None]] = []
        self._error: Exception | None = None
        self._interrupted = False
        self.report = Report()

    def stop(self) -> None:
        """Claim nothing more; return once the running jobs ended.  A second
        call cancels them too.  Safe from signal handlers and threads."""
        if self._stopping:
            self._cancelling = True
        self._stopping = True

    @property
    def stopping(self) -> bool:
        return self._stopping

    def run(self) -> Report:
        """Run until stopped, or drained; return the report.

        A KeyboardInterrupt stops it as :meth:`stop` does (the running jobs
        end, then it is raised again); a second one cancels them; a third
        stops waiting for them.  An error of the runner itself (a claim or
        a recovery that failed, a job that could not start) stops it as a
        first stop does, then is raised.

        Run in the main thread with Python's own SIGINT handler, a Ctrl-C
        is taken as a stop request, so that no claim is cut short in the
        middle of being made, settled or given back (the third is raised
        where it lands).
        """
        with _CtrlCAsStop(self._on_ctrl_c):
            while True:
                try:
                    self._loop()
                except KeyboardInterrupt:
                    self._interrupted = True
                    if self._cancelling:
                        self._abandon()
                        break
                    self.stop()
                    continue
                break
        if self._interrupted:
            raise KeyboardInterrupt from self._error
        if self._error is not None:
            raise self._error
        return self.report

    def _on_ctrl_c(self) -> None:
        self._interrupted = True
        if self._cancelling:
            raise KeyboardInterrupt
        self.stop()

    def _loop(self) -> None:
        next_recovery = time.monotonic()
        next_progress = time.monotonic() + 0.5
        try:
            while True:
                try:
                    self._reap()
                    if self._cancelling:
                        self._cancel_all()
                    if not self._claiming():
                        if not self._running:
                            break
                        time.sleep(_TICK)
                        continue
                    now = time.monotonic()
                    if self._lease is not None and now >= next_recovery:
                        next_recovery = now + self._lease / 2
                        self._store.recover(self._lease)
                    if self._progress is not None and now >= next_progress:
                        next_progress = now + 0.5
                        self._progress(self.report)
                    started = self._fill_slots()
                    if started:
                        continue
                    if self._drain and not self._running and self._nothing_left():
                        break
                    if len(self._running) >= self._workers:
                        time.sleep(_TICK)
                except Exception as e:
                    # An error of the runner itself: claim no more, and let
                    # what runs end as a first stop does, each settled as
                    # usual (a failed settling is the job's alone).  The
                    # first such error is raised at the end.
                    if self._error is None:
                        self._error = e
        except KeyboardInterrupt:
            if self._cancelling:  # a third one: wait no longer
                self._abandon()
            elif self._stopping:  # a second one: cancel
                self._cancelling = True
                self._cancel_keeping_the_error()
            raise
        except BaseException:
            # SystemExit and its kind: what still runs is stopped and given
            # back, never left claimed.
            self._cancel_keeping_the_error()
            raise
        if self._progress is not None and self._error is None:
            self._progress(self.report)

    def _claiming(self) -> bool:
        """Whether to claim more: neither stopped nor failed."""
        return not self._stopping and self._error is None

    def _fill_slots(self) -> bool:
        """Claim and start jobs while slots are free; whether any started."""
        started = False
        while len(self._running) < self._workers and self._claiming():
            # Wait for a message only when nothing runs: a running job's end
            # must be seen soon.
            wait = _TICK if self._running or started else 0.5
            claim = self._store.claim(wait=wait)
            if claim is None:
                return started
            keeper = None
            try:
                if self._lease is not None:
                    renewing = claim.keep_alive(self._lease / 3)
                    renewing.__enter__()
                    keeper = renewing
                job = self._start(claim)
            except BaseException:
                if keeper is not None:
                    keeper.__exit__(None, None, None)
                claim.release(count_attempt=False)
                raise
            self._running.append((claim, job, keeper))
            started = True
        return started

    def _reap(self) -> None:
        """Finish or release the claims whose jobs ended (each is no longer
        running before it is settled, should settling raise)."""
        for entry in list(self._running):
            claim, job, keeper = entry
            try:
                outcome, error = job.result(), getattr(job, "error", None)
            except Exception as e:  # a job that cannot tell how it ended: failed
                outcome, error = False, e
            if outcome is None:
                continue
            self._running.remove(entry)
            if keeper is not None:
                keeper.__exit__(None, None, None)
            self._settle(claim, outcome, error)

    def _settle(self, claim: Claim, succeeded: bool, error: BaseException | None) -> None:
        if error is not None:
            del self.report.errors[:-99]
            self.report.errors.append((claim.name, error))
        try:
            if succeeded:
                claim.finish()
                self.report.done += 1
            else:
                claim.release()
                self.report.failed += 1
        except ClaimLostError:
            self.report.lost += 1

    def _cancel_all(self) -> None:
        """Stop every running job and give its message back, uncounted.

        A job that cannot be stopped keeps its claim (it may still run; the
        claim is recover()'s once its lease ends); a give-back that fails
        leaves its claim likewise.  Either leaves the others to go back, and
        the first such error is raised once they did.
        """
        failure: Exception | None = None
        while self._running:
            claim, job, keeper = self._running[0]
            stopped = True
            try:
                job.cancel()  # may wait for the job to end
            except Exception as e:
                failure, stopped = failure or e, False
            except BaseException:  # a third Ctrl-C: wait no longer
                self._abandon()
                raise
            self._running.pop(0)
            if keeper is not None:
                keeper.__exit__(None, None, None)
            if not stopped:
                continue
            try:
                claim.release(count_attempt=False)
                self.report.cancelled += 1
            except ClaimLostError:
                self.report.lost += 1
            except Exception as e:
                failure = failure or e
        if failure is not None:
            raise failure

    def _abandon(self) -> None:
        """Wait no longer for the running jobs: their claims are left to
        recover(), their leases no longer renewed."""
        running, self._running = self._running, []
        for _claim, _job, keeper in running:
            if keeper is not None:
                keeper.__exit__(None, None, None)

    def _cancel_keeping_the_error(self) -> None:
        """:meth:`_cancel_all` on the way out of an interrupt or an exit,
        which it must not replace: its error is kept as the runner's."""
        try:
            self._cancel_all()
        except Exception as e:
            if self._error is None:
                self._error = e

    def _nothing_left(self) -> bool:
        """Whether no message waits in ``delay/`` that a claim will take:
        new/ holds nothing claimable (a claim just came back empty); a
        directory, a foreign name, or a delayed message overdue for long
        (its name taken in new/, say) is an operator's to look at."""
        try:
            delayed = self._store.list("delay")
        except NotADirectoryError:  # never followed: nothing of ours waits there
            return True
        soon = time.time() - _OVERDUE
        for path in delayed:
            split = _delays.split(os.path.basename(path))
            if split is not None and split[0] / 1e6 > soon and os.path.isfile(path):
                return False
        return True


class _CtrlCAsStop:
    """For a block in the main thread whose SIGINT handler is Python's own:
    a Ctrl-C calls ``on_ctrl_c`` instead of raising KeyboardInterrupt where
    it lands (``on_ctrl_c`` may raise it).  Outside the block the handler
    raises as Python's does, should a Ctrl-C keep it from being restored;
    another block takes it for Python's."""

    def __init__(self, on_ctrl_c: Callable[[], None]) -> None:
        self._on_ctrl_c = on_ctrl_c
        self._active = False

    def __call__(self, signum: int, frame: object) -> None:
        if not self._active:
            raise KeyboardInterrupt
        self._on_ctrl_c()

    def __enter__(self) -> None:
        current = signal.getsignal(signal.SIGINT)
        if threading.current_thread() is threading.main_thread() and (
            current is signal.default_int_handler or isinstance(current, _CtrlCAsStop)
        ):
            self._active = True
            signal.signal(signal.SIGINT, self)

    def __exit__(self, *exc: object) -> None:
        if self._active:
            self._active = False
            signal.signal(signal.SIGINT, signal.default_int_handler)


class ThreadJob:
    """A function run on a claim in a thread of its own."""

    def __init__(self, handler: Callable[[Claim], object], claim: Claim) -> None:
        self._outcome: bool | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(handler, claim), name=f"atomstore work {claim.name}"
        )
        self._thread.daemon = True
        self._thread.start()

    def _run(self, handler: Callable[[Claim], object], claim: Claim) -> None:
        try:
            handler(claim)
        except BaseException as e:  # kept: the runner releases the claim
            self.error = e
            self._outcome = False
        else:
            self._outcome = True

    def result(self) -> bool | None:
        if self._thread.is_alive():
            return None
        return bool(self._outcome)

    def cancel(self) -> None:
        """A thread cannot be stopped: wait for its function to end."""
        self._thread.join()


class ProcessJob:
    """A command run for a claim: the claimed file's path where ``{}``
    appears in its arguments (appended if nowhere), and with ``stdin`` the
    file on its standard input too."""

    def __init__(self, argv: list[str], claim: Claim, stdin: bool) -> None:
        import subprocess  # only for the command that runs commands

        path = claim.path
        if any("{}" in arg for arg in argv):
            argv = [arg.replace("{}", path) for arg in argv]
        else:
            argv = [*argv, path]
        source = claim.open("rb") if stdin else None
        try:
            # A session of its own: a Ctrl-C at the terminal reaches the
            # runner, which lets the command finish, not the command.
            self._process = subprocess.Popen(
                argv,
                stdin=source if source is not None else subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            if source is not None:
                source.close()

    def result(self) -> bool | None:
        status = self._process.poll()
        return None if status is None else status == 0

    def cancel(self) -> None:
        """Terminate the command and whatever it started (its process group:
        SIGTERM, then SIGKILL after 5 seconds)."""
        import signal
        import subprocess

        if self._process.poll() is not None:
            return
        self._signal_group(signal.SIGTERM)
        try:
            self._process.wait(5)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            self._process.wait()

    def _signal_group(self, signum: int) -> None:
        try:
            os.killpg(self._process.pid, signum)
        except ProcessLookupError:  # gone meanwhile, with its group
            pass
