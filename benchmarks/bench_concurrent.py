"""Benchmark 6: 4 producers and 4 consumers, each its own process.

Producers add numbered messages; consumers claim, read and finish them,
recording each message's number; the parent counts: every message must be
seen exactly once (lost = never seen, duplicated = seen more than once), and
the store must be empty at the end.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import statistics
import time
from typing import Any, Callable

from _harness import Settings, Table, describe, verdict, workdir

from atomstore import FileStore, _syscalls

PRODUCERS = 4
CONSUMERS = 4
SIZE = 1024


def _message(producer: int, seq: int) -> bytes:
    head = f"{producer}:{seq}|".encode()
    return head + b"x" * (SIZE - len(head))


def _produce(path: str, durable: bool, producer: int, count: int) -> None:
    store = FileStore(path, durable=durable)
    for seq in range(count):
        store.add(_message(producer, seq))


class _RenameCounter:
    """Counts the renames through atomstore's OS boundary, and those that lost a race."""

    def __init__(self) -> None:
        self.calls = self.lost = 0

    def __call__(self, name: str, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if name != "rename":
            return func(*args, **kwargs)
        self.calls += 1
        try:
            return func(*args, **kwargs)
        except FileNotFoundError:
            self.lost += 1
            raise


def _consume(path: str, durable: bool, done: Any, out: str) -> None:
    store = FileStore(path, durable=durable)
    seen = []
    renames = _RenameCounter()
    _syscalls.set_tracer(renames)
    while True:
        claim = store.claim(wait=0.2)
        if claim is None:
            if done.is_set():
                claim = store.claim()
                if claim is None:
                    break
            else:
                continue
        seen.append(claim.read_bytes().split(b"|", 1)[0].decode())
        claim.finish()
    with open(out, "w") as f:
        f.write(f"{renames.calls} {renames.lost}\n")
        f.write("\n".join(seen))


def _trial(base: str, durable: bool, per_producer: int) -> dict[str, float]:
    path = os.path.join(base, "store")
    FileStore(path, durable=durable).prepare()
    context = multiprocessing.get_context("fork")
    done = context.Event()
    outs = [os.path.join(base, f"consumer{j}.txt") for j in range(CONSUMERS)]
    consumers = [context.Process(target=_consume, args=(path, durable, done, out)) for out in outs]
    producers = [
        context.Process(target=_produce, args=(path, durable, i, per_producer))
        for i in range(PRODUCERS)
    ]
    for p in consumers:
        p.start()
    start = time.perf_counter()
    try:
        for p in producers:
            p.start()
        for p in producers:
            p.join()
        done.set()
        for p in consumers:
            p.join(timeout=600)
    finally:
        for p in producers + consumers:
            if p.is_alive():
                p.kill()
                p.join()
    elapsed = time.perf_counter() - start
    failed = [p.exitcode for p in producers + consumers if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"worker processes failed with exit codes {failed}")
    seen: collections.Counter[str] = collections.Counter()
    per_consumer = []
    lost_races = 0
    for out in outs:
        with open(out) as f:
            counts, _, rest = f.read().partition("\n")
        lost_races += int(counts.split()[1])
        names = [line for line in rest.split("\n") if line]
        per_consumer.append(len(names))
        seen.update(names)
    expected = {f"{i}:{seq}" for i in range(PRODUCERS) for seq in range(per_producer)}
    left = sum(len(os.listdir(os.path.join(path, area))) for area in ("tmp", "new", "cur"))
    return {
        "messages": len(expected),
        "seconds": elapsed,
        "rate": len(expected) / elapsed,
        "lost": len(expected - set(seen)),
        "duplicated": sum(n - 1 for n in seen.values() if n > 1),
        "unexpected": len(set(seen) - expected),
        "left": left,
        "busiest": max(per_consumer),
        "idlest": min(per_consumer),
        "races": lost_races / len(expected),
    }


def run(settings: Settings) -> list[Table]:
    body = []
    ok = True
    for durable in (False, True):
        directory = settings.disk if durable else settings.tmpfs
        per_producer = settings.pick(1000, 100) if durable else settings.pick(2500, 500)
        trials = settings.pick(3, 1)
        results = []
        for _ in range(trials):
            with workdir(directory, "concurrent", settings.keep) as base:
                results.append(_trial(base, durable, per_producer))
        lost = sum(int(r["lost"]) for r in results)
        duplicated = sum(int(r["duplicated"]) for r in results)
        left = sum(int(r["left"]) + int(r["unexpected"]) for r in results)
        ok = ok and lost == duplicated == left == 0
        body.append(
            [
                f"{'durable, disk' if durable else 'not durable, tmpfs'}",
                f"{trials} x {PRODUCERS * per_producer:,}",
                f"{statistics.median(r['rate'] for r in results):,.0f}",
                str(lost),
                str(duplicated),
                str(left),
                f"{min(r['idlest'] for r in results):,.0f}"
                f"-{max(r['busiest'] for r in results):,.0f}",
                f"{statistics.median(r['races'] for r in results):.2f}",
            ]
        )
    table = Table(
        f"6. {PRODUCERS} producers + {CONSUMERS} consumers, separate processes",
        [],
        where=f"tmpfs: {describe(settings.tmpfs)}; disk: {describe(settings.disk)}",
        plain=body,
        headings=[
            "store",
            "trials x messages",
            "messages/s",
            "lost",
            "duplicated",
            "left over",
            "per consumer",
            "lost races/msg",
        ],
    )
    table.notes.append(
        "messages/s: median over the trials, from the first producer's start to the last "
        "consumer's exit; consumers wait with claim(wait=0.2); left over: files still in "
        "tmp/, new/ or cur/ at the end; lost races/msg: claim renames that failed because "
        "another consumer had taken the message, per message (counted through the OS boundary)"
    )
    table.targets.append(f"no message lost or duplicated, nothing left over: {verdict(ok)}")
    return [table]
