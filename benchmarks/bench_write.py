"""Benchmarks 1 and 2: one atomic write of 1 KiB, against the peers.

Every contender replaces the same destination file again and again (the
config-file case), or, in the no-clobber variant, creates a new name each
time and refuses to replace one (atomstore's default).
"""

from __future__ import annotations

import itertools
import os
from typing import Any, Callable

import handwritten as hw
import syscounts
from _harness import (
    CPU,
    PAYLOAD,
    WALL,
    Case,
    Factory,
    Settings,
    Table,
    ahead_target,
    build,
    describe,
    find,
    interleave,
    method,
    peer,
    ratio_target,
    verdict,
    workdir,
)

from atomstore import atomic


def replacing(name: str, directory: str, write: Callable[[str], object], note: str = "") -> Case:
    """A contender that replaces ``directory/dest`` with each op."""
    dest = os.path.join(directory, "dest")
    write(dest)

    def check() -> None:
        hw.same_content(dest, PAYLOAD)
        hw.listing_is(directory, {"dest"})

    return Case(name, lambda: write(dest), check=check, note=note)


def _creating(name: str, directory: str, write: Callable[[str], object], note: str = "") -> Case:
    """A contender that creates a new name with each op, refusing to replace."""
    counter = itertools.count()

    def op() -> None:
        write(os.path.join(directory, f"f{next(counter):09d}"))

    def check() -> None:
        names = os.listdir(directory)
        if any(not (n.startswith("f") and n[1:].isdigit()) for n in names):
            raise AssertionError(f"temporary files left: {names}")
        hw.same_content(os.path.join(directory, max(names)), PAYLOAD)
        try:
            write(os.path.join(directory, max(names)))
        except Exception:
            hw.same_content(os.path.join(directory, max(names)), PAYLOAD)
        else:
            raise AssertionError(f"{name} replaced an existing file")
        for leftover in os.listdir(directory):
            if leftover not in names:
                os.unlink(os.path.join(directory, leftover))  # its temp file, if any

    return Case(name, op, reset=lambda: hw.remove_all(directory), check=check, note=note)


def _hand(durable: bool, replace: bool) -> Factory:
    def make(directory: str) -> Case:
        temp = os.path.join(directory, ".dest.tmp")
        if replace:
            return replacing(
                "hand-written",
                directory,
                lambda dest: hw.write_file(temp, dest, PAYLOAD, durable),
                "O_EXCL temp, write, "
                + ("fsync, close, rename, fsync dir" if durable else "close, rename"),
            )
        return _creating(
            "hand-written",
            directory,
            lambda dest: hw.write_new_file(temp, dest, PAYLOAD, durable),
            "as above, renameat2(RENAME_NOREPLACE) via ctypes",
        )

    return make


def _hand_floor(durable: bool, replace: bool) -> Factory:
    """The least any library keeping atomstore's promises can do by hand:
    replacing, keep the mode (an lstat, the temp made in that mode); new,
    no temporary name at all."""

    def make(directory: str) -> Case:
        temp = os.path.join(directory, ".dest.tmp")
        if replace:
            return replacing(
                "hand-written, keeping the mode",
                directory,
                lambda dest: hw.write_file_keeping_mode(temp, dest, PAYLOAD, durable),
                "lstat, then as above with the temp made in the old mode",
            )
        return _creating(
            "hand-written, O_TMPFILE",
            directory,
            lambda dest: hw.write_new_unnamed(directory, dest, PAYLOAD, durable),
            "O_TMPFILE, write, linkat via /proc/self/fd, close: no temporary name",
        )

    return make


def _hand_file_object(replace: bool) -> Factory:
    """The floor for ``file()``: by hand, through ``open()``'s file object."""

    def make(directory: str) -> Case:
        temp = os.path.join(directory, ".dest.tmp")
        if replace:
            return replacing(
                "hand-written, open()",
                directory,
                lambda dest: hw.write_file_object(temp, dest, PAYLOAD, 0),
                "open(temp, 'xb'), write, close, rename",
            )
        return _creating(
            "hand-written, open()",
            directory,
            lambda dest: hw.write_file_object(temp, dest, PAYLOAD, hw.RENAME_NOREPLACE),
            "open(temp, 'xb'), write, close, renameat2(RENAME_NOREPLACE)",
        )

    return make


def _atomstore_bytes(durable: bool, replace: bool) -> Factory:
    def write(dest: str) -> None:
        atomic.write_bytes(dest, PAYLOAD, overwrite=replace, durable=durable)

    def make(directory: str) -> Case:
        maker = replacing if replace else _creating
        return maker("atomstore write_bytes", directory, write, "")

    return make


def _atomstore_file(durable: bool, replace: bool) -> Factory:
    def write(dest: str) -> None:
        with atomic.file(dest, "wb", overwrite=replace, durable=durable) as f:
            f.write(PAYLOAD)

    def make(directory: str) -> Case:
        maker = replacing if replace else _creating
        return maker("atomstore file('wb')", directory, write, "")

    return make


def _atomicwrites(durable: bool, replace: bool, subclassed: bool) -> Factory:
    def make(directory: str) -> Case:
        module = peer("atomicwrites", "atomicwrites")
        writer_cls = module.AtomicWriter
        if subclassed:

            class NoSync(module.AtomicWriter):  # type: ignore[misc, name-defined]
                # Its documented extension points: no fsync of the file, and a
                # commit without the fsync of the directory.
                def sync(self, f: Any) -> None:
                    f.flush()

                def commit(self, f: Any) -> None:
                    if self._overwrite:
                        os.replace(f.name, self._path)
                    else:
                        os.link(f.name, self._path)
                        os.unlink(f.name)

            writer_cls = NoSync

        def write(dest: str) -> None:
            with module.atomic_write(
                dest, writer_cls=writer_cls, mode="wb", overwrite=replace
            ) as f:
                f.write(PAYLOAD)

        if subclassed:
            name, note = "atomicwrites, no-sync subclass", "sync() and commit() overridden"
        else:
            name, note = "atomicwrites", "always fsyncs the file and the directory"
        maker = replacing if replace else _creating
        return maker(name, directory, write, note)

    return make


def _atomik(durable: bool, replace: bool) -> Factory:
    def make(directory: str) -> Case:
        module = peer("atomik", "atomik")

        def write(dest: str) -> None:
            # Its default temp directory is /tmp: EXDEV on any other filesystem.
            with module.file(
                dest, mode=module.Mode.BYTES, overwrite=replace, tmp_dir=directory
            ) as f:
                f.write(PAYLOAD)

        maker = replacing if replace else _creating
        return maker("atomik", directory, write, "never fsyncs; tmp_dir= given")

    return make


def _safer(durable: bool, replace: bool) -> Factory:
    def make(directory: str) -> Case:
        module = peer("safer", "safer")

        def write(dest: str) -> None:
            if replace:
                with module.open(dest, "wb", temp_file=True) as f:
                    f.write(PAYLOAD)
            else:
                # 'x' refuses temp_file=True: it buffers in memory, then links.
                with module.open(dest, "xb") as f:
                    f.write(PAYLOAD)

        maker = replacing if replace else _creating
        note = "never fsyncs; temp_file=True" if replace else "never fsyncs; 'xb'"
        return maker("safer", directory, write, note)

    return make


def _boltons(durable: bool, replace: bool) -> Factory:
    def make(directory: str) -> Case:
        module = peer("boltons.fileutils", "boltons")

        def write(dest: str) -> None:
            with module.atomic_save(dest, overwrite=replace) as f:
                f.write(PAYLOAD)

        maker = replacing if replace else _creating
        note = "always fsyncs the file, never the directory; fixed .part name"
        return maker("boltons atomic_save", directory, write, note)

    return make


def _atomicwriter(durable: bool, replace: bool) -> Factory:
    def make(directory: str) -> Case:
        module = peer("atomicwriter", "atomicwriter")

        def write(dest: str) -> None:
            with module.AtomicWriter(dest, overwrite=replace) as w:
                w.write_bytes(PAYLOAD)

        maker = replacing if replace else _creating
        note = "always fsyncs the file, after the rename; never the directory"
        return maker("atomicwriter", directory, write, note)

    return make


def contenders(durable: bool, replace: bool = True) -> list[tuple[str, Factory]]:
    """The contenders, baseline first, each under a stable key."""
    mode = ("durable" if durable else "fast") + ("" if replace else "-new")
    found: list[tuple[str, Factory]] = [
        (f"write-{mode}/hand", _hand(durable, replace)),
        (f"write-{mode}/hand-floor", _hand_floor(durable, replace)),
    ]
    if not durable:
        found.append((f"write-{mode}/hand-open", _hand_file_object(replace)))
    found += [
        (f"write-{mode}/atomstore.write_bytes", _atomstore_bytes(durable, replace)),
        (f"write-{mode}/atomstore.file", _atomstore_file(durable, replace)),
    ]
    found.append((f"write-{mode}/atomicwrites", _atomicwrites(durable, replace, False)))
    if not durable:
        found.append((f"write-{mode}/atomicwrites-nosync", _atomicwrites(durable, replace, True)))
        found.append((f"write-{mode}/atomik", _atomik(durable, replace)))
        found.append((f"write-{mode}/safer", _safer(durable, replace)))
    found.append((f"write-{mode}/boltons", _boltons(durable, replace)))
    found.append((f"write-{mode}/atomicwriter", _atomicwriter(durable, replace)))
    return found


PEERS_FAST = [
    "atomicwrites",
    "atomicwrites, no-sync subclass",
    "atomik",
    "safer",
    "boltons atomic_save",
    "atomicwriter",
]


def run_fast(settings: Settings) -> list[Table]:
    """Benchmark 1: not durable, on tmpfs, where only CPU time counts."""
    tables = []
    for replace in (True, False):
        with workdir(settings.tmpfs, "write", settings.keep) as base:
            built = build(contenders(False, replace), base)
            rounds, ops = settings.pick_rounds(21, 7), settings.pick(300, 100)
            rows = interleave(built, rounds, ops, CPU)
        if replace:
            title = "1. Atomic write of 1 KiB, not durable, replacing a file"
        else:
            title = "1b. Atomic write of 1 KiB, not durable, new name, never replacing"
        where = f"tmpfs: {describe(settings.tmpfs)}; {method(rounds, ops, CPU)}"
        table = Table(title, rows, where=where)
        limits = (1.30, 1.50) if replace else (0.85, 1.20)
        for name, limit in zip(("atomstore write_bytes", "atomstore file('wb')"), limits):
            table.targets.append(ratio_target(rows, name, limit, "hand-written"))
            table.targets.append(ahead_target(rows, name, PEERS_FAST))
        table.notes.append(
            "atomicwrites, boltons and atomicwriter always fsync (free on tmpfs, but each "
            "fsync is a system call, and atomicwrites opens the directory for it); "
            "they are compared durably in table 2"
        )
        tables.append(table)
    return tables


def run_durable(settings: Settings) -> list[Table]:
    """Benchmark 2: durable, on the disk filesystem, with fsyncs counted."""
    factories = contenders(True, True)
    rounds = settings.pick_rounds(300, 40)
    with workdir(settings.disk, "write-durable", settings.keep) as base:
        built = build(factories, base)
        rows = interleave(built, rounds, 1, WALL)
        atomstore_keys = tuple(k for k, _ in factories if "/atomstore" in k)
        syscounts.fill_fsyncs(factories, built, settings.disk, 20, settings.strace, atomstore_keys)
    table = Table(
        "2. Durable atomic write of 1 KiB, replacing a file",
        rows,
        where=f"disk: {describe(settings.disk)}; {method(rounds, 1, WALL)}",
    )
    table.targets.append(ratio_target(rows, "atomstore write_bytes", 1.05, "hand-written"))
    table.targets.append(ratio_target(rows, "atomstore file('wb')", 1.05, "hand-written"))
    row = find(rows, "atomstore write_bytes")
    if row is not None and row.fsyncs is not None:
        table.targets.append(
            f"exactly 2 fsyncs per write: {verdict(row.fsyncs == 2)} ({row.fsyncs:g})"
        )
    table.notes.append(
        "fsync/op counted with strace -c in a child process (the difference between a run "
        "with and without the operations); atomstore's also through its OS boundary"
    )
    table.notes.append("atomik and safer never fsync and cannot be asked to: not in this table")
    return [table]
