"""Benchmark 11: an emptied ``new/`` on ext4, a million messages later.

On ext4 (``--disk``, ``/var/tmp`` by default) one store gets ``--waiting``
messages (a million by default) straight into ``new/`` (set-up, not
measured).  Then ``--consumers`` consumer processes drain it (claim, read,
check, finish) while ``--producers`` producer processes keep adding a
message every ``--every`` seconds.  Every message carries its id and a
checksum: the run counts the messages lost, delivered twice and left over.

Once everything is consumed, an idle look (a ``claim()`` that finds
nothing, as a waiting consumer makes at every wake-up) is timed in that
store and in a fresh one, interleaved, with a plain ``scandir`` of each
``new/`` and of the old ``new/`` the consumers swapped out: kept for the
measure at its hidden name (the consumers run with a grace period of a
day), then finished as a later consumer would.

    python benchmarks/bench_shrink.py [--waiting 1000000] [--disk /var/tmp]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
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

from atomstore import FileStore, _shrink, _watch  # noqa: E402

_CHILD = """
import hashlib, json, os, sys, time
from atomstore import FileStore, _shrink
_shrink.GRACE = 86400.0  # the old new/ stays, for the measure
role, path, out, stop = sys.argv[1:5]
store = FileStore(path, durable=False)

def body(ident):
    data = os.urandom(16)
    return f"{ident} {hashlib.sha256(data).hexdigest()}\\n".encode() + data

if role == "producer":
    index, every = int(sys.argv[5]), float(sys.argv[6])
    added = []
    while not os.path.exists(stop):
        ident = f"p{index}-{len(added)}"
        store.add(body(ident))
        added.append(ident)
        time.sleep(every)
    result = {"added": added}
else:
    got, torn, idle = [], 0, None
    while True:
        claim = store.claim()
        if claim is None:
            if os.path.exists(stop):
                idle = idle or time.monotonic()
                if time.monotonic() - idle > 1.0:
                    break
            time.sleep(0.005)
            continue
        idle = None
        header, _, data = claim.read_bytes().partition(b"\\n")
        ident, _, digest = header.decode().partition(" ")
        if hashlib.sha256(data).hexdigest() != digest:
            torn += 1
        got.append(ident)
        claim.finish()
    result = {"got": got, "torn": torn}
with open(out, "w") as f:
    json.dump(result, f)
"""


def fill(store: FileStore, count: int) -> list[str]:
    """``count`` messages straight into new/, ids ``w0``... with checksums."""
    import hashlib

    new = os.path.join(store.path, "new")
    idents = []
    for i in range(count):
        ident = f"w{i}"
        data = b"%d" % i
        fd = os.open(os.path.join(new, store.unique_name()), hw.FILE_FLAGS, 0o666)
        os.write(fd, f"{ident} {hashlib.sha256(data).hexdigest()}\n".encode() + data)
        os.close(fd)
        idents.append(ident)
    return idents


def swapped(new: str) -> bool:
    """Whether ``new`` is drained of the backlog and small again."""
    if os.lstat(new).st_size >= _shrink.SHRINK_FROM:
        return False
    with os.scandir(new) as entries:
        return sum(1 for _ in entries) < 100  # what the producers keep adding


def scan_time(directory: str, rounds: int) -> float:
    started = time.perf_counter()
    for _ in range(rounds):
        with os.scandir(directory) as entries:
            for _entry in entries:
                pass
    return (time.perf_counter() - started) / rounds


def look_time(store: FileStore, rounds: int) -> float:
    started = time.perf_counter()
    for _ in range(rounds):
        assert store.claim() is None
    return (time.perf_counter() - started) / rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--waiting", type=int, default=1_000_000)
    parser.add_argument("--consumers", type=int, default=2)
    parser.add_argument("--producers", type=int, default=1)
    parser.add_argument("--every", type=float, default=0.01)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--disk", default="/var/tmp")
    options = parser.parse_args()
    _shrink.GRACE = 86400.0  # here too: the old new/ stays until measured
    work = tempfile.mkdtemp(prefix="atomstore-bench-shrink-", dir=options.disk)
    kind = _watch.filesystem_type(work)
    try:
        drained = FileStore(os.path.join(work, "drained"), durable=False)
        fresh = FileStore(os.path.join(work, "fresh"), durable=False)
        for store in (drained, fresh):
            store.prepare()
        new = os.path.join(drained.path, "new")
        started = time.monotonic()
        written = fill(drained, options.waiting)
        grown = os.lstat(new).st_size
        print(
            f"# {kind} at {work}: filled {options.waiting:,} in {time.monotonic() - started:.0f} s"
        )
        print(f"# new/ holds {grown / 2**20:.1f} MiB of directory")
        stop = os.path.join(work, "stop")
        children = []
        for role, count in (("consumer", options.consumers), ("producer", options.producers)):
            for i in range(count):
                out = os.path.join(work, f"{role}{i}.json")
                args = [role, drained.path, out, stop, str(i), str(options.every)]
                children.append(subprocess.Popen([sys.executable, "-c", _CHILD, *args]))
        started = time.monotonic()
        while not swapped(new):
            if time.monotonic() - started > 3600:
                raise SystemExit("new/ was not swapped within an hour")
            time.sleep(0.5)
        took = time.monotonic() - started
        time.sleep(2)  # producers and consumers keep running on the fresh new/
        pathlib.Path(stop).touch()
        for child in children:
            if child.wait() != 0:
                raise SystemExit(f"a child failed: {child.args!r}")
        print(f"# drained by {options.consumers} consumers in {took:.0f} s")
        hidden = os.path.join(drained.path, _shrink.SHRINK_NAME)
        looks: dict[str, list[float]] = collections.defaultdict(list)
        for _ in range(options.rounds):
            looks["idle look, drained store"].append(look_time(drained, 200))
            looks["idle look, fresh store"].append(look_time(fresh, 200))
            looks["scandir, drained store's new/"].append(scan_time(new, 200))
            looks["scandir, fresh store's new/"].append(scan_time(fresh._dirs["new"], 200))
            if os.path.isdir(hidden):
                looks["scandir, the old new/ swapped out"].append(scan_time(hidden, 3))
        medians = {label: statistics.median(times) for label, times in looks.items()}
        for label, seconds in medians.items():
            print(f"{label:<40}{seconds * 1e6:12.1f} us")
        ratio = medians["idle look, drained store"] / medians["idle look, fresh store"]
        print(f"new/ now: {os.lstat(new).st_size:,} bytes of directory")
        moved_late = len(os.listdir(hidden)) if os.path.isdir(hidden) else 0
        _shrink.GRACE = 0.0
        _shrink.finish(drained.path, new, False)
        # Whatever waits now, consumed here; then every id is accounted for.
        reports = [
            json.loads(pathlib.Path(work, n).read_text())
            for n in os.listdir(work)
            if n.endswith(".json")
        ]
        added = written + [i for r in reports for i in r.get("added", [])]
        got = collections.Counter(i for r in reports for i in r.get("got", []))
        torn = sum(r.get("torn", 0) for r in reports)
        while (claim := drained.claim()) is not None:
            got[claim.read_bytes().partition(b" ")[0].decode()] += 1
            claim.finish()
        lost = len(set(added) - set(got))
        twice = sum(1 for n in got.values() if n > 1)
        left = sum(len(os.listdir(os.path.join(drained.path, a))) for a in ("tmp", "new", "cur"))
        print(
            f"messages: {len(added):,} added, {sum(got.values()):,} consumed, {lost} lost, "
            f"{twice} twice, {torn} torn, {left} left over; {moved_late} moved back late"
        )
        print(f"idle look, drained against fresh: {ratio:.2f}x")
        print(f"target: idle look <= 2x a fresh store: {'MET' if ratio <= 2 else 'NOT MET'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
