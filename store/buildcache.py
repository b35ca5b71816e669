"""The build cache: what a build step made, by the step's key.

A key is a digest the builder computes from the parent image and everything else the
step depends on (its instruction, the digests of the files it copies, the build
arguments it sees); the value is the image the step made. The images are ordinary
untagged images, so they are gc roots like any other, and ``prune`` (which removes
untagged images) clears the cache; gc drops the keys whose image is gone.
"""

from __future__ import annotations

import lmdb

from .index import Index
from .records import bytes_digest, digest_bytes

DB = "buildcache"


def lookup(index: Index, key: bytes) -> str | None:
    """The image id a step with this key made, if that image is still stored."""
    with index.read() as txn:
        raw = txn.get(key, db=index.db(DB))
        if raw is None or txn.get(bytes(raw), db=index.db("images")) is None:
            return None
        return bytes_digest(raw)


def remember(index: Index, key: bytes, image_id: str) -> None:
    """Note that a step with this key made ``image_id``."""
    index.write(lambda txn: txn.put(key, digest_bytes(image_id), db=index.db(DB)))


def cached_images(index: Index) -> set[str]:
    """The ids of the images the cache holds (a listing hides the untagged ones)."""
    with index.read() as txn:
        return {bytes_digest(v) for _, v in txn.cursor(db=index.db(DB))}


def drop_dead(txn: lmdb.Transaction, index: Index) -> int:
    """Delete the keys whose image is gone (inside gc's transaction); returns how many."""
    images = index.db("images")
    dead = [bytes(k) for k, v in txn.cursor(db=index.db(DB)) if txn.get(bytes(v), db=images) is None]
    for key in dead:
        txn.delete(key, db=index.db(DB))
    return len(dead)
