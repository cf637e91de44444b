"""Whether a file created with a mode gets exactly that mode.

A replaced file's mode is kept.  Creating the new file with that mode gives
it exactly when nothing strips bits from it on the way: the umask, or a
default ACL of the directory, which takes the umask's place (acl(5)).  Then
no fchmod is needed, which is the common case: your own file, in a mode the
umask leaves alone.
"""

from __future__ import annotations

import errno
import os
import threading

_lock = threading.Lock()
_umask: int | None = None

# Directories found without a default ACL (bounded: a store of many
# directories must not grow it for ever).
plain_dirs: set[str] = set()
_PLAIN_DIRS_MAX = 4096
# What getxattr() says of a directory without a default ACL, or of a
# filesystem without ACLs.
_NO_ACL = frozenset({errno.ENODATA, errno.EOPNOTSUPP, errno.ENOTSUP})


def created_exactly(mode: int, directory: str) -> bool:
    """Whether a file created in ``directory`` with ``mode`` gets ``mode``.

    False for set-user-ID, set-group-ID and sticky bits, which are always
    set explicitly.
    """
    if mode & ~0o777:
        return False
    return not mode & umask() and without_default_acl(directory)


def umask() -> int:
    """The process's umask, read with one system call and left as it was.

    umask(2) reads the mask only by setting it.  It is set to the value it
    had at the last look: while that is still the mask (the application
    rarely changes it), the call changes nothing any thread could see.  If
    the application changed it meanwhile, it is put back at once.
    """
    global _umask
    with _lock:
        guess = _umask
        if guess is None:
            guess = _umask_from_proc()
        seen = os.umask(guess)
        if seen != guess:
            os.umask(seen)
        _umask = seen
        return seen


def _umask_from_proc() -> int:
    """The umask from /proc/self/status (Linux 4.7 and later), without
    touching it; 0o022, the usual one, where that cannot be read."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def without_default_acl(directory: str) -> bool:
    """Whether ``directory`` has no default ACL (cached once seen so)."""
    if directory in plain_dirs:
        return True
    getxattr = getattr(os, "getxattr", None)
    if getxattr is None:  # pragma: no cover - not Linux
        return False
    try:
        getxattr(directory, "system.posix_acl_default")
    except OSError as e:
        if e.errno not in _NO_ACL:
            return False  # cannot tell: set the mode explicitly
    else:
        return False
    if len(plain_dirs) >= _PLAIN_DIRS_MAX:
        plain_dirs.clear()
    plain_dirs.add(directory)
    return True


if hasattr(os, "register_at_fork"):
    # The lock may be held by a thread that does not exist in the child.
    def _after_fork() -> None:
        global _lock
        _lock = threading.Lock()

    os.register_at_fork(after_in_child=_after_fork)
