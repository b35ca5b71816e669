"""Compressed layer blobs kept as they came (LayerBlob): what load keeps, what gc keeps and
frees, what fsck finds, and the schema step that makes an older layerfs refuse the store."""

from __future__ import annotations

import json
import os
import struct

import lmdb

from ocihelpers import Layout, compress, config_for, sha, tar_bytes
from layerfs.store import Store
from layerfs.store import index as index_module


def _layers() -> list[bytes]:
    return [tar_bytes([("etc/base", "f", os.urandom(100_000))]),
            tar_bytes([("usr/bin/tool", "f", os.urandom(50_000))]),
            tar_bytes([("srv/plain", "f", b"an uncompressed layer\n")])]


def _load(layerfs, tmp_path, layers: list[bytes]) -> list[bytes]:
    """A layout with a gzip, a zstd and an uncompressed layer, loaded; the layer blobs."""
    layout = Layout(str(tmp_path / "layout"))
    blobs = [compress(layers[0], "gzip"), compress(layers[1], "zstd"), layers[2]]
    types = ["application/vnd.oci.image.layer.v1.tar+gzip", "application/vnd.oci.image.layer.v1.tar+zstd",
             "application/vnd.oci.image.layer.v1.tar"]
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": layout.blob(config_for(layers), "application/vnd.oci.image.config.v1+json"),
                "layers": [layout.blob(b, t) for b, t in zip(blobs, types)]}
    layout.add(layout.blob(json.dumps(manifest).encode(), manifest["mediaType"]), "app:v1")
    layerfs("load", layout.write(), check=True)
    return blobs


def test_load_keeps_compressed_blobs_and_gc_frees_them_with_their_layer(layerfs, tmp_path, store_root):
    layers = _layers()
    blobs = _load(layerfs, tmp_path, layers)
    with Store(store_root) as store:
        forms = {t: store.layer_blobs(sha(t)) for t in layers}
        for tar, blob in zip(layers[:2], blobs[:2]):
            (form,) = forms[tar]
            assert form.digest == sha(blob) and form.size == len(blob) and form.blob
            with store.blobs.open(form.blob) as f:
                assert f.read() == blob  # the very bytes that came in
        # Uncompressed: its digest is its diff_id, and tar-split gives its bytes back.
        (plain,) = forms[layers[2]]
        assert plain.digest == sha(layers[2]) and plain.blob == ""
        kept = [store.blobs.path(forms[t][0].blob) for t in layers[:2]]
    layerfs("gc", check=True)
    assert all(os.path.exists(p) for p in kept)  # the image still needs them
    layerfs("rmi", "app:v1", check=True)
    layerfs("gc", check=True)
    assert not any(os.path.exists(p) for p in kept)
    with Store(store_root) as store, store.index.read() as txn:
        assert txn.stat(store.index.db("layerblobs"))["entries"] == 0


def test_fsck_finds_a_damaged_kept_blob_and_repair_keeps_the_descriptor(layerfs, tmp_path, store_root):
    layers = _layers()
    _load(layerfs, tmp_path, layers)
    with Store(store_root) as store:
        form = store.layer_blobs(sha(layers[0]))[0]
        path = store.blobs.path(form.blob)
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.write(b"X")
    report = json.loads(layerfs("fsck", "--json").stdout)
    assert any(p["subject"] == form.blob and p["kind"] == "corrupt-blob" for p in report["problems"])
    layerfs("fsck", "--repair")
    with Store(store_root) as store:
        (after,) = store.layer_blobs(sha(layers[0]))
        assert after.digest == form.digest and after.blob == ""  # known by descriptor only now
    assert layerfs("fsck").returncode == 0


def test_an_older_store_is_upgraded_and_an_older_layerfs_would_refuse_it(store_root, tmp_path):
    with Store(store_root):
        pass
    env = lmdb.open(os.path.join(store_root, "index.lmdb"), max_dbs=32)
    meta = env.open_db(b"meta")
    with env.begin(write=True) as txn:
        txn.put(b"schema", struct.pack("<I", 1), db=meta)
    env.close()
    with Store(store_root) as store, store.index.read() as txn:
        version = struct.unpack("<I", txn.get(b"schema", db=store.index.db("meta")))[0]
    assert version == index_module.SCHEMA_VERSION == 2


def test_push_keeps_the_digest_of_every_compression(layerfs, tmp_path, registry):
    """gzip and zstd layers go out as their kept blobs, a plain one as its tar (tar-split)."""
    from layerfs.store.registry import Registry
    layers = _layers()
    blobs = _load(layerfs, tmp_path, layers)
    layerfs("push", "app:v1", f"{registry.host}/mixed:v1", check=True)
    with Registry(registry.host) as reg:
        manifest = json.loads(reg.get_manifest("mixed", "v1").data)
    assert [d["digest"] for d in manifest["layers"]] == [sha(b) for b in blobs]
    assert [d["mediaType"].rsplit(".", 1)[1] for d in manifest["layers"]] == ["tar+gzip", "tar+zstd", "tar"]
