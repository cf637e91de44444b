"""atomstore: move files between processes safely.

* :class:`FileStore`, a maildir-style store and lock-free work queue;
* :mod:`atomstore.atomic`, atomic replacement of files and directory trees.
"""

from __future__ import annotations

from . import atomic
from ._store import Claim, ClaimLostError, Claims, FileStore
from .atomic import Capabilities

__all__ = ["Capabilities", "Claim", "ClaimLostError", "Claims", "FileStore", "atomic"]
__version__ = "0.1.0.dev0"
