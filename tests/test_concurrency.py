"""Many producers and consumers, as separate processes, through one store.

Every message is counted and checksummed: none lost, none duplicated, and
where consumers are killed holding a claim, recovered and redelivered at
least once, duplicated only where the dead consumer had done its work.

The stores here are not durable (durable=False): what is tested is the race
between processes, which fsync does not change (a killed process loses
nothing the kernel already has); fsync would only slow the exchange down.
They live on tmpfs where there is one, for speed: creating a file on this
machine's ext4 costs about a millisecond.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from atomstore import ClaimLostError, FileStore, atomic
from atomstore._info import split_info
from forked import Children, exit_code
from fstree import store_entries

PRODUCERS = 4
CONSUMERS = 4
HOST = "host"  # the logs are split at spaces: no hostname with one in it


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Path]:
    """A scratch directory on tmpfs if there is one, else ``tmp_path``."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        path = Path(tempfile.mkdtemp(prefix="atomstore-concurrency-", dir="/dev/shm"))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)
    else:
        yield tmp_path


# -- messages -------------------------------------------------------------


def message(producer: int, seq: int, body: bytes) -> bytes:
    """A message that carries its origin and the checksum of its body."""
    digest = hashlib.sha256(body).hexdigest()
    return f"{producer} {seq} {digest}\n".encode() + body


def check(data: bytes) -> tuple[int, int, bool]:
    """(producer, seq, whether the body matches its checksum)."""
    header, _, body = data.partition(b"\n")
    producer, seq, digest = header.decode().split()
    return int(producer), int(seq), hashlib.sha256(body).hexdigest() == digest


def produce(path: str, producer: int, count: int, log: Path) -> None:
    """Add ``count`` messages; log each name with its origin."""
    store = FileStore(path, durable=False, hostname=HOST)
    rng = random.Random(producer)
    with open(log, "w") as out:
        for seq in range(count):
            body = rng.randbytes(rng.randrange(300))
            name = store.add(message(producer, seq, body))
            out.write(f"{name} {producer} {seq}\n")


def read_flag(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def consume(path: str, log: Path, done: Path, pause: Path | None = None, hold: float = 0.0) -> None:
    """Claim, check, finish, until ``done`` exists and ``new/`` is empty.

    Each step is logged with one unbuffered append before the next begins,
    so that the log of a consumer killed at any moment says which claim it
    held and whether it had done its work: ``CLAIM <claim file>``, ``DONE
    <producer> <seq> <ok> <name> <attempts>``, then ``FIN <name>`` or, when
    the claim was taken away, ``LOST <name>`` (``GONE <name>`` if that was
    noticed before the work began).  While ``pause`` exists the
    consumer holds no claim and logs ``PAUSED <its content>``.
    """
    store = FileStore(path, durable=False, hostname=HOST)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def note(line: str) -> None:
        os.write(fd, f"{line}\n".encode())

    while True:
        if pause is not None:
            token = read_flag(pause)
            if token is not None:
                note(f"PAUSED {token}")
                while pause.exists():
                    time.sleep(0.001)
                continue
        finished = done.exists()
        claim = store.claim(wait=0.05)
        if claim is None:
            if finished:
                return
            continue
        note(f"CLAIM {os.path.basename(claim.path)}")
        try:
            producer, seq, ok = check(claim.read_bytes())
        except ClaimLostError:
            note(f"GONE {claim.name}")  # taken away before the work began
            continue
        # The work, and a pause after it: a kill during either lands while
        # the claim is held, before or after the work is done.
        time.sleep(hold)
        note(f"DONE {producer} {seq} {ok} {claim.name} {claim.attempts}")
        time.sleep(hold)
        try:
            claim.finish()
        except ClaimLostError:
            note(f"LOST {claim.name}")
            continue
        note(f"FIN {claim.name}")


# -- reading the logs -----------------------------------------------------


@dataclass
class Delivery:
    """One DONE line: a message processed by a consumer."""

    name: str
    producer: int
    seq: int
    ok: bool
    attempts: int


@dataclass
class ConsumerLog:
    """What one consumer's log says."""

    deliveries: list[Delivery] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    held: str | None = None  # the claim file it held when the log ends
    held_done: bool = False  # and whether it had done that claim's work


def read_consumer_log(log: Path) -> ConsumerLog:
    result = ConsumerLog()
    for line in log.read_text().splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "CLAIM":
            result.held, result.held_done = rest, False
        elif kind == "DONE":
            name, p, s, ok, attempts = _done_fields(rest)
            result.deliveries.append(Delivery(name, p, s, ok, attempts))
            result.held_done = True
        elif kind == "GONE":
            result.held, result.held_done = None, False
        elif kind in ("FIN", "LOST"):
            (result.finished if kind == "FIN" else result.lost).append(rest)
            result.held, result.held_done = None, False
    return result


def _done_fields(rest: str) -> tuple[str, int, int, bool, int]:
    producer, seq, ok, name, attempts = rest.split(" ")
    return name, int(producer), int(seq), ok == "True", int(attempts)


def attempts_by_name(deliveries: list[Delivery]) -> dict[str, list[int]]:
    found: dict[str, list[int]] = collections.defaultdict(list)
    for d in deliveries:
        found[d.name].append(d.attempts)
    return found


def read_producer_logs(logs: list[Path]) -> dict[str, tuple[int, int]]:
    sent: dict[str, tuple[int, int]] = {}
    for log in logs:
        for line in log.read_text().splitlines():
            name, producer, seq = line.split(" ")
            sent[name] = (int(producer), int(seq))
    return sent


def last_line(log: Path) -> str:
    try:
        with open(log, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 200))
            lines = f.read().decode(errors="replace").splitlines()
    except FileNotFoundError:
        return ""
    return lines[-1] if lines else ""


def expect_exit_0(kids: Children, pid: int, timeout: float) -> None:
    assert exit_code(kids.wait(pid, timeout)) == 0, f"worker {pid} failed"


# -- the tests ------------------------------------------------------------


@pytest.mark.slow
def test_many_producers_and_consumers_lose_and_duplicate_nothing(spool: Path) -> None:
    per_producer = 5_000
    store = FileStore(spool / "store", durable=False)
    store.prepare()
    done = spool / "done"
    producer_logs = [spool / f"producer-{p}.log" for p in range(PRODUCERS)]
    consumer_logs = [spool / f"consumer-{c}.log" for c in range(CONSUMERS)]
    started = time.monotonic()
    with Children() as kids:
        consumers = [
            kids.start(functools.partial(consume, store.path, c, done)) for c in consumer_logs
        ]
        producers = [
            kids.start(functools.partial(produce, store.path, p, per_producer, producer_logs[p]))
            for p in range(PRODUCERS)
        ]
        for pid in producers:
            expect_exit_0(kids, pid, timeout=120)
        done.touch()
        for pid in consumers:
            expect_exit_0(kids, pid, timeout=60)
    elapsed = time.monotonic() - started

    sent = read_producer_logs(producer_logs)
    assert len(sent) == PRODUCERS * per_producer
    assert sorted(sent.values()) == [(p, s) for p in range(PRODUCERS) for s in range(per_producer)]
    logs = [read_consumer_log(c) for c in consumer_logs]
    deliveries = [d for log in logs for d in log.deliveries]
    assert all(d.ok for d in deliveries), "a message arrived torn or corrupt"
    assert all(sent[d.name] == (d.producer, d.seq) for d in deliveries)
    counts = collections.Counter(d.name for d in deliveries)
    assert set(counts) == set(sent), "messages were lost"
    assert max(counts.values()) == 1, "messages were delivered twice"
    assert {d.attempts for d in deliveries} == {0}
    assert sorted(n for log in logs for n in log.finished) == sorted(sent)
    assert all(log.held is None and not log.lost for log in logs)
    # every consumer took part: the claims were really contended
    assert min(len(log.deliveries) for log in logs) > 0
    assert store_entries(store) == []
    print(f"{len(deliveries)} messages in {elapsed:.1f} s, per consumer:", end=" ")
    print([len(log.deliveries) for log in logs])


@dataclass
class Recovery:
    """One round of the kill test: the victim and what recover() did."""

    victim: int
    victim_log: Path
    in_cur: list[str]  # the claim files left in cur/, seen with all others paused
    recovered: list[str]  # what recover() returned


def pause_consumers(pause: Path, token: str, live: dict[int, Path], kids: Children) -> None:
    """Pause every live consumer; return once each says it holds no claim."""
    atomic.write_text(pause, token, overwrite=True, durable=False)
    deadline = time.monotonic() + 30
    for pid, log in live.items():
        while last_line(log) != f"PAUSED {token}":
            assert time.monotonic() < deadline, f"consumer {pid} does not pause"
            done, status = os.waitpid(pid, os.WNOHANG)
            assert not done, f"consumer {pid} ended ({exit_code(status)})"
            time.sleep(0.001)


@pytest.mark.slow
def test_killed_consumers_lose_nothing_and_duplicate_only_what_they_held(spool: Path) -> None:
    rounds, per_producer, producers_count = 30, 2_500, 2
    rng = random.Random(6)
    store = FileStore(spool / "store", durable=False)
    store.prepare()
    done, pause = spool / "done", spool / "pause"
    producer_logs = [spool / f"producer-{p}.log" for p in range(producers_count)]
    consumer_logs: dict[int, Path] = {}
    recoveries: list[Recovery] = []
    started = time.monotonic()
    with Children() as kids:

        def start_consumer() -> int:
            log = spool / f"consumer-{len(consumer_logs)}.log"
            pid = kids.start(functools.partial(consume, store.path, log, done, pause, hold=0.002))
            consumer_logs[pid] = log
            return pid

        live = {start_consumer() for _ in range(CONSUMERS)}
        producers = [
            kids.start(functools.partial(produce, store.path, p, per_producer, producer_logs[p]))
            for p in range(producers_count)
        ]
        for r in range(rounds):
            time.sleep(rng.uniform(0.005, 0.05))
            victim = rng.choice(sorted(live))
            kids.kill(victim)
            live.discard(victim)
            live.add(start_consumer())
            pause_consumers(pause, str(r), {pid: consumer_logs[pid] for pid in live}, kids)
            in_cur = sorted(os.listdir(os.path.join(store.path, "cur")))
            recovered = store.recover(0)
            for claim_file in in_cur:
                # The one who held it is dead; whoever tries with its name is
                # fenced off, and the message stays where recover() put it.
                stale = store.claimed(claim_file)
                for attempt in (stale.finish, stale.release):
                    with pytest.raises(ClaimLostError):
                        attempt()
            assert all(os.path.exists(p) for p in recovered)
            recoveries.append(Recovery(victim, consumer_logs[victim], in_cur, recovered))
            pause.unlink()
        for pid in producers:
            expect_exit_0(kids, pid, timeout=120)
        done.touch()
        for pid in live:
            expect_exit_0(kids, pid, timeout=60)
    elapsed = time.monotonic() - started

    sent = read_producer_logs(producer_logs)
    assert len(sent) == producers_count * per_producer
    logs = {pid: read_consumer_log(log) for pid, log in consumer_logs.items()}
    deliveries = [d for log in logs.values() for d in log.deliveries]
    assert all(d.ok and sent[d.name] == (d.producer, d.seq) for d in deliveries)
    counts = collections.Counter(d.name for d in deliveries)
    assert set(counts) == set(sent), "messages were lost"

    recovered_times: collections.Counter[str] = collections.Counter()
    expected_duplicates: collections.Counter[str] = collections.Counter()
    held_at_kill = unlogged_claims = 0
    finished_silently: set[str] = set()
    for rec in recoveries:
        # With every other consumer paused, only the victim can hold a claim.
        assert len(rec.in_cur) <= 1
        for claim_file in rec.in_cur:
            assert split_info(claim_file)[1]["P"] == str(rec.victim)
        assert [split_info(os.path.basename(p))[0] for p in rec.recovered] == [
            split_info(c)[0] for c in rec.in_cur
        ]
        for path in rec.recovered:
            assert os.path.dirname(path) == os.path.join(store.path, "new")
            recovered_times[split_info(os.path.basename(path))[0]] += 1
        dead = logs[rec.victim]
        assert not dead.lost
        if dead.held is not None and dead.held in rec.in_cur:
            held_at_kill += 1
            if dead.held_done:
                # killed after its work, before finish(): done again after recovery
                expected_duplicates[split_info(dead.held)[0]] += 1
        elif dead.held is not None:
            # gone from cur/ although never recovered: only finish() removes
            # it, which comes after the work
            assert dead.held_done
            finished_silently.add(split_info(dead.held)[0])
        elif rec.in_cur:
            unlogged_claims += 1  # killed between the claim's rename and its log line

    # most kills land on a held claim (the work holds it longest): the
    # accounting below is not vacuous
    assert held_at_kill >= rounds // 4
    duplicates = {name: n - 1 for name, n in counts.items() if n > 1}
    assert duplicates == dict(expected_duplicates)
    attempts = attempts_by_name(deliveries)
    for name in sent:
        # each recovery counts one attempt; the last delivery carries them all
        assert max(attempts[name]) == recovered_times[name]
    # each message finished once, by the holder of its last claim
    finished = collections.Counter(n for log in logs.values() for n in log.finished)
    assert finished == collections.Counter(set(sent) - finished_silently)
    assert not any(log.lost for log in logs.values())
    assert store_entries(store) == []
    assert store.recover(0) == []
    print(
        f"{len(sent)} messages, {len(deliveries)} deliveries in {elapsed:.1f} s; "
        f"{rounds} kills, {held_at_kill} holding a logged claim, {unlogged_claims} an unlogged "
        f"one, {len(finished_silently)} after finish(); "
        f"{sum(expected_duplicates.values())} duplicates (work done, not finished)"
    )


@pytest.mark.slow
def test_recovery_racing_live_consumers_fences_the_losers(spool: Path) -> None:
    # recover(0) while consumers work takes claims from live consumers: they
    # must learn it (ClaimLostError) and never remove the new claimant's
    # file.  Duplicates are then exactly the losers' work.
    per_producer, producers_count = 1_500, 2
    store = FileStore(spool / "store", durable=False)
    store.prepare()
    done = spool / "done"
    producer_logs = [spool / f"producer-{p}.log" for p in range(producers_count)]
    consumer_logs = [spool / f"consumer-{c}.log" for c in range(CONSUMERS)]
    recovered: list[str] = []
    with Children() as kids:
        consumers = [
            kids.start(functools.partial(consume, store.path, c, done, hold=0.0005))
            for c in consumer_logs
        ]
        producers = [
            kids.start(functools.partial(produce, store.path, p, per_producer, producer_logs[p]))
            for p in range(producers_count)
        ]
        running = set(producers)
        while running:
            recovered += store.recover(0)
            time.sleep(0.002)
            for pid in list(running):
                status = kids.poll(pid)
                if status is not None:
                    assert exit_code(status) == 0, f"producer {pid} failed"
                    running.discard(pid)
        done.touch()
        for pid in consumers:
            expect_exit_0(kids, pid, timeout=60)

    sent = read_producer_logs(producer_logs)
    assert len(sent) == producers_count * per_producer
    logs = [read_consumer_log(c) for c in consumer_logs]
    deliveries = [d for log in logs for d in log.deliveries]
    assert all(d.ok and sent[d.name] == (d.producer, d.seq) for d in deliveries)
    counts = collections.Counter(d.name for d in deliveries)
    assert set(counts) == set(sent), "messages were lost"
    lost = collections.Counter(n for log in logs for n in log.lost)
    assert recovered, "no claim was recovered: the race did not happen"
    finished = collections.Counter(n for log in logs for n in log.finished)
    assert finished == collections.Counter(list(sent)), "not every message finished exactly once"
    assert {n: c - 1 for n, c in counts.items() if c > 1} == dict(lost)
    times = collections.Counter(split_info(os.path.basename(p))[0] for p in recovered)
    attempts = attempts_by_name(deliveries)
    for name in sent:
        # the claim that finished is the latest one: a fenced claimant never
        # finishes, whatever it tries
        assert max(attempts[name]) == times[name]
        assert lost[name] <= times[name]
    assert store_entries(store) == []
    print(f"{len(recovered)} claims recovered from live consumers, {sum(lost.values())} lost")


def test_a_recovered_consumer_cannot_touch_the_new_claim(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store", durable=False)
    store.prepare()
    name = store.add(b"payload")
    to_a, from_a = os.pipe(), os.pipe()
    to_b, from_b = os.pipe(), os.pipe()

    def stale_consumer() -> None:
        claim = FileStore(store.path).claim()
        assert claim is not None
        os.write(from_a[1], f"{claim.path}\n".encode())
        os.read(to_a[0], 1)  # stalled until the message was recovered and claimed again
        outcome = []
        for attempt in (claim.finish, claim.release):
            try:
                attempt()
                outcome.append("succeeded")
            except ClaimLostError as e:
                outcome.append(f"{type(e).__name__} {e.errno} {e.filename}")
        os.write(from_a[1], ("|".join(outcome) + "\n").encode())

    def new_consumer() -> None:
        claim = FileStore(store.path).claim()
        assert claim is not None
        os.write(from_b[1], f"{claim.path} {claim.attempts}\n".encode())
        os.read(to_b[0], 1)
        claim.finish()

    def answer(pipe: tuple[int, int]) -> str:
        line = b""
        while not line.endswith(b"\n"):
            chunk = os.read(pipe[0], 4096)
            assert chunk, "the worker died"
            line += chunk
        return line.decode().rstrip("\n")

    with Children() as kids:
        a = kids.start(stale_consumer)
        a_path = answer(from_a)
        assert store.recover(0) == [os.path.join(store.path, "new", f"{name}:1,A1")]
        b = kids.start(new_consumer)
        b_path, b_attempts = answer(from_b).split(" ")
        assert b_attempts == "1"
        os.write(to_a[1], b"g")
        lost = f"ClaimLostError 2 {a_path}"
        assert answer(from_a) == f"{lost}|{lost}"
        expect_exit_0(kids, a, timeout=10)
        # the new claim is untouched, and only its holder finishes it
        assert Path(b_path).read_bytes() == b"payload"
        assert store_entries(store) == [f"cur/{os.path.basename(b_path)}"]
        os.write(to_b[1], b"g")
        expect_exit_0(kids, b, timeout=10)
    assert store_entries(store) == []
    for pipe in (to_a, from_a, to_b, from_b):
        os.close(pipe[0])
        os.close(pipe[1])
