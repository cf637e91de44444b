"""KeyboardInterrupt at random moments: nothing is ever left behind.

A timer signal raises KeyboardInterrupt in the middle of writes, adds,
batches, copies and folders, thousands of times, at moments spread over
the whole operation.  Afterwards no temporary or staging file may remain,
and every destination is either absent or complete.
"""

from __future__ import annotations

import gc
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from alarms import interrupt_after, scratch_on_tmpfs
from atomstore import FileStore, atomic
from fstree import listing, store_entries


def storm(operation: Callable[[int], object], runs: int, longest: float) -> int:
    """Run ``operation(i)`` ``runs`` times, each interrupted after a random
    delay up to ``longest`` seconds; return how many were interrupted."""
    rng = random.Random(7)
    interrupted = 0
    for i in range(runs):
        try:
            with interrupt_after(rng.uniform(1e-6, longest)):
                operation(i)
        except KeyboardInterrupt:
            interrupted += 1
    return interrupted


def hidden(directory: str | Path) -> list[str]:
    return [n for n in listing(directory) if n.startswith(".")]


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    """tmpfs where there is one: the storm needs many fast operations."""
    with scratch_on_tmpfs("atomstore-interrupts-", tmp_path) as path:
        yield path


def test_interrupted_file_writes_leave_nothing(scratch: Path) -> None:
    payload = os.urandom(4096)

    def write(i: int) -> None:
        if i % 3 == 0:
            atomic.write_bytes(scratch / f"b{i}", payload, durable=False)
        elif i % 3 == 1:
            with atomic.file(scratch / f"f{i}", "wb", durable=False) as f:
                f.write(payload)
        else:
            atomic.write_text(scratch / "same", str(i), overwrite=True, durable=False)

    interrupted = storm(write, 3000, 0.0004)
    assert interrupted > 300
    assert hidden(scratch) == []
    for name in listing(scratch):
        data = (scratch / name).read_bytes()
        assert data == payload or (name == "same" and data.isdigit())


def test_interrupted_folders_leave_nothing(scratch: Path) -> None:
    def build(i: int) -> None:
        with atomic.folder(scratch / "site", overwrite=True, durable=False) as staging:
            (staging / "index").write_text(str(i))

    interrupted = storm(build, 1000, 0.0008)
    assert interrupted > 100
    assert hidden(scratch) == []
    assert listing(scratch / "site") == ["index"]


def test_interrupted_store_operations_leave_nothing(scratch: Path) -> None:
    store = FileStore(scratch / "spool", durable=False)
    store.prepare()
    payload = os.urandom(2048)

    def produce(i: int) -> None:
        if i % 3 == 0:
            store.add(payload)
        elif i % 3 == 1:
            store.add_many([payload, payload])
        else:
            for done in store.list("tmp"):  # a copy made before an interruption
                os.unlink(done)
            store.copy(os.path.basename(store.list("new")[0]), "new", "tmp")

    store.add(payload)
    interrupted = storm(produce, 3000, 0.0004)
    assert interrupted > 300
    # No staging file anywhere; whatever carries a name is complete (tmp/
    # may hold a finished copy whose removal was interrupted).
    assert [e for e in store_entries(store) if "/." in e] == []
    for entry in store_entries(store):
        assert Path(store.path, entry).read_bytes() == payload


def test_nothing_stays_held_once_published(scratch: Path) -> None:
    # The names held for removal at exit are only those still staged: a
    # process that writes for ever holds none of what it finished.
    from atomstore import _staging

    store = FileStore(scratch / "spool", durable=False)
    store.prepare()
    before = dict(_staging._live)
    for i in range(50):
        atomic.write_bytes(scratch / f"n{i}", b"x")
        atomic.write_bytes(scratch / "same", b"x", overwrite=True)
        with atomic.file(scratch / "same", overwrite=True) as f:
            f.write("y")
        with atomic.folder(scratch / "site", overwrite=True) as staging:
            (staging / "f").write_text("z")
        store.add(b"m")
        store.add_many([b"a", b"b"])
    assert set(_staging._live) - set(before) == set()


def test_a_process_interrupted_in_its_cleanup_leaves_nothing_at_exit(scratch: Path) -> None:
    # The last resort: what an interruption kept from its cleanup goes when
    # the process exits.
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from atomstore import _staging\n"
        "held = _staging.Temp()\n"
        "_staging.open_temp(held, sys.argv[1], 'x')\n"
        "held.path = held.fd = None  # forgotten, its cleanup never to come\n"
        "raise SystemExit(3)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(scratch)], timeout=60)
    assert proc.returncode == 3
    assert listing(scratch) == []


def test_interruptions_leak_no_descriptor(scratch: Path) -> None:
    # A KeyboardInterrupt right after open() returned, before the descriptor
    # was stored, used to lose it: a file system busy until the process
    # ends, and an unnamed file's space held.
    store = FileStore(scratch / "spool", durable=False)
    store.prepare()
    payload = os.urandom(2048)

    def operation(i: int) -> None:
        step = i % 5
        if step == 0:
            atomic.write_bytes(scratch / f"n{i}", payload, durable=False)
        elif step == 1:
            atomic.write_bytes(scratch / "same", payload, overwrite=True, durable=False)
        elif step == 2:
            with atomic.file(scratch / "file", "wb", overwrite=True, durable=False) as f:
                f.write(payload)
        elif step == 3:
            store.add(payload)
        else:
            store.add_many([payload, payload])

    before = set(os.listdir("/proc/self/fd"))
    interrupted = storm(operation, 3000, 0.0003)
    gc.collect()  # file objects an interruption left to the collector
    leaked = set(os.listdir("/proc/self/fd")) - before
    assert interrupted > 300
    assert sorted(os.readlink(f"/proc/self/fd/{fd}") for fd in leaked if _alive(fd)) == []


def _alive(fd: str) -> bool:
    try:
        os.fstat(int(fd))
    except OSError:
        return False
    return True


def test_a_signal_handler_that_adds_while_a_name_is_given_does_not_hang(tmp_path: Path) -> None:
    """The clock lock of unique names is re-entrant: a handler (a SIGTERM
    that queues a last message, say) runs in the thread it interrupted,
    which may be giving a name at that moment."""
    import subprocess
    import sys

    script = (
        "import signal, sys\n"
        "from atomstore import FileStore, _info\n"
        "s = FileStore(sys.argv[1], durable=False); s.prepare()\n"
        "signal.signal(signal.SIGALRM, lambda *a: s.add(b'from a handler'))\n"
        "clock, fired = _info.time.time_ns, []\n"
        "def ticking():\n"
        "    if not fired:\n"
        "        fired.append(1)\n"
        "        signal.raise_signal(signal.SIGALRM)  # while the name is given\n"
        "    return clock()\n"
        "_info.time.time_ns = ticking\n"
        "s.add(b'interrupted')\n"
        "print(sorted(open(p, 'rb').read().decode() for p in s.list('new')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=30
    )
    assert done.stdout == "['from a handler', 'interrupted']\n", done.stderr


def test_names_given_through_a_storm_of_interrupts_never_hang(tmp_path: Path) -> None:
    """Python 3.9 can leave the lock of a ``with`` block held when a
    KeyboardInterrupt strikes: unique names take no lock at all."""
    import subprocess
    import sys

    script = (
        "import random, signal, time\n"
        "from atomstore import _info\n"
        "def fire(*a):\n"
        "    raise KeyboardInterrupt\n"
        "signal.signal(signal.SIGALRM, fire)\n"
        "rng, names, end = random.Random(1), [], time.monotonic() + 2\n"
        "while time.monotonic() < end:\n"
        "    try:\n"
        "        signal.setitimer(signal.ITIMER_REAL, rng.uniform(1e-6, 2e-5))\n"
        "        for _ in range(50):\n"
        "            names.append(_info.unique_name('h'))\n"
        "        signal.setitimer(signal.ITIMER_REAL, 0)\n"
        "    except KeyboardInterrupt:\n"
        "        pass\n"
        "signal.setitimer(signal.ITIMER_REAL, 0)\n"
        "print(len(names) > 1000, names == sorted(names), len(set(names)) == len(names))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30
    )
    assert done.stdout == "True True True\n", done.stderr
