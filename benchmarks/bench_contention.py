"""Benchmark 11: lost claim races when many consumers drain one backlog.

``--consumers`` processes (8 by default) claim and finish messages from one
store on tmpfs until ``--messages`` are done.  Each counts the claims it
lost to another consumer (a rename whose source was gone); the figure is
lost races per delivered message, and the CPU time each delivered message
cost.

    python benchmarks/bench_contention.py [--consumers 8] [--messages 40000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from bench_million import fill  # noqa: E402

from atomstore import FileStore  # noqa: E402

_CONSUMER = """
import sys, time
from atomstore import FileStore, _store
store = FileStore(sys.argv[1], durable=False)
lost = 0
take = store._take
def counting(name, new_dir, cur_dir):
    global lost
    claim = take(name, new_dir, cur_dir)
    if claim is _store._LOST:
        lost += 1
    return claim
store._take = counting
sys.stdin.readline()  # all start together
done = 0
started = time.process_time()
while (claim := store.claim()) is not None:
    claim.finish()
    done += 1
print(done, lost, time.process_time() - started)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--consumers", type=int, default=8)
    parser.add_argument("--messages", type=int, default=40_000)
    parser.add_argument("--tmpfs", default="/dev/shm")
    options = parser.parse_args()
    work = tempfile.mkdtemp(prefix="atomstore-bench-contention-", dir=options.tmpfs)
    try:
        store = FileStore(os.path.join(work, "spool"), durable=False)
        store.prepare()
        fill(store, options.messages)
        consumers = [
            subprocess.Popen(
                [sys.executable, "-c", _CONSUMER, store.path],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(options.consumers)
        ]
        time.sleep(0.5)  # all imported
        for consumer in consumers:
            assert consumer.stdin is not None
            consumer.stdin.write("go\n")
            consumer.stdin.flush()
        done = lost = 0
        cpu = 0.0
        for consumer in consumers:
            out, _ = consumer.communicate(timeout=600)
            d, lo, c = out.split()
            done, lost, cpu = done + int(d), lost + int(lo), cpu + float(c)
        assert done == options.messages, (done, options.messages)
        print(
            f"{options.consumers} consumers, {done:,} messages: "
            f"{lost / done:.2f} lost races per delivered message, "
            f"{cpu / done * 1e6:.1f} us CPU per message"
        )
        verdict = "MET" if lost / done <= 1.5 else "NOT MET"
        print(f"target: at most 1.5 lost races per delivered message: {verdict}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
