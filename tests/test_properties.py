"""Random sequences of operations against a model, with failures injected.

Two state machines (hypothesis, stateful testing):

* the store: create+write+close, move, copy, remove, add, claim, finish,
  release, recover, requeue, clean and list on a FileStore, against a
  model of its four areas;
* atomic: file(), write_bytes(), write_text(), folder(), rename() and
  swap() on one directory, against a model of its entries, on every
  capability the rename layer may find (fallbacks included).

Operations fail on purpose: name clashes, missing files, exceptions inside
the ``with`` block, and errors injected into one call of the OS boundary
(tests/tracing.py).  After every step the real state equals the model, or,
where an injected error struck, either the state before the step or the
state after it, never anything in between; and no staging file is left.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Optional, Union

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from atomstore import Area, Claim, ClaimLostError, FileStore, _rename, _syscalls, atomic
from atomstore._rename import Capabilities
from tracing import Recorder, named_staging

# Where the machines write: tmpfs if there is one (fsync costs nothing
# there, and a run makes thousands of files).
SCRATCH = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None

MACHINE_SETTINGS = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

Fault = Optional[tuple[str, int, int]]  # (call, which matching call, errno)

FAULTS = st.none() | st.tuples(
    st.sampled_from(["open", "write", "fsync", "rename", "renameat2", "link", "unlink", "mkdir"]),
    st.integers(1, 3),
    st.sampled_from([errno.EIO, errno.ENOSPC]),
)

PAYLOADS = st.binary(max_size=64)


class Boom(Exception):
    """Raised inside a with-block on purpose."""


@contextlib.contextmanager
def injected(fault: Fault) -> Iterator[Recorder | None]:
    """Make the ``n``-th call named ``call`` fail with ``code``, if a fault."""
    if fault is None:
        yield None
        return
    call, nth, code = fault
    seen = [0]

    def nth_call(_: object) -> bool:
        seen[0] += 1
        return seen[0] == nth

    recorder = Recorder()
    recorder.fail(call, code, when=nth_call)
    previous = _syscalls.set_tracer(recorder)
    try:
        yield recorder
    finally:
        _syscalls.set_tracer(previous)


def struck(recorder: Recorder | None) -> bool:
    return recorder is not None and recorder.faults[0].hits > 0


def injected_error(recorder: Recorder | None, error: BaseException | None) -> bool:
    """Whether ``error`` is the injected one.

    It may come first, before the error the step would have raised.
    """
    return (
        recorder is not None
        and recorder.faults[0].hits > 0
        and isinstance(error, OSError)
        and error.errno == recorder.faults[0].error
    )


def either(missing: bool, taken: bool) -> tuple[type[OSError], ...]:
    """The errors that tell the truth about a source missing, a target taken."""
    return ((FileNotFoundError,) if missing else ()) + ((FileExistsError,) if taken else ())


def outcome(call: Callable[[], Any]) -> tuple[Any, BaseException | None]:
    try:
        return call(), None
    except (OSError, ValueError, Boom) as e:
        return None, e


# What the machines did, printed by the tests (pytest -s).
STATS: collections.Counter[str] = collections.Counter()


def tell(recorder: Recorder | None, error: BaseException | None) -> None:
    STATS["steps"] += 1
    if struck(recorder):
        STATS["faults " + ("raised" if injected_error(recorder, error) else "absorbed")] += 1
    STATS[type(error).__name__ if error else "success"] += 1


def run(machine: type[RuleBasedStateMachine]) -> None:
    STATS.clear()
    run_state_machine_as_test(machine, settings=MACHINE_SETTINGS)  # type: ignore[no-untyped-call, unused-ignore]
    print(dict(STATS))


class MountsUnchanged:
    """Stands for the rename layer's watch of the mount table.

    A mount anywhere in the namespace (another test's tmpfs) makes the rename
    layer forget what it probed, the capabilities a machine pretends too.
    """

    def changed(self) -> bool:
        return False

    def reset(self) -> None:
        pass


class PretendedCapabilities:
    """What the rename layer believes of one device, put back afterwards."""

    def __init__(self, device: int) -> None:
        self.device = device
        self.saved = _rename._cache.get(device)
        self.watch = _rename._mounts
        _rename._mounts = MountsUnchanged()  # type: ignore[assignment]

    def pretend(self, caps: Capabilities) -> None:
        _rename._cache[self.device] = caps

    def current(self) -> Capabilities | None:
        return _rename._cache.get(self.device)

    def forget(self) -> None:
        _rename._cache.pop(self.device, None)

    def restore(self) -> None:
        _rename._mounts = self.watch
        if self.saved is None:
            _rename._cache.pop(self.device, None)
        else:
            _rename._cache[self.device] = self.saved


# -- the store --------------------------------------------------------------

Areas = dict[str, dict[str, bytes]]
AREAS: tuple[Area, ...] = ("tmp", "new", "cur", "dead")
CLASSIC_AREAS: tuple[Area, ...] = ("tmp", "new", "cur")
MAX_ATTEMPTS = 2
FIXED_NAMES = ["a", "b", "a:1,A1", "b:1,A2"]


def parse(name: str) -> tuple[str, dict[str, str]]:
    """A stored name's unique part and its maildir info fields."""
    base, sep, info = name.rpartition(":")
    if not sep or not info.startswith("1,"):
        return name, {}
    return base, {item[0]: item[1:] for item in info[2:].split(",") if item}


def attempts(name: str) -> int:
    try:
        return int(parse(name)[1].get("A", "0"))
    except ValueError:
        return 0


def is_claim(name: str) -> bool:
    try:
        int(parse(name)[1]["C"])
    except (KeyError, ValueError):
        return False
    return True


def given_back(name: str, count: int) -> tuple[str, str]:
    """Where a claim of ``name`` goes after ``count`` attempts: (area, name)."""
    base = parse(name)[0]
    area = "dead" if count >= MAX_ATTEMPTS else "new"
    return area, base if count == 0 else f"{base}:1,A{count}"


class StoreMachine(RuleBasedStateMachine):
    """A FileStore and its model: what each area holds, name by name."""

    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="atomstore-properties-", dir=SCRATCH))
        self.store = FileStore(self.root / "store", max_attempts=MAX_ATTEMPTS)
        self.model: Areas = {area: {} for area in AREAS}
        self.claims: list[Claim] = []
        self.caps = PretendedCapabilities(os.stat(self.root).st_dev)
        STATS["examples"] += 1

    @initialize()
    def prepare(self) -> None:
        self.store.prepare()
        # The capability probe runs once per filesystem and process: done
        # here, so that no injected fault lands in it.
        self.store._capabilities()
        self.store.add(b"probe")
        claim = self.store.claim()
        assert claim is not None
        claim.finish()

    def teardown(self) -> None:
        self.caps.restore()
        shutil.rmtree(self.root, ignore_errors=True)

    @rule(noreplace=st.booleans(), hardlinks=st.booleans())
    def filesystem(self, noreplace: bool, hardlinks: bool) -> None:
        # what the rename layer believes of this filesystem: every fallback
        caps = Capabilities(noreplace, exchange=True, hardlinks=hardlinks)
        self.caps.pretend(caps)
        self.store._caps = caps

    # -- reading the real state -----------------------------------------

    def real(self) -> Areas:
        state: Areas = {}
        for area in AREAS:
            directory = os.path.join(self.store.path, area)
            names = os.listdir(directory) if os.path.isdir(directory) else []
            staging = [n for n in names if n.startswith(".")]
            assert not staging, f"left in {area}/: {staging}"
            state[area] = {n: Path(directory, n).read_bytes() for n in names}
        return state

    @invariant()
    def matches_the_model(self) -> None:
        assert self.real() == self.model

    def settle(
        self,
        before: Areas,
        error: BaseException | None,
        expected: tuple[type[BaseException], ...] | None,
        recorder: Recorder | None,
        after: Callable[[Areas], bool] | Areas,
    ) -> None:
        """Check the outcome of a step and bring the model up to date.

        :param expected: the error the step must raise, None if it must
            succeed (unless an injected fault struck).
        :param after: the state if the step took effect, or a check of it.
        """
        tell(recorder, error)
        real = self.real()

        def is_after(state: Areas) -> bool:
            return after(state) if callable(after) else state == after

        if injected_error(recorder, error):
            # old or new, never anything in between
            assert real == before or is_after(real), "a failed step left a state in between"
        elif expected is not None:
            assert isinstance(error, expected), f"expected {expected}, got {error!r}"
            assert real == before
        else:
            assert error is None, f"unexpected {error!r}"
            assert is_after(real)
        self.model = real

    def names(self) -> st.SearchStrategy[str]:
        present = sorted({n for area in self.model.values() for n in area})
        return st.sampled_from(FIXED_NAMES + present)

    # -- the classic API -------------------------------------------------

    @rule(data=st.data(), payload=PAYLOADS, fail=st.booleans())
    def create_write_close(self, data: st.DataObject, payload: bytes, fail: bool) -> None:
        name = data.draw(self.names())
        before = copy.deepcopy(self.model)

        def write() -> None:
            with self.store.create(name, "wb") as f:
                f.write(payload)
                if fail:
                    raise Boom

        _, error = outcome(write)
        if name in before["tmp"]:
            self.settle(before, error, (FileExistsError,), None, before)
            return
        # create() hands out the file itself: what was written before the
        # exception stays, for the writer to finish or remove
        assert isinstance(error, Boom) if fail else error is None, error
        after = copy.deepcopy(before)
        after["tmp"][name] = payload
        self.settle(before, None, None, None, after)

    @rule(data=st.data(), overwrite=st.booleans(), fault=FAULTS)
    def move(self, data: st.DataObject, overwrite: bool, fault: Fault) -> None:
        name = data.draw(self.names())
        src, dst = data.draw(st.permutations(CLASSIC_AREAS))[:2]
        before = copy.deepcopy(self.model)
        with injected(fault) as recorder:
            _, error = outcome(lambda: self.store.move(name, src, dst, overwrite=overwrite))
        after = copy.deepcopy(before)
        if name not in before[src]:
            # as rename(2), on every fallback: a missing source comes first
            self.settle(before, error, (FileNotFoundError,), recorder, before)
        elif name in before[dst] and not overwrite:
            self.settle(before, error, (FileExistsError,), recorder, before)
        else:
            after[dst][name] = after[src].pop(name)
            self.settle(before, error, None, recorder, after)

    @rule(data=st.data(), overwrite=st.booleans(), fault=FAULTS)
    def copy(self, data: st.DataObject, overwrite: bool, fault: Fault) -> None:
        name = data.draw(self.names())
        src, dst = data.draw(st.permutations(CLASSIC_AREAS))[:2]
        before = copy.deepcopy(self.model)
        with injected(fault) as recorder:
            _, error = outcome(lambda: self.store.copy(name, src, dst, overwrite=overwrite))
        after = copy.deepcopy(before)
        missing, taken = name not in before[src], name in before[dst] and not overwrite
        if missing or taken:
            # copy() looks for the target before it opens the source
            self.settle(before, error, either(missing, taken), recorder, before)
        else:
            after[dst][name] = after[src][name]
            self.settle(before, error, None, recorder, after)

    @rule(data=st.data(), fault=FAULTS)
    def remove(self, data: st.DataObject, fault: Fault) -> None:
        name = data.draw(self.names())
        area = data.draw(st.sampled_from(AREAS))
        before = copy.deepcopy(self.model)
        with injected(fault) as recorder:
            _, error = outcome(lambda: self.store.remove(name, area))
        if name not in before[area]:
            self.settle(before, error, (FileNotFoundError,), recorder, before)
        else:
            after = copy.deepcopy(before)
            del after[area][name]
            self.settle(before, error, None, recorder, after)

    @rule(name=st.sampled_from(["", "..", "../new/a", "a/b", ".hidden", "a\0b", "x" * 256]))
    def bad_name(self, name: str) -> None:
        before = copy.deepcopy(self.model)
        for call in (
            lambda: self.store.create(name),
            lambda: self.store.move(name, "tmp", "new"),
            lambda: self.store.copy(name, "new", "cur"),
            lambda: self.store.remove(name, "cur"),
        ):
            _, error = outcome(call)
            assert isinstance(error, ValueError)
        self.settle(before, None, None, None, before)

    @rule()
    def list_areas(self) -> None:
        for area in AREAS:
            directory = os.path.join(self.store.path, area)
            assert self.store.list(area) == [
                os.path.join(directory, n) for n in sorted(self.model[area])
            ]

    # -- the work queue -------------------------------------------------

    @rule(payload=PAYLOADS, fault=FAULTS)
    def add(self, payload: bytes, fault: Fault) -> None:
        before = copy.deepcopy(self.model)
        with injected(fault) as recorder:
            name, error = outcome(lambda: self.store.add(payload))

        def delivered(state: Areas) -> bool:
            extra = set(state["new"]) - set(before["new"])
            if len(extra) != 1 or (name is not None and extra != {name}):
                return False
            (new_name,) = extra
            return (
                state["new"][new_name] == payload
                and {
                    **state,
                    "new": {n: c for n, c in state["new"].items() if n != new_name},
                }
                == before
            )

        self.settle(before, error, None, recorder, delivered)

    def claimed(self, before: Areas, claim: Claim | None, fresh: bool) -> Callable[[Areas], bool]:
        """A check of the state after a claim (``claim`` if it returned one)."""

        def check(state: Areas) -> bool:
            gone = set(before["new"]) - set(state["new"])
            came = set(state["cur"]) - set(before["cur"])
            if len(gone) != 1 or len(came) != 1:
                return False
            (taken,), (claim_file,) = gone, came
            if fresh and taken != min(before["new"]):
                return False  # a store with no backlog takes the oldest
            base, fields = parse(claim_file)
            if (base, fields.get("A")) != (parse(taken)[0], str(attempts(taken))):
                return False
            if fields.get("P") != str(os.getpid()) or not is_claim(claim_file):
                return False
            if claim is not None and claim.path != os.path.join(self.store.path, "cur", claim_file):
                return False
            rest = {
                **state,
                "new": {**state["new"], taken: before["new"][taken]},
                "cur": {n: c for n, c in state["cur"].items() if n != claim_file},
            }
            return state["cur"][claim_file] == before["new"][taken] and rest == before

        return check

    @rule(fresh=st.booleans(), fault=FAULTS)
    def claim(self, fresh: bool, fault: Fault) -> None:
        store = FileStore(self.store.path, max_attempts=MAX_ATTEMPTS) if fresh else self.store
        before = copy.deepcopy(self.model)
        with injected(fault) as recorder:
            claim, error = outcome(store.claim)
        if not before["new"]:
            assert claim is None
            self.settle(before, error, None, recorder, before)
            return
        self.settle(before, error, None, recorder, self.claimed(before, claim, fresh))
        if claim is not None:
            assert claim.read_bytes() == self.model["cur"][os.path.basename(claim.path)]
            self.claims.append(claim)

    @rule(fail=st.booleans())
    def claim_in_a_block(self, fail: bool) -> None:
        # A claim used as a context manager: finished, or released on error.
        before = copy.deepcopy(self.model)
        claim = self.store.claim()
        if claim is None:
            assert not before["new"]
            return
        claim_file = os.path.basename(claim.path)
        assert self.claimed(before, claim, fresh=False)(self.real())
        middle = self.real()

        def use() -> None:
            with claim:
                assert claim.read_bytes() == middle["cur"][claim_file]
                if fail:
                    raise Boom

        _, error = outcome(use)
        after = copy.deepcopy(middle)
        content = after["cur"].pop(claim_file)
        if fail:
            area, back = given_back(claim_file, claim.attempts + 1)
            if back in after[area]:
                # release() refused to replace: the claim stays
                assert isinstance(error, FileExistsError)
                self.settle(middle, error, (FileExistsError,), None, middle)
                self.claims.append(claim)
                return
            after[area][back] = content
            assert isinstance(error, Boom)
        else:
            assert error is None
        self.settle(after, None, None, None, after)

    def claim_index(self, data: st.DataObject) -> Claim:
        return self.claims[data.draw(st.integers(0, len(self.claims) - 1))]

    @precondition(lambda self: self.claims)
    @rule(data=st.data(), fault=FAULTS)
    def finish(self, data: st.DataObject, fault: Fault) -> None:
        claim = self.claim_index(data)
        claim_file = os.path.basename(claim.path)
        before = copy.deepcopy(self.model)
        with injected(fault) as recorder:
            _, error = outcome(claim.finish)
        if claim_file not in before["cur"]:
            self.settle(before, error, (ClaimLostError,), recorder, before)
        else:
            after = copy.deepcopy(before)
            del after["cur"][claim_file]
            self.settle(before, error, None, recorder, after)

    @precondition(lambda self: self.claims)
    @rule(data=st.data(), fault=FAULTS)
    def release(self, data: st.DataObject, fault: Fault) -> None:
        claim = self.claim_index(data)
        claim_file = os.path.basename(claim.path)
        before = copy.deepcopy(self.model)
        with injected(fault) as recorder:
            _, error = outcome(claim.release)
        area, back = given_back(claim_file, claim.attempts + 1)
        if claim_file not in before["cur"]:
            self.settle(before, error, (ClaimLostError,), recorder, before)
        elif back in before[area]:
            self.settle(before, error, (FileExistsError,), recorder, before)
        else:
            after = copy.deepcopy(before)
            after[area][back] = after["cur"].pop(claim_file)
            self.settle(before, error, None, recorder, after)

    @rule(fault=FAULTS)
    def recover(self, fault: Fault) -> None:
        before = copy.deepcopy(self.model)
        with injected(fault) as recorder:
            returned, error = outcome(lambda: self.store.recover(0))
        # Every claim whose name is free where it goes back is recovered;
        # one whose name is taken stays in cur/ (the error may say so).
        after = copy.deepcopy(before)
        blocked = []
        for claim_file in sorted(before["cur"]):
            if not is_claim(claim_file):
                continue
            area, back = given_back(claim_file, attempts(claim_file) + 1)
            if back in after[area]:
                blocked.append(os.path.join(self.store.path, area, back))
                continue
            after[area][back] = after["cur"].pop(claim_file)
        if injected_error(recorder, error):
            # recover() is many steps, each one old or new: the real state
            # is checked against the model from now on
            self.model = self.real()
            return
        if blocked:
            # reported once every other claim was recovered
            assert isinstance(error, FileExistsError), error
            assert error.filename in blocked
            error = None
        self.settle(before, error, None, None, after)
        if returned is not None:
            assert sorted(returned) == sorted(
                os.path.join(self.store.path, area, n)
                for area in ("new", "dead")
                for n in set(after[area]) - set(before[area])
            )

    @rule(data=st.data())
    def requeue(self, data: st.DataObject) -> None:
        dead = sorted(self.model["dead"])
        name = data.draw(st.sampled_from(dead + FIXED_NAMES))
        before = copy.deepcopy(self.model)
        _, error = outcome(lambda: self.store.requeue(name))
        base = parse(name)[0]
        if name not in before["dead"]:
            self.settle(before, error, (FileNotFoundError,), None, before)
        elif base in before["new"]:
            self.settle(before, error, (FileExistsError,), None, before)
        else:
            after = copy.deepcopy(before)
            after["new"][base] = after["dead"].pop(name)
            self.settle(before, error, None, None, after)

    @rule(now=st.booleans())
    def clean(self, now: bool) -> None:
        before = copy.deepcopy(self.model)
        removed = self.store.clean(0) if now else self.store.clean()
        after = copy.deepcopy(before)
        if now:
            after["tmp"] = {}
        assert sorted(removed) == sorted(
            os.path.join(self.store.path, "tmp", n) for n in before["tmp"] if now
        )
        self.settle(before, None, None, None, after)


def test_store_against_its_model() -> None:
    run(StoreMachine)


# -- atomic ---------------------------------------------------------------

Tree = dict[str, Optional[bytes]]  # relative path: content, None for a directory
Entry = Union[bytes, tuple[tuple[str, Optional[bytes]], ...]]  # a file, or a tree frozen
Entries = dict[str, Entry]
NAMES = ["a", "b", "c"]
TREES = st.dictionaries(
    st.sampled_from(["f", "g", "sub/", "sub/h", "sub/deeper/", "sub/deeper/i"]),
    PAYLOADS,
    max_size=4,
)


def frozen(tree: Tree) -> Entry:
    return tuple(sorted(tree.items()))


def as_tree(drawn: dict[str, bytes]) -> Tree:
    """A drawn tree with its directories complete (``x/`` is a directory)."""
    tree: Tree = {}
    for path, content in drawn.items():
        parts = path.rstrip("/").split("/")
        for depth in range(1, len(parts)):
            tree["/".join(parts[:depth])] = None
        tree[path.rstrip("/")] = None if path.endswith("/") else content
    return tree


def read_tree(top: str) -> Entry:
    tree: Tree = {}
    for root, dirs, files in os.walk(top):
        for name in dirs:
            tree[os.path.relpath(os.path.join(root, name), top)] = None
        for name in files:
            path = os.path.join(root, name)
            tree[os.path.relpath(path, top)] = Path(path).read_bytes()
    return frozen(tree)


def write_tree(top: Path, tree: Tree) -> None:
    for path, content in sorted(tree.items()):
        if content is None:
            (top / path).mkdir()
        else:
            (top / path).write_bytes(content)


class AtomicMachine(RuleBasedStateMachine):
    """One directory written with atomic, and its model: name to entry."""

    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="atomstore-properties-", dir=SCRATCH))
        self.dir = self.root / "d"
        self.dir.mkdir()
        self.model: Entries = {}
        self.caps = PretendedCapabilities(os.stat(self.dir).st_dev)
        # Probed afresh by the first step that needs it: faults land in the
        # probe too.
        self.caps.forget()
        STATS["examples"] += 1

    def teardown(self) -> None:
        self.caps.restore()
        shutil.rmtree(self.root, ignore_errors=True)

    def real(self) -> Entries:
        names = os.listdir(self.dir)
        staging = [n for n in names if n.startswith(".")]
        assert not staging, f"left: {staging}"
        found: Entries = {}
        for name in names:
            path = self.dir / name
            assert not path.is_symlink()
            found[name] = read_tree(str(path)) if path.is_dir() else path.read_bytes()
        return found

    @invariant()
    def matches_the_model(self) -> None:
        assert self.real() == self.model

    def settle(
        self,
        error: BaseException | None,
        expected: tuple[type[BaseException], ...] | None,
        recorder: Recorder | None,
        after: Entries,
    ) -> None:
        before = self.model
        if struck(recorder) and not injected_error(recorder, error):
            # The fault struck where the step ignores it, removing a tree it
            # no longer needs (the staging tree after an error, the old tree
            # after the exchange): what it left is for clean().
            atomic.clean(self.dir, older_than=0)
        tell(recorder, error)
        real = self.real()
        if injected_error(recorder, error):
            assert real in (before, after), "a failed step left a state in between"
        elif expected is not None:
            assert isinstance(error, expected), f"expected {expected}, got {error!r}"
            assert real == before
        else:
            assert error is None, f"unexpected {error!r}"
            assert real == after
        self.model = real

    @rule(
        noreplace=st.booleans(),
        exchange=st.booleans(),
        hardlinks=st.booleans(),
    )
    def filesystem(self, noreplace: bool, exchange: bool, hardlinks: bool) -> None:
        # what the rename layer believes of this filesystem: every fallback
        self.caps.pretend(Capabilities(noreplace, exchange, hardlinks))

    @rule(
        name=st.sampled_from(NAMES),
        payload=PAYLOADS,
        overwrite=st.booleans(),
        how=st.sampled_from(["file", "file text", "write_bytes", "write_text"]),
        fail=st.booleans(),
        fault=FAULTS,
    )
    def write_file(
        self, name: str, payload: bytes, overwrite: bool, how: str, fail: bool, fault: Fault
    ) -> None:
        dest = self.dir / name
        text = payload.decode("latin-1")

        def write() -> None:
            if how == "write_bytes":
                atomic.write_bytes(dest, payload, overwrite=overwrite)
            elif how == "write_text":
                atomic.write_text(dest, text, "latin-1", overwrite=overwrite)
            else:
                binary = how == "file"
                mode = "wb" if binary else "w"
                encoding = None if binary else "latin-1"
                newline = None if binary else ""
                with atomic.file(
                    dest, mode, overwrite=overwrite, encoding=encoding, newline=newline
                ) as f:
                    f.write(payload if binary else text)
                    if fail:
                        raise Boom

        with injected(fault) as recorder:
            _, error = outcome(write)
        current = self.model.get(name)
        if isinstance(current, tuple):
            self.settle(error, (IsADirectoryError,), recorder, self.model)
        elif current is not None and not overwrite:
            self.settle(error, (FileExistsError,), recorder, self.model)
        elif fail and how.startswith("file"):
            self.settle(error, (Boom,), recorder, self.model)
        else:
            self.settle(error, None, recorder, {**self.model, name: payload})

    @rule(
        name=st.sampled_from(NAMES),
        drawn=TREES,
        overwrite=st.booleans(),
        fail=st.booleans(),
        fault=FAULTS,
    )
    def write_folder(
        self, name: str, drawn: dict[str, bytes], overwrite: bool, fail: bool, fault: Fault
    ) -> None:
        tree = as_tree(drawn)

        def write() -> None:
            with atomic.folder(self.dir / name, overwrite=overwrite) as staging:
                write_tree(staging, tree)
                if fail:
                    raise Boom

        with injected(fault) as recorder:
            _, error = outcome(write)
        current = self.model.get(name)
        if isinstance(current, bytes):
            self.settle(error, (NotADirectoryError,), recorder, self.model)
        elif current is not None and not overwrite:
            self.settle(error, (FileExistsError,), recorder, self.model)
        elif fail:
            self.settle(error, (Boom,), recorder, self.model)
        else:
            self.settle(error, None, recorder, {**self.model, name: frozen(tree)})

    @rule(src=st.sampled_from(NAMES), dst=st.sampled_from(NAMES), fault=FAULTS)
    def rename(self, src: str, dst: str, fault: Fault) -> None:
        with injected(fault) as recorder:
            _, error = outcome(lambda: atomic.rename(self.dir / src, self.dir / dst))
        if src not in self.model:
            # as rename(2), on every fallback: a missing source comes first
            self.settle(error, (FileNotFoundError,), recorder, self.model)
        elif dst in self.model:
            self.settle(error, (FileExistsError,), recorder, self.model)
        else:
            after = dict(self.model)
            after[dst] = after.pop(src)
            self.settle(error, None, recorder, after)

    @rule(a=st.sampled_from(NAMES), b=st.sampled_from(NAMES), fault=FAULTS)
    def swap(self, a: str, b: str, fault: Fault) -> None:
        caps = self.caps.current()
        with injected(fault) as recorder:
            _, error = outcome(lambda: atomic.swap(self.dir / a, self.dir / b))
        if caps is not None and not caps.exchange:
            # no atomic exchange, no fallback: refused before anything else
            self.settle(error, (OSError,), recorder, self.model)
            assert isinstance(error, OSError)
            assert error.errno == errno.EOPNOTSUPP
        elif a not in self.model or b not in self.model:
            self.settle(error, (FileNotFoundError,), recorder, self.model)
        else:
            after = dict(self.model)
            after[a], after[b] = self.model[b], self.model[a]
            self.settle(error, None, recorder, after)

    @rule(name=st.sampled_from(NAMES))
    def remove_by_hand(self, name: str) -> None:
        path = self.dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        self.model.pop(name, None)

    @rule()
    def clean(self) -> None:
        assert atomic.clean(self.dir, older_than=0) == []


def test_atomic_against_its_model() -> None:
    run(AtomicMachine)


# -- what the machines found, pinned --------------------------------------


@pytest.mark.parametrize(
    "caps",
    [{}, {"noreplace": False}, {"noreplace": False, "hardlinks": False}],
    ids=["renameat2", "link fallback", "last resort"],
)
def test_a_recovered_claim_is_lost_on_every_filesystem(
    tmp_path: Path, force_caps: Callable[..., Capabilities], caps: dict[str, bool]
) -> None:
    # The recovered message waits under the very name the stale release
    # would give it: the answer must still be ClaimLostError, the
    # documented word for a claim no longer held, whatever the fallback.
    force_caps(**caps)
    store = FileStore(tmp_path / "store")
    store.prepare()
    name = store.add(b"x")
    stale = store.claim()
    assert stale is not None
    assert store.recover(0) == [os.path.join(store.path, "new", f"{name}:1,A1")]
    for attempt in (stale.release, stale.finish):
        with pytest.raises(ClaimLostError):
            attempt()
    assert Path(store.path, "new", f"{name}:1,A1").read_bytes() == b"x"


def test_a_probe_failing_to_clean_up_fails_no_write(
    tmp_path: Path, fresh_probe: None, trace: Recorder
) -> None:
    # The capability probe works in a scratch directory of its own; an
    # error removing it is not the write's error: the write succeeds and the
    # scratch, under a staging name, is left for clean().
    trace.fail("rmdir", errno.EIO)
    with named_staging():
        atomic.write_bytes(tmp_path / "x", b"data")
    assert (tmp_path / "x").read_bytes() == b"data"
    (left,) = [n for n in os.listdir(tmp_path) if n != "x"]
    assert left.startswith(".probe.atomstore-")
    assert atomic.clean(tmp_path, older_than=0) == [str(tmp_path / left)]
    assert os.listdir(tmp_path) == ["x"]
