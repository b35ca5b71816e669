"""The union view: overlayfs semantics over a read-only lower tree and an upper directory.

Pure Python and path based: every method takes paths relative to the mount root ("" is
the root), returns plain values and raises ``OSError(errno)``; the FUSE adapter is a thin
mapping onto it, and tests drive it without a mount.

The upper directory holds the container's changes in the OCI format: ``.wh.NAME`` hides
NAME of the lower tree, ``.wh..wh..opq`` in a directory hides all of the lower
directory. Two private xattrs extend it where OCI has no word:

- ``user.layerfs.metacopy`` = lower path, on a sparse upper file whose metadata changed
  (chmod, chown, utimens, setxattr, rename) but whose data is still the lower file's, as
  overlayfs's metacopy; the data is copied on the first write, in place, and the xattr
  removed last, so a crash never shows half-copied data.
- ``user.layerfs.redirect`` = lower path, on a directory renamed from a lower one (as
  overlayfs's redirect_dir): its lower contents are merged from that path. No file data
  is copied to rename a directory.

Copy-up is atomic: a file is built in ``work/`` (data, owner, mode, xattrs, times,
fsync unless volatile) and renamed into place. Inode numbers are allocated per mount,
keyed by the lower entry's identity (hard links share it) or the upper inode, and a
copy-up keeps the number it had.
"""

from __future__ import annotations

import contextlib
import errno
import re
import itertools
import os
import shutil
import stat
import threading
from dataclasses import dataclass

from store.records import Entry, Kind
from store.upper import (METACOPY, OPQ, OVERLAY_OPAQUE, PRIVATE_PREFIX, REDIRECT, WH,
                         is_whiteout_st, xattr_text)

from .lower import Lower, LowerNode

HIDDEN_XATTR_PREFIXES = (PRIVATE_PREFIX, "trusted.overlay.", "user.overlay.")
COPY_CHUNK = 1 << 20
HIDDEN = re.compile(r"\.fuse_hidden[0-9a-f]{16}")  # libfuse's name for files unlinked while open

_KIND_MODE = {Kind.REG: stat.S_IFREG, Kind.DIR: stat.S_IFDIR, Kind.SYMLINK: stat.S_IFLNK,
              Kind.CHR: stat.S_IFCHR, Kind.BLK: stat.S_IFBLK, Kind.FIFO: stat.S_IFIFO}


def _err(code: int, path: str = "") -> OSError:
    return OSError(code, os.strerror(code), path)


def _group_in(parent: "Node", gid: int) -> int:
    """The group of a new object: a setgid directory's own, else the creator's."""
    return parent.st.st_gid if parent.st.st_mode & stat.S_ISGID else gid


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


class _ChangeLock:
    """The view's re-entrant lock for changes: releasing it outdates cached listings."""

    def __init__(self, view: "UnionView") -> None:
        self._lock = threading.RLock()
        self._view = view

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(self, *exc) -> None:
        self._view.version += 1
        self._lock.release()


class PauseGate:
    """Lets changes run concurrently, and lets a commit stop them all for a while."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0
        self._paused = False

    @contextlib.contextmanager
    def hold(self):
        """Around one change: waits while paused."""
        with self._cond:
            while self._paused:
                self._cond.wait()
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                if not self._active:
                    self._cond.notify_all()

    def pause(self) -> None:
        """Stop new changes and wait for those under way to finish."""
        with self._cond:
            self._paused = True
            while self._active:
                self._cond.wait()

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()


@dataclass(slots=True)
class Node:
    """What one path of the union shows."""

    path: str
    upper: str | None = None  # its real path in the upper directory
    st: os.stat_result | None = None  # lstat of ``upper``
    lower: LowerNode | None = None  # the lower entry merged here, or the data of a metacopy file
    lower_path: str | None = None  # that entry's path in the lower tree
    merge_lower: bool = False  # a directory whose lower children show through

    @property
    def is_dir(self) -> bool:
        if self.st is not None:
            return stat.S_ISDIR(self.st.st_mode)
        return self.lower is not None and self.lower.entry.kind == Kind.DIR

    @property
    def metacopy(self) -> bool:
        """An upper file whose data still comes from the lower file."""
        return self.st is not None and self.lower is not None and stat.S_ISREG(self.st.st_mode)


class UnionView:
    """The merged tree of ``lower`` under the writable directory ``upper``."""

    def __init__(self, lower: Lower, upper: str, work: str, *, volatile: bool = False,
                 read_only: bool = False, overlay_format: bool = False) -> None:
        self.lower = lower
        self.overlay_format = overlay_format  # write overlayfs markers instead of OCI ones
        self.upper = os.path.abspath(upper)
        self.work = os.path.abspath(work)
        self.volatile = volatile
        self.read_only = read_only
        self.lock = _ChangeLock(self)  # namespace changes and copy-ups, one at a time
        self._ids_lock = threading.Lock()  # inode numbers and hard-link names
        self.version = 0  # bumped by every change; listings are cached per version
        self._listings: dict[str, tuple[int, list[tuple[str, dict]]]] = {}
        self.gate = PauseGate()  # closed while a commit reads the upper layer
        self._inos: dict[object, int] = {}
        self._names: dict[tuple[int, int], set[str]] = {}  # upper inode -> paths (hard links)
        self._redirect_map: dict[str, str] | None = None  # see _redirects()
        self._hidden_files: dict[str, str] = {}  # ".fuse_hidden" path -> file in work/ ("" lower)
        self._hidden_nodes: dict[str, Node] = {}
        self._next_ino = itertools.count(2)  # 1 is the root
        self._tmp = itertools.count()

    # -- resolution -------------------------------------------------------------

    def _root(self) -> Node:
        st = os.lstat(self.upper)
        merge = not self._is_opaque(self.upper)
        low = self.lower.lookup("") if merge else None
        return Node("", self.upper, st, low, "" if merge else None, merge)

    def _child(self, parent: Node, name: str) -> Node | None:
        """The node ``name`` in directory ``parent``, or None where nothing shows."""
        path = _join(parent.path, name)
        upper = st = None
        if parent.upper is not None:
            cand = os.path.join(parent.upper, name)
            try:
                st = os.lstat(cand)
                upper = cand
            except FileNotFoundError:
                if os.path.lexists(os.path.join(parent.upper, WH + name)):
                    return None
            if st is not None and is_whiteout_st(st):
                return None
        lower_path = _join(parent.lower_path, name) if parent.merge_lower else None
        if st is None:
            low = self.lower.lookup(lower_path) if lower_path is not None else None
            if low is None:
                return None
            return Node(path, None, None, low, lower_path, low.entry.kind == Kind.DIR)
        if stat.S_ISDIR(st.st_mode):
            redirect = xattr_text(upper, REDIRECT)
            if redirect is not None:
                lower_path = redirect
            elif self._is_opaque(upper):
                lower_path = None
            low = self.lower.lookup(lower_path) if lower_path is not None else None
            merge = low is not None and low.entry.kind == Kind.DIR
            return Node(path, upper, st, low if merge else None, lower_path if merge else None, merge)
        origin = xattr_text(upper, METACOPY) if stat.S_ISREG(st.st_mode) else None
        low = self.lower.lookup(origin) if origin is not None else None
        return Node(path, upper, st, low, origin if low else None, False)

    def resolve(self, path: str) -> Node:
        """The node at ``path``; ENOENT if nothing shows there, ENOTDIR through a file."""
        node = self._root()
        if not path:
            return node
        for name in path.split("/"):
            if not node.is_dir:
                raise _err(errno.ENOTDIR, path)
            if name.startswith(WH):
                raise _err(errno.ENOENT, path)  # the markers are never visible
            if len(name) > 63 and len(name.encode("utf-8", "surrogateescape")) > 255:
                raise _err(errno.ENAMETOOLONG, path)
            child = self._child(node, name)
            if child is None:
                raise _err(errno.ENOENT, path)
            node = child
        return node

    def _lower_below(self, parent: Node, name: str) -> LowerNode | None:
        """The lower entry at ``name`` in ``parent``, whether or not the upper hides it."""
        if not parent.merge_lower:
            return None
        return self.lower.lookup(_join(parent.lower_path, name))

    # -- identity and attributes ----------------------------------------------------

    def ino(self, node: Node) -> int:
        """The inode number of a node: stable for the mount's life, kept across copy-up."""
        if node.path == "":
            return 1
        with self._ids_lock:
            if node.st is not None:
                key = ("U", node.st.st_dev, node.st.st_ino)
                ino = self._inos.get(key)
                if ino is None:
                    ino = self._inos.get(node.lower.ident) if node.lower else None
                    ino = ino or next(self._next_ino)
                    self._inos[key] = ino
                return ino
            assert node.lower is not None
            ino = self._inos.get(node.lower.ident)
            if ino is None:
                ino = self._inos[node.lower.ident] = next(self._next_ino)
            return ino

    def _alias(self, st: os.stat_result, ident: object) -> None:
        """Let a new upper inode keep the number of the lower entry it was copied from."""
        with self._ids_lock:
            ino = self._inos.get(ident)
            if ino is None:
                ino = self._inos[ident] = next(self._next_ino)
            self._inos[("U", st.st_dev, st.st_ino)] = ino

    def attrs(self, node: Node) -> dict:
        """``stat`` fields of a node, as the FUSE adapter returns them."""
        if node.st is not None:
            st = node.st
            if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                with self._ids_lock:
                    self._names.setdefault((st.st_dev, st.st_ino), set()).add(node.path)
            out = {k: getattr(st, k) for k in ("st_mode", "st_nlink", "st_uid", "st_gid",
                                                "st_size", "st_rdev", "st_blocks")}
            out.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)
        else:
            e = node.lower.entry
            nlink = 2 if e.kind == Kind.DIR else e.nlink
            if e.hardlink and e.nlink > 1:
                nlink = len(self.lower_link_names(node))  # names removed in the union don't count
            out = {"st_mode": _KIND_MODE[e.kind] | e.mode, "st_nlink": nlink,
                   "st_uid": e.uid, "st_gid": e.gid,
                   "st_size": e.size if e.kind == Kind.REG else len(e.target.encode("utf-8", "surrogateescape")) if e.kind == Kind.SYMLINK else 0,
                   "st_rdev": os.makedev(e.rdev_major, e.rdev_minor),
                   "st_blocks": (e.size + 511) // 512,
                   "st_atime": e.mtime_ns, "st_mtime": e.mtime_ns, "st_ctime": e.mtime_ns}
        out["st_ino"] = self.ino(node)
        out["st_blksize"] = 4096
        return out

    def _redirects(self) -> dict[str, str]:
        """Renamed lower directories: union path -> lower path (read from the upper once)."""
        if self._redirect_map is None:
            found = {}
            for dirpath, dirnames, _ in os.walk(self.upper):
                for d in dirnames:
                    lower = xattr_text(os.path.join(dirpath, d), REDIRECT)
                    if lower is not None:
                        found[os.path.relpath(os.path.join(dirpath, d), self.upper)] = lower
            self._redirect_map = found
        return self._redirect_map

    def _union_paths(self, lower_path: str) -> list[str]:
        """Where the union may show a lower path: in place, or under a renamed directory."""
        out = [lower_path]
        for union_dir, lower_dir in list(self._redirects().items()):
            if lower_path.startswith(lower_dir + "/"):
                out.append(union_dir + lower_path[len(lower_dir):])
        return out

    def lower_link_names(self, node: Node) -> list[str]:
        """The union paths that still show a lower hard-linked file (all its names)."""
        out = []
        for lower_name in self.lower.hardlink_names(node.lower):
            for name in self._union_paths(lower_name):
                try:
                    other = self.resolve(name)
                except OSError:
                    continue
                if other.st is None and other.lower is not None and other.lower.ident == node.lower.ident:
                    out.append(name)
        return out

    def other_names(self, st: os.stat_result, path: str | None = None) -> list[str]:
        """Other paths seen for the upper inode ``st`` (its other hard links)."""
        with self._ids_lock:
            return sorted(self._names.get((st.st_dev, st.st_ino), set()) - {path})

    def fd_attrs(self, fd: int) -> dict:
        """Attributes of an open file that no longer has a name."""
        st = os.fstat(fd)
        return self.attrs(Node("?", "", st))

    def getattr(self, path: str) -> dict:
        if path in self._hidden_files:
            return self.hidden_attrs(path)
        return self.attrs(self.resolve(path))

    def readdir(self, path: str) -> list[tuple[str, dict]]:
        """The names in a directory with their attributes ("." and ".." first).

        Listings are cached until the next change made through the view (libfuse 3.14
        does not let the kernel cache them), so a repeated walk costs no lookups.
        """
        version = self.version
        cached = self._listings.get(path)
        if cached is not None and cached[0] == version:
            return cached[1]
        listing = self._readdir(path)
        if len(self._listings) > 50_000:
            self._listings.clear()
        self._listings[path] = (version, listing)
        return listing

    def _readdir(self, path: str) -> list[tuple[str, dict]]:
        node = self.resolve(path)
        if not node.is_dir:
            raise _err(errno.ENOTDIR, path)
        names: set[str] = set()
        hidden: set[str] = set()
        if node.upper is not None:
            for entry in os.scandir(node.upper):
                name = entry.name
                if name.startswith(WH):
                    if name != OPQ:
                        hidden.add(name[len(WH):])
                elif not entry.is_file(follow_symlinks=False) and not entry.is_dir(follow_symlinks=False) \
                        and is_whiteout_st(entry.stat(follow_symlinks=False)):
                    hidden.add(name)
                else:
                    names.add(name)
        if node.merge_lower:
            for name, _ in self.lower.listdir(node.lower_path):
                if name not in hidden:
                    names.add(name)
        parent = self.resolve(path.rpartition("/")[0]) if path else node
        out = [(".", self.attrs(node)), ("..", {"st_mode": stat.S_IFDIR, "st_ino": self.ino(parent)})]
        for name in sorted(names):
            child = self._child(node, name)
            if child is not None:
                out.append((name, self.attrs(child)))
        return out

    def readlink(self, path: str) -> str:
        node = self.resolve(path)
        if node.st is not None:
            if not stat.S_ISLNK(node.st.st_mode):
                raise _err(errno.EINVAL, path)
            return os.readlink(node.upper)
        if node.lower.entry.kind != Kind.SYMLINK:
            raise _err(errno.EINVAL, path)
        return node.lower.entry.target

    def getxattr(self, path: str, name: str) -> bytes:
        node = self.resolve(path)
        if name.startswith(HIDDEN_XATTR_PREFIXES):
            raise _err(errno.ENODATA, path)
        if node.st is not None:
            return os.getxattr(node.upper, name, follow_symlinks=False)
        for n, v in node.lower.entry.xattrs:
            if n == name:
                return v
        raise _err(errno.ENODATA, path)

    def listxattr(self, path: str) -> list[str]:
        node = self.resolve(path)
        if node.st is not None:
            names = os.listxattr(node.upper, follow_symlinks=False)
        else:
            names = [n for n, _ in node.lower.entry.xattrs]
        return [n for n in names if not n.startswith(HIDDEN_XATTR_PREFIXES)]

    def statfs(self) -> dict:
        sv = os.statvfs(self.upper)
        return {k: getattr(sv, k) for k in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                                            "f_files", "f_ffree", "f_favail", "f_namemax")}

    # -- copy-up ------------------------------------------------------------------

    def _check_writable(self) -> None:
        if self.read_only:
            raise _err(errno.EROFS)

    @contextlib.contextmanager
    def _staged(self):
        """A fresh name in work/ to build an object in; removed again if building fails."""
        tmp = os.path.join(self.work, f"cu-{os.getpid()}-{next(self._tmp)}")
        try:
            yield tmp
        except BaseException:
            if os.path.isdir(tmp) and not os.path.islink(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
            elif os.path.lexists(tmp):
                os.unlink(tmp)
            raise

    @contextlib.contextmanager
    def _parent_times_kept(self, parent: Node):
        """A copy-up changes no visible name, so the parent keeps its times (as overlayfs)."""
        st = os.lstat(parent.upper)
        yield
        os.utime(parent.upper, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)

    def _sync(self, fd: int) -> None:
        if not self.volatile:
            os.fsync(fd)

    def _apply_entry_metadata(self, path: str, e: Entry, fd: int | None = None) -> None:
        """Give a new upper object the owner, mode, xattrs and times of a lower entry."""
        follow = e.kind != Kind.SYMLINK
        target: str | int = fd if fd is not None else path
        try:
            os.chown(target, e.uid, e.gid, follow_symlinks=follow or fd is not None)
        except PermissionError:
            if os.geteuid() == 0:
                raise  # a rootless mount keeps its own uid, as fuse-overlayfs without mapping
        if e.kind != Kind.SYMLINK:
            os.chmod(target, e.mode)  # after chown, which clears setuid/setgid
        for name, value in e.xattrs:
            try:
                os.setxattr(target, name, value, follow_symlinks=follow or fd is not None)
            except OSError as err:
                if err.errno not in (errno.ENOTSUP, errno.EPERM):
                    raise
        os.utime(target, ns=(e.mtime_ns, e.mtime_ns), follow_symlinks=follow or fd is not None)

    def _upper_dir(self, path: str) -> Node:
        """The directory at ``path``, copied up (with its ancestors) if it was lower only."""
        node = self.resolve(path)
        if not node.is_dir:
            raise _err(errno.ENOTDIR, path)
        if node.upper is not None:
            return node
        parent = self._upper_dir(path.rpartition("/")[0])
        dst = os.path.join(parent.upper, path.rpartition("/")[2])
        with self._staged() as tmp, self._parent_times_kept(parent):
            os.mkdir(tmp, 0o700)
            self._apply_entry_metadata(tmp, node.lower.entry)
            os.rename(tmp, dst)
        new = self._child(parent, path.rpartition("/")[2])
        self._alias(new.st, node.lower.ident)
        return new

    def copy_up(self, path: str, data: bool = True, empty: bool = False) -> Node:
        """Give ``path`` an upper copy; ``data=False`` copies metadata only (metacopy),
        ``empty=True`` makes an empty file with the metadata (its data is being replaced)."""
        self._check_writable()
        with self.lock:
            node = self.resolve(path)
            if node.is_dir:
                return self._upper_dir(path)
            if node.st is not None:
                if node.metacopy and data:
                    self._fill_metacopy(node)
                    return self.resolve(path)
                return node
            e = node.lower.entry
            if e.kind == Kind.REG and e.hardlink and e.nlink > 1:
                linked = self._copy_up_hardlinks(node)
                if linked.st is not None:
                    return linked
            parent = self._upper_dir(path.rpartition("/")[0])
            dst = os.path.join(parent.upper, path.rpartition("/")[2])
            with self._parent_times_kept(parent):
                self._copy_up_one(node, dst, data, empty)
            new = self._child(parent, path.rpartition("/")[2])
            self._alias(new.st, node.lower.ident)
            return new

    def _copy_up_one(self, node: Node, dst: str, data: bool, empty: bool = False) -> None:
        e = node.lower.entry
        with self._staged() as tmp:
            if e.kind == Kind.SYMLINK:
                os.symlink(e.target, tmp)
                self._apply_entry_metadata(tmp, e)
            elif e.kind in (Kind.CHR, Kind.BLK, Kind.FIFO):
                os.mknod(tmp, _KIND_MODE[e.kind] | 0o600, os.makedev(e.rdev_major, e.rdev_minor))
                self._apply_entry_metadata(tmp, e)
            else:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    if data and not empty and e.size:
                        self._copy_data(node, fd)
                    elif not data and not empty:
                        os.ftruncate(fd, e.size)
                        os.setxattr(fd, METACOPY, node.lower_path.encode("utf-8", "surrogateescape"))
                    self._apply_entry_metadata(tmp, e, fd)
                    self._sync(fd)
                finally:
                    os.close(fd)
            os.rename(tmp, dst)

    def _copy_data(self, node: Node, dst_fd: int) -> None:
        src = self.lower.open(node.lower_path, node.lower)
        try:
            size = node.lower.entry.size
            offset = 0
            while offset < size:
                try:
                    n = os.copy_file_range(src, dst_fd, min(COPY_CHUNK * 64, size - offset), offset, offset)
                except OSError as err:
                    if err.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    chunk = os.pread(src, COPY_CHUNK, offset)
                    n = os.pwrite(dst_fd, chunk, offset) if chunk else 0
                if n == 0:
                    raise _err(errno.EIO, node.path)
                offset += n
        finally:
            os.close(src)

    def _fill_metacopy(self, node: Node) -> None:
        """Copy a metacopy file's data into it in place; the xattr goes last."""
        fd = os.open(node.upper, os.O_WRONLY)
        try:
            self._copy_data(node, fd)
            os.utime(fd, ns=(node.st.st_atime_ns, node.st.st_mtime_ns))
            self._sync(fd)
            os.removexattr(fd, METACOPY)
        finally:
            os.close(fd)

    def _drop_metacopy(self, node: Node) -> None:
        """The data is being replaced entirely (O_TRUNC, truncate to 0): copy nothing."""
        os.truncate(node.upper, 0)
        os.removexattr(node.upper, METACOPY, follow_symlinks=False)

    def _copy_up_hardlinks(self, node: Node) -> Node:
        """Copy up every visible name of a lower hard-link group as one upper inode."""
        first: str | None = None
        for name in self.lower_link_names(node):
            other = self.resolve(name)
            parent = self._upper_dir(name.rpartition("/")[0])
            dst = os.path.join(parent.upper, name.rpartition("/")[2])
            with self._parent_times_kept(parent):
                if first is None:
                    self._copy_up_one(other, dst, data=True)
                    first = dst
                    self._alias(os.lstat(dst), node.lower.ident)
                else:
                    os.link(first, dst)
            st = os.lstat(dst)
            self._names.setdefault((st.st_dev, st.st_ino), set()).add(other.path)
        return self.resolve(node.path)

    # -- names ----------------------------------------------------------------------

    def _new_name(self, path: str) -> tuple[Node, str]:
        """Check that ``path`` may be created; return its upper parent and name."""
        self._check_writable()
        parent_path, _, name = path.rpartition("/")
        if name.startswith(WH):
            raise _err(errno.EINVAL, path)  # overlay markers cannot be created through the mount
        if len(name.encode("utf-8", "surrogateescape")) > 255:
            raise _err(errno.ENAMETOOLONG, path)
        parent = self.resolve(parent_path)
        if not parent.is_dir:
            raise _err(errno.ENOTDIR, path)
        if self._child(parent, name) is not None:
            raise _err(errno.EEXIST, path)
        return self._upper_dir(parent_path), name

    # Markers. Both forms are read: OCI (``.wh.NAME`` files, ``.wh..wh..opq``) and
    # overlayfs (char device 0/0, ``trusted.overlay.opaque`` or ``user.overlay.opaque``
    # = y); new ones are written in the upper's own format.

    def _is_opaque(self, dir_real: str) -> bool:
        if os.path.lexists(os.path.join(dir_real, OPQ)):
            return True
        # Our own (OCI format) uppers never carry the xattr: spare the getxattr there.
        return self.overlay_format and any(xattr_text(dir_real, n) == "y" for n in OVERLAY_OPAQUE)

    def _whiteout(self, parent: Node, name: str) -> None:
        """Hide the lower ``name`` of ``parent`` (only if the lower has it)."""
        if self._lower_below(parent, name) is None:
            return
        if self.overlay_format:
            try:
                os.mknod(os.path.join(parent.upper, name), stat.S_IFCHR, 0)
                return
            except PermissionError:
                pass  # not allowed to make devices: fall back to the OCI marker, as fuse-overlayfs
        os.close(os.open(os.path.join(parent.upper, WH + name), os.O_WRONLY | os.O_CREAT, 0o600))

    def _make_opaque(self, dir_real: str) -> None:
        if self.overlay_format:
            for name in OVERLAY_OPAQUE:
                try:
                    os.setxattr(dir_real, name, b"y")
                    return
                except OSError:
                    continue
        os.close(os.open(os.path.join(dir_real, OPQ), os.O_WRONLY | os.O_CREAT, 0o600))

    def _clear_markers(self, dir_real: str) -> None:
        """Remove the whiteouts inside an upper directory (before it is removed or replaced)."""
        for name in os.listdir(dir_real):
            full = os.path.join(dir_real, name)
            if name.startswith(WH) or is_whiteout_st(os.lstat(full)):
                os.unlink(full)

    def _publish(self, tmp: str, parent: Node, name: str) -> None:
        """Move a new object built in work/ to ``name``, replacing a whiteout there."""
        dst = os.path.join(parent.upper, name)
        if os.path.isdir(tmp) and not os.path.islink(tmp):
            try:
                if is_whiteout_st(os.lstat(dst)):
                    os.unlink(dst)  # a directory cannot be renamed over a device
            except FileNotFoundError:
                pass
        os.rename(tmp, dst)
        if len(name) <= 251:  # a longer name cannot have an OCI whiteout
            try:
                os.unlink(os.path.join(parent.upper, WH + name))
            except FileNotFoundError:
                pass

    def create(self, path: str, mode: int, flags: int, uid: int, gid: int) -> int:
        """Create and open a regular file; returns an OS file descriptor."""
        with self.lock:
            parent, name = self._new_name(path)
            with self._staged() as tmp:
                fd = os.open(tmp, (flags | os.O_CREAT | os.O_EXCL) & ~os.O_TRUNC, 0o600)
                try:
                    os.fchown(fd, uid, _group_in(parent, gid))
                    os.fchmod(fd, stat.S_IMODE(mode))
                    self._publish(tmp, parent, name)
                except OSError:
                    os.close(fd)
                    raise
            return fd

    def mkdir(self, path: str, mode: int, uid: int, gid: int) -> None:
        with self.lock:
            parent, name = self._new_name(path)
            with self._staged() as tmp:
                os.mkdir(tmp, 0o700)
                if self._lower_below(parent, name) is not None:
                    self._make_opaque(tmp)  # a dir made where a lower one was removed hides it
                os.chown(tmp, uid, _group_in(parent, gid))
                setgid = parent.st.st_mode & stat.S_ISGID  # inherited by new directories
                os.chmod(tmp, stat.S_IMODE(mode) | setgid)
                self._publish(tmp, parent, name)

    def symlink(self, target: str, path: str, uid: int, gid: int) -> None:
        with self.lock:
            parent, name = self._new_name(path)
            with self._staged() as tmp:
                os.symlink(target, tmp)
                os.chown(tmp, uid, _group_in(parent, gid), follow_symlinks=False)
                self._publish(tmp, parent, name)

    def mknod(self, path: str, mode: int, rdev: int, uid: int, gid: int) -> None:
        with self.lock:
            parent, name = self._new_name(path)
            with self._staged() as tmp:
                os.mknod(tmp, mode, rdev)
                os.chown(tmp, uid, _group_in(parent, gid), follow_symlinks=False)
                os.chmod(tmp, stat.S_IMODE(mode))
                self._publish(tmp, parent, name)

    def link(self, src: str, path: str) -> None:
        with self.lock:
            node = self.resolve(src)
            if node.is_dir:
                raise _err(errno.EPERM, src)
            parent, name = self._new_name(path)
            node = self.copy_up(src, data=True)
            with self._staged() as tmp:
                os.link(node.upper, tmp, follow_symlinks=False)
                self._publish(tmp, parent, name)
            st = os.lstat(node.upper)
            self._names.setdefault((st.st_dev, st.st_ino), set()).update((src, path))

    def unlink(self, path: str) -> None:
        self._check_writable()
        if path in self._hidden_files:
            real = self._hidden_files.pop(path)
            self._hidden_nodes.pop(path, None)
            if real:
                os.unlink(real)
            return
        with self.lock:
            node = self.resolve(path)
            if node.is_dir:
                raise _err(errno.EISDIR, path)
            self._remove(node)

    def rmdir(self, path: str) -> None:
        self._check_writable()
        with self.lock:
            node = self.resolve(path)
            if not node.is_dir:
                raise _err(errno.ENOTDIR, path)
            if path == "":
                raise _err(errno.EBUSY, path)
            if len(self.readdir(path)) > 2:
                raise _err(errno.ENOTEMPTY, path)
            self._remove(node)

    def _remove(self, node: Node) -> None:
        parent_path, _, name = node.path.rpartition("/")
        parent = self._upper_dir(parent_path)
        if node.upper is not None:
            if node.is_dir:
                self._clear_markers(node.upper)
                os.rmdir(node.upper)
                self._redirects().pop(node.path, None)
            else:
                os.unlink(node.upper)
        self._whiteout(parent, name)

    # libfuse keeps a file that is unlinked while open under a ".fuse_hidden..." name
    # (renaming it there instead of unlinking). Such files are moved out of the upper
    # into work/, so no listing, rmdir or commit ever sees them, and show st_nlink 0.

    def _hide(self, old: str, new: str) -> None:
        node = self.resolve(old)
        target = None
        if node.upper is not None and not node.is_dir:
            target = os.path.join(self.work, f"hidden-{os.getpid()}-{next(self._tmp)}")
            os.rename(node.upper, target)
        elif node.upper is None and node.lower is not None and node.lower.entry.kind == Kind.REG:
            # Lower-only: nothing to move; remember the lower data for fstat.
            target = ""
        self._hidden_files[new] = target if target is not None else ""
        self._hidden_nodes[new] = node
        parent = self._upper_dir(old.rpartition("/")[0])
        self._whiteout(parent, old.rpartition("/")[2])

    def hidden_attrs(self, path: str) -> dict:
        real = self._hidden_files[path]
        node = self._hidden_nodes[path]
        attrs = self.attrs(Node(path, real, os.lstat(real)) if real else node)
        attrs["st_nlink"] = 0
        attrs["st_ino"] = self.ino(node)
        return attrs

    def rename(self, old: str, new: str, flags: int = 0) -> None:
        """rename(2)/renameat2(2) with RENAME_NOREPLACE and RENAME_EXCHANGE."""
        self._check_writable()
        if HIDDEN.fullmatch(new.rpartition("/")[2]) and not flags and not self.resolve(old).is_dir:
            with self.lock:
                return self._hide(old, new)
        noreplace, exchange = flags & 1, flags & 2
        if flags & ~3:
            raise _err(errno.EINVAL, new)
        with self.lock:
            src = self.resolve(old)
            new_parent_path, _, new_name = new.rpartition("/")
            if new_name.startswith(WH):
                raise _err(errno.EINVAL, new)
            new_parent = self.resolve(new_parent_path)
            dst = self._child(new_parent, new_name)
            if old == new:
                return
            if (new + "/").startswith(old + "/") or (exchange and (old + "/").startswith(new + "/")):
                raise _err(errno.EINVAL, new)  # into its own subtree
            if dst is not None and noreplace:
                raise _err(errno.EEXIST, new)
            if exchange:
                if dst is None:
                    raise _err(errno.ENOENT, new)
                return self._exchange(src, dst)
            if dst is not None:
                if dst.is_dir and not src.is_dir:
                    raise _err(errno.EISDIR, new)
                if src.is_dir and not dst.is_dir:
                    raise _err(errno.ENOTDIR, new)
                if dst.is_dir and len(self.readdir(new)) > 2:
                    raise _err(errno.ENOTEMPTY, new)
            moved = self._copy_up_for_move(src)
            old_parent = self._upper_dir(old.rpartition("/")[0])
            new_parent = self._upper_dir(new_parent_path)
            if dst is not None and dst.upper is not None and dst.is_dir:
                self._clear_markers(dst.upper)
            target = os.path.join(new_parent.upper, new_name)
            self._publish(moved.upper, new_parent, new_name)
            if moved.is_dir:
                self._moved_redirects(old, new, target)
            if moved.is_dir:
                self._fix_moved_dir(target, new_parent, new_name)
            self._whiteout(old_parent, old.rpartition("/")[2])

    def _moved_redirects(self, old: str, new: str, real: str) -> None:
        """Keep the renamed-directory map current after ``old`` moved to ``new``."""
        redirects = self._redirects()
        for key in [k for k in redirects if k == old or k.startswith(old + "/")]:
            redirects[new + key[len(old):]] = redirects.pop(key)
        lower = xattr_text(real, REDIRECT)
        if lower is not None:
            redirects[new] = lower

    def _copy_up_for_move(self, node: Node) -> Node:
        """Copy a node up without its data; a lower directory gets a redirect."""
        if node.is_dir:
            had_lower = node.merge_lower
            lower_path = node.lower_path
            node = self._upper_dir(node.path)
            if had_lower and xattr_text(node.upper, REDIRECT) is None:
                os.setxattr(node.upper, REDIRECT, lower_path.encode("utf-8", "surrogateescape"),
                            follow_symlinks=False)
            return node
        return self.copy_up(node.path, data=False)

    def _fix_moved_dir(self, real: str, parent: Node, name: str) -> None:
        """A moved directory without a redirect must not merge what lies below its new name."""
        if xattr_text(real, REDIRECT) is None and self._lower_below(parent, name) is not None:
            self._make_opaque(real)

    def _exchange(self, a: Node, b: Node) -> None:
        a = self._copy_up_for_move(a)
        b = self._copy_up_for_move(b)
        _renameat2(a.upper, b.upper, 2)
        self._redirect_map = None  # rebuilt from the upper when next needed
        for node, other in ((a, b), (b, a)):
            # after the swap, ``node``'s object sits at ``other``'s path
            if os.path.isdir(other.upper) and not os.path.islink(other.upper):
                parent = self.resolve(other.path.rpartition("/")[0])
                self._fix_moved_dir(other.upper, parent, other.path.rpartition("/")[2])

    # -- metadata -------------------------------------------------------------------

    def _meta_target(self, path: str) -> Node:
        self._check_writable()
        hidden = self._hidden_files.get(path)
        if hidden:  # fchmod, futimens... of a file unlinked while open
            return Node(path, hidden, os.lstat(hidden))
        return self.copy_up(path, data=False)

    def chmod(self, path: str, mode: int) -> None:
        with self.lock:
            node = self._meta_target(path)
            if not stat.S_ISLNK(node.st.st_mode):
                os.chmod(node.upper, stat.S_IMODE(mode))

    def chown(self, path: str, uid: int, gid: int) -> None:
        with self.lock:
            node = self._meta_target(path)
            os.chown(node.upper, uid, gid, follow_symlinks=False)

    def utimens(self, path: str, atime_ns: int, mtime_ns: int) -> None:
        with self.lock:
            node = self._meta_target(path)
            os.utime(node.upper, ns=(atime_ns, mtime_ns), follow_symlinks=False)

    def setxattr(self, path: str, name: str, value: bytes, flags: int = 0) -> None:
        if name.startswith(HIDDEN_XATTR_PREFIXES):
            raise _err(errno.EPERM, path)
        with self.lock:
            node = self._meta_target(path)
            os.setxattr(node.upper, name, value, flags, follow_symlinks=False)

    def removexattr(self, path: str, name: str) -> None:
        if name.startswith(HIDDEN_XATTR_PREFIXES):
            raise _err(errno.ENODATA, path)
        with self.lock:
            node = self.resolve(path)
            if node.st is None and all(n != name for n, _ in node.lower.entry.xattrs):
                raise _err(errno.ENODATA, path)
            node = self._meta_target(path)
            os.removexattr(node.upper, name, follow_symlinks=False)

    # -- data -------------------------------------------------------------------------

    def open(self, path: str, flags: int) -> tuple[int, bool]:
        """Open a file; returns (fd, lower_backed). Writing or O_TRUNC copies up first."""
        write = (flags & os.O_ACCMODE) != os.O_RDONLY or flags & os.O_TRUNC
        flags &= ~(os.O_CREAT | os.O_EXCL)
        if not write:
            node = self.resolve(path)
            if node.lower is not None and (node.st is None or node.metacopy):
                return self.lower.open(node.lower_path, node.lower), True
            return os.open(node.upper, flags), False
        self._check_writable()
        with self.lock:
            node = self.resolve(path)
            if node.is_dir:
                raise _err(errno.EISDIR, path)
            truncating = bool(flags & os.O_TRUNC)
            if node.metacopy and truncating:
                self._drop_metacopy(node)
            node = self.copy_up(path, empty=truncating)
            return os.open(node.upper, flags), False

    def truncate(self, path: str, length: int) -> None:
        self._check_writable()
        if self._hidden_files.get(path):
            os.truncate(self._hidden_files[path], length)
            return
        with self.lock:
            node = self.resolve(path)
            if node.is_dir:
                raise _err(errno.EISDIR, path)
            if length == 0 and node.metacopy:
                self._drop_metacopy(node)
            node = self.copy_up(path, empty=length == 0)
            os.truncate(node.upper, length)


_libc = None


def _renameat2(old: str, new: str, flags: int) -> None:
    """renameat2(2), which the os module does not offer."""
    global _libc
    import ctypes
    import ctypes.util
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    AT_FDCWD = -100
    if _libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), new)
