"""OCI image layouts (image-spec image-layout.md): ``oci-layout``, ``index.json`` and
``blobs/<alg>/<hex>``, in a directory or a tar.

Reading: every entry of ``index.json`` is an image (an index entry is followed to the
manifest for the platform asked); its tags come from the entry's annotations. Writing:
one entry per tag (``org.opencontainers.image.ref.name`` holds the full NAME:TAG, as
podman writes it), blobs written once, everything in a fixed order and form so that the
same images give the same bytes.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from typing import BinaryIO

from .. import images as imagesmod
from ..errors import StoreError
from .archive import MissingFile, Source, TarWriter
from .descriptor import (CONTAINERD_NAME, INDEX_TYPES, MANIFEST_TYPES, OCI_INDEX, REF_NAME, BadImage,
                         Descriptor, Platform, host_platform, parse_json, read_small)
from .image import ExportedImage, ImageInput, manifest_input, resolve_manifest

LAYOUT_FILE = "oci-layout"
INDEX_FILE = "index.json"
LAYOUT_VERSION = b'{"imageLayoutVersion":"1.0.0"}'


def is_layout(src: Source) -> bool:
    return src.exists(LAYOUT_FILE) and src.exists(INDEX_FILE)


def blob_name(digest: str) -> str:
    """Where a (validated) digest's blob lives in a layout."""
    alg, _, hexpart = digest.partition(":")
    return f"blobs/{alg}/{hexpart}"


def fetcher(src: Source):
    """A fetch function (see image.Fetch) over a layout's blobs."""
    def fetch(desc: Descriptor) -> contextlib.AbstractContextManager[BinaryIO]:
        try:
            return src.open(blob_name(desc.digest))
        except MissingFile:
            raise MissingFile(f"blob {desc.digest} is missing from {src.location}") from None
    return fetch


def entry_tags(desc: Descriptor) -> list[str]:
    """The image names an index.json entry carries (docker's full name first)."""
    for key in (CONTAINERD_NAME, REF_NAME):
        name = desc.annotations.get(key)
        if name:
            try:
                return [imagesmod.parse_reference(name)]
            except StoreError:
                continue  # a bare tag ("latest") as docker 25 writes beside the full name
    return []


def read_images(src: Source, platform: Platform | None = None) -> list[ImageInput]:
    """The images of a layout: every index.json entry for this platform (or ``platform``)."""
    with src.open(LAYOUT_FILE) as f:
        layout = parse_json(read_small(f, LAYOUT_FILE), f"{LAYOUT_FILE} of {src.location}")
    version = layout.get("imageLayoutVersion")
    if not isinstance(version, str) or not version.startswith("1."):
        raise BadImage(f"{src.location} has an unsupported image layout version {version!r}")
    with src.open(INDEX_FILE) as f:
        index = parse_json(read_small(f, INDEX_FILE), f"{INDEX_FILE} of {src.location}")
    entries = index.get("manifests")
    if not isinstance(entries, list):
        raise BadImage(f"{INDEX_FILE} of {src.location} has no manifests list")
    descs = [Descriptor.from_json(d, f"entry {i + 1} of {INDEX_FILE}") for i, d in enumerate(entries)]
    images = [d for d in descs if d.media_type in MANIFEST_TYPES | INDEX_TYPES or not d.media_type]
    if not images:
        kinds = sorted({d.media_type for d in descs})
        raise BadImage(f"{INDEX_FILE} of {src.location} lists no image manifest"
                       + (f" (only {', '.join(kinds)})" if kinds else ""))
    want = platform or host_platform()
    # index.json lists images, not platforms; but when its manifests name platforms,
    # those of other platforms are not loaded (as in an index).
    fitting = [d for d in images if d.media_type in INDEX_TYPES or d.platform is None
               or want.matches(d.platform)]
    if not fitting:
        have = sorted({str(d.platform) for d in images if d.platform is not None})
        raise BadImage(f"{src.location} has no image for {want}"
                       + (f" (it has {', '.join(have)}; choose one with --platform)" if have else ""))
    fetch = fetcher(src)
    out = []
    for n, desc in enumerate(fitting, 1):
        what = f"image {n} of {src.location}" if len(fitting) > 1 else src.location
        _, manifest = resolve_manifest(desc, fetch, platform, what)
        out.append(manifest_input(manifest, fetch, entry_tags(desc), what))
    return out


def _index_json(images: Sequence[tuple[ExportedImage, str | None]]) -> bytes:
    entries = []
    for image, tag in images:
        desc = image.manifest.descriptor
        entry = Descriptor(desc.media_type, desc.digest, desc.size, {REF_NAME: tag} if tag else {})
        entries.append(entry.to_json())
    doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
    return json.dumps(doc, separators=(",", ":")).encode()


def _unique_blobs(images: Sequence[tuple[ExportedImage, str | None]]):
    seen: set[str] = set()
    for image, _ in images:
        for blob in image.blobs:
            if blob.descriptor.digest not in seen:
                seen.add(blob.descriptor.digest)
                yield blob


def write_tar(images: Sequence[tuple[ExportedImage, str | None]], out: BinaryIO) -> None:
    """An OCI layout as a tar (what ``podman save --format oci-archive`` writes):
    ``(image, tag or None)`` pairs, one index.json entry each."""
    w = TarWriter(out)
    w.add_bytes(LAYOUT_FILE, LAYOUT_VERSION)
    w.add_dir("blobs")
    w.add_dir("blobs/sha256")
    for blob in _unique_blobs(images):
        with blob.open() as f:
            w.add_file(blob_name(blob.descriptor.digest), blob.descriptor.size, f)
    w.add_bytes(INDEX_FILE, _index_json(images))
    w.close()


def write_dir(images: Sequence[tuple[ExportedImage, str | None]], root: str) -> None:
    """An OCI layout in the (new, empty) directory ``root``."""
    blobs = os.path.join(root, "blobs", "sha256")
    os.makedirs(blobs, mode=0o755, exist_ok=True)
    for blob in _unique_blobs(images):
        with blob.open() as src, open(os.path.join(root, blob_name(blob.descriptor.digest)), "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
    with open(os.path.join(root, LAYOUT_FILE), "wb") as f:
        f.write(LAYOUT_VERSION)
    with open(os.path.join(root, INDEX_FILE), "wb") as f:
        f.write(_index_json(images))
