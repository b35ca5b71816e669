"""The merged tree of a layer chain, flattened once into the index.

For a chain of layers (named by its OCI ChainID) the ``merged`` database maps every
visible path to the layer whose entry it shows, so a lookup is two ``get``s whatever
the number of layers, and listing a directory is one range scan. A chain is built from
the longest prefix chain already flattened, applying the remaining layers in order:
whiteouts delete, opaque directories delete what lies below them, and an implicit
directory keeps the attributes of the directory it lies on.
"""

from __future__ import annotations

import hashlib
import posixpath
import struct
from collections.abc import Callable, Iterator

import lmdb

from .errors import PathNotFound, StoreError
from .index import Index, delete_prefix, prefix_scan
from .keys import children, dir_key, entry_key, walk
from .records import (IMPLICIT, OPAQUE, Entry, Kind, LayerRecord, digest_bytes, entry_is_dir,
                      unpack_entry)

_MERGED = struct.Struct(">IB")  # layer num, kind
MAX_SYMLINKS = 40


def chain_ids(diff_ids: list[str]) -> list[str]:
    """The OCI ChainID of every prefix of the layer list."""
    out: list[str] = []
    for d in diff_ids:
        out.append(d if not out else "sha256:" + hashlib.sha256(f"{out[-1]} {d}".encode()).hexdigest())
    return out


def _merged_is_dir(value: bytes) -> bool:
    return value[4] == Kind.DIR


def _delete_below(txn, mdb, prefix: bytes, path: str) -> None:
    """Delete the merged records of everything below ``path``."""
    if path == "":
        root_key = prefix + dir_key("")
        root = txn.get(root_key, db=mdb)
        delete_prefix(txn, mdb, prefix)
        if root is not None:
            txn.put(root_key, root, db=mdb)
        return
    # Collected first: deleting under an open cursor of the same database is fragile.
    doomed = [key for _, key, _ in _subtree(txn, mdb, prefix, path)]
    for key in doomed:
        txn.delete(key, db=mdb)


def _subtree(txn, mdb, prefix: bytes, path: str):
    todo = [path]
    while todo:
        d = todo.pop()
        for name, key, value in children(txn, mdb, prefix, d):
            yield name, key, value
            if _merged_is_dir(value):
                todo.append(f"{d}/{name.decode('utf-8', 'surrogateescape')}")


def _apply_layer(txn, index: Index, chain_prefix: bytes, layer_num: int) -> None:
    mdb, edb = index.db("merged"), index.db("entries")
    lprefix = struct.pack(">I", layer_num)
    # From the root down, so an opaque directory clears what lies below before its own
    # children are put there.
    for path, key, value in walk(txn, edb, lprefix, entry_is_dir):
        mkey = chain_prefix + key[4:]
        kind, flags = value[0], value[1]
        old = txn.get(mkey, db=mdb)
        old_kind = old[4] if old is not None else 0
        if kind == Kind.WHITEOUT:
            if old is not None:
                txn.delete(mkey, db=mdb)
                if old_kind == Kind.DIR:
                    _delete_below(txn, mdb, chain_prefix, path)
            continue
        # An opaque dir hides all below it (the root has no record of its own to go by).
        if flags & OPAQUE or (old_kind == Kind.DIR and kind != Kind.DIR):
            _delete_below(txn, mdb, chain_prefix, path)
        if kind == Kind.DIR and flags & IMPLICIT and old_kind == Kind.DIR:
            continue  # the directory below keeps its attributes
        txn.put(mkey, _MERGED.pack(layer_num, kind), db=mdb)


def build_chain(index: Index, layers: list[LayerRecord]) -> int:
    """Flatten the chain (if not yet done) and return its chain number."""
    chains = chain_ids([layer.diff_id for layer in layers])

    def txn_fn(txn: lmdb.Transaction) -> int:
        cdb, mdb = index.db("chains"), index.db("merged")
        top = txn.get(digest_bytes(chains[-1]), db=cdb)
        if top is not None:
            return struct.unpack(">I", top)[0]
        start, base = 0, None
        for i in range(len(chains) - 2, -1, -1):
            raw = txn.get(digest_bytes(chains[i]), db=cdb)
            if raw is not None:
                start, base = i + 1, struct.unpack(">I", raw)[0]
                break
        num = index.next_counter(txn, b"chain-num")
        prefix = struct.pack(">I", num)
        if base is not None:
            for key, value in prefix_scan(txn, mdb, struct.pack(">I", base)):
                txn.put(prefix + key[4:], value, db=mdb)
        for layer in layers[start:]:
            _apply_layer(txn, index, prefix, layer.num)
        txn.put(digest_bytes(chains[-1]), prefix, db=cdb)
        return num

    return index.write(txn_fn)


_ROOT = Entry(Kind.DIR, mode=0o755, flags=IMPLICIT)


class MergedTree:
    """Read-only view of an image's merged tree, served from the flattened index."""

    def __init__(self, index: Index, num: int) -> None:
        self.index = index
        self.num = num  # the flattened chain; 0 for an image without layers
        self.prefix = struct.pack(">I", num)

    @classmethod
    def of(cls, index: Index, diff_ids: list[str],
           layers: Callable[[], list[LayerRecord]]) -> "MergedTree":
        """The tree of a layer chain; ``layers()`` is called only if it must be flattened."""
        if not diff_ids:
            return cls(index, 0)
        with index.read() as txn:
            raw = txn.get(digest_bytes(chain_ids(diff_ids)[-1]), db=index.db("chains"))
        return cls(index, struct.unpack(">I", raw)[0] if raw else build_chain(index, layers()))

    def lookup_in_layer(self, path: str) -> tuple[int, Entry] | None:
        """(layer number, entry) shown at ``path`` (relative, "" is the root), or None."""
        if not self.num:
            return (0, _ROOT) if path == "" else None
        suffix = entry_key(b"", path)
        with self.index.read() as txn:
            raw = txn.get(self.prefix + suffix, db=self.index.db("merged"))
            if raw is None:
                return (0, _ROOT) if path == "" else None
            layer_num = _MERGED.unpack(raw)[0]
            value = txn.get(struct.pack(">I", layer_num) + suffix, db=self.index.db("entries"))
        if value is None:
            raise StoreError(f"the merged view refers to a missing entry (layer {layer_num})")
        return layer_num, unpack_entry(value)

    def lookup(self, path: str) -> Entry | None:
        """The entry shown at ``path`` (relative, "" is the root), or None."""
        found = self.lookup_in_layer(path)
        return found[1] if found else None

    def listdir_in_layers(self, path: str) -> Iterator[tuple[str, int, Entry]]:
        """(name, layer number, entry) of each child of directory ``path``, in name order."""
        if not self.num:
            return
        out = []
        with self.index.read() as txn:
            edb = self.index.db("entries")
            for name, key, raw in children(txn, self.index.db("merged"), self.prefix, path):
                layer_num = _MERGED.unpack(raw)[0]
                value = txn.get(struct.pack(">I", layer_num) + key[4:], db=edb)
                if value is None:
                    raise StoreError(f"the merged view refers to a missing entry (layer {layer_num})")
                out.append((name.decode("utf-8", "surrogateescape"), layer_num, unpack_entry(value)))
        yield from out

    def hardlink_groups(self, layer_num: int) -> dict[str, list[str]]:
        """The hard-link groups of one layer: group name -> every path in it."""
        groups: dict[str, list[str]] = {}
        with self.index.read() as txn:
            for path, _, value in walk(txn, self.index.db("entries"), struct.pack(">I", layer_num),
                                       entry_is_dir):
                e = unpack_entry(value)
                if e.hardlink:
                    groups.setdefault(e.hardlink, []).append(path)
        return groups

    def listdir(self, path: str) -> Iterator[tuple[str, Entry]]:
        """The children of directory ``path`` in name order."""
        for name, _, e in self.listdir_in_layers(path):
            yield name, e

    def resolve(self, path: str, follow_last: bool = True) -> tuple[str, Entry]:
        """Find ``path`` as a process chrooted into the image would, following symlinks."""
        todo = [p for p in path.split("/") if p not in ("", ".")]
        done: list[str] = []
        hops = 0
        entry = self.lookup("")
        while todo:
            part = todo.pop(0)
            if part == "..":
                if done:
                    done.pop()
                continue
            cand = "/".join(done + [part])
            entry = self.lookup(cand)
            if entry is None:
                raise PathNotFound(f"{posixpath.join('/', path)}: no such file or directory in the image")
            if entry.kind == Kind.SYMLINK and (todo or follow_last):
                hops += 1
                if hops > MAX_SYMLINKS:
                    raise StoreError(f"{path}: too many levels of symbolic links")
                target = [p for p in entry.target.split("/") if p not in ("", ".")]
                if entry.target.startswith("/"):
                    done = []
                todo = target + todo
                continue
            if todo and entry.kind != Kind.DIR:
                raise PathNotFound(f"{posixpath.join('/', path)}: not a directory in the image")
            done.append(part)
        return "/".join(done), entry or _ROOT
