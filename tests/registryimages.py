"""Small but real images for the registry tests: gzip layer tars, a config whose diff_ids
match them, and a manifest (OCI or Docker v2), as bytes; and an OCI layout of them."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
_LAYER_TYPES = {OCI_MANIFEST: "application/vnd.oci.image.layer.v1.tar+gzip",
                DOCKER_MANIFEST: "application/vnd.docker.image.rootfs.diff.tar.gzip"}
_CONFIG_TYPES = {OCI_MANIFEST: "application/vnd.oci.image.config.v1+json",
                 DOCKER_MANIFEST: "application/vnd.docker.container.image.v1+json"}


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_tar(files: dict[str, bytes]) -> bytes:
    """An uncompressed layer tar of regular files (parents implied)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), 0o644, 1_700_000_000
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


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
               arch: str = "amd64", env: list[str] | None = None) -> Image:
    """An image of the given layers (each {path: bytes}), config and manifest included."""
    tars = [layer_tar(files) for files in layer_files]
    blobs = [gzip.compress(t, mtime=0) for t in tars]
    diff_ids = [sha(t) for t in tars]
    config = json.dumps({"architecture": arch, "os": "linux",
                         "config": {"Env": env or ["PATH=/usr/bin:/bin"], "Cmd": ["/bin/sh"]},
                         "rootfs": {"type": "layers", "diff_ids": diff_ids},
                         "history": [{"created_by": f"layer {i}"} for i in range(len(tars))]},
                        sort_keys=True).encode()
    manifest = {"schemaVersion": 2, "mediaType": media_type,
                "config": {"mediaType": _CONFIG_TYPES[media_type], "digest": sha(config), "size": len(config)},
                "layers": [{"mediaType": _LAYER_TYPES[media_type], "digest": sha(b), "size": len(b)}
                           for b in blobs]}
    return Image(json.dumps(manifest, indent=2).encode(), media_type, config, blobs, diff_ids)


def write_oci_layout(path: str, images: dict[str, Image]) -> None:
    """An OCI image layout holding ``images`` under their tags (ref.name annotations)."""
    os.makedirs(os.path.join(path, "blobs", "sha256"), exist_ok=True)

    def put(data: bytes) -> None:
        with open(os.path.join(path, "blobs", "sha256", sha(data)[7:]), "wb") as f:
            f.write(data)

    manifests = []
    for tag, image in images.items():
        for blob in [image.config, image.manifest, *image.layers]:
            put(blob)
        manifests.append({"mediaType": image.media_type, "digest": image.digest, "size": len(image.manifest),
                          "annotations": {"org.opencontainers.image.ref.name": tag}})
    with open(os.path.join(path, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    with open(os.path.join(path, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                   "manifests": manifests}, f)
