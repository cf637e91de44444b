"""File objects over a descriptor, as ``open()`` builds them, writing
through the OS boundary."""

from __future__ import annotations

import io
import os

from . import _syscalls

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    from typing import IO, Any

_WRITE_MODES = frozenset({"w", "wt", "tw", "wb", "bw"})


def check_write_mode(mode: object) -> bool:
    """Validate an ``open()`` write mode; return whether it is binary.

    :raises ValueError: ``mode`` reads, appends, updates or is unknown.
    :raises TypeError: ``mode`` is not a string.
    """
    if not isinstance(mode, str):
        raise TypeError(f"mode must be a str, not {type(mode).__name__}")
    if mode not in _WRITE_MODES:
        raise ValueError(f"invalid mode {mode!r}: only 'w', 'wt' and 'wb' write a new file")
    return "b" in mode


class _BoundaryFileIO(io.FileIO):
    """A FileIO whose writes go through :mod:`atomstore._syscalls`."""

    def write(self, data: Any) -> int:
        return _syscalls.write(self.fileno(), data)


def open_fd(
    fd: int,
    mode: str,
    name: str,
    buffering: int = -1,
    encoding: str | None = None,
    errors: str | None = None,
    newline: str | None = None,
    *,
    closefd: bool = True,
) -> IO[Any]:
    """Wrap the writable descriptor ``fd`` as ``open(name, mode, ...)`` would.

    With ``closefd`` the file object owns ``fd`` and closes it, and so does
    this function when it fails; without, the caller closes it.

    Writes go through the OS boundary only while a tracer is installed:
    otherwise a plain FileIO writes, with no Python-level call per write.
    """
    try:
        binary = check_write_mode(mode)
        if binary and (encoding is not None or errors is not None or newline is not None):
            raise ValueError("binary mode doesn't take an encoding, errors or newline argument")
        if buffering == 0 and not binary:
            raise ValueError("can't have unbuffered text I/O")
        raw = (_BoundaryFileIO if _syscalls._tracer is not None else io.FileIO)(
            fd, "wb", closefd=closefd
        )
    except BaseException:
        if closefd:
            try:
                os.close(fd)
            except OSError:
                pass
        raise
    try:
        return _buffered(raw, name, binary, buffering, encoding, errors, newline, mode)
    except BaseException:
        raw.close()
        raise


def _buffered(
    raw: io.FileIO,
    name: str,
    binary: bool,
    buffering: int,
    encoding: str | None,
    errors: str | None,
    newline: str | None,
    mode: str,
) -> IO[Any]:
    raw.name = name
    if buffering == 0:
        return raw
    line_buffering = buffering == 1 and not binary
    if buffering in (-1, 1):
        buffering = max(getattr(raw, "_blksize", 0), io.DEFAULT_BUFFER_SIZE)
    buffer = io.BufferedWriter(raw, buffering)
    if binary:
        return buffer
    if hasattr(io, "text_encoding"):  # Python 3.10+: EncodingWarning as open()
        encoding = io.text_encoding(encoding, 4)
    text = io.TextIOWrapper(buffer, encoding, errors, newline, line_buffering)
    text.mode = mode  # type: ignore[misc]
    return text
