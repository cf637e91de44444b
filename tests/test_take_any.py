"""Claiming any message (no listing), and several at once from the shell."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from atomstore import FileStore
from fstree import store_entries
from tracing import Recorder

COMMAND = [sys.executable, "-m", "atomstore"]


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    spool = FileStore(tmp_path / "spool", durable=False)
    spool.prepare()
    return spool


def run(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*COMMAND, *args], capture_output=True, timeout=60)


def test_any_claims_every_message_once(store: FileStore) -> None:
    for i in range(50):
        store.add(b"%d" % i)
    got = []
    while (claim := store.claim(oldest=False)) is not None:
        got.append(claim.read_bytes())
        claim.finish()
    assert sorted(got) == sorted(b"%d" % i for i in range(50))
    assert store_entries(store) == []


def test_any_reads_only_the_beginning_of_a_big_directory(
    store: FileStore, trace: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.add_many(b"%d" % i for i in range(2000))
    seen = []
    real = os.scandir

    class Counting:
        def __init__(self, path: str) -> None:
            self._it = real(path)

        def __enter__(self) -> Counting:
            return self

        def __exit__(self, *exc: object) -> None:
            self._it.close()

        def __iter__(self) -> Counting:
            return self

        def __next__(self) -> os.DirEntry[str]:
            entry = next(self._it)
            seen.append(entry.name)
            return entry

    monkeypatch.setattr(os, "scandir", Counting)
    claim = FileStore(store.path, durable=False).claim(oldest=False)
    assert claim is not None
    assert len(seen) <= 32  # the first few names, not 2,000


def test_any_takes_due_delayed_messages_first(store: FileStore) -> None:
    store.add(b"waiting")
    store.add(b"was delayed", delay=0.01)
    import time

    time.sleep(0.6)  # due, and past a look at delay/
    claim = store.claim(oldest=False)
    assert claim is not None
    assert claim.read_bytes() == b"was delayed"


def test_consumers_claiming_any_never_share_a_message(store: FileStore) -> None:
    store.add_many(b"%d" % i for i in range(600))
    got: list[list[bytes]] = [[] for _ in range(4)]

    def consume(mine: list[bytes]) -> None:
        consumer = FileStore(store.path, durable=False)
        while (claim := consumer.claim(oldest=False)) is not None:
            mine.append(claim.read_bytes())
            claim.finish()

    threads = [threading.Thread(target=consume, args=(g,)) for g in got]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    everything = [m for g in got for m in g]
    assert sorted(everything) == sorted(b"%d" % i for i in range(600))
    assert store_entries(store) == []


def test_any_waits_like_claim(store: FileStore) -> None:
    threading.Timer(0.1, store.add, [b"late"]).start()
    claim = store.claim(wait=10, oldest=False)
    assert claim is not None
    assert claim.read_bytes() == b"late"


# -- the command --------------------------------------------------------------------


def test_take_count_claims_up_to_n(store: FileStore) -> None:
    names = store.add_many(b"%d" % i for i in range(5))
    taken = run("take", "--count", "3", store.path)
    assert taken.returncode == 0, taken.stderr
    paths = taken.stdout.decode().split()
    assert [os.path.basename(p).partition(":")[0] for p in paths] == names[:3]
    assert len(store.list("cur")) == 3
    rest = run("take", "-n", "10", store.path)
    assert len(rest.stdout.decode().split()) == 2
    assert run("take", "-n", "2", store.path).returncode == 3


def test_take_count_into_a_closed_pipe_gives_them_all_back(store: FileStore) -> None:
    store.add_many(b"%d" % i for i in range(4))
    script = 'exec "$@" >&-'
    proc = subprocess.run(
        ["sh", "-c", script, "sh", *COMMAND, "take", "-n", "3", store.path],
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert len(store.list("new")) == 4
    assert store.list("cur") == []


def test_take_any(store: FileStore) -> None:
    store.add_many(b"%d" % i for i in range(3))
    taken = run("take", "--any", "-n", "3", "-0", store.path)
    assert taken.returncode == 0, taken.stderr
    assert len(taken.stdout.split(b"\0")) == 4  # three, each ended by NUL
    assert store.list("new") == []


@pytest.mark.parametrize("count", ["0", "-1", "x"])
def test_take_count_must_be_positive(store: FileStore, count: str) -> None:
    proc = run("take", "--count", count, store.path)
    assert proc.returncode == 2


def test_a_consumer_keeps_only_the_oldest_of_a_huge_backlog(
    store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("atomstore._store._BACKLOG_MAX", 10)
    names = store.add_many(b"%d" % i for i in range(35))
    consumer = FileStore(store.path, durable=False)
    order = []
    for _ in range(35):
        claim = consumer.claim()
        assert claim is not None
        assert len(consumer._backlog) < 10  # never all 35 names at once
        order.append(claim.name)
        claim.finish()
    assert order == names  # still the oldest first, across listings
    assert consumer.claim() is None


def test_a_consumer_behind_others_skips_what_they_took(store: FileStore, trace: Recorder) -> None:
    names = store.add_many(b"%d" % i for i in range(64))
    behind = FileStore(store.path, durable=False)
    first = behind.claim()  # lists all 64, claims the oldest
    assert first is not None
    ahead = FileStore(store.path, durable=False)
    for _ in range(40):  # another consumer takes the next 40 meanwhile
        claim = ahead.claim()
        assert claim is not None
        claim.finish()
    trace.calls.clear()
    got = []
    while (claim := behind.claim()) is not None:
        got.append(claim.name)
        claim.finish()
    failed = [c for c in trace.calls if c.name == "rename" and c.error is not None]
    assert len(failed) <= 6  # a few (logarithmic), not one per name taken meanwhile
    # Whatever this listing dropped while it still waited is claimed after
    # the next listing: nothing is lost.
    assert sorted(got) == sorted(names[41:])
    assert store_entries(store) == [f"cur/{os.path.basename(first.path)}"]


def test_consumers_meeting_each_other_lose_few_races(store: FileStore, trace: Recorder) -> None:
    store.add_many(b"%d" % i for i in range(2000))
    done: list[int] = [0, 0, 0, 0]

    def consume(index: int) -> None:
        consumer = FileStore(store.path, durable=False)
        while (claim := consumer.claim()) is not None:
            claim.finish()
            done[index] += 1

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(done) == 2000
    lost = [c for c in trace.calls if c.name == "rename" and c.error is not None]
    assert len(lost) / 2000 <= 1.5
