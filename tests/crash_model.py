"""What a crash of the machine may leave on disk, replayed from recorded calls.

An operation runs with a tracer on atomstore's OS boundary.  The calls it made
are replayed on a small in-memory model of the directory it worked in, built
from a snapshot taken before.  At every crash point (after each call) the
model lists every on-disk state the persistence model of
``test_crash_states.py`` allows: each subset of the directory entry changes
not yet made durable by an fsync of their directory, times the outcomes of
the file data not yet fsynced (kept, lost, cut short, zero-filled).

The model covers what atomstore does: files created, appended to, fsynced;
names created, renamed (plain, no-clobber, exchange), linked, unlinked;
directories created and removed.  Modes and owners are not modelled.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from atomstore import Claim, FileStore, _rename, _syscalls
from atomstore._rename import Capabilities
from atomstore._renameat2 import RENAME_EXCHANGE
from tracing import Call, Recorder, named_staging

State = dict[str, Optional[bytes]]
"""A directory's contents: relative path -> file bytes, None for a directory."""
StateKey = tuple[tuple[str, Optional[bytes]], ...]

# Unsynced data up to this size is cut at every byte; longer data at a few
# places (the first and last byte, the middle, page boundaries).
EVERY_BYTE = 16
_PAGE = 4096
# Bounds that keep an exploration exhaustive and fast: a workload that needs
# more is too big for this explorer and must be split.
MAX_PENDING_PER_NAME = 12
MAX_LAYOUTS = 1 << 14
MAX_STATES_PER_POINT = 1 << 16


_TMPFILE = getattr(os, "O_TMPFILE", 0)


_METADATA = frozenset({"fchmod", "fchown", "chmod", "fsetxattr", "fremovexattr", "set_inode_flags"})


class ModelError(Exception):
    """The recorded calls do something the model does not cover."""


# -- recording --------------------------------------------------------------

DropFsync = Callable[[str, bool], bool]
"""Decides, from the path and whether it is a directory, to skip an fsync."""


class Recording:
    """A tracer that records through :class:`tracing.Recorder`.

    It keeps a copy of the bytes each write passed: a BufferedWriter hands
    over a view of its own buffer, which it reuses and frees afterwards.
    With ``drop`` it also builds a broken library: the chosen fsync calls are
    not made and not recorded, as if the code did not have them.
    """

    def __init__(self, drop: DropFsync | None = None) -> None:
        self.recorder = Recorder()
        self.drop = drop
        self.dropped: list[str] = []

    def __call__(self, name: str, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if name == "write":
            args = (args[0], bytes(args[1]))
        elif name == "fsync" and self.drop is not None:
            fd = args[0]
            path = self.recorder.fds.get(fd, "?")
            if self.drop(path, stat.S_ISDIR(os.fstat(fd).st_mode)):
                self.dropped.append(path)
                return None
        return self.recorder(name, func, *args, **kwargs)

    @property
    def calls(self) -> list[Call]:
        return self.recorder.calls


@contextlib.contextmanager
def recording(drop: DropFsync | None = None) -> Iterator[Recording]:
    """Install a :class:`Recording` on the OS boundary for the block."""
    tracer = Recording(drop)
    previous = _syscalls.set_tracer(tracer)
    try:
        yield tracer
    finally:
        _syscalls.set_tracer(previous)


class _SteadyMounts(_rename._MountWatch):
    """A mount watch that sees no change.

    The library forgets every probed answer when the mount table changes;
    a mount anywhere in the namespace (another test mounting a loop device)
    would make it forget a pretended answer in the middle of a workload.
    """

    def changed(self) -> bool:
        return False


@contextlib.contextmanager
def pretend(directory: Path, caps: Capabilities | None) -> Iterator[None]:
    """Make the filesystem of ``directory`` report ``caps`` (None: as probed).

    A filesystem pretending to lack renameat2 flags lacks O_TMPFILE too, as
    NFS and FUSE do: writes stage under names there.
    """
    saved, watch = dict(_rename._cache), _rename._mounts
    _rename._mounts = _SteadyMounts()
    try:
        with contextlib.ExitStack() as stack:
            if caps is not None:
                _rename._cache[os.stat(directory).st_dev] = caps
                stack.enter_context(named_staging())
            else:
                # Probe now, so that the probe's own calls stay out of a recording.
                _rename.capabilities(str(directory))
            yield
    finally:
        _rename._mounts = watch
        _rename._cache.clear()
        _rename._cache.update(saved)


# -- real directories ---------------------------------------------------------


def scan(root: Path) -> State:
    """The contents of the directory ``root``."""
    state: State = {}
    for directory, dirs, files in os.walk(root):
        rel = os.path.relpath(directory, root)
        prefix = "" if rel == "." else rel + "/"
        for name in dirs:
            if os.path.islink(os.path.join(directory, name)):
                raise ModelError(f"symlinks are not modelled: {prefix}{name}")
            state[prefix + name] = None
        for name in files:
            path = os.path.join(directory, name)
            if os.path.islink(path):
                raise ModelError(f"symlinks are not modelled: {prefix}{name}")
            with open(path, "rb") as f:
                state[prefix + name] = f.read()
    return state


def materialise(state: State, where: Path) -> None:
    """Make ``where`` hold exactly ``state``."""
    if where.exists():
        shutil.rmtree(where)
    where.mkdir()
    for path, content in sorted(state.items()):  # a parent sorts before its children
        if content is None:
            (where / path).mkdir()
        else:
            (where / path).write_bytes(content)


def key(state: State) -> StateKey:
    return tuple(sorted(state.items()))


# -- the model ----------------------------------------------------------------


@dataclass
class _Inode:
    is_dir: bool
    data: bytearray = field(default_factory=bytearray)
    synced: bytes = b""
    entries: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class _Change:
    """Entry changes of one directory that become durable together."""

    seq: int
    directory: int
    edits: tuple[tuple[str, int | None], ...]  # name -> inode, None: removed
    requires: int | None = None  # a change that reaches the disk first (its index)


_Data = dict[int, tuple[bytes, bytes]]  # inode -> (data, fsynced data)


class Replay:
    """The calls of one operation, replayed on a model of ``root``."""

    def __init__(self, root: Path, before: State) -> None:
        self.root = str(root)
        self.inodes: list[_Inode] = [_Inode(True)]
        for path, content in sorted(before.items()):
            parent, name = self._locate(path, None)
            ino = self._new(content is None)
            if content is not None:
                self.inodes[ino].data += content
                self.inodes[ino].synced = content
            self.inodes[parent].entries[name] = ino
        self.initial = {i: dict(n.entries) for i, n in enumerate(self.inodes) if n.is_dir}
        self.changes: list[_Change] = []
        self.syncs: dict[int, list[int]] = {}
        self.fds: dict[int, list[int]] = {}  # fd -> [inode, offset]
        self.data: list[_Data] = [self._data()]  # data at each crash point
        self.calls: list[Call] = []

    def _new(self, is_dir: bool) -> int:
        self.inodes.append(_Inode(is_dir))
        return len(self.inodes) - 1

    def _data(self) -> _Data:
        return {i: (bytes(n.data), n.synced) for i, n in enumerate(self.inodes) if not n.is_dir}

    def _parts(self, path: str, dir_fd: int | None) -> tuple[int, list[str]]:
        if dir_fd is not None:
            base, rel = self.fds[dir_fd][0], path
        else:
            rel = os.path.relpath(os.path.join(self.root, path), self.root)
            if rel == ".." or rel.startswith("../"):
                raise ModelError(f"{path!r} is outside the modelled directory {self.root}")
            base = 0
        return base, [p for p in rel.split("/") if p not in ("", ".")]

    def _walk(self, base: int, parts: list[str]) -> int:
        for part in parts:
            base = self.inodes[base].entries[part]
        return base

    def _locate(self, path: str, dir_fd: int | None) -> tuple[int, str]:
        """The directory inode holding ``path``, and its name there."""
        base, parts = self._parts(path, dir_fd)
        if not parts:
            raise ModelError(f"{path!r} has no parent in the model")
        return self._walk(base, parts[:-1]), parts[-1]

    def _lookup(self, path: str, dir_fd: int | None) -> int | None:
        base, parts = self._parts(path, dir_fd)
        try:
            return self._walk(base, parts)
        except KeyError:
            return None

    def _change(
        self,
        seq: int,
        directory: int,
        *edits: tuple[str, int | None],
        requires: int | None = None,
    ) -> int:
        entries = self.inodes[directory].entries
        for name, ino in edits:
            if ino is None:
                del entries[name]
            else:
                entries[name] = ino
        self.changes.append(_Change(seq, directory, edits, requires))
        return len(self.changes) - 1

    def replay(self, calls: Sequence[Call]) -> None:
        for seq, call in enumerate(calls):
            self.calls.append(call)
            if call.error is None:  # a call that failed changed nothing
                self._apply(seq, call)
            self.data.append(
                self._data() if call.name in ("open", "write", "fsync") else self.data[-1]
            )

    def _apply(self, seq: int, call: Call) -> None:
        name, args, kwargs = call.name, call.args, call.kwargs
        if name == "open":
            self._open(seq, args[0], args[1], kwargs.get("dir_fd"), call.result)
        elif name == "write":
            slot = self.fds[args[0]]
            written = bytes(args[1][: call.result])
            node = self.inodes[slot[0]]
            node.data[slot[1] : slot[1] + len(written)] = written
            slot[1] += len(written)
        elif name == "fsync":
            ino = self.fds[args[0]][0]
            node = self.inodes[ino]
            if node.is_dir:
                self.syncs.setdefault(ino, []).append(seq)
            else:
                node.synced = bytes(node.data)
        elif name == "close":
            self.fds.pop(args[0], None)
        elif name in ("rename", "renameat2"):
            flags = args[2] if name == "renameat2" else 0
            self._rename(seq, args[0], args[1], bool(flags & RENAME_EXCHANGE))
        elif name == "link":
            linked = self._lookup(args[0], None)
            if linked is None:
                raise ModelError(f"link of {args[0]!r}, missing in the model, succeeded")
            parent, new = self._locate(args[1], None)
            self._change(seq, parent, (new, linked))
        elif name == "link_fd":
            parent, new = self._locate(args[1], None)
            self._change(seq, parent, (new, self.fds[args[0]][0]))
        elif name in ("unlink", "rmdir"):
            parent, old = self._locate(args[0], kwargs.get("dir_fd"))
            self._change(seq, parent, (old, None))
        elif name == "mkdir":
            parent, new = self._locate(args[0], None)
            self._change(seq, parent, (new, self._new(True)))
        elif name not in _METADATA:  # modes, owners, attributes, flags: not modelled
            raise ModelError(f"no model for {name}{args}")

    def _open(self, seq: int, path: str, flags: int, dir_fd: int | None, fd: int) -> None:
        if _TMPFILE and flags & _TMPFILE == _TMPFILE:
            # An unnamed file in the directory ``path``: no entry until a
            # link_fd names it.
            self.fds[fd] = [self._new(False), 0]
            return
        ino = self._lookup(path, dir_fd)
        if ino is None:
            if not flags & os.O_CREAT:
                raise ModelError(f"open of {path!r}, missing in the model, succeeded")
            parent, name = self._locate(path, dir_fd)
            ino = self._new(False)
            self._change(seq, parent, (name, ino))
        if flags & os.O_TRUNC:
            del self.inodes[ino].data[:]
        self.fds[fd] = [ino, len(self.inodes[ino].data) if flags & os.O_APPEND else 0]

    def _rename(self, seq: int, src: str, dst: str, exchange: bool) -> None:
        src_dir, src_name = self._locate(src, None)
        dst_dir, dst_name = self._locate(dst, None)
        moved = self.inodes[src_dir].entries[src_name]
        other = self.inodes[dst_dir].entries.get(dst_name) if exchange else None
        if src_dir == dst_dir:
            if src_name != dst_name:
                # One directory: the rename is atomic, old name and new together.
                self._change(seq, src_dir, (src_name, other), (dst_name, moved))
            return
        # Two directories: each entry is durable with its own directory's
        # fsync, but the old name never goes without the new one: a rename
        # may leave both names after a crash, never neither.
        added = self._change(seq, dst_dir, (dst_name, moved))
        self._change(seq, src_dir, (src_name, other), requires=added)

    def live(self) -> State:
        """What the model says the directory holds now."""
        data = self.data[-1]
        layout = _layout(lambda d: self.inodes[d].entries, self.inodes)
        return {path: None if self.inodes[i].is_dir else data[i][0] for path, i in layout}

    def states(self, point: int) -> Iterator[State]:
        """Every state a crash after ``point`` calls may leave, without repeats."""
        durable, pending, forced = self._split(point)
        base = {d: dict(entries) for d, entries in self.initial.items()}
        for ino, node in enumerate(self.inodes):
            if node.is_dir and ino not in base:
                base[ino] = {}
        for index in durable:
            _edit(base[self.changes[index].directory], self.changes[index].edits)
        layouts: set[tuple[tuple[str, int], ...]] = set()
        for choice in itertools.product(*_groups(base, self.changes, pending, forced)):
            entries = {d: dict(e) for d, e in base.items()}
            for group in choice:
                for (directory, name), value in group:
                    _edit(entries[directory], ((name, value),))
            layouts.add(tuple(_layout(entries.__getitem__, self.inodes)))
            if len(layouts) > MAX_LAYOUTS:
                raise ModelError(f"more than {MAX_LAYOUTS} layouts after call {point}")
        data = self.data[point]
        seen: set[StateKey] = set()
        for layout in sorted(layouts):
            files = sorted({i for _, i in layout if not self.inodes[i].is_dir})
            choices = [_outcomes(*data[i]) for i in files]
            if _product_size(choices) > MAX_STATES_PER_POINT:
                raise ModelError(f"too many data outcomes after call {point}")
            for contents in itertools.product(*choices):
                chosen = dict(zip(files, contents))
                state: State = {p: None if self.inodes[i].is_dir else chosen[i] for p, i in layout}
                k = key(state)
                if k not in seen:
                    seen.add(k)
                    yield state

    def _split(self, point: int) -> tuple[list[int], list[int], set[int]]:
        """The changes made before ``point``, by index: durable, may be lost,
        and of these the ones that must have reached the disk, being required
        by a durable change."""
        made = [c for c in self.changes if c.seq < point]
        durable = [any(c.seq < s < point for s in self.syncs.get(c.directory, ())) for c in made]
        forced = {c.requires for c, done in zip(made, durable) if done and c.requires is not None}
        indexes = range(len(made))
        pending = [i for i in indexes if not durable[i]]
        return [i for i in indexes if durable[i]], pending, forced & set(pending)


_Assignment = tuple[tuple[tuple[int, str], Optional[int]], ...]


def _edit(entries: dict[str, int], edits: Iterable[tuple[str, int | None]]) -> None:
    for name, ino in edits:
        if ino is None:
            entries.pop(name, None)
        else:
            entries[name] = ino


def _groups(
    base: dict[int, dict[str, int]], changes: list[_Change], pending: list[int], forced: set[int]
) -> list[set[_Assignment]]:
    """For each group of pending changes touching the same names, its outcomes.

    Changes to different names are independent, so each group's subsets are
    enumerated alone and the groups combined: a subset applied in program
    order is one order in which the changes may have reached the disk.  A
    change and the one it requires are in one group; ``forced`` changes are
    in every subset.
    """
    waiting = set(pending)
    owner: dict[tuple[int, str], int] = {}
    members: list[list[int]] = []
    for index in pending:
        change = changes[index]
        names = [(change.directory, name) for name, _ in change.edits]
        if change.requires in waiting:
            required = changes[change.requires]
            names += [(required.directory, name) for name, _ in required.edits]
        joined = sorted({owner[n] for n in names if n in owner})
        target = joined[0] if joined else len(members)
        if not joined:
            members.append([])
        for other in joined[1:]:
            members[target] += members[other]
            members[other] = []
            for n, g in owner.items():
                if g == other:
                    owner[n] = target
        members[target].append(index)
        for n in names:
            owner[n] = target
    groups = []
    for group in members:
        if not group:
            continue
        if len(group) > MAX_PENDING_PER_NAME:
            raise ModelError(f"{len(group)} pending changes on the same names")
        group.sort()
        names = sorted({(changes[i].directory, n) for i in group for n, _ in changes[i].edits})
        outcomes: set[_Assignment] = set()
        for mask in range(1 << len(group)):
            chosen = {i for bit, i in enumerate(group) if mask >> bit & 1}
            if any(changes[i].requires in waiting - chosen for i in chosen):
                continue
            if not forced & set(group) <= chosen:
                continue
            values = {n: base[n[0]].get(n[1]) for n in names}
            for i in sorted(chosen):
                for name, ino in changes[i].edits:
                    values[(changes[i].directory, name)] = ino
            outcomes.add(tuple(sorted(values.items())))
        groups.append(outcomes)
    return groups


def _layout(
    entries: Callable[[int], dict[str, int]], inodes: list[_Inode]
) -> list[tuple[str, int]]:
    """The (path, inode) pairs reachable from the root."""
    found: list[tuple[str, int]] = []
    stack: list[tuple[int, str, frozenset[int]]] = [(0, "", frozenset({0}))]
    while stack:
        directory, prefix, above = stack.pop()
        for name, ino in sorted(entries(directory).items()):
            found.append((prefix + name, ino))
            if inodes[ino].is_dir and ino not in above:
                stack.append((ino, f"{prefix}{name}/", above | {ino}))
    found.sort()
    return found


def _outcomes(data: bytes, synced: bytes) -> list[bytes]:
    """What a crash may leave of a file holding ``data``, of which ``synced`` was fsynced."""
    if data == synced:
        return [data]
    if not data.startswith(synced):
        raise ModelError("only appends to a file are modelled")
    start, end = len(synced), len(data)
    if end - start <= EVERY_BYTE:
        cuts = set(range(start, end))
    else:
        pages = range(-(-start // _PAGE) * _PAGE, end, _PAGE)
        cuts = {start, start + 1, (start + end) // 2, end - 1, *itertools.islice(pages, 4)}
    found = {data}
    for n in cuts:
        found.add(data[:n])  # lost (n == start) or cut short
        found.add(data[:n] + bytes(end - n))  # the size reached the disk, the data did not
    return sorted(found)


def _product_size(choices: list[list[bytes]]) -> int:
    size = 1
    for c in choices:
        size *= len(c)
    return size


# -- workloads ----------------------------------------------------------------


@dataclass
class Context:
    """What the steps of one run share."""

    root: Path
    store_options: dict[str, Any] = field(default_factory=dict)
    claims: dict[str, Claim] = field(default_factory=dict)
    _store: FileStore | None = None

    @property
    def store(self) -> FileStore:
        """The workload's store, at ``root/store``."""
        if self._store is None:
            self._store = FileStore(self.root / "store", **self.store_options)
        return self._store


@dataclass(frozen=True)
class Step:
    """One operation of a workload.

    :ivar kind: what the checks make of it (``"write"``, ``"add"``,
        ``"claim"``, ``"finish"``, ``"release"``, ...).
    :ivar payload: what it writes: file bytes, or a tree (a :data:`State`).
    :ivar ref: the label of the claim it acts on.
    """

    label: str
    action: Callable[[Context], object]
    kind: str
    payload: Any = None
    ref: str = ""


@dataclass(frozen=True)
class Crash:
    """One state a crash may leave, with what had happened before it."""

    workload: Workload
    point: int  # calls made before the crash
    initial: State  # the directory before the workload
    state: State  # what the disk holds
    cleaned: State  # the same after the workload's clean-up ran on it
    done: int  # steps that had returned
    started: bool  # whether step ``done`` had made a call
    results: tuple[Any, ...]  # what the returned steps returned, in order

    @property
    def in_flight(self) -> Step | None:
        return self.workload.steps[self.done] if self.started else None


Check = Callable[[Crash], Iterable[str]]


@dataclass(frozen=True)
class Workload:
    """Operations whose crash states are explored, and what must hold in each.

    :ivar setup: fills the directory before the recording starts.
    :ivar clean: the clean-up a crashed directory gets (its result unused).
    :ivar caps: the capabilities the filesystem pretends to have.
    :ivar store_options: keyword arguments of the steps' FileStore.
    """

    name: str
    setup: Callable[[Path], None]
    steps: tuple[Step, ...]
    checks: tuple[Check, ...]
    clean: Callable[[Path], object]
    caps: Capabilities | None = None
    store_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Exploration:
    """What exploring one workload found."""

    workload: str
    calls: int
    crash_points: int
    states: int  # distinct on-disk states
    checked: int  # (crash point, state) pairs checked
    violations: list[str]
    dropped_fsyncs: list[str]


def explore(
    workload: Workload,
    scratch: Path,
    drop: DropFsync | None = None,
    *,
    until_violation: bool = False,
) -> Exploration:
    """Run ``workload`` in ``scratch`` and check every crash state it may leave.

    :param drop: fsync calls to leave out, for a broken variant of the library.
    :param until_violation: stop at the first violation found.
    """
    root = scratch / "root"
    root.mkdir()
    workload.setup(root)
    with pretend(root, workload.caps), _rebuild_area(scratch) as crashed:
        initial = scan(root)
        ctx = Context(root, dict(workload.store_options))
        ends: list[int] = []
        results: list[Any] = []
        with recording(drop) as tracer:
            for step in workload.steps:
                results.append(step.action(ctx))
                ends.append(len(tracer.calls))
        replay = Replay(root, initial)
        replay.replay(tracer.calls)
        real = scan(root)
        if replay.live() != real:
            raise ModelError(f"the model diverged from the disk: {replay.live()} != {real}")
        cleaned: dict[StateKey, State] = {}
        violations: list[str] = []
        checked = 0
        for point in range(len(tracer.calls) + 1):
            done = sum(1 for end in ends if end <= point)
            started = done < len(ends) and point > (ends[done - 1] if done else 0)
            returned = tuple(results[:done])
            for state in replay.states(point):
                k = key(state)
                if k not in cleaned:
                    materialise(state, crashed)
                    workload.clean(crashed)
                    cleaned[k] = scan(crashed)
                crash = Crash(workload, point, initial, state, cleaned[k], done, started, returned)
                checked += 1
                for problem in _run_checks(workload.checks, crash):
                    violations.append(f"crash after {_describe(replay.calls, point)}: {problem}")
                if violations and until_violation:
                    break
            if violations and until_violation:
                break
    return Exploration(
        workload.name,
        len(tracer.calls),
        len(tracer.calls) + 1,
        len(cleaned),
        checked,
        violations,
        tracer.dropped,
    )


@contextlib.contextmanager
def _rebuild_area(scratch: Path) -> Iterator[Path]:
    """Where crash states are rebuilt and cleaned up: tmpfs where there is one.

    Thousands of states are written and removed; on a disk filesystem that
    costs journal commits, on tmpfs nothing.
    """
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else scratch
    where = Path(tempfile.mkdtemp(prefix="crash-states-", dir=base))
    try:
        yield where / "crashed"
    finally:
        shutil.rmtree(where)


def _run_checks(checks: Sequence[Check], crash: Crash) -> Iterator[str]:
    for check in checks:
        yield from check(crash)


def _describe(calls: Sequence[Call], point: int) -> str:
    if point == 0:
        return "no call"
    call = calls[point - 1]
    shown = [os.path.basename(a) if isinstance(a, str) else a for a in call.args[:2]]
    if call.name in ("open", "mkdir", "chmod", "unlink", "rmdir"):
        shown = shown[:1]
    elif call.name == "write":
        shown = [call.target and os.path.basename(call.target), f"{call.result} bytes"]
    elif call.target:
        shown = [os.path.basename(call.target)]
    return f"call {point} {call.name}({', '.join(map(str, shown))})"
