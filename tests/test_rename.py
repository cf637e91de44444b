"""atomic.rename(), swap(), capabilities(), clean() and the rename layer."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import random
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable
from unittest import mock

import pytest

from atomstore import _rename, _renameat2, atomic
from atomstore._rename import Capabilities
from fstree import listing
from needs import need, need_root
from tracing import Recorder, blind_lstat, named_staging

# -- rename ---------------------------------------------------------------


def test_rename_moves(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("A")
    atomic.rename(tmp_path / "a", tmp_path / "b")
    assert listing(tmp_path) == ["b"]
    assert (tmp_path / "b").read_text() == "A"


def test_rename_refuses_to_replace(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("A")
    (tmp_path / "b").write_text("B")
    with pytest.raises(FileExistsError) as info:
        atomic.rename(tmp_path / "a", tmp_path / "b")
    assert info.value.errno == errno.EEXIST
    assert info.value.filename == str(tmp_path / "b")
    assert (tmp_path / "a").read_text() == "A"
    assert (tmp_path / "b").read_text() == "B"


def test_rename_overwrite(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("A")
    (tmp_path / "b").write_text("B")
    atomic.rename(tmp_path / "a", tmp_path / "b", overwrite=True)
    assert listing(tmp_path) == ["b"]
    assert (tmp_path / "b").read_text() == "A"


def test_rename_missing_source(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        atomic.rename(tmp_path / "a", tmp_path / "b")
    assert info.value.errno == errno.ENOENT
    assert info.value.filename == str(tmp_path / "a")


def test_rename_durable_syncs_both_directories(tmp_path: Path, trace: Recorder) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    (tmp_path / "x" / "a").write_text("A")
    atomic.capabilities(tmp_path / "y" / "a")
    trace.calls.clear()
    atomic.rename(tmp_path / "x" / "a", tmp_path / "y" / "a")
    assert trace.fsynced_paths() == [str(tmp_path / "y"), str(tmp_path / "x")]
    trace.calls.clear()
    atomic.rename(tmp_path / "y" / "a", tmp_path / "y" / "b", durable=False)
    assert trace.count("fsync") == 0


@pytest.mark.parametrize(
    "flags",
    [
        {"noreplace": False},
        {"noreplace": False, "hardlinks": False},
        {"noreplace": False, "ignores_flags": True},
    ],
)
def test_rename_fallbacks(
    tmp_path: Path, force_caps: Callable[..., Capabilities], trace: Recorder, flags: Any
) -> None:
    force_caps(exchange=False, **flags)
    (tmp_path / "a").write_text("A")
    (tmp_path / "b").write_text("B")
    with pytest.raises(FileExistsError) as info:
        atomic.rename(tmp_path / "a", tmp_path / "b")
    assert info.value.filename == str(tmp_path / "b")
    assert (tmp_path / "b").read_text() == "B"
    atomic.rename(tmp_path / "a", tmp_path / "c")
    assert listing(tmp_path) == ["b", "c"]
    assert (tmp_path / "c").read_text() == "A"
    assert trace.count("renameat2") == 0
    assert trace.count("link") == (1 if flags.get("hardlinks", True) else 0) * 2


def test_rename_directory_with_link_fallback(
    tmp_path: Path, force_caps: Callable[..., Capabilities]
) -> None:
    # link() never works for a directory: the last resort takes over.
    force_caps(noreplace=False, exchange=False)
    (tmp_path / "d").mkdir()
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "keep").write_text("k")
    with pytest.raises(FileExistsError):
        atomic.rename(tmp_path / "d", tmp_path / "e")
    atomic.rename(tmp_path / "d", tmp_path / "f")
    assert listing(tmp_path) == ["e", "f"]


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP])
def test_renameat2_refused_at_call_time(tmp_path: Path, trace: Recorder, code: int) -> None:
    atomic.capabilities(tmp_path / "a")
    (tmp_path / "a").write_text("A")
    (tmp_path / "b").write_text("B")
    trace.fail("renameat2", code, times=None)
    with pytest.raises(FileExistsError):
        atomic.rename(tmp_path / "a", tmp_path / "b")
    atomic.rename(tmp_path / "a", tmp_path / "c")
    assert listing(tmp_path) == ["b", "c"]
    links = [
        c.name
        for c in trace.calls
        if c.name in ("link", "unlink") and ".probe." not in c.path(trace.fds)  # re-probes
    ]
    assert links == ["link", "link", "unlink"]


@pytest.mark.parametrize("code", [errno.EPERM, errno.EOPNOTSUPP])
def test_link_refused_uses_the_last_resort(
    tmp_path: Path, force_caps: Callable[..., Capabilities], trace: Recorder, code: int
) -> None:
    force_caps(noreplace=False, exchange=False)
    (tmp_path / "a").write_text("A")
    trace.fail("link", code, times=None)
    atomic.rename(tmp_path / "a", tmp_path / "b")
    assert listing(tmp_path) == ["b"]
    assert trace.count("rename") == 1


@pytest.mark.parametrize("code", [errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO])
def test_link_fallback_undoes_the_link_when_unlink_fails(
    tmp_path: Path, force_caps: Callable[..., Capabilities], trace: Recorder, code: int
) -> None:
    # Nothing moved, as rename(2) would leave it; no other mover relies on
    # the name our link made.
    force_caps(noreplace=False, exchange=False)
    (tmp_path / "msg").write_text("m")
    trace.fail("unlink", code, when=lambda call: call.args[0] == str(tmp_path / "msg"))
    with pytest.raises(OSError) as info:
        atomic.rename(tmp_path / "msg", tmp_path / "new")
    assert info.value.errno == code
    assert listing(tmp_path) == ["msg"]


def test_link_fallback_eio_after_the_unlink_is_success(
    tmp_path: Path, force_caps: Callable[..., Capabilities], trace: Recorder
) -> None:
    force_caps(noreplace=False, exchange=False)
    (tmp_path / "msg").write_text("m")
    trace.fail("unlink", errno.EIO, after=True)
    atomic.rename(tmp_path / "msg", tmp_path / "new")
    assert listing(tmp_path) == ["new"]


@pytest.mark.parametrize("took_effect", [False, True])
def test_link_fallback_keeps_both_names_when_the_source_cannot_be_looked_at(
    tmp_path: Path,
    force_caps: Callable[..., Capabilities],
    trace: Recorder,
    monkeypatch: pytest.MonkeyPatch,
    took_effect: bool,
) -> None:
    # The unlink answers EIO and the source's lstat too: whether it went
    # is unknown.  Reported moved, a source still there would be moved (and
    # delivered) again; its link taken back, a source gone would be lost.
    force_caps(noreplace=False, exchange=False)
    source = str(tmp_path / "msg")
    (tmp_path / "msg").write_text("m")
    trace.fail("unlink", errno.EIO, after=took_effect, when=lambda call: call.args[0] == source)
    blind_lstat(monkeypatch, lambda path: path == source)
    with pytest.raises(OSError) as info:
        atomic.rename(source, tmp_path / "new")
    monkeypatch.undo()
    assert info.value.errno == errno.EIO
    assert listing(tmp_path) == (["new"] if took_effect else ["msg", "new"])
    assert (tmp_path / "new").read_text() == "m"


def test_link_fallback_loses_a_race_cleanly(
    tmp_path: Path, force_caps: Callable[..., Capabilities], trace: Recorder
) -> None:
    # Another consumer moves the source away between our link and unlink.
    force_caps(noreplace=False, exchange=False)
    (tmp_path / "msg").write_text("m")

    def link_then_lose(src: str, dst: str) -> None:
        os.link(src, dst)
        os.rename(src, tmp_path / "theirs")

    trace.replace["link"] = link_then_lose
    with pytest.raises(FileNotFoundError) as info:
        atomic.rename(tmp_path / "msg", tmp_path / "mine")
    assert info.value.errno == errno.ENOENT
    assert info.value.filename == str(tmp_path / "msg")
    assert listing(tmp_path) == ["theirs"]


def test_link_fallback_respects_a_removal_between_link_and_unlink(
    tmp_path: Path, force_caps: Callable[..., Capabilities], trace: Recorder
) -> None:
    # The source is removed on purpose (a claim finished) while we move it:
    # it stays removed, not brought back under our name.
    force_caps(noreplace=False, exchange=False)
    (tmp_path / "msg").write_text("m")

    def link_then_removed(src: str, dst: str) -> None:
        os.link(src, dst)
        os.unlink(src)

    trace.replace["link"] = link_then_removed
    with pytest.raises(FileNotFoundError):
        atomic.rename(tmp_path / "msg", tmp_path / "new")
    assert listing(tmp_path) == []


def test_link_fallback_eio_for_a_source_removed_meanwhile_is_a_race_lost(
    tmp_path: Path, force_caps: Callable[..., Capabilities], trace: Recorder
) -> None:
    # GlusterFS answers EIO to a link whose source another host removes
    # meanwhile (a claim finished): the mover lost, told so as any loser.
    force_caps(noreplace=False, exchange=False)
    (tmp_path / "msg").write_text("m")

    def removed_then_eio(src: str, dst: str) -> None:
        os.unlink(src)
        raise OSError(errno.EIO, os.strerror(errno.EIO), src, None, dst)

    trace.replace["link"] = removed_then_eio
    with pytest.raises(FileNotFoundError) as info:
        atomic.rename(tmp_path / "msg", tmp_path / "new")
    assert info.value.filename == str(tmp_path / "msg")
    assert listing(tmp_path) == []


@pytest.mark.parametrize("code", [errno.EIO, errno.ESTALE, errno.ENOTCONN, errno.ETIMEDOUT])
def test_link_fallback_unknown_outcome_that_made_nothing_is_raised(
    tmp_path: Path,
    force_caps: Callable[..., Capabilities],
    trace: Recorder,
    monkeypatch: pytest.MonkeyPatch,
    code: int,
) -> None:
    # Neither name shows a change: tried a few times more, then raised.
    monkeypatch.setattr(_rename, "_RELINK_PAUSES", (0.0,) * len(_rename._RELINK_PAUSES))
    force_caps(noreplace=False, exchange=False)
    source = str(tmp_path / "msg")
    (tmp_path / "msg").write_text("m")
    trace.fail("link", code, when=lambda call: call.args[0] == source, times=None)
    with pytest.raises(OSError) as info:
        atomic.rename(source, tmp_path / "new")
    assert info.value.errno == code
    assert listing(tmp_path) == ["msg"]
    # Only EIO, GlusterFS's answer, is tried again; a timeout is not sat
    # through seven times.
    assert [c.args[0] for c in trace.named("link")] == [source] * (7 if code == errno.EIO else 1)


@pytest.mark.parametrize("unseen", ["source", "target"])
@pytest.mark.parametrize("code", [errno.EIO, errno.ESTALE, errno.ENOTCONN])
def test_link_fallback_eio_with_a_name_that_cannot_be_looked_at_is_raised(
    tmp_path: Path,
    force_caps: Callable[..., Capabilities],
    trace: Recorder,
    monkeypatch: pytest.MonkeyPatch,
    unseen: str,
    code: int,
) -> None:
    # A connection dropped (sshfs -o reconnect, an NFS soft mount): the link
    # and every look after it fail.  That proves no race lost: the link's
    # own error is raised, never FileNotFoundError or FileExistsError.
    force_caps(noreplace=False, exchange=False)
    source, target = str(tmp_path / "msg"), str(tmp_path / "new")
    (tmp_path / "msg").write_text("m")
    trace.fail("link", errno.EIO, when=lambda call: call.args[0] == source)
    blind = source if unseen == "source" else target
    blind_lstat(monkeypatch, lambda path: path == blind, code)
    with pytest.raises(OSError) as info:
        atomic.rename(source, target)
    monkeypatch.undo()
    assert type(info.value) is OSError
    assert info.value.errno == errno.EIO
    assert listing(tmp_path) == ["msg"]
    assert trace.count("link") == 1


def test_link_fallback_stops_trying_again_after_two_and_a_half_seconds(
    tmp_path: Path, force_caps: Callable[..., Capabilities], trace: Recorder
) -> None:
    # Each link answering EIO only after half a second: no new try starts
    # past the deadline, however few the pauses used.
    force_caps(noreplace=False, exchange=False)
    (tmp_path / "msg").write_text("m")
    started: list[float] = []

    def slow_eio(src: str, dst: str) -> None:
        started.append(time.monotonic())
        time.sleep(0.5)
        raise OSError(errno.EIO, os.strerror(errno.EIO), src, None, dst)

    trace.replace["link"] = slow_eio
    begun = time.monotonic()
    with pytest.raises(OSError) as info:
        atomic.rename(tmp_path / "msg", tmp_path / "new")
    assert info.value.errno == errno.EIO
    # Seven tries with their pauses would take 5.5 s; a sleep may overrun
    # its pause on a loaded machine, hence the margin.
    assert 2 <= len(started) <= 5
    assert max(started) - begun < _rename._RELINK_FOR + 0.4
    assert listing(tmp_path) == ["msg"]


def test_link_fallback_tries_a_link_that_made_nothing_again(
    tmp_path: Path, force_caps: Callable[..., Capabilities], trace: Recorder
) -> None:
    # GlusterFS answers EIO to a link whose source another host is
    # removing, yet shows that source a moment longer: a second link tells.
    force_caps(noreplace=False, exchange=False)
    source = str(tmp_path / "msg")
    (tmp_path / "msg").write_text("m")
    trace.fail("link", errno.EIO, when=lambda call: call.args[0] == source)
    atomic.rename(source, tmp_path / "new")
    assert listing(tmp_path) == ["new"]
    assert (tmp_path / "new").read_text() == "m"
    assert [c.args[0] for c in trace.named("link")] == [source] * 2


def test_link_fallback_eio_after_the_link_is_not_taken_for_ours(
    tmp_path: Path, force_caps: Callable[..., Capabilities], trace: Recorder
) -> None:
    # The name may be another mover's, whose unlink(src) is still to come:
    # taking it for ours and unlinking src first would make that mover take
    # its link back, the file's last name.  So both names stay: nothing is
    # lost, and the mover hears it lost, as after an EEXIST of the same file.
    force_caps(noreplace=False, exchange=False)
    (tmp_path / "msg").write_text("m")
    trace.fail("link", errno.EIO, after=True, when=lambda c: c.args[0] == str(tmp_path / "msg"))
    with pytest.raises(FileNotFoundError):
        atomic.rename(tmp_path / "msg", tmp_path / "new")
    assert listing(tmp_path) == ["msg", "new"]
    assert os.path.samefile(tmp_path / "msg", tmp_path / "new")


def test_link_fallback_eio_with_another_file_at_the_name_is_file_exists(
    tmp_path: Path, force_caps: Callable[..., Capabilities], trace: Recorder
) -> None:
    force_caps(noreplace=False, exchange=False)
    (tmp_path / "msg").write_text("m")

    def taken_then_eio(src: str, dst: str) -> None:
        Path(dst).write_text("theirs")
        raise OSError(errno.EIO, os.strerror(errno.EIO), src, None, dst)

    trace.replace["link"] = taken_then_eio
    with pytest.raises(FileExistsError):
        atomic.rename(tmp_path / "msg", tmp_path / "new")
    assert (tmp_path / "msg").read_text() == "m"
    assert (tmp_path / "new").read_text() == "theirs"


@pytest.mark.parametrize("took_effect", [True, False])
@pytest.mark.parametrize("last", ["link_fd", "link"])
def test_atomic_file_whose_last_link_answers_eio(
    tmp_path: Path,
    force_caps: Callable[..., Capabilities],
    trace: Recorder,
    monkeypatch: pytest.MonkeyPatch,
    took_effect: bool,
    last: str,
) -> None:
    # The file being written is this process's alone: a name there that is
    # that very file is its own link, made before the reply was lost.
    # link_fd names an unnamed file (O_TMPFILE), link a hidden staging file.
    monkeypatch.setattr(_rename, "_RELINK_PAUSES", (0.0,) * len(_rename._RELINK_PAUSES))
    force_caps(noreplace=False, exchange=False)
    dest = str(tmp_path / "f")
    trace.fail(last, errno.EIO, after=took_effect, when=lambda c: c.args[1] == dest, times=None)
    with contextlib.ExitStack() as stack:
        if last == "link":
            stack.enter_context(named_staging())
        if took_effect:
            atomic.write_text(dest, "whole")
            assert (tmp_path / "f").read_text() == "whole"
        else:
            with pytest.raises(OSError) as info:
                atomic.write_text(dest, "whole")
            assert info.value.errno == errno.EIO
            if last == "link_fd":  # named by the destination, not a descriptor
                assert info.value.filename == dest
    # Only link is tried again: the EIO it retries comes from another host
    # removing its source, which nobody can do to an unnamed file.
    assert trace.count(last) == (1 if took_effect or last == "link_fd" else 7)
    assert listing(tmp_path) == (["f"] if took_effect else [])


@pytest.mark.parametrize("seed", range(3))
def test_movers_and_a_finisher_whose_links_answer_eio_lose_nothing(
    tmp_path: Path,
    force_caps: Callable[..., Capabilities],
    trace: Recorder,
    monkeypatch: pytest.MonkeyPatch,
    seed: int,
) -> None:
    # Three threads move one file to one name while a fourth may remove it
    # (a finish), and links answer EIO at random, before or after taking
    # effect: the file is never lost, at most one mover is told it moved
    # the file (and then the file is there, and was not removed), and the
    # others are told they lost, or the EIO.
    monkeypatch.setattr(_rename, "_RELINK_PAUSES", (0.0005, 0.001, 0.002))
    caps = force_caps(noreplace=False, exchange=False)
    rng = random.Random(seed)
    chance = threading.Lock()

    def unsure_link(src: str, dst: str) -> None:
        with chance:
            fate, wait = rng.random(), rng.random() / 2000
        if fate < 0.25:
            raise OSError(errno.EIO, os.strerror(errno.EIO), src, None, dst)
        time.sleep(wait)
        os.link(src, dst)
        if fate < 0.5:
            time.sleep(wait)
            raise OSError(errno.EIO, os.strerror(errno.EIO), src, None, dst)

    trace.replace["link"] = unsure_link
    broken: list[str] = []
    for round_ in range(100):
        (tmp_path / str(round_)).mkdir()
        src, dst = str(tmp_path / str(round_) / "src"), str(tmp_path / str(round_) / "dst")
        Path(src).write_text("m")
        inode = os.lstat(src).st_ino
        told: dict[str, object] = {}  # who was told what
        with chance:
            delays = [rng.random() / 1000 for _ in range(4)]

        def move(
            who: str, delay: float, src: str = src, dst: str = dst, told: dict[str, object] = told
        ) -> None:
            time.sleep(delay)
            try:
                _rename.rename_noreplace(src, dst, caps)
                told[who] = "moved"
            except OSError as e:
                told[who] = e

        def finish(delay: float, src: str = src, told: dict[str, object] = told) -> None:
            time.sleep(delay)
            try:
                os.unlink(src)
                told["finish"] = "removed"
            except FileNotFoundError:
                told["finish"] = "lost"

        threads = [threading.Thread(target=move, args=(f"mover {i}", delays[i])) for i in range(3)]
        if round_ % 2:
            threads.append(threading.Thread(target=finish, args=(delays[3],)))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        names = [n for n in (src, dst) if os.path.lexists(n) and os.lstat(n).st_ino == inode]
        movers = [who for who, answer in told.items() if answer == "moved"]
        losers = [a for who, a in told.items() if who.startswith("mover") and a != "moved"]
        removed = told.get("finish") == "removed"
        if not names and not removed:
            broken.append(f"round {round_}: lost, {told}")
        if len(movers) > 1 or (movers and removed) or (movers and names != [dst]):
            broken.append(f"round {round_}: {movers} moved, names {names}, {told}")
        for answer in losers:
            if (
                not isinstance(answer, FileNotFoundError)
                and getattr(answer, "errno", 0) != errno.EIO
            ):
                broken.append(f"round {round_}: a loser told {answer!r}")
    assert broken == []


@pytest.mark.parametrize("durable", [True, False])
def test_two_movers_of_one_file_to_one_name_never_remove_its_last_name(
    tmp_path: Path, force_caps: Callable[..., Capabilities], trace: Recorder, durable: bool
) -> None:
    # The interleaving that lost messages: A links; B's link finds the same
    # inode (EEXIST).  B used to unlink the source, and A's cleanup then
    # removed the last name.  Now B has lost, and A completes the move.
    force_caps(noreplace=False, exchange=False)
    src, dst = tmp_path / "claim", tmp_path / "msg"
    src.write_text("payload")
    other: list[BaseException | None] = []

    def link_then_let_the_other_move(a: str, b: str) -> None:
        os.link(a, b)
        trace.replace.pop("link")
        try:
            atomic.rename(src, dst, durable=durable)  # the second mover, B
        except BaseException as e:
            other.append(e)
        else:
            other.append(None)

    trace.replace["link"] = link_then_let_the_other_move
    atomic.rename(src, dst, durable=durable)  # A
    assert len(other) == 1
    assert isinstance(other[0], FileNotFoundError)
    assert other[0].filename == str(src)
    assert listing(tmp_path) == ["msg"]
    assert dst.read_text() == "payload"
    if durable:
        # The link's directory is synced before the unlink of the source.
        names = [c.name for c in trace.calls]
        assert "fsync" in names[: names.index("unlink")]


def test_link_retransmitted_eexist_keeps_both_names(
    tmp_path: Path, force_caps: Callable[..., Capabilities], trace: Recorder
) -> None:
    # NFS may redo a link() that succeeded and answer EEXIST: the same as
    # another mover's link in progress, which no caller can tell apart.  The
    # caller is told it lost; the file keeps both names, nothing is lost.
    force_caps(noreplace=False, exchange=False)
    (tmp_path / "msg").write_text("m")
    trace.fail("link", errno.EEXIST, after=True)
    with pytest.raises(FileNotFoundError):
        atomic.rename(tmp_path / "msg", tmp_path / "new")
    assert listing(tmp_path) == ["msg", "new"]
    assert os.path.samefile(tmp_path / "msg", tmp_path / "new")


@pytest.mark.parametrize("flags", [{"noreplace": False}, {"noreplace": False, "hardlinks": False}])
def test_rename_onto_itself_is_a_clash(
    tmp_path: Path, force_caps: Callable[..., Capabilities], flags: Any
) -> None:
    # The same name is "another file with this name" to a no-clobber rename
    # (renameat2 answers EEXIST); the link fallback must not take it for its
    # own retransmitted link and unlink the only name.
    force_caps(exchange=False, **flags)
    (tmp_path / "sub").mkdir()
    (tmp_path / "f").write_text("keep")
    (tmp_path / "alias").symlink_to(".")
    for dst in (tmp_path / "f", tmp_path / "sub" / ".." / "f", tmp_path / "alias" / "f"):
        with pytest.raises(FileExistsError):
            atomic.rename(tmp_path / "f", dst)
        assert (tmp_path / "f").read_text() == "keep"


def test_rename_onto_itself_natively_is_a_clash(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("keep")
    with pytest.raises(FileExistsError):
        atomic.rename(tmp_path / "f", tmp_path / "f")
    assert (tmp_path / "f").read_text() == "keep"


def test_link_eexist_of_another_file_is_a_clash(
    tmp_path: Path, force_caps: Callable[..., Capabilities]
) -> None:
    force_caps(noreplace=False, exchange=False)
    (tmp_path / "msg").write_text("m")
    (tmp_path / "new").write_text("n")
    with pytest.raises(FileExistsError) as info:
        atomic.rename(tmp_path / "msg", tmp_path / "new")
    assert info.value.filename == str(tmp_path / "new")
    assert (tmp_path / "new").read_text() == "n"
    assert (tmp_path / "msg").read_text() == "m"


# -- swap -----------------------------------------------------------------


def test_swap_files_and_directories(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("A")
    (tmp_path / "b").mkdir()
    atomic.swap(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b").read_text() == "A"
    assert (tmp_path / "a").is_dir()


def test_swap_missing(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("A")
    with pytest.raises(FileNotFoundError) as info:
        atomic.swap(tmp_path / "a", tmp_path / "b")
    assert info.value.errno == errno.ENOENT
    assert listing(tmp_path) == ["a"]


def test_swap_durable_syncs_both_directories(tmp_path: Path, trace: Recorder) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "a").write_text("A")
    (tmp_path / "b").write_text("B")
    atomic.capabilities(tmp_path / "x" / "a")
    trace.calls.clear()
    atomic.swap(tmp_path / "x" / "a", tmp_path / "b")
    assert trace.fsynced_paths() == [str(tmp_path / "x"), str(tmp_path)]
    assert (tmp_path / "b").read_text() == "A"


@pytest.mark.parametrize("flags", [{"exchange": False}, {"ignores_flags": True}])
def test_swap_unsupported_is_an_error_not_a_silent_swap(
    tmp_path: Path, force_caps: Callable[..., Capabilities], trace: Recorder, flags: Any
) -> None:
    caps = {"exchange": False, **flags}
    if caps.get("ignores_flags"):
        caps["noreplace"] = False
    force_caps(**caps)
    (tmp_path / "a").write_text("A")
    (tmp_path / "b").write_text("B")
    with pytest.raises(OSError) as info:
        atomic.swap(tmp_path / "a", tmp_path / "b")
    assert info.value.errno == errno.EOPNOTSUPP
    assert info.value.filename == str(tmp_path / "a")
    assert info.value.filename2 == str(tmp_path / "b")
    assert trace.count("renameat2") == trace.count("rename") == 0
    assert (tmp_path / "a").read_text() == "A"
    assert (tmp_path / "b").read_text() == "B"


def test_swap_refused_at_call_time(tmp_path: Path, trace: Recorder) -> None:
    atomic.capabilities(tmp_path / "a")
    (tmp_path / "a").write_text("A")
    (tmp_path / "b").write_text("B")
    trace.fail("renameat2", errno.EINVAL)
    with pytest.raises(OSError) as info:
        atomic.swap(tmp_path / "a", tmp_path / "b")
    assert info.value.errno == errno.EOPNOTSUPP
    assert "EINVAL" in str(info.value)
    assert (tmp_path / "a").read_text() == "A"


# -- capabilities ---------------------------------------------------------


def test_capabilities_of_this_filesystem(tmp_path: Path, fresh_probe: None) -> None:
    caps = atomic.capabilities(tmp_path / "anything")
    assert caps == Capabilities(noreplace=True, exchange=True, hardlinks=True)
    assert listing(tmp_path) == []


def test_probe_runs_once_per_device(tmp_path: Path, fresh_probe: None, trace: Recorder) -> None:
    atomic.capabilities(tmp_path / "a")
    atomic.write_bytes(tmp_path / "first", b"1")  # the staging layer's probe of unnamed files
    probe_calls = len(trace.calls)
    assert [c.args[0] for c in trace.calls if c.name == "link_fd"] != []
    (tmp_path / "sub").mkdir()
    atomic.capabilities(tmp_path / "sub" / "b")
    atomic.write_bytes(tmp_path / "sub" / "c", b"c")
    assert not [c for c in trace.calls[probe_calls:] if ".probe." in str(c.args[-1])]


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP])
def test_probe_sees_refused_flags(
    tmp_path: Path, fresh_probe: None, trace: Recorder, code: int
) -> None:
    trace.fail("renameat2", code, times=None)
    caps = atomic.capabilities(tmp_path / "a")
    assert caps == Capabilities(noreplace=False, exchange=False, hardlinks=True)
    assert listing(tmp_path) == []


def test_probe_detects_dropped_flags(tmp_path: Path, fresh_probe: None, trace: Recorder) -> None:
    # What a libfuse 3 passthrough does: return 0 and rename plainly.
    def plain_rename(src: str, dst: str, flags: int) -> None:
        os.rename(src, dst)

    trace.replace["renameat2"] = plain_rename
    caps = atomic.capabilities(tmp_path / "a")
    assert caps == Capabilities(noreplace=False, exchange=False, hardlinks=True, ignores_flags=True)
    (tmp_path / "a").write_text("A")
    (tmp_path / "b").write_text("B")
    with pytest.raises(FileExistsError):
        atomic.rename(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b").read_text() == "B"
    assert listing(tmp_path) == ["a", "b"]


def test_probe_detects_dropped_exchange(tmp_path: Path, fresh_probe: None, trace: Recorder) -> None:
    def drop_exchange(src: str, dst: str, flags: int) -> None:
        if flags == _renameat2.RENAME_EXCHANGE:
            os.rename(src, dst)
        else:
            _renameat2.renameat2(src, dst, flags)

    trace.replace["renameat2"] = drop_exchange
    caps = atomic.capabilities(tmp_path / "a")
    assert caps.ignores_flags
    assert not caps.exchange
    assert not caps.noreplace


def test_probe_tries_noreplace_onto_a_free_name(
    tmp_path: Path, fresh_probe: None, trace: Recorder
) -> None:
    # The kernel answers RENAME_NOREPLACE onto an existing name with EEXIST
    # before the filesystem sees the flag; a FUSE filesystem that refuses the
    # flag says so only for a free name.
    trace.fail("renameat2", errno.EINVAL, when=lambda call: call.args[1].endswith("/d"))
    caps = atomic.capabilities(tmp_path / "a")
    assert caps == Capabilities(noreplace=False, exchange=True, hardlinks=True)
    assert listing(tmp_path) == []


def test_a_mount_change_forgets_the_probed_answers(
    tmp_path: Path, fresh_probe: None, trace: Recorder
) -> None:
    need_root()
    atomic.capabilities(tmp_path / "a")
    probes = trace.count("mkdir")
    atomic.capabilities(tmp_path / "a")
    assert trace.count("mkdir") == probes
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "none", str(mountpoint)], check=True)
    try:
        atomic.capabilities(tmp_path / "a")
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)
    assert trace.count("mkdir") == probes + 1


def test_probe_without_links(tmp_path: Path, fresh_probe: None, trace: Recorder) -> None:
    trace.fail("link", errno.EPERM)
    caps = atomic.capabilities(tmp_path / "a")
    assert caps == Capabilities(noreplace=True, exchange=True, hardlinks=False)


def test_probe_that_cannot_write_assumes_and_retries(
    tmp_path: Path, fresh_probe: None, trace: Recorder
) -> None:
    trace.fail("mkdir", errno.EACCES)
    caps = atomic.capabilities(tmp_path / "a")
    assert caps == Capabilities(noreplace=True, exchange=True, hardlinks=True, probed=False)
    assert _rename._cache == {}
    atomic.capabilities(tmp_path / "a")
    assert len(_rename._cache) == 1


def test_capabilities_of_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        atomic.capabilities(tmp_path / "nope" / "x")
    assert info.value.filename == str(tmp_path / "nope")
    assert listing(tmp_path) == []


# -- clean ----------------------------------------------------------------


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then), follow_symlinks=False)


def test_clean_removes_stale_staging_only(tmp_path: Path) -> None:
    stale_file = tmp_path / ".a.atomstore-0123456789ab.tmp"
    stale_file.write_text("x")
    stale_tree = tmp_path / ".b.atomstore-0123456789ab.new"
    (stale_tree / "sub").mkdir(parents=True)
    (stale_tree / "sub" / "f").write_text("f")
    young = tmp_path / ".c.atomstore-0123456789ab.tmp"
    young.write_text("y")
    mine = tmp_path / ".hidden"
    mine.write_text("user's")
    lookalike = tmp_path / ".d.atomstore-xyz.tmp"
    lookalike.write_text("user's")
    for path in (stale_file, stale_tree, mine, lookalike):
        age(path, 7200)
    removed = atomic.clean(tmp_path, older_than=3600)
    assert sorted(removed) == sorted([str(stale_file), str(stale_tree)])
    assert listing(tmp_path) == sorted([young.name, mine.name, lookalike.name])
    assert atomic.clean(tmp_path, older_than=0) == [str(young)]


def test_clean_puts_back_a_tree_moved_aside(tmp_path: Path) -> None:
    aside = tmp_path / ".out.atomstore-0123456789ab.old"
    aside.mkdir()
    (aside / "f").write_text("old")
    staging = tmp_path / ".out.atomstore-ba9876543210.new"
    staging.mkdir()
    atomic.clean(tmp_path, older_than=0)
    assert listing(tmp_path) == ["out"]
    assert (tmp_path / "out" / "f").read_text() == "old"


def test_clean_removes_a_tree_moved_aside_once_replaced(tmp_path: Path) -> None:
    aside = tmp_path / ".out.atomstore-0123456789ab.old"
    aside.mkdir()
    (tmp_path / "out").mkdir()
    assert atomic.clean(tmp_path, older_than=0) == [str(aside)]
    assert listing(tmp_path) == ["out"]


def test_clean_keeps_a_tree_whose_name_was_cut(tmp_path: Path) -> None:
    aside = tmp_path / (".{}.atomstore-0123456789ab.old".format("x" * 200))
    aside.mkdir()
    assert atomic.clean(tmp_path, older_than=0) == []
    assert listing(tmp_path) == [aside.name]


def test_clean_arguments(tmp_path: Path) -> None:
    import datetime

    assert atomic.clean(tmp_path, older_than=datetime.timedelta(hours=1)) == []
    with pytest.raises(ValueError, match="negative"):
        atomic.clean(tmp_path, older_than=-1)
    with pytest.raises(TypeError, match="older_than"):
        atomic.clean(tmp_path, older_than="1h")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError) as info:
        atomic.clean(tmp_path / "missing")
    assert info.value.filename == str(tmp_path / "missing")


def test_a_killed_writer_of_a_new_file_leaves_nothing(tmp_path: Path) -> None:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        with atomic.file(tmp_path / "state") as f:
            f.write("half")
            f.flush()
            os._exit(0)
    os.waitpid(pid, 0)
    assert listing(tmp_path) == []


def test_crash_leftovers_are_cleaned(tmp_path: Path) -> None:
    # A writer killed in the middle of a replace (or where O_TMPFILE is
    # missing) leaves its temporary file behind.
    (tmp_path / "state").write_text("old")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        with atomic.file(tmp_path / "state", overwrite=True) as f:
            f.write("half")
            os._exit(0)
    os.waitpid(pid, 0)
    (left,) = [n for n in listing(tmp_path) if n != "state"]
    assert left.startswith(".state.atomstore-")
    assert atomic.clean(tmp_path, older_than=0) == [str(tmp_path / left)]
    assert listing(tmp_path) == ["state"]


def test_long_names_are_cut_to_fit(tmp_path: Path) -> None:
    name = "\u00e9" * 127  # 254 bytes
    with named_staging(), atomic.file(tmp_path / name, "wb") as f:
        (temp,) = listing(tmp_path)
        assert len(os.fsencode(temp)) <= 255
        f.write(b"x")
    assert listing(tmp_path) == [name]


# -- the renameat2 binding ------------------------------------------------


def test_binding_errors_carry_errno_and_both_names(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        _renameat2.renameat2(str(tmp_path / "a"), str(tmp_path / "b"), 0)
    assert info.value.errno == errno.ENOENT
    assert info.value.filename == str(tmp_path / "a")
    assert info.value.filename2 == str(tmp_path / "b")
    (tmp_path / "a").write_text("a")
    with pytest.raises(OSError) as both:
        _renameat2.renameat2(
            str(tmp_path / "a"),
            str(tmp_path / "a"),
            _renameat2.RENAME_EXCHANGE | _renameat2.RENAME_NOREPLACE,
        )
    assert both.value.errno == errno.EINVAL


@pytest.mark.parametrize(
    ("machine", "size", "number"),
    [
        ("x86_64", 8, 316),
        ("x86_64", 4, 0x40000000 | 316),
        ("i686", 4, 353),
        ("aarch64", 8, 276),
        ("armv7l", 4, 382),
        ("riscv64", 8, 276),
        ("loongarch64", 8, 276),
        ("ppc64le", 8, 357),
        ("ppc", 4, 357),
        ("s390x", 8, 347),
        ("sparc64", 8, None),
    ],
)
def test_syscall_numbers(machine: str, size: int, number: Any) -> None:
    assert _renameat2._syscall_number(machine, size) == number


@pytest.mark.skipif(
    not (os.uname().machine == "x86_64" and ctypes.sizeof(ctypes.c_void_p) == 8),
    reason="the syscall() path is exercised on x86_64 (the numbers above cover the rest)",
)
def test_syscall_path_without_the_libc_symbol(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = ctypes.CDLL(None, use_errno=True)

    class NoRenameat2:
        syscall = real.syscall

        def __getattr__(self, name: str) -> Any:
            raise AttributeError(name)

    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: NoRenameat2())
    call = _renameat2._linux_binding()
    assert call is not None
    (tmp_path / "a").write_text("a")
    (tmp_path / "b").write_text("b")
    a, b = os.fsencode(tmp_path / "a"), os.fsencode(tmp_path / "b")
    assert call(-100, a, -100, b, 1) == -1
    assert ctypes.get_errno() == errno.EEXIST
    assert call(-100, a, -100, b, 2) == 0
    assert (tmp_path / "a").read_text() == "b"


def test_unavailable_binding_is_enosys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_renameat2, "_call", None)
    with pytest.raises(OSError) as info:
        _renameat2.renameat2("a", "b", 0)
    assert info.value.errno == errno.ENOSYS


def test_probe_without_renameat2(
    tmp_path: Path, fresh_probe: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_renameat2, "available", lambda: False)
    caps = atomic.capabilities(tmp_path / "a")
    assert caps == Capabilities(noreplace=False, exchange=False, hardlinks=True)
    (tmp_path / "a").write_text("A")
    atomic.rename(tmp_path / "a", tmp_path / "b")
    assert listing(tmp_path) == ["b"]


# -- a network filesystem that looks at the target first ----------------------


def _other_mover_first(then: Callable[[str, str], object]) -> Callable[..., None]:
    """A renameat2 that lets another mover act, then answers EEXIST, as
    JuiceFS does when it finds the target taken before the source gone."""

    def renameat2(src: str, dst: str, flags: int) -> None:
        then(src, dst)
        raise OSError(errno.EEXIST, os.strerror(errno.EEXIST), src, None, dst)

    return renameat2


@pytest.mark.parametrize("other", ["moved it to the same name", "moved it elsewhere", "removed it"])
def test_native_rename_lost_to_another_mover_says_enoent(
    tmp_path: Path, trace: Recorder, other: str
) -> None:
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    Path(src).write_bytes(b"message")

    def elsewhere(s: str, d: str) -> None:
        os.rename(s, s + ".away")
        Path(d).write_bytes(b"x")

    def removed(s: str, d: str) -> None:
        os.unlink(s)
        Path(d).write_bytes(b"x")

    actions: dict[str, Callable[[str, str], object]] = {
        "moved it to the same name": os.rename,
        "moved it elsewhere": elsewhere,
        "removed it": removed,
    }
    trace.replace["renameat2"] = _other_mover_first(actions[other])
    caps = Capabilities(noreplace=True, exchange=True, hardlinks=True)
    with pytest.raises(FileNotFoundError) as info:
        _rename.rename_noreplace(src, dst, caps)
    assert info.value.errno == errno.ENOENT
    assert info.value.filename == src


def test_native_rename_onto_another_file_still_says_eexist(tmp_path: Path, trace: Recorder) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(b"mine")
    trace.replace["renameat2"] = _other_mover_first(
        lambda s, d: Path(d).write_bytes(b"someone else's")
    )
    caps = Capabilities(noreplace=True, exchange=True, hardlinks=True)
    with pytest.raises(FileExistsError) as info:
        _rename.rename_noreplace(str(src), str(dst), caps)
    assert info.value.filename == str(dst)
    assert src.read_bytes() == b"mine"
    assert dst.read_bytes() == b"someone else's"


def test_native_rename_of_a_name_onto_itself_spelled_with_a_slash_says_eexist(
    tmp_path: Path,
) -> None:
    (tmp_path / "d").mkdir()
    caps = Capabilities(noreplace=True, exchange=True, hardlinks=True)
    with pytest.raises(FileExistsError):
        _rename.rename_noreplace(str(tmp_path / "d"), str(tmp_path / "d") + "/", caps)
    assert (tmp_path / "d").is_dir()


def test_native_rename_eexist_with_a_source_that_cannot_be_looked_at_stays_eexist(
    tmp_path: Path, trace: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ESTALE or EIO on the source tells nothing of a mover: no ENOENT.
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(b"mine")
    dst.write_bytes(b"theirs")
    blind_lstat(monkeypatch, lambda path: path == str(src), errno.ESTALE)
    caps = Capabilities(noreplace=True, exchange=True, hardlinks=True)
    with pytest.raises(FileExistsError):
        _rename.rename_noreplace(str(src), str(dst), caps)
    monkeypatch.undo()
    assert src.read_bytes() == b"mine"
    assert dst.read_bytes() == b"theirs"


@pytest.mark.parametrize(
    "code", [errno.EPERM, errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR]
)
def test_last_resort_rename_onto_a_name_made_meanwhile_says_eexist(
    tmp_path: Path, trace: Recorder, code: int
) -> None:
    # Without flags or links (a directory on sshfs), the name is checked,
    # then renamed onto: another host made it in between, and the server
    # refused the rename (SFTP says EPERM).
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()

    def made_meanwhile(s: str, d: str) -> None:
        os.mkdir(d)
        raise OSError(code, os.strerror(code), s, None, d)

    trace.replace["rename"] = made_meanwhile
    caps = Capabilities(noreplace=False, exchange=False, hardlinks=False)
    with pytest.raises(FileExistsError) as info:
        _rename.rename_noreplace(str(src), str(dst), caps)
    assert info.value.filename == str(dst)
    assert src.is_dir()
    assert dst.is_dir()


def test_last_resort_rename_onto_a_file_made_meanwhile_says_eexist(tmp_path: Path) -> None:
    # rename(2) of a directory onto a file answers ENOTDIR; the checked
    # rename says the name is taken, as RENAME_NOREPLACE would.
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "part").write_bytes(b"mine")
    real_lexists = os.path.lexists
    checked: list[str] = []

    def lexists(path: str) -> bool:
        if path == str(dst) and not checked:  # checked before the other host made it
            checked.append(path)
            dst.write_bytes(b"theirs")
            return False
        return real_lexists(path)

    caps = Capabilities(noreplace=False, exchange=False, hardlinks=False)
    with mock.patch.object(os.path, "lexists", lexists), pytest.raises(FileExistsError):
        _rename.rename_noreplace(str(src), str(dst), caps)
    assert (src / "part").read_bytes() == b"mine"
    assert dst.read_bytes() == b"theirs"


@pytest.mark.parametrize("code", [errno.EPERM, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR])
def test_last_resort_refusal_without_a_name_made_meanwhile_is_reported_as_it_is(
    tmp_path: Path, trace: Recorder, code: int
) -> None:
    # A genuine refusal (an immutable directory, a sticky /tmp) with no
    # destination made: the caller is told what the kernel said.
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()

    def refused(s: str, d: str) -> None:
        raise OSError(code, os.strerror(code), s, None, d)

    trace.replace["rename"] = refused
    caps = Capabilities(noreplace=False, exchange=False, hardlinks=False)
    with pytest.raises(OSError) as info:
        _rename.rename_noreplace(str(src), str(dst), caps)
    assert info.value.errno == code
    assert not isinstance(info.value, FileExistsError)
    assert src.is_dir()
    assert not dst.exists()


def test_last_resort_refusal_after_the_source_went_is_not_called_taken(
    tmp_path: Path, trace: Recorder
) -> None:
    # The destination was made meanwhile, but the source went too (another
    # mover took it): not a name taken from under a source still there.
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()

    def moved_away(s: str, d: str) -> None:
        os.rename(s, d)
        raise OSError(errno.EPERM, os.strerror(errno.EPERM), s, None, d)

    trace.replace["rename"] = moved_away
    caps = Capabilities(noreplace=False, exchange=False, hardlinks=False)
    with pytest.raises(PermissionError):
        _rename.rename_noreplace(str(src), str(dst), caps)
    assert dst.is_dir()


def test_last_resort_rename_in_an_immutable_directory_says_eperm(tmp_path: Path) -> None:
    # A real refusal: chattr +i on the directory; nothing was made there.
    need_root()
    src = tmp_path / "box" / "src"
    src.parent.mkdir()
    src.mkdir()
    need(
        subprocess.run(["chattr", "+i", str(src.parent)], check=False).returncode == 0,
        "needs chattr +i (ext4, xfs or btrfs, as root)",
    )
    try:
        caps = Capabilities(noreplace=False, exchange=False, hardlinks=False)
        with pytest.raises(PermissionError) as info:
            _rename.rename_noreplace(str(src), str(src.parent / "dst"), caps)
        assert info.value.errno == errno.EPERM
    finally:
        subprocess.run(["chattr", "-i", str(src.parent)], check=True)
    assert os.listdir(src.parent) == ["src"]
