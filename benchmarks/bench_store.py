"""Benchmark 4: one message's round trip through a queue.

One operation delivers a 1 KiB message, claims the oldest waiting message,
reads it and finishes it (the consumer's part included, so that queues that
hand the data over with the claim are compared fairly).  The queue is empty
between operations.
"""

from __future__ import annotations

import itertools
import mailbox
import os

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
    close_all,
    describe,
    find,
    interleave,
    method,
    peer,
    ratio_target,
    workdir,
)

from atomstore import FileStore


def _expect(data: bytes) -> None:
    if data != PAYLOAD:
        raise AssertionError(f"read {len(data)} bytes back, not the {len(PAYLOAD)} written")


def _empty_areas(root: str, areas: tuple[str, ...] = ("tmp", "new", "cur")) -> None:
    for area in areas:
        hw.listing_is(os.path.join(root, area), set())


def _hand(durable: bool) -> Factory:
    def make(directory: str) -> Case:
        spool = hw.Spool(directory, durable)

        def op() -> None:
            spool.add(PAYLOAD)
            claimed = spool.claim()
            assert claimed is not None
            hw.read_file(claimed)
            spool.finish(claimed)

        def check() -> None:
            spool.add(PAYLOAD)
            claimed = spool.claim()
            assert claimed is not None
            _expect(hw.read_file(claimed))
            spool.finish(claimed)
            _empty_areas(directory)

        note = "write, rename to new/, listdir, rename to cur/, read, unlink"
        if durable:
            note = "as above, with 5 fsyncs: the file, new/, cur/ and new/, cur/"
        return Case("hand-written", op, check=check, note=note)

    return make


def _hand_checked(durable: bool) -> Factory:
    def make(directory: str) -> Case:
        spool = hw.CheckedSpool(directory, durable)

        def op() -> None:
            spool.add(PAYLOAD)
            claimed = spool.claim()
            assert claimed is not None
            spool.read(claimed)
            spool.finish(claimed)

        def check() -> None:
            spool.add(PAYLOAD)
            claimed = spool.claim()
            assert claimed is not None
            _expect(spool.read(claimed))
            spool.finish(claimed)
            _empty_areas(directory)

        return Case(
            "hand-written, areas checked",
            op,
            check=check,
            note="O_TMPFILE in new/ and linked; an lstat of each area a claim, read and finish use",
        )

    return make


def _atomstore(durable: bool) -> Factory:
    def make(directory: str) -> Case:
        store = FileStore(directory, durable=durable)
        store.prepare()

        def op() -> None:
            store.add(PAYLOAD)
            claim = store.claim()
            assert claim is not None
            claim.read_bytes()
            claim.finish()

        def check() -> None:
            store.add(PAYLOAD)
            claim = store.claim()
            assert claim is not None
            _expect(claim.read_bytes())
            claim.finish()
            _empty_areas(directory)

        return Case("atomstore FileStore", op, check=check)

    return make


def _dirq(durable: bool) -> Factory:
    def make(directory: str) -> Case:
        queue = peer("dirq.QueueSimple", "dirq").QueueSimple(directory)

        def round_trip() -> bytes:
            queue.add(PAYLOAD)
            for name in queue:
                if queue.lock(name):
                    data: bytes = queue.get(name)
                    queue.remove(name)
                    return data
            raise AssertionError("dirq lost the message")

        def check() -> None:
            _expect(round_trip())

        return Case(
            "dirq QueueSimple",
            round_trip,
            check=check,
            note="never fsyncs; lock = link(), 2 unlinks to remove",
        )

    return make


def _maildir(durable: bool) -> Factory:
    def make(directory: str) -> Case:
        box = mailbox.Maildir(os.path.join(directory, "box"), factory=None, create=True)

        def round_trip() -> bytes:
            box.add(PAYLOAD)
            key = next(box.iterkeys())
            data = box.get_bytes(key)
            box.remove(key)
            return data

        def check() -> None:
            _expect(round_trip())
            _empty_areas(os.path.join(directory, "box"))

        return Case(
            "stdlib mailbox.Maildir",
            round_trip,
            check=check,
            note="always fsyncs the file, never a directory; no claim (read, then remove)",
        )

    return make


def _gocept(durable: bool) -> Factory:
    def make(directory: str) -> Case:
        store = peer("gocept.filestore", "gocept.filestore").FileStore(directory)
        store.prepare()
        prefix = f"{os.getpid()}."
        counter = itertools.count()
        cur = os.path.join(directory, "cur")

        def round_trip() -> bytes:
            name = f"{prefix}{next(counter):012d}"
            f = store.create(name, "wb")
            f.write(PAYLOAD)
            f.close()
            store.move(name, "tmp", "new")
            oldest = os.path.basename(min(store.list("new")))
            store.move(oldest, "new", "cur")
            with open(os.path.join(cur, oldest), "rb") as f:
                data: bytes = f.read()
            store.remove(oldest, "cur")
            return data

        def check() -> None:
            _expect(round_trip())
            _empty_areas(directory)

        return Case(
            "gocept.filestore",
            round_trip,
            check=check,
            note="never fsyncs; create, move to new, list, move to cur, remove",
        )

    return make


def _persist_queue(durable: bool) -> Factory:
    def make(directory: str) -> Case:
        queue = peer("persistqueue", "persist-queue").Queue(directory, tempdir=directory)

        def round_trip() -> bytes:
            queue.put(PAYLOAD)
            data: bytes = queue.get(block=False)
            queue.task_done()
            return data

        def check() -> None:
            _expect(round_trip())

        return Case(
            "persist-queue Queue",
            round_trip,
            check=check,
            note="one process only; fsyncs every 100th put, never its index",
        )

    return make


def _persist_ack(durable: bool) -> Factory:
    def make(directory: str) -> Case:
        module = peer("persistqueue", "persist-queue")
        queue = module.SQLiteAckQueue(directory, auto_commit=True)

        def round_trip() -> bytes:
            queue.put(PAYLOAD)
            item = queue.get(block=False, raw=True)
            queue.ack(item)
            data: bytes = item["data"]
            return data

        def check() -> None:
            _expect(round_trip())

        def reset() -> None:
            queue.clear_acked_data(max_delete=0, keep_latest=0)

        return Case(
            "persist-queue SQLiteAckQueue",
            round_trip,
            reset=reset,
            check=check,
            close=queue.close if hasattr(queue, "close") else None,
            note="SQLite WAL, synchronous=FULL: always syncs (3 commits)",
        )

    return make


def contenders(durable: bool) -> list[tuple[str, Factory]]:
    mode = "durable" if durable else "fast"
    found = [
        (f"store-{mode}/hand", _hand(durable)),
        (f"store-{mode}/hand-checked", _hand_checked(durable)),
        (f"store-{mode}/atomstore", _atomstore(durable)),
        (f"store-{mode}/maildir", _maildir(durable)),
        (f"store-{mode}/persistqueue-ack", _persist_ack(durable)),
    ]
    if not durable:
        found += [
            (f"store-{mode}/dirq", _dirq(durable)),
            (f"store-{mode}/gocept", _gocept(durable)),
            (f"store-{mode}/persistqueue", _persist_queue(durable)),
        ]
    return found


PEERS = [
    "dirq QueueSimple",
    "stdlib mailbox.Maildir",
    "gocept.filestore",
    "persist-queue Queue",
    "persist-queue SQLiteAckQueue",
]


def run(settings: Settings) -> list[Table]:
    tables = []
    for durable in (False, True):
        base_dir = settings.disk if durable else settings.tmpfs
        factories = contenders(durable)
        if durable:
            rounds, ops = settings.pick_rounds(250, 25), 1
        else:
            rounds, ops = settings.pick_rounds(21, 7), settings.pick(150, 60)
        with workdir(base_dir, "store", settings.keep) as base:
            built = build(factories, base)
            rows = interleave(built, rounds, ops, WALL if durable else CPU)
            if durable:
                keys = ("store-durable/atomstore",)
                syscounts.fill_fsyncs(factories, built, base_dir, 20, settings.strace, keys)
            close_all(built)
        kind = "durable" if durable else "not durable"
        clock = WALL if durable else CPU
        table = Table(
            f"4{'b' if durable else ''}. FileStore round trip (add, claim, read, finish), {kind}",
            rows,
            where=f"{'disk' if durable else 'tmpfs'}: {describe(base_dir)}; "
            + method(rounds, ops, clock),
        )
        if durable:
            row = find(rows, "atomstore FileStore")
            if row is not None and row.fsyncs is not None:
                table.notes.append(
                    f"atomstore makes {row.fsyncs:g} fsyncs per message: add 2 (the file, "
                    "new/), claim 2 (cur/, new/), finish 1 (cur/)"
                )
            table.notes.append(
                "dirq, gocept.filestore and persist-queue's Queue never fsync a message: "
                "not in this table"
            )
        else:
            table.targets.append(ratio_target(rows, "atomstore FileStore", 1.1, "hand-written"))
            table.targets.append(ahead_target(rows, "atomstore FileStore", PEERS))
        tables.append(table)
    return tables
