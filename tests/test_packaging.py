"""The packaging holds up: the README's test command tests every Python it
should or fails, and the sdist carries what its own tests need."""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from needs import need

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # toxfile.py, beside tox.ini

import toxfile  # noqa: E402


def test_pyenv_versions_name_the_default_then_the_newest_of_each_wanted() -> None:
    installed = ["2.7.18", "3.8.18", "3.9.17", "3.9.18", "3.10.13", "3.11.7", "3.12.1"]
    installed += ["3.13.0", "3.13.0t", "3.14-dev", "pypy3.10-7.3.12", "system"]
    assert toxfile.pyenv_versions(installed, "3.11.7") == "3.11.7:3.9.18:3.10.13:3.12.1:3.13.0"
    assert toxfile.pyenv_versions(["3.12.1"], "") == "3.12.1"
    assert toxfile.pyenv_versions([], "3.11.7") == "3.11.7"


def test_a_missing_python_fails_tox_instead_of_being_skipped() -> None:
    config = configparser.ConfigParser()
    config.read(ROOT / "tox.ini")
    assert config["tox"]["skip_missing_interpreters"] == "false"
    envs = [e.strip() for e in config["tox"]["env_list"].split(",")]
    assert [e for e in envs if e.startswith("py")] == ["py39", "py310", "py311", "py312", "py313"]


def test_ci_runs_the_readme_test_command_as_it_is() -> None:
    readme = (ROOT / "README.rst").read_text()
    command = "python3 -m venv .venv && .venv/bin/pip install tox && .venv/bin/tox"
    assert f"    {command}\n" in readme
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert ci[-1] == command
    assert not [line for line in ci if "||" in line or "true" in line.split()]


@pytest.mark.slow
def test_the_sdist_carries_its_tests_and_they_pass(tmp_path: Path) -> None:
    built = subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--outdir", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
    )
    need(built.returncode == 0 or "No matching distribution" not in built.stdout, built.stdout)
    assert built.returncode == 0, built.stdout + built.stderr
    [sdist] = tmp_path.glob("atomstore-*.tar.gz")
    # Python 3.12 warns without a filter; "data" exists from 3.9.17 on.
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    with tarfile.open(sdist) as archive:
        archive.extractall(tmp_path / "unpacked", **safe)  # type: ignore[arg-type]
    [top] = (tmp_path / "unpacked").iterdir()
    for needed in (
        "README.rst",
        "CHANGES.rst",
        "LICENSE.txt",
        "tox.ini",
        "toxfile.py",
        "tests/conftest.py",
        "tests/needs.py",
        "tests/provision.sh",
        "docs/guarantees.rst",
        "benchmarks/run.py",
        "src/atomstore/py.typed",
    ):
        assert (top / needed).exists(), needed
    assert not list(top.rglob("__pycache__"))
    env = dict(os.environ, PYTHONPATH=str(top / "src"))
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider"],
        cwd=top,
        env=env,
        capture_output=True,
        text=True,
    )
    assert collected.returncode == 0, collected.stdout[-3000:]
    ran = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-m",
            "not slow",
            "README.rst",
            "tests/test_store.py",
            "tests/test_atomic_file.py",
            "tests/test_guarantees_table.py",
        ],
        cwd=top,
        env=env,
        capture_output=True,
        text=True,
    )
    assert ran.returncode == 0, ran.stdout[-3000:]
    assert " passed" in ran.stdout.splitlines()[-1]
