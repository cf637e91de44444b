"""The ``atomstore`` command: atomic writes and a file queue for shell scripts.

Exit statuses: 0 success, 1 error (a message on stderr), 2 bad usage,
3 nothing to take (``take`` found no message in time), 130 interrupted,
143 and 129 terminated by SIGTERM or SIGHUP.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import math
import os
import re
import signal
import stat
import sys
import threading
import time

from . import __version__, atomic
from ._claim import Claim
from ._store import AREAS, FileStore

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence
    from typing import IO, Callable

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_EMPTY = 3
EXIT_INTERRUPTED = 130
EXIT_FAILED = 4  # work: some command failed

_CHUNK = 1 << 20
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([smhd]?)\s*$", re.ASCII)

_EPILOG = f"""\
exit status: {EXIT_OK} success, {EXIT_ERROR} error, {EXIT_USAGE} bad usage, \
{EXIT_EMPTY} nothing to take, {EXIT_FAILED} some command failed (work), \
{EXIT_INTERRUPTED} interrupted, 143 and 129 terminated (SIGTERM, SIGHUP)
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
        retry_delay=getattr(args, "retry_delay", None),
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


# The signals that end a command; held back while a claim or a delivery is
# being handed on, so that none lands between doing and saying.
_ENDING = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP})


def _block_signals() -> None:
    if threading.current_thread() is threading.main_thread():
        signal.pthread_sigmask(signal.SIG_BLOCK, _ENDING)


def _unblock_signals() -> None:
    if threading.current_thread() is threading.main_thread():
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _ENDING)


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    """Hold the ending signals back for the block; one that came meanwhile
    is delivered when it ends (or, after a hand-off, never)."""
    _block_signals()
    try:
        yield
    finally:
        _unblock_signals()


def _shown(path: str) -> str:
    """``path`` for a one-line message: bytes that are not UTF-8 as ``\\xNN``,
    control characters (a newline) escaped."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


def _error(text: str) -> None:
    """One line on standard error (nowhere if it is closed)."""
    if sys.stderr is not None:
        print(f"atomstore: {text}", file=sys.stderr, flush=True)


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
            source = _stdin()
            while chunk := source.read(_CHUNK):
                f.write(chunk)
    except FileExistsError as e:
        if not _is_regular(e.filename):
            hint = "File exists and is not a regular file (write never replaces one; "
            hint += "to fill a pipe use cat)"
            raise FileExistsError(e.errno, hint, e.filename) from None
        hint = "File exists (--overwrite replaces it)"
        raise FileExistsError(e.errno, hint, e.filename) from None
    except OSError as e:
        if e.errno != errno.EINVAL or e.filename is None:
            raise
        # Not a regular file: /dev/stdout into a pipe, a FIFO, a device.
        hint = f"{e.strerror} (write replaces regular files only; to fill a pipe use cat)"
        raise OSError(e.errno, hint, e.filename) from None
    return EXIT_OK


def _is_regular(path: object) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)  # type: ignore[arg-type]
    except (OSError, TypeError, ValueError):
        return False


def cmd_init(args: argparse.Namespace) -> int:
    _store(args).prepare()
    return EXIT_OK


def cmd_put(args: argparse.Namespace) -> int:
    sources = args.files or ["-"]
    if sources.count("-") > 1:
        raise UsageError("standard input (-) can be delivered once")
    store = _store(args)
    _stdout()  # nowhere to say what was delivered: deliver nothing
    # All or nothing, as add_many(): every file is checked before standard
    # input is read, then staged; a file that cannot be read fails the whole
    # put before anything is delivered.
    for source in sources:
        if source != "-":
            _check_readable(source)
    batch = store.batch()
    try:
        for source in sources:
            if source == "-":
                batch.add(_stdin(), delay=args.delay)
            else:
                with open(source, "rb") as f:
                    batch.add(f, delay=args.delay)
    except BaseException:
        batch.discard()
        raise
    with _signals_blocked():  # published whole, or not at all
        names = batch.commit()
    _hand_on(names, _end(args), "delivered")
    return EXIT_OK


def _check_readable(path: str) -> None:
    st = os.stat(path)
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    if not os.access(path, os.R_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)


def _hand_on(paths: Sequence[str], end: bytes, done: str) -> None:
    """Print what was done; if that fails or is interrupted, say what it was.

    Once printed, the command succeeded: signals stay blocked until it exits,
    so a late one cannot turn its status into a failure.
    """
    try:
        for path in paths:
            _print(path, end)
    except BaseException as e:
        _block_signals()
        what = " ".join(_shown(p) for p in paths) or "nothing"
        if isinstance(e, OutputError):
            raise HandOffError(e.errno, f"{done} {what}, but {e.strerror}") from None
        _error(f"{done} {what} before the interruption")
        raise
    _block_signals()


def cmd_ls(args: argparse.Namespace) -> int:
    end = _end(args)
    for path in _store(args).list(args.area):
        _print(path, end)
    return EXIT_OK


def cmd_take(args: argparse.Namespace) -> int:
    store = _store(args)
    _stdout()  # nowhere to hand a claim to: claim nothing
    first = _claim_with_signals_blocked(store, args.wait, args.any)
    if first is None:
        return EXIT_EMPTY
    claims = [first]
    try:
        while len(claims) < args.count:  # the rest only if waiting already
            claim = store.claim(oldest=not args.any)
            if claim is None:
                break
            claims.append(claim)
        _unblock_signals()
        end = _end(args)
        for claim in claims:
            _print(claim.path, end)
        _block_signals()  # handed on: a late signal cannot undo it now
    except BaseException as e:
        # Nobody may have learnt of the claims (a path cut short, or printed
        # and then interrupted): give them all back, with no attempt
        # counted.  Their old paths are gone, so whoever got one cannot use
        # it.
        _block_signals()
        back = [claim.release(count_attempt=False) for claim in claims]
        if isinstance(e, OutputError):
            what = "the message was" if len(back) == 1 else f"the {len(back)} messages were"
            raise HandOffError(e.errno, f"{e.strerror}; {what} given back", back[0]) from None
        raise
    return EXIT_OK


def _claim_with_signals_blocked(store: FileStore, wait: float, any_one: bool) -> Claim | None:
    """Claim with SIGINT, SIGTERM and SIGHUP held back, so that no signal
    strikes between the claim and its hand-off; wait with them let in.

    :returns: the claim, signals still blocked; or None, signals let in.
    """
    deadline = time.monotonic() + wait
    with contextlib.ExitStack() as stack:
        waiter = stack.enter_context(store._waiter()) if wait else None
        while True:
            _block_signals()
            claim = store.claim(oldest=not any_one)
            if claim is not None:
                return claim
            _unblock_signals()
            remaining = deadline - time.monotonic()
            if waiter is None or remaining <= 0:
                return None
            waiter.wait(None if remaining == math.inf else remaining)


def cmd_done(args: argparse.Namespace) -> int:
    _store(args).claimed(args.name).finish()
    return EXIT_OK


def cmd_renew(args: argparse.Namespace) -> int:
    _store(args).claimed(args.name).renew()
    return EXIT_OK


def _do_then_say(
    args: argparse.Namespace, done: str, work: Callable[[FileStore], Sequence[str]]
) -> int:
    """Do ``work`` with the ending signals held back, then print the paths
    it returns (or say what was ``done`` if they cannot be printed)."""
    store = _store(args)
    _stdout()  # nowhere to say what was done: do nothing
    with _signals_blocked():
        paths = work(store)
    _hand_on(paths, _end(args), done)
    return EXIT_OK


def cmd_release(args: argparse.Namespace) -> int:
    return _do_then_say(
        args, "released to", lambda s: [s.claimed(args.name).release(delay=args.delay)]
    )


def cmd_work(args: argparse.Namespace) -> int:
    from ._work import ProcessJob, Report, Worker

    command = args.command_line
    if not command:
        raise UsageError("name the COMMAND to run for each message, after --")
    store = _store(args)
    show = not args.quiet and sys.stderr.isatty()

    def progress(report: Report) -> None:
        try:
            waiting = len(store.list("new"))
        except OSError:
            waiting = -1
        line = (
            f"done {report.done}  failed {report.failed}  {report.rate():.1f}/s  waiting {waiting}"
        )
        sys.stderr.write(f"\r{line}\x1b[K")
        sys.stderr.flush()

    worker = Worker(
        store,
        lambda claim: ProcessJob(command, claim, args.stdin),
        workers=args.jobs,
        lease=args.lease,
        drain=args.drain,
        progress=progress if show else None,
    )
    signalled: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        signalled.append(signum)
        worker.stop()  # the first lets the commands finish, the second stops them

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(signum) is not signal.SIG_IGN:
                previous[signum] = signal.signal(signum, on_signal)
    try:
        report = worker.run()
    finally:
        # The summary also ends a run that an error of the runner ended.
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if show:
            sys.stderr.write("\n")
        if not args.quiet:
            ended = worker.report
            _error(
                f"work: {ended.done} done, {ended.failed} failed, "
                f"{ended.lost} lost, {ended.cancelled} given back"
            )
    if signalled:
        return 128 + signalled[0]
    return EXIT_FAILED if report.failed else EXIT_OK


def cmd_recover(args: argparse.Namespace) -> int:
    return _do_then_say(args, "recovered", lambda s: s.recover(args.older_than))


def cmd_requeue(args: argparse.Namespace) -> int:
    store = _store(args)
    if not args.all and not args.names:
        raise UsageError("name the dead letters to requeue, or pass --all")
    _stdout()
    names = store.list("dead") if args.all else args.names
    done: list[str] = []
    try:
        with _signals_blocked():
            for name in names:
                done.append(store.requeue(name))
    except BaseException:
        if done:
            _error("requeued " + " ".join(_shown(p) for p in done) + " before the error")
        raise
    _hand_on(done, _end(args), "requeued")
    return EXIT_OK


def cmd_clean(args: argparse.Namespace) -> int:
    return _do_then_say(args, "removed", lambda s: s.clean(args.older_than))


def cmd_stat(args: argparse.Namespace) -> int:
    stats = _store(args).stats()
    if args.json:
        import json  # only here: its import costs every other command's start-up

        _print(json.dumps(stats, sort_keys=True))
        return EXIT_OK
    _print(f"{'area':<6}{'count':>10}  oldest")
    for area, row in stats.items():
        if area == "delay":
            when = row["next_due_in"]
            age = "-" if when is None else f"next due in {when:.1f}s"
        else:
            age = "-" if row["oldest_age"] is None else f"{row['oldest_age']:.1f}s"
        _print(f"{area:<6}{row['count']:>10}  {age}")
    return EXIT_OK


class _Formatter(argparse.HelpFormatter):
    """argparse's formatter, sized without importing shutil: every parser
    makes one, and shutil costs the command's start-up."""

    def __init__(self, prog: str) -> None:
        try:
            columns = int(os.environ.get("COLUMNS", "")) or os.get_terminal_size(2).columns
        except (ValueError, OSError):
            columns = 80
        super().__init__(prog, width=max(columns - 2, 20))


def verbose_option(parser: argparse.ArgumentParser, dest: str) -> None:
    # The command's own count is kept apart: argparse would let it replace
    # the count given before the command's name.
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        dest=dest,
        default=0,
        help="log what atomstore does on standard error (fallbacks, recoveries, "
        "removals); twice for more",
    )


def verbosity(args: argparse.Namespace) -> int:
    """How many ``-v`` were given, before and after the command's name."""
    return int(args.verbose) + int(getattr(args, "command_verbose", 0))


def _show_log(verbosity: int) -> None:
    """Send the ``atomstore`` logger's records to standard error."""
    if not verbosity:
        return
    import logging  # only when asked: its import costs every start-up

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("atomstore: %(message)s"))
    logger = logging.getLogger("atomstore")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if verbosity == 1 else logging.DEBUG)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="atomstore",
        description="Atomic file writes and a lock-free file queue (maildir style).",
        epilog=_EPILOG,
        allow_abbrev=False,
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    verbose_option(parser, "verbose")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(
        name: str, func: Callable[[argparse.Namespace], int], text: str, changes: bool = True
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=text,
            description=text,
            epilog=_EPILOG,
            allow_abbrev=False,
            formatter_class=_Formatter,
        )
        verbose_option(sub, "command_verbose")
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
    put.add_argument(
        "--delay",
        type=duration,
        metavar="DURATION",
        help="deliver into delay/: claimable only after this long (30s, 5m, 2h)",
    )
    null_option(put, "name")
    ls = store_command(
        "ls",
        cmd_ls,
        "list an area (tmp, new, cur, dead, delay), oldest (or first due) first",
        changes=False,
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
    take.add_argument(
        "-n",
        "--count",
        type=positive_int,
        default=1,
        metavar="N",
        help="claim up to N messages, one path per line (all given back if they cannot "
        "all be printed)",
    )
    take.add_argument(
        "--any",
        action="store_true",
        help="any waiting message, not the oldest: no listing of new/ (fast with a huge backlog)",
    )
    null_option(take, "path")
    done = store_command("done", cmd_done, "finish a claim: remove the message")
    done.add_argument("name", metavar="NAME", help="the path (or name) take printed")
    renew = store_command(
        "renew",
        cmd_renew,
        "extend a claim's lease from now (recover counts from the last renewal)",
        changes=False,
    )
    renew.add_argument("name", metavar="NAME", help="the path (or name) take printed")
    release = store_command(
        "release", cmd_release, "give a claim back to new/ (one attempt); print its new path"
    )
    release.add_argument("name", metavar="NAME", help="the path (or name) take printed")
    release.add_argument(
        "--delay",
        type=duration,
        metavar="DURATION",
        help="claimable again only after this long (instead of --retry-delay)",
    )
    recover = store_command("recover", cmd_recover, "return claims older than a lease to new/")
    work = store_command(
        "work",
        cmd_work,
        "run COMMAND for each message, JOBS at once: finish on success, release on failure",
    )
    work.add_argument(
        "-j", "--jobs", type=positive_int, default=1, metavar="JOBS", help="commands at once"
    )
    work.add_argument(
        "--lease",
        type=duration,
        metavar="DURATION",
        help="renew running claims every third of it, and recover claims older than it",
    )
    work.add_argument(
        "--drain",
        action="store_true",
        help="exit once no message is waiting (in new/ or delay/) and no command runs",
    )
    work.add_argument(
        "--stdin", action="store_true", help="give each command its message on standard input"
    )
    work.add_argument("--quiet", action="store_true", help="no progress and no summary")
    work.add_argument(
        "command_line",
        metavar="COMMAND",
        nargs="*",
        help="the command and its arguments, after --; {} stands for the claimed "
        "file's path (appended where no {} appears)",
    )
    for sub in (release, recover, work):
        sub.add_argument(
            "--max-attempts",
            type=positive_int,
            metavar="N",
            help="send a message that used N attempts to dead/ instead of new/",
        )
        sub.add_argument(
            "--retry-delay",
            type=duration,
            metavar="DURATION",
            help="let a message wait this long before its next attempt, "
            "doubled per attempt after the first (at most 1h)",
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
    stats = store_command(
        "stat", cmd_stat, "count the files of each area, with the oldest's age", changes=False
    )
    stats.add_argument("--json", action="store_true", help="print one JSON object")
    for sub in (release, recover, requeue, clean):
        null_option(sub, "path")
    return parser


def describe(error: BaseException) -> str:
    """One line for an error, naming the file(s) involved."""
    if isinstance(error, OSError) and error.strerror:
        text = error.strerror
        if error.filename is not None:
            text += f": {_shown(os.fsdecode(error.filename))}"
        if error.filename2 is not None:
            text += f" -> {_shown(os.fsdecode(error.filename2))}"
        return text
    return _shown(str(error)) or type(error).__name__


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


_DURATION_OPTIONS = ("--wait", "--older-than", "--delay", "--retry-delay", "--lease")


def _negative_durations(argv: Sequence[str]) -> list[str]:
    """``--older-than -5m`` as ``--older-than=-5m``: argparse would take the
    value for an option and say "expected one argument"; this way the
    duration's own check says what is wrong with it."""
    result: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg == "--":  # what follows are operands, however they look
            result.append(arg)
            result.extend(args)
            break
        if arg in _DURATION_OPTIONS:
            value = next(args, None)
            if value is not None and re.match(r"^-(?:[0-9.]|inf)", value, re.IGNORECASE):
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
    if sys.stderr is None:
        # Started with descriptor 2 closed (``2>&-``): errors go nowhere,
        # not into standard output, where a script reads paths.
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - for the process's life
    parser = build_parser()
    arguments = _negative_durations(sys.argv[1:] if argv is None else argv)
    command: list[str] | None = None
    if arguments[:1] == ["work"] and "--" in arguments:
        # What follows -- is the command to run, options included: argparse
        # would take them for its own, or match an empty COMMAND too early.
        cut = arguments.index("--")
        arguments, command = arguments[:cut], arguments[cut + 1 :]
    args = parser.parse_args(arguments)
    _show_log(verbosity(args))
    if command is not None:
        args.command_line = command
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, ())
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
            _error(f"error: {describe(e)}")
        # else whoever read our output went away (``atomstore ls | head``):
        # nothing to say to anyone.
        _silence_stdout()
        return EXIT_ERROR
    except (OSError, ValueError, TypeError) as e:
        _error(f"error: {describe(e)}")
        return EXIT_ERROR
    finally:
        if argv is not None:
            # Called from Python, not as the program: the caller's signal
            # mask as it was.  (The program exits with what a hand-off
            # blocked still blocked.)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
