"""atomic.folder()."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Callable

import pytest

from atomstore import atomic
from atomstore._rename import Capabilities
from fstree import listing, tree
from tracing import Recorder


def fill(staging: Path, version: str) -> None:
    (staging / "a.txt").write_text(f"a {version}")
    (staging / "sub").mkdir()
    (staging / "sub" / "b.txt").write_text(f"b {version}")


def test_new_folder_appears_complete(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    with atomic.folder(dest) as staging:
        assert isinstance(staging, Path)
        assert staging.parent == tmp_path
        assert staging.name.startswith(".out.atomstore-")
        assert staging.name.endswith(".new")
        assert listing(staging) == []
        fill(staging, "v1")
        assert not dest.exists()
    assert tree(dest) == {"a.txt": "a v1", "sub/": "", "sub/b.txt": "b v1"}
    assert listing(tmp_path) == ["out"]


def test_existing_folder_refused_without_overwrite(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "keep").write_text("precious")
    with pytest.raises(FileExistsError) as info:
        with atomic.folder(dest):
            pass  # pragma: no cover
    assert info.value.errno == errno.EEXIST
    assert info.value.filename == str(dest)
    assert tree(dest) == {"keep": "precious"}
    assert listing(tmp_path) == ["out"]


def test_folder_appearing_meanwhile_is_not_replaced(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    with pytest.raises(FileExistsError):
        with atomic.folder(dest) as staging:
            fill(staging, "mine")
            dest.mkdir()
            (dest / "theirs").write_text("t")
    assert tree(dest) == {"theirs": "t"}
    assert listing(tmp_path) == ["out"]


def test_overwrite_exchanges_and_removes_the_old_tree(tmp_path: Path, trace: Recorder) -> None:
    dest = tmp_path / "out"
    with atomic.folder(dest) as staging:
        fill(staging, "v1")
    dest.chmod(0o750)
    trace.calls.clear()
    with atomic.folder(dest, overwrite=True) as staging:
        fill(staging, "v2")
        (staging / "extra").write_text("x")
        (staging / "link").symlink_to("a.txt")
    assert tree(dest) == {
        "a.txt": "a v2",
        "extra": "x",
        "link": "-> a.txt",
        "sub/": "",
        "sub/b.txt": "b v2",
    }
    assert stat.S_IMODE(dest.stat().st_mode) == 0o750
    assert listing(tmp_path) == ["out"]
    exchanges = [c for c in trace.named("renameat2") if c.args[2] == 2]
    assert len(exchanges) == 1


def test_overwrite_of_a_missing_folder_just_publishes(tmp_path: Path) -> None:
    with atomic.folder(tmp_path / "out", overwrite=True) as staging:
        fill(staging, "v1")
    assert tree(tmp_path / "out")["a.txt"] == "a v1"


def test_durable_syncs_each_file_and_directory_once(tmp_path: Path, trace: Recorder) -> None:
    atomic.capabilities(tmp_path / "out")
    trace.calls.clear()
    with atomic.folder(tmp_path / "out") as staging:
        fill(staging, "v1")
        (staging / "link").symlink_to("nowhere")
        os.mkfifo(staging / "fifo")
    synced = trace.fsynced_paths()
    # a.txt, sub/b.txt, sub/, the staging root, then the parent
    assert len(synced) == 5
    assert synced[-1] == str(tmp_path)
    assert len(set(synced)) == 5
    names = [c.name for c in trace.calls if c.name in ("fsync", "renameat2")]
    assert names == ["fsync"] * 4 + ["renameat2", "fsync"]


def test_not_durable_makes_no_fsync(tmp_path: Path, trace: Recorder) -> None:
    with atomic.folder(tmp_path / "out", durable=False) as staging:
        fill(staging, "v1")
    assert trace.count("fsync") == 0


@pytest.mark.parametrize("exception", [RuntimeError, KeyboardInterrupt])
def test_exception_removes_the_staging_tree(tmp_path: Path, exception: type) -> None:
    dest = tmp_path / "out"
    with atomic.folder(dest) as staging:
        fill(staging, "v1")
    with pytest.raises(exception):
        with atomic.folder(dest, overwrite=True) as staging:
            fill(staging, "v2")
            raise exception()
    assert tree(dest)["a.txt"] == "a v1"
    assert listing(tmp_path) == ["out"]


def test_destination_that_is_a_file(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.write_text("file")
    with pytest.raises(NotADirectoryError) as info:
        with atomic.folder(dest, overwrite=True):
            pass  # pragma: no cover
    assert info.value.errno == errno.ENOTDIR
    assert info.value.filename == str(dest)
    assert dest.read_text() == "file"
    assert listing(tmp_path) == ["out"]


def test_destination_becoming_a_file_meanwhile(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    with pytest.raises(NotADirectoryError):
        with atomic.folder(dest, overwrite=True) as staging:
            fill(staging, "v1")
            dest.write_text("file")
    assert dest.read_text() == "file"
    assert listing(tmp_path) == ["out"]


def test_destination_symlink_is_not_followed(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "secret").write_text("s")
    dest = tmp_path / "out"
    dest.symlink_to(elsewhere)
    with pytest.raises(NotADirectoryError, match="symbolic link"):
        with atomic.folder(dest, overwrite=True):
            pass  # pragma: no cover
    assert tree(elsewhere) == {"secret": "s"}
    assert dest.is_symlink()


def test_missing_parent_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        with atomic.folder(tmp_path / "nope" / "out"):
            pass  # pragma: no cover
    assert info.value.filename == str(tmp_path / "nope")


def test_trailing_slash(tmp_path: Path) -> None:
    with atomic.folder(str(tmp_path / "out") + "/") as staging:
        fill(staging, "v1")
    assert listing(tmp_path) == ["out"]


def test_fallback_without_exchange(
    tmp_path: Path, force_caps: Callable[..., Capabilities], trace: Recorder
) -> None:
    dest = tmp_path / "out"
    force_caps(exchange=False)
    with atomic.folder(dest) as staging:
        fill(staging, "v1")
    with atomic.folder(dest, overwrite=True) as staging:
        fill(staging, "v2")
    assert tree(dest)["a.txt"] == "a v2"
    assert listing(tmp_path) == ["out"]
    assert not [c for c in trace.named("renameat2") if c.args[2] == 2]
    aside = [c for c in trace.named("rename") if c.args[0] == str(dest)]
    assert len(aside) == 1
    assert aside[0].args[1].endswith(".old")


def test_fallback_refused(tmp_path: Path, force_caps: Callable[..., Capabilities]) -> None:
    dest = tmp_path / "out"
    with atomic.folder(dest) as staging:
        fill(staging, "v1")
    force_caps(exchange=False)
    with pytest.raises(OSError) as info:
        with atomic.folder(dest, overwrite=True, allow_fallback=False) as staging:
            fill(staging, "v2")
    assert info.value.errno == errno.EOPNOTSUPP
    assert "not supported" in str(info.value)
    assert tree(dest)["a.txt"] == "a v1"
    assert listing(tmp_path) == ["out"]


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV])
def test_exchange_refused_at_call_time_falls_back(
    tmp_path: Path, trace: Recorder, code: int
) -> None:
    dest = tmp_path / "out"
    with atomic.folder(dest) as staging:
        fill(staging, "v1")
    trace.fail("renameat2", code, when=lambda call: call.args[2] == 2)
    with atomic.folder(dest, overwrite=True) as staging:
        fill(staging, "v2")
    assert tree(dest)["a.txt"] == "a v2"
    assert listing(tmp_path) == ["out"]


def test_fallback_failure_puts_the_old_tree_back(
    tmp_path: Path, force_caps: Callable[..., Capabilities], trace: Recorder
) -> None:
    dest = tmp_path / "out"
    with atomic.folder(dest) as staging:
        fill(staging, "v1")
    force_caps(exchange=False)
    trace.fail("renameat2", errno.EIO, when=lambda call: ".new" in call.args[0])
    with pytest.raises(OSError) as info:
        with atomic.folder(dest, overwrite=True) as staging:
            fill(staging, "v2")
    assert info.value.errno == errno.EIO
    assert tree(dest)["a.txt"] == "a v1"
    assert listing(tmp_path) == ["out"]


def test_lower_layer_fallback_removes_in_place(
    tmp_path: Path, force_caps: Callable[..., Capabilities], trace: Recorder
) -> None:
    # What overlayfs answers for a lower-layer directory (see test_filesystems
    # for the real thing): neither exchange nor rename work.
    dest = tmp_path / "out"
    with atomic.folder(dest) as staging:
        fill(staging, "v1")
    force_caps(exchange=False)
    trace.fail("rename", errno.EXDEV, when=lambda call: call.args[0] == str(dest))
    with atomic.folder(dest, overwrite=True) as staging:
        fill(staging, "v2")
    assert tree(dest)["a.txt"] == "a v2"
    assert listing(tmp_path) == ["out"]


def test_sync_failure_leaves_the_destination(tmp_path: Path, trace: Recorder) -> None:
    dest = tmp_path / "out"
    with atomic.folder(dest) as staging:
        fill(staging, "v1")
    trace.calls.clear()
    trace.fail("fsync", errno.EIO)
    with pytest.raises(OSError) as info:
        with atomic.folder(dest, overwrite=True) as staging:
            fill(staging, "v2")
    assert info.value.errno == errno.EIO
    assert trace.count("fsync") == 1
    assert tree(dest)["a.txt"] == "a v1"
    assert listing(tmp_path) == ["out"]


def test_staging_swapped_for_a_symlink_is_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("v")
    dest = tmp_path / "area" / "out"
    dest.parent.mkdir()
    with pytest.raises(RuntimeError):
        with atomic.folder(dest) as staging:
            fill(staging, "v1")
            sub = staging / "sub"
            for child in sub.iterdir():
                child.unlink()
            sub.rmdir()
            sub.symlink_to(outside)
            raise RuntimeError("abandon")
    assert tree(outside) == {"victim": "v"}
    assert listing(dest.parent) == []


def test_symlink_in_the_tree_is_published_not_followed(tmp_path: Path, trace: Recorder) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("v")
    with atomic.folder(tmp_path / "out") as staging:
        (staging / "sub").symlink_to(outside)
    assert os.readlink(tmp_path / "out" / "sub") == str(outside)
    assert str(outside / "victim") not in trace.fsynced_paths()
    with atomic.folder(tmp_path / "out", overwrite=True) as staging:
        (staging / "new").write_text("n")
    assert tree(outside) == {"victim": "v"}
    assert tree(tmp_path / "out") == {"new": "n"}
