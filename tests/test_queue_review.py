"""What an adversarial review of the queue's new parts found, kept found:
batches and forked children, interruptions as a batch publishes, stale
claims, odd entries in ``delay/``, draining runners and claims of any
message."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from atomstore import FileStore, _syscalls
from atomstore._batch import Batch
from atomstore._delays import split
from fstree import store_entries
from tracing import Recorder

COMMAND = [sys.executable, "-m", "atomstore"]


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    spool = FileStore(tmp_path / "spool", durable=False)
    spool.prepare()
    return spool


def test_a_child_leaving_a_batch_block_leaves_the_parents_files(
    store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("atomstore._batch.UNNAMED_MAX", 4)  # the rest named in tmp/
    with store.batch() as batch:
        for i in range(12):
            batch.add(b"m%d" % i)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child leaves through the block
            try:
                raise SystemExit(0)
            finally:
                batch.__exit__(SystemExit, None, None)
                os._exit(0)
        os.waitpid(pid, 0)
    assert len(batch.published) == 12
    assert sorted(Path(p).read_bytes() for p in store.list("new")) == sorted(
        b"m%d" % i for i in range(12)
    )


def test_an_interruption_as_a_batch_says_what_it_published(
    store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = store.batch()
    names = [batch.add(b"one"), batch.add(b"two")]
    real = Batch._published
    calls: list[str] = []

    def interrupted(self: Batch, name: str, entry: Any) -> None:
        if not calls:
            calls.append(name)
            raise KeyboardInterrupt  # on entry, as a signal handler could
        real(self, name, entry)

    monkeypatch.setattr(Batch, "_published", interrupted)
    with pytest.raises(KeyboardInterrupt):
        batch.commit()
    assert batch.published == names[:1]
    assert [os.path.basename(p) for p in store.list("new")] == names[:1]


def test_a_message_claimed_as_its_batch_was_interrupted_is_still_counted(
    store: FileStore, trace: Recorder
) -> None:
    consumer = FileStore(store.path, durable=False)
    batch = store.batch()
    names = [batch.add(b"one"), batch.add(b"two")]
    claimed: list[Any] = []

    def linked_then_claimed(*args: Any, **kwargs: Any) -> Any:
        result = _syscalls._CALLS["link_fd"](*args, **kwargs)
        if "/new/" in str(args[1]) and not claimed:
            claimed.append(consumer.claim())
            raise KeyboardInterrupt
        return result

    trace.replace["link_fd"] = linked_then_claimed
    with pytest.raises(KeyboardInterrupt):
        batch.commit()
    assert claimed[0] is not None
    assert claimed[0].read_bytes() == b"one"
    assert batch.published == names[:1]


def test_a_message_written_with_a_future_time_is_still_recovered(store: FileStore) -> None:
    name = store.add(b"job")
    future = time.time() + 86400  # copied from a host whose clock runs ahead
    os.utime(os.path.join(store.path, "new", name), (future, future))
    claim = store.claim()
    assert claim is not None
    time.sleep(0.3)
    assert len(store.recover(0.2)) == 1


def test_only_visible_regular_files_are_promoted_from_delay(store: FileStore) -> None:
    store.add(b"real", delay=3600)
    delay = Path(store.path, "delay")
    (delay / f"{1:017d}.a-directory").mkdir()
    os.symlink("/etc/passwd", delay / f"{2:017d}.a-symlink")
    (delay / f"{3:017d}..hidden").write_bytes(b"")
    (delay / f"{4:017d}.due").write_bytes(b"due")
    got = []
    while (claim := store.claim()) is not None:
        got.append(claim.read_bytes())
        claim.finish()
    assert got == [b"due"]
    assert store.list("cur") == []


def test_foreign_digits_in_delay_are_ignored(store: FileStore) -> None:
    store.add(b"waiting")
    store.add(b"later", delay=3600)
    Path(store.path, "delay", "\u00b2" * 17 + ".x").write_bytes(b"")
    assert split("\u00b2" * 17 + ".x") is None
    assert store.stats()["delay"]["count"] == 2
    claim = store.claim()
    assert claim is not None
    assert claim.read_bytes() == b"waiting"


def test_a_draining_runner_ends_despite_what_it_cannot_claim(store: FileStore) -> None:
    store.add(b"a")
    Path(store.path, "new", "stray-directory").mkdir()
    Path(store.path, "delay").mkdir()
    Path(store.path, "delay", "README").write_bytes(b"")
    proc = subprocess.run(
        [*COMMAND, "work", store.path, "--drain", "--quiet", "--", "true"],
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert store.list("cur") == []


def test_any_goes_past_names_it_cannot_claim(store: FileStore) -> None:
    for i in range(40):
        Path(store.path, "new", f"dir-{i:02d}").mkdir()  # never claimed
    name = store.add(b"the one")
    claim = FileStore(store.path, durable=False).claim(oldest=False)
    assert claim is not None
    assert claim.name == name


def test_a_ctrl_c_while_the_runner_claims_leaves_nothing_claimed(store: FileStore) -> None:
    # The hand-off from claim() to a running job happens with SIGINT held
    # back: a Ctrl-C arriving then is delivered once the claim is the job's.
    store.add_many(b"%d" % i for i in range(200))
    script = (
        "import os, signal, sys, threading, time\n"
        "from atomstore import FileStore\n"
        "store = FileStore(sys.argv[1], durable=False)\n"
        "def handler(claim):\n"
        "    time.sleep(0.001)\n"
        "threading.Timer(0.3, os.kill, [os.getpid(), signal.SIGINT]).start()\n"
        "try:\n"
        "    store.work(handler, workers=4)\n"
        "except KeyboardInterrupt:\n"
        "    print('stopped')\n"
    )
    for _ in range(5):
        proc = subprocess.run(
            [sys.executable, "-c", script, store.path], capture_output=True, text=True, timeout=60
        )
        assert proc.stdout == "stopped\n", proc.stderr
        assert store.list("cur") == []
    assert [e for e in store_entries(store) if not e.startswith("new/")] == []
