"""The worker runner: ``FileStore.work()`` and ``atomstore work``.

The command is run as a real process and stopped with real signals; every
test counts what was done, what is left in each area and that nothing is
stranded in ``cur/``.
"""

from __future__ import annotations

import errno
import os
import pty
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from alarms import deadline
from atomstore import Area, Claim, FileStore, Report
from fstree import store_entries
from tracing import Recorder

COMMAND = [sys.executable, "-m", "atomstore"]


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    spool = FileStore(tmp_path / "spool", durable=False)
    spool.prepare()
    return spool


def contents(store: FileStore, area: Area) -> list[bytes]:
    return sorted(Path(p).read_bytes() for p in store.list(area))


# -- from Python ---------------------------------------------------------------


def test_work_runs_each_message_once_and_finishes_it(store: FileStore) -> None:
    for i in range(40):
        store.add(f"m{i}".encode())
    seen: list[bytes] = []
    lock = threading.Lock()

    def handler(claim: Claim) -> None:
        data = claim.read_bytes()
        with lock:
            seen.append(data)

    report = store.work(handler, workers=4, drain=True)
    assert isinstance(report, Report)
    assert (report.done, report.failed, report.lost, report.cancelled) == (40, 0, 0, 0)
    assert sorted(seen) == sorted(f"m{i}".encode() for i in range(40))
    assert store_entries(store) == []


def test_work_runs_up_to_its_workers_at_once(store: FileStore) -> None:
    for i in range(12):
        store.add(b"%d" % i)
    running, most = [0], [0]
    lock = threading.Lock()

    def handler(claim: Claim) -> None:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.1)
        with lock:
            running[0] -= 1

    store.work(handler, workers=3, drain=True)
    assert most[0] == 3


def test_a_failing_handler_releases_and_dead_letters(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "s", durable=False, max_attempts=2)
    store.prepare()
    store.add(b"good")
    store.add(b"bad")

    def handler(claim: Claim) -> None:
        if claim.read_bytes() == b"bad":
            raise ValueError("cannot handle it")

    report = store.work(handler, workers=2, drain=True)
    assert (report.done, report.failed) == (1, 2)
    assert [type(e) for _, e in report.errors] == [ValueError, ValueError]
    assert contents(store, "dead") == [b"bad"]
    assert store.list("new") == store.list("cur") == []


def test_drain_waits_for_retries_that_are_delayed(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "s", durable=False, retry_delay=0.2, poll_interval=0.05)
    store.prepare()
    store.add(b"flaky")
    attempts: list[int] = []

    def handler(claim: Claim) -> None:
        attempts.append(claim.attempts)
        if claim.attempts < 2:
            raise RuntimeError("not yet")

    started = time.monotonic()
    report = store.work(handler, drain=True)
    assert attempts == [0, 1, 2]
    assert (report.done, report.failed) == (1, 2)
    assert time.monotonic() - started >= 0.2 + 0.4  # waited out both delays
    assert store_entries(store) == []


def test_a_lease_is_renewed_while_a_long_handler_runs(store: FileStore) -> None:
    store.add(b"long")
    recovered: list[str] = []
    stop = threading.Event()

    def recoverer() -> None:  # another consumer's recovery, all along
        while not stop.wait(0.05):
            recovered.extend(FileStore(store.path, durable=False).recover(0.6))

    thread = threading.Thread(target=recoverer)
    thread.start()
    try:
        report = store.work(lambda claim: time.sleep(1.5), lease=0.6, drain=True)
    finally:
        stop.set()
        thread.join()
    assert recovered == []
    assert (report.done, report.lost) == (1, 0)
    assert store_entries(store) == []


def test_a_dead_workers_claims_are_recovered_and_run(store: FileStore) -> None:
    store.add(b"orphan")
    orphan = store.claim()  # a worker that died holding it
    assert orphan is not None
    os.utime(orphan.path, (0, 0))
    seen: list[bytes] = []
    time.sleep(0.5)
    report = store.work(lambda claim: seen.append(claim.read_bytes()), lease=0.4, drain=True)
    assert seen == [b"orphan"]
    assert report.done == 1
    assert store_entries(store) == []


def test_a_worker_stopped_from_another_thread_lets_its_handlers_finish(
    store: FileStore,
) -> None:
    for i in range(20):
        store.add(b"%d" % i)
    started = threading.Event()

    def handler(claim: Claim) -> None:
        started.set()
        time.sleep(0.3)

    worker = store.worker(handler, workers=2)
    threading.Timer(0.1, worker.stop).start()
    report = worker.run()
    assert started.is_set()
    assert report.done == 2  # the two that were running
    assert report.cancelled == 0
    assert len(store.list("new")) == 18
    assert store.list("cur") == []


def test_an_error_of_the_runner_lets_the_running_handlers_end(
    store: FileStore, trace: Recorder
) -> None:
    # The claim of a second message fails while the first one's handler
    # runs: that handler ends and its message is finished, never given back
    # to be handled again; then the error is raised.
    first = store.add(b"first")
    second = store.add(b"second")
    trace.fail("rename", errno.EACCES, when=lambda call: call.args[0].endswith("/" + second))
    handled = []

    def handler(claim: Claim) -> None:
        time.sleep(0.5)
        handled.append(claim.name)

    worker = store.worker(handler, workers=2, drain=True)
    with pytest.raises(PermissionError):
        worker.run()
    assert handled == [first]
    report = worker.report
    assert (report.done, report.failed, report.lost, report.cancelled) == (1, 0, 0, 0)
    assert store_entries(store) == [f"new/{second}"]


def _claims_of(store: FileStore, *bodies: bytes) -> Callable[[bytes], Callable[[Any], bool]]:
    """Messages with these bodies; ``is_(body)`` matches a call on the
    path its claim has, once claimed (for faults)."""
    for body in bodies:
        store.add(body)
    return lambda body: (
        lambda call: os.path.basename(str(call.args[0])).startswith(
            tuple(os.path.basename(p) for p in store.list("cur") if Path(p).read_bytes() == body)
            or ("\0",)
        )
    )


def test_a_failed_settling_after_an_error_of_the_runner_spares_the_other_jobs(
    store: FileStore, trace: Recorder
) -> None:
    # The runner fails (a claim refused), then one job's finish fails too:
    # the other running job's message is finished all the same, and the
    # first error is the one raised.
    is_ = _claims_of(store, b"a", b"b", b"c")
    trace.fail("rename", errno.EACCES, when=lambda call: _body_in_new(call) == b"c")
    trace.fail("unlink", errno.EIO, when=is_(b"a"))

    def handler(claim: Claim) -> None:
        time.sleep(0.3 if claim.read_bytes() == b"a" else 0.6)

    worker = store.worker(handler, workers=3, drain=True)
    with pytest.raises(PermissionError):
        worker.run()
    assert (worker.report.done, worker.report.cancelled) == (1, 0)
    assert contents(store, "new") == [b"c"]
    assert contents(store, "cur") == [b"a"]  # its finish failed: for recover()


def _body_in_new(call: Any) -> bytes | None:
    path = str(call.args[0])
    return Path(path).read_bytes() if "/new/" in path and os.path.isfile(path) else None


def _a_runs_while_b_is_refused(
    store: FileStore, trace: Recorder, busy: float
) -> tuple[threading.Event, Callable[[Claim], None]]:
    """Messages a and b; the claim of b is refused (an error of the runner)
    while a's handler runs ``busy`` seconds: (a's start, the handler)."""
    _claims_of(store, b"a", b"b")
    trace.fail("rename", errno.EACCES, when=lambda call: _body_in_new(call) == b"b")
    started = threading.Event()

    def handler(claim: Claim) -> None:
        started.set()
        time.sleep(busy)

    return started, handler


@pytest.mark.parametrize("how", ["stop", "interrupt"])
def test_a_first_stop_after_an_error_of_the_runner_lets_the_jobs_finish(
    store: FileStore, trace: Recorder, how: str
) -> None:
    # The runner already stops as a first stop does: a stop or a Ctrl-C
    # then is that first one, not the second that cancels; a Ctrl-C is
    # raised with the runner's error as its cause.
    started, handler = _a_runs_while_b_is_refused(store, trace, 1.0)
    worker = store.worker(handler, workers=2, drain=True)

    def stop_once_running() -> None:
        started.wait(10)
        time.sleep(0.2)
        if how == "stop":
            worker.stop()
        else:
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)

    threading.Thread(target=stop_once_running).start()
    expected = PermissionError if how == "stop" else KeyboardInterrupt
    with pytest.raises(expected) as info:
        worker.run()
    if how == "interrupt":
        assert isinstance(info.value.__cause__, PermissionError)
    assert (worker.report.done, worker.report.cancelled) == (1, 0)
    assert contents(store, "new") == [b"b"]
    assert store.list("cur") == []


def test_a_failed_give_back_leaves_the_others_to_go_back(store: FileStore, trace: Recorder) -> None:
    # A second stop gives the running messages back; one give-back fails:
    # the others still go back and every lease renewal stops.
    is_ = _claims_of(store, b"a", b"b", b"c")
    for call in ("rename", "renameat2", "link"):
        trace.fail(call, errno.EIO, when=is_(b"a"))
    running = threading.Semaphore(0)

    def handler(claim: Claim) -> None:
        running.release()
        time.sleep(1.0)

    before = threading.active_count()
    worker = store.worker(handler, workers=3, lease=30)

    def stop_twice() -> None:
        for _ in range(3):
            running.acquire(timeout=10)
        worker.stop()
        worker.stop()

    threading.Thread(target=stop_twice).start()
    with pytest.raises(OSError) as info:
        worker.run()
    assert info.value.errno == errno.EIO
    assert (worker.report.done, worker.report.cancelled) == (0, 2)
    assert contents(store, "new") == [b"b", b"c"]
    assert contents(store, "cur") == [b"a"]
    time.sleep(1.2)  # the handlers' threads end
    assert threading.active_count() == before


def test_a_job_that_cannot_tell_how_it_ended_has_failed(tmp_path: Path) -> None:
    # A Job whose result() raises: its claim is released as a failure (no
    # loop asking it again and again), and the error is in the report.
    from atomstore._work import Worker

    store = FileStore(tmp_path / "s", durable=False, max_attempts=1)
    store.prepare()
    store.add(b"x")

    class Broken:
        def result(self) -> bool | None:
            raise RuntimeError("lost track")

        def cancel(self) -> None:
            pass

    worker = Worker(store, lambda claim: Broken(), drain=True)
    with deadline(10):
        report = worker.run()
    assert (report.done, report.failed) == (0, 1)
    assert [type(e) for _, e in report.errors] == [RuntimeError]
    assert contents(store, "dead") == [b"x"]


def _press_ctrl_c(after: Callable[[float], object], times: int) -> None:
    """From another thread, once ``after(10)`` returns: ``times`` Ctrl-Cs to
    the main thread, 0.1 s apart."""

    def press() -> None:
        after(10)
        for _ in range(times):
            time.sleep(0.1)
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)

    threading.Thread(target=press).start()


def test_a_second_interrupt_after_an_error_of_the_runner_keeps_it(
    store: FileStore, trace: Recorder
) -> None:
    # Two Ctrl-Cs after a claim failed: the running handler's message goes
    # back, uncounted, and the interrupt is raised with the error as cause.
    started, handler = _a_runs_while_b_is_refused(store, trace, 0.6)
    _press_ctrl_c(started.wait, 2)
    worker = store.worker(handler, workers=2, drain=True)
    with pytest.raises(KeyboardInterrupt) as info:
        worker.run()
    assert isinstance(info.value.__cause__, PermissionError)
    assert (worker.report.done, worker.report.cancelled) == (0, 1)
    assert contents(store, "new") == [b"a", b"b"]


def test_a_third_interrupt_leaves_no_lease_renewed(store: FileStore) -> None:
    # The second Ctrl-C waits for the handlers to return; a third ends the
    # wait: their claims stay for recover(), no longer renewed.
    _claims_of(store, b"a", b"b")
    started = threading.Barrier(3)

    def handler(claim: Claim) -> None:
        started.wait(10)
        time.sleep(1.0)

    _press_ctrl_c(started.wait, 3)
    worker = store.worker(handler, workers=2, lease=1.5)
    with pytest.raises(KeyboardInterrupt):
        worker.run()
    time.sleep(2.0)  # the handlers returned; the leases ran out
    assert [t.name for t in threading.enumerate() if "keep_alive" in t.name] == []
    assert len(store.list("cur")) == 2
    assert len(store.recover(1.5)) == 2
    assert contents(store, "new") == [b"a", b"b"]


def test_a_keyboard_interrupt_stops_claiming_and_leaves_nothing_claimed(
    store: FileStore,
) -> None:
    for i in range(20):
        store.add(b"%d" % i)

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.25)
    try:
        with pytest.raises(KeyboardInterrupt):
            store.work(lambda claim: time.sleep(0.1), workers=2)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert store.list("cur") == []
    assert 2 <= 20 - len(store.list("new")) <= 10


@pytest.mark.parametrize(
    ("options", "error"),
    [({"workers": 0}, ValueError), ({"lease": -1}, ValueError), ({"workers": 1.5}, ValueError)],
)
def test_work_refuses_bad_options(store: FileStore, options: dict[str, Any], error: type) -> None:
    with pytest.raises(error):
        store.work(lambda claim: None, drain=True, **options)


# -- the command ------------------------------------------------------------------


def work(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COMMAND, "work", *args], capture_output=True, text=True, timeout=timeout
    )


def test_the_command_runs_each_message_with_its_path(store: FileStore, tmp_path: Path) -> None:
    for i in range(6):
        store.add(f"m{i}".encode())
    log = tmp_path / "log"
    script = f'printf "%s\\n" "$(cat "$1")" >> {log}'  # one write: whole lines
    proc = work(store.path, "-j", "3", "--drain", "--", "sh", "-c", script, "sh", "{}")
    assert proc.returncode == 0, proc.stderr
    assert sorted(log.read_text().split()) == [f"m{i}" for i in range(6)]
    assert proc.stderr == "atomstore: work: 6 done, 0 failed, 0 lost, 0 given back\n"
    assert store_entries(store) == []


def test_the_path_is_appended_where_no_braces_appear(store: FileStore, tmp_path: Path) -> None:
    name = store.add(b"x")
    copies = tmp_path / "copies"
    copies.mkdir()
    proc = work(store.path, "--drain", "--quiet", "--", "cp", "-t", str(copies))
    assert (proc.returncode, proc.stderr) == (0, "")
    (copy,) = copies.iterdir()
    assert copy.name.startswith(f"{name}:1,")  # the claimed file, by its path
    assert copy.read_bytes() == b"x"


def test_a_command_that_always_fails_goes_dead_after_its_attempts(store: FileStore) -> None:
    store.add(b"x")
    proc = work(store.path, "--drain", "--quiet", "--max-attempts", "3", "--", "false")
    assert (proc.returncode, proc.stderr) == (4, "")
    (dead,) = store.list("dead")
    assert dead.endswith(":1,A3")


def test_the_command_reads_its_message_on_stdin(store: FileStore, tmp_path: Path) -> None:
    store.add(b"hello")
    log = tmp_path / "log"
    proc = work(store.path, "--drain", "--stdin", "--quiet", "--", "sh", "-c", f"cat > {log}")
    assert proc.returncode == 0, proc.stderr
    assert log.read_bytes() == b"hello"


def test_failures_release_wait_and_go_dead(store: FileStore) -> None:
    store.add(b"bad")
    store.add(b"good")
    proc = work(
        store.path,
        "--drain",
        "--max-attempts",
        "2",
        "--retry-delay",
        "0.2",
        "--",
        "sh",
        "-c",
        'test "$(cat "$1")" = good',
        "sh",
    )
    assert proc.returncode == 4, proc.stderr
    assert "1 done, 2 failed" in proc.stderr
    assert contents(store, "dead") == [b"bad"]
    assert store.list("new") == store.list("cur") == store.list("delay") == []


def _start(store: FileStore, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*COMMAND, "work", store.path, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(condition: object, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_lets_the_running_commands_finish(
    store: FileStore, tmp_path: Path, signum: int, status: int
) -> None:
    for i in range(10):
        store.add(b"%d" % i)
    marks = tmp_path / "marks"
    marks.mkdir()
    runner = _start(store, "-j", "2", "--", "sh", "-c", f"touch {marks}/$$; sleep 1", "sh")
    _wait_for(lambda: len(os.listdir(marks)) == 2)
    runner.send_signal(signum)
    _, err = runner.communicate(timeout=30)
    assert runner.returncode == status
    assert "2 done, 0 failed, 0 lost, 0 given back" in err
    assert len(store.list("new")) == 8
    assert store.list("cur") == []


def test_a_second_signal_gives_the_running_messages_back(store: FileStore, tmp_path: Path) -> None:
    for i in range(4):
        store.add(b"%d" % i)
    marks = tmp_path / "marks"
    marks.mkdir()
    runner = _start(store, "-j", "2", "--", "sh", "-c", f"touch {marks}/$$; sleep 30", "sh")
    _wait_for(lambda: len(os.listdir(marks)) == 2)
    runner.send_signal(signal.SIGINT)
    time.sleep(0.2)
    runner.send_signal(signal.SIGINT)
    started = time.monotonic()
    _, err = runner.communicate(timeout=30)
    assert time.monotonic() - started < 10  # the sleeps were stopped
    assert runner.returncode == 130
    assert "0 done, 0 failed, 0 lost, 2 given back" in err
    names = [os.path.basename(p) for p in store.list("new")]
    assert len(names) == 4
    assert all(":" not in n for n in names)  # given back uncounted
    assert store.list("cur") == []


def test_the_command_renews_leases_of_long_commands(store: FileStore) -> None:
    store.add(b"long")
    runner = _start(store, "--lease", "0.6", "--drain", "--", "sh", "-c", "sleep 1.5", "sh")
    recovered = []
    while runner.poll() is None:
        recovered += FileStore(store.path, durable=False).recover(0.6)
        time.sleep(0.05)
    _, err = runner.communicate()
    assert runner.returncode == 0, err
    assert recovered == []
    assert "1 done" in err
    assert store_entries(store) == []


def test_progress_shows_on_a_terminal(store: FileStore) -> None:
    for i in range(3):
        store.add(b"%d" % i)
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.run(
            [*COMMAND, "work", store.path, "--drain", "--", "sh", "-c", "sleep 0.4", "sh"],
            stderr=terminal,
            stdout=subprocess.DEVNULL,
            timeout=60,
        )
        os.close(terminal)
        terminal = -1
        shown = b""
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # EIO: the terminal's other end closed
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(controller)
        if terminal >= 0:
            os.close(terminal)
    assert proc.returncode == 0
    assert b"\rdone " in shown
    assert b"3 done, 0 failed" in shown


def test_the_command_needs_a_command(store: FileStore) -> None:
    proc = work(store.path, "--drain")
    assert proc.returncode == 2
    assert "name the COMMAND" in proc.stderr


@pytest.mark.parametrize("signum", [None, signal.SIGTERM])
def test_an_error_of_the_runner_lets_the_running_commands_finish(
    store: FileStore, tmp_path: Path, signum: int | None
) -> None:
    # As a first signal does: the command running when a claim fails ends,
    # its message is finished, and the summary comes before the error.  A
    # signal then is that first one, not the second that stops commands;
    # the error decides the exit status.
    store.add(b"first")
    second = store.add(b"second")
    marker = tmp_path / "marker"
    script = f"""
import errno, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from tracing import Recorder
from atomstore import _cli, _syscalls
recorder = Recorder()
recorder.fail("rename", errno.EACCES, when=lambda call: call.args[0].endswith("/{second}"))
_syscalls.set_tracer(recorder)
sys.exit(_cli.main(["work", "--no-sync", "-j", "2", "--drain", {store.path!r}, "--",
                    "sh", "-c", "echo start >> {marker}; sleep 1.5; echo done >> {marker}"]))
"""
    runner = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    if signum is not None:
        _wait_for(lambda: marker.exists())
        runner.send_signal(signum)
    _, err = runner.communicate(timeout=60)
    assert runner.returncode == 1, err
    assert marker.read_text() == "start\ndone\n"
    lines = err.splitlines()
    assert lines[0] == "atomstore: work: 1 done, 0 failed, 0 lost, 0 given back", lines
    assert "Permission denied" in lines[1], lines
    assert store_entries(store) == [f"new/{second}"]


def test_commands_and_handlers_start_with_no_signal_blocked(
    store: FileStore, tmp_path: Path
) -> None:
    # A command started with SIGTERM blocked ignores the second stop's
    # SIGTERM (and its children inherit that); a handler's thread likewise.
    store.add(b"x")
    store.add(b"y")
    masks = tmp_path / "masks"
    script = (
        "import signal; blocked = signal.pthread_sigmask(signal.SIG_BLOCK, []); "
        f"open({str(masks)!r}, 'a').write(repr(sorted(blocked)) + chr(10))"
    )
    proc = work(store.path, "--drain", "--", sys.executable, "-c", script)
    assert proc.returncode == 0, proc.stderr
    store.add(b"z")
    store.work(lambda claim: exec(script), drain=True)
    assert masks.read_text().splitlines() == ["[]", "[]", "[]"]


def test_a_command_that_cannot_start_gives_its_message_back(store: FileStore) -> None:
    store.add(b"x")
    proc = work(store.path, "--drain", "--", "/nonexistent/program")
    assert proc.returncode == 1
    assert "/nonexistent/program" in proc.stderr
    assert len(store.list("new")) == 1
    assert store.list("cur") == []
