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
import os
import stat
import threading
import time

from store.errors import StoreError

log = logging.getLogger("layerfs.fuse")


class FuseMissing(StoreError):
    """libfuse 3 or /dev/fuse is not available."""


def load_mfusepy():
    """Import mfusepy bound to libfuse 3 (it would pick libfuse 2 when both exist)."""
    if "FUSE_LIBRARY_PATH" not in os.environ:
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

from .view import UnionView  # noqa: E402  (after libfuse is chosen)


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
        with self.view.gate.hold():
            return fn(self, *args, **kwargs)
    wrapper.__name__ = fn.__name__
    return wrapper


class UnionOperations(mfusepy.Operations):
    """mfusepy operations of one mount."""

    use_ns = True

    def __init__(self, view: UnionView, on_ready=None, timeout: float = 86400.0) -> None:
        self.view = view
        self.on_ready = on_ready
        self.timeout = timeout
        self._written: set[int] = set()  # fds written since their last flush
        self._dir_lock = threading.Lock()
        self._dir_handles = itertools.count(1)
        self._listings: dict[int, list | None] = {}  # open directory handle -> its listing

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
        if self.on_ready is not None:
            self.on_ready()

    def _ctx(self) -> tuple[int, int]:
        uid, gid, _ = mfusepy.fuse_get_context()
        return uid, gid

    @_translate
    def getattr(self, path, fh=None):
        if path is None and fh is not None:  # an open file whose last name was removed
            return self.view.fd_attrs(fh.fh)
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
    def readdir(self, path: str, fh: int, offset: int = 0) -> list[tuple[str, dict]]:
        """The listing of the open directory ``fh``; made anew when read from offset 0."""
        with self._dir_lock:
            listing = self._listings.get(fh)
        if listing is None or offset == 0:
            listing = self.view.readdir(_rel(path))
            with self._dir_lock:
                if fh in self._listings:
                    self._listings[fh] = listing
        return listing

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
        fi.keep_cache = 1 if lower_backed else 0  # lower data never changes
        return 0

    @_translate
    @_held
    def create(self, path, mode, fi):
        uid, gid = self._ctx()
        fi.fh = self.view.create(_rel(path), mode, fi.flags, uid, gid)
        return 0

    @_translate
    def read(self, path, size, offset, fi):
        return os.pread(fi.fh, size, offset)

    @_translate
    @_held
    def write(self, path, data, offset, fi):
        self._written.add(fi.fh)
        n = os.pwrite(fi.fh, data, offset)
        self.view.version += 1  # sizes in cached listings are outdated
        return n

    @_translate
    @_held
    def truncate(self, path, length, fh=None):
        if fh is not None and getattr(fh, "fh", 0):
            os.ftruncate(fh.fh, length)
            self.view.version += 1
            st = os.fstat(fh.fh)
            if st.st_nlink > 1:
                self._refresh_links(st, path)
        else:
            self._invalidate(self.view.truncate(_rel(path), length))
        return 0

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
        # of a written hard-linked file are refreshed before close returns.
        if fi.fh in self._written:
            self._written.discard(fi.fh)
            st = os.fstat(fi.fh)
            if st.st_nlink > 1:
                self._refresh_links(st, path)
        return 0

    @_translate
    def release(self, path, fi):
        self._written.discard(fi.fh)
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
    def chmod(self, path, mode):
        self._invalidate(self.view.chmod(_rel(path), mode))
        return 0

    @_translate
    @_held
    def chown(self, path, uid, gid):
        attrs = self.view.getattr(_rel(path))
        self._invalidate(self.view.chown(_rel(path), attrs["st_uid"] if uid == -1 else uid,
                                         attrs["st_gid"] if gid == -1 else gid))
        return 0

    @_translate
    @_held
    def utimens(self, path, times=None):
        now = time.time_ns()
        attrs = self.view.getattr(_rel(path))
        atime, mtime = times if times is not None else (_UTIME_NOW, _UTIME_NOW)

        def pick(value: int, current: int) -> int:
            return now if value == _UTIME_NOW else current if value == _UTIME_OMIT else value

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

_FUSE_READDIR_PLUS = 1
_FUSE_FILL_DIR_PLUS = 2


class UnionFUSE(mfusepy.FUSE):
    """mfusepy's FUSE with what it leaves out: renameat2 flags and readdirplus."""

    def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
        return self.operations.rename(old.decode(self.encoding, self.errors),
                                      new.decode(self.encoding, self.errors), flags)

    def opendir(self, path: bytes, fip) -> int:
        fip.contents.fh = self.operations.opendir(path.decode(self.encoding, self.errors))
        # Every change goes through this mount, so the kernel may keep listings across
        # opens (libfuse honours these flags from 3.16 on).
        fip.contents.cache_readdir = 1
        fip.contents.keep_cache = 1
        return 0

    def readdir_fuse_3(self, path: bytes, buf, filler, offset: int, fip, flags: int) -> int:
        # Offsets (i + 1) rather than mfusepy's 0: in offset mode libfuse passes the full
        # stat of each entry on to the kernel (readdirplus), which then needs no lookup per
        # entry. The listing is served in pieces from the handle's snapshot.
        try:
            listing = self.operations.readdir(path.decode(self.encoding, self.errors),
                                              fip.contents.fh, offset)
        except mfusepy.FuseOSError as e:
            return -e.errno
        plus = _FUSE_FILL_DIR_PLUS if flags & _FUSE_READDIR_PLUS else 0
        st = mfusepy.c_stat()
        for i in range(offset, len(listing)):
            name, attrs = listing[i]
            ctypes.memset(ctypes.byref(st), 0, ctypes.sizeof(st))
            mfusepy.set_st_attrs(st, attrs, use_ns=True)
            if filler(buf, name.encode(self.encoding, self.errors), st, i + 1,
                      plus if name not in (".", "..") else 0):
                break
        return 0


def serve(view: UnionView, mountpoint: str, *, foreground: bool = True, options: dict | None = None,
          on_ready=None, debug: bool = False) -> None:
    """Mount ``view`` at ``mountpoint`` and serve until unmounted (blocks)."""
    opts = {"fsname": "layerfs", "subtype": "layerfs", "default_permissions": True}
    if os.geteuid() == 0:
        opts.update(allow_other=True, suid=True, dev=True)
    if view.read_only:
        opts["ro"] = True
    opts.update(options or {})
    debug = bool(opts.pop("debug", debug))
    UnionFUSE(UnionOperations(view, on_ready), mountpoint, raw_fi=True, foreground=foreground,
              debug=debug, **opts)
