"""Bad input everywhere: a clear error naming what was wrong, nothing lost.

Every bad name, area, path, argument, mix-up of files and directories,
missing permission and full disk gets an exception whose type, message or
errno and filename say what was wrong; the store or destination is left
exactly as it was, with no temporary file behind.
"""

from __future__ import annotations

import errno
import io
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

import mounts
from atomstore import FileStore, atomic
from atomstore._rename import Capabilities
from forked import call_as
from needs import need_root, need_tool
from tracing import named_staging

NOBODY = 65534


class BytesPath:
    """An os.PathLike whose path is bytes: atomstore wants str."""

    def __fspath__(self) -> bytes:
        return b"/tmp/bytes-path"


def snapshot(top: str | Path) -> dict[str, Any]:
    """Every entry below ``top``: content, link target or '<dir>', and mode."""
    found: dict[str, Any] = {}
    for root, dirs, files in os.walk(top):
        for name in sorted(dirs + files):
            path = os.path.join(root, name)
            st = os.lstat(path)
            if os.path.islink(path):
                what: Any = "-> " + os.readlink(path)
            elif os.path.isdir(path):
                what = "<dir>"
            else:
                what = Path(path).read_bytes()
            found[os.path.relpath(path, top)] = (what, st.st_mode)
    return found


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    """A store with a file in every area, dead/ included."""
    s = FileStore(tmp_path / "store", max_attempts=1)
    s.prepare()
    s.add(b"dies")
    s.claim().release()  # type: ignore[union-attr]
    s.add(b"waits")
    s.add(b"is claimed")
    s.claim()
    Path(s.path, "tmp", "draft").write_text("draft")
    assert {a: len(s.list(a)) for a in ("tmp", "new", "cur", "dead")} == {
        "tmp": 1,
        "new": 1,
        "cur": 1,
        "dead": 1,
    }
    return s


def name_calls(store: FileStore) -> dict[str, Callable[[Any], object]]:
    """Every store method that takes a name, by a label."""
    return {
        "create": lambda n: store.create(n),
        "move": lambda n: store.move(n, "tmp", "new"),
        "copy": lambda n: store.copy(n, "cur", "tmp"),
        "remove": lambda n: store.remove(n, "new"),
        "claimed": lambda n: store.claimed(n),
        "requeue": lambda n: store.requeue(n),
    }


# -- names ----------------------------------------------------------------

BAD_NAMES = [
    ("", "must be a file name"),
    (".", "must be a file name"),
    ("..", "must be a file name"),
    ("../x", "not a file of this store"),
    ("../../etc/passwd", "not a file of this store"),
    ("a/b", "not a file of this store"),
    ("x/", "not a file of this store"),
    ("/etc/passwd", "not a file of this store"),
    ("a\0b", "NUL"),
    ("\0", "NUL"),
    (".hidden", "reserved"),
    (".x.atomstore-0123456789ab.tmp", "reserved"),
    ("x" * 256, "longer than 255 bytes|longer than 199 bytes"),
    ("\u00e9" * 128, "longer than 255 bytes|longer than 199 bytes"),
]


@pytest.mark.parametrize(("name", "message"), BAD_NAMES)
def test_bad_names_are_named_and_change_nothing(store: FileStore, name: str, message: str) -> None:
    before = snapshot(store.path)
    for label, call in name_calls(store).items():
        with pytest.raises(ValueError, match=message) as info:
            call(name)
        shown = repr(name[:40]) if len(name) > 40 else repr(name)
        assert shown in str(info.value), f"{label}: {info.value}"
    assert snapshot(store.path) == before


@pytest.mark.parametrize(
    ("name", "kind"),
    [(b"bytes", "bytes"), (3, "int"), (None, "NoneType"), (1.5, "float"), (["a"], "list")],
)
def test_names_of_the_wrong_type(store: FileStore, name: object, kind: str) -> None:
    before = snapshot(store.path)
    for label, call in name_calls(store).items():
        if name is None and label == "create":
            continue  # create(None) makes a unique name
        with pytest.raises(TypeError, match=r"name must be str or os\.PathLike") as info:
            call(name)
        assert f"not {kind}" in str(info.value), label
    assert snapshot(store.path) == before


def test_pathlike_name_of_bytes(store: FileStore) -> None:
    before = snapshot(store.path)
    for call in name_calls(store).values():
        with pytest.raises(TypeError, match="not bytes"):
            call(BytesPath())
    assert snapshot(store.path) == before


# -- areas ----------------------------------------------------------------

BAD_AREAS: list[object] = [
    "",
    "nEw",
    "NEW",
    " new",
    "new ",
    "../tmp",
    "tmp/",
    "dead/",
    "new\0",
    ".",
    None,
    1,
    b"new",
]


@pytest.mark.parametrize("bad", BAD_AREAS)
def test_unknown_areas_are_named_and_change_nothing(store: FileStore, bad: Any) -> None:
    before = snapshot(store.path)
    calls: list[Callable[[], object]] = [
        lambda: store.list(bad),
        lambda: store.move("draft", bad, "new"),
        lambda: store.move("draft", "tmp", bad),
        lambda: store.copy("draft", bad, "new"),
        lambda: store.copy("draft", "tmp", bad),
        lambda: store.remove("draft", bad),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="unknown area") as info:
            call()
        assert repr(bad) in str(info.value)
    assert snapshot(store.path) == before


# -- other arguments of the store -----------------------------------------


@pytest.mark.parametrize(
    ("path", "error", "message"),
    [
        (None, TypeError, "not NoneType"),
        (3, TypeError, "not int"),
        (BytesPath(), TypeError, "not bytes"),
        ("store\0x", ValueError, "NUL"),
    ],
)
def test_store_path_checked(path: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        FileStore(path)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", [-1, 0o1000, 0o4600, "0o600", 1.5, True])
def test_store_mode_checked(tmp_path: Path, mode: object) -> None:
    with pytest.raises(ValueError, match="mode must be permission bits") as info:
        FileStore(tmp_path / "s", mode=mode)  # type: ignore[arg-type]
    assert repr(mode) in str(info.value)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("hostname", ["", 3, b"host"])
def test_store_hostname_checked(tmp_path: Path, hostname: object) -> None:
    with pytest.raises(ValueError, match="hostname must be a non-empty str") as info:
        FileStore(tmp_path, hostname=hostname)  # type: ignore[arg-type]
    assert repr(hostname) in str(info.value)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: None, "not NoneType"),
        (lambda: 3, "not int"),
        (lambda: ["a"], "not list"),
        (lambda: io.StringIO("text"), "not a text file"),
        # an empty text file must not pass for an empty message
        (lambda: io.StringIO(""), "text file"),
    ],
)
def test_add_of_bad_data_leaves_nothing(
    store: FileStore, make: Callable[[], Any], message: str
) -> None:
    before = snapshot(store.path)
    with pytest.raises(TypeError, match=message):
        store.add(make())
    with pytest.raises(TypeError, match=message):
        store.add_many([b"fine", make()])
    assert snapshot(store.path) == before


def test_add_of_text_that_cannot_be_encoded(store: FileStore) -> None:
    before = snapshot(store.path)
    with pytest.raises(UnicodeEncodeError):
        store.add("\u20ac", encoding="ascii")
    with pytest.raises(LookupError, match="no-such-codec"):
        store.add("x", encoding="no-such-codec")
    assert snapshot(store.path) == before


@pytest.mark.parametrize(
    ("value", "error"),
    [("soon", TypeError), (None, TypeError), (True, TypeError), (-1, ValueError)],
)
def test_durations_checked(store: FileStore, value: object, error: type[Exception]) -> None:
    before = snapshot(store.path)
    for call in (store.recover, store.clean):
        with pytest.raises(error, match="older_than"):
            call(value)  # type: ignore[arg-type]
    with pytest.raises(error, match="older_than"):
        atomic.clean(store.path, older_than=value)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="older_than must not be negative: nan"):
        store.recover(math.nan)
    assert snapshot(store.path) == before


# -- paths of atomic --------------------------------------------------------


def enter(manager: Any) -> None:
    with manager:
        pass


def atomic_calls(tmp_path: Path) -> dict[str, Callable[[Any], object]]:
    """Every path argument of atomic, by the name its errors give it."""
    ok = str(tmp_path / "ok")
    return {
        "path (file)": lambda p: enter(atomic.file(p)),
        "path (write_bytes)": lambda p: atomic.write_bytes(p, b"x"),
        "path (write_text)": lambda p: atomic.write_text(p, "x"),
        "path (folder)": lambda p: enter(atomic.folder(p)),
        "path (capabilities)": lambda p: atomic.capabilities(p),
        "src": lambda p: atomic.rename(p, ok),
        "dst": lambda p: atomic.rename(ok, p),
        "a": lambda p: atomic.swap(p, ok),
        "b": lambda p: atomic.swap(ok, p),
        "directory": lambda p: atomic.clean(p),
    }


@pytest.mark.parametrize(
    ("path", "error", "message"),
    [
        (b"/tmp/x", TypeError, "must be str or os.PathLike"),
        (BytesPath(), TypeError, "not bytes"),
        (None, TypeError, "not NoneType"),
        (3, TypeError, "not int"),
        ("", ValueError, "must not be empty"),
        ("a\0b", ValueError, "NUL"),
    ],
)
def test_bad_paths_name_the_argument(
    tmp_path: Path, path: object, error: type[Exception], message: str
) -> None:
    Path(tmp_path, "ok").write_text("ok")
    for argument, call in atomic_calls(tmp_path).items():
        with pytest.raises(error, match=message) as info:
            call(path)
        assert str(info.value).startswith(argument.split(" ")[0] + " "), str(info.value)
    assert os.listdir(tmp_path) == ["ok"]


@pytest.mark.parametrize("name", ["x" * 256, "\u00e9" * 128])
def test_names_over_255_bytes_are_named(tmp_path: Path, name: str) -> None:
    dest = str(tmp_path / name)
    (tmp_path / "src").write_text("src")
    calls: dict[str, Callable[[], object]] = {
        "file": lambda: enter(atomic.file(dest)),
        "write_bytes": lambda: atomic.write_bytes(dest, b"x"),
        "write_bytes overwrite": lambda: atomic.write_bytes(dest, b"x", overwrite=True),
        "write_text": lambda: atomic.write_text(dest, "x"),
        "folder": lambda: enter(atomic.folder(dest)),
        "rename": lambda: atomic.rename(tmp_path / "src", dest),
    }
    named = {}
    for label, call in calls.items():
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno == errno.ENAMETOOLONG, label
        names = (info.value.filename, info.value.filename2)
        # rename() names both, as os.rename does; elsewhere the temporary
        # name means nothing to the caller: the error names dest
        named[label] = dest if label == "rename" and dest in names else names[0]
    assert named == dict.fromkeys(calls, dest)
    assert os.listdir(tmp_path) == ["src"]


@pytest.mark.parametrize(
    ("perms", "error"),
    [(-1, ValueError), (0o10000, ValueError), (True, ValueError), ("0o600", TypeError)],
)
def test_bad_perms_are_named(tmp_path: Path, perms: object, error: type[Exception]) -> None:
    dest = tmp_path / "state"
    calls: list[Callable[[], object]] = [
        lambda: enter(atomic.file(dest, perms=perms)),  # type: ignore[call-overload]
        lambda: atomic.write_bytes(dest, b"x", perms=perms),  # type: ignore[arg-type]
        lambda: atomic.write_text(dest, "x", perms=perms),  # type: ignore[arg-type]
    ]
    for call in calls:
        with pytest.raises(error, match="perms") as info:
            call()
        assert repr(perms) in str(info.value) or type(perms).__name__ in str(info.value)
    assert os.listdir(tmp_path) == []


# -- a file where a directory is expected, and the other way round ---------


def test_store_under_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("keep")
    store = FileStore(tmp_path / "file" / "store")
    with pytest.raises(NotADirectoryError) as info:
        store.prepare()
    assert info.value.errno == errno.ENOTDIR
    assert info.value.filename == store.path
    assert (tmp_path / "file").read_text() == "keep"


def named(call: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        with named_staging():
            return call()

    return run


def area_calls(store: FileStore, area: str) -> list[Callable[[], object]]:
    """Calls that need ``area`` to be a directory."""
    if area == "tmp":
        # add() stages in tmp/ only where O_TMPFILE is missing.
        return [
            lambda: store.create("x"),
            named(lambda: store.add(b"x")),
            lambda: store.list("tmp"),
        ]
    if area == "new":
        return [lambda: store.add(b"x"), lambda: store.list("new"), lambda: store.claim()]
    return [lambda: store.claim(), lambda: store.recover(0), lambda: store.list("cur")]


@pytest.mark.parametrize("area", ["tmp", "new", "cur"])
def test_an_area_that_became_a_file(tmp_path: Path, area: str) -> None:
    store = FileStore(tmp_path / "store")
    store.prepare()
    waiting = store.add(b"waits") if area != "new" else None
    directory = os.path.join(store.path, area)
    shutil.rmtree(directory)
    Path(directory).write_text("a file")
    before = snapshot(store.path)
    for call in area_calls(store, area):
        with pytest.raises(NotADirectoryError) as info:
            call()
        named = [info.value.filename, info.value.filename2]
        assert any(n == directory or str(n).startswith(directory + "/") for n in named), named
        assert snapshot(store.path) == before
    if waiting is not None:
        assert Path(store.path, "new", waiting).read_bytes() == b"waits"


def test_dead_letters_area_that_is_a_file(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store", max_attempts=1)
    store.prepare()
    store.add(b"poison")
    claim = store.claim()
    assert claim is not None
    dead = os.path.join(store.path, "dead")
    Path(dead).write_text("a file")
    before = snapshot(store.path)
    for call in (claim.release, lambda: store.recover(0)):
        with pytest.raises(NotADirectoryError) as info:
            call()
        assert info.value.filename == dead
        assert snapshot(store.path) == before
    assert claim.read_bytes() == b"poison"


def test_copy_of_a_directory(store: FileStore) -> None:
    os.mkdir(os.path.join(store.path, "cur", "folder"))
    before = snapshot(store.path)
    with pytest.raises(OSError) as info:
        store.copy("folder", "cur", "new")
    assert info.value.errno in (errno.EISDIR, errno.EINVAL)
    assert info.value.filename == os.path.join(store.path, "cur", "folder")
    assert snapshot(store.path) == before


def test_remove_of_a_directory(store: FileStore) -> None:
    os.mkdir(os.path.join(store.path, "new", "folder"))
    before = snapshot(store.path)
    with pytest.raises(IsADirectoryError) as info:
        store.remove("folder", "new")
    assert info.value.filename == os.path.join(store.path, "new", "folder")
    assert snapshot(store.path) == before


def test_atomic_writes_under_a_file(tmp_path: Path) -> None:
    parent = tmp_path / "file"
    parent.write_text("keep")
    dest = parent / "x"
    calls: list[Callable[[], object]] = [
        lambda: enter(atomic.file(dest)),
        lambda: enter(atomic.file(dest, overwrite=True)),
        lambda: atomic.write_text(dest, "x"),
        lambda: enter(atomic.folder(dest)),
        lambda: enter(atomic.folder(dest, overwrite=True)),
    ]
    for call in calls:
        with pytest.raises(NotADirectoryError) as info:
            call()
        assert info.value.filename in (str(parent), str(dest))
    assert os.listdir(tmp_path) == ["file"]
    assert parent.read_text() == "keep"


def test_rename_onto_a_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("f")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "inside").write_text("i")
    before = snapshot(tmp_path)
    with pytest.raises(FileExistsError) as info:
        atomic.rename(tmp_path / "file", tmp_path / "dir")
    assert info.value.filename == str(tmp_path / "dir")
    with pytest.raises(IsADirectoryError) as again:
        atomic.rename(tmp_path / "file", tmp_path / "dir", overwrite=True)
    assert str(tmp_path / "dir") in (again.value.filename, again.value.filename2)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "caps",
    [{}, {"noreplace": False, "exchange": False}, {"noreplace": False, "hardlinks": False}],
    ids=["renameat2", "link fallback", "last resort"],
)
def test_rename_onto_itself_keeps_the_file(
    tmp_path: Path, force_caps: Callable[..., Capabilities], caps: dict[str, bool]
) -> None:
    # Without RENAME_NOREPLACE a no-clobber rename links the new name, then
    # unlinks the old one: for one and the same name that would remove it.
    force_caps(**caps)
    (tmp_path / "x").write_text("precious")
    with pytest.raises(FileExistsError) as info:
        atomic.rename(tmp_path / "x", tmp_path / "x")
    assert info.value.filename == str(tmp_path / "x")
    assert (tmp_path / "x").read_text() == "precious"
    assert os.listdir(tmp_path) == ["x"]


# -- no write permission: a user other than root ------------------------------


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory another user can reach (tmp_path's parents are private)."""
    path = Path(tempfile.mkdtemp(prefix="atomstore-bad-input-"))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def outcome(call: Callable[[], object]) -> tuple[str, int | None, str | None, str | None]:
    try:
        call()
    except OSError as e:
        return type(e).__name__, e.errno, e.filename, e.filename2
    return "returned", None, None, None


def test_unwritable_store_and_destination(shared_dir: Path) -> None:
    need_root()
    # the directories root makes are 0o755: others may enter, not write
    old_umask = os.umask(0o022)
    try:
        store = FileStore(shared_dir / "store", durable=False)
        store.prepare()
        waiting = store.add(b"waits")
        dest = shared_dir / "dest"
        dest.mkdir()
        (dest / "state").write_text("old")
    finally:
        os.umask(old_umask)
    tmp, new = (os.path.join(store.path, a) for a in ("tmp", "new"))
    before = snapshot(shared_dir)

    def as_nobody() -> dict[str, tuple[str, int | None, str | None, str | None]]:
        other = FileStore(store.path, durable=False)
        return {
            "add": outcome(lambda: other.add(b"x")),
            "create": outcome(lambda: other.create("x")),
            "move": outcome(lambda: other.move(waiting, "new", "cur")),
            "claim": outcome(other.claim),
            "remove": outcome(lambda: other.remove(waiting, "new")),
            "prepare": outcome(FileStore(shared_dir / "another").prepare),
            "write_bytes": outcome(
                lambda: atomic.write_bytes(dest / "state", b"new", overwrite=True)
            ),
            "file": outcome(lambda: enter(atomic.file(dest / "fresh"))),
            "folder": outcome(lambda: enter(atomic.folder(dest / "tree"))),
            "rename": outcome(lambda: atomic.rename(dest / "state", dest / "renamed")),
        }

    found = call_as(NOBODY, NOBODY, as_nobody)
    denied = {label: (kind, code) for label, (kind, code, _, _) in found.items()}
    assert denied == dict.fromkeys(found, ("PermissionError", errno.EACCES))
    names = {label: (f1, f2) for label, (_, _, f1, f2) in found.items()}
    assert names["add"] == (new, None)  # where it makes its unnamed file
    assert names["create"] == (os.path.join(tmp, "x"), None)
    assert names["move"][0] == os.path.join(new, waiting)
    assert names["claim"][0] == os.path.join(new, waiting)
    assert names["remove"] == (os.path.join(new, waiting), None)
    assert names["prepare"] == (str(shared_dir / "another"), None)
    for label in ("write_bytes", "file", "folder"):
        assert names[label] == (str(dest), None), label
    assert names["rename"][0] == str(dest / "state")
    assert snapshot(shared_dir) == before


def test_a_store_of_ones_own_works_as_another_user(shared_dir: Path) -> None:
    # The control for the test above: the same calls as the same user
    # succeed where the directories are that user's.
    need_root()
    os.chown(shared_dir, NOBODY, NOBODY)

    def as_nobody() -> list[str]:
        store = FileStore(shared_dir / "store", durable=False)
        store.prepare()
        store.add(b"x")
        claim = store.claim()
        assert claim is not None
        claim.finish()
        atomic.write_bytes(shared_dir / "state", b"new")
        return sorted(os.listdir(shared_dir))

    assert call_as(NOBODY, NOBODY, as_nobody) == ["state", "store"]
    assert os.stat(shared_dir / "store").st_uid == NOBODY


# -- a full disk --------------------------------------------------------------

MiB = 1 << 20


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, mounted for the test and unmounted after it."""
    need_root()
    need_tool("mount", "umount")
    with mounts.tmpfs(tmp_path / "disk", size_mib=1) as path:
        yield path


def free_blocks(path: Path) -> int:
    return os.statvfs(path).f_bfree


def fill_up(path: Path) -> Path:
    """Fill the disk of ``path`` to the last block; return the filler."""
    filler = path / "filler"
    with open(filler, "wb", buffering=0) as f, pytest.raises(OSError) as info:
        while True:
            f.write(b"\0" * 4096)
    assert info.value.errno == errno.ENOSPC
    return filler


def expect_enospc(call: Callable[[], object]) -> None:
    with pytest.raises(OSError) as info:
        call()
    assert info.value.errno == errno.ENOSPC, info.value


def test_full_disk_file_writes_keep_the_old_version(small_disk: Path) -> None:
    dest = small_disk / "state"
    dest.write_text("old")
    free = free_blocks(small_disk)
    big = b"x" * (2 * MiB)

    def write_with_file() -> None:
        with atomic.file(dest, "wb", overwrite=True) as f:
            f.write(big)

    for call in (
        write_with_file,
        lambda: atomic.write_bytes(dest, big, overwrite=True),
        lambda: atomic.write_text(dest, big.decode(), overwrite=True),
    ):
        expect_enospc(call)
        assert dest.read_text() == "old"
        assert os.listdir(small_disk) == ["state"]
        assert free_blocks(small_disk) == free
    # full to the last block: even three bytes do not fit
    filler = fill_up(small_disk)
    expect_enospc(lambda: atomic.write_bytes(dest, b"new", overwrite=True))
    assert dest.read_text() == "old"
    assert sorted(os.listdir(small_disk)) == ["filler", "state"]
    filler.unlink()
    atomic.write_bytes(dest, b"new", overwrite=True)
    assert dest.read_text() == "new"


def test_full_disk_folder_keeps_the_old_tree(small_disk: Path) -> None:
    site = small_disk / "site"
    with atomic.folder(site) as staging:
        (staging / "index.html").write_text("v1")
    free = free_blocks(small_disk)
    with pytest.raises(OSError) as info:
        with atomic.folder(site, overwrite=True) as staging:
            (staging / "index.html").write_text("v2")
            (staging / "big").write_bytes(b"x" * (2 * MiB))
    assert info.value.errno == errno.ENOSPC
    assert snapshot(site) == {"index.html": (b"v1", os.stat(site / "index.html").st_mode)}
    assert os.listdir(small_disk) == ["site"]
    assert free_blocks(small_disk) == free


def test_full_disk_store_keeps_every_message(small_disk: Path) -> None:
    store = FileStore(small_disk / "store")
    store.prepare()
    waiting = store.add(b"waits")
    big_name = store.add(b"b" * (600 * 1024))
    before = snapshot(store.path)
    free = free_blocks(small_disk)
    for call in (
        lambda: store.add(b"x" * (2 * MiB)),
        lambda: store.add(io.BytesIO(b"x" * (2 * MiB))),
        lambda: store.add_many([b"small", b"x" * (2 * MiB)]),
        lambda: store.copy(big_name, "new", "cur"),
    ):
        expect_enospc(call)
        assert snapshot(store.path) == before
        assert free_blocks(small_disk) == free
    claim = store.claim()
    assert claim is not None
    assert claim.name == waiting
    assert claim.read_bytes() == b"waits"
