"""Named points where tests kill the process, to prove crash safety.

``LAYERFS_CRASH_AT=name`` (or ``name:N`` for the N-th time it is reached) makes the
process SIGKILL itself there. Unset, a point costs one dict lookup.
"""

from __future__ import annotations

import os
import signal

_target = os.environ.get("LAYERFS_CRASH_AT", "")
_name, _, _nth = _target.partition(":")
_count = 0

POINTS = (
    "ingest-staged",  # blobs written to tmp/, nothing published
    "ingest-linked",  # after each blob is linked into blobs/, before the index knows it
    "record-before-commit",  # the layer's write transaction is built but not committed
    "record-committed",  # the layer and image are recorded
    "gc-swept",  # gc's index transaction committed, files not yet deleted
    "gc-deleting",  # after each blob file gc deletes
)


def point(name: str) -> None:
    """Kill this process here if the environment asks for it."""
    global _count
    if name != _name:
        return
    _count += 1
    if not _nth or _count == int(_nth):
        os.kill(os.getpid(), signal.SIGKILL)
