"""The read-only lower trees a union view stacks its upper layer on.

A lower tree answers lookups and listings with store ``Entry`` records and opens file
data; it never changes while mounted. :class:`StoreLower` serves an image's layers from
the store's flattened merged index; :class:`DirLower` a stack of plain directories, for
the fuse-overlayfs compatible mount program.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from layerfs.store.blobs import BlobStore
from layerfs.store.errors import StoreError
from layerfs.store.merged import MergedTree
from layerfs.store.dirimport import dir_entry, make_entry
from layerfs.store.fstree import read_xattrs
from layerfs.store.records import OPAQUE, Entry, Kind
from layerfs.store.upper import OPQ

from .cache import BoundedCache
from .markers import OVERLAY_PREFIXES, checked_lower_path
from .realdir import RealDir


class LowerNode(NamedTuple):
    """A visible lower entry and what identifies its inode (shared by hard links).

    A NamedTuple, as ``Entry`` is: a listing makes one per name.
    """

    entry: Entry
    ident: tuple[str, int, str | int]  # (kind of lower, a number, a name or a number)

    @property
    def kind(self) -> Kind:
        return self.entry.kind


class ListedNode(NamedTuple):
    """A name of a :class:`DirLower` listing: what a plain readdir needs (its identity
    and kind) from one lstat in its top layer; the full entry (xattrs, markers, the
    layers below) is made when asked for, by readdirplus or a lookup. A NamedTuple: a
    listing makes one per name."""

    ident: tuple[str, int, int]
    kind: Kind
    lower: "DirLower"
    path: str
    st: os.stat_result  # the listing's lstat of the name in its top layer
    top: tuple[int, str]  # that layer, and the name's path there

    @property
    def entry(self) -> Entry:
        """The entry a lookup of the name gives (EIO if that lookup finds none)."""
        node = self.lower.listed_node(self)
        if node is None:
            raise OSError(errno.EIO, "a listed name is gone from the layers", self.path)
        return node.entry


Listing = LowerNode | ListedNode  # what a listing gives for a name: ident, kind and entry


class Lower(Protocol):
    def lookup(self, path: str) -> LowerNode | None: ...

    def listdir(self, path: str) -> Iterator[tuple[str, Listing]]: ...

    def open(self, path: str, node: Listing) -> int: ...

    def hardlink_names(self, node: Listing) -> list[str]: ...


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


class StoreLower:
    """An image's layers, read from the store's flattened merged view.

    The layers never change, so lookups are remembered (bounded): a path walked or
    missed once costs no index read the next time.
    """

    CACHE_MAX = 65_536  # about 30 MB of entries

    def __init__(self, tree: MergedTree, blobs: BlobStore) -> None:
        self.tree = tree
        self.blobs = blobs
        self._lookups: BoundedCache[str, LowerNode | None] = BoundedCache(self.CACHE_MAX)
        self._groups: dict[int, dict[str, list[str]]] = {}  # layer -> hard-link groups

    def _node(self, path: str, layer: int, e: Entry) -> LowerNode:
        return LowerNode(e, ("L", layer, e.hardlink or path))

    def lookup(self, path: str) -> LowerNode | None:
        try:
            return self._lookups[path]
        except KeyError:
            pass
        found = self.tree.lookup_in_layer(path)
        node = self._node(path, *found) if found else None
        self._lookups[path] = node
        return node

    def listdir(self, path: str) -> Iterator[tuple[str, LowerNode]]:
        for name, layer, e in self.tree.listdir_in_layers(path):
            yield name, self._node(f"{path}/{name}" if path else name, layer, e)

    def open(self, path: str, node: LowerNode) -> int:
        """An fd of the file's data; EIO if its blob is missing or damaged."""
        try:
            return self.blobs.verified_fd(node.entry.blob)
        except StoreError as e:
            raise OSError(errno.EIO, str(e), path) from None

    def hardlink_names(self, node: LowerNode) -> list[str]:
        """Every path of the layer that names the same file (the group)."""
        _, layer, group = node.ident
        groups = self._groups.get(layer)
        if groups is None:
            groups = self._groups[layer] = self.tree.hardlink_groups(layer)
        return list(groups.get(group, [group]))


# name -> the merged layer directories (bit i: merged[i]) that hold it or its ".wh." file
_Names = dict[str, int]
_LISTED_KIND = {stat.S_IFREG: Kind.REG, stat.S_IFDIR: Kind.DIR, stat.S_IFLNK: Kind.SYMLINK,
                stat.S_IFCHR: Kind.CHR, stat.S_IFBLK: Kind.BLK, stat.S_IFIFO: Kind.FIFO}


@dataclass(slots=True)
class _Found:
    """A name of a :class:`DirLower`, as the layers show it."""

    node: LowerNode
    merged: list[tuple[int, str]]  # a directory: (layer, its path there) merged here, top first
    data: tuple[int, str] | None  # a regular file: where its bytes are (below a metacopy)


class DirLower:
    """A stack of plain directories, top first, merged as overlayfs merges lowerdirs.

    Whiteouts and opaque directories are honoured in every form (char device 0/0, xattr
    whiteouts, ``.wh.`` files, opaque xattrs, ``.wh..wh..opq``), and so are the kernel's
    redirects of renamed directories and metacopy files (``trusted.overlay.*`` or
    ``user.overlay.*``), so an upper that the kernel, fuse-overlayfs or fuse-layerfs wrote
    works as a lower layer. A redirect that could leave the layers is refused (EIO), and
    every layer is read beneath its root without following symlinks (:mod:`.realdir`).
    The directories must not change while mounted, as for overlayfs; lookups are cached
    on that promise.
    """

    NAMES_MAX = 200_000  # names kept in _names, all directories together (~20 MB)
    DIRS_KEPT_OPEN = 256  # layer directories kept open (RealDir keep_dirs), all layers together

    def __init__(self, dirs: list[str]) -> None:
        self.dirs = [os.path.abspath(d) for d in dirs]
        keep = self.DIRS_KEPT_OPEN // len(self.dirs)  # none past 256 layers
        self.layers = [RealDir(d, keep_dirs=keep) for d in self.dirs]
        self._cache: BoundedCache[str, _Found | None] = BoundedCache(65_536)
        # directory -> every name its merged layer directories hold (see _child_names),
        # oldest first: a name outside it is in no layer, and its lookup probes none
        self._names: dict[str, _Names] = {}
        self._names_kept = 0
        self._unkept: set[str] = set()  # directories too large for _names: probed by name
        self._names_lock = threading.Lock()
        self._layer_of: dict[tuple[int, int], str] = {}  # hard-linked inode -> its layer
        self._groups: dict[str, dict[tuple[int, int], list[str]]] = {}  # layer -> hard-link groups

    def _resolve(self, path: str) -> _Found | None:
        if path in self._cache:
            return self._cache[path]
        if path == "":
            found = self._root()
        else:
            parent_path, _, name = path.rpartition("/")
            parent = self._resolve(parent_path)
            found = None
            if parent is not None and parent.node.entry.kind == Kind.DIR:
                found = self._lookup_in(parent, path, name)
        self._cache[path] = found
        return found

    def _root(self) -> _Found:
        merged = []
        for i, d in enumerate(self.dirs):
            merged.append((i, ""))
            if dir_entry(d).opaque:
                break
        st = os.lstat(self.dirs[0])
        return _Found(LowerNode(dir_entry(self.dirs[0]), ("D", st.st_dev, st.st_ino)), merged, None)

    def _entry(self, layer: int, rel: str) -> tuple[os.stat_result, Entry | None, str | None, bool]:
        """(lstat, entry, redirect, is a metacopy) of ``rel`` in a layer; FileNotFoundError
        where the layer has no such name (or a component of it is not a directory)."""
        try:
            with self.layers[layer].at(rel) as (fd, name):
                return self._entry_at(fd, name)
        except (NotADirectoryError, FileNotFoundError):
            raise FileNotFoundError(errno.ENOENT, "not in this layer", rel) from None
        except OSError as e:
            if e.errno == errno.ELOOP:  # a symlink on the way: not a directory of this layer
                raise FileNotFoundError(errno.ENOENT, "not in this layer", rel) from None
            raise

    @staticmethod
    def _entry_at(fd: int, name: str, st: os.stat_result | None = None
                  ) -> tuple[os.stat_result, Entry | None, str | None, bool]:
        """:meth:`_entry` of ``name`` in the directory ``fd``; ``st``: its lstat, if made."""
        if st is None:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        # /proc/self/fd/N/NAME: the entry itself, reached without following anything.
        full = f"/proc/self/fd/{fd}/{name}"
        # One listxattr and a read of each xattr it names (most files have none):
        # the entry, the redirect and the metacopy mark all come from it.
        xattrs = read_xattrs(full)
        e = make_entry(st, xattrs, lambda: os.readlink(full))
        if e is None or e.kind not in (Kind.DIR, Kind.REG):
            return st, e, None, False
        raw = next((v for p in OVERLAY_PREFIXES if (v := xattrs.get(p + "redirect")) is not None), None)
        redirect = raw.decode("utf-8", "surrogateescape") if raw is not None else None
        if e.kind == Kind.DIR:
            if not e.opaque and os.path.lexists(f"{full}/{OPQ}"):
                e = e._replace(flags=e.flags | OPAQUE)
            return st, e, redirect, False
        metacopy = any(p + "metacopy" in xattrs for p in OVERLAY_PREFIXES)
        return st, e, redirect, metacopy

    def _lookup_in(self, parent: _Found, path: str, name: str) -> _Found | None:
        names = self._child_names(path.rpartition("/")[0], parent)
        held = -1  # the layers of parent.merged that hold the name (or its .wh. file)
        if names is not None:
            held = names.get(name, 0)
            if not held:
                return None  # in none of the layers: nothing to probe
        # As the kernel's ovl_lookup: walk the parent's merged layers top-down; a relative
        # redirect renames what is looked up in the layers below, an absolute one restarts
        # from the root of every layer below; a metacopy file's data is the first
        # non-metacopy file further down.
        plan = parent.merged  # replaced (never changed) by an absolute redirect
        current, absolute = name, None
        top: tuple[Entry, os.stat_result, bool, int] | None = None
        merged: list[tuple[int, str]] = []
        data: tuple[int, str] | None = None
        i = 0
        while i < len(plan):
            layer, dir_path = plan[i]
            i += 1
            if plan is parent.merged and current is name and not held >> (i - 1) & 1:
                continue  # the listing of this layer directory has neither name nor .wh. file
            rel = absolute if absolute is not None else _join(dir_path, current)
            try:
                st, e, redirect, metacopy = self._entry(layer, rel)
            except FileNotFoundError:
                if absolute is None and len(current) <= 251 \
                        and self.layers[layer].lexists(_join(dir_path, ".wh." + current)):
                    break  # an OCI whiteout in this layer hides the name below
                continue
            if e is None or e.kind == Kind.WHITEOUT:
                break
            if top is None:
                top = (e, st, metacopy, layer)
            elif top[0].kind == Kind.DIR:
                if e.kind != Kind.DIR:
                    break
            elif e.kind != Kind.REG:
                break  # below a metacopy file, only a regular file can hold its data
            if e.kind == Kind.REG:
                if not metacopy:
                    data = (layer, rel)
                    break
            elif e.kind == Kind.DIR:
                merged.append((layer, rel))
                if e.opaque:
                    break
            else:
                break
            if redirect is not None:
                if redirect.startswith("/"):
                    absolute = checked_lower_path(redirect[1:], path)
                    plan, i = [(j, "") for j in range(layer + 1, len(self.layers))], 0
                elif "/" in redirect or redirect in ("", ".", ".."):
                    raise OSError(errno.EIO, f"invalid redirect {redirect!r}", path)
                elif absolute is not None:
                    absolute = _join(absolute.rpartition("/")[0], redirect)
                else:
                    current = redirect
        if top is None:
            return None
        e, st, metacopy, top_layer = top
        if metacopy and data is None:
            raise OSError(errno.EIO, "a metacopy file with no data below it", path)
        if st.st_nlink > 1 and e.kind != Kind.DIR:
            # A hard link within its layer: the union counts and copies up the group's
            # names (hardlink_names), as the kernel's overlayfs does with index=on.
            e = e._replace(nlink=st.st_nlink, hardlink=path)
            self._layer_of[(st.st_dev, st.st_ino)] = self.dirs[top_layer]
        return _Found(LowerNode(e, ("D", st.st_dev, st.st_ino)), merged, data)

    def lookup(self, path: str) -> LowerNode | None:
        found = self._resolve(path)
        return found.node if found else None

    def listed_node(self, listed: ListedNode) -> LowerNode | None:
        """What :meth:`lookup` gives for a name a listing found, made from the listing's
        lstat where the top layer decides alone: a lookup stops at the first layer that
        holds a non-directory, unless it is a metacopy file. A directory, whose layers
        below merge into it, or a metacopy file is looked up in full."""
        found = self._cache.get(listed.path)
        if found is None:
            found = self._listed_found(listed) if listed.kind != Kind.DIR else None
            if found is None:
                return self.lookup(listed.path)
            self._cache[listed.path] = found
        return found.node

    def _listed_found(self, listed: ListedNode) -> _Found | None:
        """The lookup of a listed non-directory from its top layer; None if that layer
        cannot decide it (a metacopy file, or the name changed since it was listed)."""
        layer, rel = listed.top
        try:
            with self.layers[layer].at(rel) as (fd, name):
                st, e, _, metacopy = self._entry_at(fd, name, listed.st)
        except OSError:
            return None
        if e is None or e.kind != listed.kind or metacopy:
            return None  # a metacopy file's data is in a layer below
        data = (layer, rel) if e.kind == Kind.REG else None
        if st.st_nlink > 1:  # a hard link within its layer, as in _lookup_in
            e = e._replace(nlink=st.st_nlink, hardlink=listed.path)
            self._layer_of[(st.st_dev, st.st_ino)] = self.dirs[layer]
        return _Found(LowerNode(e, listed.ident), [], data)

    def _child_names(self, path: str, found: _Found) -> _Names | None:
        """Every name in the layer directories merged at ``path`` (a ``.wh.NAME`` file
        counted as NAME), with the layers that hold it, listed once: the layers never
        change while mounted. Every child the union shows is among them (a redirected
        child keeps its own name in its top layer). None for a directory too large to
        keep them: its names are looked up one by one."""
        names = self._names.get(path)
        if names is None:
            if path in self._unkept:
                return None
            names = self._listed_names(found)
            if not self._keep_names(path, names):
                self._unkept.add(path)
                return None
        return names

    def _listed_names(self, found: _Found, fds: list[int] | None = None) -> _Names:
        """:meth:`_child_names` listed afresh, through ``fds`` (descriptors of
        ``found.merged``, -1 where one could not be opened) if given."""
        names: _Names = {}
        for i, (layer, rel) in enumerate(found.merged):
            bit = 1 << i
            try:
                if fds is None:
                    fd = self.layers[layer].open_dir(rel, os.O_RDONLY)
                    try:
                        listed = os.listdir(fd)
                    finally:
                        os.close(fd)
                elif fds[i] >= 0:
                    listed = os.listdir(fds[i])
                else:
                    continue
            except OSError:
                continue
            get = names.get
            for n in listed:
                if n.startswith(".wh."):
                    if n == OPQ:
                        continue
                    n = n[4:]
                names[n] = get(n, 0) | bit
        return names

    def _keep_names(self, path: str, names: _Names) -> bool:
        """Keep ``names`` for ``path``; False if there are too many to keep."""
        with self._names_lock:
            if len(names) > self.NAMES_MAX // 4:
                return False
            if path in self._names:
                return True
            self._names[path] = names
            self._names_kept += len(names)
            while self._names_kept > self.NAMES_MAX:
                self._names_kept -= len(self._names.pop(next(iter(self._names))))
            return True

    def listdir(self, path: str) -> Iterator[tuple[str, Listing]]:
        """The names the union shows below ``path``, each from one lstat in its top
        layer (a whiteout hides it); their full entries are looked up when asked for."""
        found = self._resolve(path)
        if found is None or found.node.entry.kind != Kind.DIR:
            return
        # Each merged directory is opened once for the whole listing, not once per name
        # and layer (a third of a first listing's time went to those opens).
        fds: list[int] = []
        try:
            for layer, rel in found.merged:
                try:
                    fds.append(self.layers[layer].open_dir(rel, os.O_RDONLY))
                except OSError:
                    fds.append(-1)
            names = self._names.get(path)
            if names is None:
                names = self._listed_names(found, fds)
                if path not in self._unkept and not self._keep_names(path, names):
                    self._unkept.add(path)
            children = []
            prefix = f"{path}/" if path else ""
            merged = found.merged
            for name in sorted(names):
                held = names[name]
                i = (held & -held).bit_length() - 1  # the top layer that holds the name
                listed = self._listed(fds[i], name, prefix + name, merged[i])
                if listed is not None:
                    children.append((name, listed))
        finally:
            for fd in fds:
                if fd >= 0:
                    os.close(fd)
        yield from children

    def _listed(self, fd: int, name: str, path: str, where: tuple[int, str]) -> ListedNode | None:
        """The name as its top layer directory (``fd``) shows it; None where a whiteout
        of any form is all that layer has. Only the layer that holds the name (or its
        ``.wh.`` file) first is read: a lookup of the name stops there too (see _lookup_in)."""
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return None  # the layer has only NAME's .wh. file: an OCI whiteout
        kind = _LISTED_KIND.get(stat.S_IFMT(st.st_mode))
        if kind is None or (kind == Kind.CHR and st.st_rdev == 0):
            return None  # a socket, skipped as lookups skip it; an overlay whiteout
        if kind == Kind.REG and st.st_size == 0:
            # Only an empty file can be an xattr whiteout.
            e = make_entry(st, read_xattrs(f"/proc/self/fd/{fd}/{name}"), str)
            if e is None or e.kind == Kind.WHITEOUT:
                return None
        return ListedNode(("D", st.st_dev, st.st_ino), kind, self, path, st, (where[0], _join(where[1], name)))

    def open(self, path: str, node: Listing) -> int:
        found = self._resolve(path)
        if found is None or found.data is None:
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        layer, rel = found.data
        return self.layers[layer].open(rel, os.O_RDONLY)

    def hardlink_names(self, node: Listing) -> list[str]:
        """Every path of the node's layer that names the same file (one walk of the layer,
        the first time one of its hard links is asked about)."""
        hardlink = node.entry.hardlink  # a listed name's lookup finds its layer (_layer_of)
        key = node.ident[1:]
        layer = self._layer_of.get(key)
        if layer is None:
            return []
        groups = self._groups.get(layer)
        if groups is None:
            groups = self._groups[layer] = _hardlink_groups(layer)
        return list(groups.get(key) or [hardlink])  # linked after the walk: itself


def _hardlink_groups(root: str) -> dict[tuple[int, int], list[str]]:
    """(st_dev, st_ino) -> the paths below ``root`` of each file with more than one link."""
    groups: dict[tuple[int, int], list[str]] = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            if name.startswith(".wh."):
                continue
            full = os.path.join(dirpath, name)
            try:
                st = os.lstat(full)
            except OSError:
                continue
            if st.st_nlink > 1 and not (stat.S_ISCHR(st.st_mode) and st.st_rdev == 0):  # shared whiteouts
                groups.setdefault((st.st_dev, st.st_ino), []).append(os.path.relpath(full, root))
    return groups
