"""atomstore.aio: the same guarantees, awaited, and the loop never blocked.

Each test runs its coroutines with ``asyncio.run``.  What is attacked: that
no system call that changes the disk runs on the loop's thread; that the
loop keeps ticking while messages are awaited, written and claimed; that
waiting uses no thread; and that a cancellation at any moment leaves no
file behind and strands no claim.
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from atomstore import FileStore, _syscalls, aio
from tracing import Recorder

T = TypeVar("T")


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def slowed(trace: Recorder, name: str, when: Any = lambda *args: True) -> threading.Event:
    """Make the boundary call ``name`` sleep 0.3 s (where ``when(*args)``)
    in its thread; the event is set as it starts."""
    started = threading.Event()
    real = getattr(os, name)

    def slow(*args: Any, **kwargs: Any) -> Any:
        if when(*args):
            started.set()
            time.sleep(0.3)
        return real(*args, **kwargs)

    trace.replace[name] = slow
    return started


async def cancelled_once(coroutine: Coroutine[Any, Any, Any], started: threading.Event) -> None:
    """Run ``coroutine`` as a task, cancel it once ``started`` is set, and
    expect it to end cancelled."""
    task = asyncio.create_task(coroutine)
    while not started.is_set():
        await asyncio.sleep(0.005)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def prepared(path: Path, **options: Any) -> aio.AsyncFileStore:
    store = aio.AsyncFileStore(path, durable=False, **options)
    await store.prepare()
    return store


# -- atomic writes ----------------------------------------------------------------


def test_writes_are_atomic_and_refuse_to_clobber(tmp_path: Path) -> None:
    async def main() -> None:
        await aio.write_bytes(tmp_path / "b", b"bytes")
        await aio.write_text(tmp_path / "t", "text")
        async with aio.file(tmp_path / "f", "wb") as f:
            assert await f.write(b"one ") == 4
            await f.writelines([b"two ", b"three"])
            await f.flush()
            assert not (tmp_path / "f").exists()  # not before the block ends
        with pytest.raises(FileExistsError) as info:
            await aio.write_bytes(tmp_path / "b", b"again")
        assert info.value.errno == errno.EEXIST
        await aio.write_bytes(tmp_path / "b", b"again", overwrite=True)

    run(main())
    assert (tmp_path / "f").read_bytes() == b"one two three"
    assert (tmp_path / "b").read_bytes() == b"again"
    assert (tmp_path / "t").read_text() == "text"
    assert sorted(os.listdir(tmp_path)) == ["b", "f", "t"]


def test_a_block_that_raises_publishes_nothing(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("old")

    async def main() -> None:
        async with aio.file(tmp_path / "f", overwrite=True) as f:
            await f.write("new")
            raise RuntimeError("changed my mind")

    with pytest.raises(RuntimeError):
        run(main())
    assert (tmp_path / "f").read_text() == "old"
    assert os.listdir(tmp_path) == ["f"]


def test_a_cancelled_block_publishes_nothing(tmp_path: Path) -> None:
    async def writer(started: asyncio.Event) -> None:
        async with aio.file(tmp_path / "f") as f:
            await f.write("half")
            started.set()
            await asyncio.sleep(60)
            await f.write(" and the rest")

    async def main() -> None:
        started = asyncio.Event()
        task = asyncio.create_task(writer(started))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    before = open_descriptors()
    run(main())
    assert os.listdir(tmp_path) == []
    assert open_descriptors() == before


def test_a_block_cancelled_as_it_opens_leaves_nothing(tmp_path: Path, trace: Recorder) -> None:
    opening = slowed(trace, "open")

    async def writer() -> None:
        async with aio.file(tmp_path / "f") as f:
            await f.write("never")

    before = open_descriptors()
    run(cancelled_once(writer(), opening))
    assert os.listdir(tmp_path) == []
    assert open_descriptors() == before


@pytest.mark.parametrize("moment", ["while writing", "while publishing"])
def test_a_write_cancelled_in_its_thread_is_whole_or_absent(
    tmp_path: Path, trace: Recorder, moment: str
) -> None:
    """The system call under way finishes; then a file being written is
    discarded, one being published (its fsync) is all there, and no
    temporary file is left."""
    started = slowed(trace, "write" if moment == "while writing" else "fsync")
    run(cancelled_once(aio.write_bytes(tmp_path / "f", b"x" * 200_000), started))
    if moment == "while writing":
        assert os.listdir(tmp_path) == []
    else:
        assert os.listdir(tmp_path) == ["f"]
        assert (tmp_path / "f").read_bytes() == b"x" * 200_000


# -- the store -------------------------------------------------------------------


def test_add_claim_read_finish(tmp_path: Path) -> None:
    async def main() -> list[bytes]:
        store = await prepared(tmp_path)
        first = await store.add(b"one")
        await store.add_many([b"two", "three"])
        got = []
        while (claim := await store.claim()) is not None:
            if claim.name == first:
                assert claim.attempts == 0
                assert claim.path.startswith(str(tmp_path / "cur"))
            got.append(await claim.read_bytes())
            await claim.finish()
        return got

    assert run(main()) == [b"one", b"two", b"three"]
    assert os.listdir(tmp_path / "cur") == []


def test_the_same_errors(tmp_path: Path) -> None:
    async def main() -> None:
        store = aio.AsyncFileStore(tmp_path / "never-prepared")
        with pytest.raises(FileNotFoundError):
            await store.add(b"x")
        with pytest.raises(FileNotFoundError):
            await store.claim()
        store = await prepared(tmp_path / "s")
        with pytest.raises(ValueError, match="wait"):
            await store.claim(wait=-1)
        await store.add(b"x")
        claim = await store.claim()
        assert claim is not None
        await claim.finish()
        with pytest.raises(FileNotFoundError):  # ClaimLostError
            await claim.finish()

    run(main())


def test_claim_context_finishes_or_releases(tmp_path: Path) -> None:
    async def main() -> tuple[str, ...]:
        store = await prepared(tmp_path)
        await store.add(b"m")
        claim = await store.claim()
        assert claim is not None
        with pytest.raises(KeyError):
            async with claim:
                raise KeyError("failed")
        again = await store.claim()
        assert again is not None
        assert again.attempts == 1
        async with again:
            pass
        return tuple(os.listdir(tmp_path / "new")) + tuple(os.listdir(tmp_path / "cur"))

    assert run(main()) == ()


def test_a_waiting_claim_is_woken_by_inotify_without_a_thread(tmp_path: Path) -> None:
    """While the claim waits, no executor job runs for longer than a claim
    attempt: the wait is on the loop (inotify as a reader)."""
    jobs: list[float] = []

    async def main() -> tuple[bytes, float]:
        # A poll every 30 s at the most: only inotify wakes it in time.
        store = await prepared(tmp_path, poll_interval=30)
        loop = asyncio.get_running_loop()
        real = loop.run_in_executor

        def timed(executor: Any, func: Any, *args: Any) -> Any:
            def job() -> Any:
                started = time.monotonic()
                try:
                    return func(*args)
                finally:
                    jobs.append(time.monotonic() - started)

            return real(executor, job)

        loop.run_in_executor = timed  # type: ignore[method-assign,assignment]
        loop.call_later(1.0, lambda: FileStore(tmp_path, durable=False).add(b"late"))
        started = time.monotonic()
        claim = await store.claim(wait=30)
        took = time.monotonic() - started
        assert claim is not None
        return await claim.read_bytes(), took

    data, took = run(main())
    assert data == b"late"
    assert 0.9 < took < 1.5  # woken by the add, not by a poll
    assert max(jobs) < 0.5


def test_the_loop_keeps_ticking_and_never_touches_the_disk(tmp_path: Path, trace: Recorder) -> None:
    """A ticker every 5 ms while a consumer waits and claims, producers add
    and write durably: no call through the OS boundary runs on the loop's
    thread, and the loop is never held for long."""
    threads: set[int] = set()
    previous = _syscalls._tracer

    def where(name: str, func: Any, *args: Any, **kwargs: Any) -> Any:
        threads.add(threading.get_ident())
        assert previous is not None
        return previous(name, func, *args, **kwargs)

    _syscalls.set_tracer(where)

    async def main() -> float:
        store = aio.AsyncFileStore(tmp_path / "s")  # durable: fsyncs
        await store.prepare()
        gaps: list[float] = []

        async def ticker() -> None:
            last = time.monotonic()
            while True:
                await asyncio.sleep(0.005)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        async def consumer() -> int:
            count = 0
            async for claim in store.claims(timeout=1.0):
                await claim.read_bytes()
                await claim.finish()
                count += 1
            return count

        async def producer() -> None:
            for i in range(30):
                await store.add(b"%d" % i)
                await aio.write_bytes(tmp_path / f"f{i}", b"x" * 10000)
                async with aio.file(tmp_path / f"g{i}", "wb") as f:
                    await f.write(b"y" * 10000)  # more than a buffer: written at once
                await asyncio.sleep(0.01)

        tick = asyncio.create_task(ticker())
        consumed, _ = await asyncio.gather(consumer(), producer())
        tick.cancel()
        assert consumed == 30
        return max(gaps)

    loop_thread = threading.get_ident()
    try:
        worst = run(main())
    finally:
        _syscalls.set_tracer(previous)
    assert threads  # the calls were seen
    assert loop_thread not in threads
    assert worst < 0.25, f"the loop was held {worst * 1e3:.0f} ms"


def test_a_cancelled_wait_claims_nothing_and_leaks_nothing(tmp_path: Path) -> None:
    async def main() -> None:
        store = await prepared(tmp_path)
        task = asyncio.create_task(store.claim(wait=30))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await store.add(b"after")

    before = open_descriptors()
    run(main())
    assert open_descriptors() == before
    assert os.listdir(tmp_path / "cur") == []
    assert len(os.listdir(tmp_path / "new")) == 1


def test_a_claim_made_as_its_caller_was_cancelled_goes_back(
    tmp_path: Path, trace: Recorder
) -> None:
    """The rename into cur/ is under way in its thread when the caller is
    cancelled: it completes, and the claim is given back uncounted."""
    renaming = slowed(trace, "rename", lambda src, dst: "/cur/" in dst)

    async def main() -> None:
        store = await prepared(tmp_path)
        await store.add(b"m")
        await cancelled_once(store.claim(), renaming)

    run(main())
    assert os.listdir(tmp_path / "cur") == []
    [back] = os.listdir(tmp_path / "new")
    assert ":1,A0" in back or ":" not in back  # no attempt counted


def test_claims_iterates_until_the_timeout(tmp_path: Path) -> None:
    async def main() -> list[bytes]:
        store = await prepared(tmp_path)
        await store.add_many([b"a", b"b"])
        got = []
        started = time.monotonic()
        async for claim in store.claims(timeout=0.3):
            got.append(await claim.read_bytes())
            await claim.finish()
        assert 0.25 < time.monotonic() - started < 5
        return got

    assert run(main()) == [b"a", b"b"]
