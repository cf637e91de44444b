"""Benchmark 8: what one ``atomstore`` command costs a shell script.

Each round runs, in a rotating order, ``python -c pass`` (the floor: an
interpreter that starts and stops), ``atomstore put FILE`` and ``atomstore
take`` followed by nothing else, each as a fresh process, as a shell loop
runs them.  Wall time per run; the ratio is the median of the per-round
ratios to ``python -c pass``.  The store is on tmpfs and ``--no-sync``, so
that only start-up and the command's own work count.

The command runs as installed: the ``atomstore`` script beside the
interpreter (``python -m atomstore`` where there is none), with its modules
compiled to bytecode first, as ``pip install`` leaves them (an editable
install under ``PYTHONDONTWRITEBYTECODE`` would otherwise compile them on
every run).

    python benchmarks/bench_cli.py [--rounds 30] [--tmpfs /dev/shm]
"""

from __future__ import annotations

import argparse
import compileall
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


def installed_command() -> list[str]:
    """The ``atomstore`` command as installed, its modules compiled to
    bytecode as ``pip install`` leaves them."""
    import atomstore

    compileall.compile_dir(os.path.dirname(atomstore.__file__), quiet=1)
    script = os.path.join(os.path.dirname(sys.executable), "atomstore")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "atomstore"]


def timed(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--tmpfs", default="/dev/shm")
    options = parser.parse_args()
    work = tempfile.mkdtemp(prefix="atomstore-bench-cli-", dir=options.tmpfs)
    try:
        store = os.path.join(work, "spool")
        payload = os.path.join(work, "payload")
        with open(payload, "wb") as f:
            f.write(b"x" * 1024)
        cmd = installed_command()
        subprocess.run([*cmd, "init", store], check=True)
        for _ in range(options.rounds + 1):  # take always finds a message
            subprocess.run(
                [*cmd, "put", "--no-sync", store, payload], check=True, stdout=subprocess.DEVNULL
            )
        contenders = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "atomstore put FILE": [*cmd, "put", "--no-sync", store, payload],
            "atomstore take": [*cmd, "take", "--no-sync", store],
        }
        names = list(contenders)
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(options.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                times[name].append(timed(contenders[name]))
        floor = times["python -c pass"]
        print(f"{'contender':<22}{'ms/run':>8}{'ratio':>8}")
        for name in names:
            ratios = [t / f for t, f in zip(times[name], floor)]
            print(
                f"{name:<22}{statistics.median(times[name]) * 1e3:8.1f}"
                f"{statistics.median(ratios):7.2f}x"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
