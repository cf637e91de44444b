"""Benchmark 9: what 100,000 delayed messages cost a consumer of due ones.

Two stores on tmpfs, each with the same backlog of messages waiting in
``new/``; one also holds 100,000 messages in ``delay/``, due in an hour.
Each round a fresh consumer claims and finishes ``--claims`` messages from
each store (order alternating), CPU time measured, while a producer thread
delays one more message every 50 ms into the store that has them, so that
``delay/`` keeps changing and its consumers list it again as often as they
ever do (every half second).  The ratio is the median of the per-round
ratios.

    python benchmarks/bench_delayed.py [--rounds 7] [--claims 20000] [--delayed 100000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import handwritten as hw  # noqa: E402
from _harness import PAYLOAD  # noqa: E402

from atomstore import FileStore  # noqa: E402
from atomstore._delays import delayed_name  # noqa: E402


def fill_new(store: FileStore, count: int) -> None:
    new = os.path.join(store.path, "new")
    for _ in range(count):
        fd = os.open(os.path.join(new, store.unique_name()), hw.FILE_FLAGS, 0o666)
        hw.write_all(fd, PAYLOAD)
        os.close(fd)


def fill_delay(store: FileStore, count: int) -> None:
    delay = os.path.join(store.path, "delay")
    os.makedirs(delay, exist_ok=True)
    due = time.time_ns() // 1000 + 3600 * 1_000_000
    for _ in range(count):
        name = delayed_name(store.unique_name(), due)
        fd = os.open(os.path.join(delay, name), hw.FILE_FLAGS, 0o666)
        os.close(fd)


def drain(path: str, count: int) -> float:
    consumer = FileStore(path, durable=False)
    started = time.thread_time()
    for _ in range(count):
        claim = consumer.claim()
        assert claim is not None
        claim.finish()
    return time.thread_time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--claims", type=int, default=20_000)
    parser.add_argument("--delayed", type=int, default=100_000)
    parser.add_argument("--tmpfs", default="/dev/shm")
    options = parser.parse_args()
    work = tempfile.mkdtemp(prefix="atomstore-bench-delayed-", dir=options.tmpfs)
    try:
        plain = FileStore(os.path.join(work, "plain"), durable=False)
        delaying = FileStore(os.path.join(work, "delaying"), durable=False)
        for store in (plain, delaying):
            store.prepare()
        fill_delay(delaying, options.delayed)
        stop = threading.Event()

        def producer() -> None:
            while not stop.wait(0.05):
                delaying.add(b"later", delay=3600)

        thread = threading.Thread(target=producer, daemon=True)
        thread.start()
        ratios: list[float] = []
        costs: dict[str, list[float]] = {"plain": [], "delaying": []}
        try:
            for r in range(options.rounds):
                for store in (plain, delaying):
                    fill_new(store, options.claims)
                order = [("plain", plain), ("delaying", delaying)]
                if r % 2:
                    order.reverse()
                took = {name: drain(store.path, options.claims) for name, store in order}
                for name in took:
                    costs[name].append(took[name] / options.claims)
                ratios.append(took["delaying"] / took["plain"])
        finally:
            stop.set()
            thread.join()
        waiting = len(os.listdir(os.path.join(delaying.path, "delay")))
        print(f"{'store':<38}{'us/claim':>10}{'ratio':>8}")
        plain_us = statistics.median(costs["plain"]) * 1e6
        print(f"{'no delayed messages':<38}{plain_us:10.1f}{1:7.2f}x")
        label = f"{waiting:,} delayed, one more every 50 ms"
        print(
            f"{label:<38}{statistics.median(costs['delaying']) * 1e6:10.1f}"
            f"{statistics.median(ratios):7.2f}x"
        )
        verdict = "MET" if statistics.median(ratios) <= 1.5 else "NOT MET"
        print(f"target: within 1.5x of a store without delayed messages: {verdict}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
