"""Checking the arguments every public call shares: paths, durations, modes."""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    import datetime
    from typing import Literal, Union, overload

    StrPath = Union[str, os.PathLike[str]]
    Duration = Union[float, int, datetime.timedelta]
    Area = Literal["tmp", "new", "cur", "dead", "delay"]
    TextWriteMode = Literal["w", "wt"]
    BinaryWriteMode = Literal["wb"]
    TextReadMode = Literal["r", "rt"]
    BinaryReadMode = Literal["rb"]
else:

    def overload(func):
        """typing.overload, without importing typing at run time: the
        overloads are for type checkers, the last definition runs."""
        return func


def fspath(path: object, what: str = "path") -> str:
    """``path`` as a ``str``, or a TypeError/ValueError naming it."""
    if isinstance(path, str):
        result = path
    elif isinstance(path, os.PathLike):
        result = os.fspath(path)
        if not isinstance(result, str):
            raise TypeError(f"{what} must be str or os.PathLike[str], not bytes: {path!r}")
    else:
        raise TypeError(f"{what} must be str or os.PathLike[str], not {type(path).__name__}")
    if not result:
        raise ValueError(f"{what} must not be empty")
    if "\0" in result:
        raise ValueError(f"{what} contains a NUL character: {result!r}")
    return result


def seconds(value: object, what: str = "older_than") -> float:
    """A duration in seconds from a number or a ``timedelta``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            result = float(value)
        except OverflowError:  # an int beyond a float: for ever
            result = float("inf") if value > 0 else float("-inf")
    else:
        # Only here: datetime's import would cost every command's start-up.
        import datetime

        if not isinstance(value, datetime.timedelta):
            raise TypeError(f"{what} must be seconds or a timedelta, not {type(value).__name__}")
        result = float(value.total_seconds())
    if not result >= 0:
        raise ValueError(f"{what} must not be negative: {value!r}")
    return result


def check_perms(perms: object) -> int | None:
    """``perms`` validated: None or permission bits 0 to 0o7777."""
    if perms is None:
        return None
    if not isinstance(perms, int):
        raise TypeError(f"perms must be an int such as 0o644, not {type(perms).__name__}")
    if isinstance(perms, bool) or not 0 <= perms <= 0o7777:
        raise ValueError(f"perms must be permission bits 0 to 0o7777: {perms!r}")
    return perms
