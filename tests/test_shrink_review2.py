"""What a second adversarial review of the swap of an emptied new/ found.

Each test failed on the reviewed code.  Fixed: a batch's link (and a
replacing move) into an old new/ removed under it is tried again in the
fresh one; a waiter no longer spins when the store was moved aside after a
swap; an immutable new/ is not swapped (and leaves nothing behind); stats()
counts what an old new/ holds for a consumer that may not move it back; a
durable publish syncs an old new/ its entry may have reached; a foreign
name too long for its info part is moved back whole.  Left, and documented:
``trusted.*`` attributes, which only root can list, are not kept when
another user's consumer swaps.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from atomstore import FileStore, _shrink
from needs import need_root
from tracing import Recorder

HIDDEN = _shrink.SHRINK_NAME


def prepared(path: Path, **options: object) -> FileStore:
    store = FileStore(path, durable=False, **options)  # type: ignore[arg-type]
    store.prepare()
    return store


# -- R1: add_many()/batch links into a removed old new/ are not retried ------


def test_r1_add_many_into_a_removed_new_tries_the_fresh_one(
    tmp_path: Path, trace: Recorder
) -> None:
    """add() got the retry of its link (a link that met the old new/ removed
    under it); a batch's link of the same unnamed file did not."""
    store = prepared(tmp_path)
    trace.fail("link_fd", errno.ENOENT)  # as add()'s own test of the fix
    names = store.add_many([b"a", b"b"])
    assert sorted((tmp_path / "new" / n).read_bytes() for n in names) == [b"a", b"b"]


# -- R2: a waiter spins once its look-again time passed and new/ is missing --


@pytest.mark.parametrize("swapped", [True, False])
def test_r2_waiter_spins_when_store_moved_aside_after_a_swap(tmp_path: Path, swapped: bool) -> None:
    """A consumer waiting while an old new/ settles is told to look again at
    a set time (look_again_at); a store moved aside then (waited for, by
    design, until prepared again) never reaches _finish_shrink, so that
    time stays in the past and every wait returns at once: a busy loop."""
    import threading

    store_dir = tmp_path / "s"
    store = prepared(store_dir)
    if swapped:  # a swap just made (default GRACE and look intervals)
        assert _shrink.shrink(str(store_dir), str(store_dir / "new"), durable=False)
    import resource

    def move_aside() -> None:
        time.sleep(0.1)
        os.rename(store_dir, tmp_path / "aside")

    threading.Thread(target=move_aside).start()
    before = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.monotonic()
    assert store.claim(wait=4) is None
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert cpu < 0.3 * wall, f"{cpu:.2f} s of CPU in {wall:.2f} s of waiting"


# -- R3: metadata of new/ the twin does not keep --------------------------------

ALICE = 1000


@pytest.fixture
def top():  # type: ignore[no-untyped-def]
    path = Path(tempfile.mkdtemp(prefix="atomstore-review2-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    subprocess.run(["chattr", "-R", "-i", "-a", str(path)], capture_output=True)
    shutil.rmtree(path, ignore_errors=True)


def _warm(top: Path) -> None:
    w = prepared(top / "warm")
    w.add(b"x")
    w.claim().finish()  # type: ignore[union-attr]
    w.claim(wait=0.01)


def test_r3b_immutable_new_leaves_an_undeletable_hidden_dir(tmp_path: Path, eager: None) -> None:
    """chattr +i new/ (an operator freezing the queue): the twin gets the
    flag before fchmod, which then fails (EPERM); the abort's rmdir of an
    immutable directory fails too: the hidden name is held for good, so no
    swap is ever made again in any process, even after chattr -i new/."""
    store = prepared(tmp_path)
    subprocess.run(["chattr", "+i", str(tmp_path / "new")], check=True)
    try:
        assert store.claim() is None
        left = os.path.lexists(tmp_path / HIDDEN)
        flags = subprocess.run(
            ["lsattr", "-d", str(tmp_path / HIDDEN)], capture_output=True, text=True
        ).stdout
    finally:
        subprocess.run(["chattr", "-i", str(tmp_path / "new")], check=True)
    ino = os.lstat(tmp_path / "new").st_ino
    time.sleep(0.1)
    assert FileStore(tmp_path, durable=False).claim() is None  # another process, later
    try:
        assert not left, f"hidden dir left behind: {flags.strip()}"
        assert os.lstat(tmp_path / "new").st_ino != ino  # swapped at last
    finally:
        subprocess.run(["chattr", "-i", str(tmp_path / HIDDEN)], capture_output=True)


# -- R8: stats()/list('new') of a user who cannot write the store miss a stopped swap --


def test_r8_monitor_without_write_permission_sees_an_empty_new(top: Path) -> None:
    """F4 made stats() and list('new') finish a stopped swap, but a
    monitoring user without write permission (the store 0755, root's) cannot
    move anything back: it reports new/ empty while messages wait in the old
    new/, as long as no consumer runs (the case a monitor is for)."""
    import signal

    from forked import call_as

    need_root()
    _warm(top)
    store_dir = top / "s"
    store = prepared(store_dir)
    store.add_many([b"1", b"2", b"3"])
    pid = os.fork()
    if pid == 0:  # pragma: no cover - a consumer killed after its exchange
        _shrink._move_back = lambda *a: os.kill(os.getpid(), signal.SIGKILL)  # type: ignore[assignment]
        _shrink.shrink(str(store_dir), str(store_dir / "new"), False)
        os._exit(0)
    os.waitpid(pid, 0)
    time.sleep(_shrink.GRACE + 0.2)
    seen = call_as(
        ALICE,
        ALICE,
        lambda: FileStore(store_dir, durable=False).stats()["new"]["count"],
    )
    assert seen == 3


def test_r5_a_durable_publish_syncs_an_old_new_too(tmp_path: Path, trace: Recorder) -> None:
    """A producer that looked up new/ just before a swap links its message
    into the old new/: syncing the fresh new/ would not make it durable."""
    store = FileStore(tmp_path)  # durable
    store.prepare()
    assert _shrink.shrink(str(tmp_path), str(tmp_path / "new"), durable=True)
    store.add(b"m")
    synced = trace.fsynced_paths()
    assert str(tmp_path / "new") in synced
    assert str(tmp_path / HIDDEN) in synced


def test_r7_a_long_foreign_name_taken_twice_is_moved_back_whole(
    tmp_path: Path, eager: None
) -> None:
    store = FileStore(tmp_path, durable=False)
    store.prepare()
    name = "x:" + "y" * 253
    assert _shrink.shrink(str(tmp_path), str(tmp_path / "new"), durable=False)
    (tmp_path / HIDDEN / name).write_bytes(b"first")
    (tmp_path / "new" / name).write_bytes(b"second")
    time.sleep(_shrink.GRACE * 2)
    assert store.stats()["new"]["count"] == 2
    assert not os.path.lexists(tmp_path / HIDDEN)
    assert sorted(p.read_bytes() for p in (tmp_path / "new").iterdir()) == [b"first", b"second"]
