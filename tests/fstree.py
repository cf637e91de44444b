"""What is on disk, in forms tests compare: listings, trees, store areas."""

from __future__ import annotations

import os
from pathlib import Path

from atomstore import FileStore


def listing(directory: str | Path) -> list[str]:
    """The names in ``directory``, hidden ones included, sorted."""
    return sorted(os.listdir(directory))


def tree(top: str | Path) -> dict[str, str]:
    """Every entry below ``top``: files with their content, directories as
    'name/', symlinks as '-> target' (never followed)."""
    found = {}
    for root, dirs, files in os.walk(top):
        for name in dirs + files:
            path = Path(root, name)
            rel = str(path.relative_to(top))
            if path.is_symlink():
                found[rel] = "-> " + os.readlink(path)
            elif path.is_file():
                found[rel] = path.read_text()
            else:
                found[rel + "/"] = ""
    return found


def store_entries(store: FileStore) -> list[str]:
    """Every entry of every area of ``store`` as 'area/name', hidden ones
    included."""
    found = []
    for area in ("tmp", "new", "cur", "dead"):
        directory = os.path.join(store.path, area)
        if os.path.isdir(directory):
            found += [f"{area}/{n}" for n in sorted(os.listdir(directory))]
    return found
