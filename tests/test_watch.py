"""Waiting for messages: claim(wait=...), claims(), inotify and polling."""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from atomstore import FileStore, _watch
from atomstore._claim import Claims


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    s = FileStore(tmp_path / "store", durable=False)
    s.prepare()
    return s


@pytest.fixture
def no_inotify(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_watch, "_libc", None)


def later(seconds: float, func: Any, *args: Any) -> threading.Timer:
    timer = threading.Timer(seconds, func, args)
    timer.start()
    return timer


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_claim_waits_for_a_message(store: FileStore) -> None:
    later(0.1, store.add, b"late")
    started = time.monotonic()
    claim = store.claim(wait=10)
    waited = time.monotonic() - started
    assert claim is not None
    assert claim.read_bytes() == b"late"
    assert 0.05 < waited < 5


def test_claim_wait_times_out(store: FileStore) -> None:
    started = time.monotonic()
    assert store.claim(wait=0.2) is None
    assert 0.15 < time.monotonic() - started < 5


def test_claim_wait_zero_does_not_wait(store: FileStore) -> None:
    started = time.monotonic()
    assert store.claim(wait=0) is None
    assert store.claim() is None
    assert time.monotonic() - started < 0.5


def test_claim_wait_for_ever(store: FileStore) -> None:
    later(0.1, store.add, b"x")
    claim = store.claim(wait=math.inf)
    assert claim is not None


def test_claim_wait_from_another_process(store: FileStore) -> None:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        time.sleep(0.2)
        FileStore(store.path).add(b"from a process")
        os._exit(0)
    claim = store.claim(wait=10)
    os.waitpid(pid, 0)
    assert claim is not None
    assert claim.read_bytes() == b"from a process"


def test_waiting_does_not_busy_poll(store: FileStore, monkeypatch: pytest.MonkeyPatch) -> None:
    listings = 0
    real = os.listdir

    def counting(path: str) -> list[str]:
        nonlocal listings
        listings += 1
        return real(path)

    monkeypatch.setattr(os, "listdir", counting)
    assert store.claim(wait=0.5) is None
    assert listings <= 3


def test_waiting_releases_its_descriptors(store: FileStore) -> None:
    before = open_fds()
    store.claim(wait=0.05)
    with store.claims(timeout=0.05) as claims:
        assert list(claims) == []
    assert open_fds() == before


def test_claims_yields_messages_as_they_arrive(store: FileStore) -> None:
    def produce() -> None:
        for i in range(5):
            store.add(f"m{i}".encode())
            time.sleep(0.02)

    later(0.05, produce)
    got = []
    with store.claims(timeout=2) as claims:
        assert claims.uses_inotify
        for claim in claims:
            got.append(claim.read_bytes())
            claim.finish()
    assert got == [f"m{i}".encode() for i in range(5)]


def test_claims_stopped_from_another_thread(store: FileStore) -> None:
    claims = store.claims()
    later(0.1, claims.stop)
    started = time.monotonic()
    assert list(claims) == []
    assert time.monotonic() - started < 5


def test_claims_stopped_by_a_signal_handler(store: FileStore) -> None:
    claims = store.claims()
    previous = signal.signal(signal.SIGALRM, lambda signum, frame: claims.stop())
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        started = time.monotonic()
        assert list(claims) == []
        assert time.monotonic() - started < 5
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_stop_takes_effect_between_claims(store: FileStore) -> None:
    store.add_many([b"1", b"2", b"3"])
    got = []
    with store.claims() as claims:
        for claim in claims:
            got.append(claim.read_bytes())
            claim.finish()
            claims.stop()
    assert got == [b"1"]
    assert len(store.list("new")) == 2


def test_a_raising_signal_handler_interrupts_claim_wait(store: FileStore) -> None:
    signal.setitimer(signal.ITIMER_REAL, 0.1)
    previous = signal.signal(signal.SIGALRM, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            store.claim(wait=10)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_polling_without_inotify(store: FileStore, no_inotify: None) -> None:
    fast = FileStore(store.path, poll_interval=0.05)
    with fast.claims(timeout=3) as claims:
        assert not claims.uses_inotify
        later(0.1, store.add, b"polled")
        claim = next(claims)
    assert claim.read_bytes() == b"polled"


def test_polling_interval_defaults_where_inotify_is_missing(
    store: FileStore, no_inotify: None
) -> None:
    waiter = store._waiter()
    try:
        assert waiter.poll_interval == 0.5
    finally:
        waiter.close()


def test_local_filesystem_needs_no_polling(store: FileStore) -> None:
    waiter = store._waiter()
    try:
        assert waiter.uses_inotify
        assert waiter.poll_interval is None
    finally:
        waiter.close()


def test_remote_filesystem_polls(store: FileStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_watch, "filesystem_type", lambda path: "fuse.sshfs")
    waiter = store._waiter()
    try:
        assert waiter.uses_inotify
        assert waiter.poll_interval == 0.5
    finally:
        waiter.close()


def test_waiting_on_an_unprepared_store(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="prepared"):
        store.claim(wait=1)
    with pytest.raises(FileNotFoundError, match="prepared"):
        store.claims()


@pytest.mark.parametrize("bad", [0, -1])
def test_poll_interval_checked(tmp_path: Path, bad: float) -> None:
    with pytest.raises(ValueError, match="poll_interval"):
        FileStore(tmp_path, poll_interval=bad)


def test_wait_and_timeout_checked(store: FileStore) -> None:
    with pytest.raises(ValueError, match="wait"):
        store.claim(wait=-1)
    with pytest.raises(TypeError, match="timeout"):
        store.claims(timeout="soon")  # type: ignore[arg-type]


# -- which filesystem -----------------------------------------------------


@pytest.fixture
def mountinfo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    fake = tmp_path / "mountinfo"
    real_open = open

    def fake_open(path: Any, *args: Any, **kwargs: Any) -> Any:
        if path == "/proc/self/mountinfo":
            return real_open(fake, *args, **kwargs)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", fake_open)
    return fake


def test_filesystem_type_from_mountinfo(mountinfo: Path) -> None:
    mountinfo.write_text(
        "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
        "30 22 0:40 / /mnt/share rw shared:9 - nfs4 server:/export rw\n"
        "31 22 0:41 / /mnt/my\\040files rw - fuse.sshfs host: rw\n"
        "32 30 0:42 / /mnt/share/local rw - tmpfs tmpfs rw\n"
        "33 22 0:43 / /mnt/shareX rw - xfs /dev/sdb rw\n"
    )
    assert _watch.filesystem_type("/") == "ext4"
    assert _watch.filesystem_type("/mnt/share/spool") == "nfs4"
    assert _watch.filesystem_type("/mnt/share/local/spool") == "tmpfs"
    assert _watch.filesystem_type("/mnt/my files/q") == "fuse.sshfs"
    assert _watch.filesystem_type("/mnt/shareX") == "xfs"
    assert _watch.is_remote("/mnt/share")
    assert _watch.is_remote("/mnt/my files")
    assert not _watch.is_remote("/mnt/shareX")
    assert not _watch.is_remote("/home")


def test_filesystem_type_of_this_machine(tmp_path: Path) -> None:
    assert _watch.filesystem_type(str(tmp_path)) != ""
    assert not _watch.is_remote(str(tmp_path))


def test_claims_is_exported() -> None:
    import atomstore

    assert atomstore.Claims is Claims
