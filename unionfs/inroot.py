"""Paths resolved inside a container's root, as its own processes would see them.

A container's tree is written by the container: ``/etc`` may be a symlink to ``/``, a
mountpoint a symlink to a host path. Whatever the host does at a path inside a mount (a
bind mount of /proc or of a volume, a file COPYed in) must therefore resolve that path
as a chroot would, never following a link out of the root. ``openat2`` with
RESOLVE_IN_ROOT does exactly that in the kernel, with no window between a check and the
use: absolute symlinks and ``..`` stay at the root.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct

from .syscalls import libc

_SYS_OPENAT2 = 437  # the same number on every architecture (a syscall added after the unification)
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_IN_ROOT = 0x10
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def openat2_in_root(root_fd: int, path: str, flags: int, mode: int = 0) -> int:
    """``openat(root_fd, path, flags)`` resolved with ``root_fd`` as the root."""
    how = struct.pack("QQQ", flags | os.O_CLOEXEC, mode, _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS)
    raw = os.fsencode(path.lstrip("/") or ".")
    fd = libc.syscall(_SYS_OPENAT2, root_fd, raw, how, len(how))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return fd


def split(path: str) -> list[str]:
    """The components of ``path`` inside a root, without ``.`` and empty ones."""
    return [p for p in path.split("/") if p and p != "."]


def make_dirs(root_fd: int, path: str, mode: int = 0o755, uid: int = 0, gid: int = 0,
              created: list[str] | None = None) -> int:
    """An fd of directory ``path`` inside the root, made (with ``mode``, ``uid``, ``gid``)
    where missing, as ``mkdir -p`` in a chroot; the host paths of the directories made
    (symlinks on the way resolved) are appended to ``created``."""
    fd = os.dup(root_fd)
    done = ""
    try:
        for part in split(path):
            done = f"{done}/{part}"
            try:
                nxt = openat2_in_root(root_fd, done, _DIR)
            except FileNotFoundError:
                made = False
                try:
                    os.mkdir(part, mode, dir_fd=fd)
                except FileExistsError:
                    pass  # a dangling symlink: the open below says so
                else:
                    os.chown(part, uid, gid, dir_fd=fd, follow_symlinks=False)
                    os.chmod(part, mode, dir_fd=fd)  # mkdir's mode went through the umask
                    made = True
                nxt = openat2_in_root(root_fd, done, _DIR)
                if made and created is not None:
                    created.append(os.readlink(f"/proc/self/fd/{nxt}"))
            os.close(fd)
            fd = nxt
        return fd
    except BaseException:
        os.close(fd)
        raise


def parent_and_name(root_fd: int, path: str, make: bool = False, **kw) -> tuple[int, str]:
    """(an fd of the directory that holds ``path``, the last name) inside the root; the
    name itself is not resolved. With ``make``, missing parents are made (see make_dirs)."""
    parts = split(path)
    if not parts or parts[-1] == "..":
        raise OSError(errno.EINVAL, "not a name in a directory", path)
    parent = "/".join(parts[:-1])
    if make:
        return make_dirs(root_fd, parent, **kw), parts[-1]
    return openat2_in_root(root_fd, parent, _DIR), parts[-1]


def lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def is_dir_in_root(root_fd: int, path: str) -> bool:
    """True if ``path`` (following symlinks inside the root) is a directory."""
    try:
        fd = openat2_in_root(root_fd, path, os.O_PATH)
    except OSError:
        return False
    try:
        return stat.S_ISDIR(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
