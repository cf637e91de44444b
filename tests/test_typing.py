"""What type checkers make of atomstore's signatures.

mypy checks this module in the ``type`` env (``mypy --strict``, unused
``type: ignore`` comments are errors): each ``assert_type`` must hold,
and each line marked ``type: ignore[...]`` must be refused, or mypy fails
on the comment left unused.  Run by pytest too, each refused call fails at
run time as well.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO, TextIO

import pytest

from atomstore import Area, FileStore, atomic

if TYPE_CHECKING:
    from typing_extensions import assert_type
else:

    def assert_type(value: object, _type: object) -> object:
        return value


def test_text_mode_yields_a_text_file(tmp_path: Path) -> None:
    with atomic.file(tmp_path / "t") as f:
        assert_type(f, TextIO)
        f.write("text")
        with pytest.raises(TypeError):
            f.write(b"bytes")  # type: ignore[arg-type]
    with atomic.file(tmp_path / "wt", "wt", encoding="utf-16") as f:
        assert_type(f, TextIO)
        f.write("text")
    assert (tmp_path / "t").read_text() == "text"


def test_binary_mode_yields_a_binary_file(tmp_path: Path) -> None:
    with atomic.file(tmp_path / "b", "wb") as f:
        assert_type(f, BinaryIO)
        f.write(b"bytes")
        with pytest.raises(TypeError):
            f.write("text")  # type: ignore[call-overload]
    assert (tmp_path / "b").read_bytes() == b"bytes"


def test_a_mode_known_only_at_run_time_yields_a_file(tmp_path: Path) -> None:
    mode: str = "wb"
    with atomic.file(tmp_path / "m", mode) as f:
        assert_type(f, IO[Any])
        f.write(b"either")


def test_store_files_are_typed_by_mode(tmp_path: Path) -> None:
    store = FileStore(tmp_path, durable=False)
    store.prepare()
    with store.create("t") as text:
        assert_type(text, TextIO)
        text.write("text")
    with store.create("b", "wb") as binary:
        assert_type(binary, BinaryIO)
        binary.write(b"bytes")
    with store.create(mode="wb") as unnamed:
        assert_type(unnamed, BinaryIO)
    store.move("t", "tmp", "new")
    claim = store.claim()
    assert claim is not None
    with claim.open() as raw:
        assert_type(raw, BinaryIO)
        assert raw.read() == b"text"
    with claim.open("r", encoding="ascii") as decoded:
        assert_type(decoded, TextIO)
        assert decoded.read() == "text"
    claim.finish()


def test_areas_are_a_literal(tmp_path: Path) -> None:
    store = FileStore(tmp_path, durable=False)
    store.prepare()
    area: Area = "new"
    assert store.list(area) == []
    with pytest.raises(ValueError, match="unknown area 'news'"):
        store.list("news")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown area"):
        store.remove("x", "trash")  # type: ignore[arg-type]


def test_every_duration_takes_seconds_or_a_timedelta(tmp_path: Path) -> None:
    store = FileStore(tmp_path, durable=False, poll_interval=datetime.timedelta(seconds=0.1))
    store.prepare()
    assert store.claim(wait=datetime.timedelta(milliseconds=1)) is None
    assert store.claim(wait=0.001) is None
    with store.claims(timeout=datetime.timedelta(milliseconds=1)) as claims:
        assert list(claims) == []
    with store.claims(timeout=0) as claims:
        assert list(claims) == []
    assert store.recover(datetime.timedelta(hours=1)) == []
    assert store.clean(older_than=datetime.timedelta(days=2)) == []
