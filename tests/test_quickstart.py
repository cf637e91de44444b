"""The README's quick start, followed on a clean clone in a fresh virtual environment."""

from __future__ import annotations

import configparser
import os
import socket
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from needs import need, need_tool

REPO = Path(__file__).resolve().parents[1]
INSTALL_TIMEOUT = 600  # pip fetches the build backend, and tox, from the index


def quick_start_commands(readme: str) -> list[str]:
    """The first two indented lines of the literal block under "Quick start"."""
    lines = readme.splitlines()
    heading = lines.index("Quick start")
    assert set(lines[heading + 1]) == {"="}, "Quick start is not a section heading"
    intro = next(i for i in range(heading, len(lines)) if lines[i].rstrip().endswith("::"))
    commands = []
    for line in lines[intro + 1 :]:
        if not line.strip():
            continue
        if not line[0].isspace():
            break  # the literal block ended
        commands.append(line.strip())
    return commands[:2]


def test_the_quick_start_has_two_commands() -> None:
    first, second = quick_start_commands((REPO / "README.rst").read_text(encoding="utf-8"))
    assert "pip install ." in first
    assert "atomstore take" in first
    assert second.split()[-1].endswith("tox")


def _index_reachable() -> bool:
    url = urlsplit(os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple"))
    if url.scheme == "file":
        return True
    try:
        with socket.create_connection((url.hostname or "", url.port or 443), timeout=5):
            return True
    except OSError:
        return False


def _clean_env() -> dict[str, str]:
    """This environment without what would leak the running interpreter's packages."""
    env = dict(os.environ)
    for name in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PIP_USER"):
        env.pop(name, None)
    return env


def bash(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", command],
        cwd=cwd,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT,
        check=False,
    )


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clean clone of this repository's committed state."""
    need_tool("git", "bash")
    need((REPO / ".git").exists(), f"{REPO} is not a git checkout")
    need(_index_reachable(), "needs network access to the package index (pip install)")
    target = tmp_path_factory.mktemp("quickstart") / "atomstore"
    # A checkout owned by another user than the one running the tests (CI)
    # is "dubious" to git unless named safe.
    subprocess.run(
        ["git", "-c", f"safe.directory={REPO}", "clone", "--quiet", str(REPO), str(target)],
        check=True,
        timeout=120,
    )
    return target


def _commands(clone: Path) -> list[str]:
    return quick_start_commands((clone / "README.rst").read_text(encoding="utf-8"))


@pytest.mark.slow
def test_first_command_passes_hello_through_a_store(clone: Path) -> None:
    first = _commands(clone)[0]
    result = bash(first, clone)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    *_, name, message = result.stdout.splitlines()
    assert message == "hello"
    # The message went through the store the command made under the name
    # put printed, and was claimed and finished: every area is empty again.
    spool = clone / "spool"
    assert name.endswith("." + socket.gethostname())
    assert sorted(os.listdir(spool)) == ["cur", "new", "tmp"]
    assert os.listdir(spool / "new") == os.listdir(spool / "tmp") == []
    assert os.listdir(spool / "cur") == []
    # It ran the clone's own copy, installed into the new environment.
    located = subprocess.run(
        [
            str(clone / ".venv" / "bin" / "python"),
            "-c",
            "import atomstore; print(atomstore.__file__)",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd="/",
        env=_clean_env(),
    )
    assert Path(located.stdout.strip()).is_relative_to(clone / ".venv")


@pytest.mark.slow
def test_second_command_is_wired_to_the_suite(clone: Path) -> None:
    # The second command runs the whole suite, this test included: running it
    # here would recurse.  The command itself is run with ``--listenvs``
    # appended, which proves tox installs and reads this project's
    # environments, and stops there.
    second = _commands(clone)[1]
    assert second.endswith("tox"), second
    result = bash(second + " --listenvs", clone)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    config = configparser.ConfigParser()
    config.read(clone / "tox.ini", encoding="utf-8")
    envs = [e.strip() for e in config["tox"]["env_list"].split(",")]
    assert {"py39", "py313", "lint", "type"} <= set(envs)
    assert result.stdout.splitlines()[-len(envs) :] == envs
