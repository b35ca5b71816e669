"""Garbage collection: mark from the roots, sweep the rest.

Roots are the images (tagged or not; a container pins its image, which rmi refuses to
remove). Work in progress is protected twice: its staging in tmp/ by its lease, and
its publish-and-record step by the store lock, which gc takes exclusively. Under the store lock held exclusively (so
no layer is being recorded meanwhile), one write transaction marks what the images
reach (their layers, the blobs of those layers' entries, tar-split records and kept
compressed forms, the merged-view chains of their layer prefixes) and deletes the records of everything else;
the files go afterwards, outside the transaction, with the metadata images of chains no
image has any more. A crash at any point leaves only unrecorded files, which the next gc
removes.
"""

from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass, field

import lmdb

from . import buildcache, crashpoints, leases, metaimage
from .fstree import remove_tree
from .index import delete_prefix, prefix_scan
from .merged import chain_ids
from .progress import SILENT, Progress
from .records import bytes_digest, digest_bytes, entry_blob, unpack_image, unpack_layer, unpack_layer_blob
from .tarsplit import segments


@dataclass(slots=True)
class GcReport:
    """What gc freed (or, with dry_run, would free)."""

    layers: list[str] = field(default_factory=list)
    blobs: int = 0
    bytes: int = 0
    chains: int = 0
    meta_images: int = 0  # metadata images of the kernel backend
    tmp_removed: int = 0
    unrecorded_files: int = 0
    txn_seconds: float = 0.0  # how long the index write transaction was held
    dry_run: bool = False


def _layer_blobs(txn, index, num: int) -> set[bytes]:
    prefix = struct.pack(">I", num)
    out = {entry_blob(v) for _, v in prefix_scan(txn, index.db("entries"), prefix)}
    chunks = [v for _, v in prefix_scan(txn, index.db("tarsplit"), prefix)]
    out.update(blob.encode() for raw, blob, size in segments(iter(chunks)) if size)
    out.discard(b"")
    return out


def _sweep_records(store, dry_run: bool, report: GcReport, ignore: frozenset[str]) -> list[str]:
    """Mark and sweep the index in one write transaction; return blob ids to delete."""
    index = store.index

    def txn_fn(txn: lmdb.Transaction) -> list[str]:
        report.layers.clear()
        report.blobs = report.bytes = report.chains = 0
        live_layers: set[bytes] = set()
        live_chains: set[bytes] = set()
        for key, raw in txn.cursor(db=index.db("images")):
            if bytes_digest(key) in ignore:
                continue  # being pruned (a dry run of prune keeps the records)
            image = unpack_image("", raw)
            live_layers.update(digest_bytes(d) for d in image.layers)
            live_chains.update(digest_bytes(c) for c in chain_ids(list(image.layers)))
        live_blobs: set[bytes] = set()
        dead_layers = []
        for key, raw in txn.cursor(db=index.db("layers")):
            layer = unpack_layer(bytes_digest(key), raw)
            if bytes(key) in live_layers:
                live_blobs |= _layer_blobs(txn, index, layer.num)
            else:
                dead_layers.append(layer)
        # The kept compressed forms of live layers (a push sends them again); those of
        # other layers go with them.
        dead_forms = []
        for key, raw in txn.cursor(db=index.db("layerblobs")):
            if bytes(key[:32]) in live_layers:
                blob = unpack_layer_blob(bytes(key), raw).blob
                if blob:
                    live_blobs.add(blob.encode())
            else:
                dead_forms.append(bytes(key))
        dead_blobs = []
        for key, raw in txn.cursor(db=index.db("blobs")):
            if bytes(key) not in live_blobs:
                dead_blobs.append(bytes(key))
                report.bytes += struct.unpack("<Q", raw)[0]
        dead_chains = [(bytes(k), bytes(v)) for k, v in txn.cursor(db=index.db("chains"))
                       if bytes(k) not in live_chains]
        report.layers = [layer.diff_id for layer in dead_layers]
        report.blobs = len(dead_blobs)
        report.chains = len(dead_chains)
        if dry_run:
            return []
        for layer in dead_layers:
            prefix = struct.pack(">I", layer.num)
            txn.delete(digest_bytes(layer.diff_id), db=index.db("layers"))
            txn.delete(prefix, db=index.db("layernums"))
            delete_prefix(txn, index.db("entries"), prefix)
            delete_prefix(txn, index.db("tarsplit"), prefix)
        for key, num in dead_chains:
            txn.delete(key, db=index.db("chains"))
            delete_prefix(txn, index.db("merged"), num)
        for key in dead_forms:
            txn.delete(key, db=index.db("layerblobs"))
        for key in dead_blobs:
            txn.delete(key, db=index.db("blobs"))
        buildcache.drop_dead(txn, index)
        return [k.decode() for k in dead_blobs]

    start = time.monotonic()
    doomed = index.write(txn_fn)
    report.txn_seconds = time.monotonic() - start
    return doomed




def collect(store, dry_run: bool = False, grace_seconds: float = 0.0,
            ignore_images: frozenset[str] = frozenset(), progress: Progress = SILENT) -> GcReport:
    """Free every layer, chain and blob that no image reaches; clean tmp/ and blobs/.

    ``ignore_images`` are treated as gone (what a dry run of prune would remove)."""
    report = GcReport(dry_run=dry_run)
    progress.stage("waiting for imports and exports to finish")
    with store.lock.exclusive():
        progress.stage("marking what images reach")
        doomed = _sweep_records(store, dry_run, report, ignore_images)
        crashpoints.point("gc-swept")
        progress.stage("deleting blobs", len(doomed))
        for blob_id in doomed:
            remove_tree(store.blobs.path(blob_id))
            progress.advance()
            crashpoints.point("gc-deleting")
        with store.index.read() as txn:
            live = {metaimage.key_of(unpack_image("", raw))
                    for key, raw in txn.cursor(db=store.index.db("images"))
                    if bytes_digest(key) not in ignore_images}
        report.meta_images = metaimage.collect(store.root, live, dry_run)
        # Staging of imports that died or whose lease expired. tmp/ is listed before the
        # leases are read: an ingest takes its lease before it makes its directory, so a
        # directory listed here without a live lease is not an import that just started.
        names = os.listdir(store.blobs.tmp)
        current = leases.all_leases(store.index)
        live = {lease.id for lease in current if lease.alive()}
        for name in names:
            if name not in live:
                report.tmp_removed += 1
                if not dry_run:
                    remove_tree(os.path.join(store.blobs.tmp, name))
        if not dry_run:
            for lease in current:
                if lease.id not in live:
                    leases.release(store.index, lease.id)
        # Blob files without a record: left by a crash between publish and record.
        with store.index.read() as txn:
            recorded = {bytes(k).decode() for k, _ in txn.cursor(db=store.index.db("blobs"))}
        cutoff = time.time() - grace_seconds
        fans = os.listdir(store.blobs.dir)
        progress.stage("looking for unrecorded blob files", len(fans))
        for fan in fans:
            progress.advance()
            fan_dir = os.path.join(store.blobs.dir, fan)
            if not os.path.isdir(fan_dir) or os.path.islink(fan_dir):
                continue  # not ours: gc only ever removes blob files
            for entry in os.scandir(fan_dir):
                blob_id = fan + entry.name
                if blob_id not in recorded and entry.stat(follow_symlinks=False).st_mtime <= cutoff:
                    report.unrecorded_files += 1
                    if not dry_run:
                        remove_tree(entry.path)
    return report
