"""The ``atomstore`` command, run as a separate process as shell scripts run it."""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable

import pytest

import atomstore
from atomstore import FileStore, _cli, _names, atomic
from atomstore._info import join_info, split_info
from fstree import listing
from needs import need
from tracing import ANONYMOUS_NAME, Recorder

COMMANDS = (
    "write",
    "init",
    "put",
    "ls",
    "take",
    "done",
    "release",
    "recover",
    "requeue",
    "clean",
    "stat",
)
MiB = 1 << 20


@dataclass
class Result:
    code: int
    out: str
    err: str
    raw: bytes  # stdout as written


def atomstore_cmd(
    *args: str,
    stdin: bytes | IO[Any] | int = b"",
    cwd: Path | None = None,
    timeout: float = 30,
    **popen: Any,
) -> Result:
    """Run ``python -m atomstore ARGS`` to completion."""
    feed: dict[str, Any] = {"input": stdin} if isinstance(stdin, bytes) else {"stdin": stdin}
    proc = subprocess.run(
        [sys.executable, "-m", "atomstore", *args],
        capture_output=True,
        cwd=cwd,
        timeout=timeout,
        check=False,
        **feed,
        **popen,
    )
    return Result(proc.returncode, proc.stdout.decode(), proc.stderr.decode(), proc.stdout)


def start(*args: str, **popen: Any) -> subprocess.Popen[bytes]:
    """Start ``python -m atomstore ARGS`` without waiting for it."""
    return subprocess.Popen([sys.executable, "-m", "atomstore", *args], **popen)


def assert_one_error_line(result: Result, *named: str) -> None:
    """Exit 1 with a single ``atomstore: error:`` line that names ``named``."""
    assert result.code == 1, result
    assert "Traceback" not in result.err
    assert result.err.count("\n") == 1, result.err
    assert result.err.endswith("\n"), result.err
    assert result.err.startswith("atomstore: error: "), result.err
    for text in named:
        assert text in result.err, (text, result.err)


def assert_usage_error(result: Result, *named: str) -> None:
    """Exit 2 from the argument parser: usage, then one error line naming ``named``."""
    assert result.code == 2, result
    assert "Traceback" not in result.err
    assert result.out == ""
    last = result.err.splitlines()[-1]
    assert last.startswith("atomstore"), result.err
    assert ": error: " in last, result.err
    for text in named:
        assert text in last, (text, result.err)


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def staging_files(directory: Path) -> list[str]:
    return [n for n in os.listdir(directory) if _names.is_staging(n)]


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    s = FileStore(tmp_path / "spool", durable=False)
    s.prepare()
    return s


def new_names(store: FileStore) -> list[str]:
    return [os.path.basename(p) for p in store.list("new")]


# -- write ------------------------------------------------------------------


def test_write_stores_stdin_byte_for_byte(tmp_path: Path) -> None:
    data = bytes(range(256)) * 4096 + b"\r\n\x00tail"  # binary, 1 MiB and more
    result = atomstore_cmd("write", str(tmp_path / "blob"), stdin=data)
    assert (result.code, result.out, result.err) == (0, "", "")
    assert (tmp_path / "blob").read_bytes() == data
    assert listing(tmp_path) == ["blob"]


def test_write_empty_stdin_makes_an_empty_file(tmp_path: Path) -> None:
    result = atomstore_cmd("write", "empty", stdin=b"", cwd=tmp_path)
    assert result.code == 0, result
    assert (tmp_path / "empty").read_bytes() == b""


def test_write_refuses_an_existing_file(tmp_path: Path) -> None:
    dest = tmp_path / "config"
    dest.write_bytes(b"old")
    result = atomstore_cmd("write", str(dest), stdin=b"new")
    assert_one_error_line(result, str(dest), os.strerror(errno.EEXIST))
    assert dest.read_bytes() == b"old"
    assert listing(tmp_path) == ["config"]


def test_write_overwrite_replaces_and_keeps_the_mode(tmp_path: Path) -> None:
    dest = tmp_path / "config"
    dest.write_bytes(b"old")
    dest.chmod(0o640)
    result = atomstore_cmd("write", "--overwrite", str(dest), stdin=b"new")
    assert result.code == 0, result
    assert dest.read_bytes() == b"new"
    assert dest.stat().st_mode & 0o7777 == 0o640
    assert listing(tmp_path) == ["config"]


def test_write_mode_is_exact_whatever_the_umask(tmp_path: Path) -> None:
    result = atomstore_cmd("write", "--mode", "0644", str(tmp_path / "shared"), umask=0o077)
    assert result.code == 0, result
    assert (tmp_path / "shared").stat().st_mode & 0o7777 == 0o644
    # Without --mode the umask applies, as for any new file.
    result = atomstore_cmd("write", str(tmp_path / "private"), umask=0o077)
    assert result.code == 0, result
    assert (tmp_path / "private").stat().st_mode & 0o7777 == 0o600


def test_write_mode_applies_to_a_replaced_file(tmp_path: Path) -> None:
    dest = tmp_path / "config"
    dest.write_bytes(b"old")
    dest.chmod(0o600)
    result = atomstore_cmd("write", "--overwrite", "--mode", "0604", str(dest), stdin=b"new")
    assert result.code == 0, result
    assert dest.stat().st_mode & 0o7777 == 0o604


@pytest.mark.parametrize("mode", ["999", "rw-r--r--", "10000"])
def test_write_invalid_mode_is_a_usage_error(tmp_path: Path, mode: str) -> None:
    result = atomstore_cmd("write", f"--mode={mode}", str(tmp_path / "f"), stdin=b"x")
    assert_usage_error(result, "--mode", repr(mode))
    assert listing(tmp_path) == []


def test_write_into_a_missing_directory_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such"
    result = atomstore_cmd("write", str(missing / "f"), stdin=b"x")
    assert_one_error_line(result, str(missing), os.strerror(errno.ENOENT))
    assert listing(tmp_path) == []


def test_write_onto_a_directory(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    result = atomstore_cmd("write", "--overwrite", str(tmp_path / "d"), stdin=b"x")
    assert_one_error_line(result, str(tmp_path / "d"), os.strerror(errno.EISDIR))
    assert listing(tmp_path) == ["d"]
    assert listing(tmp_path / "d") == []


def test_write_unreadable_stdin_leaves_nothing(tmp_path: Path) -> None:
    # A descriptor open for writing only: every read from it fails (EBADF).
    with open(tmp_path / "sink", "wb") as write_only:
        result = atomstore_cmd("write", str(tmp_path / "dest"), stdin=write_only)
    assert_one_error_line(result, os.strerror(errno.EBADF))
    assert listing(tmp_path) == ["sink"]


def _close_stdin() -> None:
    os.close(0)


@pytest.mark.parametrize("command", ["write", "put"])
def test_closed_stdin_is_one_error_line(tmp_path: Path, store: FileStore, command: str) -> None:
    # ``atomstore write f <&-``: Python then has no sys.stdin at all.
    target = str(tmp_path / "dest") if command == "write" else store.path
    result = atomstore_cmd(command, target, stdin=subprocess.DEVNULL, preexec_fn=_close_stdin)
    assert_one_error_line(result)
    assert sorted(os.listdir(tmp_path)) == ["spool"]
    assert store.list("tmp") + store.list("new") == []


def _stream_one_chunk(dest: Path, *args: str) -> subprocess.Popen[bytes]:
    """A writer that has written its first MiB to its temporary file and waits for more."""

    def default_signals() -> None:
        # A shell starts background jobs with SIGINT ignored; the test wants
        # the behaviour of a foreground command.
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    proc = start(
        "write",
        *args,
        str(dest),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=default_signals,
    )
    assert proc.stdin is not None
    proc.stdin.write(b"n" * (MiB + 10))
    proc.stdin.flush()

    def first_chunk_written() -> bool:
        temps = staging_files(dest.parent)
        if temps:
            return os.path.getsize(dest.parent / temps[0]) >= MiB
        return unnamed_file_size(proc.pid, dest.parent) >= MiB

    assert wait_for(first_chunk_written), listing(dest.parent)
    return proc


def _finish(proc: subprocess.Popen[bytes], rest: bytes | None = None) -> Result:
    """Send ``rest`` (if any), close stdin and wait for the command."""
    out, err = proc.communicate(rest, timeout=30)
    return Result(proc.returncode, out.decode(), err.decode(), out)


def test_write_is_invisible_until_stdin_ends(tmp_path: Path) -> None:
    dest = tmp_path / "report"
    dest.write_bytes(b"old version")
    proc = _stream_one_chunk(dest, "--overwrite")
    try:
        assert dest.read_bytes() == b"old version"
        result = _finish(proc, b"end")
    finally:
        proc.kill()
        proc.wait()
    assert result.code == 0, result
    assert dest.read_bytes() == b"n" * (MiB + 10) + b"end"
    assert listing(tmp_path) == ["report"]


@pytest.mark.parametrize(
    ("signum", "codes"),
    [
        (signal.SIGINT, (130,)),
        # After cleaning up, a terminated command should still look
        # terminated to its shell: 128 + 15, or death by the signal itself.
        (signal.SIGTERM, (128 + signal.SIGTERM, -signal.SIGTERM)),
    ],
)
def test_write_interrupted_mid_stream_leaves_nothing(
    tmp_path: Path, signum: int, codes: tuple[int, ...]
) -> None:
    dest = tmp_path / "report"
    dest.write_bytes(b"old version")
    proc = _stream_one_chunk(dest, "--overwrite")
    try:
        proc.send_signal(signum)
        result = _finish(proc)
    finally:
        proc.kill()
        proc.wait()
    assert result.code in codes, result
    assert "Traceback" not in result.err
    assert dest.read_bytes() == b"old version"
    assert listing(tmp_path) == ["report"]


def test_write_killed_mid_stream_leaves_nothing_of_a_new_file(tmp_path: Path) -> None:
    # Written without a name (O_TMPFILE): the file dies with the process.
    dest = tmp_path / "report"
    proc = _stream_one_chunk(dest)
    proc.kill()
    _finish(proc)
    assert proc.returncode == -signal.SIGKILL
    assert listing(tmp_path) == []


def test_write_killed_mid_stream_leaves_only_a_hidden_temp(tmp_path: Path) -> None:
    # Replacing needs a name for the new version before the rename.
    dest = tmp_path / "report"
    proc = _stream_one_chunk(dest, "--overwrite")
    proc.kill()
    _finish(proc)
    assert proc.returncode == -signal.SIGKILL
    temps = staging_files(tmp_path)
    assert listing(tmp_path) == temps
    assert len(temps) == 1
    assert atomic.clean(tmp_path, older_than=0) == [str(tmp_path / temps[0])]
    assert listing(tmp_path) == []


def unnamed_file_size(pid: int, directory: Path) -> int:
    """The size of an unnamed (O_TMPFILE) file process ``pid`` holds open in
    ``directory``; 0 if none."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith(f"{directory}/#") and target.endswith(" (deleted)"):
                return os.stat(f"/proc/{pid}/fd/{fd}").st_size
        except OSError:  # closed meanwhile
            continue
    return 0


class _Stdin:
    def __init__(self, data: bytes) -> None:
        self.buffer = io.BytesIO(data)


def test_write_no_sync_makes_no_fsync(
    tmp_path: Path, trace: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", _Stdin(b"fast"))
    assert _cli.main(["write", "--no-sync", str(tmp_path / "fast")]) == 0
    assert trace.count("fsync") == 0
    monkeypatch.setattr(sys, "stdin", _Stdin(b"safe"))
    assert _cli.main(["write", str(tmp_path / "safe")]) == 0
    # The file before it gets its name, then the directory holding the name.
    synced = trace.fsynced_paths()
    assert synced == [str(tmp_path / ANONYMOUS_NAME), str(tmp_path)]
    assert (tmp_path / "fast").read_bytes() == b"fast"
    assert (tmp_path / "safe").read_bytes() == b"safe"


def test_the_console_script_runs(tmp_path: Path) -> None:
    script = Path(sysconfig.get_path("scripts")) / "atomstore"
    need(script.is_file(), f"the atomstore script is not installed in {script.parent}")
    proc = subprocess.run(
        [str(script), "write", str(tmp_path / "out")],
        input=b"via the script",
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"", b"")
    assert (tmp_path / "out").read_bytes() == b"via the script"


# -- init, put, ls ------------------------------------------------------------


def test_init_creates_the_areas_and_is_idempotent(tmp_path: Path) -> None:
    spool = tmp_path / "deep" / "spool"
    for _ in range(2):
        result = atomstore_cmd("init", str(spool))
        assert (result.code, result.out, result.err) == (0, "", "")
        assert listing(spool) == ["cur", "new", "tmp"]


def test_init_over_a_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "spool").write_bytes(b"")
    result = atomstore_cmd("init", str(tmp_path / "spool"))
    assert_one_error_line(result, str(tmp_path / "spool"))


def test_put_delivers_stdin_and_prints_the_name(store: FileStore) -> None:
    result = atomstore_cmd("put", store.path, stdin=b"resize photo 1")
    assert (result.code, result.err) == (0, ""), result
    assert result.out.splitlines() == new_names(store)
    assert Path(store.list("new")[0]).read_bytes() == b"resize photo 1"
    assert store.list("tmp") == []


def test_put_files_and_dash_in_order(tmp_path: Path, store: FileStore) -> None:
    (tmp_path / "a").write_bytes(b"from a")
    (tmp_path / "b").write_bytes(b"from b")
    result = atomstore_cmd("put", store.path, "a", "-", "b", stdin=b"from stdin", cwd=tmp_path)
    assert (result.code, result.err) == (0, ""), result
    printed = result.out.splitlines()
    assert len(printed) == 3
    assert new_names(store) == printed  # names sort by delivery
    contents = [(Path(store.path) / "new" / n).read_bytes() for n in printed]
    assert contents == [b"from a", b"from stdin", b"from b"]
    assert store.list("tmp") == []


def test_put_of_several_files_is_all_or_nothing(tmp_path: Path, store: FileStore) -> None:
    (tmp_path / "a").write_bytes(b"from a")
    (tmp_path / "c").write_bytes(b"from c")
    (tmp_path / "d").mkdir()
    for bad in ("missing", "d"):
        result = atomstore_cmd("put", store.path, "a", bad, "c", cwd=tmp_path)
        assert_one_error_line(result, bad)
        assert result.out == ""
        assert new_names(store) == []
        assert store.list("tmp") == []
    result = atomstore_cmd("put", store.path, "a", "c", cwd=tmp_path)
    assert result.code == 0
    printed = result.out.splitlines()
    assert printed == new_names(store)
    assert [(Path(store.path) / "new" / n).read_bytes() for n in printed] == [b"from a", b"from c"]


def test_put_into_an_unprepared_store(tmp_path: Path) -> None:
    result = atomstore_cmd("put", str(tmp_path / "nowhere"), stdin=b"x")
    assert_one_error_line(result, str(tmp_path / "nowhere"), "prepared")
    assert listing(tmp_path) == []


def test_ls_lists_an_area_oldest_first(store: FileStore) -> None:
    first, second = store.add(b"1"), store.add(b"2")
    store.create("draft").close()
    claim = store.claim()
    assert claim is not None
    new = atomstore_cmd("ls", store.path)
    assert (new.code, new.err) == (0, "")
    assert new.out.splitlines() == [os.path.join(store.path, "new", second)]
    assert atomstore_cmd("ls", store.path, "new").out == new.out
    assert atomstore_cmd("ls", store.path, "tmp").out.splitlines() == store.list("tmp")
    assert atomstore_cmd("ls", store.path, "cur").out.splitlines() == [claim.path]
    assert claim.name == first


def test_ls_of_an_empty_area_prints_nothing(store: FileStore) -> None:
    result = atomstore_cmd("ls", store.path)
    assert (result.code, result.out, result.err) == (0, "", "")


@pytest.mark.parametrize("area", ["bad", "../etc"])
def test_ls_unknown_area_is_a_usage_error(store: FileStore, area: str) -> None:
    assert_usage_error(atomstore_cmd("ls", store.path, area), repr(area))


def test_ls_into_a_closed_pipe_ends_quietly(store: FileStore) -> None:
    # More than a pipe holds (64 KiB), so ls is still writing when the reader
    # goes away, as in ``atomstore ls spool | head -1``.
    for i in range(1000):
        Path(store.path, "new", f"{i:04d}" + "x" * 240).write_bytes(b"")
    proc = start("ls", store.path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stderr is not None
        assert proc.stdout.readline().decode().rstrip("\n") == store.list("new")[0]
        proc.stdout.close()
        err = proc.stderr.read()
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert (proc.returncode, err) == (1, b"")


# -- take, done, release --------------------------------------------------------


def test_take_prints_the_claimed_path(store: FileStore) -> None:
    name = store.add(b"job")
    result = atomstore_cmd("take", store.path)
    assert (result.code, result.err) == (0, ""), result
    path = result.out.rstrip("\n")
    assert result.out == path + "\n"
    assert os.path.dirname(path) == os.path.join(store.path, "cur")
    assert split_info(os.path.basename(path))[0] == name
    assert Path(path).read_bytes() == b"job"
    assert store.list("new") == []
    assert store.list("cur") == [path]


def test_take_from_an_empty_store_exits_3_silently(store: FileStore) -> None:
    result = atomstore_cmd("take", store.path)
    assert (result.code, result.out, result.err) == (3, "", "")


def test_take_wait_times_out_with_exit_3(store: FileStore) -> None:
    started = time.monotonic()
    result = atomstore_cmd("take", "--wait", "0.4s", store.path)
    elapsed = time.monotonic() - started
    assert (result.code, result.out, result.err) == (3, "", "")
    assert elapsed >= 0.4


def _holds_inotify(pid: int) -> bool:
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except FileNotFoundError:
        return False
    for fd in fds:
        try:
            if os.readlink(os.path.join(fd_dir, fd)) == "anon_inode:inotify":
                return True
        except OSError:
            continue
    return False


def test_take_wait_gets_a_message_put_meanwhile(tmp_path: Path, store: FileStore) -> None:
    waiter = start(
        "take", "--wait", "60", store.path, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        # Once the waiter watches new/, it is past its first look; on a
        # system without inotify it polls, and a short pause must do.
        wait_for(lambda: _holds_inotify(waiter.pid), timeout=5)
        assert waiter.poll() is None, "take returned before any message was put"
        put = atomstore_cmd("put", store.path, stdin=b"late")
        assert put.code == 0, put
        delivered = time.monotonic()
        result = _finish(waiter)
        woken_after = time.monotonic() - delivered
    finally:
        waiter.kill()
        waiter.wait()
    assert (result.code, result.err) == (0, ""), result
    assert Path(result.out.rstrip("\n")).read_bytes() == b"late"
    assert woken_after < 10  # woken by the message, far before the 60 s
    assert store.list("new") == []


@pytest.mark.parametrize("form", ["path", "basename"])
def test_done_finishes_a_claim(store: FileStore, form: str) -> None:
    store.add(b"job")
    path = atomstore_cmd("take", store.path).out.rstrip("\n")
    name = path if form == "path" else os.path.basename(path)
    result = atomstore_cmd("done", store.path, name)
    assert (result.code, result.out, result.err) == (0, "", "")
    assert store.list("cur") == []
    assert store.list("new") == []
    again = atomstore_cmd("done", store.path, name)
    assert_one_error_line(again, "no longer held", path)


@pytest.mark.parametrize("form", ["path", "basename"])
def test_release_gives_a_claim_back(store: FileStore, form: str) -> None:
    name = store.add(b"job")
    path = atomstore_cmd("take", store.path).out.rstrip("\n")
    result = atomstore_cmd(
        "release", store.path, path if form == "path" else os.path.basename(path)
    )
    assert (result.code, result.err) == (0, ""), result
    back = os.path.join(store.path, "new", join_info(name, {"A": "1"}))
    assert result.out == back + "\n"
    assert store.list("new") == [back]
    assert store.list("cur") == []
    assert Path(back).read_bytes() == b"job"
    again = atomstore_cmd("release", store.path, path)
    assert_one_error_line(again, "no longer held", path)


def test_release_max_attempts_sends_to_dead_and_requeue_brings_back(store: FileStore) -> None:
    name = store.add(b"poison")
    spent = []
    for _ in range(2):
        path = atomstore_cmd("take", store.path).out.rstrip("\n")
        result = atomstore_cmd("release", "--max-attempts", "2", store.path, path)
        assert (result.code, result.err) == (0, ""), result
        spent.append(result.out.rstrip("\n"))
    assert spent == [
        os.path.join(store.path, "new", join_info(name, {"A": "1"})),
        os.path.join(store.path, "dead", join_info(name, {"A": "2"})),
    ]
    assert store.list("new") == []
    assert store.list("cur") == []
    assert atomstore_cmd("ls", store.path, "dead").out.splitlines() == [spent[1]]
    assert atomstore_cmd("take", store.path).code == 3

    result = atomstore_cmd("requeue", store.path, os.path.basename(spent[1]))
    assert (result.code, result.err) == (0, ""), result
    assert result.out == os.path.join(store.path, "new", name) + "\n"  # attempts reset
    assert store.list("new") == [os.path.join(store.path, "new", name)]
    assert store.list("dead") == []
    assert Path(store.list("new")[0]).read_bytes() == b"poison"


def test_recover_max_attempts_sends_to_dead(store: FileStore) -> None:
    base = _claim_aged(store, 3600, attempts=2)
    result = atomstore_cmd("recover", "--older-than", "1h", "--max-attempts", "3", store.path)
    assert (result.code, result.err) == (0, ""), result
    dead = os.path.join(store.path, "dead", join_info(base, {"A": "3"}))
    assert result.out.splitlines() == [dead]
    assert store.list("dead") == [dead]
    assert store.list("cur") == []


def test_requeue_all_and_by_path(store: FileStore) -> None:
    picky = FileStore(store.path, durable=False, max_attempts=1)
    names = [picky.add(f"job {i}".encode()) for i in range(3)]
    for _ in names:
        claim = picky.claim()
        assert claim is not None
        claim.release()
    dead = picky.list("dead")
    assert len(dead) == 3
    assert store.list("new") == []
    result = atomstore_cmd("requeue", store.path, dead[0])
    assert result.out.splitlines() == [os.path.join(store.path, "new", names[0])], result
    result = atomstore_cmd("requeue", "--all", store.path)
    assert (result.code, result.err) == (0, ""), result
    assert result.out.splitlines() == [os.path.join(store.path, "new", n) for n in names[1:]]
    assert new_names(store) == names
    assert store.list("dead") == []
    # Nothing left to requeue: --all does nothing, successfully.
    assert atomstore_cmd("requeue", "--all", store.path) == Result(0, "", "", b"")


def test_requeue_errors(store: FileStore) -> None:
    assert_usage_error(atomstore_cmd("requeue", store.path), "--all")
    missing = os.path.join(store.path, "dead", "no-such-letter")
    result = atomstore_cmd("requeue", store.path, missing)
    assert_one_error_line(result, "no-such-letter")
    assert store.list("new") == []


@pytest.mark.parametrize("count", ["0", "two"])
def test_invalid_max_attempts_is_a_usage_error(store: FileStore, count: str) -> None:
    result = atomstore_cmd("release", "--max-attempts", count, store.path, "x:1,A0,C1,P1,Tab")
    assert_usage_error(result, "--max-attempts", repr(count))


def test_a_recovered_claim_can_no_longer_be_finished(store: FileStore) -> None:
    store.add(b"job")
    path = atomstore_cmd("take", store.path).out.rstrip("\n")
    time.sleep(0.01)
    assert len(store.recover(older_than=0.005)) == 1
    result = atomstore_cmd("done", store.path, path)
    assert_one_error_line(result, "no longer held", path)
    assert len(store.list("new")) == 1


@pytest.mark.parametrize(
    "name",
    ["not-a-claim", ".hidden", "/etc/passwd"],
)
def test_done_with_what_is_not_a_claim(store: FileStore, name: str) -> None:
    store.add(b"job")
    result = atomstore_cmd("done", store.path, name)
    assert_one_error_line(result, repr(name))
    assert len(store.list("new")) == 1


# -- recover, clean, stat -------------------------------------------------------


def _claim_aged(store: FileStore, seconds: float, attempts: int = 0) -> str:
    """A claim whose recorded claim time lies ``seconds`` in the past."""
    store.add(f"{seconds}".encode())
    claim = store.claim()
    assert claim is not None
    base, fields = split_info(os.path.basename(claim.path))
    fields["A"] = str(attempts)
    claimed = time.time() - seconds
    fields["C"] = str(int(claimed * 1e6))
    aged = os.path.join(store.path, "cur", join_info(base, fields))
    os.rename(claim.path, aged)
    os.utime(aged, (claimed, claimed))  # written before it was claimed, never renewed
    return base


def _back(store: FileStore, base: str) -> str:
    """Where a claim of ``base`` without earlier attempts goes when given back."""
    return os.path.join(store.path, "new", join_info(base, {"A": "1"}))


def test_recover_understands_each_unit(store: FileStore) -> None:
    ages = {"fresh": 0.0, "100s": 100, "20m": 20 * 60, "37h": 37 * 3600, "3d": 3 * 86400}
    base = {label: _claim_aged(store, age) for label, age in ages.items()}
    # Each lease lies between two ages, so each run returns exactly one.
    for lease, label in [("2d", "3d"), ("36h", "37h"), ("15m", "20m"), ("90s", "100s")]:
        result = atomstore_cmd("recover", "--older-than", lease, store.path)
        assert (result.code, result.err) == (0, ""), (lease, result)
        assert result.out.splitlines() == [_back(store, base[label])], lease
    assert store.list("new") == sorted(_back(store, base[k]) for k in base if k != "fresh")
    assert [split_info(os.path.basename(p))[0] for p in store.list("cur")] == [base["fresh"]]


def test_recover_plain_seconds(store: FileStore) -> None:
    base = _claim_aged(store, 100)
    _claim_aged(store, 50)
    result = atomstore_cmd("recover", "--older-than", "90", store.path)
    assert result.out.splitlines() == [_back(store, base)], result


@pytest.mark.parametrize(
    "args",
    [
        ["recover", "--older-than=15x"],
        ["recover", "--older-than=-5m"],
        ["recover", "--older-than="],
        ["clean", "--older-than=soon"],
        ["take", "--wait=5 minutes"],
    ],
)
def test_invalid_duration_is_a_usage_error(store: FileStore, args: list[str]) -> None:
    _claim_aged(store, 3600)
    result = atomstore_cmd(*args, store.path)
    assert_usage_error(result, "invalid duration", repr(args[-1].partition("=")[2]))
    assert store.list("new") == []
    assert len(store.list("cur")) == 1


def test_recover_needs_a_lease(store: FileStore) -> None:
    assert_usage_error(atomstore_cmd("recover", store.path), "--older-than")


def test_clean_removes_only_stale_leftovers(store: FileStore) -> None:
    tmp, new = Path(store.path, "tmp"), Path(store.path, "new")
    long_ago = time.time() - 37 * 3600
    (tmp / "crashed").write_bytes(b"half")
    (tmp / "writing").write_bytes(b"in progress")
    staging = new / ".job.atomstore-0123456789ab.tmp"
    staging.write_bytes(b"")
    for path in (tmp / "crashed", staging):
        os.utime(path, (long_ago, long_ago))
    message = store.add(b"keep me")
    result = atomstore_cmd("clean", store.path)
    assert (result.code, result.err) == (0, ""), result
    assert sorted(result.out.splitlines()) == sorted([str(tmp / "crashed"), str(staging)])
    assert listing(tmp) == ["writing"]
    assert listing(new) == [message]
    result = atomstore_cmd("clean", "--older-than", "0", store.path)
    assert result.out.splitlines() == [str(tmp / "writing")], result
    assert listing(tmp) == []
    assert listing(new) == [message]


def test_stat_counts_each_area(store: FileStore) -> None:
    # The age of new/'s oldest comes from its unique name, not from a stat.
    long_ago = time.time() - 100
    old = f"{int(long_ago)}.M000000P1Q0Rdeadbeef.elsewhere"
    Path(store.path, "new", old).write_bytes(b"old")
    store.add(b"young")
    store.add(b"later", delay=60)
    store.create("draft").close()
    result = atomstore_cmd("stat", store.path, "--json")
    assert (result.code, result.err) == (0, ""), result
    stats = json.loads(result.out)
    counts = {area: row["count"] for area, row in stats.items()}
    assert counts == {"tmp": 1, "new": 2, "cur": 0, "dead": 0, "delay": 1}
    assert 99 <= stats["new"]["oldest_age"] < 130
    assert 0 <= stats["tmp"]["oldest_age"] < 30
    assert stats["cur"]["oldest_age"] is None
    assert stats["dead"]["oldest_age"] is None
    assert stats["delay"]["oldest_age"] is None
    assert 30 < stats["delay"]["next_due_in"] <= 60

    text = atomstore_cmd("stat", store.path)
    assert (text.code, text.err) == (0, ""), text
    header, *rows = [line.split() for line in text.out.splitlines()]
    assert header == ["area", "count", "oldest"]
    assert [row[:2] for row in rows] == [
        ["tmp", "1"],
        ["new", "2"],
        ["cur", "0"],
        ["dead", "0"],
        ["delay", "1"],
    ]
    assert rows[2][2] == rows[3][2] == "-"
    assert rows[4][2:5] == ["next", "due", "in"]
    assert rows[1][2].endswith("s")
    assert 100 <= float(rows[1][2][:-1]) < 130


# -- errors, help, version ------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["ls", "{missing}"],
        ["take", "{missing}"],
        ["take", "--wait", "1", "{missing}"],
        ["recover", "--older-than", "1m", "{missing}"],
        ["clean", "{missing}"],
        ["stat", "{missing}"],
        ["done", "{missing}", "x:1,A0,C1,P1,Tab"],
        ["release", "{missing}", "x:1,A0,C1,P1,Tab"],
        # dead/ is made when the first message dies, but a store that is
        # not there at all is still a mistake to report.
        ["ls", "{missing}", "dead"],
        ["requeue", "--all", "{missing}"],
    ],
)
def test_an_unprepared_store_is_one_error_line(tmp_path: Path, args: list[str]) -> None:
    missing = str(tmp_path / "missing")
    result = atomstore_cmd(*[a.format(missing=missing) for a in args])
    assert_one_error_line(result, missing)
    assert result.out == ""
    assert listing(tmp_path) == []


def test_help_of_every_command() -> None:
    top = atomstore_cmd("--help")
    assert (top.code, top.err) == (0, "")
    for command in COMMANDS:
        assert command in top.out, command
    procs = {
        c: start(c, "--help", stdout=subprocess.PIPE, stderr=subprocess.PIPE) for c in COMMANDS
    }
    for command, proc in procs.items():
        out, err = proc.communicate(timeout=30)
        assert (proc.returncode, err) == (0, b""), command
        assert out.decode().startswith(f"usage: atomstore {command} "), out
        # Only commands that change something can skip their fsyncs.
        assert (b"--no-sync" in out) == (command not in ("ls", "stat")), command


def test_version() -> None:
    result = atomstore_cmd("--version")
    assert (result.code, result.out, result.err) == (0, f"atomstore {atomstore.__version__}\n", "")


@pytest.mark.parametrize("args", [[], ["frobnicate"], ["done", "spool"]])
def test_bad_usage_exits_2(args: list[str]) -> None:
    assert_usage_error(atomstore_cmd(*args))


# -- memory ---------------------------------------------------------------------


def _scratch_dir(size: int) -> str | None:
    """/dev/shm when it has room for ``size`` bytes, else None."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    return "/dev/shm" if st.f_bavail * st.f_frsize > size + 256 * MiB else None


@pytest.mark.slow
def test_write_of_1_gib_keeps_memory_flat(tmp_path: Path) -> None:
    chunks = 1024
    with tempfile.TemporaryDirectory(dir=_scratch_dir(chunks * MiB) or tmp_path) as scratch:
        dest = Path(scratch) / "big"
        # The child reports its own peak (VmHWM): getrusage's maxrss keeps
        # the high-water mark of the forked pytest from before the exec.
        report = (
            "import sys; from atomstore._cli import main; code = main(sys.argv[1:]); "
            "print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')),"
            " file=sys.stderr); sys.exit(code)"
        )
        proc = subprocess.Popen(
            [sys.executable, "-c", report, "write", "--no-sync", str(dest)],
            stdin=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert proc.stdin is not None
            for i in range(chunks):
                # Each MiB carries its index, so order and completeness show.
                proc.stdin.write(i.to_bytes(4, "big") * (MiB // 4))
            proc.stdin.close()
            assert proc.stderr is not None
            err = proc.stderr.read()
            proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, err
        peak_mib = int(err.split()[1]) / 1024  # "VmHWM:  20000 kB"
        assert peak_mib < 50, f"peak RSS {peak_mib:.1f} MiB"
        assert dest.stat().st_size == chunks * MiB
        with open(dest, "rb") as f:
            for i in range(chunks):
                f.seek(i * MiB)
                head = f.read(4)
                f.seek((i + 1) * MiB - 4)
                assert (head, f.read(4)) == (i.to_bytes(4, "big"),) * 2, i
        assert os.listdir(scratch) == ["big"]
