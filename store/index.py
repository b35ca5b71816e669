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

from .errors import IndexDamaged, NotAStore, SchemaTooNew, StoreCorrupt, StoreFull
from .migrate import migrate

# 2: entries and merged keyed by a digest of the parent path (migrate.py converts a
# version 1 index), and ``layerblobs`` (new, nothing to convert). An older layerfs must
# refuse a version 2 store: its gc would not know the kept compressed blobs are in use.
SCHEMA_VERSION = 2

# Named databases (see DESIGN.md "The store").
DATABASES = (
    "meta",  # b"schema" -> u32; counters
    "blobs",  # blob id -> u64 size
    "layers",  # 32-byte diff_id -> LayerRecord
    "layernums",  # u32 layer num -> 32-byte diff_id
    "entries",  # u32 layer num | D(parent) | name -> Entry (see keys.py)
    "tarsplit",  # u32 layer num | u32 chunk -> zlib(tar-split segments)
    "images",  # 32-byte image id -> ImageRecord
    "tags",  # b"name:tag" -> 32-byte image id
    "chains",  # 32-byte chain id -> u32 chain num
    "merged",  # u32 chain num | D(parent) | name -> u32 layer num, u8 kind
    "containers",
    "leases",
    "layerblobs",  # 32-byte diff_id | 32-byte compressed digest -> LayerBlob
    # 32-byte step key -> 32-byte image id (store/buildcache.py). A cache: an older
    # layerfs may ignore it, its values are images and so gc roots anyway.
    "buildcache",
)

# Sparse and only address space: large enough that a mount's reader threads never see
# the map resized under them (LMDB forbids a resize while transactions are open).
DEFAULT_MAP_SIZE = 1 << 40

T = TypeVar("T")


# The start of an LMDB meta page (pages 0 and 1 of data.mdb): a 16-byte page header,
# then magic, version, address, map size, the two database records (48 bytes each: the
# free-page database's, whose first field holds the page size, and the main one's),
# the last page used, the txn id. A database record ends with its root page number.
_PAGE_HEADER = 16
_MAGIC = 0xBEEFC0DE
_META = struct.Struct("<IIQQI36xQ48xQQ")
# A page header: page number, pad, flags, lower and upper bounds of its free space (an
# overflow page has its page count where lower and upper are).
_PAGE = struct.Struct("<QHHHH")
_NODE = struct.Struct("<HHHH")  # lo, hi, flags, key size; then the key and the data
_P_BRANCH, _P_LEAF, _P_OVERFLOW, _P_LEAF2 = 0x01, 0x02, 0x04, 0x20
_F_BIGDATA = 0x01
_NO_PAGE = (1 << 64) - 1  # an empty database's root


def data_file(path: str) -> str:
    return os.path.join(path, "data.mdb")


def _newest_meta(path: str) -> tuple[int, int, int, int] | None:
    """(file size, page size, last page used, free-page database root) of the index's
    data file, from its newest meta page; None without a file or a valid meta page."""
    try:
        with open(data_file(path), "rb") as f:
            # The meta pages first, the size after: a writer grows the file before it
            # writes the meta page that names the new pages, so read in this order a
            # growing index never looks truncated.
            head = f.read(2 * 65536)
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        return None
    metas = []
    page_size = 0
    offset = 0
    while len(metas) < 2 and len(head) >= offset + _PAGE_HEADER + _META.size:
        magic, _, _, _, psize, free_root, last_pg, txnid = _META.unpack_from(head, offset + _PAGE_HEADER)
        if magic != _MAGIC or not psize:
            break
        page_size = page_size or psize
        metas.append((txnid, last_pg, free_root))
        offset += page_size  # the second meta page starts one page in
    if not metas:
        return None  # not an LMDB file at all: LMDB refuses it by itself, safely
    _, last_pg, free_root = max(metas)
    return size, page_size, last_pg, free_root


def mapped_size(path: str) -> tuple[int, int] | None:
    """(bytes in the data file of the index at ``path``, bytes its newest meta page says
    its pages take), or None if there is no data file or it has no valid meta page."""
    meta = _newest_meta(path)
    return None if meta is None else (meta[0], (meta[2] + 1) * meta[1])


def _free_pages(fd: int, page_size: int, root: int, file_pages: int) -> set[int] | None:
    """The page numbers the free-page database lists, read with pread (never mapped:
    a missing page is an answer, not a SIGBUS); None if a page of it is missing."""
    free: set[int] = set()
    seen: set[int] = set()
    todo = [] if root == _NO_PAGE else [root]
    while todo:
        pgno = todo.pop()
        if pgno >= file_pages or pgno in seen:
            return None  # missing, or not a tree (pages reused under a concurrent writer)
        seen.add(pgno)
        page = os.pread(fd, page_size, pgno * page_size)
        _, _, flags, lower, _ = _PAGE.unpack_from(page)
        if flags & _P_LEAF2:
            return None  # the free-page database has no fixed-size keys: not an LMDB we know
        for i in range((lower - _PAGE_HEADER) // 2):
            (at,) = struct.unpack_from("<H", page, _PAGE_HEADER + 2 * i)
            lo, hi, nflags, ksize = _NODE.unpack_from(page, at)
            if flags & _P_BRANCH:
                todo.append(lo | hi << 16 | nflags << 32)
                continue
            data = at + _NODE.size + ksize
            if nflags & _F_BIGDATA:  # the page list lives in overflow pages
                (first,) = struct.unpack_from("<Q", page, data)
                if first >= file_pages:
                    return None
                _, _, _, lo_pages, hi_pages = _PAGE.unpack(os.pread(fd, _PAGE.size, first * page_size))
                count = lo_pages | hi_pages << 16  # an overflow page's page count
                if first + count > file_pages:
                    return None
                ids = os.pread(fd, count * page_size - _PAGE_HEADER, first * page_size + _PAGE_HEADER)
            else:
                ids = page[data:data + (lo | hi << 16)]
            n = struct.unpack_from("<Q", ids)[0]  # an id list: its length, then the pages
            free.update(struct.unpack_from(f"<{n}Q", ids, 8))
    return free


def truncation(path: str) -> str | None:
    """Why the index at ``path`` cannot be mapped safely (its data file is shorter than
    the pages in use: reading those would be a SIGBUS), or None.

    LMDB may end a file short of its last page number legitimately: a page allocated
    and freed within one transaction is never written. Only pages missing from the file
    that the free-page database does not list are damage."""
    for attempt in range(2):
        meta = _newest_meta(path)
        if meta is None:
            return None
        size, page_size, last_pg, free_root = meta
        needed = (last_pg + 1) * page_size
        if size >= needed:
            return None
        file_pages = size // page_size
        with open(data_file(path), "rb") as f:
            # Read as no registered reader, the free-page tree may be rewritten by a
            # writer meanwhile: a damaged-looking answer is asked for once more.
            free = _free_pages(f.fileno(), page_size, free_root, file_pages)
        if free is not None and all(p in free for p in range(file_pages, last_pg + 1)):
            return None
    return f"it is truncated ({size} bytes where its pages need {needed})"


class Index:
    """An open LMDB environment with the store's named databases.

    ``create`` says whether a missing or empty data file may be made anew: for a store
    that already has content, one is damage, and IndexDamaged is raised instead.
    """

    def __init__(self, path: str, map_size: int | None = None, create: bool = True) -> None:
        self.path = path
        self._map_size = map_size or int(os.environ.get("LAYERFS_MAP_SIZE", DEFAULT_MAP_SIZE))
        self._open(create)

    def _open(self, create: bool) -> None:
        path, map_size = self.path, self._map_size
        try:
            size = os.path.getsize(data_file(path))
        except FileNotFoundError:
            size = -1
        if size <= 0 and not create:
            what = "missing" if size < 0 else "empty"
            raise IndexDamaged(f"the index {data_file(path)} is {what} but the store holds data; "
                               "run layerfs fsck")
        problem = truncation(path)
        if problem:
            raise IndexDamaged(f"the index {data_file(path)} is damaged: {problem}; run layerfs fsck")
        try:
            self.env = lmdb.open(path, map_size=map_size, max_dbs=len(DATABASES) + 4,
                                 subdir=True, readahead=False, max_readers=256, mode=0o600)
        except (lmdb.InvalidError, lmdb.CorruptedError, lmdb.VersionMismatchError) as e:
            raise IndexDamaged(f"the index at {path} is damaged ({e}); run layerfs fsck") from None
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
            self.env.close()
            raise IndexDamaged(f"the index at {path} is damaged: {e}; run layerfs fsck") from None

    def _check_schema(self, txn: lmdb.Transaction, path: str) -> None:
        meta = self.dbs["meta"]
        raw = txn.get(b"schema", db=meta)
        if raw is None:
            txn.put(b"schema", struct.pack("<I", SCHEMA_VERSION), db=meta)
            txn.put(b"store-id", os.urandom(16), db=meta)
            return
        if txn.get(b"store-id", db=meta) is None:  # written before stores had an id
            txn.put(b"store-id", os.urandom(16), db=meta)
        version = struct.unpack("<I", raw)[0]
        if version < SCHEMA_VERSION:
            migrate(txn, self.dbs, version, SCHEMA_VERSION)
            txn.put(b"schema", struct.pack("<I", SCHEMA_VERSION), db=meta)
        elif version > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"the store at {os.path.dirname(path)} was written by a newer layerfs "
                f"(index schema {version}, this layerfs reads up to {SCHEMA_VERSION}); upgrade layerfs")

    def close(self) -> None:
        self.env.close()

    @contextmanager
    def closed(self) -> Iterator[None]:
        """The environment closed while the block runs, open again after it: a process
        forks in the block (an LMDB environment must not cross a fork, and a child could
        not open its own while it inherited one: py-lmdb refuses a second in a process)."""
        self.env.close()
        try:
            yield
        finally:
            self._open(create=False)

    def store_id(self) -> str:
        """The random id given to the store when its index was made (the marker outside
        the index holds it too)."""
        with self.read() as txn:
            return bytes(txn.get(b"store-id", db=self.dbs["meta"])).hex()

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
            raise IndexDamaged(f"the index is damaged ({e}); run layerfs fsck") from None
        try:
            yield txn
        except lmdb.Error as e:
            raise IndexDamaged(f"the index is damaged ({e}); run layerfs fsck") from None
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
