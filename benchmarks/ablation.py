"""Rebuild atomstore's hot paths from the baseline up, one extra step at a time.

Each row adds one of the steps atomstore takes beyond the hand-written
sequence; timed side by side (CPU time on tmpfs), the rows show what each
step costs, and the gap between the last rebuilt row and atomstore itself is
the price of the library's own Python: argument checks, layers of calls,
error handling.
"""

from __future__ import annotations

import os
import stat
from typing import Callable

import handwritten as hw
from _harness import (
    CPU,
    PAYLOAD,
    Case,
    Factory,
    Settings,
    Table,
    build,
    describe,
    interleave,
    internal,
)
from _harness import method as timing_method
from bench_write import replacing

from atomstore import FileStore, atomic


def _write_step(level: int) -> Factory:
    """The hand-written replacement with the first ``level`` extra steps."""
    names = internal("_names")
    boundary = internal("_syscalls") if level >= 4 else os

    def make(directory: str) -> Case:
        def write(dest: str) -> None:
            temp = os.path.join(directory, ".dest.tmp")
            st = None
            if level >= 1:
                try:
                    st = os.lstat(dest)
                except FileNotFoundError:
                    pass
            if level >= 3 and names is not None:
                temp = os.path.join(directory, names.staging_name("dest", "tmp"))
            fd = boundary.open(temp, hw.FILE_FLAGS, 0o666)
            if st is not None and level >= 2:
                if st.st_uid != os.geteuid() or st.st_gid != os.getegid():
                    boundary.fchown(fd, st.st_uid, st.st_gid)
                boundary.fchmod(fd, stat.S_IMODE(st.st_mode))
            boundary.write(fd, PAYLOAD)
            boundary.close(fd)
            boundary.rename(temp, dest)

        return replacing(WRITE_STEPS[level], directory, write)

    return make


WRITE_STEPS = [
    "hand-written: open, write, close, rename",
    "and lstat(dest) first",
    "and the owner check, fchmod to keep the mode",
    "and a random hidden temp name (staging_name)",
    "and every call through atomstore._syscalls",
]


def _atomstore_write(directory: str) -> Case:
    return replacing(
        "atomstore write_bytes",
        directory,
        lambda dest: atomic.write_bytes(dest, PAYLOAD, overwrite=True, durable=False),
    )


class _Spool(hw.Spool):
    """The hand-written spool with some of atomstore's steps added."""

    def __init__(self, root: str, level: int) -> None:
        super().__init__(root, False)
        self.level = level
        self.store = FileStore(root, durable=False)
        self.info = internal("_info")

    def add(self, data: bytes) -> str:
        if self.level < 1:
            return super().add(data)
        name = self.store.unique_name()
        temp = os.path.join(self.tmp, name)
        fd = os.open(temp, hw.FILE_FLAGS, 0o666)
        hw.write_all(fd, data)
        os.close(fd)
        target = os.path.join(self.new, name)
        if self.level >= 2:
            hw.renameat2(temp, target, hw.RENAME_NOREPLACE)
        else:
            os.rename(temp, target)
        return name

    def claim(self) -> str | None:
        if self.level < 3 or self.info is None:
            return super().claim()
        names = os.listdir(self.new)
        if not names:
            return None
        name = min(names)
        base, fields = self.info.split_info(name)
        claimed = os.path.join(
            self.cur,
            self.info.claim_name(base, self.info.attempts(fields), 0, self.info.token()),
        )
        os.rename(os.path.join(self.new, name), claimed)
        return claimed

    def read(self, path: str) -> bytes:
        if self.level < 4:
            return hw.read_file(path)
        with open(os.open(path, hw.READ_FLAGS), "rb") as f:
            data: bytes = f.read()
        return data


STORE_STEPS = [
    "hand-written round trip",
    "and FileStore.unique_name()",
    "and publishing with renameat2(NOREPLACE)",
    "and the claimed name with info (token, time)",
    "and reading through open(fd, 'rb')",
]


def _store_step(level: int) -> Factory:
    def make(directory: str) -> Case:
        spool = _Spool(directory, level)

        def op() -> None:
            spool.add(PAYLOAD)
            claimed = spool.claim()
            assert claimed is not None
            spool.read(claimed)
            spool.finish(claimed)

        return Case(STORE_STEPS[level], op)

    return make


def _atomstore_store(directory: str) -> Case:
    store = FileStore(directory, durable=False)
    store.prepare()

    def op() -> None:
        store.add(PAYLOAD)
        claim = store.claim()
        assert claim is not None
        claim.read_bytes()
        claim.finish()

    return Case("atomstore FileStore", op)


def _table(
    title: str, factories: list[tuple[str, Factory]], settings: Settings, base: str, ops: int
) -> Table:
    directory = os.path.join(base, title.split()[0])
    os.mkdir(directory)
    rounds = settings.pick_rounds(21, 7)
    rows = interleave(build(factories, directory), rounds, ops, CPU)
    previous = None
    step = []
    for row in rows:
        step.append("" if previous is None else f"{(row.ratio - previous) * 100:+.0f}%")
        previous = row.ratio
    table = Table(
        f"Rebuilding {title} step by step",
        rows,
        where=f"tmpfs: {describe(settings.tmpfs)}; {timing_method(rounds, ops, CPU)}",
        extra={"step": step},
    )
    table.notes.append(
        "step: what the row adds to the one above, in % of the baseline; the last step is "
        "atomstore's own code around the same system calls"
    )
    return table


def run(settings: Settings, base: str) -> list[Table]:
    write: list[tuple[str, Factory]] = [
        (f"ablation-write/{i}", _write_step(i)) for i in range(len(WRITE_STEPS))
    ]
    write.append(("ablation-write/atomstore", _atomstore_write))
    store: list[tuple[str, Factory]] = [
        (f"ablation-store/{i}", _store_step(i)) for i in range(len(STORE_STEPS))
    ]
    store.append(("ablation-store/atomstore", _atomstore_store))
    ops: Callable[[int, int], int] = settings.pick
    return [
        _table("write_bytes (replacing)", write, settings, base, ops(300, 100)),
        _table("round trip", store, settings, base, ops(150, 60)),
    ]
