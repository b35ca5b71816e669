"""Index keys of paths: ``prefix | D(parent) | name``, D a fixed-size digest of a path.

LMDB keys stop at 511 bytes and paths go to 4,095, so a directory is named in keys by
a 16-byte BLAKE2b digest of its path, never by the path: a key is at most
4 + 16 + 255 bytes at any depth. A directory's children are one contiguous key range
(readdir is one range scan) and an entry is one ``get`` (lookup costs the same at depth
1 as at depth 2,000).

The digest is cryptographic on purpose: with a fast non-cryptographic hash (xxh3) a
hostile layer could craft two directory paths with one key, and the children of one
would show up in the other. Finding any BLAKE2b-128 collision takes about 2**64 work and
hitting a given directory of someone else's layer 2**128; a layer's author needs neither
to put what they like in their own layer. Paths are not in the keys, so whoever needs
them walks the tree from the root (:func:`walk`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator

import lmdb

DIGEST_SIZE = 16
NAME_MAX = 255  # bytes in one name (the kernel's NAME_MAX)
PATH_MAX = 4095  # bytes in a relative path (the kernel's PATH_MAX less its NUL)


def _b(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def dir_key(path: str) -> bytes:
    """The fixed-size key of directory ``path`` ("" is the root)."""
    return hashlib.blake2b(_b(path), digest_size=DIGEST_SIZE).digest()


def entry_key(prefix: bytes, path: str) -> bytes:
    """Index key of ``path`` (relative, no leading slash) under a layer or chain prefix.

    The root's own key is its children's prefix with an empty name, so it sorts first.
    """
    parent, _, name = path.rpartition("/")
    return prefix + dir_key(parent) + _b(name)


def children_prefix(prefix: bytes, path: str) -> bytes:
    """Key prefix shared by the children of directory ``path`` ("" is the root)."""
    return prefix + dir_key(path)


def children(txn: lmdb.Transaction, db, prefix: bytes, path: str) -> Iterator[tuple[bytes, bytes, bytes]]:
    """(name, key, value) of each child of directory ``path``, in name order."""
    start = children_prefix(prefix, path)
    cur = txn.cursor(db=db)
    if not cur.set_range(start):
        return
    n = len(start)
    for key, value in cur:
        if not key.startswith(start):
            return
        if len(key) > n:  # not the root's own record
            yield bytes(key[n:]), key, value


def walk(txn: lmdb.Transaction, db, prefix: bytes,
         is_dir: Callable[[bytes], bool]) -> Iterator[tuple[str, bytes, bytes]]:
    """(path, key, value) of every record under ``prefix``, reached from the root: a
    directory before its children, children in name order. ``is_dir(value)`` says which
    records have children. A record no directory leads to is not visited.
    """
    root = txn.get(prefix + dir_key(""), db=db)
    if root is not None:
        yield "", prefix + dir_key(""), root
    stack: list[Iterator[tuple[bytes, bytes, bytes]]] = [children(txn, db, prefix, "")]
    paths = [""]
    while stack:
        nxt = next(stack[-1], None)
        if nxt is None:
            stack.pop()
            paths.pop()
            continue
        name, key, value = nxt
        parent = paths[-1]
        path = f"{parent}/{_s(name)}" if parent else _s(name)
        yield path, key, value
        # The length bound also ends any loop two colliding digests could make.
        if is_dir(value) and len(_b(path)) <= PATH_MAX:
            stack.append(children(txn, db, prefix, path))
            paths.append(path)


def _s(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")
