"""The store's marker, outside the index: the store's id and what the index last held.

The index is one file. Lost, emptied or replaced, it would make the store look empty,
and gc would then delete every blob as unrecorded. ``STORE/store.json``, written when
the index is made and rewritten after every change of images or tags, says that this
directory has an index with that id and names the images (with their tags) it held, so
a damaged index is refused rather than believed, and fsck can say exactly what it lost.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import dataclass, field

import lmdb

from .records import bytes_digest

NAME = "store.json"


@dataclass(slots=True, frozen=True)
class Marker:
    store_id: str  # "" when the marker exists but cannot be read
    images: dict[str, list[str]] = field(default_factory=dict)  # image id -> its tags
    layers: int = 0
    updated_ns: int = 0


def path_of(root: str) -> str:
    return os.path.join(root, NAME)


def read(root: str) -> Marker | None:
    """The marker, or None if the store has none (a new store, or one made before
    markers); a marker that cannot be parsed still says the store had an index."""
    try:
        with open(path_of(root), "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    try:
        doc = json.loads(raw)
        return Marker(str(doc["store_id"]), {str(k): list(v) for k, v in doc.get("images", {}).items()},
                      int(doc.get("layers", 0)), int(doc.get("updated_ns", 0)))
    except (ValueError, KeyError, TypeError, AttributeError):
        return Marker("")


def catalog(txn: lmdb.Transaction, index) -> tuple[dict[str, list[str]], int]:
    """(image id -> tags, number of layers) as ``txn`` sees the index."""
    images: dict[str, list[str]] = {bytes_digest(k): [] for k, _ in txn.cursor(db=index.db("images"))}
    for k, v in txn.cursor(db=index.db("tags")):
        images.setdefault(bytes_digest(v), []).append(bytes(k).decode())
    return images, txn.stat(index.db("layers"))["entries"]


def write(root: str, store_id: str, images: dict[str, list[str]], layers: int) -> None:
    """Replace the marker atomically (readable by the store's owner only)."""
    doc = {"store_id": store_id, "images": {k: sorted(v) for k, v in sorted(images.items())},
           "layers": layers, "updated_ns": time.time_ns()}
    tmp = f"{path_of(root)}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    os.replace(tmp, path_of(root))


def update(root: str, index) -> None:
    """Rewrite the marker from the index. The index is read under a lock on the marker,
    so of two processes updating at once the later one writes the newer state."""
    fd = os.open(path_of(root) + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with index.read() as txn:
            images, layers = catalog(txn, index)
        try:
            write(root, index.store_id(), images, layers)
        except OSError:
            pass  # a full disk: the marker still names the store; it is brought up to date later
    finally:
        os.close(fd)
