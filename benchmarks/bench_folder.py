"""Benchmark 3: replace a folder of 100 files of 1 KiB.

Every contender fills its staging directory with the same code (the user's
part, :func:`handwritten.write_tree`) and publishes it over the existing
folder; the old tree is removed before the operation returns.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

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
    build,
    close_all,
    describe,
    find,
    interleave,
    method,
    peer,
    verdict,
    workdir,
)

from atomstore import atomic

FILES = 100


def _case(name: str, directory: str, replace: object, note: str) -> Case:
    dest = os.path.join(directory, "site")
    os.mkdir(dest)
    hw.write_tree(dest, FILES, PAYLOAD, False)

    def check() -> None:
        hw.listing_is(directory, {"site"})
        hw.listing_is(dest, {f"f{i:03d}" for i in range(FILES)})
        hw.same_content(os.path.join(dest, "f099"), PAYLOAD)

    return Case(name, replace, check=check, note=note)  # type: ignore[arg-type]


def _hand(durable: bool, sync_late: bool = False) -> Factory:
    def make(directory: str) -> Case:
        dest = os.path.join(directory, "site")
        serial = itertools.count()

        def replace() -> None:
            hw.replace_tree(dest, FILES, PAYLOAD, durable, next(serial), sync_late)

        name, note = "hand-written", "mkdir, write, RENAME_EXCHANGE (ctypes), rmtree"
        if durable and sync_late:
            name, note = "hand-written", "write all files, then fsync each, the tree, the parent"
        elif durable:
            name, note = "hand-written, fsync as written", "fsync each file before closing it"
        return _case(name, directory, replace, note)

    return make


def _atomstore(durable: bool) -> Factory:
    def make(directory: str) -> Case:
        dest = os.path.join(directory, "site")

        def replace() -> None:
            with atomic.folder(dest, overwrite=True, durable=durable) as staging:
                hw.write_tree(str(staging), FILES, PAYLOAD, False)

        return _case("atomstore folder", directory, replace, "")

    return make


def _atomik(durable: bool) -> Factory:
    def make(directory: str) -> Case:
        atomik = peer("atomik", "atomik")
        dest = os.path.join(directory, "site")

        def replace() -> None:
            with atomik.folder(dest, overwrite=True, tmp_dir=directory) as staging:
                hw.write_tree(str(Path(staging)), FILES, PAYLOAD, False)

        return _case("atomik folder", directory, replace, "never fsyncs; tmp_dir= given")

    return make


def contenders(durable: bool) -> list[tuple[str, Factory]]:
    mode = "durable" if durable else "fast"
    found = [
        (f"folder-{mode}/hand", _hand(durable, sync_late=True)),
        (f"folder-{mode}/atomstore", _atomstore(durable)),
        (f"folder-{mode}/atomik", _atomik(durable)),
    ]
    if durable:
        found.append((f"folder-{mode}/hand-early", _hand(durable)))
    return found


def run(settings: Settings) -> list[Table]:
    tables = []
    for durable in (False, True):
        base_dir = settings.disk if durable else settings.tmpfs
        factories = contenders(durable)
        if durable:
            rounds, ops = settings.pick_rounds(25, 4), 1
        else:
            rounds, ops = settings.pick_rounds(21, 7), settings.pick(10, 4)
        with workdir(base_dir, "folder", settings.keep) as base:
            built = build(factories, base)
            rows = interleave(built, rounds, ops, WALL if durable else CPU, warmup=1)
            if durable:
                keys = ("folder-durable/atomstore",)
                syscounts.fill_fsyncs(factories, built, base_dir, 1, settings.strace, keys)
            close_all(built)
        kind = "durable" if durable else "not durable"
        clock = WALL if durable else CPU
        where = f"{'disk' if durable else 'tmpfs'}: {describe(base_dir)}; "
        where += method(rounds, ops, clock)
        title = f"3{'b' if durable else ''}. Replace a folder of {FILES} x 1 KiB files, {kind}"
        table = Table(title, rows, where=where)
        if durable:
            limit = FILES + 2
            row = find(rows, "atomstore folder")
            if row is not None and row.fsyncs is not None:
                table.targets.append(
                    f"atomstore folder <= {limit} fsyncs (one per file and directory of the "
                    f"tree, + the parent): {verdict(row.fsyncs <= limit)} ({row.fsyncs:g})"
                )
            table.notes.append(
                "the hand-written sequences fsync each file through the descriptor they "
                "wrote it with; atomstore cannot (the caller wrote and closed the files) and "
                "opens each again to fsync it: 2 more system calls per file"
            )
        tables.append(table)
    return tables
