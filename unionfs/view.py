"""The union view: overlayfs semantics over a read-only lower tree and an upper directory.

Pure Python and path based: every method takes paths relative to the mount root ("" is
the root), returns plain values and raises ``OSError(errno)``; the FUSE adapter is a thin
mapping onto it, and tests drive it without a mount.

The upper and work directories are reached only through directory descriptors
(:mod:`.realdir`): no symlink in them is ever followed, and paths below the mount may
be as long as the kernel allows whatever the upper directory's own path. How the upper
records whiteouts, opaque directories, renamed lower directories and metadata-only
copies is its format (:mod:`.markers`): the OCI format plus private xattrs for the
store's containers, the kernel overlayfs's own format for fuse-layerfs.

- A metacopy file is a sparse upper file whose metadata changed (chmod, chown, utimens,
  setxattr, rename) while its data is still the lower file's, as overlayfs's metacopy;
  the data is copied on the first write, in place, and the marker removed last, so a
  crash never shows half-copied data.
- A renamed lower directory is an upper directory with a redirect to the lower path it
  merges (overlayfs's redirect_dir): no file data is copied to rename a directory.

Copy-up is atomic: an object is built in ``work/`` (data, owner, mode, xattrs, times,
fsync unless volatile) and renamed into place. Inode numbers are allocated per mount,
keyed by the lower entry's identity (hard links share it) or the upper inode, and a
copy-up keeps the number it had.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import re
import stat
import threading
from collections.abc import Callable, Iterator
from typing import NamedTuple
import dataclasses
from dataclasses import dataclass

import xxhash

from layerfs.store.records import Entry, Kind
from layerfs.store.upper import METACOPY, OPQ, REDIRECT, WH

from .cache import BoundedCache
from .lower import Listing, Lower, LowerNode
from .markers import OciMarkers, is_whiteout_st
from .realdir import RealDir

__all__ = ["METACOPY", "REDIRECT", "Listed", "Node", "PauseGate", "UnionView"]

COPY_CHUNK = 1 << 20
CAPABILITY = "security.capability"
HIDDEN = re.compile(r"\.fuse_hidden[0-9a-f]{16}")  # libfuse's name for files unlinked while open
_DIR_FD = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

_KIND_MODE = {Kind.REG: stat.S_IFREG, Kind.DIR: stat.S_IFDIR, Kind.SYMLINK: stat.S_IFLNK,
              Kind.CHR: stat.S_IFCHR, Kind.BLK: stat.S_IFBLK, Kind.FIFO: stat.S_IFIFO}


def _err(code: int, path: str = "") -> OSError:
    return OSError(code, os.strerror(code), path)


def _group_in(parent: "Node", gid: int) -> int:
    """The group of a new object: a setgid directory's own, else the creator's."""
    return parent.st.st_gid if parent.st.st_mode & stat.S_ISGID else gid


def _same_file(a: "Node", b: "Node") -> bool:
    """Whether two nodes are names of one file (hard links): one upper inode, or one
    lower entry's hard-link group (a group is copied up whole, never in part)."""
    if a.st is not None and b.st is not None:
        return (a.st.st_dev, a.st.st_ino) == (b.st.st_dev, b.st.st_ino)
    if a.st is None and b.st is None:
        return a.lower.ident == b.lower.ident
    return False


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
        self._view.changes += 1
        self._lock.release()


class PauseGate:
    """Lets changes run concurrently, and lets a commit stop them all for a while."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0
        self._paused = False

    def enter(self) -> None:
        """Before one change: waits while paused (leave() after it, always)."""
        with self._cond:
            while self._paused:
                self._cond.wait()
            self._active += 1

    def leave(self) -> None:
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


class Listed(NamedTuple):
    """One name of a directory listing: what a plain readdir gives (its inode number and
    type), and where ``UnionView.listed_attrs`` finds the rest."""

    name: str
    ino: int
    mode: int  # st_mode; its type bits at least
    source: Node | Listing | None  # None for ".."


@dataclass(slots=True)
class Node:
    """What one path of the union shows."""

    path: str
    upper: str | None = None  # its path in the upper directory
    st: os.stat_result | None = None  # lstat of ``upper``
    lower: Listing | None = None  # the lower entry merged here, or the data of a metacopy file
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
                 read_only: bool = False, markers: OciMarkers | None = None) -> None:
        self.lower = lower
        self.markers = markers or OciMarkers()
        self.up = RealDir(upper)
        self.wk = RealDir(work)
        self.upper = self.up.path
        self.work = self.wk.path
        self.volatile = volatile
        self.read_only = read_only
        self.lock = _ChangeLock(self)  # namespace changes and copy-ups, one at a time
        self._ids_lock = threading.Lock()  # inode numbers and hard-link names
        self.version = 0  # bumped by every change; listings are cached per version
        self.changes = 0  # bumped by every change made under self.lock (all but data writes)
        self._caps: dict[str, tuple[int, bytes | None]] = {}  # see _capability()
        self._listings: dict[str, tuple[int, list[tuple[str, dict]]]] = {}  # oldest first
        self._listed = 0  # names in self._listings
        self.gate = PauseGate()  # closed while a commit reads the upper layer
        self._inos: dict[tuple[int, int], int] = {}  # copied-up upper inode -> its lower number
        self._names: dict[tuple[int, int], set[str]] = {}  # upper inode -> paths (hard links)
        self._redirect_map: dict[str, str] | None = None  # see _redirects()
        self._dirs: BoundedCache[str, Node] = BoundedCache(65_536)  # see resolve()
        self._dir_gen = 0
        self._hidden_files: dict[str, str] = {}  # ".fuse_hidden" path -> its name in work/ ("" lower)
        self._hidden_nodes: dict[str, Node] = {}
        self._tmp = itertools.count()

    def close(self) -> None:
        """Close the upper and work directories' descriptors."""
        self.up.close()
        self.wk.close()

    # -- resolution -------------------------------------------------------------

    def _root(self) -> Node:
        st = os.fstat(self.up.fd)
        merge = not self.markers.opaque(self.up.fd)
        low = self.lower.lookup("") if merge else None
        return Node("", "", st, low, "" if merge else None, merge)

    @contextlib.contextmanager
    def _dirfd(self, node: Node) -> Iterator[int]:
        """A descriptor of an upper directory node, for the ``*at`` calls on its entries."""
        fd = self.up.open_dir(node.upper)
        try:
            yield fd
        finally:
            os.close(fd)

    def _child(self, parent: Node, name: str) -> Node | None:
        """The node ``name`` in directory ``parent``, or None where nothing shows."""
        if parent.upper is None:
            return self._child_at(parent, -1, name)[0]
        with self._dirfd(parent) as fd:
            return self._child_at(parent, fd, name)[0]

    def _child_at(self, parent: Node, parent_fd: int, name: str,
                  want_fd: bool = False) -> tuple[Node | None, int | None]:
        """``_child`` given a descriptor of the parent's upper directory; with ``want_fd``
        also a new descriptor of the child if it is an upper directory (caller closes)."""
        path = _join(parent.path, name)
        st = None
        if parent.upper is not None:
            try:
                st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
            except FileNotFoundError:
                if self.markers.whited_out(parent_fd, name):
                    return None, None
            else:
                if is_whiteout_st(st):
                    return None, None
        lower_path = _join(parent.lower_path, name) if parent.merge_lower else None
        if st is None:
            low = self.lower.lookup(lower_path) if lower_path is not None else None
            if low is None:
                return None, None
            return Node(path, None, None, low, lower_path, low.entry.kind == Kind.DIR), None
        upper = _join(parent.upper, name)
        if stat.S_ISDIR(st.st_mode):
            fd = os.open(name, _DIR_FD, dir_fd=parent_fd)
            try:
                redirect = self.markers.redirect(parent_fd, name, parent.lower_path)
                if redirect is not None:
                    lower_path = redirect
                elif self.markers.opaque(fd):
                    lower_path = None
            except BaseException:
                os.close(fd)
                raise
            if not want_fd:
                os.close(fd)
                fd = None
            low = self.lower.lookup(lower_path) if lower_path is not None else None
            merge = low is not None and low.entry.kind == Kind.DIR
            return Node(path, upper, st, low if merge else None, lower_path if merge else None, merge), fd
        if stat.S_ISREG(st.st_mode):
            origin = self.markers.metacopy_origin(parent_fd, name, lower_path)
            if origin is not None:
                low = self.lower.lookup(origin)
                if low is None or low.entry.kind != Kind.REG:
                    raise _err(errno.EIO, path)  # the data it stands for is not below
                return Node(path, upper, st, low, origin, False), None
        return Node(path, upper, st), None

    # Resolution. The final name of a path is looked up afresh on every call; the
    # directories above it come from a cache of directory nodes (where they are in the
    # upper, what they merge from below: never their attributes, which are not used
    # there), since only this view changes the upper. A change that copies a directory
    # up, removes or moves one drops what it outdates (_forget_dirs), after the change;
    # a resolution that raced with it is not kept (the generation moved).

    def resolve(self, path: str) -> Node:
        """The node at ``path``; ENOENT if nothing shows there, ENOTDIR through a file."""
        if not path:
            return self._root()
        parent_path, _, name = path.rpartition("/")
        parent = self._dir_node(parent_path, path)
        child = self._child(parent, self._checked_name(name, path))
        if child is None:
            raise _err(errno.ENOENT, path)
        return child

    @staticmethod
    def _checked_name(name: str, path: str) -> str:
        if name.startswith(WH):
            raise _err(errno.ENOENT, path)  # the markers are never visible
        if len(name) > 63 and len(name.encode("utf-8", "surrogateescape")) > 255:
            raise _err(errno.ENAMETOOLONG, path)
        return name

    def _dir_node(self, path: str, asked: str) -> Node:
        """The directory at ``path``, from the cache or walked from its nearest cached
        ancestor (ENOTDIR if it is not a directory, ENOENT if nothing is there)."""
        node = self._dirs.get(path)
        if node is not None:
            return node
        gen = self._dir_gen
        start = path
        while start:
            start = start.rpartition("/")[0]
            node = self._dirs.get(start)
            if node is not None:
                break
        else:
            node = self._root()
            self._keep_dir("", node, gen)
        fd = self.up.open_dir(node.upper) if node.upper is not None else -1
        try:
            for name in path[len(start) + 1 if start else 0:].split("/") if path else ():
                if not node.is_dir:
                    raise _err(errno.ENOTDIR, asked)
                child, child_fd = self._child_at(node, fd, self._checked_name(name, asked), want_fd=True)
                if fd >= 0:
                    os.close(fd)
                fd = child_fd if child_fd is not None else -1
                if child is None:
                    raise _err(errno.ENOENT, asked)
                node = child
                if node.is_dir:
                    self._keep_dir(node.path, node, gen)
        finally:
            if fd >= 0:
                os.close(fd)
        if not node.is_dir:
            raise _err(errno.ENOTDIR, asked)
        return node

    def _keep_dir(self, path: str, node: Node, gen: int) -> None:
        with self._ids_lock:
            if gen == self._dir_gen:
                self._dirs[path] = node

    def _forget_dirs(self, path: str | None = None) -> None:
        """The directory at ``path`` changed (None: directories moved; forget them all)."""
        with self._ids_lock:
            self._dir_gen += 1
            if path is None:
                self._dirs.clear()
            else:
                self._dirs.pop(path)

    def _lower_below(self, parent: Node, name: str) -> LowerNode | None:
        """The lower entry at ``name`` in ``parent``, whether or not the upper hides it."""
        if not parent.merge_lower:
            return None
        return self.lower.lookup(_join(parent.lower_path, name))

    # -- identity and attributes ----------------------------------------------------

    # Inode numbers: 1 for the root; a lower entry's is a digest of its identity (hard
    # links share it), so the server keeps no table that grows with what is walked; an
    # upper object's is its upper inode number, tagged, unless it was copied up, when it
    # keeps the number it had below (a table as large as the copy-ups). The tags keep
    # the two kinds apart and below 2**63 (signed 64-bit readers). Two lower entries
    # share a number with probability about n**2 / 2**62: 2e-7 at a million entries.
    _LOWER_TAG, _UPPER_TAG, _MASK = 1 << 61, 1 << 62, (1 << 61) - 1

    def ino(self, node: Node) -> int:
        """The inode number of a node: stable for the mount's life, kept across copy-up."""
        if node.path == "":
            return 1
        if node.st is not None:
            ino = self._inos.get((node.st.st_dev, node.st.st_ino))
            if ino is not None:
                return ino
            if node.lower is not None and stat.S_ISREG(node.st.st_mode):
                return self._lower_ino(node.lower.ident)  # a metacopy file: still the lower's
            return self._UPPER_TAG | (node.st.st_ino & self._MASK)
        return self._lower_ino(node.lower.ident)

    def _lower_ino(self, ident: tuple[str, int, str | int]) -> int:
        # Deterministic, so a remount gives a file the number it had (git's index keeps
        # it); the format string is half the cost of repr().
        key = ("%s\0%s\0%s" % ident).encode("utf-8", "surrogateescape")
        return self._LOWER_TAG | (xxhash.xxh3_64_intdigest(key) & self._MASK)

    def _alias(self, st: os.stat_result, ident: tuple[str, int, str | int]) -> None:
        """Let a new upper inode keep the number of the lower entry it was copied from."""
        with self._ids_lock:
            self._inos[(st.st_dev, st.st_ino)] = self._lower_ino(ident)

    def _drop_alias(self, st: os.stat_result | None) -> None:
        """The upper inode ``st`` is gone: a new file may get its inode number."""
        if st is not None and (stat.S_ISDIR(st.st_mode) or st.st_nlink <= 1):
            with self._ids_lock:
                self._inos.pop((st.st_dev, st.st_ino), None)

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
            out["st_ino"] = self.ino(node)
            out["st_blksize"] = 4096
            return out
        return self._lower_attrs(node.lower, node, 1 if node.path == "" else 0)

    def _lower_attrs(self, low: Listing, node: Node | None = None, ino: int = 0) -> dict:
        """``attrs`` of a name that shows ``low`` (a listing passes no Node: it costs one
        per entry); ``node`` is needed only for a hard-linked file."""
        e = low.entry
        kind = e.kind
        nlink = 2 if kind == Kind.DIR else e.nlink
        if e.hardlink and e.nlink > 1:
            nlink = len(self.lower_link_names(node))  # names removed in the union don't count
        mtime = e.mtime_ns
        return {"st_mode": _KIND_MODE[kind] | e.mode, "st_nlink": nlink,
                "st_uid": e.uid, "st_gid": e.gid,
                "st_size": e.size if kind == Kind.REG else len(e.target.encode("utf-8", "surrogateescape")) if kind == Kind.SYMLINK else 0,
                "st_rdev": os.makedev(e.rdev_major, e.rdev_minor) if e.rdev_major or e.rdev_minor else 0,
                "st_blocks": (e.size + 511) // 512,
                "st_atime": mtime, "st_mtime": mtime, "st_ctime": mtime,
                "st_ino": ino or self._lower_ino(low.ident), "st_blksize": 4096}

    def _redirects(self) -> dict[str, str]:
        """Renamed lower directories: union path -> lower path (read from the upper once)."""
        if self._redirect_map is None:
            found = {}
            stack = [self._root()]
            while stack:
                node = stack.pop()
                with self._dirfd(node) as fd:
                    for name, is_dir, _ in self.up.entries(node.upper):
                        if not is_dir or name.startswith(WH):
                            continue
                        child = self._child_at(node, fd, name)[0]
                        if child is None or child.upper is None:
                            continue
                        natural = _join(node.lower_path, name) if node.merge_lower else None
                        if child.lower_path is not None and child.lower_path != natural:
                            found[child.path] = child.lower_path
                        stack.append(child)
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

    def link_names(self, node: Node) -> list[str]:
        """Every name the union shows for the inode of ``node`` (its hard links), its own included."""
        if node.st is not None:
            if node.st.st_nlink > 1 and not stat.S_ISDIR(node.st.st_mode):
                return sorted(set(self.other_names(node.st)) | {node.path})
        elif node.lower is not None and node.lower.entry.hardlink and node.lower.entry.nlink > 1:
            return self.lower_link_names(node)
        return [node.path]

    def _others(self, node: Node) -> list[str]:
        """The other names of ``node``'s inode, whose cached attributes a change outdates."""
        return [n for n in self.link_names(node) if n != node.path]

    def other_names(self, st: os.stat_result, path: str | None = None) -> list[str]:
        """Other paths seen for the upper inode ``st`` (its other hard links)."""
        with self._ids_lock:
            return sorted(self._names.get((st.st_dev, st.st_ino), set()) - {path})

    def fd_attrs(self, fd: int) -> dict:
        """Attributes of an open file that no longer has a name."""
        st = os.fstat(fd)
        return self.attrs(Node("?", "", st))

    def created_file_attrs(self, path: str, fd: int) -> dict:
        """Attributes of ``path`` from the descriptor :meth:`create` returned for it (an
        upper file with no lower data below it), without resolving the path again."""
        if path in self._hidden_files:
            return self.hidden_attrs(path)
        return self.attrs(Node(path, "", os.fstat(fd)))

    def getattr(self, path: str) -> dict:
        if path in self._hidden_files:
            return self.hidden_attrs(path)
        node = self._dirs.get(path) if path else None
        if node is not None:
            # A directory resolved before (the kernel asks for a parent's attributes
            # after each change in it): where it is and what it merges are cached, only
            # its attributes are read afresh.
            if node.upper is None:
                return self.attrs(node)
            try:
                st = self.up.lstat(node.upper)
            except OSError:
                st = None
            if st is not None and stat.S_ISDIR(st.st_mode):
                return self.attrs(dataclasses.replace(node, st=st))
        return self.attrs(self.resolve(path))

    LISTINGS_MAX_ENTRIES = 50_000  # names kept in cached listings, all directories together (~30 MB)

    def readdir(self, path: str) -> list[Listed]:
        """The names in a directory ("." and ".." first), each with its inode number and
        type; ``listed_attrs`` gives the rest of an entry's attributes.

        Listings are cached until the next change made through the view (libfuse 3.14
        does not let the kernel cache them), so a repeated walk costs no lookups; the
        cache holds at most LISTINGS_MAX_ENTRIES names, oldest listings dropped first.
        """
        version = self.version
        cached = self._listings.get(path)
        if cached is not None and cached[0] == version:
            return cached[1]
        listing = self._readdir(path)
        with self._ids_lock:
            old = self._listings.pop(path, None)
            if old is not None:
                self._listed -= len(old[1])
            while self._listings and self._listed + len(listing) > self.LISTINGS_MAX_ENTRIES:
                oldest = next(iter(self._listings))
                self._listed -= len(self._listings.pop(oldest)[1])
            if len(listing) <= self.LISTINGS_MAX_ENTRIES:
                self._listings[path] = (version, listing)
                self._listed += len(listing)
        return listing

    def listed_attrs(self, path: str, entry: Listed) -> dict:
        """``getattr`` of ``entry``, a name the listing of directory ``path`` gave, as it
        was when listed."""
        source = entry.source
        if source is None:
            return {"st_mode": entry.mode, "st_ino": entry.ino}
        if isinstance(source, Node):
            return self.attrs(source)
        if source.entry.hardlink and source.entry.nlink > 1:
            return self._lower_attrs(source, Node(_join(path, entry.name), lower=source), entry.ino)
        return self._lower_attrs(source, None, entry.ino)

    def _readdir(self, path: str) -> list[Listed]:
        node = self.resolve(path)
        if not node.is_dir:
            raise _err(errno.ENOTDIR, path)
        upper_names: set[str] = set()
        hidden: set[str] = set()
        if node.upper is not None:
            for name, _, whiteout in self.up.entries(node.upper):
                if name.startswith(WH):
                    if name != OPQ:
                        hidden.add(name[len(WH):])
                elif whiteout:
                    hidden.add(name)
                else:
                    upper_names.add(name)
        parent = self.resolve(path.rpartition("/")[0]) if path else node
        out = [Listed(".", self.ino(node), stat.S_IFDIR, node), Listed("..", self.ino(parent), stat.S_IFDIR, None)]
        lower = self.lower.listdir(node.lower_path) if node.merge_lower else iter(())
        # Most directories a first walk lists have no upper entries: their lower listing,
        # in name order already, is the listing. Only what a plain readdir needs (the
        # inode number and type) is worked out here; most entries get no more.
        lower_ino = self._lower_ino
        if not upper_names and not hidden:
            out.extend(Listed(name, lower_ino(low.ident), _KIND_MODE[low.kind], low) for name, low in lower)
            return out
        # A name only the lower has is the lower entry its listing gave: looking it up
        # again (as _child_at would, after finding no upper entry) reads the index twice.
        lower_only = {name: low for name, low in lower if name not in hidden and name not in upper_names}
        fd = self.up.open_dir(node.upper) if node.upper is not None else -1
        try:
            for name in sorted(upper_names | lower_only.keys()):
                low = lower_only.get(name)
                if low is not None:
                    out.append(Listed(name, lower_ino(low.ident), _KIND_MODE[low.kind], low))
                    continue
                child = self._child_at(node, fd, name)[0]
                if child is not None:
                    mode = child.st.st_mode if child.st is not None else _KIND_MODE[child.lower.kind]
                    out.append(Listed(name, self.ino(child), mode, child))
        finally:
            if fd >= 0:
                os.close(fd)
        return out

    def readlink(self, path: str) -> str:
        node = self.resolve(path)
        if node.st is not None:
            if not stat.S_ISLNK(node.st.st_mode):
                raise _err(errno.EINVAL, path)
            return self.up.readlink(node.upper)
        if node.lower.entry.kind != Kind.SYMLINK:
            raise _err(errno.EINVAL, path)
        return node.lower.entry.target

    def getxattr(self, path: str, name: str) -> bytes:
        if name == CAPABILITY:
            value = self._capability(path)
            if value is None:
                raise _err(errno.ENODATA, path)
            return value
        return self._getxattr(path, name)

    def _capability(self, path: str) -> bytes | None:
        """``path``'s file capabilities, None where it has none.

        The kernel asks for them before every write to a file (a write must drop them), so
        they are remembered, each with the count of changes it was read at: only a change
        made under the lock (setxattr, removexattr, chown, rename, unlink, link, copy-up)
        can alter them or what ``path`` names, and data writes never do."""
        changes = self.changes
        kept = self._caps.get(path)
        if kept is not None and kept[0] == changes:
            return kept[1]
        try:
            value: bytes | None = self._getxattr(path, CAPABILITY)
        except OSError as e:
            if e.errno != errno.ENODATA:
                raise
            value = None
        if len(self._caps) >= 4096:
            self._caps.clear()
        self._caps[path] = (changes, value)
        return value

    def _getxattr(self, path: str, name: str) -> bytes:
        node = self.resolve(path)
        if name.startswith(self.markers.hidden_xattrs):
            raise _err(errno.ENODATA, path)
        if node.st is not None:
            return self.up.getxattr(node.upper, name)
        for n, v in node.lower.entry.xattrs:
            if n == name:
                return v
        raise _err(errno.ENODATA, path)

    def listxattr(self, path: str) -> list[str]:
        node = self.resolve(path)
        if node.st is not None:
            names = self.up.listxattr(node.upper)
        else:
            names = [n for n, _ in node.lower.entry.xattrs]
        return [n for n in names if not n.startswith(self.markers.hidden_xattrs)]

    def statfs(self) -> dict:
        sv = self.up.statvfs()
        return {k: getattr(sv, k) for k in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                                            "f_files", "f_ffree", "f_favail", "f_namemax")}

    # -- copy-up ------------------------------------------------------------------

    def _check_writable(self) -> None:
        if self.read_only:
            raise _err(errno.EROFS)

    @contextlib.contextmanager
    def _staged(self) -> Iterator[str]:
        """A fresh name in work/ to build an object in; removed again if building fails."""
        tmp = f"cu-{os.getpid()}-{next(self._tmp)}"
        try:
            yield tmp
        except BaseException:
            with contextlib.suppress(OSError):
                if stat.S_ISDIR(self.wk.lstat(tmp).st_mode):
                    for name, _, _ in self.wk.entries(tmp):  # at most a marker
                        self.wk.unlink(_join(tmp, name))
                    self.wk.rmdir(tmp)
                else:
                    self.wk.unlink(tmp)
            raise

    @contextlib.contextmanager
    def _parent_times_kept(self, parent: Node):
        """A copy-up changes no visible name, so the parent keeps its times (as overlayfs)."""
        st = self.up.lstat(parent.upper)
        yield
        self.up.utime(parent.upper, (st.st_atime_ns, st.st_mtime_ns))

    def _sync(self, fd: int) -> None:
        if not self.volatile:
            os.fsync(fd)

    def _apply_entry_metadata(self, tmp: str, e: Entry, fd: int | None = None) -> None:
        """Give a new object in work/ (``fd`` if it is an open file) the owner, mode,
        xattrs and times of a lower entry."""
        try:
            os.fchown(fd, e.uid, e.gid) if fd is not None else self.wk.chown(tmp, e.uid, e.gid)
        except PermissionError:
            if os.geteuid() == 0:
                raise  # a rootless mount keeps its own uid, as fuse-overlayfs without mapping
        if e.kind != Kind.SYMLINK:  # after chown, which clears setuid/setgid
            os.fchmod(fd, e.mode) if fd is not None else self.wk.chmod(tmp, e.mode)
        for name, value in e.xattrs:
            try:
                os.setxattr(fd, name, value) if fd is not None else self.wk.setxattr(tmp, name, value)
            except OSError as err:
                if err.errno not in (errno.ENOTSUP, errno.EPERM):
                    raise
        times = (e.mtime_ns, e.mtime_ns)
        os.utime(fd, ns=times) if fd is not None else self.wk.utime(tmp, times)

    def _upper_dir(self, path: str) -> Node:
        """The directory at ``path``, copied up (with its ancestors) if it was lower only."""
        node = self.resolve(path)
        if not node.is_dir:
            raise _err(errno.ENOTDIR, path)
        if node.upper is not None:
            return node
        parent_path, _, name = path.rpartition("/")
        parent = self._upper_dir(parent_path)
        with self._staged() as tmp, self._parent_times_kept(parent):
            self.wk.mkdir(tmp, 0o700)
            self._apply_entry_metadata(tmp, node.lower.entry)
            self.wk.rename(tmp, self.up, _join(parent.upper, name))
        self._forget_dirs(path)
        new = self._child(parent, name)
        self._alias(new.st, node.lower.ident)
        return new

    def copy_up(self, path: str, data: bool = True, empty: bool = False) -> Node:
        """Give ``path`` an upper copy; ``data=False`` copies metadata only (metacopy,
        where the upper format has it), ``empty=True`` makes an empty file with the
        metadata (its data is being replaced)."""
        self._check_writable()
        data = data or not self.markers.metacopy
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
            parent_path, _, name = path.rpartition("/")
            parent = self._upper_dir(parent_path)
            with self._parent_times_kept(parent):
                self._copy_up_one(node, _join(parent.upper, name), data, empty)
            new = self._child(parent, name)
            self._alias(new.st, node.lower.ident)
            return new

    def _copy_up_one(self, node: Node, dst: str, data: bool, empty: bool = False) -> None:
        e = node.lower.entry
        with self._staged() as tmp:
            if e.kind == Kind.SYMLINK:
                self.wk.symlink(e.target, tmp)
                self._apply_entry_metadata(tmp, e)
            elif e.kind in (Kind.CHR, Kind.BLK, Kind.FIFO):
                self.wk.mknod(tmp, _KIND_MODE[e.kind] | 0o600, os.makedev(e.rdev_major, e.rdev_minor))
                self._apply_entry_metadata(tmp, e)
            else:
                fd = self.wk.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    if data and not empty and e.size:
                        self._copy_data(node, fd)
                    elif not data and not empty and e.size:
                        os.ftruncate(fd, e.size)
                        self.markers.write_metacopy(fd, node.lower_path)
                    self._apply_entry_metadata(tmp, e, fd)
                    self._sync(fd)
                finally:
                    os.close(fd)
            self.wk.rename(tmp, self.up, dst)

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
        """Copy a metacopy file's data into it in place; the marker goes last."""
        fd = self.up.open(node.upper, os.O_WRONLY)
        try:
            self._copy_data(node, fd)
            os.utime(fd, ns=(node.st.st_atime_ns, node.st.st_mtime_ns))
            self._sync(fd)
            self.markers.clear_metacopy(fd)
        finally:
            os.close(fd)

    def _drop_metacopy(self, node: Node) -> None:
        """The data is being replaced entirely (O_TRUNC, truncate to 0): copy nothing."""
        fd = self.up.open(node.upper, os.O_WRONLY)
        try:
            os.ftruncate(fd, 0)
            self.markers.clear_metacopy(fd)
        finally:
            os.close(fd)

    def _copy_up_hardlinks(self, node: Node) -> Node:
        """Copy up every visible name of a lower hard-link group as one upper inode."""
        first: str | None = None
        for name in self.lower_link_names(node):
            other = self.resolve(name)
            parent = self._upper_dir(name.rpartition("/")[0])
            dst = _join(parent.upper, name.rpartition("/")[2])
            with self._parent_times_kept(parent):
                if first is None:
                    self._copy_up_one(other, dst, data=True)
                    first = dst
                    self._alias(self.up.lstat(dst), node.lower.ident)
                else:
                    self.up.link(first, self.up, dst)
            st = self.up.lstat(dst)
            with self._ids_lock:
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
        # The parent's place and what it merges come from the directory cache (a create
        # in a directory is the common case: tar -x, dpkg, git checkout); its attributes,
        # which the cache does not keep, are read afresh (its group and setgid bit pass
        # to the new object).
        parent = self._dir_node(parent_path, path)
        if self._child(parent, name) is not None:
            raise _err(errno.EEXIST, path)
        if parent.upper is None:
            return self._upper_dir(parent_path), name
        return dataclasses.replace(parent, st=self.up.lstat(parent.upper)), name

    def _whiteout(self, parent: Node, name: str) -> None:
        """Hide the lower ``name`` of ``parent`` (only if the lower has it)."""
        if self._lower_below(parent, name) is None:
            return
        with self._dirfd(parent) as fd:
            self.markers.write_whiteout(fd, name)

    def _make_opaque(self, tree: RealDir, rel: str) -> None:
        fd = tree.open_dir(rel)
        try:
            self.markers.write_opaque(fd)
        finally:
            os.close(fd)

    def _clear_markers(self, rel: str) -> None:
        """Remove the whiteouts inside an upper directory (before it is removed or replaced)."""
        for name, _, whiteout in self.up.entries(rel):
            if name.startswith(WH) or whiteout:
                self.up.unlink(_join(rel, name))

    def _publish(self, tree: RealDir, src: str, parent: Node, name: str) -> None:
        """Move ``src`` of ``tree`` (work/, or the upper for a rename) to ``name`` in the
        upper directory ``parent``, replacing a whiteout there."""
        dst = _join(parent.upper, name)
        if self._lower_below(parent, name) is None:
            tree.rename(src, self.up, dst)  # no lower name: no whiteout to replace
            return
        if stat.S_ISDIR(tree.lstat(src).st_mode):
            with contextlib.suppress(FileNotFoundError):
                if is_whiteout_st(self.up.lstat(dst)):
                    self.up.unlink(dst)  # a directory cannot be renamed over a device
        tree.rename(src, self.up, dst)
        if len(name) <= 251:  # a longer name cannot have an OCI whiteout
            with contextlib.suppress(FileNotFoundError):
                self.up.unlink(_join(parent.upper, WH + name))

    def create(self, path: str, mode: int, flags: int, uid: int, gid: int) -> int:
        """Create and open a regular file; returns an OS file descriptor."""
        with self.lock:
            parent, name = self._new_name(path)
            with self._staged() as tmp:
                flags = (flags | os.O_CREAT | os.O_EXCL) & ~(os.O_TRUNC | os.O_DIRECT)
                fd = self.wk.open(tmp, flags, 0o600)
                try:
                    os.fchown(fd, uid, _group_in(parent, gid))
                    os.fchmod(fd, stat.S_IMODE(mode))
                    self._publish(self.wk, tmp, parent, name)
                except OSError:
                    os.close(fd)
                    raise
            return fd

    def mkdir(self, path: str, mode: int, uid: int, gid: int) -> None:
        with self.lock:
            parent, name = self._new_name(path)
            with self._staged() as tmp:
                self.wk.mkdir(tmp, 0o700)
                if self._lower_below(parent, name) is not None:
                    self._make_opaque(self.wk, tmp)  # a dir made where a lower one was removed hides it
                self.wk.chown(tmp, uid, _group_in(parent, gid))
                setgid = parent.st.st_mode & stat.S_ISGID  # inherited by new directories
                self.wk.chmod(tmp, stat.S_IMODE(mode) | setgid)
                st = self.wk.lstat(tmp)
                self._publish(self.wk, tmp, parent, name)
            # What resolve would find for it (an upper directory merging nothing: new, or
            # opaque over a removed lower one), kept for the getattr libfuse sends next
            # and for the lookups below it (mkdir -p).
            self._keep_dir(path, Node(path, _join(parent.upper, name), st), self._dir_gen)

    def symlink(self, target: str, path: str, uid: int, gid: int) -> None:
        with self.lock:
            parent, name = self._new_name(path)
            with self._staged() as tmp:
                self.wk.symlink(target, tmp)
                self.wk.chown(tmp, uid, _group_in(parent, gid))
                self._publish(self.wk, tmp, parent, name)

    def mknod(self, path: str, mode: int, rdev: int, uid: int, gid: int) -> None:
        with self.lock:
            parent, name = self._new_name(path)
            with self._staged() as tmp:
                self.wk.mknod(tmp, mode, rdev)
                self.wk.chown(tmp, uid, _group_in(parent, gid))
                self.wk.chmod(tmp, stat.S_IMODE(mode))
                self._publish(self.wk, tmp, parent, name)

    def link(self, src: str, path: str) -> list[str]:
        """Returns every name the source had (their link count went up)."""
        with self.lock:
            node = self.resolve(src)
            if node.is_dir:
                raise _err(errno.EPERM, src)
            parent, name = self._new_name(path)
            node = self.copy_up(src, data=True)
            names = self.link_names(node)
            with self._staged() as tmp:
                self.up.link(node.upper, self.wk, tmp)
                self._publish(self.wk, tmp, parent, name)
            st = self.up.lstat(node.upper)
            with self._ids_lock:
                self._names.setdefault((st.st_dev, st.st_ino), set()).update((src, path))
            return names

    def unlink(self, path: str) -> list[str]:
        self._check_writable()
        if path in self._hidden_files:
            real = self._hidden_files.pop(path)
            self._hidden_nodes.pop(path, None)
            if real:
                self.wk.unlink(real)
            return []
        with self.lock:
            node = self.resolve(path)
            if node.is_dir:
                raise _err(errno.EISDIR, path)
            others = self._others(node)
            self._remove(node)
            self._forget_name(node)
            return others

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
                self.up.rmdir(node.upper)
                self._redirects().pop(node.path, None)
                self._forget_dirs(node.path)  # empty in the union: nothing below is cached
            else:
                self.up.unlink(node.upper)
            self._drop_alias(node.st)
        self._whiteout(parent, name)
        if node.is_dir and node.upper is None:
            self._forget_dirs(node.path)  # an empty lower-only directory: whited out, gone

    # libfuse keeps a file that is unlinked while open under a ".fuse_hidden..." name
    # (renaming it there instead of unlinking). Such files are moved out of the upper
    # into work/, so no listing, rmdir or commit ever sees them, and show st_nlink 0.

    def _hide(self, old: str, new: str) -> None:
        node = self.resolve(old)
        target = ""  # a lower-only file: nothing to move; its lower data serves fstat
        if node.upper is not None and not node.is_dir:
            target = f"hidden-{os.getpid()}-{next(self._tmp)}"
            self.up.rename(node.upper, self.wk, target)
        self._hidden_files[new] = target
        self._hidden_nodes[new] = node
        parent = self._upper_dir(old.rpartition("/")[0])
        self._whiteout(parent, old.rpartition("/")[2])

    def hidden_attrs(self, path: str) -> dict:
        real = self._hidden_files[path]
        node = self._hidden_nodes[path]
        attrs = self.attrs(Node(path, None, self.wk.lstat(real)) if real else node)
        attrs["st_nlink"] = 0
        attrs["st_ino"] = self.ino(node)
        return attrs

    def rename(self, old: str, new: str, flags: int = 0) -> list[str]:
        """rename(2)/renameat2(2) with RENAME_NOREPLACE and RENAME_EXCHANGE; returns the
        other names of the moved inode (its ctime changed) and of the one replaced (its
        link count went down)."""
        self._check_writable()
        if HIDDEN.fullmatch(new.rpartition("/")[2]) and not flags and not self.resolve(old).is_dir:
            with self.lock:
                node = self.resolve(old)
                others = self._others(node)
                self._hide(old, new)
                self._forget_name(node)
                return others
        noreplace, exchange = flags & 1, flags & 2
        if flags & ~3:
            raise _err(errno.EINVAL, new)
        with self.lock:
            src = self.resolve(old)
            new_parent_path, _, new_name = new.rpartition("/")
            if new_name.startswith(WH):
                raise _err(errno.EINVAL, new)
            if len(new_name.encode("utf-8", "surrogateescape")) > 255:
                raise _err(errno.ENAMETOOLONG, new)
            new_parent = self.resolve(new_parent_path)
            if not new_parent.is_dir:
                raise _err(errno.ENOTDIR, new)
            dst = self._child(new_parent, new_name)
            if old == new:
                return []
            others = self._others(src) + (self._others(dst) if dst is not None else [])
            if (new + "/").startswith(old + "/") or (exchange and (old + "/").startswith(new + "/")):
                raise _err(errno.EINVAL, new)  # into its own subtree
            if dst is not None and noreplace:
                raise _err(errno.EEXIST, new)
            if dst is not None and _same_file(src, dst):
                # POSIX: renaming a hard link onto another name of its file does nothing.
                # The kernel's VFS returns early for one inode; libfuse's high-level API
                # gives each name an inode of its own, so the request reaches us.
                return []
            if exchange:
                if dst is None:
                    raise _err(errno.ENOENT, new)
                self._exchange(src, dst)
                return others
            if dst is not None:
                if dst.is_dir and not src.is_dir:
                    raise _err(errno.EISDIR, new)
                if src.is_dir and not dst.is_dir:
                    raise _err(errno.ENOTDIR, new)
                if dst.is_dir and len(self.readdir(new)) > 2:
                    raise _err(errno.ENOTEMPTY, new)
            new_parent = self._upper_dir(new_parent_path)
            moved = self._copy_up_for_move(src, new_parent)
            old_parent = self._upper_dir(old.rpartition("/")[0])
            if dst is not None and dst.upper is not None and dst.is_dir:
                self._clear_markers(dst.upper)
            self._publish(self.up, moved.upper, new_parent, new_name)
            if moved.is_dir:
                self._forget_dirs()
            if dst is not None:
                self._drop_alias(dst.st)
            if moved.is_dir:
                self._moved_redirects(old, new)
                if not src.merge_lower:
                    self._fix_moved_dir(new_parent, new_name)
            self._whiteout(old_parent, old.rpartition("/")[2])
            if not src.is_dir:
                self._forget_name(moved)
                if dst is not None:
                    self._forget_name(dst)
                if moved.st.st_nlink > 1:
                    with self._ids_lock:
                        self._names.setdefault((moved.st.st_dev, moved.st.st_ino), set()).add(new)
            return [n for n in others if n not in (old, new)]

    def _forget_name(self, node: Node) -> None:
        """``node``'s path no longer names its upper inode."""
        if node.st is not None and not stat.S_ISDIR(node.st.st_mode):
            with self._ids_lock:
                names = self._names.get((node.st.st_dev, node.st.st_ino))
                if names is not None:
                    names.discard(node.path)

    def _moved_redirects(self, old: str, new: str) -> None:
        """Keep the renamed-directory map current after ``old`` moved to ``new``."""
        redirects = self._redirects()
        for key in [k for k in redirects if k == old or k.startswith(old + "/")]:
            redirects[new + key[len(old):]] = redirects.pop(key)
        moved = self.resolve(new)
        parent = self.resolve(new.rpartition("/")[0])
        natural = _join(parent.lower_path, new.rpartition("/")[2]) if parent.merge_lower else None
        if moved.lower_path is not None and moved.lower_path != natural:
            redirects[new] = moved.lower_path

    def _copy_up_for_move(self, node: Node, dst_parent: Node) -> Node:
        """Copy a node up without its data, to be moved into ``dst_parent``; what it
        merged or showed from below is recorded (a redirect) before it moves."""
        parent = self._upper_dir(node.path.rpartition("/")[0])
        name = node.path.rpartition("/")[2]
        if node.is_dir:
            had_lower, lower_path = node.merge_lower, node.lower_path
            node = self._upper_dir(node.path)
            if had_lower:
                with self._dirfd(parent) as fd:
                    self.markers.write_redirect(fd, name, lower_path, dst_parent.lower_path)
            return node
        node = self.copy_up(node.path, data=False)
        if node.metacopy:
            with self._dirfd(parent) as fd:
                self.markers.moved_metacopy(fd, name, node.lower_path, dst_parent.lower_path)
        return node

    def _fix_moved_dir(self, parent: Node, name: str) -> None:
        """A moved directory without a redirect must not merge what lies below its new name."""
        if self._lower_below(parent, name) is not None:
            self._make_opaque(self.up, _join(parent.upper, name))

    def _exchange(self, a: Node, b: Node) -> None:
        a_parent = self._upper_dir(a.path.rpartition("/")[0])
        b_parent = self._upper_dir(b.path.rpartition("/")[0])
        redirected = {a.path: a.merge_lower, b.path: b.merge_lower}
        a = self._copy_up_for_move(a, b_parent)
        b = self._copy_up_for_move(b, a_parent)
        self.up.rename(a.upper, self.up, b.upper, 2)  # RENAME_EXCHANGE
        self._forget_dirs()
        self._redirect_map = None  # rebuilt from the upper when next needed
        for node, other in ((a, b), (b, a)):
            # after the swap, ``node``'s object sits at ``other``'s path
            if node.is_dir and not redirected[node.path]:
                parent = self.resolve(other.path.rpartition("/")[0])
                self._fix_moved_dir(parent, other.path.rpartition("/")[2])

    # -- metadata -------------------------------------------------------------------

    # The changing calls below return the other names of the inode they changed (its
    # hard links), whose attributes the kernel has cached under those names.

    def _meta_target(self, path: str) -> tuple[RealDir, str, list[str]]:
        """Where a metadata change of ``path`` lands (its upper copy, metadata only), and
        the other names of its inode."""
        self._check_writable()
        hidden = self._hidden_files.get(path)
        if hidden:  # fchmod, futimens... of a file unlinked while open
            return self.wk, hidden, []
        node = self.copy_up(path, data=False)
        return self.up, node.upper, self._others(node)

    def chmod(self, path: str, mode: int) -> list[str]:
        with self.lock:
            tree, rel, others = self._meta_target(path)
            if not stat.S_ISLNK(tree.lstat(rel).st_mode):
                tree.chmod(rel, stat.S_IMODE(mode))
            return others

    def chown(self, path: str, uid: int, gid: int) -> list[str]:
        with self.lock:
            tree, rel, others = self._meta_target(path)
            tree.chown(rel, uid, gid)
            return others

    def utimens(self, path: str, atime_ns: int, mtime_ns: int) -> list[str]:
        with self.lock:
            tree, rel, others = self._meta_target(path)
            tree.utime(rel, (atime_ns, mtime_ns))
            return others

    def change_open_file(self, fd: int, change: Callable[[int], None]) -> None:
        """Apply ``change`` (fchmod, fchown, futimens, ftruncate) to the upper file open as
        ``fd``, as one change of the view."""
        self._check_writable()
        with self.lock:
            change(fd)

    def setxattr(self, path: str, name: str, value: bytes, flags: int = 0) -> list[str]:
        if name.startswith(self.markers.hidden_xattrs):
            raise _err(errno.EPERM, path)
        with self.lock:
            tree, rel, others = self._meta_target(path)
            tree.setxattr(rel, name, value, flags)
            return others

    def removexattr(self, path: str, name: str) -> list[str]:
        if name.startswith(self.markers.hidden_xattrs):
            raise _err(errno.ENODATA, path)
        with self.lock:
            node = self.resolve(path)
            if node.st is None and all(n != name for n, _ in node.lower.entry.xattrs):
                raise _err(errno.ENODATA, path)
            tree, rel, others = self._meta_target(path)
            tree.removexattr(rel, name)
            return others

    # -- data -------------------------------------------------------------------------

    def open(self, path: str, flags: int) -> tuple[int, bool, list[str]]:
        """Open a file; returns (fd, lower_backed, the other names of a file truncated by
        O_TRUNC). Writing or O_TRUNC copies up first.

        O_DIRECT is the caller's wish about the kernel's page cache of this mount; the
        server's own reads and writes of the backing file have no aligned buffers."""
        write = (flags & os.O_ACCMODE) != os.O_RDONLY or flags & os.O_TRUNC
        flags &= ~(os.O_CREAT | os.O_EXCL | os.O_DIRECT)
        if not write:
            node = self.resolve(path)
            if node.lower is not None and (node.st is None or node.metacopy):
                return self.lower.open(node.lower_path, node.lower), True, []
            return self.up.open(node.upper, flags), False, []
        self._check_writable()
        with self.lock:
            node = self.resolve(path)
            if node.is_dir:
                raise _err(errno.EISDIR, path)
            truncating = bool(flags & os.O_TRUNC)
            if node.metacopy and truncating:
                self._drop_metacopy(node)
            node = self.copy_up(path, empty=truncating)
            fd = self.up.open(node.upper, flags)
            return fd, False, self._others(node) if truncating else []

    def truncate(self, path: str, length: int) -> list[str]:
        self._check_writable()
        if self._hidden_files.get(path):
            self.wk.truncate(self._hidden_files[path], length)
            return []
        with self.lock:
            node = self.resolve(path)
            if node.is_dir:
                raise _err(errno.EISDIR, path)
            if length == 0 and node.metacopy:
                self._drop_metacopy(node)
            node = self.copy_up(path, empty=length == 0)
            self.up.truncate(node.upper, length)
            return self._others(node)
