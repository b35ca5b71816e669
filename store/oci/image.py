"""An image in and out of the store as OCI blobs: manifest, config and layer streams.

These are the functions every format calls (the layout and docker archive code here,
a registry client later); they know nothing of files or archives, only of descriptors
and streams.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import BinaryIO

import zstandard

from .. import images as imagesmod
from ..errors import BadArchive, LayerNotFound, StoreCorrupt
from ..export import layer_tar
from ..records import ImageRecord, LayerBlob, LayerRecord
from ..progress import SILENT, Progress
from ..store import Store
from ..tarimport import Tap, read_tar
from .descriptor import (COMPRESSIONS, CONFIG_TYPES, INDEX_TYPES, LAYER_TYPES, MANIFEST_TYPES,
                         OCI_CONFIG, OCI_INDEX, OCI_MANIFEST, BadImage, Descriptor, Platform, VerifyingReader,
                         check_digest, host_platform, parse_json, read_verified, sha256_digest)

# Opens a blob named by a descriptor (a file of a layout, a member of an archive, an
# HTTP response); the caller checks what it reads against the descriptor.
Fetch = Callable[[Descriptor], AbstractContextManager[BinaryIO]]

MAX_INDEX_DEPTH = 8
GZIP_LEVEL = 6  # what docker and containerd write; the output is the same on every run


class LoadProgress:
    """What a load reports; the default reports nothing. The CLI draws a bar per layer."""

    def layer(self, number: int, count: int, diff_id: str, size: int,
              stored: bool) -> AbstractContextManager[Callable[[int], None]]:
        """Layer ``number`` of ``count`` starts (``stored``: already in the store, not
        read); the context's value is called with the bytes read as they go."""
        return contextlib.nullcontext(lambda n: None)


@dataclass(slots=True, frozen=True)
class LayerInput:
    """A layer to load: how to open its (possibly compressed) tar, and its descriptor when
    the format has one (OCI; a docker archive's layers are checked by diff_id only)."""

    open: Callable[[], AbstractContextManager[BinaryIO]]
    descriptor: Descriptor | None = None
    size: int = 0  # bytes to read, for progress (0: unknown)
    name: str = ""  # for messages and the layer's record
    source: str = ""  # "registry/repository" it was pulled from (a push may mount it from there)


# -- in -----------------------------------------------------------------------------


def config_diff_ids(config: dict, what: str = "the image config") -> list[str]:
    """The layer diff_ids a config lists (validated)."""
    rootfs = config.get("rootfs")
    if not isinstance(rootfs, dict) or rootfs.get("type") != "layers":
        raise BadImage(f"{what} has no rootfs of type \"layers\"")
    diff_ids = rootfs.get("diff_ids")
    if not isinstance(diff_ids, list):
        raise BadImage(f"{what} has no rootfs.diff_ids list")
    out = [check_digest(d, f"{what} (diff_id {i + 1})") for i, d in enumerate(diff_ids)]
    if any(not d.startswith("sha256:") for d in out):
        raise BadImage(f"{what} names a layer by a digest other than sha256, which layerfs "
                       "does not store layers by")
    return out


@dataclass(slots=True, frozen=True)
class ImageInput:
    """An image to load: its config bytes (kept as they are), its layers base first,
    and the tags to give it."""

    config: bytes
    layers: Sequence[LayerInput]
    tags: Sequence[str] = ()
    what: str = "the image"  # for messages: "image 2 of x.tar", "the manifest sha256:..."


def _form(desc: Descriptor | None) -> str:
    """What to remember of a layer blob, so that it leaves (push) with the digest it came
    with: "bytes" of a compressed one; "name" of an uncompressed one (its digest is its
    diff_id, and tar-split gives its bytes back); "" (no descriptor, another digest)."""
    if desc is None or not desc.digest.startswith("sha256:"):
        return ""
    compression = LAYER_TYPES.get(desc.media_type)
    return "bytes" if compression in ("gzip", "zstd") else "name" if compression == "none" else ""


def import_images(store: Store, images: Sequence[ImageInput],
                  progress: LoadProgress | None = None) -> list[ImageRecord]:
    """Store images: each config kept byte for byte (the image id is its sha256), each
    layer not yet stored (by diff_id) read once, and the tags; all or nothing.

    Every layer read is checked against its descriptor, if it has one, and against the
    diff_id its config lists; on any error nothing is stored. A compressed layer's blob
    is kept as it came (see :class:`~store.records.LayerBlob`).
    """
    progress = progress or LoadProgress()
    planned = [_plan(image) for image in images]
    forms: list[LayerBlob] = []
    with store.blobs.ingest() as ingest:
        pendings: dict = {}
        for image, (rec, _) in zip(images, planned):
            for i, (diff_id, layer) in enumerate(zip(rec.layers, image.layers)):
                label = f"layer {i + 1} of {image.what}" + (f" ({layer.name})" if layer.name else "")
                desc = layer.descriptor
                if desc and LAYER_TYPES.get(desc.media_type) == "none" and desc.digest != diff_id:
                    # An uncompressed blob's digest is its diff_id: a disagreement shows
                    # without reading it (a compressed one's shows once it is read).
                    raise BadImage(f"{label} is the uncompressed tar {desc.digest}, but the config "
                                   f"says its diff_id is {diff_id}")
                stored = diff_id in pendings or store.has_layer(diff_id)
                size = layer.descriptor.size if layer.descriptor else layer.size
                sources = (layer.source,) if layer.source else ()
                with progress.layer(i + 1, len(image.layers), diff_id, size, stored) as advance:
                    if stored or _form(desc) == "name":  # known by this digest (too)
                        if desc is not None and _form(desc):
                            forms.append(LayerBlob(diff_id, desc.digest, desc.media_type, desc.size, "", sources))
                    if stored:
                        continue
                    with layer.open() as src:
                        kept = ingest.writer() if _form(desc) == "bytes" else None
                        if kept is not None:
                            src = Tap(src, kept.write)
                        reader = VerifyingReader(src, layer.descriptor, label) if layer.descriptor else src
                        try:
                            pending = read_tar(ingest, reader, layer.name or diff_id, advance)
                        except BadArchive as e:
                            raise type(e)(f"{label}: {e}") from None
                        if isinstance(reader, VerifyingReader):
                            reader.finish()
                        if kept is not None:
                            assert desc is not None
                            forms.append(LayerBlob(diff_id, desc.digest, desc.media_type, desc.size,
                                                   kept.finish(), sources))
                if pending.diff_id != diff_id:
                    raise BadImage(f"{label} has diff_id {pending.diff_id}, but the config says {diff_id}")
                pendings[diff_id] = pending
        return store.record_images(ingest, list(pendings.values()), planned, forms)


def _plan(image: ImageInput) -> tuple[ImageRecord, list[str]]:
    """The record an image will get, and its tags, checked before anything is read."""
    tags = [imagesmod.parse_reference(t) for t in image.tags]
    what = f"the config of {image.what}"
    diff_ids = config_diff_ids(parse_json(image.config, what), what)
    if not diff_ids:
        raise BadImage(f"{image.what} has no layers")
    if len(diff_ids) != len(image.layers):
        raise BadImage(f"the config of {image.what} lists {len(diff_ids)} layers (diff_ids) but "
                       f"its manifest has {len(image.layers)}")
    created = imagesmod.config_created_ns(image.config)
    rec = ImageRecord(sha256_digest(image.config), tuple(diff_ids), image.config,
                      created if created is not None else imagesmod.now_ns())
    return rec, tags


def manifest_input(manifest: bytes, fetch: Fetch, tags: Sequence[str] = (),
                   what: str = "the image") -> ImageInput:
    """The image an OCI (or Docker schema 2) manifest describes: its config is fetched
    and verified now, its layers are fetched (and verified) when they are loaded."""
    m = parse_json(manifest, f"the manifest of {what}")
    if m.get("schemaVersion") != 2:
        raise BadImage(f"the manifest of {what} is not schema version 2")
    media_type = m.get("mediaType", OCI_MANIFEST)
    if media_type not in MANIFEST_TYPES:
        raise BadImage(f"the manifest of {what} has an unknown media type {media_type!r}")
    config_desc = Descriptor.from_json(m.get("config"), f"the config descriptor of {what}")
    if config_desc.media_type not in CONFIG_TYPES:
        raise BadImage(f"{what} is not a container image (config media type "
                       f"{config_desc.media_type!r})")
    raw_layers = m.get("layers")
    if not isinstance(raw_layers, list):
        raise BadImage(f"the manifest of {what} has no layers list")
    descs = [Descriptor.from_json(d, f"layer {i + 1} of {what}") for i, d in enumerate(raw_layers)]
    for i, d in enumerate(descs):
        if d.media_type not in LAYER_TYPES:
            raise BadImage(f"layer {i + 1} of {what} has an unknown media type {d.media_type!r}")
    with fetch(config_desc) as f:
        config = read_verified(f, config_desc, f"the config of {what}")
    layers = [LayerInput(lambda d=d: fetch(d), d, d.size) for d in descs]
    return ImageInput(config, layers, tags, what)


def import_manifest(store: Store, manifest: bytes, fetch: Fetch, tags: Sequence[str] = (),
                    progress: LoadProgress | None = None, what: str = "the image") -> ImageRecord:
    """Store the image a manifest describes, reading its blobs through ``fetch`` (see
    :func:`import_images`)."""
    return import_images(store, [manifest_input(manifest, fetch, tags, what)], progress)[0]


def resolve_manifest(desc: Descriptor, fetch: Fetch, platform: Platform | None = None,
                     what: str = "the image") -> tuple[Descriptor, bytes]:
    """Follow a descriptor through (nested) indexes to the manifest for ``platform``
    (default: this machine's); returns the manifest's descriptor and verified bytes."""
    want = platform or host_platform()
    for _ in range(MAX_INDEX_DEPTH):
        with fetch(desc) as f:
            data = read_verified(f, desc, f"the manifest of {what}")
        doc = parse_json(data, f"the manifest of {what}")
        media_type = desc.media_type or doc.get("mediaType", "")
        if not media_type:  # neither says: tell by the fields, as the spec's readers do
            media_type = OCI_INDEX if "manifests" in doc else OCI_MANIFEST
        if media_type in MANIFEST_TYPES:
            return desc, data
        if media_type not in INDEX_TYPES:
            raise BadImage(f"{what} has an unknown media type {media_type!r}")
        entries = doc.get("manifests")
        if not isinstance(entries, list):
            raise BadImage(f"the index of {what} has no manifests list")
        descs = [Descriptor.from_json(d, f"an entry of the index of {what}") for d in entries]
        candidates = [d for d in descs if d.media_type in MANIFEST_TYPES | INDEX_TYPES]
        chosen = [d for d in candidates if d.platform is not None and want.matches(d.platform)]
        if not chosen and platform is None and len(candidates) == 1 and candidates[0].platform is None:
            chosen = candidates  # one image, no platform named: take it
        if not chosen:
            have = sorted({str(d.platform) for d in candidates if d.platform is not None})
            raise BadImage(f"{what} has no manifest for {want}"
                           + (f" (it has {', '.join(have)}; choose one with --platform)" if have else ""))
        desc = chosen[0]
    raise BadImage(f"{what} nests indexes more than {MAX_INDEX_DEPTH} deep")


# -- out ----------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class ExportedBlob:
    """A blob of an image being exported: its descriptor, and how to read its bytes."""

    descriptor: Descriptor
    open: Callable[[], AbstractContextManager[BinaryIO]]
    diff_id: str = ""  # for a layer: its uncompressed digest


@dataclass(slots=True, frozen=True)
class ExportedImage:
    """A stored image as OCI blobs. Every digest and size is known before any is read."""

    image: ImageRecord
    tags: list[str]
    config: ExportedBlob
    manifest: ExportedBlob
    layers: list[ExportedBlob]

    @property
    def blobs(self) -> list[ExportedBlob]:
        """Every blob, in the order a writer puts them down (layers, config, manifest)."""
        return [*self.layers, self.config, self.manifest]


def _bytes_blob(data: bytes, media_type: str) -> ExportedBlob:
    return ExportedBlob(Descriptor(media_type, sha256_digest(data), len(data)),
                        lambda: contextlib.nullcontext(io.BytesIO(data)))


class _ChunkReader(io.RawIOBase):
    """A file-like view of an iterator of chunks that checks their sha256 at the end (so
    a damaged store gives StoreCorrupt, never an image with other bytes)."""

    def __init__(self, chunks: Iterator[bytes], digest: str) -> None:
        self.chunks, self.digest = chunks, digest
        self.buf = b""
        self.sha = hashlib.sha256()
        self.done = False

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self.buf and not self.done:
            chunk = next(self.chunks, None)
            if chunk is None:
                self.done = True
                if "sha256:" + self.sha.hexdigest() != self.digest:
                    raise StoreCorrupt(f"layer {self.digest} exported with digest "
                                       f"sha256:{self.sha.hexdigest()}: the store is damaged "
                                       "(run layerfs fsck)")
            else:
                self.sha.update(chunk)
                self.buf = chunk
        n = min(len(b), len(self.buf))
        b[:n] = self.buf[:n]
        self.buf = self.buf[n:]
        return n


def _compressor(compression: str, out: BinaryIO):
    if compression == "gzip":
        # No name and mtime 0 in the header: the same layer compresses to the same bytes.
        return gzip.GzipFile(filename="", mode="wb", fileobj=out, compresslevel=GZIP_LEVEL, mtime=0)
    return zstandard.ZstdCompressor(level=3, write_checksum=True).stream_writer(out, closefd=False)


class _HashingFile:
    """Writes through to a file, hashing and counting."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _kept_blob(store: Store, layer: LayerRecord, scratch: str) -> ExportedBlob | None:
    """The layer as the blob it was loaded or pulled in: a compressed one whose bytes are
    kept, else the plain tar if it came as one; None when neither."""
    forms = store.layer_blobs(layer.diff_id)
    for form in forms:
        if form.blob and os.path.exists(store.blobs.path(form.blob)):
            # The OCI media type of its compression (the bytes, hence the digest, are the same).
            media_type = COMPRESSIONS[LAYER_TYPES[form.media_type]]
            return ExportedBlob(Descriptor(media_type, form.digest, form.size),
                                lambda b=form.blob: store.blobs.open_verified(b), layer.diff_id)
    if any(form.digest == layer.diff_id for form in forms):
        return _layer_blob(store, layer, "none", scratch)
    return None


def _layer_blob(store: Store, layer: LayerRecord, compression: str, scratch: str,
                progress: Progress = SILENT) -> ExportedBlob:
    def uncompressed() -> AbstractContextManager[BinaryIO]:
        return contextlib.closing(_ChunkReader(layer_tar(store.index, store.blobs, layer), layer.diff_id))

    media_type = COMPRESSIONS[compression]
    if compression == "none":
        return ExportedBlob(Descriptor(media_type, layer.diff_id, layer.size), uncompressed, layer.diff_id)
    # Compressed once into scratch, so the digest and size are known before anything is
    # written out (a tar header, a registry's PUT ?digest=).
    path = os.path.join(scratch, layer.diff_id.partition(":")[2] + "." + compression)
    with open(path, "wb") as raw, uncompressed() as src:
        sink = _HashingFile(raw)
        with _compressor(compression, sink) as z:  # type: ignore[arg-type]
            while chunk := src.read(1 << 20):
                z.write(chunk)
                progress.advance(len(chunk))
    digest = "sha256:" + sink.sha.hexdigest()
    return ExportedBlob(Descriptor(media_type, digest, sink.size), lambda: open(path, "rb"), layer.diff_id)


def manifest_bytes(config: Descriptor, layers: Sequence[Descriptor]) -> bytes:
    """An OCI image manifest, in a fixed form (the same image gives the same digest)."""
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config.to_json(),
           "layers": [d.to_json() for d in layers]}
    return json.dumps(doc, separators=(",", ":")).encode()


@contextlib.contextmanager
def export_image(store: Store, ref: str, compression: str = "gzip",
                 scratch: str | None = None, originals: bool = False,
                 progress: Progress = SILENT) -> Iterator[ExportedImage]:
    """A stored image (tag or id) as manifest, config and layer blobs, for the length of
    the ``with``. Layers go out as their stored tars (tar-split: the original bytes, so
    uncompressed digests never change), compressed with ``compression`` (gzip, zstd or
    none). Compressed layers are staged in a temporary directory under ``scratch``.
    With ``originals``, a layer whose compressed blob was kept when it was loaded or
    pulled goes out as that blob, with its original digest (what a push wants).
    gc waits while an export is open, so no blob disappears under it.
    """
    if compression not in COMPRESSIONS:
        raise BadImage(f"unknown compression {compression!r} (gzip, zstd or none)")
    with store.lock.shared():
        rec = store.resolve_image(ref)
        try:
            layers = store.image_layers(rec)
        except LayerNotFound as e:
            raise StoreCorrupt(f"image {rec.image_id} is damaged: {e}; run layerfs fsck") from None
        with tempfile.TemporaryDirectory(prefix=".layerfs-export-", dir=scratch) as tmp:
            blobs = []
            for i, layer in enumerate(layers, 1):
                kept = originals and _kept_blob(store, layer, tmp)
                if not kept and compression != "none":
                    progress.stage(f"compressing layer {i}/{len(layers)} ({compression})", layer.size, "B")
                blobs.append(kept or _layer_blob(store, layer, compression, tmp, progress))
            config = _bytes_blob(rec.config, OCI_CONFIG)
            manifest = _bytes_blob(manifest_bytes(config.descriptor, [b.descriptor for b in blobs]),
                                   OCI_MANIFEST)
            yield ExportedImage(rec, store.tags_of(rec.image_id), config, manifest, blobs)
