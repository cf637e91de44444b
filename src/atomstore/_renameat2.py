"""ctypes binding of renameat2(2) on Linux and renamex_np(2) on macOS.

The C library's ``renameat2`` symbol is used where it exists (glibc 2.28 and
later); otherwise the system call is made through ``syscall(2)`` with the
number of the running architecture.  Elsewhere every call fails with ENOSYS
and the rename layer falls back.
"""

from __future__ import annotations

import errno
import functools
import os
import sys

RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1

_AT_FDCWD = -100

# From the kernel's syscall tables (arch/*/entry/syscalls, unistd.h).
_SYSCALL_NUMBERS = {
    "x86_64": 316,
    "amd64": 316,
    "i386": 353,
    "i486": 353,
    "i586": 353,
    "i686": 353,
    "aarch64": 276,
    "arm64": 276,
    "armv6l": 382,
    "armv7l": 382,
    "armv8l": 382,
    "arm": 382,
    "riscv64": 276,
    "loongarch64": 276,
    "ppc": 357,
    "ppc64": 357,
    "ppc64le": 357,
    "s390x": 347,
}
_X32_SYSCALL_BIT = 0x40000000

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    from typing import Any, Callable

    # renameat2(olddirfd, oldpath, newdirfd, newpath, flags) -> 0 or -1 (errno)
    _Binding = Callable[[int, bytes, int, bytes, int], int]


def _syscall_number(machine: str, pointer_size: int) -> int | None:
    """The renameat2 syscall number for ``machine``, or None if unknown."""
    number = _SYSCALL_NUMBERS.get(machine.lower())
    if number == 316 and pointer_size == 4:
        # x86_64 with 32-bit pointers is the x32 ABI.
        number |= _X32_SYSCALL_BIT
    return number


def _linux_binding() -> _Binding | None:
    import ctypes
    import platform

    argtypes: list[Any] = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        func = libc.renameat2
    except AttributeError:
        number = _syscall_number(platform.machine(), ctypes.sizeof(ctypes.c_void_p))
        if number is None:
            return None
        syscall = libc.syscall
        syscall.restype = ctypes.c_long
        syscall.argtypes = [ctypes.c_long, *argtypes]

        # The libc symbol's signature, with the syscall number bound first.
        return functools.partial(syscall, number)
    func.restype = ctypes.c_int
    func.argtypes = argtypes
    return func


def _darwin_binding() -> _Binding | None:  # pragma: no cover - macOS only
    import ctypes

    # renamex_np(2): RENAME_SWAP 0x2 and RENAME_EXCL 0x4 (sys/stdio.h).
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        func = libc.renamex_np
    except AttributeError:
        return None
    func.restype = ctypes.c_int
    func.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]

    def call(olddirfd: int, src: bytes, newdirfd: int, dst: bytes, flags: int) -> int:
        native = (0x4 if flags & RENAME_NOREPLACE else 0) | (0x2 if flags & RENAME_EXCHANGE else 0)
        return int(func(src, dst, native))

    return call


def _binding() -> _Binding | None:
    if sys.platform.startswith("linux"):
        return _linux_binding()
    if sys.platform == "darwin":  # pragma: no cover - macOS only
        return _darwin_binding()
    return None  # pragma: no cover - other platforms


# Bound at the first call, not at import: ctypes costs the command line's
# start-up more than anything else it imports.
_UNBOUND: Any = object()
_call: Any = _UNBOUND


def _bound() -> _Binding | None:
    global _call
    if _call is _UNBOUND:
        _call = _binding()
    result: _Binding | None = _call
    return result


def available() -> bool:
    """Whether this platform has the call at all."""
    return _bound() is not None


def renameat2(src: str, dst: str, flags: int) -> None:
    """Rename ``src`` to ``dst`` with renameat2 ``flags``.

    :raises OSError: with the errno of the call and both file names; ENOSYS
        where the platform has no such call.
    """
    call = _bound()
    if call is None:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS), src, None, dst)
    if call(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags):
        import ctypes  # loaded by the binding already

        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), src, None, dst)
