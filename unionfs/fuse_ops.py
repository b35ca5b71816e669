"""The FUSE adapter: mfusepy ``Operations`` mapped onto the union view.

Thin on purpose: paths lose their leading slash, the caller's uid/gid are passed to
creating calls, and every exception becomes an errno (an unexpected one is logged and
returned as EIO, never raised into libfuse). libfuse 3 is loaded explicitly.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import itertools
import logging
import operator
import os
import stat
import struct
import threading
import time
from dataclasses import dataclass

from layerfs.store.errors import StoreError

log = logging.getLogger("layerfs.fuse")


class FuseMissing(StoreError):
    """libfuse 3 or /dev/fuse is not available."""


FUSE3_SONAME = "libfuse3.so.3"


def load_mfusepy():
    """Import mfusepy bound to libfuse 3 (it would pick libfuse 2 when both exist)."""
    if "FUSE_LIBRARY_PATH" not in os.environ:
        try:  # by its soname first: find_library runs ldconfig, a few ms of every mount
            ctypes.CDLL(FUSE3_SONAME)
            lib = FUSE3_SONAME
        except OSError:
            lib = ctypes.util.find_library("fuse3")
        if lib is None:
            raise FuseMissing("libfuse 3 is not installed: install the Debian package fuse3 "
                              "(apt-get install fuse3)")
        os.environ["FUSE_LIBRARY_PATH"] = lib
    if not os.path.exists("/dev/fuse"):
        raise FuseMissing("/dev/fuse is missing: load the fuse kernel module (modprobe fuse)")
    try:
        import mfusepy
    except OSError as e:
        raise FuseMissing(f"cannot load libfuse 3 ({e}); install the Debian package fuse3") from None
    return mfusepy


mfusepy = load_mfusepy()

from .view import Listed, UnionView  # noqa: E402  (after libfuse is chosen)


# utimensat(2)'s special tv_nsec values, as mfusepy passes them (seconds 0).
_UTIME_NOW = (1 << 30) - 1
_UTIME_OMIT = (1 << 30) - 2


def _rel(path: str | None) -> str:
    return (path or "/").lstrip("/")


def _translate(fn):
    """Turn every failure into an errno; unexpected ones are logged and become EIO."""
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except mfusepy.FuseOSError:
            raise
        except OSError as e:
            raise mfusepy.FuseOSError(e.errno or errno.EIO) from None
        except StoreError as e:
            raise mfusepy.FuseOSError(e.errno) from None
        except Exception:
            log.exception("unexpected error in %s", fn.__name__)
            raise mfusepy.FuseOSError(errno.EIO) from None
    wrapper.__name__ = fn.__name__
    return wrapper


def _held(fn):
    """Run a changing operation inside the view's pause gate (a commit holds it closed)."""
    def wrapper(self, *args, **kwargs):
        gate = self.view.gate
        gate.enter()
        try:
            return fn(self, *args, **kwargs)
        finally:
            gate.leave()
    wrapper.__name__ = fn.__name__
    return wrapper


class UnionOperations(mfusepy.Operations):
    """mfusepy operations of one mount."""

    use_ns = True

    def __init__(self, view: UnionView, on_ready=None, timeout: float = 86400.0) -> None:
        self.view = view
        self.on_ready = on_ready
        self.timeout = timeout
        self._dir_lock = threading.Lock()
        self._dir_handles = itertools.count(1)
        self._written: set[int] = set()  # fds written since their last flush
        self._created: set[int] = set()  # fds of files made by create, until released
        self._upper: set[int] = set()  # open fds of upper files (not lower data), until released
        self._listings: dict[int, WireListing | None] = {}  # open directory handle -> its listing
        self._wire: dict[str, WireListing] = {}  # path -> the view's listing, encoded

    def _refresh_links(self, st: os.stat_result, path: str | None) -> None:
        """Make the kernel forget what it cached for the other names of a hard-linked file."""
        self._invalidate(self.view.other_names(st, _rel(path) if path else None))

    def _invalidate(self, names: list[str]) -> None:
        """Drop the kernel's cached attributes of ``names``.

        libfuse's high-level API gives each name its own kernel inode, so a change made
        through one name (or to the link count) would leave the other names' cached
        size, mode, ctime and link count stale.
        """
        if not names:
            return
        fuse = mfusepy._libfuse.fuse_get_context().contents.fuse
        for name in names:
            _libfuse_invalidate_path(fuse, ("/" + name).encode("utf-8", "surrogateescape"))

    def init_with_config(self, conn, config) -> None:
        if config is not None:
            config.use_ino = 1
            config.readdir_ino = 1
            config.entry_timeout = self.timeout
            config.attr_timeout = self.timeout
            config.negative_timeout = self.timeout
        # Every change to a directory goes through this mount, and the kernel drops its
        # cached listing when one does: listings may be kept across opens.
        cache_directory_listings(mfusepy._libfuse.fuse_get_context().contents.fuse)
        # No writeback cache: the kernel then trusts its own size and mtime of a regular
        # file over the server's, and libfuse's high-level API gives each name of a
        # hard-linked file its own kernel inode, so a write through one name would never
        # show in the size the others report.
        if self.on_ready is not None:
            self.on_ready()

    def _ctx(self) -> tuple[int, int]:
        uid, gid, _ = mfusepy.fuse_get_context()
        return uid, gid

    @_translate
    def getattr(self, path, fh=None):
        if path is None and fh is not None:  # an open file whose last name was removed
            return self.view.fd_attrs(fh.fh)
        if fh is not None and fh.fh in self._created:
            # libfuse asks right after every create, for the reply: the new file's
            # descriptor answers without resolving its path a second time.
            return self.view.created_file_attrs(_rel(path), fh.fh)
        return self.view.getattr(_rel(path))

    # Directory handles: each open directory has its own listing, a snapshot taken by
    # its first readdir (and again at offset 0, on rewinddir), which later changes and
    # other handles never disturb. mfusepy installs opendir/releasedir only because
    # they are defined here.

    def opendir(self, path):
        with self._dir_lock:
            fh = next(self._dir_handles)
            self._listings[fh] = None
        return fh

    def releasedir(self, path, fh):
        with self._dir_lock:
            self._listings.pop(fh, None)
        return 0

    @_translate
    def readdir(self, path: str, fh: int, offset: int = 0) -> WireListing:
        """The listing of the open directory ``fh`` as libfuse takes it; made anew when
        read from offset 0."""
        with self._dir_lock:
            listing = self._listings.get(fh)
        if listing is None or offset == 0:
            listing = self._wire_listing(_rel(path))
            with self._dir_lock:
                if fh in self._listings:
                    self._listings[fh] = listing
        return listing

    def _wire_listing(self, path: str) -> WireListing:
        # The view keeps a listing until a change outdates it; its encoded form is kept
        # beside it, for the directories read last, so a repeated readdir packs nothing.
        listing = self.view.readdir(path)
        cached = self._wire.get(path)
        if cached is not None and cached.entries is listing:
            return cached
        wire = WireListing(path, [e.name.encode("utf-8", "surrogateescape") for e in listing], listing, {})
        with self._dir_lock:
            if len(self._wire) >= 64:
                self._wire.pop(next(iter(self._wire)))
            self._wire[path] = wire
        return wire

    def packed_attrs(self, wire: WireListing, i: int) -> bytes | None:
        """The full ``struct stat`` of entry ``i`` of ``wire``, packed (and kept) when
        readdirplus first asks for it; None where they cannot be read (a metacopy file
        whose data is gone): the name is then listed plain, and looking it up fails, as
        on the kernel's overlay."""
        packed = wire.full.get(i)
        if packed is None:
            try:
                attrs = self.view.listed_attrs(wire.path, wire.entries[i])
            except (OSError, StoreError):
                return None
            packed = wire.full[i] = packed_stat(attrs)
        return packed

    @_translate
    def readlink(self, path):
        return self.view.readlink(_rel(path))

    @_translate
    def access(self, path, amode):
        self.view.resolve(_rel(path))
        if amode & os.W_OK and self.view.read_only:
            raise OSError(errno.EROFS, "read-only mount")
        return 0

    @_translate
    def statfs(self, path):
        return self.view.statfs()

    @_translate
    def getxattr(self, path, name, position=0):
        return self.view.getxattr(_rel(path), name)

    @_translate
    def listxattr(self, path):
        return self.view.listxattr(_rel(path))

    @_translate
    @_held
    def setxattr(self, path, name, value, options, position=0):
        self._invalidate(self.view.setxattr(_rel(path), name, value, options))
        return 0

    @_translate
    @_held
    def removexattr(self, path, name):
        self._invalidate(self.view.removexattr(_rel(path), name))
        return 0

    @_translate
    @_held
    def open(self, path, fi):
        fd, lower_backed, truncated = self.view.open(_rel(path), fi.flags)
        self._invalidate(truncated)  # the other names of a hard-linked file are now empty
        fi.fh = fd
        if not lower_backed:
            self._upper.add(fd)
        # Lower data never changes, and every change to upper data goes through this
        # mount, which drops what the kernel cached under a hard link's other names
        # (_invalidate): the kernel may keep the pages it cached across opens.
        fi.keep_cache = 1
        if fi.flags & os.O_ACCMODE == os.O_RDONLY:
            fi.noflush = 1  # nothing to do at its close: spare the round trip (kernel 5.15+)
        return 0

    @_translate
    @_held
    def create(self, path, mode, fi):
        uid, gid = self._ctx()
        fi.fh = self.view.create(_rel(path), mode, fi.flags, uid, gid)
        self._created.add(fi.fh)
        self._upper.add(fi.fh)
        fi.keep_cache = 1
        return 0

    @_translate
    def read(self, path, size, offset, fi):
        return os.pread(fi.fh, size, offset)

    @_translate
    @_held
    def write(self, path, data, offset, fi):
        # The other names of a hard-linked file are refreshed at flush, not here: the
        # kernel holds the written pages locked until this returns, and invalidating
        # another name's pages now can wait on a writer through that name, which waits
        # on us (two writers through two names deadlocked that way).
        self._written.add(fi.fh)
        n = os.pwrite(fi.fh, data, offset)
        self.view.version += 1  # sizes in cached listings are outdated
        return n

    def _refresh_if_linked(self, fd: int, path: str | None) -> None:
        """The other names of a hard-linked file changed through ``fd`` must not keep
        showing the old size and times."""
        st = os.fstat(fd)
        if st.st_nlink > 1:
            self._refresh_links(st, path)

    @_translate
    @_held
    def truncate(self, path, length, fh=None):
        if not self._change_open_file(fh, path, lambda fd: os.ftruncate(fd, length)):
            self._invalidate(self.view.truncate(_rel(path), length))
        return 0

    def _change_open_file(self, fh, path: str | None, change) -> bool:
        """Apply ``change`` (an ftruncate, fchmod, fchown or futimens) to the upper file
        open as ``fh``, and refresh its other names; False where ``fh`` is no open upper
        file, and the change must go by path.

        The kernel sends the handle with a change made through a descriptor: it names
        the file itself (wherever it was renamed since), with no path to resolve."""
        if fh is None or fh.fh not in self._upper:
            return False
        self.view.change_open_file(fh.fh, change)
        self._refresh_if_linked(fh.fh, path)
        return True

    @_translate
    @_held
    def fallocate(self, path, mode, offset, size, fi):
        # Every mode the backing filesystem has (keep size, punch hole, zero range...).
        if _fallocate(fi.fh, mode, offset, size) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), path)
        self.view.version += 1
        if mode:
            self._written.add(fi.fh)  # the size or data changed: refreshed at flush
        return 0

    @_translate
    def flush(self, path, fi):
        # close() waits for flush (release comes later, asynchronously): the other names
        # of a written hard-linked file are refreshed before close returns. Read-only
        # opens ask for no flush at all (noflush, see open).
        if fi.fh in self._written:
            self._written.discard(fi.fh)
            self._refresh_if_linked(fi.fh, path)
        return 0

    @_translate
    def release(self, path, fi):
        self._written.discard(fi.fh)
        self._created.discard(fi.fh)
        self._upper.discard(fi.fh)
        os.close(fi.fh)
        return 0

    @_translate
    def fsync(self, path, datasync, fi):
        if not self.view.volatile:
            os.fdatasync(fi.fh) if datasync else os.fsync(fi.fh)
        return 0

    @_translate
    def fsyncdir(self, path, datasync, fh):
        return 0

    @_translate
    @_held
    def mkdir(self, path, mode):
        uid, gid = self._ctx()
        self.view.mkdir(_rel(path), mode, uid, gid)
        return 0

    @_translate
    @_held
    def rmdir(self, path):
        self.view.rmdir(_rel(path))
        return 0

    @_translate
    @_held
    def unlink(self, path):
        self._invalidate(self.view.unlink(_rel(path)))  # the others' link count went down
        return 0

    @_translate
    @_held
    def symlink(self, target, source):
        uid, gid = self._ctx()
        self.view.symlink(source, _rel(target), uid, gid)
        return 0

    @_translate
    @_held
    def link(self, target, source):
        self._invalidate(self.view.link(_rel(source), _rel(target)))  # their link count went up
        return 0

    @_translate
    @_held
    def mknod(self, path, mode, dev):
        uid, gid = self._ctx()
        self.view.mknod(_rel(path), mode, dev, uid, gid)
        return 0

    @_translate
    @_held
    def rename(self, old, new, flags=0):
        self._invalidate(self.view.rename(_rel(old), _rel(new), flags))
        return 0

    @_translate
    @_held
    def chmod(self, path, mode, fh=None):
        if not self._change_open_file(fh, path, lambda fd: os.fchmod(fd, stat.S_IMODE(mode))):
            self._invalidate(self.view.chmod(_rel(path), mode))
        return 0

    @_translate
    @_held
    def chown(self, path, uid, gid, fh=None):
        if self._change_open_file(fh, path, lambda fd: os.fchown(fd, uid, gid)):  # -1: kept
            return 0
        attrs = self.view.getattr(_rel(path))
        self._invalidate(self.view.chown(_rel(path), attrs["st_uid"] if uid == -1 else uid,
                                         attrs["st_gid"] if gid == -1 else gid))
        return 0

    @_translate
    @_held
    def utimens(self, path, times=None, fh=None):
        now = time.time_ns()
        atime, mtime = times if times is not None else (_UTIME_NOW, _UTIME_NOW)

        def pick(value: int, current: int) -> int:
            return now if value == _UTIME_NOW else current if value == _UTIME_OMIT else value

        def set_times(fd: int) -> None:
            st = os.fstat(fd)
            os.utime(fd, ns=(pick(atime, st.st_atime_ns), pick(mtime, st.st_mtime_ns)))

        if self._change_open_file(fh, path, set_times):
            return 0
        attrs = self.view.getattr(_rel(path))
        self._invalidate(self.view.utimens(_rel(path), pick(atime, attrs["st_atime"]),
                                           pick(mtime, attrs["st_mtime"])))
        return 0


def _libfuse_invalidate_path(fuse, path: bytes) -> None:
    """fuse_invalidate_path(3): drop the kernel's cached attributes and data of a path."""
    fn = mfusepy._libfuse.fuse_invalidate_path
    fn.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    fn(fuse, path)  # -ENOENT for a name the kernel never looked up: nothing to drop


_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]

def _stat_layout() -> tuple[struct.Struct, tuple[str, ...]]:
    """A struct.Struct laid out as libfuse's ``struct stat`` (from mfusepy's c_stat), and
    the attribute each of its fields holds ("" for padding, NAME_ns split in two)."""
    codes, keys = "@", []
    for name, typ in mfusepy.c_stat._fields_:
        if isinstance(typ, type) and issubclass(typ, ctypes.Structure):  # a timespec
            codes += "".join(t._type_ for _, t in typ._fields_)
            keys += [name.removesuffix("spec") + ":s", name.removesuffix("spec") + ":ns"]
        elif isinstance(typ, type) and issubclass(typ, ctypes.Array):  # reserved
            codes += typ._type_._type_ * typ._length_
            keys += [""] * typ._length_
        else:
            codes += typ._type_
            keys.append(name if name.startswith("st_") else "")
    layout = struct.Struct(codes)
    assert layout.size == ctypes.sizeof(mfusepy.c_stat), "struct stat layout"
    return layout, tuple(keys)


_STAT, _STAT_KEYS = _stat_layout()


# The order packed_stat() writes, checked against mfusepy's c_stat (st_dev is left 0).
_KEYS_PACKED = ("st_dev", "st_ino", "st_nlink", "st_mode", "st_uid", "st_gid", "", "st_rdev", "st_size",
                "st_blksize", "st_blocks", "st_atime:s", "st_atime:ns", "st_mtime:s", "st_mtime:ns",
                "st_ctime:s", "st_ctime:ns", "", "", "")
assert _STAT_KEYS == _KEYS_PACKED, f"struct stat fields: {_STAT_KEYS}"


_STAT_FIELDS = ("st_ino", "st_nlink", "st_mode", "st_uid", "st_gid", "st_rdev", "st_size", "st_blksize",
                "st_blocks", "st_atime", "st_mtime", "st_ctime")
_stat_fields = operator.itemgetter(*_STAT_FIELDS)
_NO_STAT = dict.fromkeys(_STAT_FIELDS, 0)


def packed_stat(a: dict) -> bytes:
    """``a`` (the view's stat dict, times in ns; a missing field is 0) as the bytes of a
    ``struct stat``: one pack, where mfusepy sets attribute by attribute (6.5 against 1.5 us)."""
    try:
        ino, nlink, mode, uid, gid, rdev, size, blksize, blocks, at, mt, ct = _stat_fields(a)
    except KeyError:  # a partial dict, like the one of ".."
        ino, nlink, mode, uid, gid, rdev, size, blksize, blocks, at, mt, ct = _stat_fields(_NO_STAT | a)
    return _STAT.pack(0, ino, nlink, mode, uid, gid, 0, rdev, size, blksize, blocks,
                      at // 1_000_000_000, at % 1_000_000_000, mt // 1_000_000_000, mt % 1_000_000_000,
                      ct // 1_000_000_000, ct % 1_000_000_000, 0, 0, 0)


_FUSE_READDIR_PLUS = 1
_FUSE_FILL_DIR_PLUS = 2


@dataclass(slots=True)
class WireListing:
    """A directory's listing as libfuse takes it: encoded names beside the view's
    entries, and the full stats packed so far (by index) for readdirplus."""

    path: str
    names: list[bytes]
    entries: list[Listed]
    full: dict[int, bytes]


# libfuse's fuse_fill_dir_t, with the stat passed as the bytes packed_stat() makes: a
# c_stat built from them for every entry cost a third of what packing them did.
_fill_dir_packed = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p,
                                    mfusepy.c_off_t, ctypes.c_int)


_worker = threading.local()


def _keep_thread_state() -> None:
    """Keep this libfuse worker thread's Python thread state between callbacks.

    A ctypes callback on a thread Python did not start creates a thread state on entry
    and destroys it on return: about half the server's CPU time per request on a trivial
    filesystem (36 -> 12 us per negative lookup, measured). One unmatched
    PyGILState_Ensure keeps it. libfuse's workers stay alive (max_idle_threads is not
    below max_threads), so at most max_threads states are kept.
    """
    ctypes.pythonapi.PyGILState_Ensure()
    _worker.kept = True


# Kernel caching of directory listings. libfuse 3.14's high-level API answers OPENDIR
# from the low-level file info it was given, and never copies the cache_readdir and
# keep_cache flags that our opendir sets on its own, high-level one (3.16 does): every
# readdir would come to Python. So the low-level opendir of the session is wrapped, to
# set both flags on the low-level file info before libfuse's own opendir answers with it.
# The session's layout is private to libfuse: its operations table is found by its
# shape (the functions libfuse's high-level API installs and the ones it leaves empty),
# and nothing is changed unless exactly one place matches.

_LL_SET = range(0, 16)  # struct fuse_lowlevel_ops: init ... fsync, all set by fuse.c
_LL_WRITE, _LL_OPENDIR, _LL_READDIR, _LL_WRITE_BUF, _LL_RETRIEVE = 16, 20, 21, 36, 37
_LL_OPENDIR_T = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.POINTER(mfusepy.fuse_file_info))
_kept_callbacks: list = []  # ctypes callbacks that libfuse calls must outlive the mount


def _libfuse_text() -> list[tuple[int, int]]:
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 6 and "libfuse3" in fields[5] and "x" in fields[1]:
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                out.append((lo, hi))
    return out


def _find_lowlevel_ops(session: int) -> int | None:
    """The address of the session's struct fuse_lowlevel_ops, or None if unsure."""
    text = _libfuse_text()

    def code(addr: int) -> bool:
        value = ctypes.c_void_p.from_address(addr).value
        return value is not None and any(lo <= value < hi for lo, hi in text)

    def empty(addr: int) -> bool:
        return ctypes.c_void_p.from_address(addr).value is None

    found = [base for base in range(session + 8, session + 256, 8)
             if all(code(base + 8 * i) for i in _LL_SET)
             and empty(base + 8 * _LL_WRITE) and code(base + 8 * _LL_OPENDIR)
             and code(base + 8 * _LL_READDIR) and code(base + 8 * _LL_WRITE_BUF)
             and empty(base + 8 * _LL_RETRIEVE)]
    return found[0] if len(found) == 1 else None


def cache_directory_listings(fuse: int) -> bool:
    """Make every OPENDIR answer ask the kernel to keep the listing it reads (see above);
    call in init, before any directory is opened. False if the session is not recognised
    (or LAYERFS_NO_DIR_CACHE is set)."""
    if os.environ.get("LAYERFS_NO_DIR_CACHE"):
        return False
    get_session = mfusepy._libfuse.fuse_get_session
    get_session.restype, get_session.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    session = get_session(fuse)
    ops = _find_lowlevel_ops(session) if session else None
    if ops is None:
        log.warning("libfuse's session is not laid out as expected: directory listings are not cached")
        return False
    slot = ctypes.c_void_p.from_address(ops + 8 * _LL_OPENDIR)
    original = _LL_OPENDIR_T(slot.value)

    def opendir(req, ino, llfi):
        if not getattr(_worker, "kept", False):
            _keep_thread_state()
        llfi.contents.keep_cache = 1
        llfi.contents.cache_readdir = 1
        original(req, ino, llfi)

    wrapper = _LL_OPENDIR_T(opendir)
    _kept_callbacks.extend((original, wrapper))
    slot.value = ctypes.cast(wrapper, ctypes.c_void_p).value
    return True


class UnionFUSE(mfusepy.FUSE):
    """mfusepy's FUSE with what it leaves out: renameat2 flags and readdirplus."""

    def _wrapper(self, func, *args, **kwargs):
        if not getattr(_worker, "kept", False):
            _keep_thread_state()
        return super()._wrapper(func, *args, **kwargs)

    # mfusepy drops the file handle of these four; a change made through a descriptor
    # (ftruncate, fchmod, fchown, futimens) comes with one (see _change_open_file).

    def truncate_fuse_3(self, path: bytes | None, length: int, fip) -> int:
        return self.operations.truncate(self._path(path), length, fip.contents if fip else None)

    def chmod_fuse_3(self, path: bytes | None, mode: int, fip) -> int:
        return self.operations.chmod(self._path(path), mode, fip.contents if fip else None)

    def chown_fuse_3(self, path: bytes | None, uid: int, gid: int, fip) -> int:
        uid = -1 if mfusepy.c_uid_t(uid + 1).value == 0 else uid  # (uid_t)-1: leave it
        gid = -1 if mfusepy.c_gid_t(gid + 1).value == 0 else gid
        return self.operations.chown(self._path(path), uid, gid, fip.contents if fip else None)

    def utimens_fuse_3(self, path: bytes | None, buf, fip) -> int:
        times = None
        if buf:
            times = (mfusepy.time_of_timespec(buf.contents.actime, use_ns=True),
                     mfusepy.time_of_timespec(buf.contents.modtime, use_ns=True))
        return self.operations.utimens(self._path(path), times, fip.contents if fip else None)

    def _path(self, path: bytes | None) -> str | None:
        return None if path is None else path.decode(self.encoding, self.errors)

    def getattr_fuse_3(self, path: bytes | None, buf, fip) -> int:
        attrs = self.operations.getattr(None if path is None else path.decode(self.encoding, self.errors),
                                        fip.contents if fip else None)
        ctypes.memmove(buf, packed_stat(attrs), _STAT.size)
        return 0

    def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
        return self.operations.rename(old.decode(self.encoding, self.errors),
                                      new.decode(self.encoding, self.errors), flags)

    def opendir(self, path: bytes, fip) -> int:
        fip.contents.fh = self.operations.opendir(path.decode(self.encoding, self.errors))
        return 0

    def readdir_fuse_3(self, path: bytes, buf, filler, offset: int, fip, flags: int) -> int:
        # Offsets (i + 1) rather than mfusepy's 0: in offset mode libfuse passes the full
        # stat of each entry on to the kernel (readdirplus), which then needs no lookup per
        # entry. The listing is served in pieces from the handle's snapshot. The kernel
        # asks for readdirplus on the first piece and after lookups in the directory; a
        # plain piece takes only each name's inode number and type, so the rest of an
        # entry's attributes are made only when a readdirplus asks for them.
        try:
            wire = self.operations.readdir(path.decode(self.encoding, self.errors), fip.contents.fh, offset)
        except mfusepy.FuseOSError as e:
            return -e.errno
        fill = ctypes.cast(filler, _fill_dir_packed)
        names, entries, pack = wire.names, wire.entries, _STAT.pack
        first_plus = 2 if flags & _FUSE_READDIR_PLUS else len(names)  # "." and ".." go plain
        for i in range(offset, len(names)):
            full = self.operations.packed_attrs(wire, i) if i >= first_plus else None
            if full is not None:
                if fill(buf, names[i], full, i + 1, _FUSE_FILL_DIR_PLUS):
                    break
            else:
                e = entries[i]
                st = pack(0, e.ino, 0, e.mode, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)  # ino and type only
                if fill(buf, names[i], st, i + 1, 0):
                    break
        return 0


def serve(view: UnionView, mountpoint: str, *, foreground: bool = True, options: dict | None = None,
          on_ready=None, debug: bool = False) -> None:
    """Mount ``view`` at ``mountpoint`` and serve until unmounted (blocks)."""
    from .mount import exposure

    opts = {"fsname": "layerfs", "subtype": "layerfs", "default_permissions": True}
    if view.read_only:
        opts["ro"] = True
    requested = dict(options or {})
    opts.update(exposure(mountpoint, requested))  # allow_other, suid, dev: see SECURITY.md
    opts.update(requested)
    debug = bool(opts.pop("debug", debug))
    UnionFUSE(UnionOperations(view, on_ready), mountpoint, raw_fi=True, foreground=foreground,
              debug=debug, **opts)
