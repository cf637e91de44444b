"""Maildir names: unique names and the info part after the colon.

A unique name is ``<seconds>.M<microseconds>P<pid>Q<counter>R<random>.<host>``.
The info part is ``:<version>,<fields>``; atomstore writes version 1
("experimental semantics" in the maildir specification) with comma-separated
fields, each a letter and a value:

* ``A``: attempts, the claims of this message that ended without finishing;
* ``C``: when the current claim was made, microseconds since the epoch;
* ``P``: the claiming process's id;
* ``T``: a random token that makes each claim's name unique (fencing).
"""

from __future__ import annotations

import itertools
import os
import time

from . import _names

_SEPARATOR = ":"
_VERSION = "1,"

_counter = itertools.count()
_pid = os.getpid()
# The last time a name was given, in microseconds: a process never gives a
# name older than its previous one, even when the clock is set back.  No
# lock guards it: a KeyboardInterrupt can leave a lock of a ``with`` block
# held on Python 3.9 (it strikes between the acquire and the block), and a
# signal handler that adds a message would wait for its own thread.  Two
# threads racing may both take the same microsecond; the counter keeps
# their names apart.
_last_us = [0]
# Guards against a pid reused (containers) and a clock set back; drawn once
# per process, since the counter already separates a process's names.
_random = _names.random_hex(8)


def _reset_after_fork() -> None:
    global _pid, _random
    _pid = os.getpid()
    _random = _names.random_hex(8)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def escape_hostname(hostname: str) -> str:
    """``hostname`` made safe for a maildir name.

    The maildir specification escapes ``/`` as ``\\057`` and ``:`` as
    ``\\072``; atomstore also escapes ``,`` (``\\054``), its info separator,
    and ``\\`` itself.
    """
    return (
        hostname.replace("\\", "\\134")
        .replace("/", "\\057")
        .replace(":", "\\072")
        .replace(",", "\\054")
    )


def unique_name(host: str) -> str:
    """A new unique name for the (escaped) ``host``.

    Within a process every name sorts after the one before it: each gets a
    microsecond of its own, later than the last one's even if the clock was
    set back meanwhile.
    """
    count = next(_counter)  # first: threads' names apart whatever follows
    now = time.time_ns() // 1000
    last = _last_us[0]
    if now <= last:
        now = last + 1
    _last_us[0] = now
    seconds, micros = divmod(now, 1_000_000)
    return f"{seconds}.M{micros:06d}P{_pid}Q{count}R{_random}.{host}"


def name_time(name: str) -> float | None:
    """When the unique name ``name`` was given (seconds since the epoch);
    None for a name of another form."""
    seconds, dot, rest = name.partition(".")
    if not (dot and seconds.isdigit() and rest[:1] == "M"):
        return None
    micros = rest[1:].partition("P")[0]
    if not micros.isdigit():
        return None
    return int(seconds) + int(micros) / 1e6


def split_info(name: str) -> tuple[str, dict[str, str]]:
    """Split a stored name into its unique part and its info fields."""
    if _SEPARATOR not in name:  # a fresh message: the common case
        return name, {}
    base, sep, info = name.rpartition(_SEPARATOR)
    if not sep or not info.startswith(_VERSION):
        return name, {}
    fields = {}
    for item in info[len(_VERSION) :].split(","):
        if item:
            fields[item[0]] = item[1:]
    return base, fields


def join_info(base: str, fields: dict[str, str]) -> str:
    """The stored name of ``base`` with info ``fields`` (none: just base)."""
    if not fields:
        return base
    items = ",".join(f"{key}{value}" for key, value in fields.items())
    return f"{base}{_SEPARATOR}{_VERSION}{items}"


def attempts(fields: dict[str, str]) -> int:
    """The attempt count of a parsed name (0 if absent or garbled)."""
    try:
        return int(fields.get("A", "0"))
    except ValueError:
        return 0


def with_attempts(base: str, count: int) -> str:
    """The name of ``base`` waiting after ``count`` failed attempts."""
    return join_info(base, {"A": str(count)} if count else {})


def token() -> str:
    """A random token for a claim's name."""
    return _names.token()


def scatter(waiting: int) -> int:
    """How many of the oldest ``waiting`` names to pass over after a lost race."""
    return _names.random_below(min(waiting, 8))


# The longest info part claim_name() adds: ":1," and A (10 digits), C (17),
# P (7: pid_max is at most 2**22) and T (12), with their letters and commas.
CLAIM_SUFFIX_MAX = 3 + 11 + 19 + 9 + 14


def shorten(base: str, limit: int) -> str:
    """``base`` cut to at most ``limit`` bytes, made unique by a digest.

    For a foreign name too long to carry a claim's info part: the digest of
    the whole name keeps two long names that share a beginning apart.
    """
    import hashlib  # rare: not worth its import time on every start

    encoded = os.fsencode(base)
    digest = hashlib.sha256(encoded).hexdigest()[:12]
    # A cut inside a multi-byte character leaves surrogate escapes, which
    # encode back to the same bytes: still a valid file name.
    return os.fsdecode(encoded[: max(limit - 13, 1)]) + "~" + digest


def claim_name(base: str, count: int, claimed_us: int, token: str) -> str:
    """The name of ``base`` while claimed."""
    return f"{base}{_SEPARATOR}{_VERSION}A{count},C{claimed_us},P{_pid},T{token}"
