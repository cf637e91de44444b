"""FileStore: the classic API made safe, and the work queue."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from alarms import deadline
from atomstore import Area, Claim, ClaimLostError, FileStore
from atomstore._info import escape_hostname, join_info, split_info
from atomstore._rename import Capabilities
from atomstore._store import MESSAGE_NAME_MAX
from fstree import store_entries
from tracing import ANONYMOUS_NAME, Recorder, named_staging


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    s = FileStore(tmp_path / "store")
    s.prepare()
    return s


def names(store: FileStore, area: Area) -> list[str]:
    return [os.path.basename(p) for p in store.list(area)]


# -- the classic walk-through ---------------------------------------------


def test_classic_walk_through(tmp_path: Path) -> None:
    store_dir = tmp_path / "store1"
    store_dir.mkdir()
    store = FileStore(str(store_dir))
    assert repr(store) == f"FileStore({str(store_dir)!r})"
    assert os.listdir(store_dir) == []

    store.prepare()
    assert sorted(os.listdir(store_dir)) == ["cur", "new", "tmp"]
    store.prepare()
    assert sorted(os.listdir(store_dir)) == ["cur", "new", "tmp"]
    shutil.rmtree(store_dir)
    assert os.listdir(tmp_path) == []
    store.prepare()
    assert os.listdir(tmp_path) == ["store1"]
    assert sorted(os.listdir(store_dir)) == ["cur", "new", "tmp"]

    f = store.create("a-file")
    assert f.name == str(store_dir / "tmp" / "a-file")
    assert f.mode == "w"
    assert store.list("tmp") == [str(store_dir / "tmp" / "a-file")]
    f.write("The duck stays outside!")
    f.close()

    store.move("a-file", "tmp", "new")
    assert store.list("tmp") == []
    assert store.list("new") == [str(store_dir / "new" / "a-file")]
    store.move("a-file", "new", "cur")
    assert store.list("new") == []
    assert store.list("cur") == [str(store_dir / "cur" / "a-file")]

    store.copy("a-file", "cur", "tmp")
    assert store.list("cur") == [str(store_dir / "cur" / "a-file")]
    assert store.list("tmp") == [str(store_dir / "tmp" / "a-file")]
    assert (store_dir / "tmp" / "a-file").read_text() == "The duck stays outside!"

    store.remove("a-file", "cur")
    assert store.list("cur") == []
    assert sorted(os.listdir(store_dir)) == ["cur", "new", "tmp"]


def test_paths_may_be_pathlike_and_are_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = FileStore("rel")
    assert store.path == str(tmp_path / "rel")
    assert repr(store) == f"FileStore({str(tmp_path / 'rel')!r})"
    assert FileStore(Path("rel")).path == store.path


def test_store_path_type_checked() -> None:
    with pytest.raises(TypeError, match=r"path must be str or os\.PathLike"):
        FileStore(b"/tmp/x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must not be empty"):
        FileStore("")


# -- prepare --------------------------------------------------------------


def test_prepare_creates_missing_parents(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "a" / "b" / "store")
    store.prepare()
    assert sorted(os.listdir(tmp_path / "a" / "b" / "store")) == ["cur", "new", "tmp"]


def test_prepare_on_a_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "store").write_text("not a directory")
    with pytest.raises(NotADirectoryError) as info:
        FileStore(tmp_path / "store").prepare()
    assert info.value.errno == errno.ENOTDIR
    assert info.value.filename == str(tmp_path / "store")
    assert (tmp_path / "store").read_text() == "not a directory"


def test_prepare_with_an_area_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "new").write_text("x")
    with pytest.raises(NotADirectoryError) as info:
        FileStore(tmp_path / "store").prepare()
    assert info.value.filename == str(tmp_path / "store" / "new")


def test_prepare_is_durable(tmp_path: Path, trace: Recorder) -> None:
    FileStore(tmp_path / "store").prepare()
    assert sorted(trace.fsynced_paths()) == [str(tmp_path), str(tmp_path / "store")]
    trace.calls.clear()
    FileStore(tmp_path / "store").prepare()
    assert trace.calls == []


def test_unprepared_store_errors_name_the_area(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    with pytest.raises(FileNotFoundError, match="prepared") as info:
        store.create("x")
    assert info.value.filename == str(tmp_path / "store" / "tmp")
    with pytest.raises(FileNotFoundError, match="prepared") as info:
        store.add(b"x")
    assert info.value.filename == str(tmp_path / "store" / "new")
    with pytest.raises(FileNotFoundError, match="prepared"):
        store.list("new")
    with pytest.raises(FileNotFoundError, match="prepared"):
        store.claim()


# -- validation -----------------------------------------------------------


@pytest.mark.parametrize("area", ["", "nEw", "../tmp", "tmp/", "dead/", None, 1])
def test_unknown_area(store: FileStore, area: object) -> None:
    with pytest.raises(ValueError, match="unknown area") as info:
        store.list(area)  # type: ignore[arg-type]
    assert repr(area) in str(info.value)
    with pytest.raises(ValueError, match="unknown area"):
        store.move("x", "tmp", area)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "must be a file name"),
        (".", "must be a file name"),
        ("..", "must be a file name"),
        ("../x", "not a file of this store"),
        ("a/b", "not a file of this store"),
        ("/etc/passwd", "not a file of this store"),
        ("a\0b", "NUL"),
        (".hidden", "reserved"),
        ("x" * 256, "longer than 255 bytes|longer than 199 bytes"),
        ("\u00e9" * 128, "longer than 255 bytes|longer than 199 bytes"),
    ],
)
def test_bad_names(store: FileStore, name: str, message: str) -> None:
    for call in (
        lambda: store.create(name),
        lambda: store.move(name, "tmp", "new"),
        lambda: store.copy(name, "tmp", "new"),
        lambda: store.remove(name, "tmp"),
    ):
        with pytest.raises(ValueError, match=message):
            call()
    assert store_entries(store) == []


@pytest.mark.parametrize("name", [b"bytes", 3, None])
def test_name_type_checked(store: FileStore, name: object) -> None:
    with pytest.raises(TypeError, match=r"name must be str or os\.PathLike"):
        store.move(name, "tmp", "new")  # type: ignore[arg-type]


def test_listed_path_is_accepted_as_name(store: FileStore) -> None:
    with store.create("msg") as f:
        f.write("m")
    (path,) = store.list("tmp")
    store.move(path, "tmp", "new")
    (path,) = store.list("new")
    store.move(Path(path), "new", "cur")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a file of this store's 'new' area"):
        store.remove(store.list("cur")[0], "new")
    store.remove(store.list("cur")[0], "cur")
    assert store_entries(store) == []


def test_longest_name_is_fine(store: FileStore) -> None:
    # The longest name the store accepts for a message still has room for a
    # claim's info part (attempts, time, pid and token).
    name = "x" * MESSAGE_NAME_MAX
    with store.create(name) as f:
        f.write("x")
    store.move(name, "tmp", "new")
    assert names(store, "new") == [name]
    claim = store.claim()
    assert claim is not None
    assert claim.name == name
    claim.release()
    again = store.claim()
    assert again is not None
    assert again.name == name
    assert again.attempts == 1
    again.finish()


def test_a_name_without_room_for_a_claim_is_refused(store: FileStore) -> None:
    name = "x" * (MESSAGE_NAME_MAX + 1)
    with pytest.raises(ValueError, match="a claim adds its info part"):
        store.create(name)
    assert store_entries(store) == []


# -- create ---------------------------------------------------------------


def test_create_never_truncates(store: FileStore) -> None:
    with store.create("a") as f:
        f.write("first")
    with pytest.raises(FileExistsError) as info:
        store.create("a")
    assert info.value.errno == errno.EEXIST
    assert info.value.filename == os.path.join(store.path, "tmp", "a")
    assert Path(store.path, "tmp", "a").read_text() == "first"


def test_create_never_follows_a_planted_symlink(store: FileStore, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    os.symlink(victim, os.path.join(store.path, "tmp", "a"))
    with pytest.raises(FileExistsError):
        store.create("a")
    dangling = tmp_path / "would-be-created"
    os.symlink(dangling, os.path.join(store.path, "tmp", "b"))
    with pytest.raises(FileExistsError):
        store.create("b")
    assert victim.read_text() == "precious"
    assert not dangling.exists()


def test_create_modes_and_keywords(store: FileStore) -> None:
    with store.create("bin", "wb") as f:
        assert f.mode == "wb"
        f.write(b"\x00\x01")
    with store.create("text", encoding="utf-16", newline="\r\n") as f:
        f.write("a\n")
    assert Path(store.path, "tmp", "bin").read_bytes() == b"\x00\x01"
    assert Path(store.path, "tmp", "text").read_bytes().decode("utf-16") == "a\r\n"
    with pytest.raises(ValueError, match="invalid mode 'r'"):
        store.create("c", "r")
    with pytest.raises(ValueError, match="invalid mode 'a'"):
        store.create("c", "a")
    assert names(store, "tmp") == ["bin", "text"]


def test_create_without_a_name_is_unique(store: FileStore) -> None:
    files = [store.create() for _ in range(3)]
    for f in files:
        f.close()
    assert len({f.name for f in files}) == 3
    assert sorted(f.name for f in files) == store.list("tmp")


# -- move, copy, remove ---------------------------------------------------


def put(store: FileStore, area: str, name: str, content: str) -> None:
    Path(store.path, area, name).write_text(content)


def test_move_never_clobbers(store: FileStore) -> None:
    put(store, "tmp", "a", "mine")
    put(store, "new", "a", "theirs")
    with pytest.raises(FileExistsError) as info:
        store.move("a", "tmp", "new")
    assert info.value.filename == os.path.join(store.path, "new", "a")
    assert Path(store.path, "tmp", "a").read_text() == "mine"
    assert Path(store.path, "new", "a").read_text() == "theirs"
    store.move("a", "tmp", "new", overwrite=True)
    assert store_entries(store) == ["new/a"]
    assert Path(store.path, "new", "a").read_text() == "mine"


def test_move_of_a_missing_file(store: FileStore) -> None:
    with pytest.raises(FileNotFoundError) as info:
        store.move("a", "new", "cur")
    assert info.value.errno == errno.ENOENT
    assert info.value.filename == os.path.join(store.path, "new", "a")


def test_move_to_the_same_area(store: FileStore) -> None:
    put(store, "new", "a", "x")
    with pytest.raises(ValueError, match="same area"):
        store.move("a", "new", "new")


def test_move_durability(store: FileStore, trace: Recorder) -> None:
    with store.create("a") as f:
        f.write("x")
    store.move("a", "tmp", "new")
    synced = trace.fsynced_paths()
    tmp, new = (os.path.join(store.path, a) for a in ("tmp", "new"))
    assert synced == [os.path.join(tmp, "a"), new, tmp]
    trace.calls.clear()
    store.move("a", "new", "cur")
    assert trace.fsynced_paths() == [os.path.join(store.path, "cur"), new]


def test_not_durable_store_makes_no_fsync(tmp_path: Path, trace: Recorder) -> None:
    store = FileStore(tmp_path / "s", durable=False)
    store.prepare()
    with store.create("a") as f:
        f.write("x")
    store.move("a", "tmp", "new")
    store.copy("a", "new", "cur")
    store.remove("a", "cur")
    store.add(b"y")
    claim = store.claim()
    assert claim is not None
    claim.release()
    claim = store.claim()
    assert claim is not None
    claim.finish()
    store.recover(0)
    assert trace.count("fsync") == 0


def test_copy_keeps_content_and_mode(store: FileStore) -> None:
    put(store, "cur", "a", "content")
    os.chmod(os.path.join(store.path, "cur", "a"), 0o604)
    store.copy("a", "cur", "new")
    copied = Path(store.path, "new", "a")
    assert copied.read_text() == "content"
    assert stat.S_IMODE(copied.stat().st_mode) == 0o604
    assert store_entries(store) == ["new/a", "cur/a"]


def test_copy_never_clobbers_and_never_shows_half(store: FileStore, trace: Recorder) -> None:
    put(store, "cur", "a", "x" * 3_000_000)
    put(store, "tmp", "a", "theirs")
    with pytest.raises(FileExistsError):
        store.copy("a", "cur", "tmp")
    assert Path(store.path, "tmp", "a").read_text() == "theirs"
    store.copy("a", "cur", "tmp", overwrite=True)
    assert Path(store.path, "tmp", "a").read_text() == "x" * 3_000_000
    temps = {c.args[0] for c in trace.named("open") if ".atomstore-" in c.args[0]}
    (temp,) = temps
    assert os.path.basename(temp).startswith(".a.atomstore-")
    assert store_entries(store) == ["tmp/a", "cur/a"]


def test_copy_appearing_name_is_not_clobbered(store: FileStore, trace: Recorder) -> None:
    from atomstore import _renameat2

    put(store, "cur", "a", "mine")

    def renameat2_after_appearing(src: str, dst: str, flags: int) -> None:
        if not os.path.exists(dst):
            put(store, "new", "a", "theirs")
        _renameat2.renameat2(src, dst, flags)

    trace.replace["renameat2"] = renameat2_after_appearing
    with pytest.raises(FileExistsError):
        store.copy("a", "cur", "new")
    assert Path(store.path, "new", "a").read_text() == "theirs"
    assert store_entries(store) == ["new/a", "cur/a"]


def test_copy_refuses_a_symlink(store: FileStore, tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("s")
    os.symlink(tmp_path / "secret", os.path.join(store.path, "cur", "a"))
    with pytest.raises(OSError) as info:
        store.copy("a", "cur", "new")
    assert info.value.errno == errno.ELOOP
    assert names(store, "new") == []


def test_copy_of_a_missing_file(store: FileStore) -> None:
    with pytest.raises(FileNotFoundError):
        store.copy("a", "cur", "new")
    assert store_entries(store) == []


def test_copy_write_failure_leaves_nothing(store: FileStore, trace: Recorder) -> None:
    put(store, "cur", "a", "content")
    trace.fail("write", errno.ENOSPC)
    with pytest.raises(OSError) as info:
        store.copy("a", "cur", "new")
    assert info.value.errno == errno.ENOSPC
    assert store_entries(store) == ["cur/a"]


def test_remove(store: FileStore, trace: Recorder) -> None:
    put(store, "new", "a", "x")
    store.remove("a", "new")
    assert store_entries(store) == []
    assert trace.fsynced_paths() == [os.path.join(store.path, "new")]
    with pytest.raises(FileNotFoundError) as info:
        store.remove("a", "new")
    assert info.value.filename == os.path.join(store.path, "new", "a")


def test_list_sorts_and_hides_staging(store: FileStore) -> None:
    for name in ("b", "a", "c", ".a.atomstore-0123456789ab.tmp"):
        put(store, "new", name, name)
    assert names(store, "new") == ["a", "b", "c"]


# -- unique names ---------------------------------------------------------


def test_unique_names_sort_by_time_and_carry_the_host(tmp_path: Path) -> None:
    store = FileStore(tmp_path, hostname="web:1/a,b")
    first = store.unique_name()
    time.sleep(0.002)
    second = store.unique_name()
    assert first < second
    assert first.endswith(".web\\0721\\057a\\054b")
    assert "/" not in first
    assert ":" not in first
    assert not first.startswith(".")
    assert f"P{os.getpid()}Q" in first


def test_unique_names_across_threads_and_processes(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    seen: list[str] = []

    def make() -> None:
        seen.extend(store.unique_name() for _ in range(2000))

    threads = [threading.Thread(target=make) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read)
        os.write(write, "\n".join(store.unique_name() for _ in range(500)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = pipe.read().split("\n")
    os.waitpid(pid, 0)
    assert len(set(seen + child)) == len(seen) + len(child) == 8500


def test_hostname_option(tmp_path: Path) -> None:
    assert FileStore(tmp_path, hostname="a").unique_name().endswith(".a")
    with pytest.raises(ValueError, match="hostname"):
        FileStore(tmp_path, hostname="")
    assert escape_hostname("a\\b") == "a\\134b"


def test_info_round_trip() -> None:
    assert split_info("plain") == ("plain", {})
    assert split_info("a:2,S") == ("a:2,S", {})
    assert split_info("a:b:1,A2,C5") == ("a:b", {"A": "2", "C": "5"})
    assert join_info("a", {}) == "a"
    assert join_info("a", {"A": "1"}) == "a:1,A1"


# -- add and claim --------------------------------------------------------


@pytest.mark.parametrize("named", [False, True])
def test_add_delivers_into_new(store: FileStore, trace: Recorder, named: bool) -> None:
    with contextlib.ExitStack() as stack:
        if named:  # where O_TMPFILE is missing: staged in tmp/ under its name
            stack.enter_context(named_staging())
        store.add(b"warm up the probe")
        store.claim().finish()  # type: ignore[union-attr]
        trace.calls.clear()
        name = store.add(b"hello")
    assert names(store, "new") == [name]
    assert Path(store.path, "new", name).read_bytes() == b"hello"
    assert store_entries(store) == [f"new/{name}"]
    tmp, new = (os.path.join(store.path, a) for a in ("tmp", "new"))
    staged = os.path.join(tmp, name) if named else os.path.join(new, ANONYMOUS_NAME)
    assert trace.fsynced_paths() == [staged, new]


def test_add_text_and_types(store: FileStore) -> None:
    a = store.add("h\u00e9")
    b = store.add("h\u00e9", encoding="latin-1")
    assert Path(store.path, "new", a).read_bytes() == b"h\xc3\xa9"
    assert Path(store.path, "new", b).read_bytes() == b"h\xe9"
    with pytest.raises(TypeError, match="bytes-like, str or a binary file"):
        store.add(3)  # type: ignore[arg-type]


@pytest.mark.parametrize("fault", ["write", "fsync", "renameat2", "link_fd"])
def test_add_failure_leaves_nothing(store: FileStore, trace: Recorder, fault: str) -> None:
    store.add(b"probe")
    store.claim().finish()  # type: ignore[union-attr]
    trace.fail(fault, errno.EIO)
    with pytest.raises(OSError) as info, contextlib.ExitStack() as stack:
        if fault == "renameat2":
            stack.enter_context(named_staging())
        store.add(b"x" * 1000)
    assert info.value.errno == errno.EIO
    assert store_entries(store) == []


def test_claim_takes_the_oldest(store: FileStore) -> None:
    first = store.add(b"1")
    second = store.add(b"2")
    claim = store.claim()
    assert isinstance(claim, Claim)
    assert claim.name == first
    assert claim.attempts == 0
    assert claim.read_bytes() == b"1"
    assert claim.read_text() == "1"
    assert abs(claim.claimed_at - time.time()) < 60
    assert os.path.dirname(claim.path) == os.path.join(store.path, "cur")
    base, fields = split_info(os.path.basename(claim.path))
    assert base == first
    assert fields["P"] == str(os.getpid())
    assert fields["T"] == claim.token
    assert names(store, "new") == [second]
    assert repr(claim) == f"<Claim {first!r} attempts=0>"


def test_claim_of_an_empty_store(store: FileStore) -> None:
    assert store.claim() is None


def test_claim_durability(store: FileStore, trace: Recorder) -> None:
    store.add(b"x")
    trace.calls.clear()
    claim = store.claim()
    assert claim is not None
    new, cur = (os.path.join(store.path, a) for a in ("new", "cur"))
    assert trace.fsynced_paths() == [cur, new]
    trace.calls.clear()
    claim.finish()
    assert trace.fsynced_paths() == [cur]


def test_finish_and_release(store: FileStore) -> None:
    name = store.add(b"x")
    claim = store.claim()
    assert claim is not None
    assert claim.release() == os.path.join(store.path, "new", f"{name}:1,A1")
    assert names(store, "new") == [f"{name}:1,A1"]
    again = store.claim()
    assert again is not None
    assert again.name == name
    assert again.attempts == 1
    again.finish()
    assert store_entries(store) == []
    with pytest.raises(ClaimLostError):
        again.finish()


def test_claim_context_manager(store: FileStore) -> None:
    store.add(b"ok")
    with store.claim() as claim:  # type: ignore[union-attr]
        assert claim.read_bytes() == b"ok"
    assert store_entries(store) == []
    store.add(b"fails")
    with pytest.raises(RuntimeError):
        with store.claim():  # type: ignore[union-attr]
            raise RuntimeError
    (back,) = names(store, "new")
    assert back.endswith(":1,A1")


def test_claim_open_refuses_a_symlink(store: FileStore, tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("s")
    os.symlink(tmp_path / "secret", os.path.join(store.path, "new", "planted"))
    assert store.claim() is None  # a symlink in new/ is never a candidate
    assert names(store, "new") == ["planted"]
    # One planted in cur/ under a claim's name is not followed either.
    planted = os.path.join(store.path, "cur", "m:1,A0,C1,P1,Tabc")
    os.symlink(tmp_path / "secret", planted)
    claim = store.claimed(planted)
    with pytest.raises(OSError) as info:
        claim.read_bytes()
    assert info.value.errno == errno.ELOOP
    with pytest.raises(ValueError, match="read"):
        claim.open("w")


def test_two_stores_never_claim_the_same(tmp_path: Path) -> None:
    a, b = FileStore(tmp_path), FileStore(tmp_path)
    a.prepare()
    sent = {a.add(str(i)) for i in range(50)}
    got: list[str] = []
    while True:
        ca, cb = a.claim(), b.claim()
        got += [c.name for c in (ca, cb) if c is not None]
        if ca is None and cb is None:
            break
    assert sorted(got) == sorted(sent)


def test_claim_skips_what_another_consumer_took(store: FileStore) -> None:
    first = store.add(b"1")
    second = store.add(b"2")
    assert store.claim().name == first  # type: ignore[union-attr]
    third = store.add(b"3")
    other = FileStore(store.path)
    assert other.claim().name == second  # type: ignore[union-attr]
    # store's backlog still lists the second message: it moves on past it
    claim = store.claim()
    assert claim is not None
    assert claim.name == third


def test_claim_lists_new_once_per_backlog(
    store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(20):
        store.add(str(i))
    listings = 0
    real = os.scandir

    def counting(path: str) -> Any:
        nonlocal listings
        listings += 1
        return real(path)

    monkeypatch.setattr(os, "scandir", counting)
    while store.claim() is not None:
        pass
    assert listings == 2  # one listing of 20 names, one to find new/ empty


def test_claim_threads(store: FileStore) -> None:
    sent = {store.add(str(i)) for i in range(200)}
    got: list[str] = []
    lock = threading.Lock()

    def consume() -> None:
        while (claim := store.claim()) is not None:
            with lock:
                got.append(claim.name)
            claim.finish()

    threads = [threading.Thread(target=consume) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == sorted(sent)
    assert store_entries(store) == []


# -- recover and fencing --------------------------------------------------


def test_recover_returns_stale_claims(store: FileStore) -> None:
    name = store.add(b"x")
    claim = store.claim()
    assert claim is not None
    assert store.recover(3600) == []
    assert store.recover(0) == [os.path.join(store.path, "new", f"{name}:1,A1")]
    assert names(store, "new") == [f"{name}:1,A1"]


def test_fencing_after_recovery(store: FileStore) -> None:
    store.add(b"x")
    slow = store.claim()
    assert slow is not None
    store.recover(0)
    fast = FileStore(store.path).claim()
    assert fast is not None
    assert fast.attempts == 1
    with pytest.raises(ClaimLostError) as info:
        slow.finish()
    assert info.value.errno == errno.ENOENT
    assert info.value.filename == slow.path
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(ClaimLostError):
        slow.release()
    assert Path(fast.path).read_bytes() == b"x"
    fast.finish()
    assert store_entries(store) == []


def test_recover_leaves_classic_files(store: FileStore) -> None:
    put(store, "cur", "classic", "x")
    assert store.recover(0) == []
    assert names(store, "cur") == ["classic"]


def test_recover_accepts_timedelta(store: FileStore) -> None:
    import datetime

    store.add(b"x")
    store.claim()
    assert store.recover(datetime.timedelta(hours=1)) == []
    with pytest.raises(ValueError, match="negative"):
        store.recover(-1)


# -- clean ----------------------------------------------------------------


def test_clean_removes_stale_tmp_files(store: FileStore) -> None:
    put(store, "tmp", "old", "x")
    put(store, "tmp", "young", "y")
    put(store, "new", ".m.atomstore-0123456789ab.tmp", "stage")
    put(store, "new", "message", "keep")
    then = time.time() - 40 * 3600
    for path in ("tmp/old", "new/.m.atomstore-0123456789ab.tmp", "new/message"):
        os.utime(os.path.join(store.path, path), (then, then))
    removed = store.clean()
    assert sorted(removed) == sorted(
        os.path.join(store.path, p) for p in ("tmp/old", "new/.m.atomstore-0123456789ab.tmp")
    )
    assert store_entries(store) == ["tmp/young", "new/message"]
    assert store.clean(0) == [os.path.join(store.path, "tmp", "young")]


def test_clean_removes_stale_fuse_leftovers(store: FileStore) -> None:
    put(store, "cur", ".fuse_hidden0000001a00000002", "finished message")
    put(store, "cur", ".fuse_hidden0000001b00000003", "young")
    put(store, "cur", ".other", "not ours")
    then = time.time() - 40 * 3600
    for name in (".fuse_hidden0000001a00000002", ".other"):
        os.utime(os.path.join(store.path, "cur", name), (then, then))
    assert store.clean() == [os.path.join(store.path, "cur", ".fuse_hidden0000001a00000002")]
    assert store_entries(store) == ["cur/.fuse_hidden0000001b00000003", "cur/.other"]


def test_private_store_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    os.umask(0o022)
    store = FileStore(tmp_path / "private", mode=0o600)
    store.prepare()
    for d in ("", "tmp", "new", "cur"):
        assert stat.S_IMODE(os.stat(os.path.join(store.path, d)).st_mode) == 0o700
    name = store.add(b"x")
    with store.create("c") as f:
        f.write("c")
    store.copy(name, "new", "tmp")
    for p in ("new/" + name, "tmp/c", "tmp/" + name):
        assert stat.S_IMODE(os.stat(os.path.join(store.path, p)).st_mode) == 0o600
    with pytest.raises(ValueError, match="mode"):
        FileStore(tmp_path, mode=0o1777)


def test_store_on_filesystem_without_noreplace(
    tmp_path: Path, force_caps: Callable[..., Capabilities], trace: Recorder
) -> None:
    force_caps(noreplace=False, exchange=False)
    store = FileStore(tmp_path / "s")
    store.prepare()
    name = store.add(b"x")
    claim = store.claim()
    assert claim is not None
    assert claim.name == name
    claim.release()
    put(store, "tmp", "a", "x")
    put(store, "new", "a", "y")
    with pytest.raises(FileExistsError) as info:
        store.move("a", "tmp", "new")
    assert info.value.filename == os.path.join(store.path, "new", "a")
    assert Path(store.path, "tmp", "a").read_text() == "x"
    assert Path(store.path, "new", "a").read_text() == "y"
    assert trace.count("renameat2") == 0
    assert trace.count("link") >= 2


def test_names_of_one_process_sort_in_order_even_when_the_clock_goes_back(
    store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = [store.unique_name() for _ in range(2000)]  # many share a microsecond
    real = time.time_ns()
    clock = iter([real + 10_000_000_000, real - 3_600_000_000_000, real])
    monkeypatch.setattr(time, "time_ns", lambda: next(clock))
    names += [store.unique_name() for _ in range(3)]  # ahead, then set back an hour
    assert sorted(names) == names
    assert len(set(names)) == len(names)


def test_a_cur_area_gone_during_a_claim_is_an_error_not_a_spin(
    store: FileStore, trace: Recorder
) -> None:
    for i in range(3):
        store.add(b"%d" % i)
    cur = os.path.join(store.path, "cur")

    def cur_goes_first(src: str, dst: str) -> None:
        if os.path.isdir(cur):
            os.rmdir(cur)  # after the claim looked at it, before its rename
        os.rename(src, dst)

    trace.replace["rename"] = cur_goes_first
    with deadline(5), pytest.raises(FileNotFoundError, match="prepared") as info:
        store.claim()
    assert info.value.filename == cur
    assert len(store.list("new")) == 3
