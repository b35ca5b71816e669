"""Images as bytes for the registry tests (a manifest, a config whose diff_ids match the
gzip layers, the layers), built on ocihelpers, and written as OCI layouts with it."""

from __future__ import annotations

import json
from dataclasses import dataclass

from ocihelpers import Layout, compress, config_for, sha, tar_bytes

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
_LAYER_TYPES = {OCI_MANIFEST: "application/vnd.oci.image.layer.v1.tar+gzip",
                DOCKER_MANIFEST: "application/vnd.docker.image.rootfs.diff.tar.gzip"}
_CONFIG_TYPES = {OCI_MANIFEST: "application/vnd.oci.image.config.v1+json",
                 DOCKER_MANIFEST: "application/vnd.docker.container.image.v1+json"}

__all__ = ["DOCKER_MANIFEST", "OCI_MANIFEST", "Image", "make_image", "sha", "write_oci_layout"]


@dataclass
class Image:
    manifest: bytes
    media_type: str
    config: bytes
    layers: list[bytes]  # compressed blobs, base first
    diff_ids: list[str]

    @property
    def digest(self) -> str:
        return sha(self.manifest)

    def descriptors(self) -> list[dict]:
        return json.loads(self.manifest)["layers"]

    def config_descriptor(self) -> dict:
        return json.loads(self.manifest)["config"]


def make_image(layer_files: list[dict[str, bytes]], media_type: str = OCI_MANIFEST,
               arch: str = "amd64") -> Image:
    """An image of the given layers (each {path: bytes}), config and manifest included."""
    tars = [tar_bytes([(name, "f", data) for name, data in files.items()]) for files in layer_files]
    blobs = [compress(t, "gzip") for t in tars]
    config = json.loads(config_for(tars))
    config["architecture"] = arch
    config = json.dumps(config, sort_keys=True).encode()
    manifest = {"schemaVersion": 2, "mediaType": media_type,
                "config": {"mediaType": _CONFIG_TYPES[media_type], "digest": sha(config), "size": len(config)},
                "layers": [{"mediaType": _LAYER_TYPES[media_type], "digest": sha(b), "size": len(b)}
                           for b in blobs]}
    return Image(json.dumps(manifest, indent=2).encode(), media_type, config, blobs, [sha(t) for t in tars])


def write_oci_layout(path: str, images: dict[str, Image]) -> str:
    """An OCI image layout holding ``images`` under their tags (ref.name annotations)."""
    layout = Layout(path)
    for tag, image in images.items():
        layout.blob(image.config, image.config_descriptor()["mediaType"])
        for blob, desc in zip(image.layers, image.descriptors()):
            layout.blob(blob, desc["mediaType"])
        layout.add(layout.blob(image.manifest, image.media_type), tag)
    return layout.write()
