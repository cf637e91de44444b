"""System calls per operation: through atomstore's OS boundary, and by strace.

The OS boundary (``atomstore._syscalls.set_tracer``) sees every call that
changes the filesystem, but only atomstore's.  ``strace -c`` sees every
system call of every contender: each is counted twice in a child process,
once with a warm-up only and once with ``n`` more operations, and the
difference divided by ``n`` is the count per operation (the imports and the
set-up cancel out).
"""

from __future__ import annotations

import collections
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any, Callable

from _harness import Case, Factory, Row

from atomstore import _syscalls

HERE = os.path.dirname(os.path.abspath(__file__))

# Memory management and signal set-up say nothing about the algorithm.
_NOISE = frozenset(
    {"brk", "mmap", "munmap", "mprotect", "madvise", "mremap", "rt_sigaction", "rt_sigprocmask"}
)
SYNCS = ("fsync", "fdatasync")


def boundary_counts(case: Case, ops: int) -> dict[str, float]:
    """Calls through atomstore's OS boundary per op of ``case``, by name."""
    counts: collections.Counter[str] = collections.Counter()

    def count(name: str, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        counts[name] += 1
        return func(*args, **kwargs)

    previous = _syscalls.set_tracer(count)
    try:
        for _ in range(ops):
            case.op()
    finally:
        _syscalls.set_tracer(previous)
    if case.reset is not None:
        case.reset()
    return {name: n / ops for name, n in counts.items()}


def have_strace() -> bool:
    return shutil.which("strace") is not None


def _strace_once(key: str, base: str, ops: int) -> collections.Counter[str]:
    with tempfile.TemporaryDirectory(dir=base, prefix="atomstore-strace-") as scratch:
        out = os.path.join(scratch, "strace.out")
        work = os.path.join(scratch, "work")
        os.mkdir(work)
        command = [
            "strace",
            "-f",
            "-c",
            "-o",
            out,
            sys.executable,
            os.path.join(HERE, "run.py"),
            "--child",
            key,
            work,
            str(ops),
        ]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        with open(out) as f:
            return parse_summary(f.read())


def parse_summary(text: str) -> collections.Counter[str]:
    """The calls column of ``strace -c`` output, by system call."""
    counts: collections.Counter[str] = collections.Counter()
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 5 or not fields[3].isdigit() or fields[-1] == "total":
            continue
        counts[fields[-1]] += int(fields[3])
    return counts


def strace_counts(key: str, base: str, ops: int) -> dict[str, float] | None:
    """System calls per op of the contender ``key`` (None without strace)."""
    if not have_strace():
        return None
    idle = _strace_once(key, base, 0)
    busy = _strace_once(key, base, ops)
    per_op = {}
    for name in set(idle) | set(busy):
        if name in _NOISE:
            continue
        value = (busy[name] - idle[name]) / ops
        if abs(value) >= 0.02:
            per_op[name] = value
    return per_op


def total(counts: dict[str, float]) -> float:
    return sum(counts.values())


def fill_fsyncs(
    factories: list[tuple[str, Factory]],
    built: list[tuple[Row, Case | None]],
    base: str,
    ops: int,
    use_strace: bool,
    boundary_keys: tuple[str, ...] = (),
) -> None:
    """Set each row's fsyncs per op: by strace, and for ``boundary_keys``
    (atomstore's contenders) also through the OS boundary, as a cross-check."""
    for (key, _), (row, case) in zip(factories, built):
        if case is None:
            continue
        row.fsyncs = fsyncs(strace_counts(key, base, ops) if use_strace else None)
        if key in boundary_keys:
            boundary = boundary_counts(case, ops).get("fsync", 0.0)
            if row.fsyncs is None:
                row.fsyncs = boundary
            elif abs(boundary - row.fsyncs) > 0.01:
                row.note += f" (but {boundary:g} fsyncs through the OS boundary)"


def fsyncs(counts: dict[str, float] | None) -> float | None:
    if counts is None:
        return None
    return sum(counts.get(name, 0.0) for name in SYNCS)
