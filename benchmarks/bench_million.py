"""Benchmark 10: a million waiting messages.

On tmpfs, one store with ``--waiting`` messages (a million by default) and
one with a thousand, filled straight into ``new/`` (set-up, not measured).
Each measure runs in fresh processes, as a shell script's consumers start:

* ``take --any``: a fresh process's claim of any message (the claim call
  itself, timed inside the process), and the whole command;
* ``stat``: ``atomstore stat`` of the store;
* memory: a fresh consumer's peak RSS after its first (oldest) claim, the
  million against the thousand;
* claim cost: a consumer draining ``--drain`` messages (claim and finish)
  from the million, per message, against draining the thousand.

    python benchmarks/bench_million.py [--waiting 1000000] [--drain 150000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import handwritten as hw  # noqa: E402
from bench_cli import installed_command, timed  # noqa: E402

from atomstore import FileStore  # noqa: E402

_PROBE = """
import resource, sys, time
from atomstore import FileStore
store = FileStore(sys.argv[1], durable=False)
mode = sys.argv[2]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
if mode == "any":
    claim = store.claim(oldest=False)
    took = time.perf_counter() - started
    claim.release(count_attempt=False)
elif mode == "first":
    claim = store.claim()
    took = time.perf_counter() - started
    claim.release(count_attempt=False)
else:
    count = int(mode)
    started = time.thread_time()
    for _ in range(count):
        claim = store.claim()
        claim.finish()
    took = (time.thread_time() - started) / count
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(took, (after - before) / 1024)
"""


def fill(store: FileStore, count: int) -> None:
    new = os.path.join(store.path, "new")
    for _ in range(count):
        fd = os.open(os.path.join(new, store.unique_name()), hw.FILE_FLAGS, 0o666)
        os.write(fd, b"m")
        os.close(fd)


def probe(path: str, mode: str) -> tuple[float, float]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, path, mode], capture_output=True, text=True, check=True
    ).stdout.split()
    return float(out[0]), float(out[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--waiting", type=int, default=1_000_000)
    parser.add_argument("--drain", type=int, default=150_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tmpfs", default="/dev/shm")
    options = parser.parse_args()
    work = tempfile.mkdtemp(prefix="atomstore-bench-million-", dir=options.tmpfs)
    command = installed_command()
    try:
        big = FileStore(os.path.join(work, "big"), durable=False)
        small = FileStore(os.path.join(work, "small"), durable=False)
        for store in (big, small):
            store.prepare()
        started = time.monotonic()
        fill(big, options.waiting)
        fill(small, 1000)
        print(f"# filled {options.waiting:,} in {time.monotonic() - started:.0f} s")
        rows = []
        any_claim = [probe(big.path, "any")[0] for _ in range(options.rounds)]
        take = [timed([*command, "take", "--any", big.path]) for _ in range(options.rounds)]
        fill(big, options.rounds)  # the messages those took
        rows.append(("take --any: the claim, in a fresh process", statistics.median(any_claim)))
        rows.append(("take --any: the whole command", statistics.median(take)))
        stat = [timed([*command, "stat", big.path]) for _ in range(options.rounds)]
        rows.append((f"atomstore stat, {options.waiting:,} waiting", statistics.median(stat)))
        memory_big = statistics.median(probe(big.path, "first")[1] for _ in range(3))
        memory_small = statistics.median(probe(small.path, "first")[1] for _ in range(3))
        drain_big = probe(big.path, str(options.drain))[0]
        drain_small = probe(small.path, "1000")[0]
        print(f"{'measure':<52}{'value':>12}")
        for label, seconds in rows:
            print(f"{label:<52}{seconds * 1e3:9.1f} ms")
        print(
            f"{'consumer memory, first claim, ' + format(options.waiting, ','):<52}"
            f"{memory_big:9.1f} MB"
        )
        print(f"{'consumer memory, first claim, 1,000':<52}{memory_small:9.1f} MB")
        print(
            f"{'claim and finish, draining ' + format(options.drain, ',') + ' of them':<52}"
            f"{drain_big * 1e6:9.1f} us"
        )
        print(f"{'claim and finish, draining 1,000 of 1,000':<52}{drain_small * 1e6:9.1f} us")
        verdicts = [
            ("a fresh claim of any message <= 5 ms", rows[0][1] <= 0.005),
            ("stat <= 1 s", rows[2][1] <= 1.0),
            ("memory <= +20 MB", memory_big - memory_small <= 20),
            ("claim cost <= 1.5x", drain_big / drain_small <= 1.5),
        ]
        print(
            f"claim cost ratio: {drain_big / drain_small:.2f}x; memory: "
            f"+{memory_big - memory_small:.1f} MB"
        )
        for label, met in verdicts:
            print(f"target: {label}: {'MET' if met else 'NOT MET'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
