"""A filesystem that takes an unnamed file and its link, then loses it.

JuiceFS 1.4 accepts ``O_TMPFILE`` and the ``linkat`` that names the file,
then frees the file when its descriptor closes: the name stays in listings
and opens with ENOENT.  A message added that way is lost although add()
returned its name.  A probe, once per filesystem, catches it and
atomstore then stages new files under names there.  Here a tracer makes a
link of an open file leave nothing to open, as JuiceFS does;
``test_multihost`` checks the real JuiceFS.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path

import pytest

from atomstore import FileStore, _names, _rename, _staging, _watch, atomic
from tracing import Recorder

O_TMPFILE = getattr(os, "O_TMPFILE", 0)


def leaves_an_empty_name(fd: int, dst: str) -> None:
    """What a link of an unnamed file comes to on JuiceFS: a name that
    opens with ENOENT (here: no name at all)."""


@pytest.fixture
def remote(monkeypatch: pytest.MonkeyPatch, fresh_probe: None) -> None:
    """The test's filesystem taken for a FUSE one: the probe runs there."""
    monkeypatch.setattr(_watch, "is_remote_or_fuse", lambda path: True)
    monkeypatch.setattr(_staging, "_UNNAMED_SETTLE", 0)


@pytest.fixture
def losing(trace: Recorder, remote: None) -> Recorder:
    trace.replace["link_fd"] = leaves_an_empty_name
    return trace


def test_unnamed_files_lost_are_found_once_and_nothing_is_left(
    tmp_path: Path, losing: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    for directory in ("a", "b"):
        (tmp_path / directory).mkdir()
        with caplog.at_level(logging.INFO, logger="atomstore"):
            atomic.write_bytes(tmp_path / directory / "f", b"data")
        assert os.listdir(tmp_path / directory) == ["f"]  # no probe left
        assert (tmp_path / directory / "f").read_bytes() == b"data"
    # One probe for the filesystem: one link of an open file.
    assert losing.count("link_fd") == 1
    assert [r.getMessage() for r in caplog.records if "are lost" in r.getMessage()] == [
        f"{tmp_path / 'a'}: unnamed files are lost here once closed: "
        "new files are staged under names"
    ]


def test_unnamed_files_kept_on_fuse_cost_one_probe(
    tmp_path: Path, trace: Recorder, remote: None
) -> None:
    atomic.write_bytes(tmp_path / "f", b"data")
    atomic.write_bytes(tmp_path / "g", b"more")
    assert _staging._unnamed_lost == {os.stat(tmp_path).st_dev: False}
    assert trace.count("link_fd") == 3  # the probe's, then each file's
    assert sorted(os.listdir(tmp_path)) == ["f", "g"]


def test_a_local_filesystem_is_not_probed(
    tmp_path: Path, trace: Recorder, fresh_probe: None
) -> None:
    atomic.write_bytes(tmp_path / "f", b"data")
    assert _staging._unnamed_lost == {os.stat(tmp_path).st_dev: False}
    assert trace.count("link_fd") == 1
    assert os.listdir(tmp_path) == ["f"]


def test_the_answer_goes_with_a_mount_change(tmp_path: Path, losing: Recorder) -> None:
    atomic.write_bytes(tmp_path / "f", b"data")
    assert _staging._unnamed_lost == {os.stat(tmp_path).st_dev: True}
    for hook in _rename._mount_change_hooks:  # what a look at a changed table runs
        hook()
    assert _staging._unnamed_lost == {}


@pytest.mark.parametrize("swap", ["fifo", "symlink to /dev/zero", "another file"])
def test_a_probe_name_swapped_tells_nothing(
    tmp_path: Path, losing: Recorder, monkeypatch: pytest.MonkeyPatch, swap: str
) -> None:
    # Another writer of the directory replaces the probe's name before it
    # is read back: the probe reads nothing of it, blocks on nothing and
    # decides nothing; the file is staged under a name, this once.
    def swapped(fd: int, dst: str) -> None:
        if swap == "fifo":
            os.mkfifo(dst)
        elif swap == "another file":
            Path(dst).write_bytes(b"u")
        else:
            os.symlink("/dev/zero", dst)

    losing.replace["link_fd"] = swapped
    atomic.write_bytes(tmp_path / "f", b"data")
    assert (tmp_path / "f").read_bytes() == b"data"
    assert _staging._unnamed_lost == {}
    [other] = [n for n in os.listdir(tmp_path) if n != "f"]  # not the probe's to remove
    kept = os.lstat(tmp_path / other)
    if swap == "fifo":
        assert stat.S_ISFIFO(kept.st_mode)
    elif swap == "another file":
        assert (tmp_path / other).read_bytes() == b"u"
    else:
        assert os.readlink(tmp_path / other) == "/dev/zero"


def test_a_probe_name_taken_is_left_alone(
    tmp_path: Path, losing: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken = tmp_path / ".probe.atomstore-taken.tmp"
    taken.write_bytes(b"not the probe's")
    real = _names.staging_name
    monkeypatch.setattr(
        _names,
        "staging_name",
        lambda base, kind: taken.name if base == "probe" else real(base, kind),
    )
    atomic.write_bytes(tmp_path / "f", b"data")
    assert taken.read_bytes() == b"not the probe's"
    assert (tmp_path / "f").read_bytes() == b"data"
    assert _staging._unnamed_lost == {}


def test_a_probe_that_cannot_run_decides_nothing(tmp_path: Path, losing: Recorder) -> None:
    losing.fail("write", errno.ENOSPC)  # the probe's byte
    atomic.write_bytes(tmp_path / "f", b"data")  # by name, this once
    assert (tmp_path / "f").read_bytes() == b"data"
    assert _staging._unnamed_lost == {}
    assert os.listdir(tmp_path) == ["f"]


def test_store_stages_under_names_where_unnamed_files_are_lost(
    tmp_path: Path, losing: Recorder
) -> None:
    store = FileStore(tmp_path / "store")
    store.prepare()
    names = [store.add(f"message {i}".encode()) for i in range(3)]
    # Only the probe linked an open file, and it ran in tmp/: JuiceFS lists
    # an open unnamed file, which new/'s consumers must never see.  Every
    # message was staged in tmp/.
    assert losing.count("link_fd") == 1
    unnamed_in = [
        c.args[0] for c in losing.calls if c.name == "open" and c.args[1] & O_TMPFILE == O_TMPFILE
    ]
    assert str(tmp_path / "store" / "new") not in unnamed_in
    assert len(unnamed_in) == 1
    assert os.listdir(tmp_path / "store" / "tmp") == []
    assert sorted(os.listdir(tmp_path / "store" / "new")) == sorted(names)
    for i in range(3):
        claim = store.claim()
        assert claim is not None
        assert claim.read_bytes() == f"message {i}".encode()
        claim.finish()


def test_atomic_file_stages_under_a_name_where_unnamed_files_are_lost(
    tmp_path: Path, losing: Recorder
) -> None:
    with atomic.file(tmp_path / "b", "w") as f:
        f.write("streamed")
    assert (tmp_path / "b").read_text() == "streamed"
    assert os.listdir(tmp_path) == ["b"]
    assert losing.count("link_fd") == 1  # the probe's
