"""The store's lock: gc takes it exclusively; recording new layers takes it shared.

A ``flock`` on ``STORE/gc.lock``. Publishing blobs and recording the layer and image
that use them happens under the shared lock, so gc (exclusive) never sees a blob file
published but not yet recorded, nor a layer recorded but not yet in an image. Readers
(ls, cat, mounts) never take it (nor LMDB's writer lock, once an image's tree is flattened).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from collections.abc import Iterator


class StoreLock:
    def __init__(self, root: str) -> None:
        self.path = os.path.join(root, "gc.lock")

    @contextlib.contextmanager
    def _held(self, mode: int, wait_message: str | None) -> Iterator[None]:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                if wait_message:
                    print(f"layerfs: {wait_message}", file=sys.stderr, flush=True)
                fcntl.flock(fd, mode)
            yield
        finally:
            os.close(fd)  # releases the lock

    def shared(self) -> contextlib.AbstractContextManager[None]:
        """Held while new blobs are published and recorded (waits while gc runs)."""
        return self._held(fcntl.LOCK_SH, "waiting for a running gc to finish")

    def exclusive(self) -> contextlib.AbstractContextManager[None]:
        """Held by gc: no layer is being recorded meanwhile."""
        return self._held(fcntl.LOCK_EX, "waiting for imports, commits or another gc to finish")
