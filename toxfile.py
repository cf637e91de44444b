"""tox finds every Python 3.9-3.13 that pyenv installed, or says which is missing.

pyenv's shims (``python3.12`` on the PATH) answer only for the versions
``PYENV_VERSION`` names: tox would find only the default one and, skipping
the others, report success.  Before tox looks for interpreters, this plugin
names them all: the default version first, then the newest installed
release of each of 3.9 to 3.13.  ``skip_missing_interpreters = false`` in
``tox.ini`` then makes a version that is not installed at all a failure
that names it.  Without pyenv, nothing changes.

tox loads this file by itself (a ``toxfile.py`` beside ``tox.ini``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from typing import TYPE_CHECKING, Any, Callable, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

if TYPE_CHECKING:  # tox is not installed where the types are checked

    def impl(func: F) -> F: ...

else:
    try:
        from tox.plugin import impl
    except ImportError:  # imported by the tests, without tox

        def impl(func):
            return func


WANTED = ("3.9", "3.10", "3.11", "3.12", "3.13")
_RELEASE = re.compile(r"^(3\.\d+)\.(\d+)$")


def pyenv_versions(installed: list[str], default: str) -> str:
    """The ``PYENV_VERSION`` that makes every wanted Python visible: the
    default version, then the newest installed release of each wanted one."""
    newest: dict[str, tuple[int, str]] = {}
    for version in installed:
        match = _RELEASE.match(version.strip())
        if match and match[1] in WANTED:
            patch = int(match[2])
            if match[1] not in newest or patch > newest[match[1]][0]:
                newest[match[1]] = (patch, version.strip())
    chosen = [default] if default else []
    chosen += [newest[m][1] for m in WANTED if m in newest and newest[m][1] != default]
    return ":".join(chosen)


def _ask_pyenv(*args: str) -> str:
    return subprocess.run(
        ["pyenv", *args], capture_output=True, text=True, check=False
    ).stdout.strip()


@impl
def tox_add_core_config(core_conf: Any, state: Any) -> None:
    if shutil.which("pyenv") is None:
        return
    default = _ask_pyenv("version-name")
    installed = _ask_pyenv("versions", "--bare", "--skip-aliases").splitlines()
    os.environ["PYENV_VERSION"] = pyenv_versions(installed, default)
