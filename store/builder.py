"""Assemble a layer's entries from any source and record it in one transaction.

The builder enforces what every layer must satisfy whatever its source: clean relative
paths, no path through a symlink or a file, hard links only to earlier names of the same
layer, whiteouts and opaque markers recorded as entries, implied parent directories made
explicit (flagged IMPLICIT), and a later duplicate replacing an earlier one.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import lmdb

from . import crashpoints
from .blobs import Ingest, blob_size_record
from .errors import BadArchive, HostileArchive
from .index import Index
from .keys import NAME_MAX, PATH_MAX, entry_key
from .records import (IMPLICIT, OPAQUE, Entry, Kind, LayerRecord, Source, digest_bytes,
                      pack_entry, pack_layer, unpack_layer)

T = TypeVar("T")

_IMPLICIT_DIR = Entry(Kind.DIR, mode=0o755, flags=IMPLICIT)


def clean_path(name: str) -> str:
    """Normalise a member name to ``a/b/c`` ("" is the root); refuse escapes."""
    if name.startswith("/"):
        raise HostileArchive(f"absolute path {shown(name)} in the layer")
    parts: list[str] = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise HostileArchive(f"path {shown(name)} escapes the layer")
            parts.pop()
        else:
            parts.append(part)
    return "/".join(parts)


# What Linux takes: an xattr name of 1-255 bytes, a value of up to 64 KiB, and a list of
# names (each with its NUL) of up to 64 KiB, which also bounds how many one file has.
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536
XATTR_LIST_MAX = 65536
_I64 = 1 << 63


def shown(path: str) -> str:
    """A path for an error message: quoted, control characters escaped, a long one cut
    in the middle."""
    raw = path.encode("utf-8", "surrogateescape")
    if len(raw) > 200:
        head = raw[:80].decode("utf-8", "replace")
        tail = raw[-80:].decode("utf-8", "replace")
        return f"{head!r}...{tail!r} ({len(raw)} bytes)"
    return repr(path)


def check_path(path: str) -> None:
    """Refuse a path the kernel could not show: a name over 255 bytes, a path over 4,095."""
    raw = path.encode("utf-8", "surrogateescape")
    if len(raw) > PATH_MAX:
        raise BadArchive(f"the path {shown(path)} is longer than {PATH_MAX} bytes")
    for name in raw.split(b"/"):
        if len(name) > NAME_MAX:
            raise BadArchive(f"the path {shown(path)} has a name of {len(name)} bytes "
                             f"(at most {NAME_MAX})")


def check_entry(path: str, e: Entry) -> None:
    """Refuse an entry whose metadata the index or the kernel cannot hold."""
    where = shown(path or "/")
    if len(e.target.encode("utf-8", "surrogateescape")) > PATH_MAX:
        raise BadArchive(f"{where} is a symlink whose target is longer than {PATH_MAX} bytes")
    if e.size < 0:
        raise BadArchive(f"{where} has a negative size ({e.size})")
    if not -_I64 <= e.mtime_ns // 1_000_000_000 < _I64:
        raise BadArchive(f"{where} has an mtime out of range")
    for what, value in (("device major", e.rdev_major), ("device minor", e.rdev_minor)):
        if not 0 <= value <= 0xFFFFFFFF:
            raise BadArchive(f"{where} has a {what} number of {value}, beyond 32 bits")
    listed = 0
    for name, value in e.xattrs:
        raw = name.encode("utf-8", "surrogateescape")
        if not raw or len(raw) > XATTR_NAME_MAX or b"\0" in raw:
            raise BadArchive(f"{where} has an xattr with an invalid name {name[:60]!r} "
                             f"(1-{XATTR_NAME_MAX} bytes, no NUL)")
        if len(value) > XATTR_SIZE_MAX:
            raise BadArchive(f"{where} has an xattr {name!r} of {len(value)} bytes "
                             f"(at most {XATTR_SIZE_MAX})")
        listed += len(raw) + 1
        if listed > XATTR_LIST_MAX:
            raise BadArchive(f"{where} has more xattrs than Linux can list "
                             f"({len(e.xattrs)} names; at most {XATTR_LIST_MAX} bytes of names)")


class LayerBuilder:
    """The entries of one layer being imported, kept in memory until recorded."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}

    def _parent_dir(self, path: str) -> None:
        """Make sure every ancestor of ``path`` is a directory of this layer."""
        parent = path.rpartition("/")[0]
        missing: list[str] = []
        while parent:
            e = self.entries.get(parent)
            if e is not None:
                if e.kind == Kind.DIR:
                    break
                if e.kind == Kind.SYMLINK:
                    raise HostileArchive(f"{path!r} passes through the symlink {parent!r}")
                if e.kind == Kind.WHITEOUT:
                    # Content under a whited-out name: the name becomes a new, opaque dir.
                    self.entries[parent] = _IMPLICIT_DIR._replace(flags=IMPLICIT | OPAQUE)
                    break
                raise BadArchive(f"{path!r} is inside {parent!r}, which is not a directory")
            missing.append(parent)
            parent = parent.rpartition("/")[0]
        for d in missing:
            self.entries[d] = _IMPLICIT_DIR

    def add(self, path: str, entry: Entry) -> None:
        """Add (or replace) the entry at a clean path."""
        check_path(path)
        check_entry(path, entry)
        if path == "":
            if entry.kind != Kind.DIR:
                raise BadArchive("the layer's root is not a directory")
            old = self.entries.get("")
            self.entries[""] = entry._replace(flags=entry.flags | (old.flags & OPAQUE if old else 0))
            return
        self._parent_dir(path)
        old = self.entries.get(path)
        if old is not None and old.hardlink:
            self._leave_group(path, old.hardlink)
        if old is not None:
            if old.kind == Kind.DIR and entry.kind == Kind.DIR:
                # A directory described twice (or after its opaque marker) keeps its flag.
                entry = entry._replace(flags=entry.flags | (old.flags & OPAQUE))
            elif old.kind == Kind.WHITEOUT and entry.kind == Kind.DIR:
                entry = entry._replace(flags=entry.flags | OPAQUE)
            elif old.kind == Kind.DIR:
                self._drop_descendants(path)
        self.entries[path] = entry

    def _leave_group(self, path: str, group: str) -> None:
        """``path`` is replaced: the other names of its file stay linked among themselves."""
        others = [p for p, e in self.entries.items() if e.hardlink == group and p != path]
        if group == path and others:
            for p in others:
                self.entries[p] = self.entries[p]._replace(hardlink=others[0])

    def _drop_descendants(self, path: str) -> None:
        prefix = path + "/"
        for p in [p for p in self.entries if p.startswith(prefix)]:
            del self.entries[p]

    def whiteout(self, path: str) -> None:
        """Hide ``path`` of the layers below (a name this layer also has wins)."""
        check_path(path)
        self._parent_dir(path)
        old = self.entries.get(path)
        if old is None:
            self.entries[path] = Entry(Kind.WHITEOUT, mode=0)
        elif old.kind == Kind.DIR:
            self.entries[path] = old._replace(flags=old.flags | OPAQUE)

    def opaque(self, dir_path: str) -> None:
        """Make ``dir_path`` opaque: nothing of the layers below shows through it."""
        if dir_path:
            check_path(dir_path)
            self._parent_dir(dir_path)
        old = self.entries.get(dir_path)
        if old is None or old.kind == Kind.WHITEOUT:
            self.entries[dir_path] = _IMPLICIT_DIR._replace(flags=IMPLICIT | OPAQUE)
        elif old.kind == Kind.DIR:
            self.entries[dir_path] = old._replace(flags=old.flags | OPAQUE)
        else:
            raise BadArchive(f"opaque marker inside {dir_path!r}, which is not a directory")

    def hardlink(self, path: str, target: str, name_in_archive: str) -> None:
        """Add ``path`` as another name of the earlier file ``target``."""
        t = self.entries.get(target)
        if t is None or t.kind in (Kind.DIR, Kind.WHITEOUT) or t.implicit:
            raise HostileArchive(
                f"hard link {name_in_archive!r} points to {target!r}, which is not an earlier "
                "file of this layer")
        group = t.hardlink or target
        if not t.hardlink:
            self.entries[target] = t._replace(hardlink=group)
        self.add(path, t._replace(hardlink=group))

    def finish(self, canonical: bool) -> dict[str, Entry]:
        """Final entries: link counts filled in; for canonical layers, redundant
        whiteouts (inside opaque directories of this layer) dropped."""
        counts: dict[str, int] = {}
        for e in self.entries.values():
            if e.hardlink:
                counts[e.hardlink] = counts.get(e.hardlink, 0) + 1
        out: dict[str, Entry] = {}
        for path, e in self.entries.items():
            if e.hardlink:
                n = counts[e.hardlink]
                e = e._replace(nlink=n, hardlink=e.hardlink if n > 1 else "")
            if canonical and e.kind == Kind.WHITEOUT and self._under_opaque(path):
                continue
            out[path] = e
        return out

    def _under_opaque(self, path: str) -> bool:
        parent = path
        while parent:
            parent = parent.rpartition("/")[0]
            e = self.entries.get(parent)
            if e is not None and e.opaque:
                return True
        return False


def file_bytes(entries: dict[str, Entry]) -> int:
    """Bytes of regular file data in a layer, each hard-link group counted once."""
    seen: set[str] = set()
    total = 0
    for e in entries.values():
        if e.kind == Kind.REG:
            if e.hardlink:
                if e.hardlink in seen:
                    continue
                seen.add(e.hardlink)
            total += e.size
    return total


@dataclass(slots=True)
class PendingLayer:
    """A layer read from its source, its blobs staged, not yet recorded."""

    diff_id: str
    tar_size: int
    entries: dict[str, Entry]
    source: Source
    comment: str
    tarsplit: list[bytes] = field(default_factory=list)


def record_layers(index: Index, ingest: Ingest, pendings: list[PendingLayer],
                  then: Callable[[lmdb.Transaction, list[LayerRecord]], T]) -> T:
    """Publish the ingest's blobs and record the layers and what ``then`` writes, in one
    transaction: all or nothing. A layer already stored is reused (nothing new written).

    The caller holds the store's lock shared, so gc cannot run between the publish and
    the transaction.
    """
    # Publish even for a layer already stored: a blob that fsck --repair moved aside is
    # staged again by this ingest, and so comes back.
    try:
        blobs = ingest.publish()
    except BaseException:
        ingest.unpublish()
        raise
    created = time.time_ns()

    def put_layer(txn: lmdb.Transaction, pending: PendingLayer) -> LayerRecord:
        key = digest_bytes(pending.diff_id)
        raw = txn.get(key, db=index.db("layers"))
        if raw is not None:
            return unpack_layer(pending.diff_id, raw)
        num = index.next_counter(txn, b"layer-num")
        rec = LayerRecord(pending.diff_id, num, pending.tar_size, len(pending.entries),
                          file_bytes(pending.entries), created, pending.source, pending.comment)
        txn.put(key, pack_layer(rec), db=index.db("layers"))
        prefix = struct.pack(">I", num)
        txn.put(prefix, key, db=index.db("layernums"))
        edb = index.db("entries")
        for path, e in pending.entries.items():
            txn.put(entry_key(prefix, path), pack_entry(e), db=edb)
        tdb = index.db("tarsplit")
        for i, chunk in enumerate(pending.tarsplit):
            txn.put(prefix + struct.pack(">I", i), chunk, db=tdb)
        return rec

    def txn_fn(txn: lmdb.Transaction) -> T:
        ingest.ensure_published()
        bdb = index.db("blobs")
        for blob_id, size in blobs.items():
            txn.put(blob_id.encode(), blob_size_record(size), db=bdb)
        result = then(txn, [put_layer(txn, pending) for pending in pendings])
        crashpoints.point("record-before-commit")
        return result

    try:
        result = index.write(txn_fn)
        crashpoints.point("record-committed")
        return result
    except BaseException:
        ingest.unpublish()
        raise
