"""Names of the library's hidden staging files, and random tokens.

Every file or directory atomstore stages is hidden and carries the same
mark, ``.<name>.atomstore-<token>.<kind>``, so that a cleanup can tell it
from the user's own files after a crash left it behind:

* ``tmp``: a file being written by :func:`atomstore.atomic.file`, or a
  capability probe;
* ``new``: a tree being written by :func:`atomstore.atomic.folder`, or an
  old tree about to be removed after an exchange;
* ``old``: an old tree moved aside by the folder fallback.
"""

from __future__ import annotations

import itertools
import os
import re

_count = itertools.count()


def _draw_prefix() -> str:
    return os.urandom(3).hex()


_prefix = _draw_prefix()


def _reseed() -> None:
    # A forked child must not draw the parent's tokens.
    global _prefix
    _prefix = _draw_prefix()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reseed)

# NAME_MAX is 255 bytes on every Linux filesystem; the mark takes 27.
_BASE_MAX_BYTES = 200

# An emptied new/ swapped for a fresh one waits under this name beside the
# areas while what reached it is moved back (see _shrink).
OLD_NEW = ".new.atomstore-shrink"

STAGING_RE = re.compile(
    r"^\.(?P<base>.*)\.atomstore-(?P<token>[0-9a-f]{12})\.(?P<kind>tmp|new|old)$", re.S
)


def token() -> str:
    """12 hex digits unique in this process: a random per-process prefix and
    a counter.  Another process's rare collision is caught by O_EXCL."""
    return f"{_prefix}{next(_count) & 0xFFFFFF:06x}"


# The random module is not imported: its import costs every command's
# start-up, and the few draws here (once per process, and after a lost
# claim race) are cheap enough from the kernel.


def random_below(n: int) -> int:
    """A random int from 0 to ``n`` - 1 (``n`` small: at most 2**16); 0 for
    an ``n`` below 1 (a list another thread emptied meanwhile)."""
    if n <= 1:
        return 0
    return int.from_bytes(os.urandom(4), "big") % n


def random_hex(digits: int) -> str:
    """``digits`` random hex digits."""
    return os.urandom((digits + 1) // 2).hex()[:digits]


def _shorten(base: str) -> str:
    if len(base) <= _BASE_MAX_BYTES // 4:  # 4 bytes a character at most
        return base
    encoded = os.fsencode(base)
    if len(encoded) <= _BASE_MAX_BYTES:
        return base
    # A cut inside a multi-byte character leaves surrogate escapes, which
    # encode back to the same bytes: still a valid file name.
    return os.fsdecode(encoded[:_BASE_MAX_BYTES])


def shortened(base: str) -> bool:
    """Whether ``base`` may have been cut to fit a staging name."""
    return len(os.fsencode(base)) >= _BASE_MAX_BYTES


def staging_name(base: str, kind: str) -> str:
    """A fresh hidden name for staging ``base`` (``kind``: tmp, new or old)."""
    if len(base) > _BASE_MAX_BYTES // 4:
        base = _shorten(base)
    # token(), inline: this is on every write's path.
    return f".{base}.atomstore-{_prefix}{next(_count) & 0xFFFFFF:06x}.{kind}"


def is_staging(name: str) -> bool:
    """Whether ``name`` is one of the library's staging names."""
    return name.startswith(".") and STAGING_RE.match(name) is not None
