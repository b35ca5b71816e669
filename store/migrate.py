"""Bring an index written by an older layerfs to the current schema, in one transaction.

Schema 1 keyed ``entries`` and ``merged`` by the parent's whole path
(``num | parent | NUL | name``), which LMDB's 511-byte keys cut short; schema 2 keys
them by a digest of the parent's path (see store.keys). The entries are re-keyed layer
by layer; the merged views are a cache of the entries, so they are dropped and rebuilt
on first use.
"""

from __future__ import annotations

import hashlib

import lmdb

from .keys import DIGEST_SIZE


def v1_entry_key(key: bytes) -> bytes:
    """A schema-1 entries key (``num | parent | NUL | name``) in schema 2."""
    num, (parent, _, name) = key[:4], key[4:].partition(b"\0")
    return num + hashlib.blake2b(parent, digest_size=DIGEST_SIZE).digest() + name


def _v1_to_v2(txn: lmdb.Transaction, dbs: dict) -> None:
    edb = dbs["entries"]
    for num in [bytes(k) for k, _ in txn.cursor(db=dbs["layernums"])]:
        cur = txn.cursor(db=edb)
        records = []
        if cur.set_range(num):
            while cur.key()[:4] == num:
                records.append((bytes(cur.key()), bytes(cur.value())))
                if not cur.delete():
                    break
        for key, value in records:
            txn.put(v1_entry_key(key), value, db=edb)
    txn.drop(dbs["merged"], delete=False)
    txn.drop(dbs["chains"], delete=False)


_STEPS = {1: _v1_to_v2}


def migrate(txn: lmdb.Transaction, dbs: dict, version: int, to: int) -> None:
    """Upgrade the index from schema ``version`` to ``to`` inside ``txn``."""
    while version < to:
        _STEPS[version](txn, dbs)
        version += 1
