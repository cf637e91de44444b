"""Interleaved timing, medians and paired ratios, and the tables they print.

Speed here is a ratio taken side by side in one run, never an absolute time:
the machines are shared and their speed drifts.  Every round runs each
contender's batch once, the starting contender rotating from round to round
(A B C, B C A, C A B, ...), so drift hits every contender alike.
"""

from __future__ import annotations

import gc
import importlib
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

PAYLOAD = bytes(range(256)) * 4  # 1 KiB, the same bytes for every contender


class Missing(Exception):
    """A contender cannot run here (a peer package is not installed)."""


def peer(module: str, package: str) -> Any:
    """Import a peer's ``module``, or raise :class:`Missing` naming its ``package``.

    Peers are typed as Any: most ship no type information, and the
    benchmarks type-check with or without them installed.
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        raise Missing(f"not installed ({package})") from None


def internal(name: str) -> Any:
    """One of atomstore's implementation modules, or None where it moved.

    The profile times some of atomstore's internal steps alone; they may be
    renamed at any time, and a missing one must not stop the benchmarks.
    """
    try:
        return importlib.import_module(f"atomstore.{name}")
    except ImportError:
        return None


@dataclass
class Case:
    """One contender: an operation to repeat, with untimed housekeeping.

    :ivar op: one operation (one write, one round trip, ...).
    :ivar reset: run untimed after each batch (remove what the batch left).
    :ivar check: run once after the warm-up; raises if the result is wrong.
    :ivar close: run once at the end.
    :ivar note: what the reader must know to judge the row.
    """

    name: str
    op: Callable[[], object]
    reset: Callable[[], None] | None = None
    check: Callable[[], None] | None = None
    close: Callable[[], None] | None = None
    note: str = ""


Factory = Callable[[str], Case]


@dataclass
class Row:
    """The result of one contender in one table."""

    name: str
    note: str = ""
    samples: list[float] = field(default_factory=list)  # seconds per op, one per round
    ratios: list[float] = field(default_factory=list)  # to the baseline, per round
    fsyncs: float | None = None
    missing: str = ""

    @property
    def median_us(self) -> float:
        return statistics.median(self.samples) * 1e6

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)

    @property
    def spread(self) -> float:
        """Interquartile range over the median: how noisy the rounds were."""
        if len(self.samples) < 4:
            return 0.0
        q1, _, q3 = statistics.quantiles(self.samples, n=4)
        return (q3 - q1) / statistics.median(self.samples)


@dataclass
class Table:
    """A printed result: rows, the filesystem, the verdict on each target."""

    title: str
    rows: list[Row]
    where: str = ""
    extra: dict[str, list[str]] = field(default_factory=dict)  # more columns, by heading
    targets: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    plain: list[list[str]] | None = None  # a table that is not rows of timings
    headings: list[str] | None = None


@dataclass
class Settings:
    """What a run measures and where."""

    quick: bool
    tmpfs: str
    disk: str
    rounds: int | None = None  # None: each benchmark's own default
    strace: bool = True
    keep: bool = False

    def pick_rounds(self, full: int, quick: int) -> int:
        if self.rounds is not None:
            return self.rounds
        return quick if self.quick else full

    def pick(self, full: int, quick: int) -> int:
        return quick if self.quick else full


@contextmanager
def workdir(base: str, label: str, keep: bool = False) -> Iterator[str]:
    """A fresh directory under ``base``, removed afterwards."""
    path = tempfile.mkdtemp(prefix=f"atomstore-bench-{label}-", dir=base)
    try:
        yield path
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)


def build(factories: Sequence[tuple[str, Factory]], base: str) -> list[tuple[Row, Case | None]]:
    """Make each contender in its own directory under ``base``."""
    built: list[tuple[Row, Case | None]] = []
    for key, factory in factories:
        directory = os.path.join(base, key.replace("/", "_"))
        os.mkdir(directory)
        try:
            case = factory(directory)
        except Missing as e:
            built.append((Row(key, missing=str(e)), None))
            continue
        built.append((Row(case.name, case.note), case))
    return built


Clock = Callable[[], float]
CPU: Clock = time.thread_time
"""CPU time of this thread: for work on tmpfs, where nothing waits for a disk,
it leaves out the time other processes of a shared machine take the CPU."""
WALL: Clock = time.perf_counter
"""Wall-clock time: for durable work, which waits for the disk."""


def _timed_batch(case: Case, ops: int, clock: Clock) -> float:
    op = case.op
    gc.collect()
    gc.disable()
    try:
        start = clock()
        for _ in range(ops):
            op()
        elapsed = clock() - start
    finally:
        gc.enable()
    if case.reset is not None:
        case.reset()
    return elapsed / ops


def interleave(
    built: list[tuple[Row, Case | None]],
    rounds: int,
    ops: int,
    clock: Clock,
    warmup: int = 3,
) -> list[Row]:
    """Time every case ``rounds`` times, ``ops`` operations a batch.

    The first case is the baseline of the ratios: with batches of several
    operations, the median of the per-round ratios (a pair shares the
    machine's state of the moment); with single operations, whose times
    scatter too widely to pair, the ratio of the medians.
    """
    live = [(row, case) for row, case in built if case is not None]
    for _, case in live:
        for _ in range(warmup):
            case.op()
        if case.check is not None:
            case.check()
        if case.reset is not None:
            case.reset()
    for r in range(rounds):
        shift = r % len(live)
        order = live[shift:] + live[:shift]
        for row, case in order:
            row.samples.append(_timed_batch(case, ops, clock))
    base = live[0][0].samples
    for row, _ in live:
        if ops == 1:
            row.ratios = [statistics.median(row.samples) / statistics.median(base)]
        else:
            row.ratios = [s / b for s, b in zip(row.samples, base)]
    return [row for row, _ in built]


def method(rounds: int, ops: int, clock: Clock) -> str:
    """How a table was timed, for its heading."""
    kind = "CPU time" if clock is CPU else "wall time"
    if ops == 1:
        return f"{kind}, {rounds} rounds of single operations, ratio of medians"
    return f"{kind}, {rounds} rounds of {ops} operations, median of per-round ratios"


def close_all(built: list[tuple[Row, Case | None]]) -> None:
    for _, case in built:
        if case is not None and case.close is not None:
            case.close()


def fstype(path: str) -> str:
    """The filesystem type of ``path``, from the longest matching mount."""
    real = os.path.realpath(path)
    best, kind = "", "?"
    try:
        with open("/proc/self/mounts") as mounts:
            for line in mounts:
                fields = line.split()
                point = fields[1].replace("\\040", " ")
                inside = real == point or real.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best):
                    best, kind = point, fields[2]
    except OSError:
        pass
    return kind


def describe(path: str) -> str:
    return f"{path} ({fstype(path)})"


def fmt_us(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}"


def fmt_count(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value - round(value)) < 0.05:
        return str(round(value))
    return f"{value:.2f}"


def _grid(headings: list[str], body: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(line[i]) for line in body)) for i, h in enumerate(headings)]
    out = ["  ".join(h.ljust(w) for h, w in zip(headings, widths))]
    out.append("  ".join("-" * w for w in widths))
    for line in body:
        out.append("  ".join(c.ljust(w) for c, w in zip(line, widths)))
    return out


def table_cells(table: Table) -> tuple[list[str], list[list[str]]]:
    """The headings and cells of ``table``, as printed and as written in reST."""
    if table.plain is not None:
        return list(table.headings or []), table.plain
    show_fsync = any(r.fsyncs is not None for r in table.rows)
    timed = [r for r in table.rows if not r.missing]
    # One unit for the whole column: milliseconds where the baseline takes 10 ms.
    scale, unit = (1000.0, "ms/op") if timed and timed[0].median_us >= 10000 else (1.0, "us/op")
    headings = ["contender", unit, "ratio", "IQR"]
    if show_fsync:
        headings.append("fsync/op")
    headings.extend(table.extra)
    headings.append("note")
    body = []
    for i, row in enumerate(table.rows):
        if row.missing:
            line = [row.name, "-", "-", "-"] + (["-"] if show_fsync else [])
            line += ["-" for _ in table.extra] + [row.missing]
        else:
            line = [
                row.name,
                fmt_us(row.median_us / scale),
                f"{row.ratio:.2f}x",
                f"{row.spread * 100:.0f}%",
            ]
            if show_fsync:
                line.append(fmt_count(row.fsyncs))
            line += [values[i] for values in table.extra.values()]
            line.append(row.note)
        body.append(line)
    return headings, body


def render(table: Table) -> str:
    """``table`` as plain text for the terminal."""
    headings, body = table_cells(table)
    lines = [f"== {table.title}"]
    if table.where:
        lines.append(f"   {table.where}")
    lines.extend(_grid(headings, body) if body else ["(no rows)"])
    for note in table.notes:
        lines.append(f"   note: {note}")
    for target in table.targets:
        lines.append(f"   target: {target}")
    return "\n".join(lines)


def render_rst(table: Table) -> str:
    """``table`` as a reST simple table with its notes and targets."""
    headings, body = table_cells(table)
    out = [table.title, "-" * len(table.title), ""]
    if table.where:
        out += [table.where, ""]
    if body:
        widths = [max(len(h), *(len(line[i]) for line in body)) for i, h in enumerate(headings)]
        rule = "  ".join("=" * w for w in widths)
        out.append(rule)
        out.append("  ".join(h.ljust(w) for h, w in zip(headings, widths)).rstrip())
        out.append(rule)
        for line in body:
            # A simple table's first column may not be blank; the others may.
            cells = [c.ljust(w) for c, w in zip(line, widths)]
            out.append("  ".join(cells).rstrip())
        out.append(rule)
        out.append("")
    for note in table.notes:
        out.append(f"* {note}")
    for target in table.targets:
        out.append(f"* target: {target}")
    out.append("")
    return "\n".join(out)


def verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def find(rows: list[Row], name: str) -> Row | None:
    for row in rows:
        if row.name == name and not row.missing:
            return row
    return None


def ratio_target(rows: list[Row], name: str, limit: float, against: str = "") -> str:
    """The verdict on ``name``'s ratio to the baseline being at most ``limit``."""
    row = find(rows, name)
    if row is None:
        return f"{name} <= {limit:.2f}x {against}: not measured"
    # Judged as printed: a ratio shown as 1.05x meets a 1.05x target.
    met = round(row.ratio, 2) <= limit
    return f"{name} <= {limit:.2f}x {against}: {verdict(met)} ({row.ratio:.2f}x)"


def ahead_target(rows: list[Row], name: str, peers: list[str]) -> str:
    """The verdict on ``name`` being faster than each of ``peers``."""
    row = find(rows, name)
    if row is None:
        return f"{name} ahead of every peer: not measured"
    slower = []
    for peer in peers:
        other = find(rows, peer)
        if other is not None and other.ratio <= row.ratio:
            slower.append(peer)
    measured = [p for p in peers if find(rows, p) is not None]
    if not measured:
        return f"{name} ahead of every peer: no peer measured"
    detail = "behind " + ", ".join(slower) if slower else f"ahead of all {len(measured)}"
    if len(measured) < len(peers):
        detail += f"; {len(peers) - len(measured)} not installed"
    return f"{name} ahead of every peer: {verdict(not slower)} ({detail})"


def as_json(table: Table) -> dict[str, Any]:
    rows = []
    for row in table.rows:
        rows.append(
            {
                "name": row.name,
                "note": row.note,
                "missing": row.missing,
                "median_us": None if row.missing else row.median_us,
                "ratio": None if row.missing or not row.ratios else row.ratio,
                "samples_us": [s * 1e6 for s in row.samples],
                "fsyncs": row.fsyncs,
            }
        )
    return {
        "title": table.title,
        "where": table.where,
        "rows": rows,
        "extra": table.extra,
        "plain": table.plain,
        "headings": table.headings,
        "targets": table.targets,
        "notes": table.notes,
    }
