"""Preconditions of the system tests: skip with the reason, or fail in CI.

The tests that need root, loop devices, ``/dev/fuse`` or system tools run in
CI, where ``.ci/run`` provides them; a missing one there is a failure, not a
quiet skip.  Elsewhere they skip and say why.
"""

from __future__ import annotations

import os
import shutil

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"


def need(condition: bool, reason: str) -> None:
    """Skip the calling test unless ``condition``; fail instead in CI."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI must run this test, but: {reason}", pytrace=False)
    pytest.skip(reason)


def need_root() -> None:
    need(os.geteuid() == 0, "needs root")


def need_tool(*names: str) -> None:
    for name in names:
        need(shutil.which(name) is not None, f"needs {name} (tests/provision.sh installs it)")


def need_device(path: str) -> None:
    need(os.path.exists(path), f"needs {path}")
