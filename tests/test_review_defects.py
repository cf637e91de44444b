"""One regression test (or a few) per defect an outside review found.

Each test failed on the code the review attacked; the number in a test's
name is the defect's number in the hardening issue.  The same-operation
races of defect 1 run between processes in ``test_races.py``; here they run
as an exact interleaving in one process.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import math
import os
import shutil
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from alarms import deadline
from atomstore import Area, ClaimLostError, FileStore, _rename, _store, atomic
from atomstore._rename import Capabilities
from forked import Children, exit_code
from fstree import listing, store_entries
from needs import need_root
from tracing import Recorder, blind_lstat


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    spool = FileStore(tmp_path / "spool", durable=False)
    spool.prepare()
    return spool


# -- 1: two movers of one claim on the link fallback --------------------------


@pytest.mark.parametrize(
    "flags", [{"noreplace": False}, {"ignores_flags": True, "noreplace": False}]
)
def test_1_recover_against_recover_on_the_link_fallback_loses_nothing(
    store: FileStore,
    force_caps: Callable[..., Capabilities],
    trace: Recorder,
    flags: dict[str, bool],
) -> None:
    # The review's interleaving: recoverer A links cur/X -> new/X; recoverer
    # B's link finds new/X (EEXIST, same inode).  B used to unlink cur/X as
    # if the link were its own, and A then took back new/X: the last name.
    force_caps(exchange=False, **flags)
    name = store.add(b"the only copy")
    claim = store.claim()
    assert claim is not None
    time.sleep(0.002)
    other = FileStore(store.path, durable=False)
    results: list[list[str]] = []

    def link_then_let_the_other_recover(src: str, dst: str) -> None:
        os.link(src, dst)
        trace.replace.pop("link")
        results.append(other.recover(0.001))

    trace.replace["link"] = link_then_let_the_other_recover
    mine = store.recover(0.001)
    assert results == [[]]  # B lost, and does not claim the move
    assert [os.path.basename(p) for p in mine] == [name + ":1,A1"]
    assert store_entries(store) == [f"new/{name}:1,A1"]
    again = store.claim()
    assert again is not None
    assert again.read_bytes() == b"the only copy"
    with pytest.raises(ClaimLostError):
        claim.finish()


@pytest.mark.parametrize("first", ["release", "recover"])
def test_1_release_against_recover_one_wins_the_other_is_told(
    store: FileStore, force_caps: Callable[..., Capabilities], trace: Recorder, first: str
) -> None:
    force_caps(noreplace=False, exchange=False)
    name = store.add(b"payload")
    claim = store.claim()
    assert claim is not None
    time.sleep(0.002)
    recoverer = FileStore(store.path, durable=False)
    outcome: dict[str, object] = {}

    def attempt(who: str) -> None:
        try:
            outcome[who] = claim.release() if who == "release" else recoverer.recover(0.001)
        except FileNotFoundError as e:
            outcome[who] = e

    def link_then_let_the_other_move(src: str, dst: str) -> None:
        os.link(src, dst)
        trace.replace.pop("link")
        attempt("recover" if first == "release" else "release")

    trace.replace["link"] = link_then_let_the_other_move
    attempt(first)
    if first == "release":
        assert isinstance(outcome["release"], str)
        assert outcome["recover"] == []
    else:
        assert isinstance(outcome["release"], ClaimLostError)
        assert outcome["release"].errno == errno.ENOENT
        assert isinstance(outcome["recover"], list)
        assert len(outcome["recover"]) == 1
    assert store_entries(store) == [f"new/{name}:1,A1"]


def test_1_finish_against_recover_stays_finished(
    store: FileStore, force_caps: Callable[..., Capabilities], trace: Recorder
) -> None:
    # recover links cur/X -> new/X, the consumer finishes (unlinks cur/X),
    # recover's unlink fails: the finished message is not brought back.
    force_caps(noreplace=False, exchange=False)
    store.add(b"done already")
    claim = store.claim()
    assert claim is not None
    time.sleep(0.002)

    def link_then_finish(src: str, dst: str) -> None:
        os.link(src, dst)
        trace.replace.pop("link")
        claim.finish()

    trace.replace["link"] = link_then_finish
    assert store.recover(0.001) == []
    assert store_entries(store) == []


def test_1_durable_move_syncs_the_link_before_the_unlink(
    tmp_path: Path, force_caps: Callable[..., Capabilities], trace: Recorder
) -> None:
    force_caps(noreplace=False, exchange=False)
    spool = FileStore(tmp_path / "spool")
    spool.prepare()
    spool.add(b"x")
    claim = spool.claim()
    assert claim is not None
    trace.calls.clear()
    claim.release()
    names = [(c.name, c.target or str(c.args[0])) for c in trace.calls]
    link = next(i for i, (n, _) in enumerate(names) if n == "link")
    unlink = next(i for i, (n, _) in enumerate(names) if n == "unlink")
    synced = [p for n, p in names[link:unlink] if n == "fsync"]
    assert synced == [os.path.join(spool.path, "new")]


# -- 2: fs.protected_symlinks -----------------------------------------------


@contextlib.contextmanager
def protected_symlinks() -> Iterator[None]:
    """fs.protected_symlinks=1 for the block (root only), then as it was."""
    path = "/proc/sys/fs/protected_symlinks"
    with open(path) as f:
        before = f.read().strip()
    with open(path, "w") as f:
        f.write("1")
    try:
        yield
    finally:
        with open(path, "w") as f:
            f.write(before)


@pytest.fixture
def sticky(tmp_path: Path) -> Path:
    """A sticky world-writable directory, as /tmp, holding another user's links."""
    need_root()
    directory = tmp_path / "sticky"
    directory.mkdir()
    directory.chmod(0o1777)
    return directory


def plant(link: Path, target: Path, uid: int = 65534) -> None:
    link.symlink_to(target)
    os.lchown(link, uid, uid)


@pytest.mark.parametrize("overwrite", [True, False])
def test_2_a_link_the_kernel_refuses_to_follow_is_refused(
    sticky: Path, tmp_path: Path, overwrite: bool
) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    plant(sticky / "existing", victim)
    plant(sticky / "dangling", tmp_path / "would-be-created")
    with protected_symlinks():
        with pytest.raises(PermissionError) as kernel:
            os.open(sticky / "existing", os.O_WRONLY)
        assert kernel.value.errno == errno.EACCES
        for name in ("existing", "dangling"):
            link = sticky / name
            expected = PermissionError if overwrite else FileExistsError
            with pytest.raises(expected) as info:
                atomic.write_bytes(link, b"evil", overwrite=overwrite)
            assert info.value.errno == (errno.EACCES if overwrite else errno.EEXIST)
            with pytest.raises(expected), atomic.file(link, "wb", overwrite=overwrite) as f:
                f.write(b"evil")
            with pytest.raises(expected):
                atomic.write_text(link, "evil", overwrite=overwrite)
    assert victim.read_text() == "precious"
    assert not (tmp_path / "would-be-created").exists()
    assert listing(sticky) == ["dangling", "existing"]


def test_2_a_link_of_ones_own_is_still_followed(sticky: Path, tmp_path: Path) -> None:
    target = tmp_path / "mine"
    target.write_text("old")
    plant(sticky / "link", target, uid=os.geteuid())
    with protected_symlinks():
        atomic.write_bytes(sticky / "link", b"new", overwrite=True)
    assert target.read_text() == "new"
    assert (sticky / "link").is_symlink()


def test_2_the_command_refuses_too(sticky: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    victim = tmp_path / "victim"
    victim.write_text("precious")
    plant(sticky / "link", victim)
    with protected_symlinks():
        for extra in ([], ["--overwrite"]):
            proc = subprocess.run(
                [sys.executable, "-m", "atomstore", "write", *extra, str(sticky / "link")],
                input=b"evil",
                capture_output=True,
            )
            assert proc.returncode == 1, proc
            assert proc.stderr.count(b"\n") == 1
    assert victim.read_text() == "precious"


# -- 3: a planted dead/ link ---------------------------------------------------


def test_3_a_dead_area_that_is_a_symlink_is_never_followed(
    tmp_path: Path, store: FileStore
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "private").write_text("secret")
    os.symlink(outside, os.path.join(store.path, "dead"))
    with pytest.raises(NotADirectoryError) as info:
        store.list("dead")
    assert info.value.filename == os.path.join(store.path, "dead")
    dead = os.path.join(store.path, "dead")
    with pytest.raises(NotADirectoryError) as requeued:
        store.requeue("private")
    assert (requeued.value.errno, requeued.value.filename) == (errno.ENOTDIR, dead)
    picky = FileStore(store.path, durable=False, max_attempts=1)
    picky.add(b"m")
    claim = picky.claim()
    assert claim is not None
    with pytest.raises(NotADirectoryError) as released:
        claim.release()
    assert (released.value.errno, released.value.filename) == (errno.ENOTDIR, dead)
    assert picky.list("cur") == [claim.path]  # still held
    assert listing(outside) == ["private"]
    assert store.list("new") == []


@pytest.mark.parametrize("area", ["tmp", "new", "cur"])
def test_3_no_area_is_followed_for_any_operation(
    tmp_path: Path, store: FileStore, area: Area
) -> None:
    store.add(b"before")
    claim = store.claim()
    assert claim is not None
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "private").write_text("secret")
    os.rename(os.path.join(store.path, area), tmp_path / "real-area")
    os.symlink(outside, os.path.join(store.path, area))
    operations: list[Callable[[], object]] = [
        lambda: store.list(area),
        lambda: store.remove("private", area),
        lambda: store.clean(older_than=0),
    ]
    if area == "tmp":
        # add() stages in tmp/ only where O_TMPFILE is missing
        operations += [lambda: store.create("x")]
    if area == "new":
        operations += [
            lambda: store.add(b"x"),
            store.claim,
            lambda: store.move("private", "new", "tmp"),
        ]
    if area == "cur":
        operations += [claim.finish, claim.release, claim.read_bytes, lambda: store.recover(0)]
    for operation in operations:
        with pytest.raises(NotADirectoryError) as info:
            operation()
        assert info.value.filename == os.path.join(store.path, area)
    assert listing(outside) == ["private"]
    assert (outside / "private").read_text() == "secret"


# -- 4 and 5: hidden names and things that are not files in new/ -------------


def test_4_hidden_names_alone_never_make_claim_spin(store: FileStore) -> None:
    new = Path(store.path, "new")
    for hidden in (".DS_Store", ".nfs000000000123", ".x.atomstore-0123456789ab.tmp"):
        (new / hidden).write_text("not a message")
    with deadline(5):
        started = time.monotonic()
        assert store.claim() is None
        assert store.claim(wait=0.3) is None
        with store.claims(timeout=0.3) as claims:
            assert list(claims) == []
        assert time.monotonic() - started < 3
    assert len(store_entries(store)) == 3


def test_5_directories_fifos_sockets_and_links_are_never_claimed(
    tmp_path: Path, store: FileStore
) -> None:
    new = Path(store.path, "new")
    (new / "0-dir").mkdir()
    os.mkfifo(new / "0-fifo")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(new / "0-sock"))
    (new / "0-link").symlink_to(tmp_path)
    name = store.add(b"real")
    with deadline(5):
        claim = store.claim()
        assert claim is not None
        assert claim.name == name
        claim.finish()
        assert store.claim() is None
    assert store.list("new") == [str(new / n) for n in ("0-dir", "0-fifo", "0-link", "0-sock")]


# -- 6: poison names -----------------------------------------------------------


def test_6_a_foreign_name_too_long_for_a_claim_is_claimed_shortened(store: FileStore) -> None:
    long_name = "0" + "x" * 240
    Path(store.path, "new", long_name).write_bytes(b"foreign")
    behind = store.add(b"behind")
    claim = store.claim()
    assert claim is not None
    assert claim.read_bytes() == b"foreign"
    assert len(os.fsencode(os.path.basename(claim.path))) <= 255
    assert claim.name.startswith("0xxx")
    assert "~" in claim.name
    released = claim.release()
    assert os.path.basename(released) == claim.name + ":1,A1"
    taken = [store.claim(), store.claim()]
    assert sorted(c.name for c in taken if c is not None) == sorted([claim.name, behind])
    for c in taken:
        assert c is not None
        c.finish()
    assert store_entries(store) == []


def test_6_names_that_are_not_utf8_work_end_to_end(store: FileStore) -> None:
    raw = b"0-caf\xe9-\nline"
    with open(os.path.join(os.fsencode(store.path), b"new", raw), "wb") as f:
        f.write(b"latin-1 name")
    claim = store.claim()
    assert claim is not None
    assert os.fsencode(claim.name) == raw
    assert claim.read_bytes() == b"latin-1 name"
    claim.release()
    again = store.claim()
    assert again is not None
    again.finish()
    assert store_entries(store) == []


def test_6_a_name_this_filesystem_cannot_take_as_a_claim_is_passed_over(
    store: FileStore, trace: Recorder
) -> None:
    Path(store.path, "new", "0-first").write_bytes(b"stuck")
    behind = store.add(b"behind")
    trace.fail("rename", errno.ENAMETOOLONG, when=lambda c: "0-first" in str(c.args[0]), times=None)
    claim = store.claim()
    assert claim is not None
    assert claim.name == behind
    claim.finish()
    assert store.claim() is None
    assert store.list("new") == [os.path.join(store.path, "new", "0-first")]


# -- 7: a parent directory that is a symlink -----------------------------------


def test_7_a_symlinked_parent_is_followed_as_open_follows_it(
    tmp_path: Path, fresh_probe: None
) -> None:
    real = tmp_path / "dotfiles"
    real.mkdir()
    (tmp_path / ".config").symlink_to(real)
    parent = tmp_path / ".config"
    atomic.write_bytes(parent / "a.json", b"{}")
    atomic.write_text(parent / "a.json", "[]", overwrite=True)
    with atomic.file(parent / "b.json") as f:
        f.write("x")
    with atomic.folder(parent / "tree") as staging:
        (staging / "f").write_text("t")
    atomic.rename(parent / "b.json", parent / "c.json")
    atomic.clean(parent, older_than=0)
    assert listing(real) == ["a.json", "c.json", "tree"]
    assert (real / "a.json").read_text() == "[]"
    assert (tmp_path / ".config").is_symlink()


# -- 8: a store whose path is a symlink ---------------------------------------


def test_8_a_store_path_that_is_a_symlink(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    via_link = FileStore(tmp_path / "link", max_attempts=1)
    via_link.prepare()
    assert listing(real) == ["cur", "new", "tmp"]
    via_real = FileStore(real, max_attempts=1)
    via_link.add(b"one")
    claim = via_link.claim()
    assert claim is not None
    via_real.claimed(claim.path).finish()
    via_real.add(b"two")
    claim = via_real.claim()
    assert claim is not None
    dead = via_link.claimed(claim.path).release()
    assert dead.startswith(os.path.join(via_link.path, "dead"))
    assert via_real.requeue(os.path.join(tmp_path, "link", "dead", os.path.basename(dead)))
    assert len(via_link.list("new")) == 1


# -- 9: special files are never replaced -------------------------------------


def special_files(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    yield "a FIFO", fifo
    sock = tmp_path / "sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock))
    yield "a socket", sock
    if os.geteuid() == 0:
        dev = tmp_path / "null"
        os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        yield "a character device", dev


@pytest.mark.parametrize("through_link", [False, True])
def test_9_a_destination_that_is_not_a_regular_file_is_refused(
    tmp_path: Path, through_link: bool
) -> None:
    for kind, special in special_files(tmp_path):
        dest = special
        if through_link:
            dest = tmp_path / ("link-to-" + special.name)
            dest.symlink_to(special)
        writers: list[Callable[[], object]] = [
            lambda dest=dest: atomic.write_bytes(dest, b"x", overwrite=True),  # type: ignore[misc]
            lambda dest=dest: atomic.write_text(dest, "x", overwrite=True),  # type: ignore[misc]
        ]
        for write in writers:
            with pytest.raises(OSError) as info:
                write()
            assert info.value.errno == errno.EINVAL
            assert kind in str(info.value)
            assert info.value.filename == str(special)
        with pytest.raises(OSError), atomic.file(dest, "wb", overwrite=True) as f:
            f.write(b"x")
        assert not stat.S_ISREG(os.lstat(special).st_mode)
    assert not [n for n in listing(tmp_path) if n.startswith(".")]


def test_9_the_command_never_replaces_a_device(tmp_path: Path) -> None:
    import subprocess
    import sys

    need_root()
    dev = tmp_path / "null"
    os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    proc = subprocess.run(
        [sys.executable, "-m", "atomstore", "write", "--overwrite", str(dev)],
        input=b"x",
        capture_output=True,
    )
    assert proc.returncode == 1
    assert b"character device" in proc.stderr
    assert b"--overwrite" not in proc.stderr
    assert stat.S_ISCHR(os.lstat(dev).st_mode)


# -- 10: fork while another thread probes -------------------------------------


def test_10_a_child_forked_while_the_probe_lock_is_held_does_not_hang(
    tmp_path: Path, fresh_probe: None
) -> None:
    held = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with _rename._lock:
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(5)
    try:
        with Children() as kids:
            pid = kids.start(lambda: atomic.write_bytes(tmp_path / "child", b"ok"))
            status = kids.wait(pid, timeout=10)
    finally:
        release.set()
        holder.join()
    assert exit_code(status) == 0
    assert (tmp_path / "child").read_bytes() == b"ok"


# -- 11: a store moved aside and made anew while a consumer waits -------------


@pytest.mark.parametrize("how", ["moved", "swapped"])
def test_11_a_waiter_follows_a_store_made_anew(tmp_path: Path, how: str) -> None:
    spool = FileStore(tmp_path / "spool", durable=False, poll_interval=0.1)
    spool.prepare()
    got: list[bytes] = []

    def consume() -> None:
        claim = spool.claim(wait=10)
        if claim is not None:
            got.append(claim.read_bytes())

    consumer = threading.Thread(target=consume)
    consumer.start()
    time.sleep(0.3)
    if how == "moved":
        os.rename(tmp_path / "spool", tmp_path / "spool.old")
        FileStore(tmp_path / "spool", durable=False).prepare()
    else:
        with atomic.folder(tmp_path / "spool", overwrite=True) as staging:
            for area in ("tmp", "new", "cur"):
                (staging / area).mkdir()
    started = time.monotonic()
    FileStore(tmp_path / "spool", durable=False).add(b"to the new store")
    consumer.join(10)
    assert got == [b"to the new store"]
    assert time.monotonic() - started < 3


def test_11_an_inotify_waiter_follows_too(tmp_path: Path) -> None:
    spool = FileStore(tmp_path / "spool", durable=False)
    spool.prepare()
    with spool.claims(timeout=10) as claims:
        assert claims.uses_inotify
        shutil.move(str(tmp_path / "spool"), str(tmp_path / "old"))
        FileStore(tmp_path / "spool", durable=False).prepare()
        threading.Timer(0.2, FileStore(tmp_path / "spool", durable=False).add, [b"n"]).start()
        started = time.monotonic()
        claim = next(claims)
        assert claim.read_bytes() == b"n"
        assert time.monotonic() - started < 3


# -- 12: huge durations ---------------------------------------------------------


def test_12_huge_durations_mean_for_ever_or_nothing(store: FileStore) -> None:
    store.add(b"m")
    claim = store.claim()
    assert claim is not None
    assert store.recover(math.inf) == []
    assert store.recover(datetime.timedelta.max) == []
    assert store.recover(1e300) == []
    assert store.clean(older_than=math.inf) == []
    claim.finish()
    stopper = threading.Timer(0.3, lambda: store.add(b"late"))
    stopper.start()
    late = store.claim(wait=1e20)
    assert late is not None
    late.finish()
    with store.claims(timeout=1e20) as claims:
        threading.Timer(0.2, claims.stop).start()
        assert list(claims) == []
    with store.claims(timeout=datetime.timedelta.max.total_seconds()) as claims:
        threading.Timer(0.2, claims.stop).start()
        assert list(claims) == []


# -- 13: capabilities that were assumed say so ---------------------------------


def test_13_capabilities_say_whether_they_were_probed(
    tmp_path: Path, fresh_probe: None, trace: Recorder
) -> None:
    assert atomic.capabilities(tmp_path / "x").probed
    _rename.forget()
    trace.fail("mkdir", errno.EROFS)
    assumed = atomic.capabilities(tmp_path / "x")
    assert assumed.probed is False
    assert "probed=False" in repr(assumed)


# -- 14: an unknown outcome on the losing side of a claim race ----------------


def test_14_eio_from_a_lost_claim_race_moves_on(store: FileStore, trace: Recorder) -> None:
    store.add(b"1")
    second = store.add(b"2")

    def lose_with_eio(src: str, dst: str) -> None:
        # Another host won the rename; the reply to ours was EIO.
        trace.replace.pop("rename")
        os.rename(src, src.replace("/new/", "/cur/") + ":1,A0,C1,P1,Tother")
        raise OSError(errno.EIO, os.strerror(errno.EIO), src)

    trace.replace["rename"] = lose_with_eio
    claim = store.claim()
    assert claim is not None
    assert claim.name == second


def test_14_eio_after_a_won_claim_is_the_claim(store: FileStore, trace: Recorder) -> None:
    name = store.add(b"1")
    trace.fail("rename", errno.EIO, after=True)
    claim = store.claim()
    assert claim is not None
    assert claim.name == name
    assert claim.read_bytes() == b"1"


def test_14_eio_with_nothing_moved_is_raised(store: FileStore, trace: Recorder) -> None:
    store.add(b"1")
    trace.fail("rename", errno.EIO)
    started = time.monotonic()
    with pytest.raises(OSError) as info:
        store.claim()
    assert info.value.errno == errno.EIO
    assert len(store.list("new")) == 1
    # It looked for the outcome about a second, no longer.
    assert sum(_store._OUTCOME_PAUSES) <= time.monotonic() - started < 5


@pytest.mark.parametrize("code", [errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC])
def test_14_a_refused_claim_is_raised_at_once(store: FileStore, trace: Recorder, code: int) -> None:
    # Only an unknown outcome is waited for; a refusal is not one.
    store.add(b"1")
    trace.fail("rename", code)
    started = time.monotonic()
    with pytest.raises(OSError) as info:
        store.claim()
    assert info.value.errno == code
    assert time.monotonic() - started < sum(_store._OUTCOME_PAUSES) / 2
    assert len(store.list("new")) == 1


def test_14_eio_from_a_lost_claim_race_seen_late_moves_on(
    store: FileStore, trace: Recorder
) -> None:
    # SeaweedFS: the loser of a rename race hears EIO, and its client shows
    # the source in new/ until it learns of the winner's rename a moment later.
    store.add(b"1")
    second = store.add(b"2")

    def lose_with_eio(src: str, dst: str) -> None:
        trace.replace.pop("rename")
        winner = src.replace("/new/", "/cur/") + ":1,A0,C1,P1,Tother"
        threading.Timer(0.1, os.rename, (src, winner)).start()
        raise OSError(errno.EIO, os.strerror(errno.EIO), src)

    trace.replace["rename"] = lose_with_eio
    claim = store.claim()
    assert claim is not None
    assert claim.name == second
    assert store.list("new") == []
    assert len(store.list("cur")) == 2  # the winner's claim and ours


@pytest.mark.parametrize("code", [errno.EIO, errno.ENOTCONN, errno.EREMOTEIO])
def test_14_a_won_claim_whose_name_shows_late_is_the_claim(
    store: FileStore, trace: Recorder, code: int
) -> None:
    # The rename took effect and its reply was lost; the client shows the
    # source gone a moment before it shows the claim name.  Reported lost,
    # the claim would sit in cur/ with no holder until recover().
    name = store.add(b"1")

    def won_with_eio(src: str, dst: str) -> None:
        trace.replace.pop("rename")
        hidden = os.path.join(os.path.dirname(dst), ".in-flight")
        os.rename(src, hidden)
        threading.Timer(0.1, os.rename, (hidden, dst)).start()
        raise OSError(code, os.strerror(code), src)

    trace.replace["rename"] = won_with_eio
    claim = store.claim()
    assert claim is not None
    assert claim.name == name
    assert claim.read_bytes() == b"1"
    claim.finish()
    assert store.list("cur") == []


def test_14_a_lost_race_whose_winner_gives_the_message_back_moves_on(
    store: FileStore, trace: Recorder
) -> None:
    # The loser hears EIO and sees the message gone; within its second the
    # winner gives it back under the same name (a release that counts no
    # attempt).  The race was lost all the same: no EIO, nothing lost.
    name = store.add(b"1")

    def lose_then_given_back(src: str, dst: str) -> None:
        trace.replace.pop("rename")
        winner = src.replace("/new/", "/cur/") + ":1,A0,C1,P1,Tother"
        os.rename(src, winner)
        threading.Timer(0.3, os.rename, (winner, src)).start()
        raise OSError(errno.EIO, os.strerror(errno.EIO), src)

    trace.replace["rename"] = lose_then_given_back
    claim = store.claim(wait=0)
    if claim is None:  # the listing had no other name; the next claim takes it
        claim = store.claim(wait=0)
    assert claim is not None
    assert claim.name == name
    assert claim.read_bytes() == b"1"


@pytest.mark.parametrize("code", [errno.EIO, errno.EACCES])
def test_14_another_file_at_the_claim_name_is_not_the_claim(
    store: FileStore, trace: Recorder, code: int
) -> None:
    # A file linked at the claim name (a name read from earlier claims)
    # while the rename failed and the message is still in new/: the claim
    # is the message's own file only, or the message goes out twice.
    name = store.add(b"1")
    other = os.path.join(store.path, "other")
    with open(other, "wb") as f:
        f.write(b"someone else's")

    def planted(src: str, dst: str) -> None:
        trace.replace.pop("rename")
        os.link(other, dst)
        raise OSError(code, os.strerror(code), src)

    trace.replace["rename"] = planted
    with pytest.raises(OSError) as info:
        store.claim(wait=0)
    assert info.value.errno == code
    assert [os.path.basename(p) for p in store.list("new")] == [name]


@pytest.mark.parametrize("code", [errno.EIO, errno.ESTALE])
def test_14_a_claim_name_that_cannot_be_looked_at_is_raised(
    store: FileStore, trace: Recorder, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    # The rename took effect and answered EIO, and so does every lstat in
    # cur/: its outcome stays unknown, and the caller hears so (the claim
    # waits in cur/ for recover()); never a race lost.
    store.add(b"1")
    trace.fail("rename", errno.EIO, after=True)
    blind_lstat(monkeypatch, lambda path: "/cur/" in path, code)
    with deadline(10), pytest.raises(OSError) as info:
        store.claim(wait=0)
    monkeypatch.undo()
    assert info.value.errno == errno.EIO
    assert store.list("new") == []
    assert len(store.list("cur")) == 1


@pytest.mark.parametrize(("code", "settles"), [(errno.EIO, True), (errno.EUCLEAN, False)])
def test_14_a_message_that_cannot_be_looked_at_is_raised_not_retried(
    store: FileStore, trace: Recorder, monkeypatch: pytest.MonkeyPatch, code: int, settles: bool
) -> None:
    # A damaged inode (or a half-dead mount): its rename and its lstat both
    # fail while new/ still lists.  Taken for a race lost, the name came
    # back at every listing: claim() spun for ever.
    store.add(b"1")
    trace.fail("rename", code)
    blind_lstat(monkeypatch, lambda path: "/new/" in path, code)
    started = time.monotonic()
    with deadline(10), pytest.raises(OSError) as info:
        store.claim(wait=0)
    monkeypatch.undo()
    assert info.value.errno == code
    assert trace.count("rename") == 1
    took = time.monotonic() - started
    assert took < 5 if settles else took < sum(_store._OUTCOME_PAUSES) / 2
    assert len(store.list("new")) == 1


def test_14_a_directory_planted_at_the_claim_name_is_not_a_claim(
    store: FileStore, trace: Recorder
) -> None:
    # The kernel refuses to rename a file onto a directory (EISDIR); a claim
    # name that exists is a claim only when it is a file, or the message,
    # still in new/, would be handed out twice.
    name = store.add(b"1")

    def planted(src: str, dst: str) -> None:
        trace.replace.pop("rename")
        os.mkdir(dst)
        os.rename(src, dst)

    trace.replace["rename"] = planted
    with pytest.raises(IsADirectoryError):
        store.claim()
    assert [os.path.basename(p) for p in store.list("new")] == [name]
    claim = store.claim()
    assert claim is not None
    assert claim.name == name
    assert claim.read_bytes() == b"1"


@pytest.mark.parametrize("locale", ["C", "C.UTF-8"])
def test_6_the_command_prints_any_name_as_its_bytes(store: FileStore, locale: str) -> None:
    import subprocess
    import sys

    raw = b"0-caf\xe9"
    with open(os.path.join(os.fsencode(store.path), b"new", raw), "wb") as f:
        f.write(b"foreign")
    env = {**os.environ, "LC_ALL": locale, "PYTHONUTF8": "0"}

    def run(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [sys.executable, "-m", "atomstore", *args], capture_output=True, env=env
        )

    expected = os.path.join(os.fsencode(store.path), b"new", raw)
    listed = run("ls", store.path)
    assert (listed.returncode, listed.stdout, listed.stderr) == (0, expected + b"\n", b"")
    taken = run("take", "--no-sync", store.path)
    assert taken.returncode == 0, taken
    path = taken.stdout.rstrip(b"\n")
    assert path.startswith(os.path.join(os.fsencode(store.path), b"cur", raw + b":1,"))
    with open(path, "rb") as taken_file:
        assert taken_file.read() == b"foreign"
    done = subprocess.run(
        [sys.executable, "-m", "atomstore", "done", store.path, os.fsdecode(path)],
        capture_output=True,
        env=env,
    )
    assert done.returncode == 0, done
    assert store_entries(store) == []


# -- found by the adversarial review of these fixes ---------------------------


def test_batches_never_follow_a_new_area_that_is_a_symlink(
    tmp_path: Path, store: FileStore
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    os.rename(os.path.join(store.path, "new"), tmp_path / "real-new")
    os.symlink(outside, os.path.join(store.path, "new"))
    new = os.path.join(store.path, "new")
    with pytest.raises(NotADirectoryError) as info:
        store.add_many([b"a", b"b"])
    assert (info.value.errno, info.value.filename) == (errno.ENOTDIR, new)
    with pytest.raises(NotADirectoryError) as again, store.batch() as batch:
        batch.add(b"c")
    assert (again.value.errno, again.value.filename) == (errno.ENOTDIR, new)
    assert listing(outside) == []
    assert listing(os.path.join(store.path, "tmp")) == []


@pytest.mark.parametrize("area", ["new", "cur"])
def test_a_claim_from_a_cached_listing_checks_the_areas_again(
    tmp_path: Path, store: FileStore, area: str
) -> None:
    for i in range(3):
        store.add(b"%d" % i)
    first = store.claim()  # lists new/ and keeps the rest for later claims
    assert first is not None
    outside = tmp_path / "outside"
    outside.mkdir()
    os.rename(os.path.join(store.path, area), tmp_path / "real")
    os.symlink(outside, os.path.join(store.path, area))
    with pytest.raises(NotADirectoryError) as info:
        store.claim()
    assert info.value.errno == errno.ENOTDIR
    assert info.value.filename == os.path.join(store.path, area)
    assert listing(outside) == []
    assert len(store.list("new" if area == "cur" else "cur")) == (2 if area == "cur" else 1)


def test_threads_writing_at_once_never_trip_over_the_mount_watch(
    tmp_path: Path, fresh_probe: None
) -> None:
    errors: list[BaseException] = []

    def write(i: int) -> None:
        try:
            for j in range(200):
                atomic.write_bytes(tmp_path / f"{i}-{j}", b"x", durable=False)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(listing(tmp_path)) == 1600


def test_another_users_message_in_a_sticky_store_does_not_block_the_queue(
    request: pytest.FixtureRequest,
) -> None:
    import tempfile

    from forked import call_as

    need_root()
    top = Path(tempfile.mkdtemp(prefix="atomstore-sticky-", dir="/tmp"))
    request.addfinalizer(lambda: shutil.rmtree(top, ignore_errors=True))
    shared = FileStore(top / "shared", durable=False)
    shared.prepare()
    for directory in (top, top / "shared"):
        directory.chmod(0o755)
    for area in ("tmp", "new", "cur"):
        os.chmod(os.path.join(shared.path, area), 0o1777)
    Path(shared.path, "new", "0-roots").write_bytes(b"root's")

    def as_nobody() -> tuple[bytes | None, list[str]]:
        mine = FileStore(shared.path, durable=False)
        mine.add(b"nobody's")
        claim = mine.claim()
        got = None if claim is None else claim.read_bytes()
        if claim is not None:
            claim.finish()
        return got, [os.path.basename(p) for p in mine.list("new")]

    got, waiting = call_as(65534, 65534, as_nobody)
    assert got == b"nobody's"
    assert waiting == ["0-roots"]


def test_recover_goes_on_past_an_entry_it_cannot_move(
    store: FileStore, trace: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_rename, "_RELINK_PAUSES", (0.0,) * len(_rename._RELINK_PAUSES))
    for i in range(3):
        store.add(b"%d" % i)
    claims = [store.claim() for _ in range(3)]
    time.sleep(0.002)
    bad = claims[0]
    assert bad is not None
    trace.fail("rename", errno.EIO, when=lambda c: str(c.args[0]) == bad.path, times=None)
    trace.fail("link", errno.EIO, when=lambda c: str(c.args[0]) == bad.path, times=None)
    trace.fail("renameat2", errno.EIO, when=lambda c: str(c.args[0]) == bad.path, times=None)
    with pytest.raises(OSError) as info:
        store.recover(0.001)
    assert info.value.errno == errno.EIO
    assert len(store.list("new")) == 2
    assert store.list("cur") == [bad.path]


def test_recover_goes_on_past_an_entry_it_cannot_look_at(
    store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A name listed in cur/ whose lstat answers EIO (a network filesystem):
    # the other claims are recovered all the same, then the error raised.
    for i in range(3):
        store.add(b"%d" % i)
    claims = [store.claim() for _ in range(3)]
    time.sleep(0.002)
    bad = sorted(c.path for c in claims if c is not None)[0]  # recovered first
    blind_lstat(monkeypatch, lambda path: path == bad)
    with pytest.raises(OSError) as info:
        store.recover(0.001)
    monkeypatch.undo()
    assert info.value.errno == errno.EIO
    assert len(store.list("new")) == 2
    assert store.list("cur") == [bad]


def _connection_lost_at_the_link(
    root: str, trace: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The link answers EIO as the connection drops: every look under
    ``root`` after it answers EIO too."""
    lost = False

    def link(src: str, dst: str) -> None:
        nonlocal lost
        lost = True
        raise OSError(errno.EIO, os.strerror(errno.EIO), src, None, dst)

    blind_lstat(monkeypatch, lambda path: lost and path.startswith(root))
    trace.replace["link"] = link


@pytest.mark.parametrize("move", ["release", "recover"])
def test_a_move_back_whose_connection_drops_raises_its_error(
    store: FileStore,
    force_caps: Callable[..., Capabilities],
    trace: Recorder,
    monkeypatch: pytest.MonkeyPatch,
    move: str,
) -> None:
    # Neither ClaimLostError nor a claim passed over as finished: the claim
    # is still held.
    force_caps(noreplace=False, exchange=False)
    store.add(b"m")
    claim = store.claim()
    assert claim is not None
    time.sleep(0.002)
    _connection_lost_at_the_link(store.path, trace, monkeypatch)
    with pytest.raises(OSError) as info:
        if move == "release":
            claim.release()
        else:
            store.recover(0.001)
    monkeypatch.undo()
    assert type(info.value) is OSError
    assert info.value.errno == errno.EIO
    assert store.list("cur") == [claim.path]


def test_a_waiter_outlives_a_store_made_anew_slowly(tmp_path: Path) -> None:
    spool = FileStore(tmp_path / "spool", durable=False, poll_interval=0.1)
    spool.prepare()
    got: list[object] = []

    def consume() -> None:
        try:
            claim = spool.claim(wait=10)
            got.append(None if claim is None else claim.read_bytes())
        except BaseException as e:
            got.append(e)

    consumer = threading.Thread(target=consume)
    consumer.start()
    time.sleep(0.2)
    os.rename(tmp_path / "spool", tmp_path / "spool.old")
    time.sleep(0.6)  # several polls find no store at all
    FileStore(tmp_path / "spool", durable=False).prepare()
    FileStore(tmp_path / "spool", durable=False).add(b"after the gap")
    consumer.join(10)
    assert got == [b"after the gap"]


def test_an_open_whose_reply_was_lost_leaves_no_file(
    tmp_path: Path, store: FileStore, trace: Recorder
) -> None:
    trace.fail("open", errno.EIO, after=True)
    with pytest.raises(OSError):
        atomic.write_bytes(tmp_path / "f", b"x")
    trace.fail("open", errno.EIO, after=True)
    with pytest.raises(OSError):
        store.add(b"x")
    assert [n for n in listing(tmp_path) if n.startswith(".")] == []
    assert store_entries(store) == []


def test_durations_beyond_a_float_mean_for_ever(store: FileStore) -> None:
    assert store.recover(2**2000) == []
    assert store.claim(wait=0) is None
    stopper = threading.Timer(0.2, lambda: store.add(b"x"))
    stopper.start()
    claim = store.claim(wait=2**2000)
    assert claim is not None


def test_a_fifo_that_takes_the_name_during_a_long_write_is_not_replaced(
    tmp_path: Path,
) -> None:
    dest = tmp_path / "dest"
    dest.write_text("old")
    with pytest.raises(OSError) as info, atomic.file(dest, overwrite=True) as f:
        f.write("new")
        dest.unlink()
        os.mkfifo(dest)
    assert info.value.errno == errno.EINVAL
    assert stat.S_ISFIFO(os.lstat(dest).st_mode)
    assert listing(tmp_path) == ["dest"]
