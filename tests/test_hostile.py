"""Hostile directories: links planted where the library is about to write.

A store or a destination may live in a directory that other users can
write to.  Whatever they plant there (a symlink under the very name the
library is about to use, a directory swapped for a link while a tree is
written), the library never writes through the link and never follows it
out of its directory: the victims outside stay exactly as they were.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path
from typing import Any

import pytest

from alarms import deadline
from atomstore import FileStore, _info, _names, _renameat2, _store, atomic
from fstree import store_entries, tree
from tracing import Recorder, named_staging


class Victim:
    """A directory outside the store with a file in it, and its snapshot."""

    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path / "outside"
        self.dir.mkdir()
        self.file = self.dir / "victim"
        self.file.write_text("precious")
        self.missing = self.dir / "would-be-created"
        self.before = self.snapshot()

    def snapshot(self) -> tuple[Any, ...]:
        st, fst = os.stat(self.dir), os.stat(self.file)
        return (
            sorted(os.listdir(self.dir)),
            self.file.read_text(),
            st.st_mtime_ns,
            fst.st_mtime_ns,
            fst.st_mode,
            fst.st_nlink,
        )

    def untouched(self) -> bool:
        return self.snapshot() == self.before


@pytest.fixture
def victim(tmp_path: Path) -> Victim:
    return Victim(tmp_path)


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    s = FileStore(tmp_path / "store")
    s.prepare()
    return s


def plant(link: str | Path, target: Path) -> None:
    os.symlink(target, link)


def area(store: FileStore, name: str, *parts: str) -> str:
    return os.path.join(store.path, name, *parts)


# -- FileStore ------------------------------------------------------------


@pytest.mark.parametrize("kind", ["file", "dangling"])
def test_copy_onto_a_planted_symlink(store: FileStore, victim: Victim, kind: str) -> None:
    target = victim.file if kind == "file" else victim.missing
    Path(area(store, "cur", "msg")).write_text("mine")
    plant(area(store, "new", "msg"), target)
    with pytest.raises(FileExistsError) as info:
        store.copy("msg", "cur", "new")
    assert info.value.filename == area(store, "new", "msg")
    assert os.readlink(area(store, "new", "msg")) == str(target)
    # replacing it replaces the link itself, never what it points at
    store.copy("msg", "cur", "new", overwrite=True)
    assert not os.path.islink(area(store, "new", "msg"))
    assert Path(area(store, "new", "msg")).read_text() == "mine"
    assert victim.untouched()
    assert not victim.missing.exists()
    assert store_entries(store) == ["new/msg", "cur/msg"]


def test_copy_destination_planted_while_copying(
    store: FileStore, victim: Victim, trace: Recorder
) -> None:
    Path(area(store, "cur", "msg")).write_text("mine")

    def plant_then_rename(src: str, dst: str, flags: int) -> None:
        if dst == area(store, "new", "msg") and not os.path.lexists(dst):
            plant(dst, victim.file)
        _renameat2.renameat2(src, dst, flags)

    trace.replace["renameat2"] = plant_then_rename
    with pytest.raises(FileExistsError):
        store.copy("msg", "cur", "new")
    assert os.readlink(area(store, "new", "msg")) == str(victim.file)
    assert victim.untouched()
    assert store_entries(store) == ["new/msg", "cur/msg"]


def test_move_onto_a_planted_symlink(store: FileStore, victim: Victim) -> None:
    Path(area(store, "tmp", "msg")).write_text("mine")
    plant(area(store, "new", "msg"), victim.file)
    with pytest.raises(FileExistsError):
        store.move("msg", "tmp", "new")
    store.move("msg", "tmp", "new", overwrite=True)
    assert Path(area(store, "new", "msg")).read_text() == "mine"
    assert not os.path.islink(area(store, "new", "msg"))
    assert victim.untouched()
    assert store_entries(store) == ["new/msg"]


def names_from(monkeypatch: pytest.MonkeyPatch, store: FileStore, *names: str) -> None:
    """Make ``store.unique_name()`` return ``names``, in order."""
    queue = list(names)
    monkeypatch.setattr(store, "unique_name", lambda: queue.pop(0))


def test_add_skips_a_name_planted_in_tmp(
    store: FileStore, victim: Victim, monkeypatch: pytest.MonkeyPatch
) -> None:
    plant(area(store, "tmp", "taken"), victim.missing)
    names_from(monkeypatch, store, "taken", "fresh")
    with named_staging():  # tmp/ is used where O_TMPFILE is missing
        assert store.add(b"payload") == "fresh"
    assert Path(area(store, "new", "fresh")).read_bytes() == b"payload"
    assert os.readlink(area(store, "tmp", "taken")) == str(victim.missing)
    assert not victim.missing.exists()
    assert victim.untouched()


@pytest.mark.parametrize("kind", ["file", "dangling"])
def test_add_refuses_a_name_planted_in_new(
    store: FileStore, victim: Victim, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    target = victim.file if kind == "file" else victim.missing
    plant(area(store, "new", "taken"), target)
    names_from(monkeypatch, store, "taken")
    with pytest.raises(FileExistsError) as info:
        store.add(b"payload")
    assert info.value.filename == area(store, "new", "taken")
    assert os.readlink(area(store, "new", "taken")) == str(target)
    assert victim.untouched()
    assert not victim.missing.exists()
    assert store_entries(store) == ["new/taken"]


class FrozenClock:
    """Stands for the ``time`` module with a clock that does not move."""

    def __init__(self, ns: int) -> None:
        self.ns = ns

    def time_ns(self) -> int:
        return self.ns

    def time(self) -> float:
        return self.ns / 1e9

    def monotonic(self) -> float:
        return time.monotonic()


def test_claim_onto_a_planted_symlink(
    store: FileStore, victim: Victim, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A claim's name is unpredictable (time and a random token); freeze both
    # to plant a link exactly where the claim is about to land.
    name = store.add(b"payload")
    now_us = time.time_ns() // 1000
    monkeypatch.setattr(_store, "time", FrozenClock(now_us * 1000))
    monkeypatch.setattr(_info, "token", lambda: "0123456789ab")
    claim_file = f"{name}:1,A0,C{now_us},P{os.getpid()},T0123456789ab"
    plant(area(store, "cur", claim_file), victim.file)
    claim = store.claim()
    assert claim is not None
    assert claim.path == area(store, "cur", claim_file)
    assert not os.path.islink(claim.path)
    assert claim.read_bytes() == b"payload"
    claim.finish()
    assert victim.untouched()
    assert store_entries(store) == []


def test_release_onto_a_planted_symlink(store: FileStore, victim: Victim) -> None:
    name = store.add(b"payload")
    claim = store.claim()
    assert claim is not None
    plant(area(store, "new", f"{name}:1,A1"), victim.file)
    with pytest.raises(FileExistsError) as info:
        claim.release()
    assert info.value.filename == area(store, "new", f"{name}:1,A1")
    # the claim is still held, and still the message
    assert claim.read_bytes() == b"payload"
    assert victim.untouched()
    os.unlink(area(store, "new", f"{name}:1,A1"))
    assert claim.release() == area(store, "new", f"{name}:1,A1")
    assert Path(area(store, "new", f"{name}:1,A1")).read_bytes() == b"payload"


def test_recover_around_a_planted_symlink(store: FileStore, victim: Victim) -> None:
    # One planted name must not keep every later claim from being recovered.
    first, second = store.add(b"first"), store.add(b"second")
    held = [store.claim(), store.claim()]
    assert [c.name for c in held if c is not None] == [first, second]
    plant(area(store, "new", f"{first}:1,A1"), victim.file)
    # the clash is reported, after every other claim was recovered
    with pytest.raises(FileExistsError) as info:
        store.recover(0)
    assert info.value.filename == area(store, "new", f"{first}:1,A1")
    assert Path(area(store, "new", f"{second}:1,A1")).read_bytes() == b"second"
    # the blocked claim is still there, not lost
    assert held[0] is not None
    assert held[0].read_bytes() == b"first"
    assert os.readlink(area(store, "new", f"{first}:1,A1")) == str(victim.file)
    assert victim.untouched()


@pytest.mark.parametrize("how", ["release", "recover"])
def test_dead_letters_never_follow_a_planted_dead_directory(
    tmp_path: Path, victim: Victim, how: str
) -> None:
    # dead/ is made when the first message dies: until then its name is free
    # for anyone who can write the store's directory.
    store = FileStore(tmp_path / "store", max_attempts=1)
    store.prepare()
    plant(os.path.join(store.path, "dead"), victim.dir)
    name = store.add(b"poison")
    claim = store.claim()
    assert claim is not None
    with pytest.raises(OSError) as info:
        claim.release() if how == "release" else store.recover(0)
    assert info.value.errno in (errno.ENOTDIR, errno.ELOOP)
    assert info.value.filename == os.path.join(store.path, "dead")
    assert victim.untouched()
    assert claim.read_bytes() == b"poison"
    assert name not in "".join(os.listdir(victim.dir))


def test_clean_removes_planted_links_without_following(store: FileStore, victim: Victim) -> None:
    links = [
        area(store, "tmp", "stale-link"),
        area(store, "tmp", "stale-dir-link"),
        area(store, "new", ".m.atomstore-0123456789ab.new"),
        area(store, "cur", ".m.atomstore-0123456789ab.tmp"),
    ]
    plant(links[0], victim.file)
    for link in links[1:]:
        plant(link, victim.dir)
    then = time.time() - 3600
    for link in links:
        os.utime(link, (then, then), follow_symlinks=False)
    assert sorted(store.clean(60)) == sorted(links)
    assert store_entries(store) == []
    assert victim.untouched()


def test_a_fifo_planted_in_new_does_not_hang_its_consumer(store: FileStore) -> None:
    # Opening a FIFO for reading blocks until someone opens it for writing:
    # a consumer that opens what it claimed without care waits for ever.
    # Such an entry is never handed out: it stays in new/, and the messages
    # behind it flow.
    os.mkfifo(area(store, "new", "0-planted"))
    store.add(b"payload")
    with deadline(5):
        claim = store.claim()
        assert claim is not None
        assert claim.read_bytes() == b"payload"
        claim.finish()
        assert store.claim() is None
    assert store_entries(store) == ["new/0-planted"]
    # Reached through a claim's name in cur/, it is refused without blocking.
    planted = area(store, "cur", "m:1,A0,C1,P1,Tabc")
    os.mkfifo(planted)
    with deadline(5):
        with pytest.raises(OSError) as info:
            store.claimed(planted).read_bytes()
    assert info.value.filename == planted


def test_copy_of_a_planted_fifo_does_not_hang(store: FileStore) -> None:
    os.mkfifo(area(store, "cur", "fifo"))
    with deadline(5):
        with pytest.raises(OSError) as info:
            store.copy("fifo", "cur", "new")
    assert info.value.errno == errno.EINVAL
    assert info.value.filename == area(store, "cur", "fifo")
    assert store_entries(store) == ["cur/fifo"]


# -- atomic.file ------------------------------------------------------------


def test_file_destination_swapped_for_a_symlink_is_replaced_not_followed(
    tmp_path: Path, victim: Victim
) -> None:
    for follow in (False, True):
        dest = tmp_path / "state"
        dest.write_text("v1")
        with atomic.file(dest, overwrite=True, follow_symlinks=follow) as f:
            f.write("v2")
            dest.unlink()
            plant(dest, victim.file)
        assert not dest.is_symlink()
        assert dest.read_text() == "v2"
        assert victim.untouched()
        assert sorted(os.listdir(tmp_path)) == ["outside", "state"]
        dest.unlink()


def test_file_destination_planted_while_writing_is_refused(tmp_path: Path, victim: Victim) -> None:
    dest = tmp_path / "state"
    for target in (victim.file, victim.missing):
        with pytest.raises(FileExistsError) as info:
            with atomic.file(dest, follow_symlinks=False) as f:
                f.write("mine")
                plant(dest, target)
        assert info.value.filename == str(dest)
        assert os.readlink(dest) == str(target)
        assert sorted(os.listdir(tmp_path)) == ["outside", "state"]
        dest.unlink()
    assert victim.untouched()
    assert not victim.missing.exists()


def tokens_from(monkeypatch: pytest.MonkeyPatch, *tokens: str) -> None:
    """Make the staging names' random tokens ``tokens``, then random again."""
    queue = list(tokens)
    real = _names.token
    monkeypatch.setattr(_names, "token", lambda: queue.pop(0) if queue else real())


def test_file_skips_a_temporary_name_planted_in_advance(
    tmp_path: Path, victim: Victim, monkeypatch: pytest.MonkeyPatch
) -> None:
    planted = tmp_path / ".state.atomstore-0123456789ab.tmp"
    plant(planted, victim.file)
    tokens_from(monkeypatch, "0123456789ab")
    atomic.write_bytes(tmp_path / "state", b"mine")
    assert (tmp_path / "state").read_bytes() == b"mine"
    assert os.readlink(planted) == str(victim.file)
    assert victim.untouched()


# -- atomic.folder ----------------------------------------------------------


def fill(staging: Path, version: str) -> None:
    (staging / "a.txt").write_text(f"a {version}")
    (staging / "sub").mkdir()
    (staging / "sub" / "b.txt").write_text(f"b {version}")


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A published tree, version v1, in a directory of its own."""
    parent = tmp_path / "www"
    parent.mkdir()
    with atomic.folder(parent / "site") as staging:
        fill(staging, "v1")
    return parent / "site"


def test_folder_destination_swapped_for_a_symlink(site: Path, victim: Victim) -> None:
    with pytest.raises(NotADirectoryError) as info:
        with atomic.folder(site, overwrite=True) as staging:
            fill(staging, "v2")
            site.rename(site.parent / "moved")
            plant(site, victim.dir)
    assert info.value.filename == str(site)
    assert os.readlink(site) == str(victim.dir)
    assert sorted(os.listdir(site.parent)) == ["moved", "site"]
    assert victim.untouched()


def test_folder_destination_swapped_at_the_exchange(
    site: Path, victim: Victim, trace: Recorder
) -> None:
    # The link appears after the last check, just before the exchange: the
    # exchange moves the link aside and the cleanup removes the link alone.
    def swap_then_exchange(src: str, dst: str, flags: int) -> None:
        if dst == str(site) and not os.path.islink(site):
            site.rename(site.parent / "moved")
            plant(site, victim.dir)
        _renameat2.renameat2(src, dst, flags)

    trace.replace["renameat2"] = swap_then_exchange
    with atomic.folder(site, overwrite=True) as staging:
        fill(staging, "v2")
    assert tree(site) == {"a.txt": "a v2", "sub/": "", "sub/b.txt": "b v2"}
    assert sorted(os.listdir(site.parent)) == ["moved", "site"]
    assert victim.untouched()


@pytest.mark.parametrize("durable", [True, False])
def test_staging_subdirectory_swapped_before_commit(
    site: Path, victim: Victim, trace: Recorder, durable: bool
) -> None:
    with atomic.folder(site, overwrite=True, durable=durable) as staging:
        fill(staging, "v2")
        (staging / "sub").rename(staging.parent / "stolen")
        plant(staging / "sub", victim.dir)
    # published as it stood, the link among the files, never synced through
    assert tree(site) == {"a.txt": "a v2", "sub": f"-> {victim.dir}"}
    assert not [p for p in trace.fsynced_paths() if p.startswith(str(victim.dir))]
    assert not [c for c in trace.named("open") if str(victim.dir) in c.path(trace.fds)]
    # and replacing that tree removes the link, not what it points at
    with atomic.folder(site, overwrite=True) as staging:
        fill(staging, "v3")
    assert tree(site)["a.txt"] == "a v3"
    assert victim.untouched()


def test_staging_subdirectory_swapped_during_the_tree_sync(
    site: Path, victim: Victim, trace: Recorder
) -> None:
    # Swapped between the listing that saw a directory and its opening: the
    # opening refuses the link (O_NOFOLLOW), the write fails, nothing moves.
    def swap_then_open(path: str, flags: int, mode: int = 0o777, dir_fd: int | None = None) -> int:
        if path == "sub" and dir_fd is not None and not os.path.islink(path_of(dir_fd, path)):
            real = path_of(dir_fd, path)
            os.rename(real, site.parent / "stolen")
            plant(real, victim.dir)
        return os.open(path, flags, mode, dir_fd=dir_fd)

    def path_of(dir_fd: int, name: str) -> str:
        return os.path.join(trace.fds[dir_fd], name)

    trace.replace["open"] = swap_then_open
    with pytest.raises(OSError) as info:
        with atomic.folder(site, overwrite=True) as staging:
            fill(staging, "v2")
    # O_NOFOLLOW|O_DIRECTORY on a link: ENOTDIR on Linux, ELOOP elsewhere
    assert info.value.errno in (errno.ENOTDIR, errno.ELOOP)
    assert tree(site) == {"a.txt": "a v1", "sub/": "", "sub/b.txt": "b v1"}
    assert sorted(os.listdir(site.parent)) == ["site", "stolen"]
    assert victim.untouched()


@pytest.mark.parametrize("change", ["removed", "added"])
def test_staging_files_changed_during_the_tree_sync(
    site: Path, trace: Recorder, change: str
) -> None:
    # Another process changes the staging tree while it is being synced:
    # what is published is complete as it stands, or nothing changes.
    touched: list[str] = []

    def change_then_open(
        path: str, flags: int, mode: int = 0o777, dir_fd: int | None = None
    ) -> int:
        if path == "a.txt" and dir_fd is not None and not touched:
            staging = Path(trace.fds[dir_fd])
            touched.append(str(staging))
            if change == "removed":
                (staging / "sub" / "b.txt").unlink()
            else:
                (staging / "sub" / "late.txt").write_text("late")
        return os.open(path, flags, mode, dir_fd=dir_fd)

    trace.replace["open"] = change_then_open
    with atomic.folder(site, overwrite=True) as staging:
        fill(staging, "v2")
    assert touched
    expected = {"a.txt": "a v2", "sub/": "", "sub/b.txt": "b v2"}
    if change == "removed":
        del expected["sub/b.txt"]
    else:
        expected["sub/late.txt"] = "late"
    assert tree(site) == expected
    assert sorted(os.listdir(site.parent)) == ["site"]


def test_folder_skips_a_staging_name_planted_in_advance(
    site: Path, victim: Victim, monkeypatch: pytest.MonkeyPatch
) -> None:
    planted = site.parent / ".site.atomstore-0123456789ab.new"
    plant(planted, victim.dir)
    tokens_from(monkeypatch, "0123456789ab")
    with atomic.folder(site, overwrite=True) as staging:
        assert staging != planted
        fill(staging, "v2")
    assert tree(site)["a.txt"] == "a v2"
    assert os.readlink(planted) == str(victim.dir)
    assert sorted(os.listdir(site.parent)) == [planted.name, "site"]
    assert victim.untouched()


def test_abandoned_tree_with_a_planted_link_is_removed_alone(site: Path, victim: Victim) -> None:
    # The link planted in the staging tree points outside; the block fails
    # and the cleanup removes the staging tree: the link goes, not its target.
    with pytest.raises(RuntimeError):
        with atomic.folder(site, overwrite=True) as staging:
            fill(staging, "v2")
            plant(staging / "escape", victim.dir)
            plant(staging / "sub" / "escape-file", victim.file)
            raise RuntimeError("abandon")
    assert tree(site)["a.txt"] == "a v1"
    assert sorted(os.listdir(site.parent)) == ["site"]
    assert victim.untouched()
