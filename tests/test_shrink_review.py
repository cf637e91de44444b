"""What an adversarial review of the swap of an emptied new/ (_shrink) found.

Each test failed on the reviewed code.  Fixed: an entry the move back
cannot move (an unwritable directory, a mount point, another user's file in
a sticky new/) no longer breaks every claim; another user's directory at
the hidden name is never emptied; the fresh new/ keeps inode flags and
drops inherited ACLs, or there is no swap; stats() and list() see what a
stopped swap left; clean() never cuts the grace period short; a waiter
looks again once a swap settled, whatever its poll interval.  (An idle look
made slower, also found, is held by test_shrink's count of the calls an
idle look makes.)  Several need root and other users (skipped elsewhere).
"""

from __future__ import annotations

import ctypes
import ctypes.util  # noqa: F401
import os
import platform  # noqa: F401
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from atomstore import ClaimLostError, FileStore, _shrink, _store, _watch
from forked import call_as
from needs import need, need_root, need_tool

HIDDEN = _shrink.SHRINK_NAME
NOBODY = 65534
ALICE, BOB, CAROL = 1000, 1001, 1002


@pytest.fixture
def top() -> Iterator[Path]:
    """A directory every user can reach (tmp_path is root's only)."""
    path = Path(tempfile.mkdtemp(prefix="atomstore-review-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def prepared(path: Path, **options: object) -> FileStore:
    store = FileStore(path, durable=False, **options)  # type: ignore[arg-type]
    store.prepare()
    return store


def warm_up(tmp: Path) -> None:
    """Import everything a claim needs while still root (the venv's lazily
    imported modules are not readable by other users)."""
    w = prepared(tmp / "warm")
    w.add(b"x")
    w.claim().finish()  # type: ignore[union-attr]
    w.claim(wait=0.01)


def try_claims(store: FileStore, n: int = 3, pause: float = 0.1) -> list[object]:
    out: list[object] = []
    for _ in range(n):
        try:
            claim = store.claim()
            out.append(claim and claim.read_bytes())
        except Exception as e:
            out.append(f"{type(e).__name__}({e.errno if isinstance(e, OSError) else ''})")
        time.sleep(pause)
    return out


def killed_after_exchange(path: Path, as_uid: int | None = None) -> None:
    """A consumer SIGKILLed between its RENAME_EXCHANGE and its move back."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        if as_uid is not None:
            os.setgroups([])
            os.setgid(as_uid)
            os.setuid(as_uid)
        _shrink._move_back = lambda *a: os.kill(os.getpid(), signal.SIGKILL)  # type: ignore[assignment]
        _shrink.shrink(str(path), str(path / "new"), False)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status)
    assert os.WTERMSIG(status) == signal.SIGKILL


# -- F1: an entry the move back cannot move breaks every consumer for good --


def test_f1a_unwritable_subdir_in_new_breaks_every_claim(top: Path, eager: None) -> None:
    """Non-root consumer; a directory it may not write sits in new/ (another
    user's, or its own made read-only).  Before the swap feature claim()
    passed over it; now the move back raises EACCES out of every claim."""
    need_root()
    warm_up(top)
    path = top / "s"
    path.mkdir()
    os.chown(path, NOBODY, NOBODY)
    call_as(NOBODY, NOBODY, lambda: FileStore(path, durable=False, mode=0o666).prepare())
    os.mkdir(path / "new" / "somedir", 0o755)  # root's
    first = call_as(NOBODY, NOBODY, lambda: try_claims(FileStore(path, durable=False)))
    FileStore(path, durable=False).add(b"hello")
    second = call_as(NOBODY, NOBODY, lambda: try_claims(FileStore(path, durable=False)))
    assert (first, second) == ([None, None, None], [b"hello", None, None])


def test_f1b_mount_point_in_new_breaks_every_claim(tmp_path: Path, eager: None) -> None:
    need_root()
    store = prepared(tmp_path / "s")
    mnt = tmp_path / "s" / "new" / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "none", str(mnt)], check=True)
    try:
        first = try_claims(store, 1)
        store.add(b"hello")
        second = try_claims(store, 2)
    finally:
        for where in (mnt, tmp_path / "s" / HIDDEN / "mnt"):
            subprocess.run(["umount", str(where)], capture_output=True)
    assert (first, second) == ([None], [b"hello", None])


def test_f1c_bind_mount_at_hidden_name_breaks_every_claim(tmp_path: Path, eager: None) -> None:
    need_root()
    store = prepared(tmp_path / "s")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "1700000000.M1P1Q1.x").write_bytes(b"not this store's")
    hidden = tmp_path / "s" / HIDDEN
    hidden.mkdir()
    subprocess.run(["mount", "--bind", str(elsewhere), str(hidden)], check=True)
    try:
        time.sleep(0.2)
        store.add(b"hello")
        got = try_claims(store, 2)
    finally:
        subprocess.run(["umount", str(hidden)], capture_output=True)
    assert got == [b"hello", None]


def test_f1d_shared_sticky_new_stranded_foreign_message_breaks_other_consumers(
    top: Path,
) -> None:
    """alice owns new/ (1777, a shared queue), her consumer is killed mid-swap
    with carol's and bob's messages in the old new/.  bob's consumer cannot
    move carol's file out of the sticky old dir: its claim() raises EPERM at
    every listing after the grace period, for ever."""
    need_root()
    warm_up(top)
    path = top / "s"
    path.mkdir()
    os.chown(path, ALICE, ALICE)
    call_as(ALICE, ALICE, lambda: FileStore(path, durable=False, mode=0o666).prepare())
    os.chmod(path / "new", 0o1777)
    os.chmod(path / "cur", 0o1777)
    call_as(CAROL, CAROL, lambda: FileStore(path, durable=False).add(b"carol's") and None)
    call_as(BOB, BOB, lambda: FileStore(path, durable=False).add(b"bob's") and None)
    killed_after_exchange(path, ALICE)
    time.sleep(_shrink.GRACE + 0.2)
    got = call_as(BOB, BOB, lambda: try_claims(FileStore(path, durable=False), 3, 0.0))
    time.sleep(_shrink.GRACE + 0.2)
    later = call_as(BOB, BOB, lambda: try_claims(FileStore(path, durable=False), 1, 0.0))
    assert not [x for x in got + later if isinstance(x, str)], (got, later)


# -- F2: a directory of another user at the hidden name is emptied and removed --


def test_f2_dir_of_another_user_at_hidden_name_is_left_alone(tmp_path: Path, eager: None) -> None:
    need_root()
    store = prepared(tmp_path / "s")
    hidden = tmp_path / "s" / HIDDEN
    hidden.mkdir()
    (hidden / "1700000000.M1P1Q1.other").write_bytes(b"nobody's file")
    os.chown(hidden / "1700000000.M1P1Q1.other", NOBODY, NOBODY)
    os.chown(hidden, NOBODY, NOBODY)
    time.sleep(0.2)
    claim = store.claim()
    assert claim is None, f"consumed {claim.read_bytes()!r} from another user's directory"
    assert os.listdir(hidden) == ["1700000000.M1P1Q1.other"]


# -- F3: the fresh new/ is not the old one's twin --------------------------


def test_f3a_inode_flags_of_new_are_lost(tmp_path: Path, eager: None) -> None:
    need(_watch.filesystem_type(str(tmp_path)) == "ext4", "needs ext4")
    need_tool("chattr", "lsattr")
    store = prepared(tmp_path)
    subprocess.run(["chattr", "+D", "+S", "+A", str(tmp_path / "new")], check=True)
    before = subprocess.run(["lsattr", "-d", str(tmp_path / "new")], capture_output=True, text=True)
    ino = os.lstat(tmp_path / "new").st_ino
    assert store.claim() is None
    assert os.lstat(tmp_path / "new").st_ino != ino  # swapped
    after = subprocess.run(["lsattr", "-d", str(tmp_path / "new")], capture_output=True, text=True)
    assert after.stdout.split()[0] == before.stdout.split()[0]


def _acl(entries: list[tuple[int, int, int]]) -> bytes:
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def test_f3b_fresh_new_inherits_acls_the_old_one_lacked(tmp_path: Path, eager: None) -> None:
    store = prepared(tmp_path)
    u = 0xFFFFFFFF
    # setfacl -d -m u:nobody:rwx STORE (on the root only, after prepare)
    os.setxattr(
        tmp_path,
        "system.posix_acl_default",
        _acl([(1, 7, u), (2, 7, NOBODY), (4, 5, u), (0x10, 7, u), (0x20, 5, u)]),
    )
    assert os.listxattr(tmp_path / "new") == []
    ino = os.lstat(tmp_path / "new").st_ino
    assert store.claim() is None
    assert os.lstat(tmp_path / "new").st_ino != ino  # swapped
    assert os.listxattr(tmp_path / "new") == []


# -- F4: a stopped swap hides its messages from stats()/list()/CLI ----------


def test_f4_stats_and_ls_see_messages_of_a_stopped_swap(tmp_path: Path) -> None:
    store = prepared(tmp_path)
    names = store.add_many([b"one", b"two", b"three"])
    killed_after_exchange(tmp_path)
    assert sorted(os.listdir(tmp_path / HIDDEN)) == sorted(names)  # where they are
    time.sleep(_shrink.GRACE + 0.5)  # past GRACE: nobody is swapping any more
    env = dict(os.environ, PYTHONPATH=str(Path(_store.__file__).parent.parent))
    cli = subprocess.run(
        [sys.executable, "-m", "atomstore", "stat", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert cli.stdout.splitlines()[2].split()[:2] == ["new", "3"], cli.stdout
    assert (store.stats()["new"]["count"], len(store.list("new"))) == (3, 3)
    assert not os.path.lexists(tmp_path / HIDDEN)


# -- F5: a racing release() is told ClaimLostError while it still holds --


def test_f5_release_told_lost_while_the_claim_is_still_held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A swapper and a cleaner that removes the old new/ right after the
    exchange (clean(older_than=0) did; now a grace period of 0 stands for a
    rename stalled longer than the real one) race a release(): its rename
    into new/ met the removed old directory, ENOENT, reported as
    ClaimLostError although the claim was still in cur/ (found in 1-3 s).
    The rename now tries the fresh new/."""
    path = str(tmp_path)
    prepared(tmp_path)
    monkeypatch.setattr(_shrink, "GRACE", 0.0)
    end = time.time() + 5
    kids = []
    for role in ("swap", "clean"):
        pid = os.fork()
        if pid == 0:  # pragma: no cover
            s = FileStore(path, durable=False)
            while time.time() < end:
                if role == "swap":
                    _shrink.SHRINK_FROM = 0
                    _shrink.shrink(path, path + "/new", False)
                    time.sleep(0.0005)
                else:
                    s.clean(older_than=0)
            os._exit(0)
        kids.append(pid)
    store = FileStore(path, durable=False)
    store.add(b"payload")
    wrongly_lost = None
    try:
        while time.time() < end and wrongly_lost is None:
            claim = store.claim()
            if claim is None:
                continue
            try:
                claim.release(count_attempt=False)
            except ClaimLostError:
                if os.path.exists(claim.path):
                    wrongly_lost = claim.path
    finally:
        for pid in kids:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    assert wrongly_lost is None, f"ClaimLostError, yet still in cur/: {wrongly_lost}"


# -- F7: a waiting consumer on a poll interval misses a stranded message -----


def test_f7_waiter_on_poll_interval_misses_a_message_left_in_the_old_new(
    tmp_path: Path,
) -> None:
    """A producer whose rename looked up new/ just before the exchange lands
    in the old directory after the swapper's move back (2 in ~1900 forced
    swaps, see repro_stranded_rate.py).  Nothing wakes a waiter for it: it
    waits for its poll interval, not the grace period."""
    store = prepared(tmp_path, poll_interval=8)
    assert _shrink.shrink(str(tmp_path), str(tmp_path / "new"), durable=False)
    producer = FileStore(tmp_path, durable=False)
    name = producer.add(b"late")
    # where that racing rename puts it: the old new/, after the move back
    os.rename(tmp_path / "new" / name, tmp_path / HIDDEN / name)
    started = time.monotonic()
    claim = store.claim(wait=20)
    took = time.monotonic() - started
    assert claim is not None
    assert took < _shrink.GRACE + 1.5, f"claimed after {took:.1f} s (GRACE is {_shrink.GRACE} s)"
