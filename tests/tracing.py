"""Recording and fault injection through atomstore's OS boundary."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from atomstore import _staging, _syscalls

if TYPE_CHECKING:
    import pytest

# open(2) with O_TMPFILE makes an unnamed file in the directory it names.
ANONYMOUS = getattr(os, "O_TMPFILE", -1)
ANONYMOUS_NAME = "(unnamed)"

_FD_CALLS = frozenset(
    {
        "write",
        "fsync",
        "close",
        "fchmod",
        "fchown",
        "link_fd",
        "fsetxattr",
        "fremovexattr",
        "set_inode_flags",
    }
)


@dataclass
class Call:
    """One call that went through the OS boundary."""

    name: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    result: Any = None
    error: OSError | None = None
    target: str | None = None  # the path behind a descriptor argument

    def path(self, fds: dict[int, str]) -> str:
        """The first path argument, resolved against a recorded ``dir_fd``."""
        first = self.args[0]
        dir_fd = self.kwargs.get("dir_fd")
        if dir_fd is not None:
            return os.path.join(fds[dir_fd], first)
        return str(first)


@dataclass
class Fault:
    """Make calls named ``name`` (and matching ``when``) fail with ``error``."""

    name: str
    error: int
    when: Callable[[Call], bool] = lambda call: True
    times: int | None = 1  # None: every matching call
    after: bool = False  # fail after the real call was made
    hits: int = 0


@dataclass
class Recorder:
    """A tracer for :func:`atomstore._syscalls.set_tracer`."""

    calls: list[Call] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    replace: dict[str, Callable[..., Any]] = field(default_factory=dict)
    fds: dict[int, str] = field(default_factory=dict)

    def __call__(self, name: str, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if name == "write":
            # BufferedWriter passes a view of its own buffer, reused later.
            args = (args[0], bytes(args[1]))
        call = Call(name, args, kwargs)
        if name in _FD_CALLS:
            call.target = self.fds.get(args[0])
        self.calls.append(call)
        fault = self._fault(call)
        if fault is not None and not fault.after:
            call.error = OSError(fault.error, os.strerror(fault.error), _filename(args))
            raise call.error
        try:
            call.result = self.replace.get(name, func)(*args, **kwargs)
        except OSError as e:
            call.error = e
            raise
        if name == "open":
            path = call.path(self.fds)
            if args[1] & ANONYMOUS == ANONYMOUS:
                path = os.path.join(path, ANONYMOUS_NAME)  # an unnamed file in it
            self.fds[call.result] = path
        if fault is not None:
            call.error = OSError(fault.error, os.strerror(fault.error), _filename(args))
            raise call.error
        return call.result

    def _fault(self, call: Call) -> Fault | None:
        for fault in self.faults:
            left = fault.times is None or fault.hits < fault.times
            if fault.name == call.name and left and fault.when(call):
                fault.hits += 1
                return fault
        return None

    def fail(self, name: str, error: int = errno.EIO, **options: Any) -> Fault:
        fault = Fault(name, error, **options)
        self.faults.append(fault)
        return fault

    def named(self, *names: str) -> list[Call]:
        return [c for c in self.calls if c.name in names]

    def count(self, name: str) -> int:
        return len(self.named(name))

    def fsynced_paths(self) -> list[str]:
        """The paths behind the descriptors fsync was called on, in order."""
        return [str(c.target) for c in self.named("fsync")]

    def install(self) -> None:
        _syscalls.set_tracer(self)

    def uninstall(self) -> None:
        _syscalls.set_tracer(None)


def _filename(args: tuple[Any, ...]) -> Any:
    return args[0] if args and isinstance(args[0], str) else None


@contextlib.contextmanager
def named_staging() -> Iterator[None]:
    """Stage under hidden names, as where O_TMPFILE is missing (NFS, most
    FUSE, old kernels), for the block."""
    previous = _staging._O_TMPFILE
    _staging._O_TMPFILE = 0
    try:
        yield
    finally:
        _staging._O_TMPFILE = previous


def blind_lstat(
    monkeypatch: pytest.MonkeyPatch, blind: Callable[[str], bool], code: int = errno.EIO
) -> None:
    """Make ``os.lstat`` fail with ``code`` for every path ``blind`` takes
    (a damaged inode, a half-dead mount).  Looks are not boundary calls:
    ``os`` itself is patched, until ``monkeypatch.undo()``."""
    real = os.lstat

    def lstat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if blind(os.fspath(path)):
            raise OSError(code, os.strerror(code), path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "lstat", lstat)
