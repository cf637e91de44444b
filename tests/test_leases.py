"""Leases: renewing a claim, keeping it alive, and recovery honouring both.

The clock is controlled where a test is about ages (``clock``, see
:mod:`clocks`): the claim's name, the renewal and ``recover()`` all read
``time.time_ns``.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from atomstore import ClaimLostError, FileStore, KeepAlive
from clocks import SECOND, Clock
from fstree import store_entries
from tracing import Recorder

COMMAND = [sys.executable, "-m", "atomstore"]


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    spool = FileStore(tmp_path / "spool")
    spool.prepare()
    return spool


def test_a_renewed_claim_counts_its_age_from_the_renewal(store: FileStore, clock: Clock) -> None:
    name = store.add(b"long job")
    claim = store.claim()
    assert claim is not None
    clock.advance(50)
    claim.renew()
    assert claim.renewed_at == pytest.approx(clock.wall_ns / SECOND, abs=1e-6)
    clock.advance(30)  # 80 s after the claim, 30 s after the renewal
    assert store.recover(60) == []
    assert os.path.exists(claim.path)
    clock.advance(31)  # 61 s after the renewal
    (back,) = store.recover(60)
    assert back == os.path.join(store.path, "new", f"{name}:1,A1")
    with pytest.raises(ClaimLostError):
        claim.finish()


def test_each_renewal_moves_the_lease_on(store: FileStore, clock: Clock) -> None:
    store.add(b"x")
    claim = store.claim()
    assert claim is not None
    for _ in range(10):
        clock.advance(40)
        claim.renew()
        assert store.recover(60) == []
    claim.finish()
    assert store_entries(store) == []


def test_a_claim_never_renewed_is_recovered_as_before(store: FileStore, clock: Clock) -> None:
    store.add(b"x")
    claim = store.claim()
    assert claim is not None
    assert claim.renewed_at is None
    clock.advance(59)
    assert store.recover(60) == []
    clock.advance(2)
    assert len(store.recover(60)) == 1


@pytest.mark.parametrize("ended_by", ["recover", "finish", "release"])
def test_a_claim_no_longer_held_cannot_be_renewed(store: FileStore, ended_by: str) -> None:
    store.add(b"x")
    claim = store.claim()
    assert claim is not None
    if ended_by == "recover":
        store.recover(0)
    elif ended_by == "finish":
        claim.finish()
    else:
        claim.release()
    before = store_entries(store)
    with pytest.raises(ClaimLostError) as info:
        claim.renew()
    assert info.value.errno == errno.ENOENT
    assert info.value.filename == claim.path
    assert store_entries(store) == before


def test_the_old_holder_cannot_renew_a_claim_taken_again(store: FileStore, clock: Clock) -> None:
    store.add(b"x")
    first = store.claim()
    assert first is not None
    clock.advance(61)
    store.recover(60)
    second = store.claim()
    assert second is not None
    with pytest.raises(ClaimLostError):
        first.renew()
    clock.advance(61)
    second.renew()  # the new holder's claim is untouched
    assert store.recover(60) == []


def test_a_renewal_goes_through_the_os_boundary(store: FileStore, trace: Recorder) -> None:
    store.add(b"x")
    claim = store.claim()
    assert claim is not None
    trace.calls.clear()
    claim.renew()
    assert [c.name for c in trace.calls] == ["utime"]
    assert trace.calls[0].args[0] == claim.path


def test_renewing_refuses_a_symlinked_cur(store: FileStore, tmp_path: Path) -> None:
    store.add(b"x")
    claim = store.claim()
    assert claim is not None
    cur = os.path.join(store.path, "cur")
    os.rename(cur, tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", cur)
    with pytest.raises(NotADirectoryError):
        claim.renew()


# -- keep_alive -------------------------------------------------------------


def test_keep_alive_renews_while_the_block_runs(store: FileStore, trace: Recorder) -> None:
    store.add(b"x")
    claim = store.claim()
    assert claim is not None
    with claim.keep_alive(0.02) as keeper:
        assert isinstance(keeper, KeepAlive)
        deadline = time.monotonic() + 10
        while trace.count("utime") < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    renewals = trace.count("utime")
    assert renewals >= 3
    assert keeper.error is None
    assert not keeper.lost
    time.sleep(0.1)
    assert trace.count("utime") == renewals  # stopped with the block
    assert not any(t.name.startswith("atomstore keep_alive") for t in threading.enumerate())
    claim.finish()


def test_keep_alive_keeps_recover_away(store: FileStore) -> None:
    store.add(b"x")
    claim = store.claim()
    assert claim is not None
    with claim.keep_alive(0.05):
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            assert store.recover(0.5) == []
            time.sleep(0.05)
    claim.finish()


def test_keep_alive_stops_at_a_lost_claim_and_says_so(store: FileStore) -> None:
    store.add(b"x")
    claim = store.claim()
    assert claim is not None
    with claim.keep_alive(0.02) as keeper:
        store.recover(0)
        deadline = time.monotonic() + 10
        while keeper.error is None and time.monotonic() < deadline:
            time.sleep(0.01)
    assert keeper.lost
    assert isinstance(keeper.error, ClaimLostError)


def test_keep_alive_stops_when_the_block_raises(store: FileStore) -> None:
    store.add(b"x")
    claim = store.claim()
    assert claim is not None
    with pytest.raises(RuntimeError, match="job failed"):
        with claim, claim.keep_alive(0.02):
            raise RuntimeError("job failed")
    assert not any(t.name.startswith("atomstore keep_alive") for t in threading.enumerate())
    assert len(store.list("new")) == 1  # released by the claim's own block


@pytest.mark.parametrize("interval", [0, -1, float("nan")])
def test_keep_alive_needs_a_positive_interval(store: FileStore, interval: float) -> None:
    store.add(b"x")
    claim = store.claim()
    assert claim is not None
    with pytest.raises(ValueError):
        claim.keep_alive(interval)


def test_keep_alive_is_entered_once(store: FileStore) -> None:
    store.add(b"x")
    claim = store.claim()
    assert claim is not None
    keeper = claim.keep_alive(1)
    with keeper:
        with pytest.raises(RuntimeError, match="once"):
            keeper.__enter__()


# -- across processes ---------------------------------------------------------

_RENEWER = """
import sys, time
from atomstore import FileStore
store = FileStore(sys.argv[1])
claims = [store.claim() for _ in range(int(sys.argv[2]))]
print("claimed", flush=True)
deadline = time.monotonic() + float(sys.argv[3])
while time.monotonic() < deadline:
    for claim in claims:
        claim.renew()
    time.sleep(0.02)
print("stopped", flush=True)
sys.stdin.read()  # until told to finish
lost = 0
for claim in claims:
    try:
        claim.finish()
    except FileNotFoundError:
        lost += 1
print(lost, flush=True)
"""


def test_renewals_from_another_process_keep_its_claims(store: FileStore) -> None:
    for i in range(8):
        store.add(f"m{i}".encode())
    renewer = subprocess.Popen(
        [sys.executable, "-c", _RENEWER, store.path, "8", "1.5"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert renewer.stdout is not None
        assert renewer.stdin is not None
        assert renewer.stdout.readline() == "claimed\n"
        started = time.monotonic()
        while time.monotonic() - started < 1.2:  # while it renews: nothing is old
            assert store.recover(0.5) == []
            time.sleep(0.05)
        assert renewer.stdout.readline() == "stopped\n"
        time.sleep(0.6)  # its leases run out
        assert len(store.recover(0.5)) == 8
        renewer.stdin.close()
        assert renewer.stdout.readline() == "8\n"  # every claim it held was lost
    finally:
        renewer.kill()
        renewer.wait()
    assert len(store.list("new")) == 8


# -- the command ----------------------------------------------------------------


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*COMMAND, *args], capture_output=True, text=True, timeout=60)


def test_the_renew_command(store: FileStore) -> None:
    store.add(b"x")
    taken = run("take", store.path)
    assert taken.returncode == 0, taken.stderr
    path = taken.stdout.strip()
    old = os.stat(path).st_mtime_ns
    renewed = run("renew", store.path, path)
    assert (renewed.returncode, renewed.stdout, renewed.stderr) == (0, "", "")
    assert os.stat(path).st_mtime_ns > old
    assert run("done", store.path, path).returncode == 0
    again = run("renew", store.path, path)
    assert again.returncode == 1
    assert again.stdout == ""
    assert "no longer held" in again.stderr
    assert path in again.stderr


def test_the_renew_command_refuses_what_is_not_a_claim(store: FileStore) -> None:
    proc = run("renew", store.path, "not-a-claim")
    assert proc.returncode == 1
    assert "not the name of a claim" in proc.stderr
