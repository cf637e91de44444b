"""Benchmark 7: delivering 100 messages durably, one by one or as a batch.

``FileStore.add()`` makes each message durable on its own: an fsync of the
file and one of ``new/``.  ``FileStore.add_many()`` fsyncs each file, then
moves them all and fsyncs ``new/`` once.  The hand-written batch does the
same by hand.
"""

from __future__ import annotations

import os
from pathlib import Path

import handwritten as hw
import syscounts
from _harness import (
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
    workdir,
)

from atomstore import FileStore

MESSAGES = 100


def _drain(new: str) -> None:
    for name in os.listdir(new):
        os.unlink(os.path.join(new, name))


def _hand_batch(directory: str) -> Case:
    spool = hw.Spool(directory, durable=True)

    def deliver() -> None:
        names = []
        for _ in range(MESSAGES):
            name = f"{spool._prefix}{next(spool._counter):012d}"
            temp = os.path.join(spool.tmp, name)
            fd = os.open(temp, hw.FILE_FLAGS, 0o666)
            hw.write_all(fd, PAYLOAD)
            os.fsync(fd)
            os.close(fd)
            names.append(name)
        for name in names:
            os.rename(os.path.join(spool.tmp, name), os.path.join(spool.new, name))
        hw.sync_dir(spool.new)

    def check() -> None:
        _drain(spool.new)
        deliver()
        assert len(os.listdir(spool.new)) == MESSAGES
        hw.listing_is(spool.tmp, set())

    return Case(
        "hand-written batch",
        deliver,
        reset=lambda: _drain(spool.new),
        check=check,
        note="write and fsync each, rename each, fsync new/ once",
    )


def _atomstore(batched: bool) -> Factory:
    def make(directory: str) -> Case:
        store = FileStore(directory)
        store.prepare()
        new = os.path.join(directory, "new")

        def deliver() -> None:
            if batched:
                store.add_many([PAYLOAD] * MESSAGES)
            else:
                for _ in range(MESSAGES):
                    store.add(PAYLOAD)

        def check() -> None:
            _drain(new)
            deliver()
            assert [Path(p).read_bytes() for p in store.list("new")] == [PAYLOAD] * MESSAGES
            hw.listing_is(os.path.join(directory, "tmp"), set())

        name = "atomstore add_many()" if batched else "atomstore add() x 100"
        return Case(name, deliver, reset=lambda: _drain(new), check=check)

    return make


def contenders() -> list[tuple[str, Factory]]:
    return [
        ("batch/hand", _hand_batch),
        ("batch/add_many", _atomstore(batched=True)),
        ("batch/add", _atomstore(batched=False)),
    ]


def run(settings: Settings) -> list[Table]:
    factories = contenders()
    rounds = settings.pick_rounds(15, 4)
    with workdir(settings.disk, "batch", settings.keep) as base:
        built = build(factories, base)
        rows = interleave(built, rounds, 1, WALL, warmup=1)
        keys = ("batch/add_many", "batch/add")
        syscounts.fill_fsyncs(factories, built, settings.disk, 1, settings.strace, keys)
        close_all(built)
    where = f"disk: {describe(settings.disk)}; {method(rounds, 1, WALL)}; fsyncs per batch"
    table = Table(f"7. Deliver {MESSAGES} messages of 1 KiB, durable", rows, where=where)
    batch, single = find(rows, "atomstore add_many()"), find(rows, "atomstore add() x 100")
    if batch is not None and single is not None and batch.samples and single.samples:
        speedup = single.median_us / batch.median_us
        table.notes.append(
            f"add_many() is {speedup:.2f}x as fast as {MESSAGES} add() calls: "
            f"{batch.fsyncs:g} fsyncs against {single.fsyncs:g}"
        )
    return [table]
