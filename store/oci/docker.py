"""``docker save`` archives: ``manifest.json`` (``[{Config, RepoTags, Layers}]``) naming
a config file and layer tars by their path in the archive.

docker up to 24, podman and skopeo write ``<hex>.json`` and ``<hex>.tar`` (or
``<id>/layer.tar``, often symlinks); docker 25+ writes an OCI layout with a
``manifest.json`` beside it, which the loader reads as a layout (its blobs have
digests to check). A docker archive's layers have no descriptor: each is checked
against the diff_id its config lists. Written here in the first form, with uncompressed
layers named by their diff_id, which every docker and podman loads.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import BinaryIO

from .. import images as imagesmod
from ..errors import StoreError
from .archive import Source, TarWriter
from .descriptor import BadImage, read_small
from .image import ExportedImage, ImageInput, LayerInput

MANIFEST_FILE = "manifest.json"


def is_docker_archive(src: Source) -> bool:
    return src.exists(MANIFEST_FILE)


def _path(value: object, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise BadImage(f"{what} is not a path")
    return value


def read_images(src: Source) -> list[ImageInput]:
    """The images a docker archive lists in its manifest.json."""
    with src.open(MANIFEST_FILE) as f:
        try:
            items = json.loads(read_small(f, MANIFEST_FILE))
        except (ValueError, UnicodeDecodeError) as e:
            raise BadImage(f"{MANIFEST_FILE} of {src.location} is not valid JSON ({e})") from None
    if not isinstance(items, list) or not items:
        raise BadImage(f"{MANIFEST_FILE} of {src.location} lists no images")
    out = []
    for n, item in enumerate(items, 1):
        what = f"image {n} of {src.location}" if len(items) > 1 else src.location
        if not isinstance(item, dict):
            raise BadImage(f"{MANIFEST_FILE} entry {n} of {src.location} is not an object")
        config_path = _path(item.get("Config"), f"the Config of {what}")
        with src.open(config_path) as f:
            config = read_small(f, f"the config of {what}")
        layer_paths = item.get("Layers")
        if not isinstance(layer_paths, list):
            raise BadImage(f"{what} has no Layers list")
        layers = []
        for i, p in enumerate(layer_paths, 1):
            p = _path(p, f"layer {i} of {what}")
            layers.append(LayerInput(lambda p=p: src.open(p), None, src.size(p), p))
        tags = []
        for t in item.get("RepoTags") or []:
            try:
                tags.append(imagesmod.parse_reference(t))
            except StoreError:
                raise BadImage(f"{what} has an invalid RepoTag {t!r}") from None
        out.append(ImageInput(config, layers, tags, what))
    return out


def write_tar(images: Sequence[tuple[ExportedImage, str | None]], out: BinaryIO) -> None:
    """A docker archive of ``(image, tag or None)`` pairs; the layers must be
    uncompressed (exported with compression "none")."""
    w = TarWriter(out)
    written: set[str] = set()
    by_image: dict[str, dict] = {}
    for image, tag in images:
        layer_files = []
        for blob in image.layers:
            name = blob.diff_id.partition(":")[2] + ".tar"
            layer_files.append(name)
            if name not in written:
                written.add(name)
                with blob.open() as f:
                    w.add_file(name, blob.descriptor.size, f)
        config_name = image.image.image_id.partition(":")[2] + ".json"
        if config_name not in written:
            written.add(config_name)
            w.add_bytes(config_name, image.image.config)
        item = by_image.setdefault(image.image.image_id,
                                   {"Config": config_name, "RepoTags": [], "Layers": layer_files})
        if tag and tag not in item["RepoTags"]:
            item["RepoTags"].append(tag)
    manifest = [{k: v for k, v in item.items() if v or k != "RepoTags"} for item in by_image.values()]
    w.add_bytes(MANIFEST_FILE, json.dumps(manifest, separators=(",", ":")).encode())
    w.close()
