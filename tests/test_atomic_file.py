"""atomic.file(), write_bytes() and write_text()."""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import pytest

from atomstore import atomic
from atomstore._rename import Capabilities
from fstree import listing
from tracing import ANONYMOUS_NAME, Recorder, named_staging


@pytest.fixture
def umask() -> Iterator[Callable[[int], None]]:
    saved = os.umask(0o022)
    os.umask(saved)

    def set_umask(value: int) -> None:
        os.umask(value)

    yield set_umask
    os.umask(saved)


def test_text_write_appears_complete(tmp_path: Path) -> None:
    dest = tmp_path / "config.json"
    with atomic.file(dest) as f:
        f.write('{"a": 1}\n')
        assert not dest.exists()
    assert dest.read_text() == '{"a": 1}\n'
    assert listing(tmp_path) == ["config.json"]


def test_binary_write(tmp_path: Path) -> None:
    dest = tmp_path / "blob"
    with atomic.file(dest, "wb") as f:
        assert f.write(b"\x00\xff" * 1000) == 2000
    assert dest.read_bytes() == b"\x00\xff" * 1000


@pytest.mark.parametrize("mode", ["w", "wt", "tw"])
def test_text_modes_and_open_keywords(tmp_path: Path, mode: str) -> None:
    dest = tmp_path / "latin"
    with atomic.file(dest, mode, encoding="latin-1", errors="replace", newline="\r\n") as f:
        assert f.mode == mode
        f.write("caf\u00e9 \u20ac\nend")
    assert dest.read_bytes() == b"caf\xe9 ?\r\nend"


def test_unbuffered_binary(tmp_path: Path, trace: Recorder) -> None:
    dest = tmp_path / "raw"
    with atomic.file(dest, "wb", buffering=0) as f:
        f.write(b"ab")
        f.write(b"cd")
    assert dest.read_bytes() == b"abcd"
    assert trace.count("write") == 2


def test_unbuffered_text_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unbuffered text"):
        with atomic.file(tmp_path / "x", "w", buffering=0):
            pass  # pragma: no cover
    assert listing(tmp_path) == []


def test_line_buffering(tmp_path: Path, trace: Recorder) -> None:
    with atomic.file(tmp_path / "lines", buffering=1) as f:
        f.write("one\n")
        assert trace.count("write") == 1
    assert (tmp_path / "lines").read_text() == "one\n"


def test_binary_mode_refuses_encoding(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="binary mode"):
        with atomic.file(tmp_path / "x", "wb", encoding="utf-8"):
            pass  # pragma: no cover
    assert listing(tmp_path) == []


@pytest.mark.parametrize("mode", ["r", "rb", "a", "ab", "w+", "wb+", "x", "r+", "", "wbt"])
def test_read_append_and_unknown_modes_refused(tmp_path: Path, mode: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(mode))):
        with atomic.file(tmp_path / "x", mode):
            pass  # pragma: no cover
    assert listing(tmp_path) == []


def test_mode_must_be_a_string(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="mode must be a str"):
        with atomic.file(tmp_path / "x", 1):  # type: ignore[call-overload]
            pass  # pragma: no cover


@pytest.mark.parametrize("bad", [b"/tmp/x", None, 3])
def test_path_type_checked(bad: object) -> None:
    with pytest.raises(TypeError, match=r"path must be str or os\.PathLike"):
        with atomic.file(bad):  # type: ignore[call-overload]
            pass  # pragma: no cover


def test_empty_path_and_nul_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must not be empty"):
        atomic.write_bytes("", b"x")
    with pytest.raises(ValueError, match="NUL"):
        atomic.write_bytes(str(tmp_path / "a\0b"), b"x")
    assert listing(tmp_path) == []


def test_a_new_file_has_no_name_until_it_is_complete(tmp_path: Path, trace: Recorder) -> None:
    dest = tmp_path / "report.csv"
    with atomic.file(dest) as f:
        f.write("a,b\n")
        assert listing(tmp_path) == []  # O_TMPFILE: nothing to see, nothing to leave
        assert f.name == str(dest)
    assert dest.read_text() == "a,b\n"
    (opened,) = [c for c in trace.named("open") if c.args[1] & os.O_TMPFILE == os.O_TMPFILE]
    assert opened.args[0] == str(tmp_path)
    assert [c.args[1] for c in trace.named("link_fd")] == [str(dest)]


def test_temp_is_hidden_in_the_destination_directory(tmp_path: Path, trace: Recorder) -> None:
    # Where O_TMPFILE is missing, and always when replacing.
    dest = tmp_path / "report.csv"
    with named_staging(), atomic.file(dest) as f:
        (temp,) = listing(tmp_path)
        assert temp.startswith(".report.csv.atomstore-")
        assert temp.endswith(".tmp")
        assert f.name == str(tmp_path / temp)
    (opened,) = [
        c for c in trace.named("open") if os.path.basename(c.args[0]).startswith(".report.csv.")
    ]
    flags = opened.args[1]
    for flag in (os.O_CREAT, os.O_EXCL, os.O_NOFOLLOW, os.O_CLOEXEC, os.O_WRONLY):
        assert flags & flag == flag
    assert os.path.dirname(opened.args[0]) == str(tmp_path)


def test_new_file_gets_umask_mode(tmp_path: Path, umask: Callable[[int], None]) -> None:
    umask(0o027)
    atomic.write_bytes(tmp_path / "a", b"x")
    with atomic.file(tmp_path / "b") as f:
        f.write("x")
    assert stat.S_IMODE(os.stat(tmp_path / "a").st_mode) == 0o640
    assert stat.S_IMODE(os.stat(tmp_path / "b").st_mode) == 0o640


def test_perms_are_exact(tmp_path: Path, umask: Callable[[int], None]) -> None:
    umask(0o077)
    atomic.write_bytes(tmp_path / "a", b"x", perms=0o644)
    assert stat.S_IMODE(os.stat(tmp_path / "a").st_mode) == 0o644
    atomic.write_bytes(tmp_path / "a", b"y", perms=0o600, overwrite=True)
    assert stat.S_IMODE(os.stat(tmp_path / "a").st_mode) == 0o600


def test_replaced_file_keeps_mode(tmp_path: Path) -> None:
    dest = tmp_path / "script.sh"
    dest.write_text("old")
    dest.chmod(0o750)
    with atomic.file(dest, overwrite=True) as f:
        f.write("new")
    assert dest.read_text() == "new"
    assert stat.S_IMODE(dest.stat().st_mode) == 0o750


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_replaced_file_keeps_owner_and_group(tmp_path: Path) -> None:
    dest = tmp_path / "owned"
    dest.write_text("old")
    os.chown(dest, 1234, 5678)
    dest.chmod(0o4755)  # set-user-ID survives: chmod comes after chown
    atomic.write_bytes(dest, b"new", overwrite=True)
    st = dest.stat()
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    assert stat.S_IMODE(st.st_mode) == 0o4755
    assert dest.read_bytes() == b"new"


def test_symlink_is_followed(tmp_path: Path) -> None:
    target = tmp_path / "real"
    target.write_text("old")
    link = tmp_path / "link"
    link.symlink_to("real")
    with atomic.file(link, overwrite=True) as f:
        f.write("new")
    assert link.is_symlink()
    assert os.readlink(link) == "real"
    assert target.read_text() == "new"
    assert listing(tmp_path) == ["link", "real"]


def test_dangling_symlink_is_an_existing_name_without_overwrite(tmp_path: Path) -> None:
    # As O_CREAT|O_EXCL: a symlink at the name is a name, dangling or not.
    link = tmp_path / "link"
    link.symlink_to("missing")
    with pytest.raises(FileExistsError) as info:
        atomic.write_bytes(link, b"made")
    assert info.value.filename == str(link)
    with pytest.raises(FileExistsError) as again, atomic.file(link, "wb") as f:
        f.write(b"made")
    assert again.value.filename == str(link)
    assert listing(tmp_path) == ["link"]


def test_dangling_symlink_creates_its_target_with_overwrite(tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to("missing")
    atomic.write_bytes(link, b"made", overwrite=True)
    assert (tmp_path / "missing").read_bytes() == b"made"
    assert link.is_symlink()
    (tmp_path / "missing").unlink()
    with atomic.file(link, "wb", overwrite=True) as f:
        f.write(b"again")
    assert (tmp_path / "missing").read_bytes() == b"again"
    assert listing(tmp_path) == ["link", "missing"]


def test_symlink_to_an_existing_file_is_not_clobbered(tmp_path: Path) -> None:
    target = tmp_path / "real"
    target.write_text("precious")
    (tmp_path / "link").symlink_to("real")
    with pytest.raises(FileExistsError) as info:
        atomic.write_bytes(tmp_path / "link", b"new")
    assert info.value.filename == str(tmp_path / "link")
    with pytest.raises(FileExistsError) as again:
        atomic.write_bytes(tmp_path / "link", b"new", follow_symlinks=False)
    assert again.value.filename == str(tmp_path / "link")
    assert target.read_text() == "precious"
    assert listing(tmp_path) == ["link", "real"]


def test_symlink_replaced_itself_without_following(tmp_path: Path) -> None:
    target = tmp_path / "real"
    target.write_text("old")
    link = tmp_path / "link"
    link.symlink_to("real")
    atomic.write_bytes(link, b"new", overwrite=True, follow_symlinks=False)
    assert not link.is_symlink()
    assert link.read_bytes() == b"new"
    assert target.read_text() == "old"


def test_symlink_loop_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    with pytest.raises(OSError) as info:
        atomic.write_bytes(tmp_path / "a", b"x", overwrite=True)
    assert info.value.errno == errno.ELOOP
    assert listing(tmp_path) == ["a", "b"]


def test_existing_destination_refused_before_writing(tmp_path: Path) -> None:
    dest = tmp_path / "keep"
    dest.write_text("precious")
    entered = False
    with pytest.raises(FileExistsError) as info:
        with atomic.file(dest):
            entered = True  # pragma: no cover
    assert not entered
    assert info.value.errno == errno.EEXIST
    assert info.value.filename == str(dest)
    assert dest.read_text() == "precious"
    assert listing(tmp_path) == ["keep"]


def test_destination_appearing_while_writing_is_not_clobbered(tmp_path: Path) -> None:
    dest = tmp_path / "race"
    with pytest.raises(FileExistsError) as info:
        with atomic.file(dest) as f:
            f.write("mine")
            dest.write_text("theirs")
    assert info.value.errno == errno.EEXIST
    assert info.value.filename == str(dest)
    assert dest.read_text() == "theirs"
    assert listing(tmp_path) == ["race"]


def test_overwrite_replaces(tmp_path: Path) -> None:
    dest = tmp_path / "state"
    dest.write_text("v1")
    with atomic.file(dest, overwrite=True) as f:
        f.write("v2")
    assert dest.read_text() == "v2"
    assert listing(tmp_path) == ["state"]


@pytest.mark.parametrize("exception", [RuntimeError, KeyboardInterrupt, SystemExit])
def test_exception_discards_everything(tmp_path: Path, exception: type) -> None:
    dest = tmp_path / "state"
    dest.write_text("v1")
    with pytest.raises(exception):
        with atomic.file(dest, overwrite=True) as f:
            f.write("half")
            raise exception()
    assert f.closed
    assert dest.read_text() == "v1"
    assert listing(tmp_path) == ["state"]


def test_missing_parent_is_named(tmp_path: Path) -> None:
    parent = tmp_path / "nope"
    with pytest.raises(FileNotFoundError) as info:
        with atomic.file(parent / "x"):
            pass  # pragma: no cover
    assert info.value.errno == errno.ENOENT
    assert info.value.filename == str(parent)


def test_parent_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError) as info:
        atomic.write_bytes(tmp_path / "file" / "x", b"x")
    assert info.value.errno == errno.ENOTDIR


@pytest.mark.parametrize("overwrite", [True, False])
@pytest.mark.parametrize("suffix", ["", "/"])
def test_directory_destination_refused(tmp_path: Path, suffix: str, overwrite: bool) -> None:
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError) as info:
        atomic.write_bytes(str(tmp_path / "d") + suffix, b"x", overwrite=overwrite)
    assert info.value.errno == errno.EISDIR
    assert listing(tmp_path) == ["d"]
    assert listing(tmp_path / "d") == []


def test_file_closed_inside_the_block(tmp_path: Path, trace: Recorder) -> None:
    dest = tmp_path / "closed"
    with atomic.file(dest) as f:
        f.write("done")
        f.close()
    assert dest.read_text() == "done"
    assert trace.count("fsync") == 2
    assert listing(tmp_path) == ["closed"]


@pytest.mark.parametrize("named", [False, True])
def test_durable_write_makes_one_file_and_one_directory_fsync(
    tmp_path: Path, trace: Recorder, named: bool
) -> None:
    atomic.capabilities(tmp_path / "x")  # probe outside the count
    trace.calls.clear()
    dest = tmp_path / "durable"
    with contextlib.ExitStack() as stack:
        if named:
            stack.enter_context(named_staging())
        with atomic.file(dest) as f:
            f.write("x" * 100_000)
    synced = trace.fsynced_paths()
    assert len(synced) == 2
    if named:
        assert os.path.basename(synced[0]).startswith(".durable.atomstore-")
    else:
        assert synced[0] == str(tmp_path / ANONYMOUS_NAME)
    assert synced[1] == str(tmp_path)
    # fsync before the name is given, the directory after it
    names = [c.name for c in trace.calls if c.name in ("fsync", "renameat2", "rename", "link_fd")]
    assert names == ["fsync", "renameat2" if named else "link_fd", "fsync"]


def test_write_bytes_durable_fsync_count(tmp_path: Path, trace: Recorder) -> None:
    atomic.write_bytes(tmp_path / "a", b"x")
    trace.calls.clear()
    atomic.write_bytes(tmp_path / "b", b"x")
    atomic.write_bytes(tmp_path / "b", b"y", overwrite=True)
    assert trace.count("fsync") == 4


def test_not_durable_makes_no_fsync(tmp_path: Path, trace: Recorder) -> None:
    with atomic.file(tmp_path / "fast", durable=False) as f:
        f.write("x")
    atomic.write_bytes(tmp_path / "fast2", b"x", durable=False)
    assert trace.count("fsync") == 0
    assert (tmp_path / "fast").read_text() == "x"


def test_fsync_failure_is_fatal_and_not_retried(tmp_path: Path, trace: Recorder) -> None:
    dest = tmp_path / "state"
    dest.write_text("v1")
    trace.fail("fsync", errno.EIO)
    with pytest.raises(OSError) as info:
        with atomic.file(dest, overwrite=True) as f:
            f.write("v2")
    assert info.value.errno == errno.EIO
    assert trace.count("fsync") == 1
    assert trace.count("rename") == trace.count("renameat2") == 0
    assert dest.read_text() == "v1"
    assert listing(tmp_path) == ["state"]


def test_directory_fsync_failure_is_reported(tmp_path: Path, trace: Recorder) -> None:
    dest = tmp_path / "state"
    trace.fail("fsync", errno.EIO, when=lambda call: call.target == str(tmp_path))
    with pytest.raises(OSError) as info:
        atomic.write_bytes(dest, b"v2")
    assert info.value.errno == errno.EIO
    # the rename happened; what is on disk is the complete new file
    assert dest.read_bytes() == b"v2"
    assert listing(tmp_path) == ["state"]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EIO])
def test_write_failure_leaves_nothing(tmp_path: Path, trace: Recorder, code: int) -> None:
    dest = tmp_path / "state"
    dest.write_text("v1")
    trace.fail("write", code)
    with pytest.raises(OSError) as info:
        with atomic.file(dest, "wb", overwrite=True) as f:
            f.write(b"x" * 10)
    assert info.value.errno == code
    assert dest.read_text() == "v1"
    assert listing(tmp_path) == ["state"]
    trace.fail("write", code)
    with pytest.raises(OSError) as again:
        atomic.write_bytes(dest, b"y" * 10, overwrite=True)
    assert again.value.errno == code
    assert again.value.filename == str(dest)  # write(2) names none: the destination
    assert dest.read_text() == "v1"
    assert listing(tmp_path) == ["state"]


def test_short_writes_are_completed(tmp_path: Path, trace: Recorder) -> None:
    def short_write(fd: int, data: bytes) -> int:
        return os.write(fd, bytes(data[:7]))

    trace.replace["write"] = short_write
    payload = bytes(range(256)) * 40
    atomic.write_bytes(tmp_path / "a", payload)
    with atomic.file(tmp_path / "b", "wb") as f:
        f.write(payload)
    assert (tmp_path / "a").read_bytes() == payload
    assert (tmp_path / "b").read_bytes() == payload


def test_write_bytes_and_text(tmp_path: Path) -> None:
    atomic.write_bytes(tmp_path / "b", bytearray(b"ab"))
    atomic.write_bytes(tmp_path / "m", memoryview(b"abcd")[1:3])
    atomic.write_text(tmp_path / "t", "h\u00e9", "utf-8")
    atomic.write_text(tmp_path / "l", "h\u00e9", encoding="latin-1")
    assert (tmp_path / "b").read_bytes() == b"ab"
    assert (tmp_path / "m").read_bytes() == b"bc"
    assert (tmp_path / "t").read_bytes() == b"h\xc3\xa9"
    assert (tmp_path / "l").read_bytes() == b"h\xe9"


def test_write_text_default_encoding(tmp_path: Path) -> None:
    import locale

    atomic.write_text(tmp_path / "t", "plain")
    assert (tmp_path / "t").read_text(encoding=locale.getpreferredencoding(False)) == "plain"


def test_write_bytes_and_text_check_types(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="bytes-like"):
        atomic.write_bytes(tmp_path / "b", "text")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="text must be str"):
        atomic.write_text(tmp_path / "t", b"bytes")  # type: ignore[arg-type]
    with pytest.raises(UnicodeEncodeError):
        atomic.write_text(tmp_path / "t", "\u20ac", "ascii")
    assert listing(tmp_path) == []


def test_no_clobber_commit_uses_link_fallback(
    tmp_path: Path, force_caps: Callable[..., Capabilities], trace: Recorder
) -> None:
    force_caps(noreplace=False, exchange=False)
    with named_staging():
        atomic.write_bytes(tmp_path / "a", b"x")
    assert trace.count("renameat2") == 0
    assert trace.count("link") == 1
    assert (tmp_path / "a").read_bytes() == b"x"
    with pytest.raises(FileExistsError):
        with atomic.file(tmp_path / "b") as f:
            f.write("mine")
            (tmp_path / "b").write_text("theirs")
    assert (tmp_path / "b").read_text() == "theirs"
    assert listing(tmp_path) == ["a", "b"]


def test_an_abandoned_file_leaves_no_buffer_to_spill_into_another_file(tmp_path: Path) -> None:
    # The file object does not own its descriptor; were it left open with
    # buffered data when its block raised, collecting it later would write
    # that data to whatever file has the descriptor's number by then.
    kept: list[object] = []
    with pytest.raises(RuntimeError), atomic.file(tmp_path / "a", "wb") as f:
        kept.append(f)  # as an application might
        f.write(b"x" * 100)  # buffered
        raise RuntimeError("abandoned")
    with atomic.file(tmp_path / "b", "wb") as g:  # gets the same number
        kept.clear()
        del f
        gc.collect()
        g.write(b"payload")
    assert (tmp_path / "b").read_bytes() == b"payload"
    assert listing(tmp_path) == ["b"]


def test_a_file_object_whose_block_never_ended_cannot_write_elsewhere(tmp_path: Path) -> None:
    # As when an interruption strikes on entering __exit__: the manager is
    # collected with the file object still alive and holding buffered data.
    manager = atomic.file(tmp_path / "a", "wb")
    f = manager.__enter__()
    f.write(b"<leak>" * 10)  # buffered
    del manager
    gc.collect()  # the descriptor is closed now
    with open(tmp_path / "unrelated", "wb") as other:  # may get the same number
        del f
        gc.collect()
        other.write(b"mine")
    assert (tmp_path / "unrelated").read_bytes() == b"mine"
    assert listing(tmp_path) == ["unrelated"]


def test_new_names_never_rely_on_a_descriptor_the_application_may_close(
    tmp_path: Path,
) -> None:
    # A daemon that closes every descriptor after a first write (as
    # python-daemon does), and then opens a directory of its own.
    from forked import Children, exit_code

    def child() -> None:
        atomic.write_bytes(tmp_path / "first", b"1")
        os.closerange(3, 4096)
        os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)  # takes the lowest number
        atomic.write_bytes(tmp_path / "second", b"2")

    with Children() as kids:
        status = kids.wait(kids.start(child), timeout=30)
    assert exit_code(status) == 0
    assert (tmp_path / "second").read_bytes() == b"2"
    assert listing(tmp_path) == ["first", "second"]
