"""The same guarantees on real filesystems: ext4, xfs, btrfs, tmpfs, overlayfs, FUSE.

Every test runs on each kind of mount below; what differs is asserted per
kind: the native renameat2 path where the flags are honoured, the
documented fallbacks where they are refused or silently dropped.  All of it
needs root, loop devices, /dev/fuse and the mkfs tools (tests/provision.sh).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.util
import itertools
import os
import re
import shutil
import stat
import time
from collections.abc import Iterator
from ctypes.util import find_library
from dataclasses import dataclass
from pathlib import Path

import pytest

import mounts
from atomstore import Claim, ClaimLostError, FileStore, atomic
from atomstore._rename import Capabilities
from atomstore._renameat2 import RENAME_EXCHANGE, RENAME_NOREPLACE, renameat2
from fstree import listing, store_entries, tree
from kill_harness import kill_trials
from needs import need, need_device, need_root, need_tool
from tracing import Recorder

pytestmark = pytest.mark.slow

NATIVE = Capabilities(noreplace=True, exchange=True, hardlinks=True, ignores_flags=False)
REFUSED = Capabilities(noreplace=False, exchange=False, hardlinks=True, ignores_flags=False)
DROPPED = Capabilities(noreplace=False, exchange=False, hardlinks=True, ignores_flags=True)


@dataclass(frozen=True)
class Kind:
    """A kind of mount, and what atomstore is expected to find on it."""

    name: str
    caps: Capabilities
    lower_layer: bool = False  # the test's directory exists only in an overlay's lower layer

    @property
    def fuse_mode(self) -> str | None:
        return self.name[len("fuse-") :] if self.name.startswith("fuse-") else None

    @property
    def tmpfile(self) -> bool:
        """Whether O_TMPFILE works (FUSE: EOPNOTSUPP, fs/fuse/dir.c)."""
        return self.fuse_mode is None


KINDS = [
    Kind("ext4", NATIVE),
    Kind("xfs", NATIVE),
    Kind("btrfs", NATIVE),
    Kind("tmpfs", NATIVE),
    Kind("overlay-upper", NATIVE),
    Kind("overlay-lower", NATIVE, lower_layer=True),
    Kind("fuse-honour", NATIVE),
    # The kernel answers EINVAL for the filesystem's ENOSYS (fs/fuse/dir.c).
    Kind("fuse-einval", REFUSED),
    Kind("fuse-enosys", REFUSED),
    Kind("fuse-drop", DROPPED),
]

# What each test's directory holds before the test: files, a tree, a store
# with one message waiting.  On overlay-lower all of it is in the lower layer.
SEED_MESSAGE = "1000000000.M000000P1Q0Rseed0000.seedhost"
SEED = {
    "file": "old file\n",
    "a": "A",
    "b": "B",
    "tree/a.txt": "a old",
    "tree/sub/b.txt": "b old",
    "other/c.txt": "c other",
    f"store/new/{SEED_MESSAGE}": "seeded message",
    "store/tmp/": "",
    "store/cur/": "",
}
SEED_TOP = sorted({name.split("/")[0] for name in SEED})


def write_seed(directory: Path) -> None:
    for name, content in SEED.items():
        path = directory / name
        if name.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)


# -- mounts ---------------------------------------------------------------


@pytest.fixture(scope="module")
def namespace() -> Iterator[bool]:
    need_root()
    with mounts.private_mount_namespace() as private:
        yield private


@pytest.fixture(scope="module")
def scratch(namespace: bool, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A tmpfs for overlay layers and FUSE sources: independent of the host's filesystem."""
    with mounts.tmpfs(tmp_path_factory.mktemp("scratch") / "mnt", size_mib=256) as path:
        yield path


def need_kernel(fstype: str) -> None:
    need(mounts.kernel_has(fstype), f"needs {fstype} support in the kernel")


def need_fuse() -> None:
    need_device("/dev/fuse")
    need_kernel("fuse")
    need(importlib.util.find_spec("mfusepy") is not None, "needs mfusepy (the test extra)")
    need(find_library("fuse3") is not None, "needs libfuse3 (tests/provision.sh installs fuse3)")


class Mount:
    """A mounted kind; :meth:`place` makes each test's directory on it."""

    def __init__(self, kind: Kind, root: Path, layers: Path | None = None) -> None:
        self.kind = kind
        self.root = root
        self.layers = layers  # overlay: where each test's own overlay goes

    @contextlib.contextmanager
    def place(self, name: str) -> Iterator[Path]:
        if self.layers is None:
            directory = self.root / name
            directory.mkdir()
            write_seed(directory)
            yield directory
            return
        # A fresh overlay for each test, so its lower layer can hold the seed.
        layers = self.layers / name
        lower = layers / "lower"
        lower.mkdir(parents=True)
        if self.kind.lower_layer:
            write_seed(lower / "case")
        with mounts.overlay(layers, lower) as merged:
            directory = merged / "case"
            if not self.kind.lower_layer:
                directory.mkdir()
                write_seed(directory)
            yield directory


@pytest.fixture(scope="module", params=KINDS, ids=[k.name for k in KINDS])
def fs(
    request: pytest.FixtureRequest,
    namespace: bool,
    scratch: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Mount]:
    kind: Kind = request.param
    workdir = tmp_path_factory.mktemp(kind.name)
    if kind.name in mounts.MKFS:
        need_tool(mounts.MKFS[kind.name][0], "losetup")
        need_device("/dev/loop-control")
        need_kernel(kind.name)
        with mounts.loop_filesystem(kind.name, workdir) as root:
            yield Mount(kind, root)
    elif kind.name == "tmpfs":
        with mounts.tmpfs(workdir / "tmpfs") as root:
            yield Mount(kind, root)
    elif kind.fuse_mode is None:
        need_kernel("overlay")
        yield Mount(kind, workdir, layers=scratch / kind.name)
    else:
        need_fuse()
        source = scratch / kind.name
        with mounts.fuse_passthrough(kind.fuse_mode, source, workdir / "mnt") as root:
            yield Mount(kind, root)


@pytest.fixture
def place(fs: Mount, request: pytest.FixtureRequest, fresh_probe: None) -> Iterator[Path]:
    """The test's own directory on the mount, seeded; capabilities probed afresh."""
    with fs.place(re.sub(r"[^\w.-]", "-", request.node.name)) as directory:
        yield directory


# -- helpers --------------------------------------------------------------


def seed_tree(prefix: str) -> dict[str, str]:
    """The seed's files below ``prefix``, as :func:`tree` shows them."""
    found = {}
    for name, content in SEED.items():
        if name.startswith(prefix + "/"):
            rel = name[len(prefix) + 1 :]
            found[rel] = content
            if "/" in rel.rstrip("/"):
                found[rel.split("/")[0] + "/"] = ""
    return found


def fill(staging: Path, version: str) -> None:
    (staging / "a.txt").write_text(f"a {version}")
    (staging / "sub").mkdir()
    (staging / "sub" / "b.txt").write_text(f"b {version}")


def assert_untouched_seed(place: Path) -> None:
    """Nothing but the seed's entries: no temporary file, no staging tree."""
    assert listing(place) == SEED_TOP


def probe(place: Path, trace: Recorder) -> Capabilities:
    """Probe now, so that the trace then holds only the operation."""
    caps = atomic.capabilities(place / "x")
    trace.calls.clear()
    return caps


def publisher(trace: Recorder, dest: Path) -> tuple[str, int]:
    """The call that gave ``dest`` its name, and its renameat2 flags."""
    for call in reversed(trace.calls):
        made = call.error is None and call.name in ("renameat2", "link", "rename", "link_fd")
        if made and call.args[1] == str(dest):
            return call.name, call.args[2] if call.name == "renameat2" else 0
    raise AssertionError(f"nothing published {dest}")


def flagged_renames(trace: Recorder, flags: int) -> list[str]:
    """The outcome of each renameat2 call with ``flags``: 'ok' or the errno name."""
    return [
        "ok" if c.error is None else errno.errorcode[c.error.errno or 0]
        for c in trace.named("renameat2")
        if c.args[2] == flags
    ]


def file_publisher(kind: Kind) -> tuple[str, int]:
    """How a new file gets its name on ``kind``: linked from an unnamed file
    where O_TMPFILE works, else a no-clobber rename of a hidden one."""
    return ("link_fd", 0) if kind.tmpfile else rename_publisher(kind)


def rename_publisher(kind: Kind) -> tuple[str, int]:
    """How a no-clobber rename of a file is made on ``kind``."""
    return ("renameat2", RENAME_NOREPLACE) if kind.caps.noreplace else ("link", 0)


def dir_publisher(kind: Kind) -> tuple[str, int]:
    # link() never takes a directory: the last resort (a check, then a
    # plain rename) is all a filesystem without RENAME_NOREPLACE offers.
    return ("renameat2", RENAME_NOREPLACE) if kind.caps.noreplace else ("rename", 0)


# -- what the probe finds -------------------------------------------------


def test_capabilities_as_measured(fs: Mount, place: Path) -> None:
    assert atomic.capabilities(place / "x") == fs.kind.caps
    assert_untouched_seed(place)


# -- atomic.file ----------------------------------------------------------


def test_file_new(fs: Mount, place: Path, trace: Recorder) -> None:
    probe(place, trace)
    dest = place / "new.txt"
    with atomic.file(dest) as f:
        f.write("fresh\n")
        assert not dest.exists()
    assert dest.read_text() == "fresh\n"
    assert publisher(trace, dest) == file_publisher(fs.kind)
    assert listing(place) == sorted([*SEED_TOP, "new.txt"])


def test_file_overwrite_keeps_the_mode(fs: Mount, place: Path, trace: Recorder) -> None:
    probe(place, trace)
    dest = place / "file"
    dest.chmod(0o640)
    with atomic.file(dest, overwrite=True) as f:
        f.write("new file\n")
    assert dest.read_text() == "new file\n"
    assert stat.S_IMODE(dest.stat().st_mode) == 0o640
    assert publisher(trace, dest) == ("rename", 0)
    assert_untouched_seed(place)


def test_file_existing_is_refused(fs: Mount, place: Path) -> None:
    dest = place / "file"
    with pytest.raises(FileExistsError) as info:
        with atomic.file(dest) as f:
            f.write("mine")  # pragma: no cover - refused before
    assert info.value.errno == errno.EEXIST
    assert info.value.filename == str(dest)
    with pytest.raises(FileExistsError) as info:
        atomic.write_bytes(dest, b"mine")
    assert info.value.errno == errno.EEXIST
    assert dest.read_text() == SEED["file"]
    assert_untouched_seed(place)


def test_file_appearing_while_writing_is_not_clobbered(
    fs: Mount, place: Path, trace: Recorder
) -> None:
    probe(place, trace)
    dest = place / "late"
    with pytest.raises(FileExistsError) as info:
        with atomic.file(dest) as f:
            f.write("mine")
            dest.write_text("theirs")
    assert info.value.errno == errno.EEXIST
    assert info.value.filename == str(dest)
    assert dest.read_text() == "theirs"
    # Whatever the filesystem did with the flags, no rename replaced it.
    assert "ok" not in flagged_renames(trace, RENAME_NOREPLACE)
    assert trace.count("rename") == 0
    assert listing(place) == sorted([*SEED_TOP, "late"])


@pytest.mark.parametrize("exception", [RuntimeError, KeyboardInterrupt])
def test_file_exception_discards(fs: Mount, place: Path, exception: type) -> None:
    dest = place / "file"
    with pytest.raises(exception):
        with atomic.file(dest, overwrite=True) as f:
            f.write("half a fi")
            raise exception("interrupted")
    assert dest.read_text() == SEED["file"]
    assert_untouched_seed(place)


# -- atomic.folder --------------------------------------------------------


def test_folder_new(fs: Mount, place: Path, trace: Recorder) -> None:
    probe(place, trace)
    dest = place / "site"
    with atomic.folder(dest) as staging:
        fill(staging, "v1")
        assert not dest.exists()
    assert tree(dest) == {"a.txt": "a v1", "sub/": "", "sub/b.txt": "b v1"}
    assert publisher(trace, dest) == dir_publisher(fs.kind)
    assert listing(place) == sorted([*SEED_TOP, "site"])


def test_folder_existing_is_refused(fs: Mount, place: Path) -> None:
    dest = place / "tree"
    with pytest.raises(FileExistsError) as info:
        with atomic.folder(dest) as staging:
            fill(staging, "v2")  # pragma: no cover - refused before
    assert info.value.errno == errno.EEXIST
    assert tree(dest) == seed_tree("tree")
    assert_untouched_seed(place)


def test_folder_overwrite(fs: Mount, place: Path, trace: Recorder) -> None:
    caps = probe(place, trace)
    dest = place / "tree"
    with atomic.folder(dest, overwrite=True) as staging:
        fill(staging, "v2")
        (staging / "extra").write_text("x")
    assert tree(dest) == {"a.txt": "a v2", "extra": "x", "sub/": "", "sub/b.txt": "b v2"}
    assert_untouched_seed(place)
    exchanges = flagged_renames(trace, RENAME_EXCHANGE)
    moved_aside = [c for c in trace.named("rename") if c.args[0] == str(dest)]
    if fs.kind.lower_layer:
        # Neither exchanged nor moved aside (EXDEV): removed in place, then
        # the new tree renamed in.
        assert exchanges == ["EXDEV"]
        assert [c.error.errno if c.error else 0 for c in moved_aside] == [errno.EXDEV]
        assert publisher(trace, dest) == dir_publisher(fs.kind)
    elif caps.exchange:
        assert exchanges == ["ok"]
        assert publisher(trace, dest) == ("renameat2", RENAME_EXCHANGE)
        assert moved_aside == []
    else:
        # In steps: the old tree aside under a hidden name, the new one in,
        # the old one removed.
        assert exchanges == []
        assert [c.error for c in moved_aside] == [None]
        assert moved_aside[0].args[1].endswith(".old")
        assert publisher(trace, dest) == dir_publisher(fs.kind)


def test_folder_overwrite_without_fallback(fs: Mount, place: Path) -> None:
    dest = place / "other"
    if fs.kind.caps.exchange and not fs.kind.lower_layer:
        with atomic.folder(dest, overwrite=True, allow_fallback=False) as staging:
            fill(staging, "v2")
        assert tree(dest) == {"a.txt": "a v2", "sub/": "", "sub/b.txt": "b v2"}
    else:
        with pytest.raises(OSError) as info:
            with atomic.folder(dest, overwrite=True, allow_fallback=False) as staging:
                fill(staging, "v2")
        assert info.value.errno == errno.EOPNOTSUPP
        assert tree(dest) == seed_tree("other")
    assert_untouched_seed(place)


@pytest.mark.parametrize("exception", [RuntimeError, KeyboardInterrupt])
def test_folder_exception_discards(fs: Mount, place: Path, exception: type) -> None:
    dest = place / "tree"
    with pytest.raises(exception):
        with atomic.folder(dest, overwrite=True) as staging:
            fill(staging, "v2")
            raise exception("interrupted")
    assert tree(dest) == seed_tree("tree")
    assert_untouched_seed(place)


# -- atomic.rename and atomic.swap ----------------------------------------


def test_rename_no_clobber(fs: Mount, place: Path, trace: Recorder) -> None:
    probe(place, trace)
    a, b, c = place / "a", place / "b", place / "c"
    with pytest.raises(FileExistsError) as info:
        atomic.rename(a, b)
    assert info.value.errno == errno.EEXIST
    assert info.value.filename == str(b)
    assert (a.read_text(), b.read_text()) == ("A", "B")
    atomic.rename(a, c)
    assert (c.read_text(), b.read_text()) == ("A", "B")
    assert not a.exists()
    assert publisher(trace, c) == rename_publisher(fs.kind)
    # A directory onto another: refused whatever the path taken.
    with pytest.raises(FileExistsError) as info:
        atomic.rename(place / "tree", place / "other")
    assert info.value.errno == errno.EEXIST
    assert tree(place / "tree") == seed_tree("tree")
    assert tree(place / "other") == seed_tree("other")
    assert listing(place) == sorted([*(set(SEED_TOP) - {"a"}), "c"])


def test_rename_directory(fs: Mount, place: Path) -> None:
    src, dst = place / "tree", place / "moved"
    if fs.kind.lower_layer:
        # overlayfs cannot rename a lower-layer directory (redirect_dir=off).
        with pytest.raises(OSError) as info:
            atomic.rename(src, dst)
        assert info.value.errno == errno.EXDEV
        assert tree(src) == seed_tree("tree")
        assert_untouched_seed(place)
    else:
        atomic.rename(src, dst)
        assert tree(dst) == seed_tree("tree")
        assert listing(place) == sorted([*(set(SEED_TOP) - {"tree"}), "moved"])


def test_swap_files(fs: Mount, place: Path, trace: Recorder) -> None:
    caps = probe(place, trace)
    a, b = place / "a", place / "b"
    if caps.exchange:
        atomic.swap(a, b)
        assert (a.read_text(), b.read_text()) == ("B", "A")
        assert flagged_renames(trace, RENAME_EXCHANGE) == ["ok"]
    else:
        with pytest.raises(OSError) as info:
            atomic.swap(a, b)
        assert info.value.errno == errno.EOPNOTSUPP
        assert (a.read_text(), b.read_text()) == ("A", "B")
        assert flagged_renames(trace, RENAME_EXCHANGE) == []
    assert_untouched_seed(place)


def test_swap_directories(fs: Mount, place: Path) -> None:
    one, two = place / "tree", place / "other"
    if fs.kind.caps.exchange and not fs.kind.lower_layer:
        atomic.swap(one, two)
        assert tree(one) == seed_tree("other")
        assert tree(two) == seed_tree("tree")
    else:
        with pytest.raises(OSError) as info:
            atomic.swap(one, two)
        assert info.value.errno == errno.EOPNOTSUPP
        assert tree(one) == seed_tree("tree")
        assert tree(two) == seed_tree("other")
    assert_untouched_seed(place)


# -- FileStore ------------------------------------------------------------


def test_filestore_flow(fs: Mount, place: Path, trace: Recorder) -> None:
    probe(place, trace)
    store = FileStore(place / "store", max_attempts=2)
    store.prepare()

    def claim() -> Claim | None:
        # A consumer of its own each time, as in another process: it looks
        # into new/ afresh and takes the oldest message.
        return FileStore(store.path, max_attempts=2).claim()

    new, cur, tmp, dead = (place / "store" / area for area in ("new", "cur", "tmp", "dead"))

    first = store.add(b"first")
    second = store.add("second")
    assert publisher(trace, new / first) == file_publisher(fs.kind)
    assert listing(tmp) == []

    # The seeded message is the oldest.
    seeded = claim()
    assert seeded is not None
    assert (seeded.name, seeded.read_bytes()) == (SEED_MESSAGE, b"seeded message")
    seeded.finish()

    taken = claim()
    assert taken is not None
    assert (taken.name, taken.attempts, taken.read_bytes()) == (first, 0, b"first")
    assert taken.release() == str(new / f"{first}:1,A1")
    again = claim()
    assert again is not None
    assert (again.name, again.attempts) == (first, 1)
    again.finish()

    held = claim()
    assert held is not None
    assert held.name == second
    time.sleep(0.05)
    assert store.recover(older_than=0.01) == [str(new / f"{second}:1,A1")]
    with pytest.raises(ClaimLostError):
        held.finish()
    last = claim()
    assert last is not None
    assert (last.name, last.attempts, last.read_text()) == (second, 1, "second")
    # The second failure makes it a dead letter; requeued, it starts afresh.
    assert last.release() == str(dead / f"{second}:1,A2")
    assert claim() is None
    assert store.requeue(f"{second}:1,A2") == str(new / second)
    final = claim()
    assert final is not None
    assert (final.name, final.attempts, final.read_text()) == (second, 0, "second")
    final.finish()
    assert claim() is None

    # The classic API.
    with store.create("invoice") as f:
        f.write("total: 42")
    store.move("invoice", "tmp", "new")
    store.copy("invoice", "new", "tmp")
    with pytest.raises(FileExistsError) as info:
        store.move("invoice", "tmp", "new")
    assert info.value.errno == errno.EEXIST
    assert (tmp / "invoice").read_text() == (new / "invoice").read_text() == "total: 42"
    store.move("invoice", "new", "cur")
    with pytest.raises(FileNotFoundError):
        store.move("invoice", "new", "cur")
    store.remove("invoice", "cur")
    store.remove("invoice", "tmp")

    # A crashed producer's leftover, and a crashed writer's temporary file.
    leftover = tmp / "crashed"
    leftover.write_text("half")
    temp = new / ".x.atomstore-0123456789ab.tmp"
    temp.write_text("half")
    an_hour_ago = time.time() - 3600
    for path in (leftover, temp):
        os.utime(path, (an_hour_ago, an_hour_ago))
    assert store.clean(older_than=60) == [str(leftover), str(temp)]
    assert (listing(tmp), listing(new), listing(cur), listing(dead)) == ([], [], [], [])
    assert_untouched_seed(place)


# -- kill test ------------------------------------------------------------

# ATOMSTORE_KILL_TRIALS=500 for the figures in docs/benchmarks.rst.
KILL_TRIALS = int(os.environ.get("ATOMSTORE_KILL_TRIALS", "100"))


def version_bytes(version: int) -> bytes:
    """Version ``version`` of the file: 16 KiB, checksummed."""
    body = f"version {version}\n".encode() + bytes([version % 251]) * 16384
    return body + hashlib.sha256(body).hexdigest().encode() + b"\n"


def version_of(data: bytes) -> int:
    """The version ``data`` holds (0: the seed); AssertionError if torn."""
    if data == SEED["file"].encode():
        return 0
    body, digest = data[:-65], data[-65:-1]
    assert hashlib.sha256(body).hexdigest().encode() == digest, f"torn: {len(data)} bytes"
    return int(body.split(b"\n", 1)[0].split()[1])


def test_the_kill_check_catches_torn_files() -> None:
    whole = version_bytes(7)
    assert version_of(whole) == 7
    for torn in (b"", whole[:4096], whole[:-1], whole.replace(b"\x07", b"\x00", 1)):
        with pytest.raises(AssertionError):
            version_of(torn)


def test_kill_while_writing(fs: Mount, place: Path) -> None:
    dest = place / "file"
    seen = {"version": 0, "leftovers": 0}

    def work(trial: int) -> None:
        version = version_of(dest.read_bytes())
        while True:
            version += 1
            with atomic.file(dest, "wb", overwrite=True) as f:
                f.write(version_bytes(version))

    def check(trial: int) -> None:
        version = version_of(dest.read_bytes())
        assert version >= seen["version"], f"trial {trial}: went back to {version}"
        seen["version"] = version
        extra = sorted(set(os.listdir(place)) - set(SEED_TOP))
        assert len(extra) <= 1, f"trial {trial}: {extra}"
        assert atomic.clean(place, older_than=0) == [str(place / n) for n in extra]
        seen["leftovers"] += len(extra)
        assert_untouched_seed(place)

    started = time.monotonic()
    report = kill_trials(work, check, trials=KILL_TRIALS, seed=5, max_delay=0.03)
    elapsed = time.monotonic() - started
    print(
        f"{fs.kind.name}: {report.trials} trials, {report.killed} killed, "
        f"{seen['version']} versions, {seen['leftovers']} temporary files cleaned, "
        f"{elapsed:.1f} s"
    )
    assert report.trials == KILL_TRIALS
    assert report.killed == KILL_TRIALS  # the writer never ends on its own
    # The kills landed both between writes and in the middle of them.
    assert seen["version"] > 0
    assert seen["leftovers"] > 0


def test_killed_writers_of_new_files_leave_nothing(fs: Mount, place: Path) -> None:
    # New names and new messages are written without any name until they are
    # complete (O_TMPFILE): a kill at any moment leaves nothing for clean().
    # Where O_TMPFILE is missing (FUSE) the hidden names are what clean()
    # removes, as above.
    store = FileStore(place / "kills", durable=False)
    store.prepare()
    seen = {"files": 0, "messages": 0, "leftovers": 0}

    def work(trial: int) -> None:
        for n in itertools.count():
            atomic.write_bytes(place / f"new-{trial}-{n}", version_bytes(n + 1))
            with atomic.file(place / f"file-{trial}-{n}", "wb") as f:
                f.write(version_bytes(n + 1))
            store.add(version_bytes(n + 1))
            store.add_many([version_bytes(n + 1), version_bytes(n + 2)])

    def check(trial: int) -> None:
        extra = sorted(set(os.listdir(place)) - set(SEED_TOP) - {"kills"})
        hidden = [n for n in extra if n.startswith(".")]
        hidden += [f"tmp/{n}" for n in os.listdir(place / "kills" / "tmp")]
        for name in extra:
            if not name.startswith("."):
                version_of((place / name).read_bytes())  # complete, or it raises
                (place / name).unlink()
                seen["files"] += 1
        for path in store.list("new"):
            version_of(Path(path).read_bytes())
            os.unlink(path)
            seen["messages"] += 1
        if fs.kind.tmpfile:
            assert hidden == [], f"trial {trial}: {hidden}"
        else:
            seen["leftovers"] += len(atomic.clean(place, older_than=0))
            seen["leftovers"] += len(store.clean(older_than=0))

    report = kill_trials(work, check, trials=KILL_TRIALS, seed=11, max_delay=0.03)
    print(f"{fs.kind.name}: {report.killed} killed, {seen}")
    shutil.rmtree(place / "kills")
    assert_untouched_seed(place)
    assert report.killed == KILL_TRIALS
    assert seen["files"] > 0
    assert seen["messages"] > 0


# -- the FUSE passthrough itself, and remounts ------------------------------


@pytest.mark.parametrize("mode", ["honour", "einval", "enosys", "drop"])
def test_fuse_passthrough_modes(namespace: bool, scratch: Path, tmp_path: Path, mode: str) -> None:
    """Each mode does to renameat2 what it says: the other tests rest on it."""
    need_fuse()
    log = tmp_path / "renames.log"
    with mounts.fuse_passthrough(mode, scratch / f"modes-{mode}", tmp_path / "mnt", log) as mnt:
        a, b, c = mnt / "a", mnt / "b", mnt / "c"
        a.write_text("A")
        b.write_text("B")

        def outcome(src: Path, dst: Path, flags: int) -> str:
            try:
                renameat2(str(src), str(dst), flags)
            except OSError as e:
                return errno.errorcode[e.errno or 0]
            return "ok"

        # Onto an existing name the VFS refuses RENAME_NOREPLACE itself: the
        # filesystem never sees it, whatever its mode.
        assert outcome(a, b, RENAME_NOREPLACE) == "EEXIST"
        moved = outcome(a, c, RENAME_NOREPLACE)
        exchanged = outcome(b, c if c.exists() else a, RENAME_EXCHANGE)
        results = [moved, exchanged]
        contents = {p.name: p.read_text() for p in (a, b, c) if p.exists()}
        seen = log.read_text().split("\n")[:-1] if log.exists() else []
    if mode == "honour":
        assert results == ["ok", "ok"]
        assert contents == {"b": "A", "c": "B"}
        assert seen == ["1 0", "2 0"]
    elif mode == "drop":
        # "Exchanged" b and c: a plain rename of b over c.
        assert results == ["ok", "ok"]
        assert contents == {"c": "B"}
        assert seen == ["1 0", "2 0"]
    elif mode == "einval":
        assert results == ["EINVAL", "EINVAL"]
        assert contents == {"a": "A", "b": "B"}
        assert seen == [f"1 {errno.EINVAL}", f"2 {errno.EINVAL}"]
    else:
        # ENOSYS reaches the caller as EINVAL, and the kernel stops asking.
        assert results == ["EINVAL", "EINVAL"]
        assert contents == {"a": "A", "b": "B"}
        assert seen == [f"1 {errno.ENOSYS}"]


def test_a_new_mount_on_a_reused_device_number_is_probed_afresh(
    namespace: bool, scratch: Path, tmp_path: Path, fresh_probe: None
) -> None:
    """A filesystem must not inherit the capabilities of an unmounted one.

    The kernel gives the lowest free device number to the next mount, so a
    flag-dropping FUSE mounted after a flag-honouring one was unmounted gets
    its st_dev, unless a lower number is free: the mounts that take those
    stay until one gets it.
    """
    need_fuse()
    with mounts.fuse_passthrough("honour", scratch / "first", tmp_path / "first") as first:
        device = os.stat(first).st_dev
        assert atomic.capabilities(first / "x") == NATIVE
    with contextlib.ExitStack() as stack:
        for attempt in range(8):
            mnt = stack.enter_context(
                mounts.fuse_passthrough(
                    "drop", scratch / f"next{attempt}", tmp_path / f"next{attempt}"
                )
            )
            if os.stat(mnt).st_dev == device:
                break
        else:
            pytest.fail(f"no mount got device number {device} back")
        a, b = mnt / "a", mnt / "b"
        a.write_text("A")
        b.write_text("B")
        caps = atomic.capabilities(a)
        try:
            atomic.swap(a, b)
        except OSError as e:
            refused: int | None = e.errno
        else:
            refused = None
        contents = {p.name: p.read_text() for p in (a, b) if p.exists()}
    assert (caps, refused, contents) == (DROPPED, errno.EOPNOTSUPP, {"a": "A", "b": "B"})


def test_a_signal_storm_leaves_nothing(fs: Mount, place: Path) -> None:
    # KeyboardInterrupt (as SIGINT raises it, and a handler of SIGTERM that
    # raises) at random moments of writes, replaces, adds and batches: on
    # every filesystem, the unnamed and the named way alike, nothing is left
    # and whatever carries a name is complete.
    from test_interrupts import storm

    store = FileStore(place / "spool", durable=False)
    store.prepare()
    payload = os.urandom(2048)

    def operation(i: int) -> None:
        step = i % 4
        if step == 0:
            atomic.write_bytes(place / f"new-{i}", payload, durable=False)
        elif step == 1:
            with atomic.file(place / "same", "wb", overwrite=True, durable=False) as f:
                f.write(payload)
        elif step == 2:
            store.add(payload)
        else:
            store.add_many([payload, payload])

    # Interrupts spread over an operation's whole length on this mount.
    started = time.perf_counter()
    for i in range(8):
        operation(10_000 + i)  # names of their own
    longest = 1.5 * (time.perf_counter() - started) / 8
    interrupted = storm(operation, 600, longest)
    print(f"{fs.kind.name}: {interrupted} of 600 interrupted")
    assert interrupted > 60
    left = [n for n in os.listdir(place) if n.startswith(".")]
    left += [e for e in store_entries(store) if "/." in e or e.startswith("tmp/")]
    assert left == []
    for name in os.listdir(place):
        if name.startswith(("new-", "same")):
            assert (place / name).read_bytes() == payload
    for entry in store_entries(store):
        assert Path(store.path, entry).read_bytes() == payload
    shutil.rmtree(place / "spool")
    for name in os.listdir(place):
        if name.startswith(("new-", "same")):
            os.unlink(place / name)
    assert_untouched_seed(place)
