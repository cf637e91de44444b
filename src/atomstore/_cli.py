"""The ``atomstore`` command: atomic writes and a file queue for shell scripts.

Exit statuses: 0 success, 1 error (a message on stderr), 2 bad usage,
3 nothing to take (``take`` found no message in time), 130 interrupted,
143 and 129 terminated by SIGTERM or SIGHUP.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import IO, Any, Callable

from . import __version__, atomic
from ._store import AREAS, FileStore

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_EMPTY = 3
EXIT_INTERRUPTED = 130

_CHUNK = 1 << 20
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([smhd]?)\s*$")

_EPILOG = f"""\
exit status: {EXIT_OK} success, {EXIT_ERROR} error, {EXIT_USAGE} bad usage, \
{EXIT_EMPTY} nothing to take, {EXIT_INTERRUPTED} interrupted, 143 and 129 terminated \
(SIGTERM, SIGHUP)
"""


def duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``15m``, ``36h``, ``2d`` or ``inf``."""
    if text.strip().lower() in ("inf", "forever"):
        return math.inf
    if text.strip().startswith("-"):
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: must not be negative")
    match = _DURATION.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: use seconds, or a number with s, m, h or d"
        )
    return float(match[1]) * _UNITS[match[2]]


def positive_int(text: str) -> int:
    """A count of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: use a whole number >= 1")
    return value


def permissions(text: str) -> int:
    """Permission bits from an octal string such as ``0644``."""
    try:
        value = int(text, 8)
    except ValueError:
        value = -1
    if not 0 <= value <= 0o7777:
        raise argparse.ArgumentTypeError(f"invalid mode {text!r}: use octal bits such as 0644")
    return value


def _store(args: argparse.Namespace) -> FileStore:
    return FileStore(
        args.dir,
        durable=not getattr(args, "no_sync", False),
        max_attempts=getattr(args, "max_attempts", None),
    )


class UsageError(Exception):
    """Bad usage found after parsing: exit status 2, with the usage line."""


class OutputError(OSError):
    """Standard output could not be written."""


class HandOffError(OSError):
    """What was done could not be handed on; the message says what became
    of it.  Reported even when the reader left (EPIPE)."""


def _stdin() -> IO[bytes]:
    """Standard input as bytes; an error if the command was started without one."""
    if sys.stdin is None:  # started with descriptor 0 closed (``<&-``)
        raise OSError(errno.EBADF, "standard input is closed")
    return sys.stdin.buffer


def _stdout() -> IO[bytes]:
    """Standard output as bytes; an error if the command was started without one."""
    if sys.stdout is None:  # started with descriptor 1 closed (``>&-``)
        raise OutputError(errno.EBADF, "standard output is closed")
    return sys.stdout.buffer


def _print(line: str, end: bytes = b"\n") -> None:
    """Write ``line`` and ``end`` to standard output, flushed.

    As bytes, whatever the locale: a path whose name is not valid UTF-8 (or
    has surrogate escapes) is printed as the bytes the kernel holds.

    :raises OutputError: standard output is closed, full or gone.
    """
    out = _stdout()
    try:
        out.write(os.fsencode(line) + end)
        out.flush()
    except OSError as e:
        # What is still buffered would fail again at exit, noisily.
        _silence_stdout()
        raise OutputError(e.errno, f"standard output: {e.strerror}") from None


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def _end(args: argparse.Namespace) -> bytes:
    return b"\0" if getattr(args, "null", False) else b"\n"


def cmd_write(args: argparse.Namespace) -> int:
    try:
        with atomic.file(
            args.path,
            "wb",
            overwrite=args.overwrite,
            durable=not args.no_sync,
            perms=args.mode,
        ) as f:
            shutil.copyfileobj(_stdin(), f, _CHUNK)
    except FileExistsError as e:
        hint = "File exists (--overwrite replaces it)"
        raise FileExistsError(e.errno, hint, e.filename) from None
    except OSError as e:
        if e.errno != errno.EINVAL or e.filename is None:
            raise
        # Not a regular file: /dev/stdout into a pipe, a FIFO, a device.
        hint = f"{e.strerror} (write replaces regular files only; to fill a pipe use cat)"
        raise OSError(e.errno, hint, e.filename) from None
    return EXIT_OK


def cmd_init(args: argparse.Namespace) -> int:
    _store(args).prepare()
    return EXIT_OK


def cmd_put(args: argparse.Namespace) -> int:
    store = _store(args)
    _stdout()  # nowhere to say what was delivered: deliver nothing
    # All or nothing, as add_many(): every file is staged first, and a file
    # that cannot be read fails the whole put before anything is delivered.
    with contextlib.ExitStack() as files, store.batch() as batch:
        for source in args.files or ["-"]:
            data = _stdin() if source == "-" else files.enter_context(open(source, "rb"))
            batch.add(data)
    end = _end(args)
    try:
        for name in batch.published:
            _print(name, end)
    except OutputError as e:
        names = " ".join(batch.published)
        raise HandOffError(e.errno, f"delivered {names}, but {e.strerror}") from None
    return EXIT_OK


def cmd_ls(args: argparse.Namespace) -> int:
    end = _end(args)
    for path in _store(args).list(args.area):
        _print(path, end)
    return EXIT_OK


def cmd_take(args: argparse.Namespace) -> int:
    store = _store(args)
    _stdout()  # nowhere to hand a claim to: claim nothing
    claim = store.claim(wait=args.wait)
    if claim is None:
        return EXIT_EMPTY
    try:
        _print(claim.path, _end(args))
    except OutputError as e:
        # Nobody learnt of the claim: give it back, with no attempt counted.
        back = claim.release(count_attempt=False)
        raise HandOffError(e.errno, f"{e.strerror}; the message was given back", back) from None
    return EXIT_OK


def cmd_done(args: argparse.Namespace) -> int:
    _store(args).claimed(args.name).finish()
    return EXIT_OK


def cmd_release(args: argparse.Namespace) -> int:
    _print(_store(args).claimed(args.name).release())
    return EXIT_OK


def cmd_recover(args: argparse.Namespace) -> int:
    for path in _store(args).recover(args.older_than):
        _print(path)
    return EXIT_OK


def cmd_requeue(args: argparse.Namespace) -> int:
    store = _store(args)
    if not args.all and not args.names:
        raise UsageError("name the dead letters to requeue, or pass --all")
    names = store.list("dead") if args.all else args.names
    for name in names:
        _print(store.requeue(name))
    return EXIT_OK


def cmd_clean(args: argparse.Namespace) -> int:
    for path in _store(args).clean(args.older_than):
        _print(path)
    return EXIT_OK


def area_stats(store: FileStore) -> dict[str, dict[str, Any]]:
    """Per area: how many files, and the age in seconds of the oldest."""
    now = time.time()
    stats: dict[str, dict[str, Any]] = {}
    for area in AREAS:
        oldest = math.inf
        paths = store.list(area)
        for path in paths:
            try:
                oldest = min(oldest, os.lstat(path).st_mtime)
            except FileNotFoundError:  # taken meanwhile
                continue
        age = None if oldest == math.inf else round(max(0.0, now - oldest), 3)
        stats[area] = {"count": len(paths), "oldest_age": age}
    return stats


def cmd_stat(args: argparse.Namespace) -> int:
    stats = area_stats(_store(args))
    if args.json:
        _print(json.dumps(stats, sort_keys=True))
        return EXIT_OK
    _print(f"{'area':<6}{'count':>10}  oldest")
    for area, row in stats.items():
        age = "-" if row["oldest_age"] is None else f"{row['oldest_age']:.1f}s"
        _print(f"{area:<6}{row['count']:>10}  {age}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="atomstore",
        description="Atomic file writes and a lock-free file queue (maildir style).",
        epilog=_EPILOG,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(
        name: str, func: Callable[[argparse.Namespace], int], text: str, changes: bool = True
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name, help=text, description=text, epilog=_EPILOG, allow_abbrev=False
        )
        if changes:
            sub.add_argument(
                "--no-sync",
                action="store_true",
                help="skip fsync: faster, but a machine crash may lose the change",
            )
        sub.set_defaults(func=func, parser=sub)
        return sub

    def store_command(
        name: str, func: Callable[[argparse.Namespace], int], text: str, changes: bool = True
    ) -> argparse.ArgumentParser:
        sub = command(name, func, text, changes)
        sub.add_argument("dir", metavar="DIR", help="the store's directory")
        return sub

    def null_option(sub: argparse.ArgumentParser, what: str) -> None:
        sub.add_argument(
            "-0",
            "--null",
            action="store_true",
            help=f"end each {what} with a NUL byte, not a newline (for xargs -0)",
        )

    write = command(
        "write", cmd_write, "write standard input to PATH atomically (old or new, never half)"
    )
    write.add_argument("path", metavar="PATH")
    write.add_argument("--overwrite", action="store_true", help="replace PATH if it exists")
    write.add_argument(
        "--mode", type=permissions, help="permission bits of the file, e.g. 0644 (exact)"
    )

    store_command("init", cmd_init, "create a store (DIR with tmp/, new/ and cur/)")
    put = store_command(
        "put", cmd_put, "deliver FILEs (or standard input) as new messages; print their names"
    )
    put.add_argument(
        "files",
        metavar="FILE",
        nargs="*",
        help="files to deliver, all or none; - is stdin",
    )
    null_option(put, "name")
    ls = store_command(
        "ls", cmd_ls, "list an area (tmp, new, cur, dead), oldest first", changes=False
    )
    ls.add_argument("area", metavar="AREA", nargs="?", default="new", choices=AREAS)
    null_option(ls, "path")
    take = store_command(
        "take", cmd_take, f"claim the oldest message and print its path (exit {EXIT_EMPTY}: none)"
    )
    take.add_argument(
        "--wait",
        type=duration,
        default=0.0,
        metavar="SECONDS",
        help="wait this long for a message (30, 5m, inf)",
    )
    null_option(take, "path")
    done = store_command("done", cmd_done, "finish a claim: remove the message")
    done.add_argument("name", metavar="NAME", help="the path (or name) take printed")
    release = store_command(
        "release", cmd_release, "give a claim back to new/ (one attempt); print its new path"
    )
    release.add_argument("name", metavar="NAME", help="the path (or name) take printed")
    recover = store_command("recover", cmd_recover, "return claims older than a lease to new/")
    for sub in (release, recover):
        sub.add_argument(
            "--max-attempts",
            type=positive_int,
            metavar="N",
            help="send a message that used N attempts to dead/ instead of new/",
        )
    requeue = store_command(
        "requeue", cmd_requeue, "move dead letters back to new/ with fresh attempts"
    )
    requeue.add_argument("names", metavar="NAME", nargs="*", help="paths (or names) in dead/")
    requeue.add_argument("--all", action="store_true", help="requeue every dead letter")
    recover.add_argument(
        "--older-than",
        type=duration,
        required=True,
        metavar="DURATION",
        help="the lease: 90s, 15m, 36h, 2d",
    )
    clean = store_command("clean", cmd_clean, "remove stale files from tmp/ and staging files")
    clean.add_argument(
        "--older-than",
        type=duration,
        default=atomic.DEFAULT_STALE_AGE,
        metavar="DURATION",
        help="what counts as stale (default 36h)",
    )
    stat = store_command(
        "stat", cmd_stat, "count the files of each area, with the oldest's age", changes=False
    )
    stat.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def describe(error: BaseException) -> str:
    """One line for an error, naming the file(s) involved."""
    if isinstance(error, OSError) and error.strerror:
        text = error.strerror
        if error.filename is not None:
            text += f": {os.fsdecode(error.filename)}"
        if error.filename2 is not None:
            text += f" -> {os.fsdecode(error.filename2)}"
        return text
    return str(error) or type(error).__name__


def _exit_on_signal(signum: int, frame: object) -> None:
    # SystemExit unwinds like KeyboardInterrupt: temporary files are removed
    # on the way out, and the shell still sees 128 + the signal's number.
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _cleanup_on_termination() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into SystemExit while a command runs."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers
        return
    previous = {}
    for signum in (signal.SIGTERM, signal.SIGHUP):
        handler = signal.getsignal(signum)
        if handler == signal.SIG_DFL:  # an ignored one (nohup) stays ignored
            previous[signum] = handler
            signal.signal(signum, _exit_on_signal)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


_DURATION_OPTIONS = ("--wait", "--older-than")


def _negative_durations(argv: Sequence[str]) -> list[str]:
    """``--older-than -5m`` as ``--older-than=-5m``: argparse would take the
    value for an option and say "expected one argument"; this way the
    duration's own check says what is wrong with it."""
    result: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg in _DURATION_OPTIONS:
            value = next(args, None)
            if value is not None and re.match(r"^-[\d.]", value):
                result.append(f"{arg}={value}")
                continue
            result.append(arg)
            if value is not None:
                result.append(value)
            continue
        result.append(arg)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(_negative_durations(sys.argv[1:] if argv is None else argv))
    try:
        with _cleanup_on_termination():
            status: int = args.func(args)
        return status
    except UsageError as e:
        args.parser.error(str(e))  # exits with status 2
        raise  # pragma: no cover - error() does not return
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except (BrokenPipeError, OutputError) as e:
        if e.errno != errno.EPIPE:
            print(f"atomstore: error: {describe(e)}", file=sys.stderr)
        # else whoever read our output went away (``atomstore ls | head``):
        # nothing to say to anyone.
        _silence_stdout()
        return EXIT_ERROR
    except (OSError, ValueError, TypeError) as e:
        print(f"atomstore: error: {describe(e)}", file=sys.stderr)
        return EXIT_ERROR
