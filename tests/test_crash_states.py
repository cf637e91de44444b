"""Crash states: what a crash of the machine may leave on disk, all of it checked.

Each workload (``crash_workloads.WORKLOADS``) runs once with every call
through the OS boundary recorded.  The calls are replayed on a model of the
directory (``crash_model``), and at every crash point, after each call,
every state the persistence model below allows is built, cleaned up as
after a reboot (``atomic.clean`` or ``FileStore.clean``, ``older_than=0``)
and checked: old or new, never torn; durable once returned; no message lost
or partial; no staging file left after the clean-up.

The persistence model:

* File data not yet fsynced may be lost, cut short, or zero-filled (the
  size reached the disk, the data did not).  Data up to 16 bytes is cut at
  every byte, longer data at its first and last byte, its middle and page
  boundaries.  An fsync of a file makes its data durable, not its name.
* Directory entries (create, rename, link, unlink, mkdir, rmdir) not yet
  made durable by an fsync of their directory may be lost, in any order
  consistent with the fsyncs that were made: an fsync of a directory makes
  durable every earlier change to that directory's entries.  Every subset
  of the changes not yet durable is a state, applied in program order.
* A rename inside one directory is one change: the old name goes when the
  new one comes.  A rename between two directories is two changes, the new
  name and the removal of the old one, each made durable by an fsync of its
  own directory; the removal never reaches the disk without the new name
  (a journaling filesystem commits them together, and an fsync of the
  source directory commits both).  So a crash may leave both names, never
  neither.
* What was fsynced survives.

Modes and owners are not modelled.  A workload's steps are a few calls
each; the enumeration is exhaustive for them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from atomstore import _syscalls
from crash_model import DropFsync, Exploration, Replay, Workload, explore, recording, scan
from crash_workloads import WORKLOADS

BY_NAME = {w.name: w for w in WORKLOADS}
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL
_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY


@pytest.fixture(scope="module")
def explored(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Exploration]:
    """Each workload's exploration, made once for the module."""
    cache: dict[str, Exploration] = {}

    def get(workload: Workload) -> Exploration:
        if workload.name not in cache:
            scratch = tmp_path_factory.mktemp("crash")
            cache[workload.name] = explore(workload, scratch)
        return cache[workload.name]

    for workload in WORKLOADS:
        get(workload)
    return cache


@pytest.mark.parametrize("name", list(BY_NAME))
def test_every_crash_state_is_old_or_new(explored: dict[str, Exploration], name: str) -> None:
    found = explored[name]
    assert found.violations == []
    assert found.states >= 2  # at least before and after
    assert found.crash_points == found.calls + 1


def test_crash_states_explored(explored: dict[str, Exploration]) -> None:
    summary = {name: (e.crash_points, e.states, e.checked) for name, e in explored.items()}
    total = sum(e.states for e in explored.values())
    print(f"\ndistinct crash states: {total}")
    for name, (points, states, checked) in summary.items():
        print(f"  {name}: {points} crash points, {states} states, {checked} checked")
    assert total >= 1000
    assert all(not e.violations for e in explored.values())


# -- the model itself -----------------------------------------------------------


def _states(root: Path, replay: Replay, point: int) -> list[dict[str, bytes | None]]:
    return sorted(replay.states(point), key=lambda s: sorted(s.items()))


def test_unsynced_data_may_be_lost_cut_or_zeroed(tmp_path: Path) -> None:
    with recording() as tracer:
        fd = _syscalls.open(str(tmp_path / "f"), _CREATE, 0o644)
        _syscalls.write(fd, b"ab")
        _syscalls.fsync(fd)
        _syscalls.close(fd)
        dir_fd = _syscalls.open(str(tmp_path), _DIRECTORY)
        _syscalls.fsync(dir_fd)
        _syscalls.close(dir_fd)
    replay = Replay(tmp_path, {})
    replay.replay(tracer.calls)
    written = {
        tuple(sorted(s.items()))
        for s in _states(tmp_path, replay, 2)  # after the write, nothing synced
    }
    assert written == {
        (),
        (("f", b""),),
        (("f", b"a"),),
        (("f", b"a\0"),),
        (("f", b"\0\0"),),
        (("f", b"ab"),),
    }
    assert _states(tmp_path, replay, 3) == [{}, {"f": b"ab"}]  # data synced, name not
    assert _states(tmp_path, replay, 6) == [{"f": b"ab"}]  # both synced


def test_a_rename_between_directories_never_loses_the_file(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "f").write_bytes(b"x")
    before = scan(tmp_path)
    with recording() as tracer:
        _syscalls.rename(str(tmp_path / "a" / "f"), str(tmp_path / "b" / "f"))
        fd = _syscalls.open(str(tmp_path / "a"), _DIRECTORY)
        _syscalls.fsync(fd)  # the source only: the new name comes with it
        _syscalls.close(fd)
    replay = Replay(tmp_path, before)
    replay.replay(tracer.calls)
    dirs: dict[str, bytes | None] = {"a": None, "b": None}
    old, new, both = (
        {**dirs, "a/f": b"x"},
        {**dirs, "b/f": b"x"},
        {**dirs, "a/f": b"x", "b/f": b"x"},
    )
    assert _states(tmp_path, replay, 1) == sorted([old, new, both], key=lambda s: sorted(s))
    assert _states(tmp_path, replay, 3) == [new]


def test_a_rename_in_one_directory_is_atomic(tmp_path: Path) -> None:
    (tmp_path / "old").write_bytes(b"1")
    (tmp_path / "tmp").write_bytes(b"2")
    before = scan(tmp_path)
    with recording() as tracer:
        _syscalls.rename(str(tmp_path / "tmp"), str(tmp_path / "old"))
    replay = Replay(tmp_path, before)
    replay.replay(tracer.calls)
    assert _states(tmp_path, replay, 1) == [{"old": b"1", "tmp": b"2"}, {"old": b"2"}]


# -- the checker bites: broken variants of the library are caught ---------------


def _files(path: str, is_dir: bool) -> bool:
    return not is_dir


def _directories(path: str, is_dir: bool) -> bool:
    return is_dir


def _new_area(path: str, is_dir: bool) -> bool:
    return is_dir and path.endswith("/store/new")


MUTANTS: list[tuple[str, DropFsync, str]] = [
    ("the file fsync removed", _files, "file: new, 3 writes"),
    ("the file fsync removed", _files, "write_bytes: new, then 2 overwrites"),
    ("the file fsync removed", _files, "folder: new"),
    ("the file fsync removed", _files, "store: add 2"),
    ("the file fsync removed", _files, "store: create, move tmp to new"),
    ("the directory fsync removed", _directories, "file: overwrite, text"),
    ("the directory fsync removed", _directories, "write_bytes: new, then 2 overwrites"),
    ("the directory fsync removed", _directories, "folder: overwrite by exchange"),
    ("the directory fsync removed", _directories, "store: claim, finish, claim, release"),
    ("the new/ fsync removed", _new_area, "store: add 2"),
    ("the new/ fsync removed", _new_area, "store: add_many 3"),
]


@pytest.mark.parametrize(
    ("mutant", "drop", "name"), MUTANTS, ids=[f"{m} in {n}" for m, _, n in MUTANTS]
)
def test_a_missing_fsync_is_caught(tmp_path: Path, mutant: str, drop: DropFsync, name: str) -> None:
    found = explore(BY_NAME[name], tmp_path, drop, until_violation=True)
    assert found.dropped_fsyncs, f"{mutant}: the workload made no such fsync"
    assert found.violations, f"{mutant} went unnoticed in {name}"
