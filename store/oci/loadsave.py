"""``layerfs load`` and ``layerfs save``: images from and to files, in whichever format.

A path is an OCI layout (a directory, or a tar of one) or a docker archive; which one
is told by what it holds (``oci-layout`` + ``index.json``, or ``manifest.json``), not
by its name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import tempfile
from collections.abc import Sequence
from typing import BinaryIO

from .. import images as imagesmod
from ..errors import StoreError
from ..progress import SILENT, Progress
from ..records import ImageRecord
from ..store import Store
from . import docker, layout
from .archive import atomic_output, open_source
from .descriptor import BadImage, Platform
from .image import ExportedImage, LoadProgress, import_images, export_image

FORMATS = ("oci", "oci-dir", "docker")


def load(store: Store, path: str, tags: Sequence[str] = (), platform: str | None = None,
         progress: LoadProgress | None = None) -> list[tuple[ImageRecord, list[str]]]:
    """Load every image of a layout or archive (``-``: stdin); returns (image, tags) pairs.

    ``tags`` are added to the image, and only make sense when there is one.
    """
    want = Platform.parse(platform) if platform else None
    extra = [imagesmod.parse_reference(t) for t in tags]
    with open_source(path) as src:
        if layout.is_layout(src):
            inputs = layout.read_images(src, want)
        elif docker.is_docker_archive(src):
            inputs = docker.read_images(src)
        else:
            raise BadImage(f"{src.location} is neither an OCI image layout (no oci-layout and "
                           "index.json) nor a docker archive (no manifest.json)")
        if extra and len(inputs) > 1:
            raise StoreError(f"{src.location} holds {len(inputs)} images; -t names one image")
        if extra:
            inputs = [dataclasses.replace(inputs[0], tags=[*inputs[0].tags, *extra])]
        records = import_images(store, inputs, progress)
    return [(rec, list(dict.fromkeys(i.tags))) for rec, i in zip(records, inputs)]


def _tag_named(store: Store, ref: str, image: ImageRecord) -> str | None:
    """The tag ``ref`` names, if it names the image by a tag (not by id)."""
    if ref.startswith("sha256:"):
        return None
    try:
        tag = imagesmod.parse_reference(ref)
    except StoreError:
        return None
    return tag if tag in store.tags_of(image.image_id) else None


def save(store: Store, refs: Sequence[str], output: str, fmt: str = "oci",
         compression: str | None = None, progress: Progress = SILENT) -> list[ExportedImage]:
    """Write images (tags or ids) to ``output`` (``-``: stdout, for the tar formats).

    ``oci`` is a tar of an OCI layout, ``oci-dir`` a layout directory, ``docker`` a
    docker archive. An image named by a tag carries that tag. The output appears only
    once complete.
    """
    if fmt not in FORMATS:
        raise StoreError(f"unknown format {fmt!r} ({', '.join(FORMATS)})")
    if fmt == "docker" and compression not in (None, "none"):
        raise StoreError("a docker archive holds uncompressed layers; --compress applies to oci formats")
    if fmt == "oci-dir" and output == "-":
        raise StoreError("an oci-dir cannot go to stdout; use --format oci for a tar")
    compression = compression or ("none" if fmt == "docker" else "gzip")
    for ref in refs:
        store.resolve_image(ref)  # a typo fails before anything is written
    scratch = tempfile.gettempdir() if output == "-" else os.path.dirname(os.path.abspath(output))
    with contextlib.ExitStack() as stack:
        exports = []
        for ref in refs:
            image = stack.enter_context(export_image(store, ref, compression, scratch, progress=progress))
            exports.append((image, _tag_named(store, ref, image.image)))
        exports = _counted(exports, output, progress)
        if output == "-":
            _write(fmt, exports, sys.stdout.buffer, None)
            sys.stdout.buffer.flush()
        else:
            with atomic_output(output, directory=fmt == "oci-dir") as tmp:
                _write(fmt, exports, None, tmp)
    return [image for image, _ in exports]


def _counted(exports, output: str, progress: Progress):
    """The exports with their layers' bytes reported to ``progress`` as they are read
    (the writing stage; a layer that two images share is written once)."""
    sizes = {b.descriptor.digest: b.descriptor.size for image, _ in exports for b in image.layers}
    progress.stage(f"writing {'to stdout' if output == '-' else output}", sum(sizes.values()), "B")

    def counting(blob):
        @contextlib.contextmanager
        def open_counted():
            with blob.open() as f:
                yield _CountingReader(f, progress)
        return dataclasses.replace(blob, open=open_counted)

    return [(dataclasses.replace(image, layers=[counting(b) for b in image.layers]), tag)
            for image, tag in exports]


class _CountingReader:
    """A binary reader that reports the bytes read."""

    def __init__(self, raw: BinaryIO, progress: Progress) -> None:
        self.raw = raw
        self.progress = progress

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.progress.advance(len(data))
        return data


def _write(fmt: str, exports, stream, path: str | None) -> None:
    if fmt == "oci-dir":
        layout.write_dir(exports, path)
        return
    writer = layout.write_tar if fmt == "oci" else docker.write_tar
    if stream is not None:
        writer(exports, stream)
        return
    try:
        with open(path, "wb") as f:
            writer(exports, f)
    except OSError as e:
        raise StoreError(f"cannot write {path}: {e.strerror}") from None
