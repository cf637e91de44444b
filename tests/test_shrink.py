"""An emptied ``new/`` swapped for a fresh directory (ext4 never shrinks one).

The swap is forced small here (``SHRINK_FROM = 0``: every empty look swaps)
so that it runs on any filesystem with ``RENAME_EXCHANGE``; one test drains
a real backlog on ext4 and measures the directory.  What must hold: nothing
is lost or duplicated while producers and consumers keep running, whatever
raced into the old directory comes back, the fresh directory is the old
one's twin (mode, group, ACLs and other extended attributes), a stopped
swap is finished by the next consumer, waiters follow the fresh directory
at once, and nothing hostile at the hidden name is ever followed.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest

from acls import default_acl
from atomstore import ClaimLostError, FileStore, _shrink, _store, _watch
from atomstore._rename import Capabilities
from forked import Children, call_as, exit_code
from needs import need, need_root
from test_races import CAPS, force_caps, parse, payload
from tracing import Recorder

HIDDEN = _shrink.SHRINK_NAME
NOBODY = 65534


def prepared(path: Path, **options: object) -> FileStore:
    store = FileStore(path, durable=False, **options)  # type: ignore[arg-type]
    store.prepare()
    return store


def identity(path: Path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_dev, st.st_ino


def drain(store: FileStore) -> list[bytes]:
    got = []
    while (claim := store.claim()) is not None:
        got.append(claim.read_bytes())
        claim.finish()
    return got


# -- the swap --------------------------------------------------------------


def test_a_drained_ext4_new_is_small_again(tmp_path: Path) -> None:
    need(_watch.filesystem_type(str(tmp_path)) == "ext4", f"needs ext4, {tmp_path} is not")
    store = prepared(tmp_path / "s")
    new = tmp_path / "s" / "new"
    store.add_many([b"%d" % i for i in range(3000)])
    grown = os.lstat(new).st_size
    assert grown >= _shrink.SHRINK_FROM  # 3,000 names take about 200 KiB
    before = identity(new)
    assert sorted(drain(store)) == sorted(b"%d" % i for i in range(3000))
    assert identity(new) != before
    assert os.lstat(new).st_size == os.lstat(tmp_path / "s" / "cur").st_size == 4096
    assert os.listdir(new) == []
    # The old directory, emptied, waits out the grace period at the hidden name.
    assert stat.S_ISDIR(os.lstat(tmp_path / "s" / HIDDEN).st_mode)
    assert os.listdir(tmp_path / "s" / HIDDEN) == []


def test_an_empty_look_at_a_small_new_swaps_nothing(tmp_path: Path) -> None:
    store = prepared(tmp_path)
    store.add_many([b"a", b"b"])
    before = identity(tmp_path / "new")
    assert len(drain(store)) == 2
    assert store.claim() is None
    assert identity(tmp_path / "new") == before
    assert sorted(os.listdir(tmp_path)) == ["cur", "new", "tmp"]


def test_what_raced_into_the_old_new_comes_back(tmp_path: Path, eager: None) -> None:
    store = prepared(tmp_path)
    names = store.add_many([b"one", b"two"])
    (tmp_path / "new" / ".DS_Store").write_bytes(b"foreign")
    os.mkfifo(tmp_path / "new" / "fifo")
    before = identity(tmp_path / "new")
    assert _shrink.shrink(str(tmp_path), str(tmp_path / "new"), durable=True)
    assert identity(tmp_path / "new") != before
    assert sorted(os.listdir(tmp_path / "new")) == sorted([*names, ".DS_Store", "fifo"])
    assert stat.S_ISFIFO(os.lstat(tmp_path / "new" / "fifo").st_mode)
    assert identity(tmp_path / HIDDEN) == before
    assert os.listdir(tmp_path / HIDDEN) == []
    assert sorted(drain(store)) == [b"one", b"two"]


@pytest.mark.parametrize("kind", ["hidden file", "directory", "fifo", "foreign file"])
def test_a_consumer_swaps_only_an_empty_new(tmp_path: Path, eager: None, kind: str) -> None:
    store = prepared(tmp_path)
    entry = tmp_path / "new" / (".DS_Store" if kind == "hidden file" else "entry")
    if kind == "directory":
        entry.mkdir()
    elif kind == "fifo":
        os.mkfifo(entry)
    else:
        entry.write_bytes(b"x")
    store._unclaimable.add("entry")  # a foreign file this consumer cannot claim
    before = identity(tmp_path / "new")
    assert store.claim() is None
    assert store.claim(oldest=False) is None
    assert identity(tmp_path / "new") == before  # something in it: kept
    if kind == "directory":
        entry.rmdir()
    else:
        entry.unlink()
    assert store.claim() is None
    assert identity(tmp_path / "new") != before


def test_take_any_swaps_too(tmp_path: Path, eager: None) -> None:
    store = prepared(tmp_path)
    before = identity(tmp_path / "new")
    assert store.claim(oldest=False) is None
    assert identity(tmp_path / "new") != before


def test_a_consumer_swaps_at_most_every_few_seconds(
    tmp_path: Path, eager: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_store, "_SHRINK_EVERY", 10.0)
    monkeypatch.setattr(_shrink, "GRACE", 0.0)  # the old new/ goes at the next look
    store = prepared(tmp_path)
    first = identity(tmp_path / "new")
    assert store.claim() is None
    second = identity(tmp_path / "new")
    assert second != first
    assert store.claim() is None
    assert identity(tmp_path / "new") == second
    monkeypatch.setattr(store, "_next_shrink", time.monotonic() - 1)
    assert store.claim() is None
    assert identity(tmp_path / "new") != second


def test_an_idle_look_pays_a_clock_read_for_the_swap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A consumer polling an empty store looks at new/'s size at most every
    second, and for an old new/ at most every half second."""
    store = prepared(tmp_path)
    calls: Counter[str] = Counter()

    def counting(name: str, result: bool) -> object:
        def call(*args: object, **kwargs: object) -> bool:
            calls[name] += 1
            return result

        return call

    monkeypatch.setattr(_shrink, "worth_it", counting("size", False))
    monkeypatch.setattr(_shrink, "finish", counting("leftover", False))
    for _ in range(200):
        assert store.claim() is None
        assert store.claim(oldest=False) is None
    assert calls == {"size": 1, "leftover": 1}


def test_no_swap_where_directories_shrink_by_themselves(
    tmp_path: Path, eager: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only ext2/3/4 keep an emptied directory's blocks: elsewhere (xfs,
    btrfs, tmpfs) new/ is never swapped."""
    monkeypatch.setattr(_shrink, "_kinds", {})
    kind = _watch.filesystem_type(str(tmp_path))
    monkeypatch.setattr(_shrink, "NEVER_SHRINK", frozenset({"ext2", "ext3", "ext4"} - {kind}))
    store = prepared(tmp_path)
    before = identity(tmp_path / "new")
    assert store.claim() is None
    assert identity(tmp_path / "new") == before
    monkeypatch.setattr(_shrink, "NEVER_SHRINK", frozenset({kind}))
    monkeypatch.setattr(store, "_next_shrink", 0.0)
    assert store.claim() is None
    assert identity(tmp_path / "new") != before


@pytest.mark.parametrize("caps_name", ["links", "nolinks", "dropped", "unprobed"])
def test_no_swap_without_a_proven_exchange(tmp_path: Path, eager: None, caps_name: str) -> None:
    caps = CAPS.get(caps_name) or Capabilities(True, True, True, probed=False)
    store = prepared(tmp_path)
    store._caps = caps
    before = identity(tmp_path / "new")
    assert store.claim() is None
    assert store.claim(oldest=False) is None
    assert identity(tmp_path / "new") == before
    assert not os.path.lexists(tmp_path / HIDDEN)


# -- the fresh directory is the old one's twin ------------------------------


def test_the_fresh_new_keeps_mode_acls_and_attributes(tmp_path: Path, eager: None) -> None:
    store = prepared(tmp_path)
    new = tmp_path / "new"
    os.chmod(new, 0o3750)  # set-group-ID and sticky too
    try:
        os.setxattr(new, "system.posix_acl_default", default_acl(7, 5, 0))
        os.setxattr(new, "user.owner-note", b"keep me")
    except OSError as e:
        need(e.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP), f"no xattrs here: {e}")
        raise
    old = os.lstat(new)
    assert store.claim() is None
    fresh = os.lstat(new)
    assert fresh.st_ino != old.st_ino
    assert stat.S_IMODE(fresh.st_mode) == 0o3750
    assert (fresh.st_uid, fresh.st_gid) == (old.st_uid, old.st_gid)
    assert os.getxattr(new, "user.owner-note") == b"keep me"
    assert os.getxattr(new, "system.posix_acl_default") == default_acl(7, 5, 0)


def test_the_fresh_new_keeps_a_group_the_consumer_is_in(tmp_path: Path, eager: None) -> None:
    need_root()
    store = prepared(tmp_path)
    os.chown(tmp_path / "new", 0, NOBODY)
    assert store.claim() is None
    assert os.lstat(tmp_path / "new").st_gid == NOBODY
    assert os.lstat(tmp_path / HIDDEN).st_gid == NOBODY


def test_a_new_owned_by_another_user_is_never_swapped(tmp_path: Path, eager: None) -> None:
    need_root()
    store = prepared(tmp_path, mode=0o666)
    os.chmod(tmp_path, 0o777)
    os.chown(tmp_path / "new", NOBODY, NOBODY)
    before = identity(tmp_path / "new")
    assert store.claim() is None
    assert identity(tmp_path / "new") == before
    assert not os.path.lexists(tmp_path / HIDDEN)


def test_a_group_the_owner_is_not_in_stops_the_swap(
    eager: None, request: pytest.FixtureRequest
) -> None:
    need_root()
    top = Path(tempfile.mkdtemp(prefix="atomstore-shrink-", dir="/tmp"))
    request.addfinalizer(lambda: shutil.rmtree(top, ignore_errors=True))
    top.chmod(0o755)
    path = top / "s"
    prepared(path)
    for directory in (path, path / "tmp", path / "cur"):
        os.chown(directory, NOBODY, NOBODY)
    # nobody owns new/, but its group is root's, which nobody is not in.
    os.chown(path / "new", NOBODY, 0)
    os.chmod(path / "new", 0o2770)
    before = identity(path / "new")

    def look() -> bool:
        return FileStore(path, durable=False).claim() is None

    assert call_as(NOBODY, NOBODY, look)
    assert identity(path / "new") == before
    assert stat.S_IMODE(os.lstat(path / "new").st_mode) == 0o2770
    assert not os.path.lexists(path / HIDDEN)


# -- a swap stopped half-way ------------------------------------------------


def stranded(tmp_path: Path, store: FileStore, *data: bytes) -> list[str]:
    """An old new/ at the hidden name holding messages, as a consumer killed
    right after its exchange leaves it."""
    names = store.add_many(list(data))
    assert _shrink.shrink(str(tmp_path), str(tmp_path / "new"), durable=False)
    for name in names:  # put back, as if the consumer died before moving them
        os.rename(tmp_path / "new" / name, tmp_path / HIDDEN / name)
    return names


def test_the_next_consumer_finishes_a_stopped_swap(tmp_path: Path, eager: None) -> None:
    store = prepared(tmp_path)
    names = stranded(tmp_path, store, b"one", b"two")
    time.sleep(_shrink.GRACE * 2)
    other = FileStore(tmp_path, durable=False)
    claim = other.claim()
    assert claim is not None
    assert claim.name == names[0]
    assert not os.path.lexists(tmp_path / HIDDEN)
    assert os.listdir(tmp_path / "new") == [names[1]]


def test_an_old_new_is_left_alone_while_it_changes(
    tmp_path: Path, eager: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_shrink, "GRACE", 0.5)
    store = prepared(tmp_path)
    names = stranded(tmp_path, store, b"one")
    assert FileStore(tmp_path, durable=False).claim() is None  # within the grace: its swapper's
    # clean(), however young it calls stale, leaves it too: a rename into
    # it may be under way, and would fail.
    assert FileStore(tmp_path, durable=False).clean(older_than=0) == []
    assert os.listdir(tmp_path / HIDDEN) == names
    time.sleep(0.6)
    assert FileStore(tmp_path, durable=False).clean(older_than=0) == []
    assert not os.path.lexists(tmp_path / HIDDEN)
    assert os.listdir(tmp_path / "new") == names


def test_a_name_in_both_directories_is_kept_once_or_twice(tmp_path: Path, eager: None) -> None:
    store = prepared(tmp_path)
    same, other = stranded(tmp_path, store, b"same", b"differs")
    # A crash kept both entries of the move back: the same message twice.
    (tmp_path / "new" / same).write_bytes(b"same")
    # A foreign file that took a message's name: another message.
    (tmp_path / "new" / other).write_bytes(b"foreign")
    time.sleep(_shrink.GRACE * 2)
    assert sorted(drain(store)) == [b"differs", b"foreign", b"same"]
    # Emptied again, new/ was swapped again: the old one is empty.
    assert os.listdir(tmp_path / HIDDEN) == []


def test_what_cannot_be_moved_back_stays_and_claims_go_on(
    tmp_path: Path, eager: None, monkeypatch: pytest.MonkeyPatch, trace: Recorder
) -> None:
    monkeypatch.setattr(_store, "_LEFTOVER_LOOK_EVERY", 0.5)
    store = prepared(tmp_path)
    [stuck] = stranded(tmp_path, store, b"stuck")
    trace.fail(
        "renameat2",
        errno.EACCES,
        when=lambda call: str(call.args[0]).endswith(f"{HIDDEN}/{stuck}"),
        times=None,
    )
    time.sleep(_shrink.GRACE * 2)
    looked = time.monotonic()
    assert store.claim() is None  # no error: the entry stays where it is
    assert os.listdir(tmp_path / HIDDEN) == [stuck]
    # Looked at again much later, not at every listing.
    assert store._next_leftover_look - looked >= _store._LEFTOVER_STUCK_EVERY - 1
    store.add(b"flows")
    claim = store.claim()
    assert claim is not None
    assert claim.read_bytes() == b"flows"
    trace.faults.clear()
    assert store.clean() == []  # clean() looks at once, whatever the pause
    assert not os.path.lexists(tmp_path / HIDDEN)
    assert os.listdir(tmp_path / "new") == [stuck]


@pytest.mark.parametrize("kind", ["symlink", "fifo", "file", "dir-link"])
def test_nothing_at_the_hidden_name_is_followed(tmp_path: Path, eager: None, kind: str) -> None:
    store = prepared(tmp_path / "s")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "1700000000.M1P1Q1.host").write_bytes(b"not a message of this store")
    hidden = tmp_path / "s" / HIDDEN
    if kind == "symlink":
        hidden.symlink_to(elsewhere)
    elif kind == "fifo":
        os.mkfifo(hidden)
    elif kind == "file":
        hidden.write_bytes(b"x")
    else:
        hidden.symlink_to(tmp_path / "s" / "new")
    before = identity(tmp_path / "s" / "new")
    time.sleep(_shrink.GRACE * 2)
    assert store.claim() is None
    assert store.clean(older_than=0) == []
    assert identity(tmp_path / "s" / "new") == before  # the name is taken: no swap
    assert os.listdir(elsewhere) == ["1700000000.M1P1Q1.host"]
    assert os.path.lexists(hidden)


# -- waiting consumers ----------------------------------------------------------


def test_a_waiter_follows_the_fresh_new_at_once(tmp_path: Path) -> None:
    store = prepared(tmp_path)
    waiter = _watch.Waiter(str(tmp_path / "new"), None, 60.0)  # looks again after 60 s only
    try:
        need(waiter.uses_inotify, "needs inotify")
        assert _shrink.shrink(str(tmp_path), str(tmp_path / "new"), durable=False)
        started = time.monotonic()
        waiter.wait(30)
        assert time.monotonic() - started < 5  # woken by the exchange, not the 60 s look
        store.add(b"into the fresh new/")
        started = time.monotonic()
        waiter.wait(30)
        assert time.monotonic() - started < 5  # watching the fresh directory
    finally:
        waiter.close()


def test_claims_wait_through_a_swap(tmp_path: Path, eager: None) -> None:
    store = prepared(tmp_path)
    with Children() as kids:
        pid = kids.start(lambda: _later_add(tmp_path, b"late"))
        claim = store.claim(wait=20)
        assert claim is not None
        assert claim.read_bytes() == b"late"
        assert exit_code(kids.wait(pid, timeout=20)) == 0


def _later_add(path: Path, data: bytes) -> None:  # pragma: no cover - in a child
    time.sleep(0.3)
    FileStore(path, durable=False).add(data)


# -- producers and consumers running through swaps -------------------------------

PRODUCERS, CONSUMERS, PER_PRODUCER = 2, 2, 300


def _child_store(path: str, caps: Capabilities) -> FileStore:  # pragma: no cover - in a child
    """This child's store on ``caps``, counting the swaps it makes in
    ``swaps[0]``."""
    force_caps(path, caps)
    store = FileStore(path, durable=False)
    store._caps = caps
    real = _shrink.shrink

    def counted(*args: object, **kwargs: object) -> bool:
        swapped = real(*args, **kwargs)  # type: ignore[arg-type]
        swaps[0] += swapped
        return swapped

    _shrink.shrink = counted
    return store


swaps = [0]  # in a child: the swaps it made


def _produce(path: str, caps: Capabilities, index: int, out: Path) -> None:  # pragma: no cover
    store = _child_store(path, caps)
    added = []
    for i in range(PER_PRODUCER):
        ident = index * 100_000 + i
        added.append(ident)
        store.add(payload(ident, os.urandom(i % 64)))
        if i % 20 == 0:
            time.sleep(0.01)  # let the consumers empty new/ now and then
    out.write_text(json.dumps({"added": added}))


def _consume(path: str, caps: Capabilities, done: Path, out: Path) -> None:  # pragma: no cover
    store = _child_store(path, caps)
    got: list[int | None] = []
    idle_since = None
    while True:
        claim = store.claim()
        if claim is None:
            if done.exists():
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since > 4 * _shrink.GRACE + 0.2:
                    break
            time.sleep(0.001)
            continue
        idle_since = None
        got.append(parse(claim.read_bytes()))
        claim.finish()
    out.write_text(json.dumps({"got": got, "swaps": swaps[0]}))


def _swap_forever(path: str, caps: Capabilities, done: Path, out: Path) -> None:  # pragma: no cover
    """Swap new/ whatever it holds, as often as it can: the race of a swap
    with producers and consumers, at its widest."""
    _child_store(path, caps)
    while not done.exists():
        _shrink.finish(path, f"{path}/new", durable=False)  # frees the hidden name
        if _shrink.worth_it(f"{path}/new", lambda: caps):
            _shrink.shrink(path, f"{path}/new", durable=False)
        time.sleep(0.002)
    out.write_text(json.dumps({"swaps": swaps[0]}))


def run_through_swaps(spool: Path, caps_name: str) -> tuple[Counter[int], list[int], int]:
    """Producers, consumers and a swapper at once: (the ids consumed, how
    often each; the ids added; the swaps made)."""
    path = str(spool / "store")
    prepared(Path(path))
    caps = CAPS[caps_name]
    done = spool / "done"
    with Children() as kids:
        producers = [
            kids.start(lambda i=i: _produce(path, caps, i, spool / f"p{i}"))  # type: ignore[misc]
            for i in range(PRODUCERS)
        ]
        others = [
            kids.start(lambda i=i: _consume(path, caps, done, spool / f"c{i}"))  # type: ignore[misc]
            for i in range(CONSUMERS)
        ]
        others.append(kids.start(lambda: _swap_forever(path, caps, done, spool / "s")))
        for pid in producers:
            assert exit_code(kids.wait(pid, timeout=60)) == 0
        done.touch()
        for pid in others:
            assert exit_code(kids.wait(pid, timeout=60)) == 0
    reports = [json.loads(p.read_text()) for p in sorted(spool.glob("[pcs]*")) if p.is_file()]
    added = [i for r in reports for i in r.get("added", [])]
    got: Counter[int] = Counter(i for r in reports for i in r.get("got", []))
    return got, added, sum(r.get("swaps", 0) for r in reports)


@pytest.mark.parametrize("caps_name", list(CAPS))
def test_nothing_lost_or_doubled_through_swaps(tmp_path: Path, eager: None, caps_name: str) -> None:
    got, added, swaps = run_through_swaps(tmp_path, caps_name)
    lost = set(added) - set(got)
    doubled = {i: n for i, n in got.items() if n > 1}
    torn = got[None]  # type: ignore[index]
    store = tmp_path / "store"
    left = {area: sorted(os.listdir(store / area)) for area in ("tmp", "new", "cur")}
    assert (len(lost), doubled, torn) == (0, {}, 0)
    assert left == {"tmp": [], "new": [], "cur": []}
    if os.path.lexists(store / HIDDEN):  # from the last empty look: empty
        assert os.listdir(store / HIDDEN) == []
    time.sleep(_shrink.GRACE * 2)
    assert FileStore(store, durable=False).clean(older_than=0) == []
    assert sorted(os.listdir(store)) == ["cur", "new", "tmp"]
    if caps_name == "native":
        assert swaps >= 5, swaps
    else:
        assert swaps == 0


# -- a rename into an old new/ removed under it ---------------------------------


def test_a_release_into_a_removed_new_tries_the_fresh_one(tmp_path: Path, trace: Recorder) -> None:
    store = prepared(tmp_path)
    store.add(b"m")
    claim = store.claim()
    assert claim is not None
    # As a rename that looked up new/ just before it was swapped and removed.
    trace.fail("renameat2", errno.ENOENT, when=lambda call: "/new/" in str(call.args[1]))
    back = claim.release()
    assert os.path.dirname(back) == str(tmp_path / "new")
    assert Path(back).read_bytes() == b"m"
    assert os.listdir(tmp_path / "cur") == []


def test_an_add_into_a_removed_new_tries_the_fresh_one(tmp_path: Path, trace: Recorder) -> None:
    store = prepared(tmp_path)
    trace.fail("link_fd", errno.ENOENT)
    name = store.add(b"m")
    assert (tmp_path / "new" / name).read_bytes() == b"m"
    assert trace.count("link_fd") == 2


def test_a_release_whose_claim_is_gone_is_still_told(tmp_path: Path) -> None:
    store = prepared(tmp_path)
    store.add(b"m")
    claim = store.claim()
    assert claim is not None
    os.unlink(claim.path)  # finished by another process meanwhile
    with pytest.raises(ClaimLostError):
        claim.release()
