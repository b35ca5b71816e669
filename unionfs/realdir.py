"""A real directory tree that the server reaches only through file descriptors.

Every path is relative to the tree's root and is resolved beneath it without following
any symlink (``openat2`` with ``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS``; a walk with
``O_NOFOLLOW`` where the kernel lacks openat2). Whatever a container puts into its upper
layer, or a hostile layer into a lower directory, the server never reaches a host path
outside the tree through it. A path string is limited to PATH_MAX, but a path below the
mount may be longer than that minus the tree's own path, or longer than PATH_MAX
altogether: such paths are opened a piece at a time.

The final name of every call is acted on with ``*at`` calls relative to its parent's
descriptor and never followed (``O_NOFOLLOW``, ``AT_SYMLINK_NOFOLLOW``). xattrs and
chmod, which have no ``*at`` form in Python, go through an ``O_PATH`` descriptor of the
object itself (``/proc/self/fd/N`` names that object, also when it is a symlink).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
import threading
from collections.abc import Iterator

_libc = ctypes.CDLL(None, use_errno=True)
_SYS_OPENAT2 = 437  # the same number on every architecture (the unified syscall table)
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_RESOLVE = _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS
_CHUNK = 3800  # bytes of path handed to one openat2 (PATH_MAX is 4096 with the NUL)
_DIR = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
_have_openat2 = True


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _raise_errno(path: str) -> None:
    code = ctypes.get_errno()
    raise OSError(code, os.strerror(code), path)


def _openat2(dirfd: int, rel: str, flags: int) -> int:
    global _have_openat2
    if _have_openat2:
        how = _OpenHow(flags | os.O_CLOEXEC, 0, _RESOLVE)
        fd = _libc.syscall(_SYS_OPENAT2, dirfd, os.fsencode(rel), ctypes.byref(how), ctypes.sizeof(how))
        if fd >= 0:
            return fd
        if ctypes.get_errno() != errno.ENOSYS:
            _raise_errno(rel)
        _have_openat2 = False
    return _walk(dirfd, rel, flags)


def _walk(dirfd: int, rel: str, flags: int) -> int:
    """openat2 for kernels before 5.6: one component at a time, none followed."""
    names = rel.split("/")
    fd = dirfd
    try:
        for i, name in enumerate(names):
            if name in ("", ".", ".."):
                raise OSError(errno.EXDEV, "path leaves the tree", rel)
            last = i == len(names) - 1
            nfd = os.open(name, (flags if last else _DIR) | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            if fd != dirfd:
                os.close(fd)
            fd = nfd
    except BaseException:
        if fd != dirfd:
            os.close(fd)
        raise
    return fd


def _open_beneath(dirfd: int, rel: str, flags: int) -> int:
    """Open ``rel`` beneath ``dirfd``, in pieces if the string is longer than PATH_MAX allows."""
    if len(rel) <= _CHUNK or len(os.fsencode(rel)) <= _CHUNK:
        return _openat2(dirfd, rel, flags)
    names = rel.split("/")
    fd = dirfd
    try:
        while names:
            piece: list[str] = []
            size = 0
            while names and (not piece or size + len(os.fsencode(names[0])) + 1 <= _CHUNK):
                size += len(os.fsencode(names[0])) + 1
                piece.append(names.pop(0))
            nfd = _openat2(fd, "/".join(piece), flags if not names else _DIR)
            if fd != dirfd:
                os.close(fd)
            fd = nfd
    except BaseException:
        if fd != dirfd:
            os.close(fd)
        raise
    return fd


def xattr_at(dirfd: int, name: str, attr: str) -> str | None:
    """The xattr ``attr`` of entry ``name`` of directory ``dirfd`` ("" for the directory
    itself) as text, or None; the entry is never followed if it is a symlink."""
    try:
        if name:
            value = os.getxattr(f"/proc/self/fd/{dirfd}/{name}", attr, follow_symlinks=False)
        else:
            value = os.getxattr(f"/proc/self/fd/{dirfd}", attr)
    except OSError:
        return None
    return value.decode("utf-8", "surrogateescape")


class RealDir:
    """A directory tree on disk, acted on by paths relative to its root ("" is the root).

    ``keep_dirs``: for a tree that never changes while in use (a lower layer), how many
    of its directories to keep open once reached, so that acting on a name below one of
    them needs no ``openat2`` and ``close`` of its path (5 of the 6 us that ``at`` took
    in a lower layer, measured). A changing tree must keep none: a kept descriptor would
    follow its directory through a rename.
    """

    def __init__(self, path: str, keep_dirs: int = 0) -> None:
        self.path = os.path.abspath(path)
        self.fd = os.open(self.path, _DIR)
        self._keep_dirs = keep_dirs
        self._kept: dict[str, int] = {}  # directory -> its O_PATH descriptor, closed by close()
        self._kept_lock = threading.Lock()

    def close(self) -> None:
        with self._kept_lock:
            kept, self._kept, self._keep_dirs = self._kept, {}, 0
        for fd in kept.values():
            os.close(fd)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _kept_dir(self, rel: str, fd: int) -> bool:
        """Keep ``fd`` as ``rel``'s descriptor if there is room; False if the caller still
        owns it (and closes it). Kept descriptors are never closed while the tree is in
        use, so no other thread can find one closed under it."""
        with self._kept_lock:
            if len(self._kept) >= self._keep_dirs or rel in self._kept:
                return False
            self._kept[rel] = fd
            return True

    def open_dir(self, rel: str, flags: int = _DIR) -> int:
        """A new descriptor of the directory ``rel`` (O_PATH unless ``flags`` say otherwise)."""
        if not rel:
            return os.open(".", flags | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.fd)
        return _open_beneath(self.fd, rel, flags | os.O_DIRECTORY)

    @contextlib.contextmanager
    def at(self, rel: str) -> Iterator[tuple[int, str]]:
        """The descriptor of ``rel``'s parent directory and ``rel``'s last name."""
        parent, _, name = rel.rpartition("/")
        if not name:
            raise OSError(errno.EINVAL, "the root has no parent", rel)
        if not parent:
            yield self.fd, name
            return
        fd = self._kept.get(parent)
        if fd is not None:
            yield fd, name
            return
        fd = _open_beneath(self.fd, parent, _DIR)
        if self._keep_dirs and self._kept_dir(parent, fd):
            yield fd, name
            return
        try:
            yield fd, name
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def object(self, rel: str) -> Iterator[str]:
        """A path that names the object ``rel`` itself (never what a symlink points to)."""
        if rel:
            with self.at(rel) as (dirfd, name):
                fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
        else:
            fd = os.open(".", os.O_PATH | os.O_CLOEXEC, dir_fd=self.fd)
        try:
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)

    # -- names -------------------------------------------------------------------

    def lstat(self, rel: str) -> os.stat_result:
        if not rel:
            return os.fstat(self.fd)
        with self.at(rel) as (fd, name):
            return os.stat(name, dir_fd=fd, follow_symlinks=False)

    def lexists(self, rel: str) -> bool:
        try:
            self.lstat(rel)
            return True
        except FileNotFoundError:
            return False

    def open(self, rel: str, flags: int, mode: int = 0o600) -> int:
        """Open a file (never through a symlink); the caller closes the descriptor."""
        with self.at(rel) as (fd, name):
            return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=fd)

    def mkdir(self, rel: str, mode: int = 0o700) -> None:
        with self.at(rel) as (fd, name):
            os.mkdir(name, mode, dir_fd=fd)

    def rmdir(self, rel: str) -> None:
        with self.at(rel) as (fd, name):
            os.rmdir(name, dir_fd=fd)

    def unlink(self, rel: str) -> None:
        with self.at(rel) as (fd, name):
            os.unlink(name, dir_fd=fd)

    def symlink(self, target: str, rel: str) -> None:
        with self.at(rel) as (fd, name):
            os.symlink(target, name, dir_fd=fd)

    def mknod(self, rel: str, mode: int, device: int = 0) -> None:
        with self.at(rel) as (fd, name):
            os.mknod(name, mode, device, dir_fd=fd)

    def readlink(self, rel: str) -> str:
        with self.at(rel) as (fd, name):
            return os.readlink(name, dir_fd=fd)

    def link(self, rel: str, dst: RealDir, dst_rel: str) -> None:
        """Hard-link ``rel`` as ``dst_rel`` of ``dst`` (the same tree or another)."""
        with self.at(rel) as (sfd, sname), dst.at(dst_rel) as (dfd, dname):
            os.link(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)

    def rename(self, rel: str, dst: RealDir, dst_rel: str, flags: int = 0) -> None:
        """renameat2(2) of ``rel`` to ``dst_rel`` of ``dst``, with RENAME_* ``flags``."""
        with self.at(rel) as (sfd, sname), dst.at(dst_rel) as (dfd, dname):
            if not flags:
                os.rename(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd)
            elif _libc.renameat2(sfd, os.fsencode(sname), dfd, os.fsencode(dname), flags) != 0:
                _raise_errno(dst_rel)

    def entries(self, rel: str) -> list[tuple[str, bool, bool]]:
        """(name, is a directory, is an overlay whiteout) of each entry of directory ``rel``."""
        fd = self.open_dir(rel, os.O_RDONLY)
        try:
            with os.scandir(fd) as it:
                out = []
                for e in it:
                    is_dir = e.is_dir(follow_symlinks=False)
                    whiteout = False
                    if not is_dir and not e.is_file(follow_symlinks=False) \
                            and not e.is_symlink():
                        st = e.stat(follow_symlinks=False)  # fstatat on ``fd``, still open
                        whiteout = stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
                    out.append((e.name, is_dir, whiteout))
                return out
        finally:
            os.close(fd)

    # -- metadata -----------------------------------------------------------------

    def chown(self, rel: str, uid: int, gid: int) -> None:
        if not rel:
            os.chown(f"/proc/self/fd/{self.fd}", uid, gid)
            return
        with self.at(rel) as (fd, name):
            os.chown(name, uid, gid, dir_fd=fd, follow_symlinks=False)

    def chmod(self, rel: str, mode: int) -> None:
        with self.object(rel) as obj:
            os.chmod(obj, mode)

    def utime(self, rel: str, ns: tuple[int, int]) -> None:
        if not rel:
            os.utime(f"/proc/self/fd/{self.fd}", ns=ns)
            return
        with self.at(rel) as (fd, name):
            os.utime(name, ns=ns, dir_fd=fd, follow_symlinks=False)

    def truncate(self, rel: str, length: int) -> None:
        fd = self.open(rel, os.O_WRONLY)
        try:
            os.ftruncate(fd, length)
        finally:
            os.close(fd)

    def getxattr(self, rel: str, name: str) -> bytes:
        with self.object(rel) as obj:
            return os.getxattr(obj, name)

    def setxattr(self, rel: str, name: str, value: bytes, flags: int = 0) -> None:
        with self.object(rel) as obj:
            os.setxattr(obj, name, value, flags)

    def removexattr(self, rel: str, name: str) -> None:
        with self.object(rel) as obj:
            os.removexattr(obj, name)

    def listxattr(self, rel: str) -> list[str]:
        with self.object(rel) as obj:
            return os.listxattr(obj)

    def statvfs(self) -> os.statvfs_result:
        return os.fstatvfs(self.fd)
