"""Sphinx configuration: the README is the front page, its parts the guides."""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))

import atomstore  # noqa: E402

project = "atomstore"
author = "the atomstore authors"
copyright = "the atomstore authors, MIT licence"
release = atomstore.__version__
version = release

extensions = ["sphinx.ext.autodoc", "sphinxarg.ext"]
html_theme = "furo"
html_title = f"atomstore {release}"
exclude_patterns = ["_build"]
# Tables of the README and the benchmarks are wide: no smart quotes in code.
smartquotes = False

nitpicky = True
# The standard library's names cannot be linked here (no network to fetch
# Python's inventory): only atomstore's own must all resolve.
nitpick_ignore_regex = [
    (
        "py:class",
        r"(typing|collections\.abc|os|io|datetime|pathlib|contextlib|threading|asyncio)\..*",
    ),
    ("py:class", r"(IO|BinaryIO|TextIO|Any|Callable|Iterable|Iterator|Literal|Union)(\[.*\])?"),
    ("py:class", r"(str|int|float|bool|bytes|bytearray|memoryview|object|dict|list|tuple)"),
    ("py:class", r"(AbstractContextManager|builtins\.list|TypeAliasForwardRef)"),
    ("py:func", r"(socket|os|time|open)(\..*)?"),
    ("py:exc", r".*Error"),
    # Names that exist for type checkers only (the package imports no typing
    # at run time): documented in words where they are used.
    ("py:class", r"(StrPath|Data|Handler|Queue|Job|Areas|_watch\.Waiter|_AtomicFileContext)"),
    ("py:class", r"(Text|Binary)(Write|Read)Mode"),
]
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_type_aliases = {
    "Duration": "atomstore.Duration",
    "Area": "atomstore.Area",
}
