"""atomstore's benchmarks, side by side with hand-written sequences and the peers.

Install atomstore and the peers first (``pip install -e '.[bench]'``, or the
peers by name as docs/benchmarks.rst lists them); a peer that is missing
shows as "not installed" and the rest still runs.  ``strace`` counts the
peers' fsyncs.  Then, from the repository's root::

    python benchmarks/run.py                  # everything, 2 to 5 minutes
    python benchmarks/run.py --quick          # everything, under a minute, rougher
    python benchmarks/run.py write-tmpfs --quick
    python benchmarks/run.py store backlog --rounds 9
    python benchmarks/run.py profile          # where atomstore's time goes

Benchmarks: ``write-tmpfs`` (1), ``write-durable`` (2), ``folder`` (3),
``store`` (4), ``backlog`` (5), ``concurrent`` (6), ``batch`` (7), ``syscalls`` (system
calls per operation, atomstore against the hand-written sequences) and
``profile`` (cProfile of the hot paths and the cost of each extra step; not
part of ``all``).  ``--json`` and ``--rst`` save the tables.

CPU cost is measured on tmpfs (``--tmpfs``, /dev/shm by default), durable
runs on a disk filesystem (``--disk``, /var/tmp by default); fsyncs are
counted with strace when it is installed, and through atomstore's own OS
boundary.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # imported as a module, not run as a script
    sys.path.insert(0, HERE)

import bench_backlog  # noqa: E402
import bench_batch  # noqa: E402
import bench_concurrent  # noqa: E402
import bench_folder  # noqa: E402
import bench_store  # noqa: E402
import bench_write  # noqa: E402
import profile_hot  # noqa: E402
from _harness import Factory, Settings, Table, as_json, fstype, render, render_rst  # noqa: E402

import atomstore  # noqa: E402

BENCHMARKS: dict[str, Callable[[Settings], list[Table]]] = {
    "write-tmpfs": bench_write.run_fast,
    "write-durable": bench_write.run_durable,
    "folder": bench_folder.run,
    "store": bench_store.run,
    "backlog": bench_backlog.run,
    "concurrent": bench_concurrent.run,
    "batch": bench_batch.run,
    "syscalls": profile_hot.run_syscalls,
    "profile": profile_hot.run_profile,
}
ALL = [name for name in BENCHMARKS if name != "profile"]
PEERS = (
    "atomicwrites",
    "atomicwriter",
    "atomik",
    "boltons",
    "dirq",
    "gocept.filestore",
    "persist-queue",
    "safer",
)


def registry() -> dict[str, Factory]:
    """Every contender by key, for the strace child processes."""
    found: list[tuple[str, Factory]] = []
    for durable in (False, True):
        for replace in (True, False):
            found += bench_write.contenders(durable, replace)
        found += bench_folder.contenders(durable)
        found += bench_store.contenders(durable)
    found += bench_backlog.claim_contenders()
    found += bench_batch.contenders()
    return dict(found)


def child(key: str, directory: str, ops: int) -> None:
    """Run ``ops`` operations of contender ``key`` after a warm-up, then exit."""
    case = registry()[key](directory)
    for _ in range(2):  # the first may probe the filesystem, or fill caches
        case.op()
    if case.reset is not None:
        case.reset()
    for _ in range(ops):
        case.op()
    sys.stdout.flush()
    os._exit(0)  # no teardown: the parent counts system calls of the operations


def revision() -> str:
    """The commit measured, and whether src/ differs from it."""
    root = os.path.dirname(HERE)
    package = os.path.dirname(os.path.abspath(atomstore.__file__))
    if package != os.path.join(root, "src", "atomstore"):
        return f"imported from {package}"
    try:
        commit = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--", "src"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "not in a git checkout"
    return f"git {commit}{' with changes in src/' if changed else ''}"


def machine() -> str:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"{platform.system()} {platform.release()}, {os.cpu_count()} cores ({cpu}), "
        f"Python {platform.python_version()}, atomstore {atomstore.__version__} ({revision()})"
    )


def peer_versions() -> str:
    found = []
    for name in PEERS:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return ", ".join(found)


def _load() -> str:
    """The 1-minute load average: how busy the (shared) machine was."""
    return f"{os.getloadavg()[0]:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "benchmarks", nargs="*", metavar="BENCH", help=f"one of {', '.join(BENCHMARKS)}, or all"
    )
    parser.add_argument("--quick", action="store_true", help="fewer rounds and operations")
    parser.add_argument(
        "--rounds", type=int, help="interleaved rounds (each benchmark's own default)"
    )
    parser.add_argument("--tmpfs", default="/dev/shm", help="a tmpfs directory (/dev/shm)")
    parser.add_argument("--disk", default="/var/tmp", help="a disk directory (/var/tmp)")
    parser.add_argument("--no-strace", action="store_true", help="do not count with strace")
    parser.add_argument("--keep", action="store_true", help="keep the work directories")
    parser.add_argument("--json", metavar="PATH", help="write the tables as JSON")
    parser.add_argument("--rst", metavar="PATH", help="write the tables as reST")
    parser.add_argument("--child", nargs=3, metavar=("KEY", "DIR", "OPS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        key, directory, ops = args.child
        child(key, directory, int(ops))
    names = args.benchmarks or ["all"]
    if "all" in names:
        names = [n for n in names if n != "all"] + [n for n in ALL if n not in names]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {unknown[0]!r}: choose from {', '.join(BENCHMARKS)}")
    settings = Settings(
        rounds=args.rounds,
        quick=args.quick,
        tmpfs=args.tmpfs,
        disk=args.disk,
        strace=not args.no_strace,
        keep=args.keep,
    )
    for label, path, kind in (("--tmpfs", args.tmpfs, "tmpfs"), ("--disk", args.disk, None)):
        found = fstype(path)
        if kind is not None and found != kind:
            print(f"warning: {label} {path} is {found}, not {kind}", file=sys.stderr)
        if kind is None and found in ("tmpfs", "ramfs"):
            print(f"warning: {label} {path} is {found}: fsync costs nothing", file=sys.stderr)
    header = (
        f"# {time.strftime('%Y-%m-%d %H:%M')}  {machine()}\n"
        f"# tmpfs {args.tmpfs} ({fstype(args.tmpfs)}), disk {args.disk} ({fstype(args.disk)}), "
        f"{'quick' if args.quick else 'full'} run, load average {_load()} at the start\n"
        f"# peers: {peer_versions()}\n"
        "# us/op: median over the rounds; ratio: to the first row (see each table); "
        "IQR: interquartile range over the median"
    )
    print(header, flush=True)
    tables: list[Table] = []
    started = time.monotonic()
    for name in names:
        began = time.monotonic()
        for table in BENCHMARKS[name](settings):
            tables.append(table)
            print()
            print(render(table), flush=True)
        print(f"   ({name}: {time.monotonic() - began:.0f} s)", flush=True)
    print(f"\n# total {time.monotonic() - started:.0f} s, load average {_load()} at the end")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "tables": [as_json(t) for t in tables]}, f, indent=1)
    if args.rst:
        with open(args.rst, "w") as f:
            f.write("::\n\n" + "".join(f"    {line}\n" for line in header.splitlines()) + "\n")
            f.write("\n".join(render_rst(t) for t in tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
