"""The read-only lower tree a union view stacks its upper layer on.

A lower tree answers lookups and listings with store ``Entry`` records and opens file
data; it never changes while mounted. :class:`StoreLower` serves an image's layers from
the store's flattened merged index.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import Protocol

from store.blobs import BlobStore
from store.index import prefix_scan
from store.merged import MergedTree
from store.records import Entry, path_from_key, unpack_entry


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
    """An image's layers, read from the store's flattened merged view."""

    def __init__(self, tree: MergedTree, blobs: BlobStore) -> None:
        self.tree = tree
        self.blobs = blobs

    def _node(self, path: str, layer: int, e: Entry) -> LowerNode:
        return LowerNode(e, ("L", layer, e.hardlink or path))

    def lookup(self, path: str) -> LowerNode | None:
        found = self.tree.lookup_in_layer(path)
        return self._node(path, *found) if found else None

    def listdir(self, path: str) -> Iterator[tuple[str, LowerNode]]:
        for name, layer, e in self.tree.listdir_in_layers(path):
            yield name, self._node(f"{path}/{name}" if path else name, layer, e)

    def open(self, path: str, node: LowerNode) -> int:
        if not node.entry.blob:
            return os.open(os.devnull, os.O_RDONLY)
        return os.open(self.blobs.path(node.entry.blob), os.O_RDONLY)

    def hardlink_names(self, node: LowerNode) -> list[str]:
        """Every path of the layer that names the same file (the group)."""
        _, layer, group = node.ident
        index = self.tree.index
        out = []
        with index.read() as txn:
            for key, value in prefix_scan(txn, index.db("entries"), struct.pack(">I", layer)):
                e = unpack_entry(value)
                if e.hardlink == group:
                    out.append(path_from_key(4, key))
        return out
