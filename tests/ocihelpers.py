"""Test-side writers of OCI layouts and docker archives, independent of store.oci (a
test that wrote its inputs with the code under test would prove little)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile

import zstandard

LAYER_TYPES = {"none": "application/vnd.oci.image.layer.v1.tar",
               "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
               "zstd": "application/vnd.oci.image.layer.v1.tar+zstd"}


def tar_bytes(members: list[tuple]) -> bytes:
    """A layer tar from (name, kind, data) tuples: f file, d dir, l symlink, h hard link."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, kind, *rest in members:
            data = rest[0] if rest else b""
            ti = tarfile.TarInfo(name)
            ti.mtime = 1_700_000_000
            ti.mode = 0o755 if kind == "d" else 0o644
            if kind == "d":
                ti.type = tarfile.DIRTYPE
                tf.addfile(ti)
            elif kind in ("l", "h"):
                ti.type = tarfile.SYMTYPE if kind == "l" else tarfile.LNKTYPE
                ti.linkname = data
                tf.addfile(ti)
            else:
                raw = data.encode() if isinstance(data, str) else data
                ti.size = len(raw)
                tf.addfile(ti, io.BytesIO(raw))
    return buf.getvalue()


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def compress(data: bytes, how: str) -> bytes:
    if how == "gzip":
        return gzip.compress(data, mtime=0)
    if how == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    return data


def config_for(layers: list[bytes], **config) -> bytes:
    doc = {"architecture": "amd64", "os": "linux", "created": "2024-01-02T03:04:05Z",
           "config": config or {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]},
           "rootfs": {"type": "layers", "diff_ids": [sha(t) for t in layers]},
           "history": [{"created_by": f"layer {i}"} for i in range(len(layers))]}
    return json.dumps(doc, indent=1).encode()  # not canonical on purpose: kept byte for byte


class Layout:
    """Writes an OCI layout directory blob by blob; tests then break it on purpose."""

    def __init__(self, root: str) -> None:
        self.root = root
        os.makedirs(os.path.join(root, "blobs", "sha256"), exist_ok=True)
        with open(os.path.join(root, "oci-layout"), "w") as f:
            f.write('{"imageLayoutVersion": "1.0.0"}')
        self.entries: list[dict] = []

    def blob(self, data: bytes, media_type: str) -> dict:
        digest = sha(data)
        with open(self.blob_path(digest), "wb") as f:
            f.write(data)
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    def blob_path(self, digest: str) -> str:
        return os.path.join(self.root, "blobs", "sha256", digest.split(":")[1])

    def image(self, layers: list[bytes], compression: str = "gzip", config: bytes | None = None,
              layer_types: list[str] | None = None) -> tuple[dict, bytes]:
        """Add an image's blobs; returns (manifest descriptor, config bytes)."""
        config = config if config is not None else config_for(layers)
        cdesc = self.blob(config, "application/vnd.oci.image.config.v1+json")
        ldescs = [self.blob(compress(t, compression), (layer_types or [])[i] if layer_types
                            else LAYER_TYPES[compression]) for i, t in enumerate(layers)]
        manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                               "config": cdesc, "layers": ldescs}).encode()
        return self.blob(manifest, "application/vnd.oci.image.manifest.v1+json"), config

    def add(self, desc: dict, ref: str | None = None, platform: dict | None = None) -> None:
        entry = dict(desc)
        if ref:
            entry["annotations"] = {"org.opencontainers.image.ref.name": ref}
        if platform:
            entry["platform"] = platform
        self.entries.append(entry)

    def index(self, entries: list[dict]) -> dict:
        doc = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                          "manifests": entries}).encode()
        return self.blob(doc, "application/vnd.oci.image.index.v1+json")

    def write(self) -> str:
        with open(os.path.join(self.root, "index.json"), "w") as f:
            json.dump({"schemaVersion": 2, "manifests": self.entries}, f)
        return self.root


def tar_dir(src: str, out: str, prefix: str = "") -> str:
    """A tar of a directory's contents (as a layout or archive file travels)."""
    with tarfile.open(out, "w") as tf:
        for name in sorted(os.listdir(src)):
            tf.add(os.path.join(src, name), arcname=prefix + name)
    return out


def docker_archive(out: str, images: list[tuple[bytes, list[bytes], list[str]]], legacy_dirs: bool = True) -> str:
    """A ``docker save`` archive (the pre-25 form): (config, layer tars, tags) per image.
    With ``legacy_dirs`` the layers are ``<id>/layer.tar`` symlinks to ``<hex>.tar``,
    as skopeo and podman write them."""
    manifest = []
    with tarfile.open(out, "w") as tf:
        def add(name: str, data: bytes) -> None:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))

        for config, layers, tags in images:
            paths = []
            for n, layer in enumerate(layers):
                hexd = sha(layer).split(":")[1]
                add(f"{hexd}.tar", layer)
                if legacy_dirs:
                    ti = tarfile.TarInfo(f"legacy{n}/layer.tar")
                    ti.type, ti.linkname = tarfile.SYMTYPE, f"../{hexd}.tar"
                    tf.addfile(ti)
                    paths.append(f"legacy{n}/layer.tar")
                else:
                    paths.append(f"{hexd}.tar")
            cname = sha(config).split(":")[1] + ".json"
            add(cname, config)
            manifest.append({"Config": cname, "RepoTags": tags, "Layers": paths})
        add("manifest.json", json.dumps(manifest).encode())
    return out
