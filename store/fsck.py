"""fsck: prove the store whole, or say exactly what is damaged.

Checks every blob (present, the recorded size, and, unless ``fast``, the xxh3 its id
names), every layer's entries and tar-split record against the blobs, every image
against its config and layers, every tag, container and merged-view chain, and the
kernel backend's metadata image of each image (against the merged tree it must show). With
``repair``, damaged blobs are moved to ``corrupt/`` and their records dropped (a later
import of the same content stores a good copy again), and the report names the layers
and images that lost data.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field

from . import blobs as blobsmod
from . import metaimage
from .blobs import CHUNK
from . import marker as markermod
from .errors import IndexDamaged, StoreCorrupt
from .index import prefix_scan
from .progress import SILENT, Progress
from .records import (LayerBlob, bytes_digest, digest_bytes, entry_blob, layer_blob_key, pack_layer_blob,
                      unpack_image, unpack_layer, unpack_layer_blob)
from .tarsplit import segments


@dataclass(slots=True, frozen=True)
class Problem:
    kind: str  # missing-blob, corrupt-blob, size-mismatch, missing-layer, ...
    subject: str  # the blob, layer, image, tag or container concerned
    detail: str


@dataclass(slots=True)
class FsckReport:
    problems: list[Problem] = field(default_factory=list)
    blobs_checked: int = 0
    layers_checked: int = 0
    images_checked: int = 0
    damaged_layers: list[str] = field(default_factory=list)
    damaged_images: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)  # blobs moved aside
    # When the index itself is damaged: what the marker says it held, and what a repair did.
    index_held: dict | None = None
    rebuilt: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # about the store itself (see Store.notes)

    @property
    def clean(self) -> bool:
        return not self.problems


def blob_digest_ok(path: str, blob_id: str) -> bool:
    """True if the file's xxh3-128 is the hash its blob id names."""
    h = blobsmod.new_hasher()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest() == blob_id.split("-", 1)[0]


def check(store, fast: bool = False, repair: bool = False, progress: Progress = SILENT) -> FsckReport:
    """Check the whole store; with ``repair``, move damaged blobs aside."""
    report = FsckReport()
    index = store.index
    bad_blobs: dict[str, Problem] = {}
    progress.stage("checking the index")
    with index.read() as txn:
        recorded: dict[str, int] = {}
        for key, raw in txn.cursor(db=index.db("blobs")):
            blob_id = bytes(key).decode()
            recorded[blob_id] = struct.unpack("<Q", raw)[0]
        layers = [unpack_layer(bytes_digest(k), v) for k, v in txn.cursor(db=index.db("layers"))]
        layer_by_num = {layer.num: layer for layer in layers}
        layer_blobs: dict[str, set[str]] = {}
        for layer in layers:
            report.layers_checked += 1
            prefix = struct.pack(">I", layer.num)
            if txn.get(prefix, db=index.db("layernums")) != digest_bytes(layer.diff_id):
                report.problems.append(Problem("index-mismatch", layer.diff_id,
                                               "the layer-number record disagrees with the layer"))
            used, count = set(), 0
            for _, v in prefix_scan(txn, index.db("entries"), prefix):
                used.add(entry_blob(v).decode())
                count += 1
            if count != layer.entries:
                report.problems.append(Problem("missing-entries", layer.diff_id,
                                               f"{count} entries recorded of {layer.entries}"))
            chunks = [v for _, v in prefix_scan(txn, index.db("tarsplit"), prefix)]
            try:
                used.update(b for _, b, size in segments(iter(chunks)) if size)
            except StoreCorrupt as e:
                report.problems.append(Problem("corrupt-tarsplit", layer.diff_id, str(e)))
            used.discard("")
            layer_blobs[layer.diff_id] = used
            for blob_id in sorted(used - recorded.keys()):
                report.problems.append(Problem("missing-blob-record", blob_id,
                                               f"used by layer {layer.diff_id} but not recorded"))
        forms = [unpack_layer_blob(bytes(k), v) for k, v in txn.cursor(db=index.db("layerblobs"))]
        for form in forms:
            if form.blob and form.blob not in recorded:
                report.problems.append(Problem("missing-blob-record", form.blob,
                                               f"the kept compressed form {form.digest} of layer "
                                               f"{form.diff_id} is not recorded"))
        images = [unpack_image(bytes_digest(k), v) for k, v in txn.cursor(db=index.db("images"))]
        tags = [(bytes(k).decode(), bytes_digest(v)) for k, v in txn.cursor(db=index.db("tags"))]
        chains = [(bytes_digest(k), bytes(v)) for k, v in txn.cursor(db=index.db("chains"))]
        for chain, num in chains:
            for _, raw in prefix_scan(txn, index.db("merged"), num):
                layer_num = struct.unpack_from(">I", raw)[0]
                if layer_num not in layer_by_num:
                    report.problems.append(Problem("index-mismatch", chain,
                                                   f"merged view refers to a missing layer #{layer_num}"))
                    break

    if fast:
        progress.stage("checking blob sizes", len(recorded))
    else:
        progress.stage("checking blob contents", sum(recorded.values()), "B")
    for blob_id, size in sorted(recorded.items()):
        progress.advance(1 if fast else size)
        report.blobs_checked += 1
        path = store.blobs.path(blob_id)
        try:
            actual = os.lstat(path).st_size
        except FileNotFoundError:
            bad_blobs[blob_id] = Problem("missing-blob", blob_id, "the blob file is missing")
            continue
        if actual != size:
            bad_blobs[blob_id] = Problem("size-mismatch", blob_id, f"{actual} bytes, recorded {size}")
        elif not fast and not blob_digest_ok(path, blob_id):
            bad_blobs[blob_id] = Problem("corrupt-blob", blob_id, "contents do not match the blob's hash")
    report.problems.extend(bad_blobs.values())

    bad_set = set(bad_blobs) | {p.subject for p in report.problems if p.kind == "missing-blob-record"}
    report.damaged_layers = sorted(d for d, used in layer_blobs.items() if used & bad_set)
    known_layers = {layer.diff_id for layer in layers}
    for image in images:
        report.images_checked += 1
        if hashlib.sha256(image.config).hexdigest() != image.image_id[7:]:
            report.problems.append(Problem("image-mismatch", image.image_id, "the config does not hash to the image id"))
        try:
            diff_ids = json.loads(image.config)["rootfs"]["diff_ids"]
        except (ValueError, KeyError, TypeError):
            diff_ids = None
        if diff_ids != list(image.layers):
            report.problems.append(Problem("image-mismatch", image.image_id, "the config's diff_ids differ from its layers"))
        for d in image.layers:
            if d not in known_layers:
                report.problems.append(Problem("missing-layer", image.image_id, f"layer {d} is missing"))
    report.damaged_images = sorted(i.image_id for i in images
                                   if set(i.layers) & (set(report.damaged_layers) | (set(i.layers) - known_layers)))
    image_ids = {i.image_id for i in images}
    for name, target in tags:
        if target not in image_ids:
            report.problems.append(Problem("dangling-tag", name, f"points to missing image {target}"))
    for c in store.containers.list():
        if c.image_id not in image_ids:
            report.problems.append(Problem("missing-image", c.name, f"its image {c.image_id} is missing"))
        if not os.path.isdir(store.containers.upper(c)):
            report.problems.append(Problem("missing-upper", c.name, "its upper directory is missing"))
    report.problems.extend(_check_meta_images(store, images, fast, repair))

    if repair and bad_blobs:
        _move_aside(store, list(bad_blobs), report, [f for f in forms if f.blob in bad_blobs])
    return report


def _check_meta_images(store, images, fast: bool, repair: bool) -> list[Problem]:
    """Each metadata image against its image's merged tree; with ``repair`` a damaged one
    is removed (the next kernel mount builds it again; mounts using it keep theirs)."""
    by_key = {metaimage.key_of(i): i for i in images}
    problems = []
    for meta in metaimage.stored(store.root):
        image = by_key.get(meta.key)
        if image is None:
            continue  # of a chain no image has: gc removes it
        why = metaimage.verify(store, meta, image, fast=fast)
        if why is not None:
            problems.append(Problem("damaged-meta-image", meta.path, why))
            if repair:
                metaimage.remove(meta)
    return problems


def _move_aside(store, blob_ids: list[str], report: FsckReport, forms: list[LayerBlob]) -> None:
    """Move damaged blobs to corrupt/ and drop their records; a compressed form whose
    bytes were damaged stays known by its descriptor only."""
    aside = os.path.join(store.root, "corrupt")
    os.makedirs(aside, exist_ok=True)
    with store.lock.exclusive():
        for blob_id in blob_ids:
            try:
                os.rename(store.blobs.path(blob_id), os.path.join(aside, blob_id))
            except FileNotFoundError:
                pass
            report.repaired.append(blob_id)

        def txn_fn(txn) -> None:
            for blob_id in blob_ids:
                txn.delete(blob_id.encode(), db=store.index.db("blobs"))
            for f in forms:
                bare = LayerBlob(f.diff_id, f.digest, f.media_type, f.size, "", f.sources)
                txn.put(layer_blob_key(f.diff_id, f.digest), pack_layer_blob(bare), db=store.index.db("layerblobs"))

        store.index.write(txn_fn)


def damaged_index(root: str, error: IndexDamaged) -> FsckReport:
    """The report on a store whose index cannot be opened: the damage, and what the
    index held as far as the marker beside it knows."""
    report = FsckReport()
    report.problems.append(Problem("index-damaged", os.path.join(root, "index.lmdb"), str(error)))
    held = markermod.read(root)
    report.index_held = {"images": held.images if held else {}, "layers": held.layers if held else None,
                         "as_of_ns": held.updated_ns if held else None}
    return report


# Problems of the index's own records: a repair rebuilds the index (store.rebuild).
INDEX_PROBLEMS = frozenset({"index-mismatch", "missing-entries", "corrupt-tarsplit"})


def fsck(root: str, fast: bool = False, repair: bool = False, progress: Progress = SILENT) -> FsckReport:
    """Check the store at ``root``, whose index may be too damaged to open; with
    ``repair``, move damaged blobs aside, and rebuild a damaged index from what can still
    be read (see store.rebuild)."""
    from .rebuild import rebuild
    from .store import Store

    try:
        with Store(root, create=False) as store:
            report = store.fsck(fast=fast, repair=repair, progress=progress)
            report.notes = store.notes
    except IndexDamaged as e:
        report = damaged_index(root, e)
        if repair:
            report.rebuilt, _ = rebuild(root)
        return report
    if repair and any(p.kind in INDEX_PROBLEMS for p in report.problems):
        report.rebuilt, _ = rebuild(root)
    return report
