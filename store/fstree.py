"""A directory tree read while someone else may change it: through directory fds, never
following a symlink, at any depth.

Importing a directory that another user owns must not read a file outside it: every
path component is opened relative to its parent's fd with ``O_NOFOLLOW``, so a
directory swapped for a symlink mid-import fails (ELOOP) instead of being followed, and
a regular file is opened only if it is still the inode the scan described. Working from
fds also lifts the PATH_MAX limit of whole host paths: a tree may be as deep as its own
paths allow, whatever directory it lives in.
"""

from __future__ import annotations

import errno
import os
import resource
import stat

from .errors import StoreError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO swapped in for a file must not block the open.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK


class TreeChanged(StoreError):
    """A file or directory changed between the scan and the read."""


def raise_open_file_limit() -> None:
    """Raise the soft limit on open files to the hard limit (the soft one is often
    1,024): a deep tree holds one fd per level (a path of 4,095 bytes can be 2,048
    levels deep), a mount's server one per file its container holds open."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def read_xattrs(target: str | int, follow_symlinks: bool = False) -> dict[str, bytes]:
    """All xattrs of a path or fd; {} where unsupported."""
    try:
        names = os.listxattr(target, follow_symlinks=follow_symlinks)
    except OSError:
        return {}
    out = {}
    for name in names:
        try:
            out[name] = os.getxattr(target, name, follow_symlinks=follow_symlinks)
        except OSError:
            continue
    return out


def same_file(a: os.stat_result, b: os.stat_result) -> bool:
    """Same inode, same type, and neither its data nor its metadata changed."""
    return ((a.st_dev, a.st_ino, a.st_mode, a.st_uid, a.st_gid, a.st_size, a.st_mtime_ns, a.st_ctime_ns)
            == (b.st_dev, b.st_ino, b.st_mode, b.st_uid, b.st_gid, b.st_size, b.st_mtime_ns, b.st_ctime_ns))


class Tree:
    """The tree at ``root`` (the root itself may be reached through symlinks: the caller
    named it), addressed by relative paths ("" is the root)."""

    def __init__(self, root: str) -> None:
        self.root = root
        raise_open_file_limit()
        try:
            self.root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise StoreError(f"cannot read {root}: {e.strerror}") from None
        self._chain: list[tuple[str, int]] = []  # the open directories below the root
        self._chain_rel: str | None = ""  # the directory the chain ends at

    def close(self) -> None:
        for _, fd in self._chain:
            os.close(fd)
        self._chain.clear()
        self._chain_rel = ""
        os.close(self.root_fd)

    def __enter__(self) -> "Tree":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def where(self, rel: str) -> str:
        """A path for messages (may be longer than the kernel takes)."""
        return os.path.join(self.root, rel) if rel else self.root

    def dir_fd(self, rel: str) -> int:
        """An fd of directory ``rel``, opened component by component without following
        symlinks; the last directories opened stay open, so a walk in tree order opens
        each directory once."""
        if rel == self._chain_rel:  # the usual case: the files of one directory in turn
            return self._chain[-1][1] if self._chain else self.root_fd
        self._chain_rel = None  # until the chain is whole again (an open may fail)
        parts = rel.split("/") if rel else []
        keep = 0
        while keep < min(len(parts), len(self._chain)) and self._chain[keep][0] == parts[keep]:
            keep += 1
        for _, fd in self._chain[keep:]:
            os.close(fd)
        del self._chain[keep:]
        for part in parts[keep:]:
            parent = self._chain[-1][1] if self._chain else self.root_fd
            try:
                fd = os.open(part, _DIR_FLAGS, dir_fd=parent)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise TreeChanged(f"{self.where(rel)}: a directory was replaced while it "
                                      "was read") from None
                raise
            self._chain.append((part, fd))
        self._chain_rel = rel
        return self._chain[-1][1] if self._chain else self.root_fd

    def _parent(self, rel: str) -> tuple[int, str]:
        parent, _, name = rel.rpartition("/")
        return self.dir_fd(parent), name

    def listdir(self, rel: str) -> list[str]:
        """The names in directory ``rel``, sorted."""
        return sorted(os.listdir(self.dir_fd(rel)))

    def listdir_typed(self, rel: str) -> list[tuple[str, bool]]:
        """(name, plain) for each name in directory ``rel``, sorted by name; ``plain``
        says the directory entry's type shows a directory, a regular file or a symlink,
        so no lstat is needed to tell it from a device, a FIFO or a socket."""
        with os.scandir(self.dir_fd(rel)) as it:
            out = [(e.name, e.is_dir(follow_symlinks=False) or e.is_file(follow_symlinks=False)
                    or e.is_symlink()) for e in it]
        out.sort()
        return out

    def lstat(self, rel: str) -> os.stat_result:
        if not rel:
            return os.fstat(self.root_fd)
        fd, name = self._parent(rel)
        return os.stat(name, dir_fd=fd, follow_symlinks=False)

    def lexists(self, rel: str) -> bool:
        try:
            self.lstat(rel)
            return True
        except FileNotFoundError:
            return False

    def readlink(self, rel: str) -> str:
        fd, name = self._parent(rel)
        try:
            return os.readlink(name, dir_fd=fd)
        except OSError as e:
            if e.errno == errno.EINVAL:
                raise TreeChanged(f"{self.where(rel)}: a symlink was replaced while it was read") from None
            raise

    def _xattr_target(self, rel: str) -> tuple[str | int, bool]:
        """What to name ``rel`` by in the xattr calls, and their follow_symlinks."""
        if not rel:
            return self.root_fd, True  # an fd is the file itself
        # The fd's /proc link names the directory itself, so no component is looked
        # up by name but the last, which is not followed.
        fd, name = self._parent(rel)
        return f"/proc/self/fd/{fd}/{name}", False

    def xattrs(self, rel: str) -> dict[str, bytes]:
        """All xattrs of ``rel`` (not following a symlink); {} where unsupported."""
        return read_xattrs(*self._xattr_target(rel))

    def xattr(self, rel: str, name: str) -> bytes | None:
        target, follow = self._xattr_target(rel)
        try:
            return os.getxattr(target, name, follow_symlinks=follow)
        except OSError:
            return None

    def open_file(self, rel: str, scanned: os.stat_result) -> int:
        """Open the regular file ``rel`` for reading, only if it is still the file the
        scan saw (``scanned``, its lstat): same inode, type, owner, mode, size and times."""
        fd, name = self._parent(rel)
        try:
            f = os.open(name, _FILE_FLAGS, dir_fd=fd)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise TreeChanged(f"{self.where(rel)}: a file was replaced by a symlink while "
                                  "it was read") from None
            raise
        st = os.fstat(f)
        if not stat.S_ISREG(st.st_mode) or not same_file(st, scanned):
            os.close(f)
            raise TreeChanged(f"{self.where(rel)}: the file changed while it was read")
        os.set_blocking(f, True)
        return f


def remove_tree(path: str) -> None:
    """Remove ``path`` and everything below it, at any depth, without following symlinks
    or entering another filesystem mounted below it (shutil.rmtree recurses once per
    level and fails on deep trees). Best effort: what cannot be removed stays."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        _ignore(os.unlink, path)
        return
    try:
        top = os.open(path, _DIR_FLAGS)
    except OSError:
        return
    stack: list[tuple[int, str]] = [(top, "")]  # (fd, its name in the one below)
    try:
        while stack:
            fd, name = stack[-1]
            sub = None
            with os.scandir(fd) as it:
                for entry in it:
                    if not entry.is_dir(follow_symlinks=False):
                        _ignore(os.unlink, entry.name, dir_fd=fd)
                    elif not _ignore(os.rmdir, entry.name, dir_fd=fd):
                        sub = entry.name  # not empty: go down
                        break
            if sub is not None:
                try:
                    sub_fd = os.open(sub, _DIR_FLAGS, dir_fd=fd)
                except OSError:
                    return
                stack.append((sub_fd, sub))
                if os.fstat(sub_fd).st_dev != st.st_dev:
                    return  # a mount point: what is mounted there is not ours to delete
                continue
            os.close(fd)
            stack.pop()
            # A directory that stays non-empty (permissions, a mount point) ends the
            # removal instead of being entered again and again.
            if stack and not _ignore(os.rmdir, name, dir_fd=stack[-1][0]):
                return
    finally:
        for fd, _ in stack:
            os.close(fd)
    _ignore(os.rmdir, path)


def _ignore(fn, *args, **kw) -> bool:
    try:
        fn(*args, **kw)
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False
