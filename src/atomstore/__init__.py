"""atomstore: move files between processes safely.

* :class:`FileStore`, a maildir-style store and lock-free work queue;
* :mod:`atomstore.atomic`, atomic replacement of files and directory trees.
"""

from __future__ import annotations

from . import atomic
from ._batch import Batch
from ._claim import Claim, ClaimLostError, Claims, KeepAlive
from ._store import FileStore
from ._work import Report, Worker
from .atomic import Capabilities

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    from ._args import Area
else:
    Area = str  # to type checkers: Literal["tmp", "new", "cur", "dead", "delay"]

__all__ = [
    "Area",
    "Batch",
    "Capabilities",
    "Claim",
    "ClaimLostError",
    "Claims",
    "FileStore",
    "KeepAlive",
    "Report",
    "Worker",
    "atomic",
]
__version__ = "0.1.0.dev0"

# Show the public names where users import them from (tracebacks, reprs).
for _public in (Batch, Claim, ClaimLostError, Claims, FileStore, KeepAlive, Report, Worker):
    _public.__module__ = __name__
del _public
