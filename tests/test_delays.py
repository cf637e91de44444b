"""Delayed delivery and retry delays: messages that wait in ``delay/``.

The clock is controlled: ``clock`` replaces ``time.time_ns`` (due times)
and ``time.monotonic`` (when a consumer looks at ``delay/`` again).
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from atomstore import FileStore
from atomstore._delays import backoff
from clocks import Clock
from fstree import store_entries

COMMAND = [sys.executable, "-m", "atomstore"]


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    spool = FileStore(tmp_path / "spool")
    spool.prepare()
    return spool


def delayed(store: FileStore) -> list[str]:
    return [os.path.basename(p) for p in store.list("delay")]


def test_a_delayed_message_waits_until_it_is_due(store: FileStore, clock: Clock) -> None:
    name = store.add(b"later", delay=60)
    assert store.list("new") == []
    (entry,) = delayed(store)
    due_us, _, rest = entry.partition(".")
    assert rest == name
    assert int(due_us) == clock.wall_ns // 1000 + 60 * 1_000_000
    assert store.claim() is None
    clock.advance(59.9)
    assert store.claim() is None
    clock.advance(0.2)
    claim = store.claim()
    assert claim is not None
    assert (claim.name, claim.read_bytes(), claim.attempts) == (name, b"later", 0)
    claim.finish()
    assert store_entries(store) == []


def test_due_messages_come_before_the_waiting_ones_in_due_order(
    store: FileStore, clock: Clock
) -> None:
    first_due = store.add(b"due second", delay=20)
    second_due = store.add(b"due first", delay=10)
    store.add(b"waiting")
    clock.advance(30)
    order = []
    while (claim := store.claim()) is not None:
        order.append(claim.read_bytes())
        claim.finish()
    assert order == [b"due first", b"due second", b"waiting"]
    assert first_due != second_due


def test_delays_sort_by_due_time_for_operators(store: FileStore) -> None:
    later = store.add(b"b", delay=200)
    sooner = store.add(b"a", delay=100)
    assert [e.partition(".")[2] for e in delayed(store)] == [sooner, later]


@pytest.mark.parametrize("delay", [0, 0.0, None, datetime.timedelta(0)])
def test_no_delay_delivers_into_new(store: FileStore, delay: object) -> None:
    name = store.add(b"now", delay=delay)  # type: ignore[arg-type]
    assert [os.path.basename(p) for p in store.list("new")] == [name]
    assert store.list("delay") == []


def test_a_timedelta_delay(store: FileStore, clock: Clock) -> None:
    store.add(b"x", delay=datetime.timedelta(minutes=2))
    clock.advance(119)
    assert store.claim() is None
    clock.advance(2)
    assert store.claim() is not None


@pytest.mark.parametrize("delay", [-1, float("nan"), "5s", True])
def test_bad_delays_are_refused_before_anything_is_written(store: FileStore, delay: object) -> None:
    with pytest.raises((ValueError, TypeError)):
        store.add(b"x", delay=delay)  # type: ignore[arg-type]
    assert store_entries(store) == []


def test_an_endless_delay_never_comes_due(store: FileStore, clock: Clock) -> None:
    store.add(b"x", delay=float("inf"))
    clock.advance(10 * 365 * 86400)
    assert store.claim() is None
    assert len(store.list("delay")) == 1


# -- released and recovered messages ---------------------------------------------


def test_release_with_a_delay(store: FileStore, clock: Clock) -> None:
    name = store.add(b"x")
    claim = store.claim()
    assert claim is not None
    path = claim.release(delay=30)
    assert path.startswith(os.path.join(store.path, "delay", ""))
    assert path.endswith(f".{name}:1,A1")
    clock.advance(29)
    assert store.claim() is None
    clock.advance(2)
    again = store.claim()
    assert again is not None
    assert (again.name, again.attempts) == (name, 1)


def test_the_store_retry_delay_doubles_up_to_its_cap(tmp_path: Path, clock: Clock) -> None:
    store = FileStore(tmp_path / "s", retry_delay=10, max_retry_delay=25)
    store.prepare()
    store.add(b"flaky")
    waits = []
    for _ in range(4):
        claim = None
        waited = 0
        while claim is None:
            claim = store.claim()
            if claim is None:
                clock.advance(1)
                waited += 1
        if claim.attempts:
            waits.append(waited)
        claim.release()
    assert waits == [10, 20, 25]


def test_recovered_claims_wait_for_the_retry_delay(tmp_path: Path, clock: Clock) -> None:
    store = FileStore(tmp_path / "s", retry_delay=5)
    store.prepare()
    store.add(b"x")
    assert store.claim() is not None
    clock.advance(61)
    (path,) = store.recover(60)
    assert os.path.dirname(path) == os.path.join(store.path, "delay")
    assert store.claim() is None
    clock.advance(5.5)
    assert store.claim() is not None


def test_an_uncounted_release_is_not_delayed(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "s", retry_delay=60)
    store.prepare()
    store.add(b"x")
    claim = store.claim()
    assert claim is not None
    path = claim.release(count_attempt=False)
    assert os.path.dirname(path) == os.path.join(store.path, "new")


def test_a_spent_message_goes_to_dead_not_to_delay(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "s", retry_delay=60, max_attempts=1)
    store.prepare()
    store.add(b"x")
    claim = store.claim()
    assert claim is not None
    path = claim.release()
    assert os.path.dirname(path) == os.path.join(store.path, "dead")


def test_backoff() -> None:
    assert [backoff(1.5, 10, n) for n in range(6)] == [0, 1.5, 3, 6, 10, 10]
    assert backoff(0, 10, 3) == 0
    assert backoff(1, float("inf"), 2000) == 2.0**64


# -- across processes and consumers -----------------------------------------------


def test_another_process_promotes_what_this_one_delayed(store: FileStore) -> None:
    store.add(b"soon", delay=0.2)
    time.sleep(0.3)
    script = (
        "import sys\n"
        "from atomstore import FileStore\n"
        "claim = FileStore(sys.argv[1]).claim()\n"
        "print(claim.read_bytes().decode())\n"
        "claim.finish()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, store.path], capture_output=True, text=True, timeout=60
    )
    assert (proc.returncode, proc.stdout) == (0, "soon\n"), proc.stderr
    assert store_entries(store) == []


_CONSUMER = """
import sys, time
from atomstore import FileStore
store = FileStore(sys.argv[1], poll_interval=0.02)
got = []
deadline = time.monotonic() + 20
while time.monotonic() < deadline:
    claim = store.claim(wait=0.2)
    if claim is None:
        if not store.list("delay"):
            break
        continue
    got.append(claim.read_bytes().decode())
    claim.finish()
print(" ".join(got))
"""


def test_consumers_racing_to_promote_deliver_each_message_once(store: FileStore) -> None:
    for i in range(60):
        store.add(f"m{i}".encode(), delay=0.3 + (i % 6) * 0.1)
    consumers = [
        subprocess.Popen(
            [sys.executable, "-c", _CONSUMER, store.path], stdout=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    got: list[str] = []
    for consumer in consumers:
        out, _ = consumer.communicate(timeout=60)
        assert consumer.returncode == 0
        got += out.split()
    assert sorted(got) == sorted(f"m{i}" for i in range(60))  # none lost, none twice
    assert store_entries(store) == []


def test_a_waiting_consumer_wakes_for_a_due_message(store: FileStore) -> None:
    store.add(b"x", delay=0.4)
    started = time.monotonic()
    claim = store.claim(wait=10)
    waited = time.monotonic() - started
    assert claim is not None
    assert 0.35 <= waited < 2.0


def test_a_name_taken_in_new_keeps_the_delayed_message_waiting(
    store: FileStore, clock: Clock
) -> None:
    name = store.add(b"delayed", delay=5)
    Path(store.path, "new", name).write_bytes(b"squatter")
    clock.advance(6)
    claim = store.claim()
    assert claim is not None
    assert claim.read_bytes() == b"squatter"
    claim.finish()
    assert store.claim() is None
    assert len(store.list("delay")) == 1  # for an operator to look at


def test_a_symlinked_delay_area_is_never_followed(store: FileStore, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, os.path.join(store.path, "delay"))
    with pytest.raises(NotADirectoryError):
        store.add(b"x", delay=5)
    with pytest.raises(NotADirectoryError):
        store.list("delay")
    assert list(elsewhere.iterdir()) == []
    # Claims go on, and nothing there is taken for a due message.
    due = f"{1:017d}.1700000000.M000000P1Q0Rdeadbeef.host"
    (elsewhere / due).write_bytes(b"planted")
    store.add(b"real")
    claim = store.claim()
    assert claim is not None
    assert claim.read_bytes() == b"real"
    claim.finish()
    assert store.claim() is None
    assert (elsewhere / due).read_bytes() == b"planted"


# -- batches and the command ----------------------------------------------------------


def test_a_delayed_batch(store: FileStore, clock: Clock) -> None:
    names = store.add_many([b"a", b"b"], delay=10)
    with store.batch() as batch:
        now = batch.add(b"now")
        later = batch.add(b"later", delay=20)
    assert [os.path.basename(p) for p in store.list("new")] == [now]
    assert [e.partition(".")[2] for e in delayed(store)] == [*names, later]
    clock.advance(11)
    got = []
    while (claim := store.claim()) is not None:
        got.append(claim.read_bytes())
        claim.finish()
    assert got == [b"a", b"b", b"now"]


def run(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*COMMAND, *args], input=stdin, capture_output=True, timeout=60)


def test_the_command_delays(store: FileStore) -> None:
    put = run("put", "--delay", "1h", store.path, stdin=b"x")
    assert put.returncode == 0, put.stderr
    (name,) = put.stdout.decode().split()
    listed = run("ls", store.path, "delay")
    assert listed.returncode == 0
    assert listed.stdout.decode().strip().endswith(f".{name}")
    assert run("take", store.path).returncode == 3  # nothing claimable
    store.add(b"y")
    taken = run("take", store.path)
    released = run("release", "--delay", "90s", store.path, taken.stdout.decode().strip())
    assert released.returncode == 0, released.stderr
    assert "/delay/" in released.stdout.decode()
    assert len(store.list("delay")) == 2
    bad = run("put", "--delay", "-5s", store.path, stdin=b"z")
    assert bad.returncode == 2
    assert b"must not be negative" in bad.stderr
