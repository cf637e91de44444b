"""One host of the multi-host tests: mount the file server, run the jobs.

``tests/multihost.py`` starts this script inside a host's network, UTS and
PID namespaces as ``python multihost_worker.py SPEC.json``.  It names the
host, forks one process per job (before mounting, so that the job processes
get the same small pids on every host), mounts the shared filesystem with
the engine's client, says it is ready, and lets the jobs start when the test says go.
Each job writes its result as JSON to the test's local disk; the mounts are
released when the jobs are done.

A mount made here lives in this process's mount namespace only: whatever
uses the store must run below this process.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import traceback
from typing import Any, Callable

from atomstore import FileStore, _syscalls, _watch, atomic
from atomstore._renameat2 import RENAME_EXCHANGE, RENAME_NOREPLACE

Spec = dict[str, Any]
Result = dict[str, Any]

_MOUNT_TIMEOUT = 20.0
_GO_TIMEOUT = 120.0
_PAUSE_AFTER_ERROR = 0.05


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def message(ident: str, body: bytes) -> bytes:
    """A message that carries its own id and the checksum of its body."""
    return f"{ident} {digest(body)}\n".encode() + body


def parse(data: bytes) -> tuple[str, bool]:
    """The id a message carries and whether its body matches its checksum."""
    header, _, body = data.partition(b"\n")
    ident, _, checksum = header.decode("ascii", "replace").partition(" ")
    return ident, digest(body) == checksum


def flagged(path: str | None) -> bool:
    return path is not None and os.path.exists(path)


def wait_for(path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {path} after {timeout} s")
        time.sleep(0.01)


class Errors:
    """The OSErrors a job met: what, errno, and how long the call took; and
    the calls that took a second or more (when they started, how long)."""

    SLOW = 1.0

    def __init__(self) -> None:
        self.records: list[list[Any]] = []
        self.slowest = 0.0
        self.slow: list[tuple[float, float]] = []

    def timed(self, started: float) -> float:
        elapsed = time.monotonic() - started
        self.slowest = max(self.slowest, elapsed)
        if elapsed >= self.SLOW:
            self.slow.append((started, elapsed))
        return elapsed

    def add(self, op: str, error: OSError, started: float, ident: str = "") -> None:
        elapsed = self.timed(started)
        self.records.append([op, error.errno, str(error), started, elapsed, ident])
        time.sleep(_PAUSE_AFTER_ERROR)  # a dead link fails fast: do not spin


class Calls:
    """Counts the calls through atomstore's OS boundary, and their errnos."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.log: list[str] | None = None

    def __call__(self, name: str, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            result = func(*args, **kwargs)
        except OSError as e:
            key = f"{name}:{errno.errorcode.get(e.errno or 0, e.errno)}"
            self._count(key)
            raise
        self._count(name)
        return result

    def _count(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1
        if self.log is not None:
            self.log.append(key)

    def recording(self) -> list[str]:
        self.log = []
        return self.log


# -- jobs -------------------------------------------------------------------


def produce(store: FileStore, job: Spec) -> Result:
    """Add ``count`` checksummed messages, or add until the stop flag."""
    rng = random.Random(job["seed"])
    count, stop, size = job.get("count"), job.get("stop"), job.get("size", 256)
    deadline = time.monotonic() + job["max_seconds"]
    published: list[list[str]] = []
    errors = Errors()
    seq = 0
    while (count is None or seq < count) and not flagged(stop):
        if time.monotonic() > deadline:
            return {"timed_out": True}
        ident = f"{job['name']}/{seq}"
        data = message(ident, rng.getrandbits(8 * size).to_bytes(size, "little"))
        seq += 1
        started = time.monotonic()
        try:
            name = store.add(data)
        except OSError as e:
            errors.add("add", e, started, ident)
            continue
        errors.timed(started)
        published.append([ident, name, digest(data)])
    return {
        "published": published,
        "attempted": seq,
        "errors": errors.records,
        "slowest": errors.slowest,
        "slow": errors.slow,
        "pid": os.getpid(),
        "timed_out": False,
    }


def consume(store: FileStore, job: Spec) -> Result:
    """Claim, read, check and finish messages until the stop flag is up.

    A delivery is recorded once the message was read: ``[id, name, sha256,
    body intact, attempts, errno of finish() or None]``.
    """
    stop, wait = job.get("stop"), job.get("wait", 0.2)
    deadline = time.monotonic() + job["max_seconds"]
    delivered: list[list[Any]] = []
    errors = Errors()
    calls = Calls()
    _syscalls.set_tracer(calls)
    while True:
        if time.monotonic() > deadline:
            return {"timed_out": True}
        started = time.monotonic()
        try:
            claim = store.claim(wait=wait, oldest=job.get("oldest", True))
        except OSError as e:
            errors.add("claim", e, started)
            continue
        if claim is None:
            if flagged(stop):
                break
            continue
        try:
            data = claim.read_bytes()
        except OSError as e:
            errors.add("read", e, started, claim.name)
            continue
        ident, intact = parse(data)
        finish_error = None
        try:
            claim.finish()
        except OSError as e:
            errors.add("finish", e, started, ident)
            finish_error = e.errno
        else:
            errors.timed(started)
        delivered.append([ident, claim.name, digest(data), intact, claim.attempts, finish_error])
    _syscalls.set_tracer(None)
    return {
        "delivered": delivered,
        "errors": errors.records,
        "slowest": errors.slowest,
        "slow": errors.slow,
        # A claim's rename that found its source gone: another consumer won.
        "lost_races": calls.counts.get("rename:ENOENT", 0),
        "timed_out": False,
    }


def drain(store: FileStore, job: Spec) -> Result:
    """After the faults: return orphaned claims, remove leftovers, consume."""
    leftovers = sorted(os.listdir(os.path.join(store.path, "tmp")))
    recovered = [os.path.basename(p) for p in store.recover(older_than=0)]
    cleaned = [os.path.basename(p) for p in store.clean(older_than=0)]
    result = consume(store, job)
    result.update(recovered=recovered, cleaned=cleaned, tmp_leftovers=leftovers)
    return result


def wait_for_others(store: FileStore, job: Spec) -> Result:
    """Block in claim(wait=...) while another host adds; time each arrival.

    First an inotify-only waiter (its poll interval set beyond the test)
    waits while the other host adds a message: inotify sees nothing of it.
    """
    flags, rounds = job["flags"], job["rounds"]
    new_dir = os.path.join(store.path, "new")
    with _watch.Waiter(new_dir, 3600.0, 3600.0) as blind:
        atomic.write_text(os.path.join(flags, "ready-0"), "")
        blind_from = time.monotonic()
        blind.wait(job["blind_wait"])
        blind_until = time.monotonic()
        blind_uses_inotify = blind.uses_inotify
    first = store.claim()  # the round-0 message, now seen by a listing
    arrivals: list[list[Any]] = []
    with store._waiter() as waiter:
        poll_interval = waiter.poll_interval
        uses_inotify = waiter.uses_inotify
    for r in range(1, rounds + 1):
        atomic.write_text(os.path.join(flags, f"ready-{r}"), "")
        claim = store.claim(wait=job["wait"])
        got = time.monotonic()
        if claim is None:
            arrivals.append([r, None, got])
            continue
        arrivals.append([r, claim.name, got])
        claim.finish()
    if first is not None:
        first.finish()
    return {
        "filesystem": _watch.filesystem_type(store.path),
        "remote": _watch.is_remote(new_dir),
        "poll_interval": poll_interval,
        "uses_inotify": uses_inotify,
        "blind_uses_inotify": blind_uses_inotify,
        "blind": [blind_from, blind_until],
        "first": None if first is None else first.name,
        "arrivals": arrivals,
    }


def add_when_ready(store: FileStore, job: Spec) -> Result:
    """Add one message per round once the other host waits for it."""
    rng = random.Random(job["seed"])
    added = []
    for r in range(job["rounds"] + 1):
        wait_for(os.path.join(job["flags"], f"ready-{r}"), job["max_seconds"])
        # Let the waiter make its first listing and block before the add.
        time.sleep(rng.uniform(0.2, 0.6))
        name = store.add(f"round {r}".encode())
        added.append([r, name, time.monotonic()])
    return {"added": added}


def read(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode()


def probe(store: FileStore, job: Spec) -> Result:
    """What the mount supports, and no-clobber renames through it."""
    scratch = store.path + "-scratch"
    os.mkdir(scratch)
    a, b, c = (os.path.join(scratch, n) for n in "abc")
    atomic.write_bytes(a, b"A")
    atomic.write_bytes(b, b"B")
    raw = {}
    for target, label in ((b, "existing"), (c, "absent")):
        for flag, flag_name in ((RENAME_NOREPLACE, "noreplace"), (RENAME_EXCHANGE, "exchange")):
            try:
                _syscalls.renameat2(a, target, flag)
            except OSError as e:
                raw[f"{flag_name} onto {label}"] = errno.errorcode.get(e.errno or 0, "?")
            else:  # pragma: no cover - sshfs refuses every flag
                raw[f"{flag_name} onto {label}"] = "ok"
    caps = atomic.capabilities(c)
    refused = {}
    try:
        atomic.rename(a, b)
    except OSError as e:
        refused["rename"] = e.errno

    store.prepare()
    calls = Calls()
    _syscalls.set_tracer(calls)
    add_calls = calls.recording()
    name = store.add(b"first")
    move_calls = calls.recording()
    with store.create(name) as f:  # the same name once more, in tmp/
        f.write("second")
    try:
        store.move(name, "tmp", "new")
    except OSError as e:
        refused["move"] = e.errno
    claim_calls = calls.recording()
    claim = store.claim()
    release_calls = calls.recording()
    back = None if claim is None else os.path.basename(claim.release())
    calls.log = None
    _syscalls.set_tracer(None)
    again = store.claim()
    got = None if again is None else again.read_bytes().decode()
    if again is not None:
        again.finish()
    in_tmp = read(os.path.join(store.path, "tmp", name))
    store.remove(name, "tmp")
    return {
        "raw": raw,
        "capabilities": [caps.noreplace, caps.exchange, caps.hardlinks, caps.ignores_flags],
        "scratch": {n: read(os.path.join(scratch, n)) for n in sorted(os.listdir(scratch))},
        "refused": refused,
        "add_calls": add_calls,
        "move_calls": move_calls,
        "claim_calls": claim_calls,
        "release_calls": release_calls,
        "name": name,
        "back": back,
        "got": got,
        "in_tmp": in_tmp,
        "left": sorted(
            f"{area}/{n}"
            for area in ("tmp", "new", "cur")
            for n in os.listdir(store.path + "/" + area)
        ),
    }


def meet(job: Spec, number: int) -> None:
    """Wait for every host's job to reach round ``number``: a barrier of
    flag files in ``job["barrier"]``, one directory per round."""
    barrier = os.path.join(job["barrier"], str(number))
    os.makedirs(barrier, exist_ok=True)
    atomic.write_text(os.path.join(barrier, job["name"].replace("/", "_")), "", overwrite=True)
    deadline = time.monotonic() + 60
    while len(os.listdir(barrier)) < job["parties"]:
        if time.monotonic() > deadline:
            raise TimeoutError(f"round {number}: the other hosts did not come")
        time.sleep(0.001)


def unlinks(store: FileStore, job: Spec) -> Result:
    """Remove ``f-<round>`` beside ``store`` in each round, at once with the
    other hosts; return each round's answer ("ok" or the errno's name)."""
    answers = []
    for number in range(job["rounds"]):
        meet(job, number)
        try:
            os.unlink(os.path.join(os.path.dirname(store.path), f"f-{number}"))
        except OSError as e:
            answers.append(errno.errorcode.get(e.errno or 0, str(e.errno)))
        else:
            answers.append("ok")
    return {"answers": answers}


def race(store: FileStore, job: Spec) -> Result:
    """Run one side of each round of same-operation races (``test_races``).

    Each round names a store below ``store`` and what to do there; the jobs
    of every host start a round together, at a barrier of flag files.
    """
    import test_races  # the jobs and records of the one-machine races

    ops: dict[str, Callable[..., list[test_races.Record]]] = {
        "recover": lambda ids, names, s: test_races.recover_job(ids, s),
        "release": test_races.release_job,
        "finish": test_races.finish_job,
        "requeue": test_races.requeue_job,
    }
    rounds = []
    for number, spec in enumerate(job["rounds"]):
        target = FileStore(
            os.path.join(os.path.dirname(store.path), spec["store"]),
            max_attempts=spec["max_attempts"],
        )
        meet(job, number)
        records = ops[spec["op"]](spec["ids"], spec["names"], target)
        rounds.append([r.to_json() for r in records])
    return {"rounds": rounds}


def atomic_writes(store: FileStore, job: Spec) -> Result:
    """Write the same names as the other hosts, with atomic's no-clobber
    calls; between them replace one file and read it back, checking each
    read is one writer's whole file.

    ``store`` names the shared directory (no store is made there).
    """
    shared, me = store.path, job["name"]
    mine = os.path.join(shared, f".sources-{me.replace('/', '_')}")
    os.makedirs(mine, exist_ok=True)
    rng = random.Random(job["seed"])
    won: dict[str, bool] = {}
    reads = 0
    torn: list[int] = []  # the sizes of reads that were not one writer's whole file
    failed: collections.Counter[str] = collections.Counter()
    for n in range(job["rounds"]):
        body = f"{me} {n}".encode()
        source = os.path.join(mine, f"renamed-{n}")
        atomic.write_bytes(source, message(me, body), overwrite=True)
        attempts: list[tuple[str, Callable[[], object]]] = [
            (
                f"file-{n}",
                functools.partial(atomic.write_bytes, f"{shared}/file-{n}", message(me, body)),
            ),
            (f"folder-{n}", functools.partial(_fill_folder, f"{shared}/folder-{n}", me, body)),
            (f"renamed-{n}", functools.partial(atomic.rename, source, f"{shared}/renamed-{n}")),
        ]
        for name, attempt in attempts:
            try:
                attempt()
            except FileExistsError:
                won[name] = False
            else:
                won[name] = True
        big = rng.randbytes(64 * 1024)
        atomic.write_bytes(f"{shared}/replaced", message(f"{me}/{n}", big), overwrite=True)
        for _ in range(3):
            try:
                with open(f"{shared}/replaced", "rb") as f:
                    data = f.read()
            except OSError as e:
                failed[errno.errorcode.get(e.errno or 0, str(e.errno))] += 1
                continue
            reads += 1
            if not parse(data)[1]:
                torn.append(len(data))
    return {"won": won, "reads": reads, "torn": torn, "failed": dict(failed)}


def _fill_folder(path: str, me: str, body: bytes) -> None:
    with atomic.folder(path) as staging:
        for part in ("a", "b"):
            (staging / part).write_bytes(message(me, body + part.encode()))


def bench(store: FileStore, job: Spec) -> Result:
    """Produce or consume ``count`` messages of ``size`` bytes with atomstore
    or with dirq's QueueSimple (``library``), timed (benchmarks/bench_hosts.py)."""
    count, body = job["count"], b"x" * job["size"]
    started = time.monotonic()
    done = 0
    if job["library"] == "dirq":
        import importlib  # dirq ships no types

        queue = importlib.import_module("dirq.QueueSimple").QueueSimple(store.path)
        if job["side"] == "produce":
            for _ in range(count):
                queue.add(body)
        else:
            while done < count:
                for name in queue:
                    if queue.lock(name):
                        queue.get(name)
                        queue.remove(name)
                        done += 1
    elif job["side"] == "produce":
        for _ in range(count):
            store.add(body)
    else:
        while done < count:
            claim = store.claim(wait=1.0)
            if claim is not None:
                claim.read_bytes()
                claim.finish()
                done += 1
    return {"started": started, "ended": time.monotonic()}


JOBS: dict[str, Callable[[FileStore, Spec], Result]] = {
    "produce": produce,
    "consume": consume,
    "drain": drain,
    "wait_for_others": wait_for_others,
    "add_when_ready": add_when_ready,
    "probe": probe,
    "race": race,
    "unlinks": unlinks,
    "atomic_writes": atomic_writes,
    "bench": bench,
}


# -- the host ---------------------------------------------------------------


def run_job(job: Spec, go: str) -> None:
    """The body of a job's process: wait for go, run, write the result."""
    wait_for(go, _GO_TIMEOUT)
    store = FileStore(job["store"], **job.get("options", {}))
    if job.get("prepare"):
        store.prepare()
    started = time.monotonic()
    result = JOBS[job["role"]](store, job)
    result["seconds"] = time.monotonic() - started
    result["hostname"] = socket.gethostname()
    atomic.write_text(job["result"], json.dumps(result), overwrite=True)


def fork_jobs(jobs: list[Spec], go: str) -> dict[int, Spec]:
    children = {}
    for job in jobs:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the job's process
            status = 0
            try:
                run_job(job, go)
            except BaseException:
                traceback.print_exc()
                status = 70
            finally:
                sys.stderr.flush()
                os._exit(status)
        children[pid] = job
    return children


def mount(spec: Spec) -> subprocess.Popen[bytes]:
    """Run the engine's client, which mounts at spec["path"] in the foreground.

    The client's pid is from a range of this host's own: the hosts share
    ``/tmp``, where a client may name a file by its pid (JuiceFS's
    ``/tmp/fuse_fd_comm.<pid>``), and their pid namespaces give the same pids.
    """
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write(str(spec["pids_from"]))
    spec["pids_from"] += 100
    log = open(spec["log"], "ab")  # noqa: SIM115 - the child keeps it
    # A group of its own: a client may serve the mount from a child of the
    # process started (JuiceFS supervises its mount process).
    process = subprocess.Popen(
        spec["command"],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    log.close()
    deadline = time.monotonic() + _MOUNT_TIMEOUT
    while not os.path.ismount(spec["path"]):
        if process.poll() is not None:
            raise OSError(errno.EIO, f"the client exited with {process.returncode}", spec["path"])
        if time.monotonic() > deadline:
            process.kill()
            raise TimeoutError(f"{spec['path']} not mounted in {_MOUNT_TIMEOUT} s")
        time.sleep(0.02)
    return process


def unmount(path: str, process: subprocess.Popen[bytes]) -> None:
    subprocess.run(["umount", path], check=False)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        subprocess.run(["umount", "-l", path], check=False)


def kill_and_remount(spec: Spec, process: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
    """Kill the client (SIGKILL), leave its dead mount for a while, mount again.

    Until the new mount, the jobs' calls fail with ENOTCONN: a FUSE mount
    whose client died answers so.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # the whole client, children too
    process.wait()
    time.sleep(spec.get("down", 1.0))
    subprocess.run(["umount", "-l", spec["path"]], check=False)
    again = mount(spec)
    atomic.write_text(spec["remounted"], "", overwrite=True)
    return again


def reap(children: dict[int, Spec], mounted: list[tuple[Spec, subprocess.Popen[bytes]]]) -> int:
    """Wait for the jobs (and for orphans handed to this pid 1): 0 if all passed.

    Meanwhile a mount's ``kill`` flag kills its client and mounts it again.
    """
    failed = 0
    while children:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            for i, (spec, process) in enumerate(mounted):
                if flagged(spec["kill"]) and not flagged(spec["remounted"]):
                    mounted[i] = (spec, kill_and_remount(spec, process))
            time.sleep(0.02)
        elif children.pop(pid, None) is not None and status != 0:
            failed = 1
    return failed


def main(argv: list[str]) -> int:
    with open(argv[1], encoding="utf-8") as f:
        spec = json.load(f)
    socket.sethostname(spec["hostname"])
    children = fork_jobs(spec["jobs"], spec["go"])
    mounted: list[tuple[Spec, subprocess.Popen[bytes]]] = []
    try:
        for mount_spec in spec["mounts"]:
            mounted.append((mount_spec, mount(mount_spec)))
        atomic.write_text(spec["ready"], "")
        return reap(children, mounted)
    finally:
        for mount_spec, process in reversed(mounted):
            unmount(mount_spec["path"], process)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
