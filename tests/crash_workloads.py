"""The operations whose crash states are explored, and what must hold in each.

A workload is a setup, a few steps and the checks of every crash state; the
steps and checks are built by the functions below, so that a new workload
is a few lines in :data:`WORKLOADS`.  The directory of a run holds the
destination ``f`` or ``site``, a neighbour file the operations must never
touch, or a store at ``store/``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Callable, Union

from atomstore import Area, FileStore, _names, _shrink, _syscalls, atomic
from atomstore._info import split_info
from atomstore._rename import Capabilities
from crash_model import Check, Context, Crash, State, Step, Workload

View = Union[bytes, State, None]
"""A path in a crash state: file bytes, a directory's tree, or None: absent."""
Setup = Callable[[Path], None]

NEIGHBOUR = "neighbour"
_NEIGHBOUR_DATA = b"not ours"
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC

NO_RENAME_FLAGS = Capabilities(noreplace=False, exchange=False, hardlinks=True)
NOTHING = Capabilities(noreplace=False, exchange=False, hardlinks=False)
NO_EXCHANGE = Capabilities(noreplace=True, exchange=False, hardlinks=True)
# Every renameat2 flag, but no O_TMPFILE: writes stage under hidden names.
NAMED_ONLY = Capabilities(noreplace=True, exchange=True, hardlinks=True)


# -- setups --------------------------------------------------------------------


def files(**contents: bytes) -> Setup:
    """A setup that writes these files, and the neighbour."""

    def setup(root: Path) -> None:
        (root / NEIGHBOUR).write_bytes(_NEIGHBOUR_DATA)
        for name, data in contents.items():
            (root / name).write_bytes(data)

    return setup


def tree(dest: str, contents: State) -> Setup:
    """A setup that writes the tree ``contents`` at ``dest``, and the neighbour."""

    def setup(root: Path) -> None:
        (root / NEIGHBOUR).write_bytes(_NEIGHBOUR_DATA)
        (root / dest).mkdir()
        put_tree(root / dest, contents, through_boundary=False)

    return setup


def store(*messages: bytes, claimed: int = 0, other: dict[str, bytes] | None = None) -> Setup:
    """A setup that prepares ``store/``, adds ``messages`` and writes files.

    ``claimed``: how many of the messages a consumer, gone since, claimed.
    ``other``: files by their path in the store, ``{"cur/a": b"x"}``.
    """

    def setup(root: Path) -> None:
        s = FileStore(root / "store")
        s.prepare()
        for data in messages:
            s.add(data)
        for _ in range(claimed):
            s.claim()
        for path, data in (other or {}).items():
            (root / "store" / path).write_bytes(data)

    return setup


def put_tree(where: Path, contents: State, *, through_boundary: bool = True) -> None:
    """Write the tree ``contents`` below ``where``.

    Through the OS boundary, so that the model sees the files being written
    as the user's code would write them: unsynced until the library syncs.
    """
    for path, data in sorted(contents.items()):
        target = str(where / path)
        if not through_boundary:
            if data is None:
                os.mkdir(target)
            else:
                Path(target).write_bytes(data)
        elif data is None:
            _syscalls.mkdir(target, 0o777)
        else:
            fd = _syscalls.open(target, _CREATE, 0o666)
            try:
                view = memoryview(data)
                while view:
                    view = view[_syscalls.write(fd, view) :]
            finally:
                _syscalls.close(fd)


def clean_directory(root: Path) -> object:
    return atomic.clean(root, older_than=0)


def clean_store(root: Path) -> object:
    return FileStore(root / "store", durable=False).clean(older_than=0)


def clean_store_later(root: Path) -> object:
    """clean_store() once the grace period of a swap of new/ is over (the
    crash states are made now: their times are all fresh)."""
    grace, _shrink.GRACE = _shrink.GRACE, 0.0
    try:
        return clean_store(root)
    finally:
        _shrink.GRACE = grace


# -- steps ---------------------------------------------------------------------


def write_bytes(dest: str, data: bytes, *, overwrite: bool = False) -> Step:
    def action(ctx: Context) -> None:
        atomic.write_bytes(ctx.root / dest, data, overwrite=overwrite)

    return Step(f"write_bytes({dest})", action, "write", data)


def file_chunks(
    dest: str, chunks: Sequence[bytes], *, overwrite: bool = False, close_inside: bool = False
) -> Step:
    """atomic.file() unbuffered: each chunk is one write(2)."""

    def action(ctx: Context) -> None:
        with atomic.file(ctx.root / dest, "wb", overwrite=overwrite, buffering=0) as f:
            for chunk in chunks:
                f.write(chunk)
            if close_inside:
                f.close()

    return Step(f"file({dest})", action, "write", b"".join(chunks))


def text_file(dest: str, text: str, *, overwrite: bool = False) -> Step:
    """atomic.file() in text mode, buffered: one write(2) at the flush."""

    def action(ctx: Context) -> None:
        with atomic.file(ctx.root / dest, "w", overwrite=overwrite, encoding="utf-8") as f:
            f.write(text)

    return Step(f"file({dest}, 'w')", action, "write", text.encode())


def folder(dest: str, contents: State, *, overwrite: bool = False) -> Step:
    def action(ctx: Context) -> None:
        with atomic.folder(ctx.root / dest, overwrite=overwrite) as staging:
            put_tree(staging, contents)

    return Step(f"folder({dest})", action, "write", contents)


def rename(src: str, dst: str) -> Step:
    def action(ctx: Context) -> None:
        atomic.rename(ctx.root / src, ctx.root / dst)

    return Step(f"rename({src}, {dst})", action, "rename")


def swap(a: str, b: str) -> Step:
    def action(ctx: Context) -> None:
        atomic.swap(ctx.root / a, ctx.root / b)

    return Step(f"swap({a}, {b})", action, "swap")


def add(data: bytes) -> Step:
    return Step("add", lambda ctx: ctx.store.add(data), "add", (data,))


def add_many(*data: bytes) -> Step:
    """FileStore.add_many(): the step returns the names, in order."""
    return Step("add_many", lambda ctx: ctx.store.add_many(data), "add", data)


def claim(label: str) -> Step:
    """Claim the oldest message; the step returns (message name, claim file name)."""

    def action(ctx: Context) -> tuple[str, str]:
        got = ctx.store.claim()
        assert got is not None, "the workload claims from an empty store"
        ctx.claims[label] = got
        return got.name, os.path.basename(got.path)

    return Step(label, action, "claim")


def shrink() -> Step:
    """The swap of new/ for a fresh directory, with messages still in the old
    one (they raced in after a consumer found it empty)."""

    def action(ctx: Context) -> bool:
        store = ctx.store
        return _shrink.shrink(store.path, os.path.join(store.path, "new"), store.durable)

    return Step("shrink", action, "shrink")


def finish(ref: str) -> Step:
    return Step(f"finish({ref})", lambda ctx: ctx.claims[ref].finish(), "finish", ref=ref)


def release(ref: str) -> Step:
    return Step(f"release({ref})", lambda ctx: ctx.claims[ref].release(), "release", ref=ref)


def recover() -> Step:
    """FileStore.recover(0): every claim goes back; returns the new paths."""
    return Step("recover", lambda ctx: ctx.store.recover(older_than=0), "recover")


def store_clean() -> Step:
    return Step("clean", lambda ctx: ctx.store.clean(older_than=0), "clean")


def prepare() -> Step:
    return Step("prepare", lambda ctx: ctx.store.prepare(), "prepare")


def remove(name: str, area: Area) -> Step:
    return Step(f"remove({name}, {area})", lambda ctx: ctx.store.remove(name, area), "remove")


def create(name: str, data: bytes) -> Step:
    """FileStore.create() in tmp/: a file written by hand, not yet published."""

    def action(ctx: Context) -> None:
        with ctx.store.create(name, "wb") as f:
            f.write(data)

    return Step(f"create({name})", action, "create", data)


def move(name: str, src: Area, dst: Area, data: bytes) -> Step:
    """FileStore.move(): for the checks, a write of ``data`` at the destination."""

    def action(ctx: Context) -> None:
        ctx.store.move(name, src, dst)

    return Step(f"move({name}, {src}, {dst})", action, "write", data)


def copy(name: str, src: Area, dst: Area, data: bytes) -> Step:
    def action(ctx: Context) -> None:
        ctx.store.copy(name, src, dst)

    return Step(f"copy({name}, {src}, {dst})", action, "write", data)


# -- checks --------------------------------------------------------------------


def view(state: State, path: str) -> View:
    """What ``state`` holds at ``path``."""
    if path not in state:
        return None
    data = state[path]
    if data is not None:
        return data
    prefix = path + "/"
    return {p[len(prefix) :]: d for p, d in state.items() if p.startswith(prefix)}


def show(seen: View) -> str:
    if seen is None:
        return "absent"
    if isinstance(seen, bytes):
        return repr(seen)
    return "tree " + repr(dict(sorted(seen.items())))


def old_or_new(dest: str, initial: View = None, *, missing_until_clean: bool = False) -> Check:
    """``dest`` holds the version of the last write that returned, or the next.

    The writes are the steps of kind ``"write"``; ``initial`` is what
    ``dest`` held before them.  Once a write returned, its version is the
    only one left.  ``missing_until_clean``: the documented window of the
    folder fallback, where ``dest`` is missing while the write runs and the
    clean-up puts the old tree back.
    """

    def check(crash: Crash) -> Iterator[str]:
        steps = crash.workload.steps
        versions = [initial, *(s.payload for s in steps if s.kind == "write")]
        n = sum(1 for s in steps[: crash.done] if s.kind == "write")
        allowed = [versions[n]]
        writing = crash.in_flight is not None and crash.in_flight.kind == "write"
        if writing:
            allowed.append(versions[n + 1])
        seen, after = view(crash.state, dest), view(crash.cleaned, dest)
        expected = " or ".join(show(v) for v in allowed)
        if seen not in allowed and not (missing_until_clean and writing and seen is None):
            yield f"{dest} is {show(seen)}, expected {expected}"
        if after not in allowed:
            yield f"after the clean-up {dest} is {show(after)}, expected {expected}"
        elif seen in allowed and after != seen:
            yield f"the clean-up changed {dest} from {show(seen)} to {show(after)}"

    return check


def untouched(path: str) -> Check:
    """``path`` keeps what it held before the workload, clean-up included."""

    def check(crash: Crash) -> Iterator[str]:
        before = view(crash.initial, path)
        for label, state in (("", crash.state), ("after the clean-up ", crash.cleaned)):
            if view(state, path) != before:
                yield f"{label}{path} changed to {show(view(state, path))}"

    return check


def no_leftovers(crash: Crash) -> Iterator[str]:
    """After the clean-up, no staging name is left anywhere, and tmp/ is empty."""
    for path in sorted(crash.cleaned):
        staging = any(_names.is_staging(part) for part in path.split("/"))
        if staging or path.startswith("store/tmp/"):
            yield f"the clean-up left {path}"


def stages(*states: dict[str, View], at_rest_only: bool = False) -> Check:
    """The paths hold ``states[i]`` once ``i`` steps returned, or the next one.

    ``at_rest_only``: check only between steps, for changes that are not
    atomic (a rename across directories: each directory's entry is durable
    on its own).
    """

    def check(crash: Crash) -> Iterator[str]:
        seen = {p: view(crash.state, p) for p in states[0]}
        allowed = [states[crash.done]]
        if crash.started:
            if at_rest_only:
                return
            allowed.append(states[crash.done + 1])
        if seen not in allowed:
            yield f"the paths hold {seen}, expected {' or '.join(map(str, allowed))}"

    return check


def absent_once_returned(path: str) -> Check:
    def check(crash: Crash) -> Iterator[str]:
        if crash.done == len(crash.workload.steps) and path in crash.state:
            yield f"every step returned, but {path} is still there"

    return check


_MESSAGE_AREAS = ("store/new/", "store/cur/", "store/dead/")
# An old new/ being emptied after a shrink: what it holds counts as in new/.
_SHRUNK = f"store/{_shrink.SHRINK_NAME}/"


def _as_in_new(state: State) -> State:
    return {
        f"store/new/{p[len(_SHRUNK) :]}" if p.startswith(_SHRUNK) else p: d
        for p, d in state.items()
    }


def shrink_finished(crash: Crash) -> Iterator[str]:
    """The clean-up removes an old new/ that a crash left."""
    left = f"store/{_shrink.SHRINK_NAME}"
    if left in crash.cleaned:
        yield f"the clean-up left {left}: {show(view(crash.cleaned, left))}"


def store_invariants(crash: Crash) -> Iterator[str]:
    """Where every message of ``store/`` must be, complete, in a crash state.

    A message whose add() returned is in new/ or cur/, complete; a returned
    claim is in cur/ under its claim name until finish() returns, and then
    gone; a released message is back in new/ (or in dead/).  While a step
    runs, its message may be where it was or where the step puts it.  No
    file in new/, cur/ or dead/ is ever partial or unknown.  The clean-up
    keeps them as they are.
    """
    steps = crash.workload.steps
    payload: dict[str, bytes] = {}
    where: dict[str, str | None] = {}  # message -> its file, None: finished
    for path, data in crash.initial.items():
        name = os.path.basename(path)
        if data is not None and path.startswith(_MESSAGE_AREAS) and not name.startswith("."):
            base = split_info(name)[0]
            payload[base], where[base] = data, path[len("store/") :]
    claims: dict[str, str] = {}  # claim label -> message
    for step, result in zip(steps, crash.results):
        if step.kind == "add":
            names = [result] if isinstance(result, str) else list(result)
            for name, data in zip(names, step.payload):
                payload[name], where[name] = data, f"new/{name}"
        elif step.kind == "claim":
            message, claim_file = result
            claims[step.label] = message
            where[message] = f"cur/{claim_file}"
        elif step.kind == "finish":
            where[claims[step.ref]] = None
        elif step.kind == "release":
            where[claims[step.ref]] = "/".join(result.split("/")[-2:])  # area/name
        elif step.kind == "recover":
            for path in result:
                where[split_info(os.path.basename(path))[0]] = "/".join(path.split("/")[-2:])
    running = crash.in_flight
    adding = set(running.payload) if running is not None and running.kind == "add" else set()
    state, cleaned = _as_in_new(crash.state), _as_in_new(crash.cleaned)
    found: dict[str, list[str]] = {}
    for path, data in sorted(state.items()):
        if not path.startswith(_MESSAGE_AREAS) or data is None:
            continue
        area_name = path[len("store/") :]
        name = area_name.split("/", 1)[1]
        if name.startswith("."):
            continue  # staging: the clean-up's business
        base = split_info(name)[0]
        if base in payload:
            if data != payload[base]:
                yield f"{area_name} holds {data!r}, not its message {payload[base]!r}"
            found.setdefault(base, []).append(area_name)
        elif data not in adding:
            yield f"{area_name} holds {data!r}: no complete message being added"
    for message, expected in where.items():
        seen = set(found.get(message, []))
        allowed = {expected} if expected is not None else set()
        may_vanish = False
        if running is not None and running.kind == "claim" and expected is not None:
            if expected.startswith("new/"):  # perhaps the one being claimed
                allowed |= {p for p in seen if p.startswith("cur/")}
        elif running is not None and running.kind == "recover" and expected is not None:
            if expected.startswith("cur/"):  # perhaps one being given back
                allowed |= {p for p in seen if p.startswith(("new/", "dead/"))}
        elif running is not None and running.ref and claims.get(running.ref) == message:
            may_vanish = running.kind == "finish"
            if running.kind == "release":
                allowed |= {p for p in seen if p.startswith(("new/", "dead/"))}
        if not seen <= allowed:
            yield f"message {message} is at {sorted(seen)}, expected {sorted(allowed)}"
        elif allowed and not seen and not may_vanish:
            yield f"message {message} is lost: expected at {sorted(allowed)}"
    for area in _MESSAGE_AREAS:
        kept = {p: d for p, d in state.items() if p.startswith(area) and p[len(area)] != "."}
        now = {p: d for p, d in cleaned.items() if p.startswith(area)}
        if kept != now:
            yield f"the clean-up changed {area}: {sorted(kept)} -> {sorted(now)}"


# -- the workloads -------------------------------------------------------------

STALE = ".m.atomstore-0123456789ab.tmp"  # a temporary file a crash left
OLD = b"old version"
NEW = b"the new one"
TREE_V1: State = {"a": b"a1", "sub": None, "sub/b": b"b1"}
TREE_V2: State = {"a": b"a2", "c": b"c2", "sub": None}
TREE_DEEP: State = {
    "index": b"i",
    "css": None,
    "css/site": b"s",
    "css/img": None,
    "css/img/logo": b"l",
    "js": None,
    "js/app": b"a",
}
FILE_CHECKS: tuple[Check, ...] = (untouched(NEIGHBOUR), no_leftovers)


def _file(
    name: str, setup: Setup, *steps: Step, initial: View = None, caps: Capabilities | None = None
) -> Workload:
    checks = (old_or_new("f", initial), *FILE_CHECKS)
    return Workload(name, setup, steps, checks, clean_directory, caps)


def _folder(
    name: str,
    setup: Setup,
    step: Step,
    initial: View = None,
    caps: Capabilities | None = None,
    missing_until_clean: bool = False,
) -> Workload:
    checks = (old_or_new("site", initial, missing_until_clean=missing_until_clean), *FILE_CHECKS)
    return Workload(name, setup, (step,), checks, clean_directory, caps)


def _store(
    name: str,
    setup: Setup,
    *steps: Step,
    caps: Capabilities | None = None,
    **options: Any,
) -> Workload:
    """A work-queue workload; ``options`` are FileStore's keyword arguments."""
    checks = (store_invariants, no_leftovers)
    return Workload(name, setup, steps, checks, clean_store, caps, options)


WORKLOADS: tuple[Workload, ...] = (
    _file("file: new, 3 writes", files(), file_chunks("f", [b"abc", b"defgh", b"ij"])),
    _file(
        "file: overwrite, text",
        files(f=OLD),
        text_file("f", "new text", overwrite=True),
        initial=OLD,
    ),
    _file(
        "file: closed in the block",
        files(f=OLD),
        file_chunks("f", [NEW], overwrite=True, close_inside=True),
        initial=OLD,
    ),
    _file(
        "write_bytes: new, then 2 overwrites",
        files(),
        write_bytes("f", b"v1"),
        write_bytes("f", b"version 2", overwrite=True),
        write_bytes("f", b"3", overwrite=True),
    ),
    _file(
        "file: 3 writes across pages",
        files(f=OLD),
        file_chunks("f", [b"a" * 4000, b"b" * 5000, b"c" * 200], overwrite=True),
        initial=OLD,
    ),
    _file("write_bytes: new, named staging", files(), write_bytes("f", NEW), caps=NAMED_ONLY),
    _file(
        "file: new, named staging",
        files(),
        file_chunks("f", [b"abc", b"defgh"]),
        caps=NAMED_ONLY,
    ),
    _file("write_bytes: link fallback", files(), write_bytes("f", NEW), caps=NO_RENAME_FLAGS),
    _file("write_bytes: no links", files(), write_bytes("f", NEW), caps=NOTHING),
    _folder("folder: new", files(), folder("site", TREE_V1)),
    _folder("folder: new, 4 files in 4 directories", files(), folder("site", TREE_DEEP)),
    _folder(
        "folder: overwrite by exchange",
        tree("site", TREE_V1),
        folder("site", TREE_V2, overwrite=True),
        TREE_V1,
    ),
    _folder(
        "folder: overwrite in steps",
        tree("site", TREE_V1),
        folder("site", TREE_V2, overwrite=True),
        TREE_V1,
        caps=NO_EXCHANGE,
        missing_until_clean=True,
    ),
    Workload(
        "rename and swap",
        files(a=b"A", b=b"B"),
        (rename("a", "c"), swap("b", "c")),
        (
            stages(
                {"a": b"A", "b": b"B", "c": None},
                {"a": None, "b": b"B", "c": b"A"},
                {"a": None, "b": b"A", "c": b"B"},
            ),
            *FILE_CHECKS,
        ),
        clean_directory,
    ),
    _store("store: add 2", store(), add(b"message one"), add(b"message two")),
    _store(
        "store: claim, finish, claim, release",
        store(b"first", b"second"),
        claim("c1"),
        finish("c1"),
        claim("c2"),
        release("c2"),
    ),
    _store("store: add, claim, release", store(), add(b"hello"), claim("c"), release("c")),
    _store(
        "store: add 3, claim 2, finish 1",
        store(),
        add(b"m1"),
        add(b"m2"),
        add(b"m3"),
        claim("c1"),
        claim("c2"),
        finish("c1"),
    ),
    _store("store: add by link", store(), add(b"linked"), caps=NO_RENAME_FLAGS),
    _store("store: add, named staging", store(), add(b"m1"), add(b"m2"), caps=NAMED_ONLY),
    _store("store: add_many 3", store(), add_many(b"one", b"two", b"three")),
    _store(
        "store: add_many 3, named staging",
        store(),
        add_many(b"one", b"two", b"three"),
        caps=NAMED_ONLY,
    ),
    _store(
        "store: release to dead/",
        store(b"poison"),
        claim("c"),
        release("c"),
        max_attempts=1,
    ),
    _store("store: recover 2 claims", store(b"one", b"two", claimed=2), recover()),
    Workload(
        "store: shrink new/ holding messages, add, claim, finish",
        store(b"one", b"two", b"three", claimed=1),
        (shrink(), add(b"four"), claim("c"), finish("c")),
        (store_invariants, no_leftovers, shrink_finished),
        clean_store_later,
    ),
    Workload(
        "store: clean after a crash",
        store(b"kept", other={"tmp/partial": b"half a mess", f"new/{STALE}": b"x"}),
        (store_clean(),),
        (
            store_invariants,
            absent_once_returned("store/tmp/partial"),
            absent_once_returned(f"store/new/{STALE}"),
            no_leftovers,
        ),
        clean_store,
    ),
    Workload(
        "store: prepare",
        files(),
        (prepare(),),
        (
            stages(
                {"store/tmp": None, "store/new": None, "store/cur": None},
                {"store/tmp": {}, "store/new": {}, "store/cur": {}},
                at_rest_only=True,
            ),
            untouched(NEIGHBOUR),
            no_leftovers,
        ),
        clean_directory,
    ),
    Workload(
        "store: remove",
        store(other={"new/m": b"to go"}),
        (remove("m", "new"),),
        (absent_once_returned("store/new/m"), no_leftovers),
        clean_store,
    ),
    Workload(
        "store: create, move tmp to new",
        store(),
        (create("m", b"by hand"), move("m", "tmp", "new", b"by hand")),
        (old_or_new("store/new/m"), absent_once_returned("store/tmp/m"), no_leftovers),
        clean_store,
    ),
    Workload(
        "store: copy cur to new",
        store(other={"cur/m": b"a copy"}),
        (copy("m", "cur", "new", b"a copy"),),
        (old_or_new("store/new/m"), untouched("store/cur/m"), no_leftovers),
        clean_store,
    ),
)
