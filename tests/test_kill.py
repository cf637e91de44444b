"""SIGKILL a writer at random moments, hundreds of times, and check what it left.

A killed process loses nothing that reached the kernel (the page cache
survives it), so every rename it made is whole: a destination is always the
old or the new version, never torn, and a message is in exactly one place.
What a kill does leave is staging files, which the clean-up removes.

Every version and message describes itself (version, length, SHA-256 of
the body), so a torn or mixed file cannot pass the check.  The child logs
each commit after it returned, with one O_APPEND write, to a file outside
the tested directory: the destination may be one version ahead of the log
(killed between the commit and the log), never behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from atomstore import FileStore, atomic
from atomstore._info import split_info
from kill_harness import KillReport, kill_trials

MAX_SIZE = 300 * 1024


def payload(kind: str, serial: int, size: int, rng: random.Random) -> bytes:
    """A self-describing blob: a header line naming its body's length and hash."""
    body = rng.randbytes(size)
    digest = hashlib.sha256(body).hexdigest()
    return f"{kind} {serial} {size} {digest}\n".encode() + body


def verify(data: bytes, kind: str) -> int:
    """The serial number of an intact blob; AssertionError for a torn one."""
    header, newline, body = data.partition(b"\n")
    fields = header.decode("ascii", "replace").split(" ")
    assert newline, f"torn header {header[:80]!r}"
    assert len(fields) == 4, f"torn header {header[:80]!r}"
    assert fields[0] == kind, f"torn header {header[:80]!r}"
    assert len(body) == int(fields[2]), f"{kind} {fields[1]}: {len(body)} bytes, not {fields[2]}"
    assert hashlib.sha256(body).hexdigest() == fields[3], f"{kind} {fields[1]}: wrong checksum"
    return int(fields[1])


def any_size(rng: random.Random) -> int:
    """1 byte to 300 KiB, spread evenly over the orders of magnitude."""
    return min(MAX_SIZE, int(2 ** rng.uniform(0, 18.2)))


class Log:
    """A journal of what a killed child had done, one O_APPEND write per line."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, *words: object) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (" ".join(map(str, words)) + "\n").encode())
        finally:
            os.close(fd)

    def lines(self) -> Iterator[list[str]]:
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                yield line.split(" ")


def staging_left(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.startswith("."))


def _report(what: str, report: KillReport, **figures: object) -> None:
    shown = ", ".join(f"{k} {v}" for k, v in figures.items())
    print(f"\n{what}: {report.trials} trials, {report.killed} killed, {shown}")


# -- atomic.file ----------------------------------------------------------------


@pytest.mark.slow
def test_killed_file_writer_leaves_old_or_new(tmp_path: Path) -> None:
    work, log = tmp_path / "work", Log(tmp_path / "commits")
    work.mkdir()
    dest = work / "state"
    counts = {"staging left": 0, "committed": 0, "versions": 0}

    def current() -> int:
        return verify(dest.read_bytes(), "version") if dest.exists() else 0

    def writer(trial: int) -> None:
        rng = random.Random(trial)
        version = current()
        while True:
            version += 1
            data = payload("version", version, any_size(rng), rng)
            if version % 2:
                with atomic.file(dest, "wb", overwrite=True) as f:
                    for start in range(0, len(data), 65536):
                        f.write(data[start : start + 65536])
            else:
                atomic.write_bytes(dest, data, overwrite=True)
            log.write(version)

    def check(trial: int) -> None:
        logged = max((int(line[0]) for line in log.lines()), default=0)
        if dest.exists():
            version = verify(dest.read_bytes(), "version")
            assert version in (logged, logged + 1), f"version {version}, last logged {logged}"
            log.write(version)  # committed, whether or not the child logged it
            counts["committed"] += version > counts["versions"]
            counts["versions"] = version
        else:
            assert logged == 0, "the destination vanished after a commit"
        counts["staging left"] += bool(staging_left(work))
        removed = atomic.clean(work, older_than=0)
        assert len(removed) <= 1  # one writer: one temporary file at most
        assert os.listdir(work) == (["state"] if dest.exists() else [])

    report = kill_trials(writer, check, trials=500, seed=4, max_delay=0.02)
    _report("atomic.file", report, **counts)
    assert report.killed == report.trials
    assert counts["staging left"] > 0, "no kill landed while a temporary file existed"
    assert counts["committed"] > 0, "no child lived long enough to commit"


# -- atomic.folder --------------------------------------------------------------


def write_tree(where: Path, version: int, rng: random.Random) -> None:
    """A tree of 1 to 6 files in up to 3 directories, and a manifest of it."""
    manifest = {}
    for n in range(rng.randint(1, 6)):
        relative = f"d{n % 3}/f{n}" if n % 2 else f"f{n}"
        (where / relative).parent.mkdir(exist_ok=True)
        (where / relative).write_bytes(payload("file", version, any_size(rng) // 8, rng))
        manifest[relative] = hashlib.sha256((where / relative).read_bytes()).hexdigest()
    (where / "manifest").write_text(json.dumps({"version": version, "files": manifest}))


def read_tree(site: Path) -> int:
    """The version of a complete tree; AssertionError for anything else."""
    manifest = json.loads((site / "manifest").read_text())
    found = {
        str(p.relative_to(site)) for p in site.rglob("*") if p.is_file() and p.name != "manifest"
    }
    assert found == set(manifest["files"]), f"files {sorted(found)}, manifest {manifest}"
    for relative, digest in manifest["files"].items():
        data = (site / relative).read_bytes()
        assert verify(data, "file") == manifest["version"], f"{relative} of another version"
        assert hashlib.sha256(data).hexdigest() == digest
    version: int = manifest["version"]
    return version


@pytest.mark.slow
def test_killed_folder_writer_leaves_old_or_new_tree(tmp_path: Path) -> None:
    work, log = tmp_path / "work", Log(tmp_path / "commits")
    work.mkdir()
    site = work / "site"
    counts = {"staging left": 0, "committed": 0, "versions": 0}

    def writer(trial: int) -> None:
        rng = random.Random(trial)
        version = read_tree(site) if site.exists() else 0
        while True:
            version += 1
            # A kill waits for an fsync in progress, and a durable tree takes
            # one per file and directory: without some quick versions few
            # kills would land after the exchange.
            durable = rng.random() < 0.3
            with atomic.folder(site, overwrite=True, durable=durable) as staging:
                write_tree(staging, version, rng)
            log.write(version)

    def check(trial: int) -> None:
        logged = max((int(line[0]) for line in log.lines()), default=0)
        if site.exists():
            version = read_tree(site)
            assert version in (logged, logged + 1), f"version {version}, last logged {logged}"
            log.write(version)  # committed, whether or not the child logged it
            counts["committed"] += version > counts["versions"]
            counts["versions"] = version
        else:
            assert logged == 0, "the tree vanished after a commit"
        counts["staging left"] += bool(staging_left(work))
        atomic.clean(work, older_than=0)
        assert os.listdir(work) == (["site"] if site.exists() else [])

    report = kill_trials(writer, check, trials=500, seed=5, max_delay=0.02)
    _report("atomic.folder", report, **counts)
    assert report.killed == report.trials
    assert counts["staging left"] > 0, "no kill landed while a staging tree existed"
    assert counts["committed"] > 0, "no child lived long enough to commit"


# -- FileStore ------------------------------------------------------------------


@pytest.mark.slow
def test_killed_producer_and_consumer_lose_nothing(tmp_path: Path) -> None:
    """One child adds checksummed messages and claims, finishes or releases them.

    After each kill: every file in new/ and cur/ is a complete message; no
    message is in two places; every message whose add() returned and that
    was not finished is there; nothing else is.  recover() then returns the
    dead child's claims and clean() leaves no staging file.
    """
    log = Log(tmp_path / "journal")
    store = FileStore(tmp_path / "store", durable=False)  # the checker's: no machine crash
    store.prepare()
    known: set[str] = set()  # delivered, not finished
    verified: set[tuple[str, int]] = set()
    counts = {"claims recovered": 0, "tmp left": 0, "finished": 0, "delivered": 0}

    def worker(trial: int) -> None:
        rng = random.Random(trial)
        child = FileStore(tmp_path / "store")
        serial = 0
        while True:
            if rng.random() < 0.55:
                serial += 1
                name = child.add(payload("message", serial, any_size(rng) // 4, rng))
                log.write(trial, "added", name)
                continue
            claim = child.claim()
            if claim is None:
                continue
            verify(claim.read_bytes(), "message")
            if rng.random() < 0.8:
                log.write(trial, "finishing", claim.name)
                claim.finish()
                log.write(trial, "finished", claim.name)
            else:
                claim.release()

    def check(trial: int) -> None:
        finishing: str | None = None
        events = [line[1:] for line in log.lines() if int(line[0]) == trial]
        for event, name in events:
            if event == "added":
                known.add(name)
                counts["delivered"] += 1
            elif event == "finishing":
                finishing = name
            else:
                known.discard(name)
                finishing = None
                counts["finished"] += 1
        places: dict[str, list[str]] = {}
        for area in ("new", "cur"):
            for name in os.listdir(tmp_path / "store" / area):
                if name.startswith("."):
                    continue
                path = tmp_path / "store" / area / name
                base = split_info(name)[0]
                # A published message is never written again, only renamed.
                if (base, path.stat().st_ino) not in verified:
                    verify(path.read_bytes(), "message")
                    verified.add((base, path.stat().st_ino))
                places.setdefault(base, []).append(f"{area}/{name}")
        twice = {m: p for m, p in places.items() if len(p) > 1}
        assert not twice, f"messages in two places: {twice}"
        unknown = set(places) - known
        # Killed after an add() made its rename, before the journal line.
        assert len(unknown) <= 1, f"messages nobody added: {unknown}"
        known.update(unknown)
        if finishing is not None and finishing not in places:
            known.discard(finishing)  # killed after finish() removed it
        missing = known - set(places)
        assert not missing, f"messages lost: {missing}; trial {trial}: {events}; {places}"
        counts["tmp left"] += bool(os.listdir(tmp_path / "store" / "tmp"))
        counts["claims recovered"] += len(store.recover(older_than=0))
        store.clean(older_than=0)
        assert os.listdir(tmp_path / "store" / "tmp") == []
        assert os.listdir(tmp_path / "store" / "cur") == []
        left = [n for n in os.listdir(tmp_path / "store" / "new") if n.startswith(".")]
        assert left == []
        assert {split_info(n)[0] for n in os.listdir(tmp_path / "store" / "new")} == known

    report = kill_trials(worker, check, trials=500, seed=6, max_delay=0.02)
    _report("FileStore", report, **counts)
    assert report.killed == report.trials
    assert counts["claims recovered"] > 0, "no kill landed while a claim was held"
    assert counts["tmp left"] > 0, "no kill landed while a message was being written"
