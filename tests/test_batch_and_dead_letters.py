"""FileStore batches, retries and dead letters."""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from atomstore import Batch, ClaimLostError, FileStore, _syscalls
from atomstore._batch import UNNAMED_MAX
from fstree import store_entries
from tracing import ANONYMOUS_NAME, Recorder, named_staging


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    s = FileStore(tmp_path / "store")
    s.prepare()
    s.add(b"probe")
    s.claim().finish()  # type: ignore[union-attr]
    return s


@pytest.fixture(params=["unnamed", "named"])
def staging(request: pytest.FixtureRequest) -> Iterator[str]:
    """Both ways a batch stages: files without a name in new/ (O_TMPFILE),
    and hidden names in tmp/, as where O_TMPFILE is missing."""
    if request.param == "named":
        with named_staging():
            yield request.param
    else:
        yield request.param


# -- batches --------------------------------------------------------------


def test_add_many_delivers_in_order_with_one_directory_fsync(
    store: FileStore, trace: Recorder, staging: str
) -> None:
    names = store.add_many([b"one", "two", bytearray(b"three")])
    assert [os.path.basename(p) for p in store.list("new")] == names
    assert [Path(p).read_bytes() for p in store.list("new")] == [b"one", b"two", b"three"]
    synced = trace.fsynced_paths()
    tmp, new = (os.path.join(store.path, a) for a in ("tmp", "new"))
    if staging == "named":
        assert synced == [os.path.join(tmp, n) for n in names] + [new]
    else:
        assert synced == [os.path.join(new, ANONYMOUS_NAME)] * 3 + [new]
        assert trace.count("link_fd") == 3
        assert trace.count("rename") == trace.count("renameat2") == 0
    assert store_entries(store) == [f"new/{n}" for n in names]


def test_a_large_batch_holds_a_bounded_number_of_descriptors(
    tmp_path: Path, trace: Recorder
) -> None:
    store = FileStore(tmp_path / "s", durable=False)
    store.prepare()
    count = UNNAMED_MAX + 40
    names = store.add_many(f"m{i}".encode() for i in range(count))
    assert len(names) == count
    assert trace.count("link_fd") == UNNAMED_MAX  # the rest went through tmp/
    assert [Path(p).read_bytes() for p in store.list("new")] == [
        f"m{i}".encode() for i in range(count)
    ]
    assert store_entries(store) == [f"new/{n}" for n in names]
    assert len(os.listdir("/proc/self/fd")) < 100  # every descriptor closed


def test_add_many_of_nothing(store: FileStore, trace: Recorder) -> None:
    assert store.add_many([]) == []
    assert trace.count("fsync") == 0


def test_batch_publishes_nothing_before_it_closes(store: FileStore, staging: str) -> None:
    with store.batch() as batch:
        assert isinstance(batch, Batch)
        first = batch.add(b"a")
        second = batch.add(b"b")
        assert store.list("new") == []
        assert store.claim() is None
        staged = sorted(os.listdir(os.path.join(store.path, "tmp")))
        assert staged == (sorted([first, second]) if staging == "named" else [])
    assert batch.published == [first, second]
    assert [os.path.basename(p) for p in store.list("new")] == [first, second]


def test_batch_that_raises_delivers_nothing(store: FileStore, staging: str) -> None:
    with pytest.raises(RuntimeError):
        with store.batch() as batch:
            batch.add(b"a")
            batch.add(b"b")
            raise RuntimeError("producer failed")
    assert batch.published == []
    assert store_entries(store) == []


def test_add_many_failing_midway_delivers_nothing(
    store: FileStore, trace: Recorder, staging: str
) -> None:
    def items() -> object:
        yield b"a"
        yield b"b"
        raise ValueError("the source broke")

    with pytest.raises(ValueError, match="source broke"):
        store.add_many(items())  # type: ignore[arg-type]
    trace.fail("write", errno.ENOSPC, when=lambda call: trace.count("write") >= 2)
    with pytest.raises(OSError) as info:
        store.add_many([b"a", b"b", b"c"])
    assert info.value.errno == errno.ENOSPC
    assert store_entries(store) == []


def test_batch_publish_answered_eio_after_it_took_effect_goes_on(
    store: FileStore, trace: Recorder
) -> None:
    # The file was named before the reply was lost: its name is there, the
    # staged file itself, so the batch goes on (an unnamed file is private).
    batch = store.batch()
    names = [batch.add(x) for x in (b"a", b"b", b"c")]
    trace.fail("link_fd", errno.EIO, after=True, when=lambda c: c.args[1].endswith(names[1]))
    assert batch.commit() == names
    assert trace.count("link_fd") == 3
    assert store_entries(store) == [f"new/{n}" for n in names]
    assert [Path(p).read_bytes() for p in store.list("new")] == [b"a", b"b", b"c"]


def test_add_whose_link_took_effect_and_was_claimed_at_once_is_delivered(
    store: FileStore, trace: Recorder
) -> None:
    # The link named the message, a consumer on another host claimed it,
    # then the reply came back EIO: the unnamed file has a name now, so it
    # was delivered (raising would make a retrying producer send it twice).
    claimed = os.path.join(store.path, "cur", "taken-by-another-host")

    def link_then_claimed(fd: int, dst: str) -> None:
        _syscalls._link_fd(fd, dst)
        os.rename(dst, claimed)
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    trace.replace["link_fd"] = link_then_claimed
    store.add(b"once")
    assert store_entries(store) == ["cur/taken-by-another-host"]
    assert Path(claimed).read_bytes() == b"once"


def test_add_whose_link_answered_eio_with_another_file_there_says_it_exists(
    store: FileStore, trace: Recorder
) -> None:
    target: list[str] = []

    def taken_then_eio(fd: int, dst: str) -> None:
        Path(dst).write_bytes(b"another")
        target.append(dst)
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    trace.replace["link_fd"] = taken_then_eio
    with pytest.raises(FileExistsError) as info:
        store.add(b"mine")
    assert info.value.filename == target[0]
    assert Path(target[0]).read_bytes() == b"another"
    assert store_entries(store) == [f"new/{os.path.basename(target[0])}"]


def test_batch_publish_failure_keeps_what_was_delivered(
    store: FileStore, trace: Recorder, staging: str
) -> None:
    batch = store.batch()
    names = [batch.add(x) for x in (b"a", b"b", b"c")]
    publisher = "renameat2" if staging == "named" else "link_fd"
    trace.fail(publisher, errno.EIO, when=lambda call: call.args[1].endswith(names[1]))
    with pytest.raises(OSError) as info:
        batch.commit()
    assert info.value.errno == errno.EIO
    assert names[1] in str(info.value)  # the message it failed on is named
    assert batch.published == names[:1]
    assert store_entries(store) == [f"new/{names[0]}"]
    assert trace.fsynced_paths()[-1] == os.path.join(store.path, "new")


def test_batch_not_durable(tmp_path: Path, trace: Recorder, staging: str) -> None:
    store = FileStore(tmp_path / "s", durable=False)
    store.prepare()
    store.add_many([b"a", b"b"])
    assert trace.count("fsync") == 0
    assert len(store.list("new")) == 2


def test_batch_checks_types(store: FileStore, staging: str) -> None:
    with pytest.raises(TypeError, match="bytes-like"):
        store.add_many([b"ok", 3])  # type: ignore[list-item]
    assert store_entries(store) == []


def test_batch_across_processes(store: FileStore) -> None:
    # A producer process delivers batches while this process consumes.
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            producer = FileStore(store.path)
            for b in range(20):
                producer.add_many([f"{b}-{i}".encode() for i in range(10)])
        except BaseException:
            code = 1
        os._exit(code)
    got: list[bytes] = []
    deadline = time.monotonic() + 30
    while len(got) < 200 and time.monotonic() < deadline:
        claim = store.claim(wait=1)
        if claim is not None:
            got.append(claim.read_bytes())
            claim.finish()
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    assert sorted(got) == sorted(f"{b}-{i}".encode() for b in range(20) for i in range(10))
    # each batch arrives whole and in order
    positions = {g: i for i, g in enumerate(got)}
    for b in range(20):
        order = [positions[f"{b}-{i}".encode()] for i in range(10)]
        assert order == sorted(order)


# -- retries and dead letters ---------------------------------------------


def test_attempts_are_counted_in_the_name(store: FileStore) -> None:
    name = store.add(b"x")
    for attempt in range(3):
        claim = store.claim()
        assert claim is not None
        assert claim.attempts == attempt
        assert claim.release() == os.path.join(store.path, "new", f"{name}:1,A{attempt + 1}")


def test_max_attempts_sends_to_dead(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "s", max_attempts=2)
    store.prepare()
    assert store.list("dead") == []
    name = store.add(b"poison")
    store.claim().release()  # type: ignore[union-attr]
    assert not os.path.exists(os.path.join(store.path, "dead"))
    dead = store.claim().release()  # type: ignore[union-attr]
    assert dead == os.path.join(store.path, "dead", f"{name}:1,A2")
    assert store.list("dead") == [dead]
    assert Path(dead).read_bytes() == b"poison"
    assert store.claim() is None
    assert store.list("new") == store.list("cur") == []


def test_recover_counts_an_attempt_and_sends_to_dead(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "s", max_attempts=1)
    store.prepare()
    name = store.add(b"x")
    held = store.claim()
    assert held is not None
    (path,) = store.recover(0)
    assert path == os.path.join(store.path, "dead", f"{name}:1,A1")
    with pytest.raises(ClaimLostError) as info:
        held.finish()
    assert info.value.errno == errno.ENOENT
    assert info.value.filename == held.path
    assert Path(path).read_bytes() == b"x"


def test_dead_directory_is_durable_and_private(tmp_path: Path, trace: Recorder) -> None:
    store = FileStore(tmp_path / "s", max_attempts=1, mode=0o600)
    store.prepare()
    store.add(b"x")
    claim = store.claim()
    assert claim is not None
    trace.calls.clear()
    claim.release()
    dead = os.path.join(store.path, "dead")
    assert oct(os.stat(dead).st_mode & 0o777) == "0o700"
    assert trace.fsynced_paths() == [store.path, dead, os.path.join(store.path, "cur")]


def test_requeue_resets_attempts(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "s", max_attempts=1)
    store.prepare()
    name = store.add(b"x")
    store.claim().release()  # type: ignore[union-attr]
    (dead,) = store.list("dead")
    assert store.requeue(dead) == os.path.join(store.path, "new", name)
    claim = store.claim()
    assert claim is not None
    assert claim.attempts == 0
    assert claim.name == name
    claim.finish()
    assert store_entries(store) == []


def test_requeue_errors(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "s")
    store.prepare()
    with pytest.raises(FileNotFoundError) as info:
        store.requeue("nothing")
    assert info.value.filename == os.path.join(store.path, "dead", "nothing")
    with pytest.raises(ValueError, match="not a file of this store's 'dead' area"):
        store.requeue(os.path.join(store.path, "new", "x"))


def test_requeue_never_clobbers(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "s", max_attempts=1)
    store.prepare()
    name = store.add(b"first")
    store.claim().release()  # type: ignore[union-attr]
    Path(store.path, "new", name).write_bytes(b"squatter")
    with pytest.raises(FileExistsError):
        store.requeue(store.list("dead")[0])
    assert Path(store.path, "new", name).read_bytes() == b"squatter"
    assert len(store.list("dead")) == 1


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "3"])
def test_max_attempts_checked(tmp_path: Path, bad: object) -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        FileStore(tmp_path, max_attempts=bad)  # type: ignore[arg-type]


def test_dead_letters_across_processes(tmp_path: Path) -> None:
    # A consumer that fails every message, in other processes, kills them all.
    store = FileStore(tmp_path / "s", max_attempts=3)
    store.prepare()
    sent = {store.add(f"m{i}".encode()) for i in range(20)}
    children = []
    for _ in range(3):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            failing = FileStore(store.path, max_attempts=3)
            while True:
                claim = failing.claim()
                if claim is None:
                    break
                claim.release()
            os._exit(0)
        children.append(pid)
    for pid in children:
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 0
    dead = [os.path.basename(p) for p in store.list("dead")]
    assert sorted(d.split(":")[0] for d in dead) == sorted(sent)
    assert all(d.endswith(":1,A3") for d in dead)
    assert store.list("new") == store.list("cur") == []


def test_claimed_rebuilds_a_claim(store: FileStore) -> None:
    name = store.add(b"x")
    claim = store.claim()
    assert claim is not None
    again = store.claimed(claim.path)
    assert (again.name, again.path, again.attempts, again.token) == (
        name,
        claim.path,
        0,
        claim.token,
    )
    assert abs(again.claimed_at - claim.claimed_at) < 1e-3
    again.finish()
    with pytest.raises(ClaimLostError) as info:
        claim.finish()
    assert info.value.filename == claim.path
    assert store_entries(store) == []
    with pytest.raises(ValueError, match="not the name of a claim"):
        store.claimed("plain-name")


def test_signal_free_context(store: FileStore) -> None:
    # A claim used as a context manager releases on KeyboardInterrupt too.
    store.add(b"x")
    with pytest.raises(KeyboardInterrupt):
        with store.claim():  # type: ignore[union-attr]
            signal.raise_signal(signal.SIGINT)
    (back,) = store.list("new")
    assert back.endswith(":1,A1")


def test_a_release_that_counts_no_attempt(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "s", max_attempts=1, durable=False)
    store.prepare()
    name = store.add(b"untouched")
    claim = store.claim()
    assert claim is not None
    back = claim.release(count_attempt=False)
    # Spent by max_attempts if it had counted; back as it was instead.
    assert back == os.path.join(store.path, "new", name)
    again = store.claim()
    assert again is not None
    assert again.attempts == 0
    assert again.release().startswith(os.path.join(store.path, "dead", name))
