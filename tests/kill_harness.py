"""Kill a worker with SIGKILL at random moments, many times, and check.

Each trial forks the test process (a fork server of sorts: no interpreter
start-up per trial), lets the child run ``work`` for a random moment,
SIGKILLs it, reaps it, and runs ``check`` in the parent on what the child
left on disk.
"""

from __future__ import annotations

import ctypes
import os
import random
import signal
import time
import traceback
from dataclasses import dataclass
from typing import Callable


@dataclass
class KillReport:
    """What the trials did."""

    trials: int = 0
    killed: int = 0  # children that were still running when the signal came
    finished: int = 0  # children that had ended on their own


def _die_with_parent() -> None:
    # A worker must not outlive a test runner that was itself killed
    # (prctl(2), PR_SET_PDEATHSIG).
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


def kill_trials(
    work: Callable[[int], None],
    check: Callable[[int], None],
    *,
    trials: int,
    seed: int = 0,
    max_delay: float = 0.01,
) -> KillReport:
    """Run ``trials`` trials; ``work(i)`` runs in a child, ``check(i)`` after.

    ``work`` should keep writing until it is killed.  The delay before the
    kill is uniform in ``[0, max_delay]`` seconds, drawn from ``seed``.
    Exceptions in the child end it with status 70, which fails the trial.
    """
    rng = random.Random(seed)
    report = KillReport()
    for i in range(trials):
        delay = rng.uniform(0, max_delay)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            _die_with_parent()
            status = 0
            try:
                work(i)
            except BaseException:
                traceback.print_exc()
                status = 70
            finally:
                os._exit(status)
        time.sleep(delay)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # pragma: no cover - already reaped
            pass
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            report.killed += 1
        else:
            code = os.WEXITSTATUS(status)
            if code != 0:
                raise AssertionError(f"trial {i}: the worker failed (exit {code})")
            report.finished += 1
        report.trials += 1
        check(i)
    return report
