"""The recorder misses nothing: strace sees no change the OS boundary did not record.

Each crash workload runs once in a child Python under ``strace -f -y``, with
the recorder installed.  Between two markers (a look for a missing file
before and after the steps), every system call that changes something under
the workload's directory must be one the recorder saw, with the same paths
and outcome, and the other way round: a call that bypassed
``atomstore._syscalls`` would make the crash states of
``test_crash_states.py`` incomplete.  Python's start-up, imports, reads and
the workload's setup fall outside the markers or the directory.
"""

from __future__ import annotations

import codecs
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from crash_workloads import WORKLOADS
from needs import need, need_tool
from tracing import ANONYMOUS_NAME

TESTS = os.path.dirname(os.path.abspath(__file__))
BEGIN, END = ".strace-begin", ".strace-end"
BYPASS = "a write around the OS boundary"
_WRITING = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC
_WRITING_NAMES = ("O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC")
_RENAME_FLAGS = {"RENAME_NOREPLACE": 1, "RENAME_EXCHANGE": 2}
TRACED = (
    "%file,write,writev,pwrite64,pwritev,pwritev2,fsync,fdatasync,sync_file_range,"
    "ftruncate,fallocate,fchmod,fchown,fsetxattr,fremovexattr,copy_file_range,sendfile"
)

CHILD = f"""
import json, os, sys
from pathlib import Path
sys.path.insert(0, {TESTS!r})
from crash_model import Context, pretend, recording
from crash_workloads import WORKLOADS

name, root, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
if name == {BYPASS!r}:  # what the check must catch: a write around the boundary
    from crash_model import Step, Workload
    from crash_workloads import files, clean_directory
    WORKLOADS = (Workload(
        name, files(), (Step("", lambda ctx: (ctx.root / "x").write_bytes(b"x"), ""),),
        (), clean_directory,
    ),)
workload = {{w.name: w for w in WORKLOADS}}[name]
workload.setup(root)
with pretend(root, workload.caps):
    os.path.lexists(root / {BEGIN!r})
    ctx = Context(root, dict(workload.store_options))
    with recording() as tracer:
        for step in workload.steps:
            step.action(ctx)
    os.path.lexists(root / {END!r})
out.write_text(json.dumps([
    {{
        "name": c.name,
        "args": [a if isinstance(a, (str, int)) else None for a in c.args],
        "dir_fd": c.kwargs.get("dir_fd"),
        "result": c.result if isinstance(c.result, int) else None,
        "ok": c.error is None,
        "target": c.target,
    }}
    for c in tracer.calls
]))
"""

Change = tuple[Any, ...]  # (kind, path, [path, flags,] succeeded)

_LINE = re.compile(r"^\d+\s+(\w+)\((.*)\)\s+=\s+(-?\d+|\?)")


def _split(args: str) -> list[str]:
    """strace's argument list, split at the top-level commas."""
    parts, depth, quoted, escaped, start = [], 0, False, False, 0
    for i, ch in enumerate(args):
        if quoted:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
        elif ch in "<{[":
            depth += 1
        elif ch in ">}]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(args[start:i].strip())
            start = i + 1
    parts.append(args[start:].strip())
    return parts


def _string(token: str) -> str:
    text = token.split('"', 1)[1].rsplit('"', 1)[0]
    decoded: bytes = codecs.escape_decode(text.encode())[0]
    return decoded.decode()


_UNNAMED = re.compile(r"/#\d+( \(deleted\))?$")


def _fd(token: str) -> str:
    """The path that ``-y`` printed for a descriptor: ``3</a/b>``; an unnamed
    file (O_TMPFILE, ``3</a/#1234 (deleted)>``) as the recorder names it."""
    path = token[token.index("<") + 1 : token.rindex(">")]
    return _UNNAMED.sub("/" + ANONYMOUS_NAME, path)


def _at(dir_token: str, path_token: str) -> str:
    path = _string(path_token)
    return os.path.normpath(path if path.startswith("/") else os.path.join(_fd(dir_token), path))


def traced_changes(line: str) -> list[Change]:
    """The change a line of ``strace -y`` output made, if any."""
    match = _LINE.match(line)
    if match is None:
        return []
    name, a, ok = match[1], _split(match[2]), match[3] != "-1"
    if name in ("open", "openat", "creat", "openat2"):
        flags = "O_WRONLY|O_CREAT|O_TRUNC" if name == "creat" else a[1 if name == "open" else 2]
        if not any(f in flags for f in _WRITING_NAMES):
            return []
        path = _at(a[0], a[1]) if name.startswith("openat") else os.path.normpath(_string(a[0]))
        return [("open", path, ok)]
    if name in ("write", "writev", "pwrite64", "pwritev", "pwritev2"):
        return [("write", _fd(a[0]), ok)]
    if name in ("fsync", "fchmod", "fchown"):
        return [({"fchmod": "chmod", "fchown": "chown"}.get(name, name), _fd(a[0]), ok)]
    if name in ("fdatasync", "sync_file_range", "ftruncate", "fallocate", "fsetxattr"):
        return [(name, _fd(a[0]), ok)]
    if name in ("copy_file_range", "sendfile"):
        return [("write", _fd(a[2] if name == "copy_file_range" else a[0]), ok)]
    if name == "rename":
        return [("rename", _string(a[0]), _string(a[1]), 0, ok)]
    if name in ("renameat", "renameat2"):
        bits = sum(v for k, v in _RENAME_FLAGS.items() if name == "renameat2" and k in a[4])
        return [("rename", _at(a[0], a[1]), _at(a[2], a[3]), bits, ok)]
    if name in ("link", "linkat"):
        paths = (_string(a[0]), _string(a[1])) if name == "link" else (_at(*a[:2]), _at(*a[2:4]))
        if re.match(r"^/proc/(?:self|\d+)/fd/\d+$", paths[0]):  # naming an open file
            return [("link_fd", paths[1], ok)]
        return [("link", *paths, ok)]
    if name == "unlinkat":
        return [("rmdir" if "AT_REMOVEDIR" in a[2] else "unlink", _at(a[0], a[1]), ok)]
    if name in ("mkdirat", "fchmodat", "fchownat", "utimensat", "symlinkat"):
        kind = {"mkdirat": "mkdir", "fchmodat": "chmod", "fchownat": "chown"}.get(name, name)
        if name == "symlinkat":
            return [(kind, _at(a[1], a[2]), ok)]
        if a[1] == "NULL":
            return [(kind, _fd(a[0]), ok)]
        return [(kind, _at(a[0], a[1]), ok)]
    if name in ("unlink", "rmdir", "mkdir", "chmod", "chown", "lchown", "truncate", "utime"):
        kind = "chown" if name == "lchown" else name
        return [(kind, os.path.normpath(_string(a[0])), ok)]
    if name in ("utimes", "setxattr", "lsetxattr", "removexattr", "lremovexattr", "symlink"):
        return [(name, os.path.normpath(_string(a[-1] if name == "symlink" else a[0])), ok)]
    return []  # looks and reads


def recorded_changes(calls: list[dict[str, Any]]) -> list[Change]:
    """The changes the recorder saw, in the form of :func:`traced_changes`."""
    fds: dict[int, str] = {}
    changes: list[Change] = []

    def at(path: str, dir_fd: int | None) -> str:
        return os.path.normpath(path if dir_fd is None else os.path.join(fds[dir_fd], path))

    for call in calls:
        name, args, ok = call["name"], call["args"], call["ok"]
        if name == "open":
            path = at(args[0], call["dir_fd"])
            if ok:
                fds[call["result"]] = path
            if args[1] & _WRITING:
                changes.append(("open", path, ok))
        elif name in ("write", "fsync"):
            changes.append((name, call["target"], ok))
        elif name in ("fchmod", "fchown"):
            changes.append((name[1:], call["target"], ok))
        elif name in ("rename", "renameat2"):
            flags = args[2] if name == "renameat2" else 0
            changes.append(
                ("rename", os.path.normpath(args[0]), os.path.normpath(args[1]), flags, ok)
            )
        elif name == "link":
            changes.append(("link", os.path.normpath(args[0]), os.path.normpath(args[1]), ok))
        elif name == "link_fd":
            changes.append(("link_fd", os.path.normpath(args[1]), ok))
        elif name in ("unlink", "rmdir"):
            changes.append((name, at(args[0], call["dir_fd"]), ok))
        elif name in ("mkdir", "chmod"):
            changes.append((name, os.path.normpath(args[0]), ok))
        elif name != "close":
            raise AssertionError(f"unexpected call through the boundary: {call}")
    return changes


def _under(change: Change, root: str) -> bool:
    paths = [p for p in change[1:] if isinstance(p, str)]
    return any(p == root or p.startswith(root + "/") for p in paths)


@pytest.fixture(scope="module")
def strace() -> str:
    need_tool("strace")
    probe = subprocess.run(["strace", "-o", os.devnull, "true"], capture_output=True, text=True)
    need(probe.returncode == 0, f"strace cannot trace here: {probe.stderr.strip()}")
    return "strace"


def run_traced(tmp_path: Path, strace: str, name: str) -> tuple[list[Change], list[Change]]:
    """Run a workload under strace: (what strace saw, what was recorded)."""
    root = Path(os.path.realpath(tmp_path)) / "root"
    root.mkdir()
    log, out = tmp_path / "strace.txt", tmp_path / "recorded.json"
    command = [strace, "-f", "-y", "-qq", "-s", "0", "-e", f"trace={TRACED}", "-o", str(log)]
    child = [sys.executable, "-c", CHILD, name, str(root), str(out)]
    done = subprocess.run(command + child, capture_output=True, text=True, cwd=root, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = log.read_text().splitlines()
    begin = next(i for i, line in enumerate(lines) if f'/{BEGIN}"' in line)
    end = next(i for i, line in enumerate(lines) if f'/{END}"' in line)
    traced = [c for line in lines[begin:end] for c in traced_changes(line) if _under(c, str(root))]
    recorded = [c for c in recorded_changes(json.loads(out.read_text())) if _under(c, str(root))]
    return traced, recorded


@pytest.mark.slow
@pytest.mark.parametrize("name", [w.name for w in WORKLOADS])
def test_strace_sees_no_unrecorded_change(tmp_path: Path, strace: str, name: str) -> None:
    traced, recorded = run_traced(tmp_path, strace, name)
    assert traced, "strace saw no change: the markers or the parser are wrong"
    unrecorded = Counter(traced) - Counter(recorded)
    assert not unrecorded, f"changes made outside the OS boundary: {sorted(unrecorded)}"
    phantom = Counter(recorded) - Counter(traced)
    assert not phantom, f"recorded calls strace did not see: {sorted(phantom)}"


@pytest.mark.slow
def test_a_change_around_the_boundary_is_caught(tmp_path: Path, strace: str) -> None:
    traced, recorded = run_traced(tmp_path, strace, BYPASS)
    path = os.path.join(os.path.realpath(tmp_path), "root", "x")
    assert recorded == []
    assert Counter(traced) - Counter(recorded) == Counter(
        {("open", path, True): 1, ("write", path, True): 1}
    )


@pytest.mark.parametrize(
    ("line", "change"),
    [
        (
            '7 openat(AT_FDCWD</w>, "/w/f", O_WRONLY|O_CREAT|O_EXCL, 0666) = 3</w/f>',
            [("open", "/w/f", True)],
        ),
        ('7 openat(AT_FDCWD</w>, "/w/f", O_RDONLY|O_CLOEXEC) = 3</w/f>', []),
        ('7 write(3</w/f>, ""..., 10) = 10', [("write", "/w/f", True)]),
        ("7 fsync(3</w>) = -1 EIO (Input/output error)", [("fsync", "/w", False)]),
        (
            '7 renameat2(AT_FDCWD</w>, "/w/a", AT_FDCWD</w>, "b", RENAME_NOREPLACE) = 0',
            [("rename", "/w/a", "/w/b", 1, True)],
        ),
        ('7 rename("/w/a", "/w/b") = 0', [("rename", "/w/a", "/w/b", 0, True)]),
        ('7 unlinkat(5</w/d>, "x", AT_REMOVEDIR) = 0', [("rmdir", "/w/d/x", True)]),
        ('7 link("/w/a", "/w/a:1,A0") = 0', [("link", "/w/a", "/w/a:1,A0", True)]),
        ('7 newfstatat(AT_FDCWD</w>, "/w/a", 0x7ff, 0) = 0', []),
        ('7 mkdir("/w/a \\"q\\"", 0777) = 0', [("mkdir", '/w/a "q"', True)]),
    ],
)
def test_strace_lines_are_read_as_changes(line: str, change: list[Change]) -> None:
    assert traced_changes(line) == change
