"""The ``atomstore`` logger, free for a program that never imports logging.

atomstore logs at DEBUG and INFO only, and never on a hot path: which
fallback a filesystem gets, probes, recoveries, dead letters, what
``clean()`` removed, waits that poll.  Nothing is printed unless the
application configures logging (Python's last-resort handler shows only
warnings).

:mod:`logging` is not imported here: its import costs every command's
start-up more than the rest of it.  A program that never imported it cannot
have configured it, so until it is imported a record is dropped unmade.
"""

from __future__ import annotations

import sys

DEBUG = 10
INFO = 20


def enabled(level: int) -> bool:
    """Whether a record at ``level`` would be handled (to skip the work of
    describing it)."""
    logging = sys.modules.get("logging")
    return logging is not None and logging.getLogger("atomstore").isEnabledFor(level)


def debug(message: str, *args: object) -> None:
    _emit(DEBUG, message, args)


def info(message: str, *args: object) -> None:
    _emit(INFO, message, args)


def _emit(level: int, message: str, args: tuple[object, ...]) -> None:
    logging = sys.modules.get("logging")
    if logging is None:
        return
    logger = logging.getLogger("atomstore")
    if logger.isEnabledFor(level):
        logger.log(level, message, *args, stacklevel=3)
