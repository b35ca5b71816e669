"""Content-addressed blobs: file contents named by xxh3-128, immutable once published.

An ingest stages new contents in its own directory under ``tmp/`` and publishes them
all at once: one ``syncfs`` makes the staged bytes durable, then each blob is moved
into ``blobs/ab/cdef...`` by a rename that never replaces an existing name. A crash
leaves only garbage in ``tmp/`` or unrecorded blob files, which gc removes.

Small contents (up to SMALL bytes) are hashed in memory and written once, straight
under their id; larger ones stream through a temporary name. Either way a staged file
is created 0400, so it needs no chmod before it is published.

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
# Contents up to this size are read into memory, hashed and written once (no temporary
# name, no read back). Above it a copy goes through copy_file_range, which shares
# extents (a reflink) on filesystems that can.
SMALL = 64 << 10

# Patched by the collision test to force every content onto one hash.
new_hasher: Callable[[], "xxhash.xxh3_128"] = xxhash.xxh3_128

# The process's own libc (ctypes.util.find_library would run ldconfig at every start-up).
_libc = ctypes.CDLL(None, use_errno=True)


_renameat2 = getattr(_libc, "renameat2", None)
if _renameat2 is not None:
    _renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def rename_noreplace(src: str, dst: str) -> None:
    """Move ``src`` to ``dst`` unless ``dst`` exists (FileExistsError, ``src`` left in
    place); a link and an unlink where the kernel or filesystem cannot do it in one."""
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), dst)
    os.link(src, dst)
    os.unlink(src)


def _umask() -> int:
    """The process's umask, read without changing it (0o777, "assume the worst", where
    /proc does not say)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o777


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


def holds(path: str, data: bytes) -> bool:
    """True when the file at ``path`` holds exactly ``data`` (FileNotFoundError if none)."""
    with open(path, "rb") as f:
        return f.read(len(data) + 1) == data


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
        return f"{self.dir}/{blob_id[:2]}/{blob_id[2:]}"  # self.name(), on a hot path

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
        self.found: list[str] = []  # staged blobs that another ingest published first
        self.used: dict[str, int] = {}  # every blob id this ingest returned -> size
        self._n = 0
        # A staged file is created 0400; only a umask that takes the owner's read bit
        # away calls for a chmod as well.
        self._fix_mode = bool(_umask() & 0o400)

    def __enter__(self) -> "Ingest":
        return self

    def __exit__(self, *exc) -> None:
        self.abort()

    def _new_name(self) -> str:
        self._n += 1
        return os.path.join(self.dir, f"new-{self._n}")

    def create(self, path: str) -> int:
        """Create a staging file, private and read-only once closed; return a descriptor
        that writes it."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o400)
        if self._fix_mode:
            os.fchmod(fd, 0o400)
        return fd

    def _write(self, path: str, data: bytes) -> None:
        fd = self.create(path)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)

    def _write_new(self, data: bytes) -> str:
        path = self._new_name()
        self._write(path, data)
        return path

    def writer(self) -> "BlobWriter":
        """A writer for one new blob: ``write`` chunks, then ``finish`` for its id."""
        return BlobWriter(self, self._new_name())

    def add(self, data: bytes, what: str = "a blob") -> str:
        """Stage ``data`` as a blob (meant for small contents: they are compared in
        memory); return its id ("" for no bytes). ``what`` names it in errors."""
        if not data:
            return ""
        h = new_hasher()
        h.update(data)
        try:
            blob_id = self._place(h.hexdigest(), len(data), lambda p: holds(p, data),
                                  lambda p: self._write(p, data), lambda: self._write_new(data),
                                  lambda: None)
        except OSError as e:
            raise os_error(e, f"staging {what}") from None
        self.used[blob_id] = len(data)
        return blob_id

    def copy_file(self, src: int, what: str, size: int = -1) -> Iterator[bytes]:
        """Copy the open file ``src`` (from its start) into a new blob, then yield its
        bytes once for hashing; the generator's return value is the blob id. ``what``
        names the file in errors; ``size``, if known, is what the file should hold (the
        caller checks, after the copy, that the file was not changed meanwhile).

        The blob holds exactly the bytes that were hashed even if the source changes
        meanwhile: a small file is read once into memory, a larger one is copied in
        the kernel (a reflink where the filesystem can) and the copy is read back.
        """
        if 0 <= size <= SMALL:
            try:
                # Exactly ``size`` bytes: a file that grew or shrank meanwhile has a new
                # size and mtime, which the caller's check after the read sees.
                data = _pread_all(src, size)
            except OSError as e:
                raise os_error(e, f"reading {what}") from None
            blob_id = self.add(data, what)
            if data:
                yield data
            return blob_id
        tmp = self._new_name()
        try:
            dst = self.create(tmp)
            try:
                os.lseek(src, 0, os.SEEK_SET)
                _copy_fd(src, dst)
            finally:
                os.close(dst)
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
        blob_id = self._place_file(tmp, h.hexdigest(), size)
        self.used[blob_id] = size
        return blob_id

    def _place_file(self, tmp: str, digest: str, size: int) -> str:
        """Give the staged file ``tmp`` its blob id (see :meth:`_place`)."""
        return self._place(digest, size, lambda p: same_content(p, tmp), lambda p: os.rename(tmp, p),
                           lambda: tmp, lambda: os.unlink(tmp))

    def _place(self, digest: str, size: int, same_as: Callable[[str], bool],
               stage_as: Callable[[str], None], hold: Callable[[], str],
               drop: Callable[[], None]) -> str:
        """The id of new contents: ``same_as(path)`` compares them with a file,
        ``stage_as(path)`` stages them there, ``hold()`` keeps a copy of contents that
        already have a blob and returns its path, ``drop()`` forgets them."""
        # Walk hex, hex-1, hex-2... until a candidate is free or holds these very bytes.
        for n in range(1 << 16):
            cand = digest if n == 0 else f"{digest}-{n}"
            if cand in self.staged:
                if same_as(os.path.join(self.dir, cand)):
                    drop()
                    return cand
                continue
            try:
                same = same_as(self.blobs.path(cand))
            except FileNotFoundError:
                same = None  # no such blob (or collected by gc while we compared)
            if same is not None:
                if same:
                    # Keep our copy until publish: gc may take an unreferenced blob
                    # before this ingest is recorded (publish checks, under the lock).
                    if cand in self.held:
                        drop()
                    else:
                        self.held[cand] = hold()
                    return cand
                continue
            stage_as(os.path.join(self.dir, cand))
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
                syncfs(self.dir)
                crashpoints.point("ingest-staged")
                made: set[str] = set()
                for blob_id in self.staged:
                    src, dst = os.path.join(self.dir, blob_id), self.blobs.path(blob_id)
                    if blob_id[:2] not in made:
                        os.makedirs(os.path.dirname(dst), mode=0o700, exist_ok=True)
                        made.add(blob_id[:2])
                    try:
                        rename_noreplace(src, dst)
                        self.published.append(dst)
                        crashpoints.point("ingest-linked")
                    except FileExistsError:
                        # Published meanwhile by another ingest: fine if the same bytes.
                        if not same_content(src, dst):
                            raise StoreCorrupt(
                                f"blob {blob_id} was published concurrently with different "
                                "bytes; retry the import") from None
                        self.found.append(blob_id)  # our copy stays, for ensure_published
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
        import took back before this transaction (its unpublish saw no record yet).

        Only a blob another ingest published first can be taken back so: the files this
        ingest moved into place are in no other ingest's list."""
        for blob_id in self.found:
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
            self.file = os.fdopen(ingest.create(tmp), "wb")
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
        blob_id = self.ingest._place_file(self.tmp, self.hasher.hexdigest(), self.size)
        self.ingest.used[blob_id] = self.size
        return blob_id


def _pread_all(fd: int, n: int) -> bytes:
    """Up to ``n`` bytes from the start of ``fd`` (fewer only at its end)."""
    parts, got = [], 0
    while got < n:
        data = os.pread(fd, n - got, got)
        if not data:
            break
        parts.append(data)
        got += len(data)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def blob_size_record(size: int) -> bytes:
    return struct.pack("<Q", size)
