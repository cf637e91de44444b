"""The command through ordinary shell plumbing: closed and full outputs,
pipes whose reader left, odd names, bad durations and signals.

Every test runs the real command in a subprocess, with real descriptors:
``/dev/full``, a closed descriptor 1, a pipe with no reader.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from atomstore import FileStore
from fstree import listing, store_entries

COMMAND = [sys.executable, "-m", "atomstore"]


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    spool = FileStore(tmp_path / "spool", durable=False)
    spool.prepare()
    return spool


def run(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*COMMAND, *args], input=stdin, capture_output=True, timeout=60)


def run_with_stdout_closed(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """The command started as ``atomstore ARGS >&-``."""
    script = 'exec "$@" >&-'
    return subprocess.run(
        ["sh", "-c", script, "sh", *COMMAND, *args],
        input=stdin,
        stderr=subprocess.PIPE,
        timeout=60,
    )


def run_into(target: str, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    with open(target, "wb") as out:
        return subprocess.run(
            [*COMMAND, *args], input=stdin, stdout=out, stderr=subprocess.PIPE, timeout=60
        )


def run_into_a_pipe_nobody_reads(*args: str) -> subprocess.CompletedProcess[bytes]:
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [*COMMAND, *args], stdout=write_end, stderr=subprocess.PIPE, timeout=60
        )
    finally:
        os.close(write_end)


def one_error_line(proc: subprocess.CompletedProcess[bytes], *named: str) -> str:
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 1, (proc.returncode, err)
    assert "Traceback" not in err, err
    assert err.count("\n") == 1, err
    for text in named:
        assert text in err, (text, err)
    return err


# -- take gives back what it could not hand on --------------------------------


def test_take_with_standard_output_closed_claims_nothing(store: FileStore) -> None:
    name = store.add(b"work")
    proc = run_with_stdout_closed("take", store.path)
    one_error_line(proc, "standard output")
    assert store_entries(store) == [f"new/{name}"]


@pytest.mark.parametrize("attempts", [0, 2])
def test_take_into_a_full_disk_gives_the_claim_back(store: FileStore, attempts: int) -> None:
    name = store.add(b"work")
    for _ in range(attempts):
        claim = store.claim()
        assert claim is not None
        claim.release()
    before = store_entries(store)
    proc = run_into("/dev/full", "take", store.path)
    one_error_line(proc, "standard output", os.strerror(28), "given back")
    # Back under the very name it had: no attempt was counted.
    assert store_entries(store) == before
    assert before[0].startswith(f"new/{name}")


def test_take_into_a_pipe_whose_reader_left_gives_the_claim_back(store: FileStore) -> None:
    name = store.add(b"work")
    proc = run_into_a_pipe_nobody_reads("take", store.path)
    one_error_line(proc, "standard output", "given back")
    assert store_entries(store) == [f"new/{name}"]


# -- put says what it delivered ------------------------------------------------


def test_put_into_a_full_disk_names_what_it_delivered(store: FileStore) -> None:
    proc = run_into("/dev/full", "put", store.path, stdin=b"payload")
    err = one_error_line(proc, "delivered", "standard output")
    [name] = [os.path.basename(p) for p in store.list("new")]
    assert name in err


def test_put_with_standard_output_closed_delivers_nothing(store: FileStore) -> None:
    proc = run_with_stdout_closed("put", store.path, stdin=b"payload")
    one_error_line(proc, "standard output")
    assert store_entries(store) == []


# -- any name round-trips --------------------------------------------------------


def test_null_separated_names_round_trip(tmp_path: Path, store: FileStore) -> None:
    odd = [b"0-line\nbreak", b"1-caf\xe9", b"2-tab\there"]
    for raw in odd:
        with open(os.path.join(os.fsencode(store.path), b"new", raw), "wb") as f:
            f.write(raw)
    listed = run("ls", "-0", store.path)
    assert listed.returncode == 0
    new = os.path.join(os.fsencode(store.path), b"new")
    assert listed.stdout == b"".join(os.path.join(new, raw) + b"\0" for raw in odd)
    taken = []
    for _ in odd:
        proc = run("take", "--null", store.path)
        assert proc.returncode == 0, proc
        assert proc.stdout.endswith(b"\0")
        path = proc.stdout[:-1]
        with open(path, "rb") as f:
            taken.append(f.read())
        done = subprocess.run([*COMMAND, "done", store.path, os.fsdecode(path)], timeout=60)
        assert done.returncode == 0
    assert taken == odd
    (tmp_path / "a").write_bytes(b"A")
    put = run("put", "-0", store.path, str(tmp_path / "a"), "-", stdin=b"B")
    assert put.returncode == 0
    names = put.stdout.split(b"\0")
    assert names[-1] == b""
    assert sorted(os.fsencode(n) for n in os.listdir(store.path + "/new")) == sorted(names[:-1])


# -- one-line errors -----------------------------------------------------------


def test_huge_durations_mean_for_ever_or_everything_old(store: FileStore) -> None:
    assert run("recover", "--older-than", "inf", store.path).returncode == 0
    assert run("clean", "--older-than", "inf", store.path).returncode == 0
    assert run("recover", "--older-than", "300000000000d", store.path).returncode == 0
    waiting = subprocess.Popen(
        [*COMMAND, "take", "--wait", "300000000000d", store.path],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        time.sleep(1.0)
        assert waiting.poll() is None  # still waiting, no traceback
        store.add(b"at last")
        out, err = waiting.communicate(timeout=10)
    finally:
        if waiting.returncode is None:
            waiting.kill()
            waiting.wait()
    assert waiting.returncode == 0, err
    assert out.startswith(os.fsencode(store.path + "/cur/"))


@pytest.mark.parametrize("value", ["-5m", "-1", "-.5"])
def test_a_negative_duration_says_so(store: FileStore, value: str) -> None:
    for args in (["recover", "--older-than", value], ["take", "--wait", value]):
        proc = run(*args, store.path)
        err = proc.stderr.decode()
        assert proc.returncode == 2, err
        assert "must not be negative" in err.splitlines()[-1]
        assert "expected one argument" not in err


def test_missing_store_hint_everywhere(tmp_path: Path) -> None:
    missing = str(tmp_path / "nowhere")
    for args in (["clean"], ["recover", "--older-than", "1h"], ["ls"], ["take"], ["stat"]):
        proc = run(args[0], *args[1:], missing)
        one_error_line(proc, "is the store prepared?")


@pytest.mark.parametrize(
    "args",
    [
        ["write", "--overwrit", "{dir}/x"],
        ["take", "--wai", "1", "{dir}"],
        ["ls", "--no-sync", "{dir}"],
        ["stat", "--no-sync", "{dir}"],
    ],
)
def test_options_are_never_abbreviated_nor_offered_where_meaningless(
    store: FileStore, args: list[str]
) -> None:
    proc = run(*(a.format(dir=store.path) for a in args))
    assert proc.returncode == 2, proc
    assert "unrecognized arguments" in proc.stderr.decode()
    assert not os.path.exists(os.path.join(store.path, "x"))


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_write_to_standard_output_in_a_pipe_explains_itself(
    tmp_path: Path, overwrite: list[str]
) -> None:
    proc = subprocess.run(
        ["sh", "-c", 'echo hi | "$@" | cat', "sh", *COMMAND, "write", *overwrite, "/dev/stdout"],
        capture_output=True,
        timeout=60,
    )
    err = proc.stderr.decode()
    assert "/dev/stdout" in err
    assert "/proc/" not in err
    assert "cat" in err
    assert "--overwrite replaces" not in err
    assert err.count("\n") == 1


# -- interrupted commands leave nothing ----------------------------------------


def _run_time(argv: list[str], stdin: Path | None) -> float:
    """How long the command takes, uninterrupted (the median of three)."""
    times = []
    for _ in range(3):
        with open(stdin or os.devnull, "rb") as source:
            started = time.monotonic()
            subprocess.run(argv, stdin=source, capture_output=True, check=True, timeout=60)
        times.append(time.monotonic() - started)
    return sorted(times)[1]


def _signals_at_random(
    argv: list[str], stdin: Path, runs: int, rng: random.Random, window: tuple[float, float]
) -> Iterator[int]:
    for _ in range(runs):
        with open(stdin, "rb") as source:  # a file: the command reads at its pace
            proc = subprocess.Popen(
                argv, stdin=source, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
        # From about when the command's handlers are in place to its end.
        time.sleep(rng.uniform(*window))
        signum = rng.choice([signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
        try:
            proc.send_signal(signum)
        except ProcessLookupError:
            pass
        yield proc.wait(timeout=60)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["write", "put"])
def test_interrupted_commands_leave_nothing_behind(
    tmp_path: Path, store: FileStore, command: str
) -> None:
    rng = random.Random(1)
    payload = tmp_path / "payload"
    payload.write_bytes(os.urandom(16 << 20))  # tens of milliseconds of work to land in
    statuses: dict[int, int] = {}
    dest_dir = tmp_path / "dest"
    dest_dir.mkdir()
    started = _run_time([*COMMAND, "ls", store.path], None)  # start-up, little work
    if command == "write":
        longest = _run_time([*COMMAND, "write", "--overwrite", str(tmp_path / "timed")], payload)
    else:
        longest = _run_time([*COMMAND, "put", store.path], payload)
        for path in store.list("new"):
            os.unlink(path)
    window = (started * 0.9, longest * 1.1)
    for i in range(150):
        if command == "write":
            argv = [*COMMAND, "write", str(dest_dir / f"f{i}")]
        else:
            argv = [*COMMAND, "put", store.path]
        [status] = _signals_at_random(argv, payload, 1, rng, window)
        statuses[status] = statuses.get(status, 0) + 1
    # The signals did land while the command ran, its handlers in place.
    handled = sum(statuses.get(s, 0) for s in (130, 143, 129))
    print(f"{command}: exit statuses {sorted(statuses.items())}")
    assert handled >= 10, statuses
    assert [n for n in listing(dest_dir) if n.startswith(".")] == []
    assert store.list("tmp") == []
    assert [e for e in store_entries(store) if "/." in e] == []


# -- signals around a hand-off ---------------------------------------------------


def _take_signalled_as_it_claims(store: FileStore, signum: int, rng: random.Random) -> str:
    """Run ``take --wait``, deliver a message, signal ``take`` just as the
    message leaves new/ (or a moment later); say what became of it."""
    proc = subprocess.Popen(
        [*COMMAND, "take", store.path, "--wait", "60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    time.sleep(0.25)  # waiting by now
    store.add(b"work")
    cur = Path(store.path, "cur")
    deadline = time.monotonic() + 10
    while not any(cur.iterdir()) and time.monotonic() < deadline:
        pass
    time.sleep(rng.uniform(0, 0.002))
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=30)
    claimed = sorted(cur.iterdir())
    waiting = store.list("new")
    if proc.returncode == 0:
        # Handed on: the path it printed is the claim, and nothing else is.
        assert [os.fsencode(p) for p in claimed] == [out.rstrip(b"\n")], (out, claimed)
        outcome = "handed on"
    else:
        # Interrupted: the message is back in new/, whatever was printed.
        assert proc.returncode in (130, 143, 129), (proc.returncode, err)
        assert claimed == [], (out, err, claimed)
        assert len(waiting) == 1, waiting
        outcome = "given back"
    for leftover in [*claimed, *map(Path, waiting)]:
        leftover.unlink()
    return outcome


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_as_take_claims_never_strands_the_claim(store: FileStore, signum: int) -> None:
    rng = random.Random(signum)
    outcomes = [_take_signalled_as_it_claims(store, signum, rng) for _ in range(6)]
    assert outcomes  # each asserted the claim was handed on or given back


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_many_signals_as_take_claims_never_strand_a_claim(store: FileStore, signum: int) -> None:
    rng = random.Random(signum + 100)
    outcomes = [_take_signalled_as_it_claims(store, signum, rng) for _ in range(40)]
    assert set(outcomes) <= {"handed on", "given back"}


def test_put_checks_every_file_before_it_reads_standard_input(
    tmp_path: Path, store: FileStore
) -> None:
    proc = run("put", store.path, "-", str(tmp_path / "missing"), stdin=b"irreplaceable")
    one_error_line(proc, "missing")
    assert store_entries(store) == []
    proc = run("put", store.path, "-", "-", stdin=b"once")
    assert proc.returncode == 2
    assert "once" in proc.stderr.decode().splitlines()[-1]


def test_what_was_done_is_said_when_it_cannot_be_printed(store: FileStore) -> None:
    store.add(b"work")
    claim = store.claim()
    assert claim is not None
    proc = run_into("/dev/full", "release", store.path, claim.path)
    err = one_error_line(proc, "released to", "standard output")
    [back] = store.list("new")
    assert back in err


def test_errors_never_reach_standard_output(tmp_path: Path) -> None:
    proc = subprocess.run(
        ["sh", "-c", 'exec "$@" 2>&-', "sh", *COMMAND, "take", str(tmp_path / "none")],
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stdout == b""


def test_operands_after_a_double_dash_are_left_alone(tmp_path: Path, store: FileStore) -> None:
    (tmp_path / "--wait").write_bytes(b"a")
    (tmp_path / "-5").write_bytes(b"b")
    proc = subprocess.run(
        [*COMMAND, "put", store.path, "--", "--wait", "-5"],
        capture_output=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert proc.returncode == 0, proc
    contents = sorted(Path(p).read_bytes() for p in store.list("new"))
    assert contents == [b"a", b"b"]


def test_names_in_errors_stay_on_one_line(tmp_path: Path, store: FileStore) -> None:
    proc = run("put", store.path, str(tmp_path / "no\nsuch\xe9"))
    err = one_error_line(proc, "no\\nsuch")
    assert "\\xc3\\xa9" not in err  # é is UTF-8 here: shown as itself


# Modules a command must not pay for at start-up: each costs 1 to 6 ms, and
# a shell loop pays it per message.  (``re`` and ``locale`` stay: argparse
# and its gettext import them.)
_HEAVY_MODULES = (
    "ctypes",
    "dataclasses",
    "datetime",
    "hashlib",
    "json",
    "logging",
    "pathlib",
    "random",
    "shutil",
    "socket",
    "subprocess",
    "typing",
)


@pytest.mark.parametrize("command", ["put", "take", "write"])
def test_a_command_imports_nothing_it_does_not_use(store: FileStore, command: str) -> None:
    argv = {
        "put": ["put", "--no-sync", store.path, "-"],
        "take": ["take", "--no-sync", store.path],
        "write": ["write", "--no-sync", os.path.join(store.path, "out")],
    }[command]
    store.add(b"m")
    probe = (
        "import sys\n"
        "before = set(sys.modules)\n"
        "from atomstore._cli import main\n"
        f"status = main({argv!r})\n"
        f"loaded = sorted(set(sys.modules) - before & set({_HEAVY_MODULES!r}))\n"
        "print(status, *loaded, file=sys.stderr)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe], input=b"data", capture_output=True, timeout=60
    )
    assert proc.stderr.decode().split() == ["0"], proc.stderr.decode()
