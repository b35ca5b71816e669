"""Rebuild a damaged index (``fsck --repair``) from what can still be read, and say
exactly what is lost.

The damaged index is set aside (``index.lmdb.damaged-TIME``, never deleted) and read by
a child process: LMDB trusts its pages, and reading garbage can end in an assertion
that aborts the process, so the child reports records one by one and the parent
restarts it past whatever killed it. A truncated file is read through a copy padded
with zeros to its recorded size. A new index is built in ``index.lmdb.rebuilding`` and
renamed into place only when complete:

- a layer is kept only if it exports to the bytes its id names: a tar layer from its
  tar-split and blobs, and its entries are then made anew by re-reading that tar (so
  entries lost or damaged come back); a directory or commit layer from its entries and
  blobs;
- an image is kept if all its layers are, a tag or container if its image is;
- blob files no kept layer uses are moved to ``lost+found/`` (gc would delete them,
  and they are needed if the old index is ever restored).

The store's marker names the images the index held; those not rebuilt are reported.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Iterator

import lmdb

from . import marker as markermod
from .blobs import BlobStore
from .errors import StoreError
from .export import layer_tar
from .index import DATABASES, SCHEMA_VERSION, Index, data_file, delete_prefix, mapped_size, prefix_scan
from .keys import entry_key
from .lock import StoreLock
from .migrate import v1_entry_key
from .records import (Source, bytes_digest, digest_bytes, entry_blob, pack_entry, unpack_image,
                      unpack_layer)
from .tarimport import read_tar
from .tarsplit import segments

_SMALL_DBS = ("meta", "layers", "images", "tags", "containers")


# -- the child: read what LMDB still can ---------------------------------------------------------


def _salvage_child(path: str, jobs: list[tuple[str, bytes | None]]) -> None:
    """Write ("begin", i), then (key, value) records, then ("end", i, whole) per job."""
    out = sys.stdout.buffer
    env = lmdb.open(path, readonly=True, lock=False, max_dbs=len(DATABASES) + 4, subdir=True)

    def emit(obj) -> None:
        pickle.dump(obj, out)
        out.flush()

    for i, (name, prefix) in enumerate(jobs):
        emit(("begin", i))
        whole = True
        try:
            with env.begin(buffers=False) as txn:
                db = env.open_db(name.encode(), txn=txn, create=False)
                cur = txn.cursor(db=db)
                if cur.set_range(prefix or b""):
                    for key, value in cur:
                        if prefix and not key.startswith(prefix):
                            break
                        emit((bytes(key), bytes(value)))
        except (lmdb.Error, ValueError):
            whole = False
        emit(("end", i, whole))


def _salvage(path: str, jobs: list[tuple[str, bytes | None]]) -> list[tuple[list, bool]]:
    """(records, whole?) per job; a job during which the child died is not whole."""
    results: list[tuple[list, bool]] = [([], False) for _ in jobs]
    start = 0
    while start < len(jobs):
        proc = subprocess.Popen([sys.executable, "-m", "layerfs.store.rebuild", path],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        proc.stdin.write(pickle.dumps(jobs[start:]))
        proc.stdin.close()
        current = None
        while True:
            try:
                item = pickle.load(proc.stdout)
            except (EOFError, pickle.UnpicklingError):
                break
            if item[0] == "begin":
                current = start + item[1]
            elif item[0] == "end":
                results[start + item[1]] = (results[start + item[1]][0], item[2])
                current = None
            else:
                results[current][0].append(item)
        proc.wait()
        if current is None:
            break  # finished (or died between jobs: nothing more was started)
        start = current + 1  # died inside a job: that job is not whole; go on after it
    return results


def _readable_copy(damaged: str, scratch: str) -> str | None:
    """A copy of the damaged index that LMDB may map (padded if it was cut short), or
    None if there is nothing to read."""
    data = data_file(damaged)
    if not os.path.exists(data) or os.path.getsize(data) == 0:
        return None
    os.makedirs(scratch, mode=0o700)
    copy = os.path.join(scratch, "data.mdb")
    shutil.copyfile(data, copy)
    sizes = mapped_size(scratch)
    if sizes is not None and sizes[0] < sizes[1]:
        os.truncate(copy, sizes[1])  # zeros where the pages were: LMDB reads, never SIGBUS
    return scratch


# -- the parent: rebuild -----------------------------------------------------------------------------


class _KnownBlobs:
    """Stands in for an Ingest while a tar is re-read from its own tar-split: each
    file's blob is stored already, and the tar-split names it, in order."""

    def __init__(self, files: Iterator[str]) -> None:
        self.files = files

    def writer(self) -> "_KnownBlobs":
        return self

    def write(self, chunk: bytes) -> None:
        pass

    def finish(self) -> str:
        return next(self.files)

    def add(self, data: bytes, what: str = "") -> str:
        return next(self.files)


class _ChunkReader(io.RawIOBase):
    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.chunks, self.buf = chunks, b""

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self.buf:
            self.buf = next(self.chunks, None)
            if self.buf is None:
                self.buf = b""
                return 0
        n = min(len(b), len(self.buf))
        b[:n], self.buf = self.buf[:n], self.buf[n:]
        return n


def _tar_layer_whole(index: Index, blobs: BlobStore, layer) -> bool:
    """Re-read a tar layer from its tar-split and blobs: it is whole if that gives the
    bytes its id names, and its entries are then made anew from those bytes (an entry
    damaged in place would go unseen otherwise: LMDB keeps no checksums)."""
    prefix = struct.pack(">I", layer.num)
    with index.read() as txn:
        chunks = [v for _, v in prefix_scan(txn, index.db("tarsplit"), prefix)]
    try:
        files = iter([blob for raw, blob, _ in segments(iter(chunks)) if not raw])
        pending = read_tar(_KnownBlobs(files), _ChunkReader(layer_tar(index, blobs, layer)))
    except (StoreError, OSError, StopIteration):
        return False
    if pending.diff_id != layer.diff_id or len(pending.entries) != layer.entries:
        return False

    def txn_fn(txn) -> None:
        delete_prefix(txn, index.db("entries"), prefix)
        for path, e in pending.entries.items():
            txn.put(entry_key(prefix, path), pack_entry(e), db=index.db("entries"))

    index.write(txn_fn)
    return True


def _canonical_layer_whole(index: Index, blobs: BlobStore, layer) -> bool:
    """A directory or commit layer is whole if its entries and blobs export to the bytes
    its id names (the canonical tar is made from the entries, so this checks them too)."""
    sha = hashlib.sha256()
    try:
        for chunk in layer_tar(index, blobs, layer):
            sha.update(chunk)
    except (StoreError, OSError, KeyError, ValueError, struct.error):
        return False
    return "sha256:" + sha.hexdigest() == layer.diff_id


def rebuild(root: str) -> tuple[list[str], dict]:
    """Rebuild the index of the store at ``root``; returns (lines for the user, what was
    rebuilt: {"images": {id: tags}, "layers": n})."""
    lines: list[str] = []
    held = markermod.read(root)
    with StoreLock(root).exclusive():
        index_path = os.path.join(root, "index.lmdb")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        if os.path.exists(index_path):
            os.rename(index_path, f"{index_path}.damaged-{stamp}")
        damaged = sorted(d for d in os.listdir(root) if d.startswith("index.lmdb.damaged-"))
        source = os.path.join(root, damaged[-1]) if damaged else None
        if source:
            lines.append(f"the damaged index is kept at {source}")
        scratch = os.path.join(root, "tmp", f"salvage-{stamp}-{os.getpid()}")
        readable = _readable_copy(source, scratch) if source else None
        try:
            rebuilt = _rebuild_from(root, readable, held, lines)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return lines, rebuilt


def _rebuild_from(root: str, readable: str | None, held, lines: list[str]) -> dict:
    small = dict(zip(_SMALL_DBS, _salvage(readable, [(n, None) for n in _SMALL_DBS]))) if readable else {}
    records = {name: dict(small.get(name, ([], False))[0]) for name in _SMALL_DBS}
    for name in _SMALL_DBS:
        if readable and not small[name][1]:
            lines.append(f"part of the index's {name} records could not be read")
    schema = struct.unpack("<I", records["meta"].get(b"schema", struct.pack("<I", SCHEMA_VERSION)))[0]
    layers = {k: unpack_layer(bytes_digest(k), v) for k, v in records["layers"].items()}
    jobs = [(db, struct.pack(">I", layer.num)) for layer in layers.values() for db in ("entries", "tarsplit")]
    per_layer = _salvage(readable, jobs) if jobs else []

    building = os.path.join(root, "index.lmdb.rebuilding")
    shutil.rmtree(building, ignore_errors=True)
    index = Index(building)
    try:
        store_id = bytes.fromhex(held.store_id) if held and held.store_id else None

        def put_all(txn) -> None:
            meta = index.db("meta")
            if store_id:
                txn.put(b"store-id", store_id, db=meta)
            top = max((layer.num for layer in layers.values()), default=0)
            txn.put(b"layer-num", struct.pack("<I", top), db=meta)
            for (db, prefix), (recs, _) in zip(jobs, per_layer):
                for key, value in recs:
                    if db == "entries" and schema == 1:
                        key = v1_entry_key(key)
                    txn.put(key, value, db=index.db(db))
            for key, layer in layers.items():
                txn.put(key, records["layers"][key], db=index.db("layers"))
                txn.put(struct.pack(">I", layer.num), key, db=index.db("layernums"))
            for name in ("images", "tags", "containers"):
                for key, value in records[name].items():
                    txn.put(key, value, db=index.db(name))

        index.write(put_all)
        blobs = BlobStore(root, index)
        kept = {k: layer for k, layer in layers.items()
                if (_tar_layer_whole if layer.source == Source.TAR else _canonical_layer_whole)(index, blobs, layer)}
        lost_layers = [layer.diff_id for k, layer in layers.items() if k not in kept]
        images = {k: unpack_image(bytes_digest(k), v) for k, v in records["images"].items()}
        kept_images = {k for k, img in images.items() if all(digest_bytes(d) in kept for d in img.layers)}
        names: dict[str, str] = {}
        used_blobs = _drop_lost(index, layers, kept, kept_images, names)
        _record_blobs(index, blobs, used_blobs)
    finally:
        index.close()
    os.rename(building, os.path.join(root, "index.lmdb"))
    moved = _move_unused_blobs(root, used_blobs)

    final = Index(os.path.join(root, "index.lmdb"), create=False)
    try:
        markermod.update(root, final)
        with final.read() as txn:
            now, _ = markermod.catalog(txn, final)
            final_containers = {bytes(k).decode() for k, _ in txn.cursor(db=final.db("containers"))}
    finally:
        final.close()
    lines.append(f"rebuilt {len(kept)} of {len(layers)} layers, {len(now)} images")
    for d in lost_layers:
        lines.append(f"lost layer: {d}")
    for image_id, tags in sorted((held.images if held else {}).items()):
        if image_id not in now:
            lines.append(f"lost image: {image_id} ({', '.join(tags) or 'untagged'})")
    for cid in _unrecorded_containers(root, final_containers):
        lines.append(f"lost container {names.get(cid, cid)} (its changes stay in containers/{cid}/upper)")
    if moved:
        lines.append(f"moved {moved} blob files no rebuilt layer uses to {os.path.join(root, 'lost+found')}")
    return {"images": now, "layers": len(kept)}


def _drop_lost(index: Index, layers: dict, kept: dict, kept_images: set,
               names: dict[str, str]) -> set[str]:
    """Delete the records of lost layers and of the images, tags and containers that
    needed them (``names`` gets each dropped container's id -> name); return the blob
    ids the kept layers use."""
    from .containers import _unpack as unpack_container

    def txn_fn(txn) -> set[str]:
        for key, layer in layers.items():
            if key not in kept:
                prefix = struct.pack(">I", layer.num)
                txn.delete(key, db=index.db("layers"))
                txn.delete(prefix, db=index.db("layernums"))
                delete_prefix(txn, index.db("entries"), prefix)
                delete_prefix(txn, index.db("tarsplit"), prefix)
        for key in [bytes(k) for k, _ in txn.cursor(db=index.db("images")) if bytes(k) not in kept_images]:
            txn.delete(key, db=index.db("images"))
        for key in [bytes(k) for k, v in txn.cursor(db=index.db("tags")) if bytes(v) not in kept_images]:
            txn.delete(key, db=index.db("tags"))
        for key, value in list(txn.cursor(db=index.db("containers"))):
            c = unpack_container(key, value)
            if digest_bytes(c.image_id) not in kept_images:
                txn.delete(key, db=index.db("containers"))
                names[c.id] = c.name
        used: set[str] = set()
        for layer in kept.values():
            prefix = struct.pack(">I", layer.num)
            used.update(entry_blob(v).decode() for _, v in prefix_scan(txn, index.db("entries"), prefix))
            chunks = [v for _, v in prefix_scan(txn, index.db("tarsplit"), prefix)]
            used.update(blob for _, blob, size in segments(iter(chunks)) if size)
        used.discard("")
        return used

    return index.write(txn_fn)


def _record_blobs(index: Index, blobs: BlobStore, used: set[str]) -> None:
    def txn_fn(txn) -> None:
        for blob_id in used:
            txn.put(blob_id.encode(), struct.pack("<Q", os.lstat(blobs.path(blob_id)).st_size),
                    db=index.db("blobs"))

    index.write(txn_fn)


def _unrecorded_containers(root: str, recorded: set[str]) -> list[str]:
    """Container directories the rebuilt index has no record of (lost with the old one)."""
    try:
        names = sorted(os.listdir(os.path.join(root, "containers")))
    except FileNotFoundError:
        return []
    return [n for n in names if n not in recorded]


def _move_unused_blobs(root: str, used: set[str]) -> int:
    """Move blob files no record uses to lost+found/ (out of gc's reach)."""
    blobs_dir = os.path.join(root, "blobs")
    aside = os.path.join(root, "lost+found")
    moved = 0
    for fan in sorted(os.listdir(blobs_dir)):
        fan_dir = os.path.join(blobs_dir, fan)
        if not os.path.isdir(fan_dir) or os.path.islink(fan_dir):
            continue
        for name in sorted(os.listdir(fan_dir)):
            if fan + name not in used:
                os.makedirs(aside, mode=0o700, exist_ok=True)
                os.rename(os.path.join(fan_dir, name), os.path.join(aside, fan + name))
                moved += 1
    return moved


if __name__ == "__main__":
    _salvage_child(sys.argv[1], pickle.load(sys.stdin.buffer))
