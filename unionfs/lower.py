"""The read-only lower trees a union view stacks its upper layer on.

A lower tree answers lookups and listings with store ``Entry`` records and opens file
data; it never changes while mounted. :class:`StoreLower` serves an image's layers from
the store's flattened merged index; :class:`DirLower` a stack of plain directories, for
the fuse-overlayfs compatible mount program.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import Protocol

from store.blobs import BlobStore
from store.errors import StoreError
from store.merged import MergedTree
from store.dirimport import dir_entry, entry_of
from store.records import Entry, Kind


@dataclass(slots=True, frozen=True)
class LowerNode:
    """A visible lower entry and what identifies its inode (shared by hard links)."""

    entry: Entry
    ident: Hashable


class Lower(Protocol):
    def lookup(self, path: str) -> LowerNode | None: ...

    def listdir(self, path: str) -> Iterator[tuple[str, LowerNode]]: ...

    def open(self, path: str, node: LowerNode) -> int: ...

    def hardlink_names(self, node: LowerNode) -> list[str]: ...


class StoreLower:
    """An image's layers, read from the store's flattened merged view.

    The layers never change, so lookups are remembered (bounded): a path walked or
    missed once costs no index read the next time.
    """

    CACHE_MAX = 200_000

    def __init__(self, tree: MergedTree, blobs: BlobStore) -> None:
        self.tree = tree
        self.blobs = blobs
        self._lookups: dict[str, LowerNode | None] = {}
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
        if len(self._lookups) >= self.CACHE_MAX:
            self._lookups.clear()
        self._lookups[path] = node
        return node

    def listdir(self, path: str) -> Iterator[tuple[str, LowerNode]]:
        for name, layer, e in self.tree.listdir_in_layers(path):
            yield name, self._node(f"{path}/{name}" if path else name, layer, e)

    def open(self, path: str, node: LowerNode) -> int:
        """An fd of the file's data; EIO if its blob is missing or damaged."""
        try:
            with self.blobs.open_verified(node.entry.blob) as f:
                return os.dup(f.fileno())
        except StoreError as e:
            raise OSError(errno.EIO, str(e), path) from None

    def hardlink_names(self, node: LowerNode) -> list[str]:
        """Every path of the layer that names the same file (the group)."""
        _, layer, group = node.ident
        groups = self._groups.get(layer)
        if groups is None:
            groups = self._groups[layer] = self.tree.hardlink_groups(layer)
        return list(groups.get(group, [group]))


class DirLower:
    """A stack of plain directories, top first, merged as overlayfs merges lowerdirs.

    Whiteouts and opaque directories are honoured in every form (char device 0/0, xattr
    whiteouts, ``.wh.`` files, opaque xattrs, ``.wh..wh..opq``). The directories must not
    change while mounted, as for overlayfs; lookups are cached on that promise.
    """

    def __init__(self, dirs: list[str]) -> None:
        self.dirs = [os.path.abspath(d) for d in dirs]
        self._cache: dict[str, tuple[LowerNode, str, list[str]] | None] = {}
        self._layer_of: dict[tuple[int, int], str] = {}  # hard-linked inode -> its layer
        self._groups: dict[str, dict[tuple[int, int], list[str]]] = {}  # layer -> hard-link groups

    def _resolve(self, path: str) -> tuple[LowerNode, str, list[str]] | None:
        """(node, real path of its topmost copy, lower dirs where it is a merged directory)."""
        if path in self._cache:
            return self._cache[path]
        if path == "":
            found = self._root()
        else:
            parent_path, _, name = path.rpartition("/")
            parent = self._resolve(parent_path)
            found = None
            if parent is not None and parent[0].entry.kind == Kind.DIR:
                found = self._lookup_in(parent[2], path, name)
        self._cache[path] = found
        return found

    def _root(self) -> tuple[LowerNode, str, list[str]]:
        merged = []
        for d in self.dirs:
            merged.append(d)
            if dir_entry(d).opaque:
                break
        st = os.lstat(self.dirs[0])
        return LowerNode(dir_entry(self.dirs[0]), ("D", st.st_dev, st.st_ino)), self.dirs[0], merged

    def _lookup_in(self, dirs: list[str], path: str, name: str):
        top: tuple[Entry, str, os.stat_result] | None = None
        merged: list[str] = []
        for d in dirs:
            full = os.path.join(d, path)
            try:
                st = os.lstat(full)
            except FileNotFoundError:
                if os.path.lexists(os.path.join(os.path.dirname(full), ".wh." + name)):
                    break  # an OCI whiteout in this layer hides the name below
                continue
            e = entry_of(full, st)
            if e is None or e.kind == Kind.WHITEOUT:
                break
            if top is None:
                top = (e, full, st)
            if e.kind != Kind.DIR or top[0].kind != Kind.DIR:
                break
            merged.append(d)
            if e.opaque:
                break
        if top is None:
            return None
        e, full, st = top
        if st.st_nlink > 1 and e.kind != Kind.DIR:
            # A hard link within its layer: the union counts and copies up the group's
            # names (hardlink_names), as the kernel's overlayfs does with index=on.
            e = dataclasses.replace(e, nlink=st.st_nlink, hardlink=path)
            self._layer_of[(st.st_dev, st.st_ino)] = full[:len(full) - len(path) - 1]
        return LowerNode(e, ("D", st.st_dev, st.st_ino)), full, merged

    def lookup(self, path: str) -> LowerNode | None:
        found = self._resolve(path)
        return found[0] if found else None

    def listdir(self, path: str) -> Iterator[tuple[str, LowerNode]]:
        found = self._resolve(path)
        if found is None or found[0].entry.kind != Kind.DIR:
            return
        names: set[str] = set()
        for d in found[2]:
            try:
                names.update(n for n in os.listdir(os.path.join(d, path)) if not n.startswith(".wh."))
            except OSError:
                continue
        for name in sorted(names):
            child = self.lookup(f"{path}/{name}" if path else name)
            if child is not None:
                yield name, child

    def open(self, path: str, node: LowerNode) -> int:
        found = self._resolve(path)
        if found is None:
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        return os.open(found[1], os.O_RDONLY)

    def hardlink_names(self, node: LowerNode) -> list[str]:
        """Every path of the node's layer that names the same file (one walk of the layer,
        the first time one of its hard links is asked about)."""
        key = node.ident[1:]
        layer = self._layer_of.get(key)
        if layer is None:
            return []
        groups = self._groups.get(layer)
        if groups is None:
            groups = self._groups[layer] = _hardlink_groups(layer)
        return list(groups.get(key) or [node.entry.hardlink])  # linked after the walk: itself


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
