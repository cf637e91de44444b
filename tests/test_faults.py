"""Faults injected through the OS boundary, for every operation that writes.

For each operation and each fault: the call raises the injected error, or,
where the fault only refuses a feature (renameat2 flags, links), falls back
and succeeds; the directory then holds exactly what it held before, or,
when the failure came after the publishing rename, exactly what a
successful call leaves, and never a temporary file.  A failed fsync ends
the operation: it is the last fsync made, never retried.

Every fsync of every operation is failed in turn.  Single faults already
tested next to their module (test_atomic_file, test_store, test_rename,
test_atomic_folder: a refused or EXDEV exchange in folder(), EXDEV from a
lower-layer directory, a refused renameat2 in rename() and swap()) are not
repeated here.
"""

from __future__ import annotations

import errno
import itertools
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from atomstore import Claim, FileStore, _rename, atomic
from atomstore._info import split_info
from atomstore._rename import Capabilities
from crash_model import pretend, scan
from tracing import Call, Recorder, named_staging

PAYLOAD = b"the new content, longer than one short write"
OLD = b"old content"
NO_RENAME_FLAGS = Capabilities(noreplace=False, exchange=False, hardlinks=True)
NO_EXCHANGE = Capabilities(noreplace=True, exchange=False, hardlinks=True)
_PUBLISHING = frozenset({"rename", "renameat2", "link", "link_fd"})
_UNIQUE = re.compile(r"^\d+\.M\d{6}P\d+Q\d+R[0-9a-f]{8}\.")

Listing = list[tuple[str, "bytes | None"]]


@dataclass
class Work:
    """An operation's directory, and its store and claim where it has them."""

    root: Path
    store: FileStore | None = None
    claim: Claim | None = None

    @property
    def s(self) -> FileStore:
        assert self.store is not None
        return self.store

    @property
    def c(self) -> Claim:
        assert self.claim is not None
        return self.claim


@dataclass(frozen=True)
class Op:
    """An operation under test.

    :ivar publishes: the calls after which the operation's effect is visible:
        a failure after one of them leaves the state of a successful call.
    """

    name: str
    setup: Callable[[Path], Work]
    act: Callable[[Work], object]
    caps: Capabilities | None = None
    publishes: frozenset[str] = _PUBLISHING


# -- setups -------------------------------------------------------------------


def empty(root: Path) -> Work:
    return Work(root)


def with_file(root: Path) -> Work:
    (root / "f").write_bytes(OLD)
    return Work(root)


def with_tree(root: Path) -> Work:
    (root / "site").mkdir()
    (root / "site" / "a").write_bytes(b"a1")
    (root / "site" / "sub").mkdir()
    (root / "site" / "sub" / "b").write_bytes(b"b1")
    return Work(root)


def with_two_files(root: Path) -> Work:
    (root / "sub").mkdir()
    (root / "a").write_bytes(b"A")
    (root / "b").write_bytes(b"B")
    return Work(root)


def with_store(root: Path) -> Work:
    store = FileStore(root / "s")
    store.prepare()
    return Work(root, store)


def with_message(root: Path) -> Work:
    work = with_store(root)
    work.s.add(b"a message")
    return work


def with_claim(root: Path) -> Work:
    work = with_message(root)
    work.claim = work.s.claim()
    return work


def with_file_in(area: str) -> Callable[[Path], Work]:
    def setup(root: Path) -> Work:
        work = with_store(root)
        (root / "s" / area / "m").write_bytes(PAYLOAD)
        return work

    return setup


# -- actions ------------------------------------------------------------------


def write_file(overwrite: bool) -> Callable[[Work], object]:
    def act(work: Work) -> None:
        with atomic.file(work.root / "f", "w", overwrite=overwrite, encoding="ascii") as f:
            f.write(PAYLOAD.decode())

    return act


def write_folder(overwrite: bool) -> Callable[[Work], object]:
    def act(work: Work) -> None:
        with atomic.folder(work.root / "site", overwrite=overwrite) as staging:
            (staging / "a").write_bytes(b"a2")
            (staging / "c").write_bytes(b"c2")

    return act


def named(act: Callable[[Work], object]) -> Callable[[Work], object]:
    """``act`` staging under hidden names, as where O_TMPFILE is missing."""

    def run(work: Work) -> object:
        with named_staging():
            return act(work)

    return run


def give_back(work: Work) -> object:
    os.utime(work.c.path, (0, 0))
    return work.s.recover(0)


OPS = {
    op.name: op
    for op in (
        Op("file new", empty, write_file(False)),
        Op("file new, named", empty, named(write_file(False))),
        Op("file overwrite", with_file, write_file(True)),
        Op("write_bytes new", empty, lambda w: atomic.write_bytes(w.root / "f", PAYLOAD)),
        Op(
            "write_bytes new, named",
            empty,
            named(lambda w: atomic.write_bytes(w.root / "f", PAYLOAD)),
        ),
        Op(
            "write_bytes overwrite",
            with_file,
            lambda w: atomic.write_bytes(w.root / "f", PAYLOAD, overwrite=True),
        ),
        Op("folder new", empty, write_folder(False)),
        Op("folder overwrite", with_tree, write_folder(True)),
        Op("folder overwrite in steps", with_tree, write_folder(True), caps=NO_EXCHANGE),
        Op("rename", with_two_files, lambda w: atomic.rename(w.root / "a", w.root / "sub" / "a")),
        Op("swap", with_two_files, lambda w: atomic.swap(w.root / "a", w.root / "b")),
        Op("add", with_store, lambda w: w.s.add(PAYLOAD)),
        Op("add, named", with_store, named(lambda w: w.s.add(PAYLOAD))),
        Op("add_many", with_store, lambda w: w.s.add_many([PAYLOAD, b"second message"])),
        Op(
            "add_many, named",
            with_store,
            named(lambda w: w.s.add_many([PAYLOAD, b"second message"])),
        ),
        Op("move tmp to new", with_file_in("tmp"), lambda w: w.s.move("m", "tmp", "new")),
        Op("move new to cur", with_file_in("new"), lambda w: w.s.move("m", "new", "cur")),
        Op("copy", with_file_in("cur"), lambda w: w.s.copy("m", "cur", "new")),
        Op("claim", with_message, lambda w: w.s.claim()),
        Op("release", with_claim, lambda w: w.c.release()),
        Op("finish", with_claim, lambda w: w.c.finish(), publishes=frozenset({"unlink"})),
        Op("recover", with_claim, give_back),
    )
}


# -- running an operation -------------------------------------------------------


def listing(root: Path) -> Listing:
    """Everything under ``root``, hidden names included; unique names and
    claim fields, which differ from run to run, replaced by placeholders."""
    found = []
    for path, data in scan(root).items():
        parts = []
        for part in path.split("/"):
            base, fields = split_info(part)
            if _UNIQUE.match(base):
                base = "<message>"
            if "T" in fields:
                base += f":claimed,A{fields['A']}"
            elif fields:
                base += ":" + ",".join(f"{k}{v}" for k, v in sorted(fields.items()))
            parts.append(base)
        found.append(("/".join(parts), data))
    return sorted(found, key=lambda item: (item[0], item[1] or b""))


@dataclass
class Run:
    """One operation in a fresh directory, with the states to compare."""

    op: Op
    work: Work
    before: Listing
    after: Listing  # what a call without a fault leaves


@pytest.fixture
def start(tmp_path: Path, trace: Recorder) -> Iterator[Callable[[Op], Run]]:
    """Prepare an operation: learn what it leaves, then set it up afresh."""
    runs = itertools.count()
    with pretend(tmp_path, None):  # restores the probed capabilities after

        def prepare(op: Op) -> Run:
            reference = _setup(op, tmp_path / f"reference{next(runs)}")
            op.act(reference)
            after = listing(reference.root)
            work = _setup(op, tmp_path / f"run{next(runs)}")
            trace.calls.clear()
            trace.faults.clear()
            trace.replace.clear()
            return Run(op, work, listing(work.root), after)

        yield prepare


def _setup(op: Op, root: Path) -> Work:
    root.mkdir()
    if op.caps is not None:
        _rename._cache[os.stat(root).st_dev] = op.caps  # start() restores the cache
    atomic.capabilities(root / "x")  # probe outside the faults
    return op.setup(root)


def _published(op: Op, calls: list[Call], failed: Call) -> bool:
    """Whether a publishing call succeeded before the ``failed`` one."""
    for call in calls:
        if call is failed:
            return False
        if call.name in op.publishes and call.error is None:
            return True
    raise AssertionError("the failed call was not recorded")


def _nth(n: int) -> Callable[[Call], bool]:
    seen = itertools.count(1)
    return lambda call: next(seen) == n


# -- fsync ----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(OPS))
def test_each_failed_fsync_is_reported_and_never_retried(
    start: Callable[[Op], Run], trace: Recorder, name: str
) -> None:
    op = OPS[name]
    for n in itertools.count(1):
        run = start(op)
        fault = trace.fail("fsync", errno.EIO, when=_nth(n))
        error: OSError | None = None
        try:
            op.act(run.work)
        except OSError as e:
            error = e
        if error is None:
            assert fault.hits == 0, f"fsync {n} failed, yet {name} reported success"
            assert listing(run.work.root) == run.after
            assert n > 1, f"{name} made no fsync"
            return
        assert fault.hits == 1
        assert error.errno == errno.EIO
        assert trace.count("fsync") == n  # the failed one was the last
        (failed,) = [c for c in trace.named("fsync") if c.error is not None]
        expected = run.after if _published(op, trace.calls, failed) else run.before
        assert listing(run.work.root) == expected, f"fsync {n} of {name} failed"


# -- write ----------------------------------------------------------------------

WRITERS = [
    "file new",
    "file new, named",
    "file overwrite",
    "write_bytes overwrite",
    "write_bytes new",
    "write_bytes new, named",
    "add",
    "add, named",
    "add_many",
    "add_many, named",
    "copy",
]


@pytest.mark.parametrize("name", WRITERS)
@pytest.mark.parametrize("progress", ["at once", "after a short write"])
def test_enospc_leaves_the_directory_as_it_was(
    start: Callable[[Op], Run], trace: Recorder, name: str, progress: str
) -> None:
    op = OPS[name]
    run = start(op)
    if progress == "after a short write":
        trace.replace["write"] = lambda fd, data: os.write(fd, bytes(data[:7]))
        fault = trace.fail("write", errno.ENOSPC, when=_nth(2))
    else:
        fault = trace.fail("write", errno.ENOSPC)
    with pytest.raises(OSError) as info:
        op.act(run.work)
    assert info.value.errno == errno.ENOSPC
    assert fault.hits == 1
    assert listing(run.work.root) == run.before
    assert trace.count("rename") == trace.count("renameat2") == trace.count("link") == 0


@pytest.mark.parametrize(
    "name", ["file overwrite", "write_bytes overwrite", "add", "add_many", "copy"]
)
def test_short_writes_are_completed(start: Callable[[Op], Run], trace: Recorder, name: str) -> None:
    op = OPS[name]
    run = start(op)
    trace.replace["write"] = lambda fd, data: os.write(fd, bytes(data[:3]))
    op.act(run.work)
    assert listing(run.work.root) == run.after
    assert trace.count("write") >= len(PAYLOAD) // 3


# -- renameat2 and link refused ---------------------------------------------------

NO_CLOBBER = [
    "file new, named",
    "write_bytes new, named",
    "folder new",
    "add, named",
    "add_many, named",
    "move tmp to new",
    "move new to cur",
    "copy",
    "release",
    "recover",
]


def _fell_back_to(calls: list[Call], name: str) -> bool:
    return any(c.name == name and c.error is None for c in calls)


@pytest.mark.parametrize("name", NO_CLOBBER)
@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOSYS])
def test_refused_renameat2_falls_back_to_a_link(
    start: Callable[[Op], Run], trace: Recorder, name: str, code: int
) -> None:
    op = OPS[name]
    run = start(op)
    fault = trace.fail("renameat2", code, times=None)
    op.act(run.work)
    assert fault.hits >= 1
    assert listing(run.work.root) == run.after
    # A directory cannot be linked (EPERM): it takes the last resort, a rename.
    assert _fell_back_to(trace.calls, "rename" if name == "folder new" else "link")


@pytest.mark.parametrize("name", NO_CLOBBER)
def test_refused_link_falls_back_to_a_rename(
    start: Callable[[Op], Run], trace: Recorder, name: str
) -> None:
    op = OPS[name]
    run = start(Op(op.name, op.setup, op.act, caps=NO_RENAME_FLAGS))
    fault = trace.fail("link", errno.EPERM, times=None)
    op.act(run.work)
    assert fault.hits >= 1
    assert listing(run.work.root) == run.after
    assert trace.count("renameat2") == 0
    assert _fell_back_to(trace.calls, "rename")


# -- EXDEV ----------------------------------------------------------------------

RENAMERS = [*NO_CLOBBER, "file overwrite", "write_bytes overwrite", "rename", "swap", "claim"]


@pytest.mark.parametrize("name", RENAMERS)
def test_exdev_is_reported(start: Callable[[Op], Run], trace: Recorder, name: str) -> None:
    op = OPS[name]
    run = start(op)
    faults = [trace.fail(call, errno.EXDEV) for call in ("rename", "renameat2")]
    with pytest.raises(OSError) as info:
        op.act(run.work)
    if name == "swap":
        assert info.value.errno == errno.EOPNOTSUPP  # no exchange here: nothing changed
    else:
        assert info.value.errno == errno.EXDEV
    assert sum(f.hits for f in faults) == 1
    assert listing(run.work.root) == run.before
