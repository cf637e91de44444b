"""Permissions of what the library creates: the umask, and private stores.

By default new files get 0o666 and new directories 0o777, minus the umask,
as ``open()`` and ``mkdir()`` give them.  A store made private with
``FileStore(path, mode=0o600)`` keeps exactly 0o600 files in 0o700
directories, whatever the umask.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import pytest

from acls import default_acl
from atomstore import FileStore, atomic
from tracing import Recorder

UMASKS = [0o000, 0o022, 0o027, 0o077]


@pytest.fixture
def umask() -> Iterator[Callable[[int], None]]:
    saved = os.umask(0o022)
    os.umask(saved)

    def set_umask(value: int) -> None:
        os.umask(value)

    try:
        yield set_umask
    finally:
        os.umask(saved)


def mode(path: str | Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def modes(top: str | Path) -> dict[str, str]:
    """The permission bits of ``top`` and everything below, in octal."""
    found = {".": oct(mode(top))}
    for root, dirs, files in os.walk(top):
        for name in dirs + files:
            path = os.path.join(root, name)
            found[os.path.relpath(path, top)] = oct(mode(path))
    return found


@pytest.mark.parametrize("mask", UMASKS)
def test_atomic_files_honour_the_umask(
    tmp_path: Path, umask: Callable[[int], None], mask: int
) -> None:
    umask(mask)
    with atomic.file(tmp_path / "file") as f:
        f.write("x")
    atomic.write_bytes(tmp_path / "bytes", b"x")
    atomic.write_text(tmp_path / "text", "x")
    with atomic.file(tmp_path / "binary", "wb", durable=False) as f:
        f.write(b"x")
    expected = oct(0o666 & ~mask)
    assert modes(tmp_path) == {
        ".": oct(mode(tmp_path)),
        "file": expected,
        "bytes": expected,
        "text": expected,
        "binary": expected,
    }


@pytest.mark.parametrize("mask", UMASKS)
def test_folder_directories_honour_the_umask(
    tmp_path: Path, umask: Callable[[int], None], mask: int
) -> None:
    umask(mask)
    with atomic.folder(tmp_path / "tree") as staging:
        # the staging directory has its final bits from the start
        assert mode(staging) == 0o777 & ~mask
        (staging / "sub").mkdir()
        (staging / "sub" / "file").write_text("x")
    assert mode(tmp_path / "tree") == 0o777 & ~mask
    # a replaced tree keeps its bits, whatever the umask
    os.chmod(tmp_path / "tree", 0o750)
    umask(0o077 if mask != 0o077 else 0o000)
    with atomic.folder(tmp_path / "tree", overwrite=True) as staging:
        assert mode(staging) == 0o750
    assert mode(tmp_path / "tree") == 0o750


@pytest.mark.parametrize("mask", UMASKS)
def test_store_files_and_directories_honour_the_umask(
    tmp_path: Path, umask: Callable[[int], None], mask: int
) -> None:
    umask(mask)
    store = FileStore(tmp_path / "parent" / "store", max_attempts=1)
    store.prepare()
    with store.create("created") as f:
        f.write("x")
    added = store.add(b"x")
    batched = store.add_many([b"y"])[0]
    dirs, files = oct(0o777 & ~mask), oct(0o666 & ~mask)
    assert modes(tmp_path / "parent") == {
        ".": dirs,
        "store": dirs,
        "store/tmp": dirs,
        "store/new": dirs,
        "store/cur": dirs,
        "store/tmp/created": files,
        f"store/new/{added}": files,
        f"store/new/{batched}": files,
    }
    # dead/ is made later, when a message dies
    claim = store.claim()
    assert claim is not None
    dead = claim.release()
    assert oct(mode(os.path.dirname(dead))) == dirs
    assert oct(mode(dead)) == files


@pytest.mark.parametrize("mask", UMASKS)
def test_store_copy_honours_the_umask(
    tmp_path: Path, umask: Callable[[int], None], mask: int
) -> None:
    # A copy is a new file: the source's bits, minus the umask, as cp(1)
    # without -p gives.
    store = FileStore(tmp_path / "store")
    store.prepare()
    umask(0)
    for source_mode in (0o644, 0o666, 0o600, 0o755):
        name = f"m{source_mode:o}"
        Path(store.path, "cur", name).write_text("x")
        os.chmod(os.path.join(store.path, "cur", name), source_mode)
    umask(mask)
    for source_mode in (0o644, 0o666, 0o600, 0o755):
        name = f"m{source_mode:o}"
        store.copy(name, "cur", "new")
        assert mode(os.path.join(store.path, "new", name)) == source_mode & ~mask, name


PRIVATE_UMASKS = [0o000, 0o022, 0o077, 0o777]


@pytest.mark.parametrize("mask", PRIVATE_UMASKS)
def test_private_store_whatever_the_umask(
    tmp_path: Path, umask: Callable[[int], None], mask: int
) -> None:
    umask(0o022)
    Path(tmp_path, "foreign").write_text("x")
    os.chmod(tmp_path / "foreign", 0o644)
    umask(mask)
    store = FileStore(tmp_path / "store", mode=0o600, max_attempts=1)
    store.prepare()
    with store.create("created") as f:
        f.write("x")
    added = store.add(b"x")
    batched = store.add_many([b"y", b"z"])
    # a file that came from elsewhere with other bits, copied by the store
    os.rename(tmp_path / "foreign", os.path.join(store.path, "cur", "foreign"))
    store.copy("foreign", "cur", "tmp")
    store.remove("foreign", "cur")
    store.copy(added, "new", "cur")
    # claims, releases and recoveries only rename: the bits stay; dead/ is
    # made by the first death
    released = store.claim()
    assert released is not None
    released.release()
    store.claim()
    store.recover(0)
    found = modes(store.path)
    directories = {n: found.pop(n) for n in (".", "tmp", "new", "cur", "dead")}
    assert directories == dict.fromkeys(directories, oct(0o700))
    assert sorted(n.split("/")[0] for n in found) == ["cur", "dead", "dead", "new", "tmp", "tmp"]
    assert {n: m for n, m in found.items() if m != oct(0o600)} == {}
    assert {"tmp/created", "tmp/foreign", f"cur/{added}"} <= set(found)
    assert len(batched) == 2


@pytest.mark.parametrize(
    ("file_mode", "dir_mode"), [(0o600, 0o700), (0o640, 0o750), (0o644, 0o755)]
)
def test_store_mode_gives_directories_search_where_readable(
    tmp_path: Path, umask: Callable[[int], None], file_mode: int, dir_mode: int
) -> None:
    umask(0o077)
    store = FileStore(tmp_path / "store", mode=file_mode)
    store.prepare()
    name = store.add(b"x")
    assert modes(store.path) == {
        ".": oct(dir_mode),
        "tmp": oct(dir_mode),
        "new": oct(dir_mode),
        "cur": oct(dir_mode),
        f"new/{name}": oct(file_mode),
    }


@pytest.mark.parametrize("mask", [0o000, 0o002])
def test_private_store_creates_no_open_parent(
    tmp_path: Path, umask: Callable[[int], None], mask: int
) -> None:
    # A parent made world-writable would let anyone move the private store
    # away and put another in its place.
    umask(mask)
    store = FileStore(tmp_path / "a" / "b" / "store", mode=0o600)
    store.prepare()
    for parent in (tmp_path / "a", tmp_path / "a" / "b"):
        assert mode(parent) & 0o022 == 0, oct(mode(parent))
    assert mode(store.path) == 0o700


# -- a replaced file keeps its mode, set with no fchmod where none is needed --


def _replace_both_ways(path: Path, payload: bytes) -> None:
    atomic.write_bytes(path, payload, overwrite=True)
    with atomic.file(path, "wb", overwrite=True) as f:
        f.write(payload)


@pytest.mark.parametrize("mask", UMASKS)
@pytest.mark.parametrize("kept", [0o644, 0o600, 0o664, 0o640, 0o444, 0o755, 0o000, 0o777])
def test_a_replaced_file_keeps_its_mode_whatever_the_umask(
    tmp_path: Path, umask: Callable[[int], None], trace: Recorder, mask: int, kept: int
) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"old")
    path.chmod(kept)
    umask(mask)
    trace.calls.clear()
    _replace_both_ways(path, b"new")
    assert mode(path) == kept
    assert path.read_bytes() == b"new"
    # Created in its mode but for the group's bits, which wait until the
    # group is known right: an fchmod only for those, or for bits the umask
    # stripped.
    expected = 0 if kept & mask == 0 and kept & 0o070 == 0 else 2
    assert trace.count("fchmod") == expected, trace.calls
    assert os.umask(mask) == mask  # left as it was


def test_a_umask_changed_between_replaces_is_seen(
    tmp_path: Path, umask: Callable[[int], None], trace: Recorder
) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"old")
    path.chmod(0o664)
    umask(0o002)
    _replace_both_ways(path, b"one")  # the umask is remembered: 0o002
    assert mode(path) == 0o664
    umask(0o022)  # which strips the group's write bit
    trace.calls.clear()
    _replace_both_ways(path, b"two")
    assert mode(path) == 0o664
    assert trace.count("fchmod") == 2
    assert os.umask(0o022) == 0o022


def test_special_bits_are_set_after_the_last_write(tmp_path: Path, trace: Recorder) -> None:
    # write(2) by a process without CAP_FSETID clears set-user-ID and
    # set-group-ID: they are set once the data is written.
    path = tmp_path / "f"
    path.write_bytes(b"old")
    path.chmod(0o2755 if os.geteuid() else 0o4755)
    kept = mode(path)
    for how in ("write_bytes", "file"):
        trace.calls.clear()
        if how == "write_bytes":
            atomic.write_bytes(path, b"new", overwrite=True)
        else:
            _replace_with_file(path, b"newer")
        assert mode(path) == kept
        names = [c.name for c in trace.calls]
        last_write = max(i for i, n in enumerate(names) if n == "write")
        assert "fchmod" in names[last_write:], names


def _replace_with_file(path: Path, payload: bytes) -> None:
    with atomic.file(path, "wb", overwrite=True) as f:
        f.write(payload)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
@pytest.mark.parametrize("how", ["write_bytes", "file", "perms"])
def test_an_unprivileged_owner_keeps_set_user_id_bits(how: str) -> None:
    # Under /tmp itself: the test's own directory is root's alone.
    tmp_path = Path(tempfile.mkdtemp(prefix="atomstore-suid-", dir="/tmp"))
    try:
        _replace_as_an_unprivileged_owner(tmp_path, how)
    finally:
        shutil.rmtree(tmp_path)


def _replace_as_an_unprivileged_owner(tmp_path: Path, how: str) -> None:
    tmp_path.chmod(0o777)
    path = tmp_path / "tool"
    path.write_bytes(b"old")
    os.chown(path, 1000, 1000)
    path.chmod(0o6755)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.setgroups([])
            os.setresgid(1000, 1000, 1000)
            os.setresuid(1000, 1000, 1000)
            if how == "write_bytes":
                atomic.write_bytes(path, b"new", overwrite=True)
            elif how == "file":
                _replace_with_file(path, b"new")
            else:
                atomic.write_bytes(tmp_path / "new-tool", b"new", perms=0o6755)
            code = 0
        except BaseException as e:
            os.write(2, f"child: {e!r}\n".encode())
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    target = tmp_path / "new-tool" if how == "perms" else path
    assert target.read_bytes() == b"new"
    assert mode(target) == 0o6755


def test_a_default_acl_of_the_directory_is_not_taken_for_the_umask(
    tmp_path: Path, umask: Callable[[int], None], trace: Recorder
) -> None:
    directory = tmp_path / "acl"
    directory.mkdir()
    try:
        os.setxattr(directory, "system.posix_acl_default", default_acl(6, 0, 0))
    except OSError as e:
        pytest.skip(f"no POSIX ACLs on {tmp_path}: {e}")
    path = directory / "f"
    path.write_bytes(b"old")
    path.chmod(0o644)
    umask(0o022)  # strips nothing of 0o644: only the ACL would
    trace.calls.clear()
    _replace_both_ways(path, b"new")
    assert mode(path) == 0o644
    assert trace.count("fchmod") == 2
    # A new file there gets what the ACL gives, as open() would.
    atomic.write_bytes(directory / "new", b"x")
    assert mode(directory / "new") == 0o600
