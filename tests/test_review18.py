"""What an adversarial review of the asyncio API, logging, the command's
``-v`` and the API reference found.

Each test failed on the reviewed code.  Fixed: a write or add cancelled
while written was published anyway; a logging handler that used atomstore
deadlocked on the probe's lock; waiting made filesystem calls on the loop's
thread (a stalled network mount held the loop); a cancelled ``async with
claim`` block whose claim was lost ended in ClaimLostError; the aio methods
were missing from the API reference; ``-v`` counts given before and after
the command's name did not add up.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest

from atomstore import FileStore, _cli, _rename, aio
from test_aio import cancelled_once, slowed
from tracing import Recorder

ROOT = Path(__file__).resolve().parent.parent


def _cancel_while_writing(trace: Recorder, coro_factory: Any) -> None:
    asyncio.run(cancelled_once(coro_factory(), slowed(trace, "write")))


def test_write_bytes_cancelled_while_writing_is_discarded(tmp_path: Path, trace: Recorder) -> None:
    """README: 'A cancellation leaves nothing behind: a file being written is
    discarded'.  It is published instead, after CancelledError was raised."""
    _cancel_while_writing(trace, lambda: aio.write_bytes(tmp_path / "f", b"x" * 100))
    assert os.listdir(tmp_path) == []


def test_add_cancelled_while_writing_is_discarded(tmp_path: Path, trace: Recorder) -> None:
    """AsyncFileStore.add: 'Cancelled while the message is written, it is
    discarded'.  It is delivered, and the caller never learns its name."""
    store = FileStore(tmp_path, durable=False)
    store.prepare()
    astore = aio.AsyncFileStore(tmp_path, durable=False)
    _cancel_while_writing(trace, lambda: astore.add(b"m"))
    assert os.listdir(tmp_path / "new") == []


def test_cancelled_claim_block_ends_cancelled_even_if_the_claim_was_lost(tmp_path: Path) -> None:
    async def main() -> asyncio.Task[None]:
        store = aio.AsyncFileStore(tmp_path, durable=False)
        await store.prepare()
        await store.add(b"job")
        claim = await store.claim()
        assert claim is not None

        async def handler() -> None:
            async with claim:
                await asyncio.sleep(10)

        task = asyncio.create_task(handler())
        await asyncio.sleep(0.05)
        await store.recover(0)  # the lease ran out meanwhile
        task.cancel()
        await asyncio.wait([task])
        return task

    task = asyncio.run(main())
    assert task.cancelled(), f"ended with {task.exception()!r}"


def test_a_log_handler_that_uses_atomstore_does_not_deadlock() -> None:
    """_rename.capabilities() logs while holding its non-reentrant lock."""
    side = FileStore(tempfile.mkdtemp(dir="/dev/shm"), durable=False)  # another device
    side.prepare()
    main = FileStore(tempfile.mkdtemp(dir="/tmp"), durable=False)
    main.prepare()

    class Forward(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            side.add(self.format(record))
            claim = side.claim()
            assert claim is not None
            claim.release(count_attempt=False)

    logger = logging.getLogger("atomstore")
    handler, level = Forward(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    _rename.forget()  # nothing probed yet (a fresh lock too)

    def work() -> None:
        main.add(b"job")
        claim = main.claim()
        assert claim is not None
        claim.release()

    thread = threading.Thread(target=work, daemon=True)
    try:
        thread.start()
        thread.join(10)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    deadlocked = thread.is_alive()
    if deadlocked:
        _rename.forget()  # let the other tests run (the daemon thread stays stuck)
    assert not deadlocked, "deadlocked in _rename.capabilities"


@pytest.mark.parametrize(
    "argv", [["-v", "stat", "-v", "D"], ["-vv", "stat", "-v", "D"], ["-v", "stat", "-vv", "D"]]
)
def test_verbose_flags_add_up_wherever_they_are(argv: list[str]) -> None:
    """'-v ... twice for more': flags before and after the command are
    not added; the command's own -v replaces the count given before it."""
    args = _cli.build_parser().parse_args(argv)
    assert _cli.verbosity(args) == sum(a.count("v") for a in argv if a.startswith("-"))


def test_every_public_aio_method_is_in_the_api_reference(tmp_path: Path) -> None:
    """api.rst uses :members: without :undoc-members:; aio's methods without
    docstrings (AsyncClaim.read_bytes/finish/release/renew, AsyncFileStore.
    prepare/recover/clean/stats, AsyncFile.flush/writelines) are left out.
    Sphinx is the docs env's: it runs this test (tox.ini)."""
    pytest.importorskip("sphinx", reason="Sphinx is installed in the docs env, which runs this")
    out = tmp_path / "html"
    subprocess.run(
        [sys.executable, "-m", "sphinx", "-q", "-b", "html", str(ROOT / "docs"), str(out)],
        check=True,
        capture_output=True,
    )
    html = (out / "api.html").read_text(encoding="utf-8")
    missing = []
    for cls in (aio.AsyncClaim, aio.AsyncFileStore, aio.AsyncFile):
        for name in vars(cls):
            if not name.startswith("_") and callable(getattr(cls, name)):
                anchor = f'id="atomstore.aio.{cls.__name__}.{name}"'
                if anchor not in html:
                    missing.append(f"{cls.__name__}.{name}")
    assert missing == []


def test_waiting_makes_no_filesystem_call_on_the_loop_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README: 'the loop is never held by more than a small system call'.
    On NFS/FUSE a stat can hang; the Waiter is built (stat, realpath's
    lstats, inotify_add_watch, /proc/self/mountinfo) and followed (stat
    after every wake) on the loop's thread.  repro_loop_blocked_remote.py
    shows an 11 s stall on a FUSE filesystem answering getattr in 1 s."""
    seen: list[str] = []
    real_stat = os.stat

    def stat(path: Any, *args: Any, **kwargs: Any) -> Any:
        if str(path).startswith(str(tmp_path)) and threading.current_thread() is loop_thread:
            seen.append(str(path))
        return real_stat(path, *args, **kwargs)

    async def main() -> None:
        store = aio.AsyncFileStore(tmp_path, durable=False)
        await store.prepare()
        monkeypatch.setattr(os, "stat", stat)
        await store.claim(wait=0.2)

    loop_thread = threading.current_thread()
    asyncio.run(main())
    assert seen == []
