"""The LMDB index: one environment, named databases, retried write transactions.

Writers are serialised by LMDB; readers never block. Every write goes through
:meth:`Index.write`, which runs a function inside one transaction and runs it again
after growing the map when LMDB says the map is full, so callers never see MapFullError.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import lmdb

from .errors import NotAStore, SchemaTooNew, StoreCorrupt, StoreFull

# 2: adds ``layerblobs`` (nothing to convert). An older layerfs must refuse a store that
# has them: its gc would not know those blobs are in use.
SCHEMA_VERSION = 2

# Named databases (see DESIGN.md "The store").
DATABASES = (
    "meta",  # b"schema" -> u32; counters
    "blobs",  # blob id -> u64 size
    "layers",  # 32-byte diff_id -> LayerRecord
    "layernums",  # u32 layer num -> 32-byte diff_id
    "entries",  # u32 layer num | parent | NUL | name -> Entry
    "tarsplit",  # u32 layer num | u32 chunk -> zlib(tar-split segments)
    "images",  # 32-byte image id -> ImageRecord
    "tags",  # b"name:tag" -> 32-byte image id
    "chains",  # 32-byte chain id -> u32 chain num
    "merged",  # u32 chain num | parent | NUL | name -> u32 layer num
    "containers",
    "leases",
    "layerblobs",  # 32-byte diff_id | 32-byte compressed digest -> LayerBlob
)

# Sparse and only address space: large enough that a mount's reader threads never see
# the map resized under them (LMDB forbids a resize while transactions are open).
DEFAULT_MAP_SIZE = 1 << 40

T = TypeVar("T")


class Index:
    """An open LMDB environment with the store's named databases."""

    def __init__(self, path: str, map_size: int | None = None) -> None:
        map_size = map_size or int(os.environ.get("LAYERFS_MAP_SIZE", DEFAULT_MAP_SIZE))
        self.path = path
        try:
            self.env = lmdb.open(path, map_size=map_size, max_dbs=len(DATABASES) + 4,
                                 subdir=True, readahead=False, max_readers=256)
        except lmdb.Error as e:
            raise NotAStore(f"cannot open the index at {path}: {e}") from None
        self.dbs: dict[str, object] = {}
        try:
            with self.env.begin(write=True) as txn:
                for name in DATABASES:
                    self.dbs[name] = self.env.open_db(name.encode(), txn=txn, create=True)
                self._check_schema(txn, path)
        except lmdb.MapFullError:
            raise StoreFull(f"the index at {path} is full and cannot grow") from None
        except lmdb.Error as e:
            raise StoreCorrupt(f"the index at {path} is damaged: {e}") from None

    def _check_schema(self, txn: lmdb.Transaction, path: str) -> None:
        meta = self.dbs["meta"]
        raw = txn.get(b"schema", db=meta)
        if raw is None:
            txn.put(b"schema", struct.pack("<I", SCHEMA_VERSION), db=meta)
            return
        version = struct.unpack("<I", raw)[0]
        if version < SCHEMA_VERSION:
            txn.put(b"schema", struct.pack("<I", SCHEMA_VERSION), db=meta)
        elif version > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"the store at {os.path.dirname(path)} was written by a newer layerfs "
                f"(index schema {version}, this layerfs reads up to {SCHEMA_VERSION}); upgrade layerfs")

    def close(self) -> None:
        self.env.close()

    def db(self, name: str):
        return self.dbs[name]

    @contextmanager
    def read(self) -> Iterator[lmdb.Transaction]:
        """A short read-only transaction (long ones pin old pages)."""
        try:
            txn = self.env.begin(buffers=False)
        except lmdb.MapResizedError:
            self.env.set_mapsize(0)  # another process grew the map: adopt its size
            txn = self.env.begin(buffers=False)
        except lmdb.Error as e:
            raise StoreCorrupt(f"the index is damaged ({e}); run layerfs fsck") from None
        try:
            yield txn
        except lmdb.Error as e:
            raise StoreCorrupt(f"the index is damaged ({e}); run layerfs fsck") from None
        finally:
            txn.abort()

    def write(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        """Run ``fn(txn)`` in one write transaction and commit; grow the map when full.

        ``fn`` may run more than once, so whatever it does outside ``txn`` must be
        idempotent.
        """
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    return fn(txn)
            except lmdb.MapFullError:
                self._grow()
            except lmdb.MapResizedError:
                self.env.set_mapsize(0)
            except lmdb.Error as e:
                # LMDB reports a short write at commit as EIO: say what it usually means.
                fs = os.statvfs(self.path)
                free = fs.f_bavail * fs.f_frsize
                if isinstance(e, lmdb.DiskError) or free < (1 << 20):
                    raise StoreFull("no space left on the store's filesystem while writing "
                                    "the index") from None
                raise StoreCorrupt(f"cannot write the index: {e}") from None

    def _grow(self) -> None:
        size = self.env.info()["map_size"]
        try:
            self.env.set_mapsize(size * 2)
        except lmdb.Error as e:
            raise StoreFull(f"the index cannot grow beyond {size} bytes: {e}") from None

    def next_counter(self, txn: lmdb.Transaction, name: bytes) -> int:
        """Allocate the next number of a counter kept in ``meta`` (inside ``txn``)."""
        meta = self.dbs["meta"]
        raw = txn.get(name, db=meta)
        value = struct.unpack("<I", raw)[0] + 1 if raw else 1
        txn.put(name, struct.pack("<I", value), db=meta)
        return value


def prefix_scan(txn: lmdb.Transaction, db, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Every (key, value) whose key starts with ``prefix``, in key order."""
    cur = txn.cursor(db=db)
    if not cur.set_range(prefix):
        return
    for key, value in cur:
        if not key.startswith(prefix):
            return
        yield key, value


def delete_prefix(txn: lmdb.Transaction, db, prefix: bytes) -> int:
    """Delete every key starting with ``prefix``; returns how many."""
    cur = txn.cursor(db=db)
    n = 0
    if not cur.set_range(prefix):
        return 0
    while cur.key().startswith(prefix):
        n += 1
        if not cur.delete():
            break
    return n
