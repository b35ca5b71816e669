"""Content-addressed blobs: file contents named by xxh3-128, immutable once published.

An ingest stages new contents in its own directory under ``tmp/`` and publishes them
all at once: one ``syncfs`` makes the staged bytes durable, then each blob is linked
into ``blobs/ab/cdef...`` (``link`` never replaces an existing name). A crash leaves
only garbage in ``tmp/`` or unrecorded blob files, which gc removes.

xxh3 is not a cryptographic hash, so equal hashes are never trusted alone: a candidate
blob is byte-compared, and different bytes under the same hash get the next free id
``<hex>-1``, ``<hex>-2``...
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import struct
import uuid
from collections.abc import Callable, Iterator
from typing import BinaryIO

import xxhash

from .errors import StoreCorrupt, StoreError, StoreFull
from . import crashpoints, leases
from .index import Index

CHUNK = 1 << 20

# Patched by the collision test to force every content onto one hash.
new_hasher: Callable[[], "xxhash.xxh3_128"] = xxhash.xxh3_128

# The process's own libc (ctypes.util.find_library would run ldconfig at every start-up).
_libc = ctypes.CDLL(None, use_errno=True)


def syncfs(path: str) -> None:
    """Flush the whole filesystem holding ``path`` (one call instead of an fsync per file)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
    finally:
        os.close(fd)


def os_error(e: OSError, what: str) -> StoreError:
    """Turn an OSError from store I/O into the StoreError a user should see."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreFull(f"no space left on the store's filesystem while {what}")
    return StoreError(f"{what}: {e.strerror or e}")


def _copy_fd(src: int, dst: int) -> None:
    """Copy all of ``src`` to ``dst`` with copy_file_range (reflink on btrfs/xfs)."""
    while True:
        try:
            n = os.copy_file_range(src, dst, 1 << 30)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            with os.fdopen(os.dup(src), "rb") as fsrc, os.fdopen(os.dup(dst), "wb") as fdst:
                shutil.copyfileobj(fsrc, fdst, CHUNK)
            return
        if n == 0:
            return


def same_content(a: str, b: str) -> bool:
    """True when two files hold the same bytes."""
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            ca, cb = fa.read(CHUNK), fb.read(CHUNK)
            if ca != cb:
                return False
            if not ca:
                return True


class BlobStore:
    """The ``blobs/`` tree of a store, recorded in the index's ``blobs`` database."""

    def __init__(self, root: str, index: Index) -> None:
        self.root = root
        self.dir = os.path.join(root, "blobs")
        self.tmp = os.path.join(root, "tmp")
        self.index = index
        self._verified: set[tuple] = set()

    def path(self, blob_id: str) -> str:
        return os.path.join(self.dir, self.name(blob_id))

    @staticmethod
    def name(blob_id: str) -> str:
        """Where the blob lies below the blob directory: ``ab/cdef...``."""
        return f"{blob_id[:2]}/{blob_id[2:]}"

    def open(self, blob_id: str) -> BinaryIO:
        """Open a blob for reading ("" is the empty file)."""
        if not blob_id:
            return open(os.devnull, "rb")
        try:
            return open(self.path(blob_id), "rb")
        except FileNotFoundError:
            raise StoreCorrupt(f"blob {blob_id} is missing from the store") from None

    VERIFIED_MAX = 200_000  # checks remembered (then forgotten at once and made again)

    def open_verified(self, blob_id: str) -> BinaryIO:
        """Open a blob after checking its contents against its id: damaged data gives
        StoreCorrupt, never wrong bytes. A check holds while the file's inode, size,
        mtime and ctime stay the same (any write to it changes them)."""
        return os.fdopen(self.verified_fd(blob_id), "rb")

    def verified_fd(self, blob_id: str) -> int:
        """:meth:`open_verified` as a bare descriptor, which the caller closes (a mount
        opens blobs at every first open of a file: no file object on that path)."""
        if not blob_id:
            return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fd = os.open(self.path(blob_id), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise StoreCorrupt(f"blob {blob_id} is missing from the store") from None
        try:
            st = os.fstat(fd)
            key = (blob_id, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            if key not in self._verified:
                h = new_hasher()
                offset = 0
                while chunk := os.pread(fd, CHUNK, offset):
                    h.update(chunk)
                    offset += len(chunk)
                if h.hexdigest() != blob_id.split("-", 1)[0]:
                    raise StoreCorrupt(f"blob {blob_id} is damaged (its contents do not match its "
                                       "hash); run layerfs fsck")
                if len(self._verified) >= self.VERIFIED_MAX:
                    self._verified.clear()
                self._verified.add(key)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def ingest(self) -> "Ingest":
        """Start staging new blobs; use as a context manager (aborts unless published)."""
        return Ingest(self)


class Ingest:
    """New blobs of one import or commit, staged until :meth:`publish`."""

    def __init__(self, blobs: BlobStore) -> None:
        self.blobs = blobs
        self.id = "ingest-" + uuid.uuid4().hex
        self.dir = os.path.join(blobs.tmp, self.id)
        leases.take(blobs.index, self.id)  # gc leaves a live ingest's staging alone
        os.makedirs(self.dir)
        self.staged: dict[str, int] = {}  # blob id -> size, staged here
        self.held: dict[str, str] = {}  # blob id -> our own copy of a blob that already exists
        self.published: list[str] = []  # blob files this ingest added to blobs/
        self.used: dict[str, int] = {}  # every blob id this ingest returned -> size
        self._n = 0

    def __enter__(self) -> "Ingest":
        return self

    def __exit__(self, *exc) -> None:
        self.abort()

    def writer(self) -> "BlobWriter":
        """A writer for one new blob: ``write`` chunks, then ``finish`` for its id."""
        self._n += 1
        return BlobWriter(self, os.path.join(self.dir, f"new-{self._n}"))

    def copy_file(self, src: int, what: str) -> Iterator[bytes]:
        """Copy the open file ``src`` (from its start) into a new blob in the kernel (a
        reflink where the filesystem can), then yield its bytes once for hashing; the
        generator's return value is the blob id. ``what`` names the file in errors.

        The copy is made first and read back, so the blob holds exactly the bytes that
        were hashed even if the source changes meanwhile.
        """
        self._n += 1
        tmp = os.path.join(self.dir, f"new-{self._n}")
        try:
            with open(tmp, "wb") as dst:
                os.lseek(src, 0, os.SEEK_SET)
                _copy_fd(src, dst.fileno())
            h = new_hasher()
            size = 0
            with open(tmp, "rb") as f:
                while chunk := f.read(CHUNK):
                    h.update(chunk)
                    size += len(chunk)
                    yield chunk
        except OSError as e:
            raise os_error(e, f"copying {what} into a blob") from None
        if size == 0:
            os.unlink(tmp)
            return ""
        blob_id = self._place(tmp, h.hexdigest(), size)
        self.used[blob_id] = size
        return blob_id

    def _place(self, tmp: str, digest: str, size: int) -> str:
        # Walk hex, hex-1, hex-2... until a candidate is free or holds these very bytes.
        for n in range(1 << 16):
            cand = digest if n == 0 else f"{digest}-{n}"
            staged = os.path.join(self.dir, cand)
            if cand in self.staged:
                if same_content(staged, tmp):
                    os.unlink(tmp)
                    return cand
                continue
            final = self.blobs.path(cand)
            try:
                same = same_content(final, tmp) if os.path.exists(final) else None
            except FileNotFoundError:
                same = None  # collected by gc while we compared: the name is free
            if same is not None:
                if same:
                    # Keep our copy until publish: gc may take an unreferenced blob
                    # before this ingest is recorded (publish checks, under the lock).
                    if cand in self.held:
                        os.unlink(tmp)
                    else:
                        self.held[cand] = tmp
                    return cand
                continue
            os.rename(tmp, staged)
            self.staged[cand] = size
            return cand
        raise StoreCorrupt(f"too many different contents share the hash {digest}")

    def publish(self) -> dict[str, int]:
        """Make the staged blobs durable and visible; return every used blob id -> size.

        The caller records the returned blobs in the index in the same transaction as
        whatever refers to them.
        """
        for blob_id, copy in self.held.items():
            if self._recorded(blob_id) and os.path.exists(self.blobs.path(blob_id)):
                os.unlink(copy)
            else:  # collected meanwhile (or never recorded): publish our copy
                os.rename(copy, os.path.join(self.dir, blob_id))
                self.staged[blob_id] = self.used[blob_id]
        self.held.clear()
        try:
            if self.staged:
                for blob_id in self.staged:
                    os.chmod(os.path.join(self.dir, blob_id), 0o400)  # immutable, private
                syncfs(self.dir)
                crashpoints.point("ingest-staged")
                for blob_id in self.staged:
                    src, dst = os.path.join(self.dir, blob_id), self.blobs.path(blob_id)
                    os.makedirs(os.path.dirname(dst), mode=0o700, exist_ok=True)
                    try:
                        os.link(src, dst)
                        self.published.append(dst)
                        crashpoints.point("ingest-linked")
                    except FileExistsError:
                        # Published meanwhile by another ingest: fine if the same bytes.
                        if not same_content(src, dst):
                            raise StoreCorrupt(
                                f"blob {blob_id} was published concurrently with different "
                                "bytes; retry the import") from None
                syncfs(self.blobs.dir)
        except OSError as e:
            raise os_error(e, "publishing blobs") from None
        return dict(self.used)

    def _recorded(self, blob_id: str) -> bool:
        with self.blobs.index.read() as txn:
            return txn.get(blob_id.encode(), db=self.blobs.index.db("blobs")) is not None

    def unpublish(self) -> None:
        """Take back the blob files this ingest published, its record having failed.

        Only files that no record names: another import may have recorded the same
        bytes meanwhile. The check and the unlink run in one write transaction, which
        serialises with that import's recording (see :meth:`ensure_published`).
        """
        paths = list(self.published)
        self.published.clear()

        def txn_fn(txn) -> None:
            bdb = self.blobs.index.db("blobs")
            for path in paths:
                blob_id = os.path.basename(os.path.dirname(path)) + os.path.basename(path)
                if txn.get(blob_id.encode(), db=bdb) is None:
                    try:
                        os.unlink(path)
                    except FileNotFoundError:
                        pass

        try:
            self.blobs.index.write(txn_fn)
        except StoreError:
            pass  # left for gc, which removes blob files that no record names

    def ensure_published(self) -> None:
        """Inside the recording transaction: put back any staged blob whose file a failed
        import took back before this transaction (its unpublish saw no record yet)."""
        for blob_id in self.staged:
            final = self.blobs.path(blob_id)
            if not os.path.exists(final):
                os.link(os.path.join(self.dir, blob_id), final)

    def abort(self) -> None:
        """Drop everything staged (a no-op for blobs already published) and the lease."""
        shutil.rmtree(self.dir, ignore_errors=True)
        try:
            leases.release(self.blobs.index, self.id)
        except StoreError:
            pass  # an expired lease is collected by gc


class BlobWriter:
    """Streams one blob into an ingest's staging directory, hashing as it goes."""

    def __init__(self, ingest: Ingest, tmp: str) -> None:
        self.ingest = ingest
        self.tmp = tmp
        self.hasher = new_hasher()
        self.size = 0
        try:
            self.file = open(tmp, "wb")
        except OSError as e:
            raise os_error(e, "staging a blob") from None

    def write(self, chunk: bytes) -> None:
        self.hasher.update(chunk)
        self.size += len(chunk)
        try:
            self.file.write(chunk)
        except OSError as e:
            self.file.close()
            raise os_error(e, "staging a blob") from None

    def finish(self) -> str:
        """Close the blob and return its id ("" for empty contents)."""
        try:
            self.file.close()
        except OSError as e:
            raise os_error(e, "staging a blob") from None
        if self.size == 0:
            os.unlink(self.tmp)
            return ""
        blob_id = self.ingest._place(self.tmp, self.hasher.hexdigest(), self.size)
        self.ingest.used[blob_id] = self.size
        return blob_id


def blob_size_record(size: int) -> bytes:
    return struct.pack("<Q", size)
