"""The ``atomstore`` logger: what it says, and that it costs nothing unasked.

Each event the README lists is caught with ``caplog``; the hot path (add,
claim, read, finish) says nothing even at DEBUG; a program that never
imports :mod:`logging` does not get it imported; the command line shows
the records with ``-v`` and only then.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from atomstore import FileStore, _rename, _watch, atomic
from atomstore._rename import Capabilities, describe
from test_races import CAPS


@pytest.fixture
def log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="atomstore")
    return caplog


def messages(log: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in log.records if r.name == "atomstore"]


def prepared(path: Path, **options: object) -> FileStore:
    store = FileStore(path, durable=False, **options)  # type: ignore[arg-type]
    store.prepare()
    return store


def test_the_fallback_a_filesystem_gets_is_logged_once(
    tmp_path: Path, log: pytest.LogCaptureFixture, fresh_probe: None
) -> None:
    store = prepared(tmp_path)
    for _ in range(3):
        atomic.write_bytes(tmp_path / "f", b"x", overwrite=True)
        store.claim()
        atomic.capabilities(tmp_path)
    probed = [r for r in log.records if "renameat2" in r.getMessage()]
    assert len(probed) == 1  # one filesystem, probed once
    assert probed[0].levelname == "INFO"
    assert probed[0].getMessage().endswith(f": {describe(atomic.capabilities(tmp_path))}")


@pytest.mark.parametrize(
    ("caps_name", "words"),
    [
        ("native", "renameat2 flags honoured: no-clobber renames and exchanges are native"),
        ("links", "no renameat2 flags: no-clobber renames by link then unlink"),
        ("nolinks", "by a check then a plain rename (a name made meanwhile can be replaced)"),
        ("dropped", "accepts renameat2 flags but ignores them, so it never gets any"),
    ],
)
def test_each_capability_set_is_described(caps_name: str, words: str) -> None:
    assert words in describe(CAPS[caps_name])


def test_a_missing_exchange_is_described() -> None:
    words = describe(Capabilities(noreplace=True, exchange=False, hardlinks=True))
    assert words.startswith("no RENAME_EXCHANGE: no-clobber renames are native")


def test_a_directory_where_no_probe_runs_is_logged_at_debug(
    tmp_path: Path,
    log: pytest.LogCaptureFixture,
    fresh_probe: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_rename, "_probe", lambda directory: None)  # not writable
    _rename.capabilities(str(tmp_path))
    [record] = log.records
    assert record.levelname == "DEBUG"
    assert record.getMessage().startswith(f"{tmp_path}: no probe could run (not writable)")


def test_recoveries_and_dead_letters_are_logged(
    tmp_path: Path, log: pytest.LogCaptureFixture
) -> None:
    store = prepared(tmp_path, max_attempts=2)
    name = store.add(b"poison")
    store.claim()
    time.sleep(0.002)
    [back] = store.recover(older_than=0)
    assert any(
        m.startswith(f"recovered {tmp_path}/cur/{name}:") and m.endswith(f"now {back}")
        for m in messages(log)
    )
    store.claim()
    time.sleep(0.002)
    [dead] = store.recover(older_than=0)
    assert f"{dead}: 2 attempts spent, a dead letter now" in messages(log)


def test_what_clean_removed_is_logged(tmp_path: Path, log: pytest.LogCaptureFixture) -> None:
    store = prepared(tmp_path)
    (tmp_path / "tmp" / "left-by-a-crash").write_bytes(b"x")
    [removed] = store.clean(older_than=0)
    assert f"clean() removed {removed}" in messages(log)


def test_a_wait_that_polls_says_so(
    tmp_path: Path, log: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_watch, "_inotify_lib", lambda: None)
    store = prepared(tmp_path)
    assert store.claim(wait=0.01) is None
    assert f"{tmp_path}/new: waiting polls every 0.5 s (no inotify)" in messages(log)


def test_a_swap_of_new_is_logged(
    tmp_path: Path, log: pytest.LogCaptureFixture, eager: None
) -> None:
    store = prepared(tmp_path)
    assert store.claim() is None
    assert any(
        m.startswith(f"{tmp_path}/new: emptied,") and "swapped for a fresh one" in m
        for m in messages(log)
    )


def test_the_hot_path_says_nothing(tmp_path: Path, log: pytest.LogCaptureFixture) -> None:
    store = prepared(tmp_path)
    store.claim()  # the probe, once
    log.clear()
    for _ in range(20):
        store.add(b"m")
        claim = store.claim()
        assert claim is not None
        claim.read_bytes()
        claim.finish()
        atomic.write_bytes(tmp_path / "f", b"x", overwrite=True)
    assert messages(log) == []


def test_a_program_without_logging_does_not_get_it(tmp_path: Path) -> None:
    program = (
        "import sys\n"
        "from atomstore import FileStore, atomic\n"
        f"s = FileStore({str(tmp_path)!r}, max_attempts=1)\n"
        "s.prepare(); s.add(b'm'); s.claim(); s.recover(older_than=0); s.clean(older_than=0)\n"
        f"atomic.write_bytes({str(tmp_path / 'f')!r}, b'x')\n"
        "print('logging' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, check=True
    ).stdout
    assert out == "False\n"


def atomstore(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "atomstore", *args], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("where", ["before", "after"])
def test_the_command_shows_the_log_with_verbose(tmp_path: Path, where: str) -> None:
    store = prepared(tmp_path / "s")
    store.add(b"m")
    store.claim()
    time.sleep(0.002)
    args = ["recover", "--older-than", "0", store.path]
    quiet = atomstore(*args)
    assert (quiet.returncode, quiet.stderr) == (0, "")
    store.claim()
    time.sleep(0.002)
    loud = atomstore("-v", *args) if where == "before" else atomstore(*args[:1], "-v", *args[1:])
    assert loud.returncode == 0
    lines = loud.stderr.splitlines()
    assert any(line.startswith(f"atomstore: recovered {store.path}/cur/") for line in lines)
    assert all(line.startswith("atomstore: ") for line in lines)
    assert "no probe" not in loud.stderr  # DEBUG needs -vv
