"""What an adversarial review of the redesigned write path found, kept found.

Each test reproduces one finding: a replaced file's mode and group under a
changing umask, a default ACL added late, a set-group-ID directory; batches
and their descriptors (dropped, out of descriptors, interrupted as a
message was published); durations given as timedeltas of odd origins.
"""

from __future__ import annotations

import gc
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from acls import default_acl
from atomstore import FileStore, _staging, _syscalls, atomic
from atomstore._args import seconds
from fstree import store_entries
from tracing import Recorder


def mode(path: str | Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def run_script(script: str, store: Path) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a process of its own (resource limits stay there),
    the store's path as its argument; it must succeed."""
    proc = subprocess.run(
        [sys.executable, "-c", script, str(store)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def umask022() -> object:
    saved = os.umask(0o022)
    yield
    os.umask(saved)


# -- modes and groups of replaced files ------------------------------------------


def test_a_default_acl_added_after_a_replace_is_still_seen(
    tmp_path: Path, umask022: object
) -> None:
    directory = tmp_path / "d"
    directory.mkdir()
    path = directory / "f"
    path.write_bytes(b"1")
    path.chmod(0o644)
    atomic.write_bytes(path, b"2", overwrite=True)
    try:
        os.setxattr(directory, "system.posix_acl_default", default_acl(7, 5, 0))
    except OSError as e:
        pytest.skip(f"no POSIX ACLs on {tmp_path}: {e}")
    atomic.write_bytes(path, b"3", overwrite=True)
    assert mode(path) == 0o644
    with atomic.file(path, "wb", overwrite=True) as f:
        f.write(b"4")
    assert mode(path) == 0o644


def test_writes_never_touch_the_umask(
    tmp_path: Path, umask022: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The umask is the whole process's: setting it, even back to what it
    # was, shows another value to every other thread in between.
    calls: list[int] = []
    real = os.umask

    def spy(mask: int) -> int:
        calls.append(mask)
        return real(mask)

    monkeypatch.setattr(os, "umask", spy)
    path = tmp_path / "f"
    path.write_bytes(b"old")
    path.chmod(0o664)
    atomic.write_bytes(path, b"new", overwrite=True)
    with atomic.file(path, "wb", overwrite=True) as f:
        f.write(b"newer")
    atomic.write_bytes(tmp_path / "g", b"new file")
    assert calls == []
    assert mode(path) == 0o664


def test_a_umask_changed_while_the_file_is_created_cannot_strip_its_mode(
    tmp_path: Path, umask022: object, trace: Recorder
) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"old")
    path.chmod(0o644)

    def stricter_umask_first(*args: Any, **kwargs: Any) -> Any:
        os.umask(0o077)  # another thread, just before the open
        return _syscalls._CALLS["open"](*args, **kwargs)

    trace.replace["open"] = stricter_umask_first
    atomic.write_bytes(path, b"new", overwrite=True)
    assert mode(path) == 0o644
    with atomic.file(path, "wb", overwrite=True) as f:
        f.write(b"newer")
    assert mode(path) == 0o644


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory another group")
def test_a_set_group_id_directory_does_not_change_the_group(tmp_path: Path) -> None:
    directory = tmp_path / "shared"
    directory.mkdir()
    os.chown(directory, 0, 1234)
    directory.chmod(0o2775)
    path = directory / "f"
    path.write_bytes(b"old")
    os.chown(path, 0, 0)  # root's group, not the directory's
    path.chmod(0o644)
    atomic.write_bytes(path, b"new", overwrite=True)
    assert (os.stat(path).st_gid, mode(path)) == (0, 0o644)
    with atomic.file(path, "wb", overwrite=True) as f:
        f.write(b"newer")
    assert (os.stat(path).st_gid, mode(path)) == (0, 0o644)


def test_a_symlink_replaced_by_a_file_gives_it_no_mode(tmp_path: Path, umask022: object) -> None:
    # A symlink's own mode is 0o777: the file that replaces it is new.
    link = tmp_path / "link"
    os.symlink("target", link)
    atomic.write_bytes(link, b"secret", overwrite=True, follow_symlinks=False)
    assert not os.path.islink(link)
    assert mode(link) == 0o644
    os.unlink(link)
    os.symlink("target", link)
    with atomic.file(link, "wb", overwrite=True, follow_symlinks=False) as f:
        f.write(b"secret")
    assert mode(link) == 0o644


# -- batches and their descriptors ------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    spool = FileStore(tmp_path / "spool", durable=False)
    spool.prepare()
    return spool


def test_a_dropped_batch_holds_no_descriptor(store: FileStore) -> None:
    gc.collect()  # what earlier tests left to the collector, closed first
    before = open_descriptors()
    for _ in range(20):
        batch = store.batch()
        for _ in range(50):
            batch.add(b"m")
        del batch
        gc.collect()
    assert open_descriptors() == before
    assert store_entries(store) == []  # and nothing was delivered


def test_a_process_short_of_descriptors_still_delivers_a_batch(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import os, resource, sys
        from atomstore import FileStore
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))
        held = [os.open("/dev/null", os.O_RDONLY) for _ in range(1000)]
        store = FileStore(sys.argv[1], durable=False)
        store.prepare()
        names = store.add_many(b"m%d" % i for i in range(300))
        data = [open(p, "rb").read() for p in store.list("new")]
        assert data == [b"m%d" % i for i in range(300)], data[:3]
        assert len(names) == 300
        print(len(os.listdir(os.path.join(sys.argv[1], "tmp"))))
        """
    )
    proc = run_script(script, tmp_path / "s")
    assert proc.stdout == "0\n"  # delivered through tmp/, nothing left there


def test_several_batches_at_once_fit_the_usual_descriptor_limit(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import os, resource, sys
        from atomstore import FileStore
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))
        store = FileStore(sys.argv[1], durable=False)
        store.prepare()
        batches = [store.batch() for _ in range(12)]
        for b, batch in enumerate(batches):
            for i in range(300):
                batch.add(b"%d-%d" % (b, i))
        held = len(os.listdir("/proc/self/fd"))
        for batch in batches:
            batch.commit()
        got = sorted(open(p, "rb").read() for p in store.list("new"))
        assert got == sorted(b"%d-%d" % (b, i) for b in range(12) for i in range(300))
        print(held < 1024, len(os.listdir("/proc/self/fd")) < 16, os.listdir(sys.argv[1] + "/tmp"))
        """
    )
    proc = run_script(script, tmp_path / "s")
    assert proc.stdout == "True True []\n"


@pytest.mark.parametrize("publisher", ["link_fd", "renameat2"])
def test_an_interruption_as_a_message_is_published_says_it_was(
    store: FileStore, trace: Recorder, publisher: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if publisher == "renameat2":
        monkeypatch.setattr("atomstore._staging._O_TMPFILE", 0)
    batch = store.batch()
    names = [batch.add(b"one"), batch.add(b"two")]
    other: list[int] = []

    def interrupted_after(*args: Any, **kwargs: Any) -> Any:
        result = _syscalls._CALLS[publisher](*args, **kwargs)
        if not other and "/new/" in str(args[1]):
            # Someone else's descriptor takes the next free number.
            other.append(os.open("/dev/null", os.O_RDONLY))
            raise KeyboardInterrupt
        return result

    trace.replace[publisher] = interrupted_after
    with pytest.raises(KeyboardInterrupt):
        batch.commit()
    os.fstat(other[0])  # still open: no descriptor was closed twice
    os.close(other[0])
    assert batch.published == names[:1]  # delivered, and said so
    assert [os.path.basename(p) for p in store.list("new")] == names[:1]
    assert store_entries(store) == [f"new/{names[0]}"]


def test_a_name_taken_in_new_is_not_taken_for_a_delivery(store: FileStore, trace: Recorder) -> None:
    batch = store.batch()
    name = batch.add(b"ours")
    Path(store.path, "new", name).write_bytes(b"another's")
    with pytest.raises(FileExistsError):
        batch.commit()
    assert batch.published == []
    assert Path(store.path, "new", name).read_bytes() == b"another's"


# -- durations ----------------------------------------------------------------------


def test_a_timedelta_counts_whoever_imported_it() -> None:
    import datetime
    import importlib

    c_datetime = importlib.import_module("_datetime")  # what datetime wraps
    assert seconds(c_datetime.timedelta(seconds=90)) == 90.0
    saved = sys.modules.pop("datetime")
    try:
        assert seconds(datetime.timedelta(minutes=2)) == 120.0
    finally:
        sys.modules["datetime"] = saved


def test_errno_of_a_full_descriptor_table_is_not_hidden_from_add(tmp_path: Path) -> None:
    # One add() has no batch to fall back for: out of descriptors, it says so.
    script = textwrap.dedent(
        """
        import errno, os, resource, sys
        from atomstore import FileStore
        store = FileStore(sys.argv[1], durable=False)
        store.prepare()
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        held = []
        try:
            while True:
                held.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            pass
        try:
            store.add(b"x")
        except OSError as e:
            print(errno.errorcode[e.errno])
        """
    )
    proc = run_script(script, tmp_path / "s")
    assert proc.stdout == "EMFILE\n"
    assert os.listdir(tmp_path / "s" / "tmp") == os.listdir(tmp_path / "s" / "new") == []


# -- a second review ----------------------------------------------------------------


def test_a_replacement_is_never_open_to_a_group_before_its_group_is_right(
    tmp_path: Path, trace: Recorder
) -> None:
    # Made in the process's group (or a set-group-ID directory's), a
    # temporary file with the old file's group bits would let that group
    # open it before the fchown: they are added only after it.
    path = tmp_path / "secret"
    path.write_bytes(b"old")
    path.chmod(0o660)
    for how in ("write_bytes", "file"):
        trace.calls.clear()
        if how == "write_bytes":
            atomic.write_bytes(path, b"new", overwrite=True)
        else:
            with atomic.file(path, "wb", overwrite=True) as f:
                f.write(b"newer")
        (made,) = [c for c in trace.calls if c.name == "open" and ".atomstore-" in c.args[0]]
        assert made.args[2] & 0o070 == 0, oct(made.args[2])
        assert mode(path) == 0o660


def test_a_stream_that_runs_out_of_descriptors_is_not_read_twice(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import io, os, resource, sys
        from atomstore import FileStore
        store = FileStore(sys.argv[1], durable=False)
        store.prepare()
        batch = store.batch()
        for i in range(4):
            batch.add(b"small %d" % i)

        class Lazy(io.RawIOBase):
            # Opens a file of its own halfway through: out of descriptors there.
            def __init__(self):
                self.step = 0
            def readable(self):
                return True
            def readinto(self, buffer):
                self.step += 1
                if self.step == 1:
                    buffer[:6] = b"PART1;"
                    return 6
                if self.step == 2:
                    os.close(os.open("/dev/null", os.O_RDONLY))
                return 0

        held = []
        try:
            while True:
                held.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            pass
        for fd in held[-1:]:  # room for the message's own file, not for the stream's
            os.close(fd)
        try:
            batch.add(io.BufferedReader(Lazy()))
        except OSError as e:
            print("raised", e.errno)
        else:
            print("delivered", [open(p, "rb").read() for p in store.list("new")])
        """
    )
    proc = run_script(script, tmp_path / "s")
    assert proc.stdout.startswith("raised 24"), proc.stdout


def test_a_forked_child_leaves_its_parents_batch_alone(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "s", durable=False)
    store.prepare()
    batch = store.batch()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("atomstore._batch.UNNAMED_MAX", 2)
        names = [batch.add(b"%d" % i) for i in range(5)]  # 3 of them in tmp/
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child drops its copy and exits
        del batch
        gc.collect()
        os._exit(0)
    os.waitpid(pid, 0)
    assert len(os.listdir(tmp_path / "s" / "tmp")) == 3
    assert batch.commit() == names
    assert [Path(p).read_bytes() for p in store.list("new")] == [b"%d" % i for i in range(5)]


def test_a_spill_cut_short_leaves_nothing_after_discard(
    tmp_path: Path, trace: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FileStore(tmp_path / "s", durable=False)
    store.prepare()
    batch = store.batch()
    names = [batch.add(b"%d" % i) for i in range(3)]

    def linked_then_interrupted(*args: Any, **kwargs: Any) -> Any:
        result = _syscalls._CALLS["link_fd"](*args, **kwargs)
        if "/tmp/" in str(args[1]):
            raise KeyboardInterrupt
        return result

    trace.replace["link_fd"] = linked_then_interrupted
    with pytest.raises(KeyboardInterrupt):
        batch._spill()
    batch.discard()
    assert store_entries(store) == []
    assert not any(n in path for path in _staging._live for n in names)


def test_a_mode_changed_while_the_block_runs_is_the_one_kept(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"old")
    path.chmod(0o644)
    with atomic.file(path, "w", overwrite=True) as f:
        f.write("new")
        path.chmod(0o600)  # someone made it private meanwhile
    assert mode(path) == 0o600
    assert path.read_text() == "new"
