"""A filesystem that takes an unnamed file and its link, then loses it.

JuiceFS 1.4 accepts ``O_TMPFILE`` and the ``linkat`` that names the file,
then frees the file when its descriptor closes: the name stays in listings
and opens with ENOENT.  A message added that way is lost although add()
returned its name.  A probe, once per filesystem, catches it and
atomstore then stages new files under names there.  Here a tracer makes a
link of an open file leave an empty, mode-0 name behind, as JuiceFS does;
``test_multihost`` checks the real JuiceFS.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import pytest

from atomstore import FileStore, _staging, atomic
from tracing import Recorder


def leaves_an_empty_name(fd: int, dst: str) -> None:
    """What a link of an unnamed file comes to on JuiceFS: a name, no file."""
    os.close(os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0))


@pytest.fixture
def losing(trace: Recorder, fresh_probe: None) -> Recorder:
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
    assert str(tmp_path / "b") in _staging._named_only


def test_unnamed_files_kept_here_cost_one_probe(
    tmp_path: Path, trace: Recorder, fresh_probe: None
) -> None:
    atomic.write_bytes(tmp_path / "f", b"data")
    atomic.write_bytes(tmp_path / "g", b"more")
    assert _staging._unnamed_lost == {os.stat(tmp_path).st_dev: False}
    assert trace.count("link_fd") == 3  # the probe's, then each file's
    assert sorted(os.listdir(tmp_path)) == ["f", "g"]


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
    # Only the probe linked an open file; every message was staged in tmp/.
    assert losing.count("link_fd") == 1
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
