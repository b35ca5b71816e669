"""layerfs load / save / inspect through the real CLI, on OCI layouts and docker archives
written by the test (ocihelpers) rather than by the code under test; image ids, tags,
platforms, reproducible output, and every kind of bad input."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile

import pytest

from helpers import assert_one_line_error, store_snapshot
from layerfs.store import Store
from ocihelpers import Layout, config_for, docker_archive, sha, tar_bytes, tar_dir

BASE = tar_bytes([("bin", "d"), ("bin/sh", "f", "#!shell\n"), ("etc", "d"),
                  ("etc/os-release", "f", "ID=test\n"), ("etc/motd", "f", "hello\n"),
                  ("bin/sh2", "h", "bin/sh")])
UPDATE = tar_bytes([("etc", "d"), ("etc/.wh.motd", "f"), ("etc/os-release", "f", "ID=test2\n"),
                    ("usr", "d"), ("usr/bin", "d"), ("usr/bin/sh", "l", "/bin/sh")])


def _image_layout(root: str, compression: str = "gzip", ref: str | None = "app:1") -> tuple[str, bytes]:
    lay = Layout(root)
    desc, config = lay.image([BASE, UPDATE], compression)
    lay.add(desc, ref)
    return lay.write(), config


def _loaded_id(proc) -> str:
    assert proc.returncode == 0, proc.stderr.decode()
    ids = [line.split()[-1] for line in proc.stdout.decode().splitlines() if "ID:" in line]
    assert len(ids) == 1, proc.stdout.decode()
    return ids[0]


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_load_layout_keeps_config_and_tree(tmp_path, layerfs, compression):
    path, config = _image_layout(str(tmp_path / "lay"), compression)
    image_id = _loaded_id(layerfs("load", path))
    assert image_id == sha(config)  # the image id is the digest of the config, as in docker
    shown = layerfs("inspect", "app:1", "--config", check=True).stdout
    assert shown == config  # byte for byte, not re-serialised
    info = json.loads(layerfs("inspect", "app:1", check=True).stdout)
    assert info["config"]["config"]["Env"] == ["PATH=/bin"]
    assert info["layers"] == [sha(BASE), sha(UPDATE)]
    listing = layerfs("ls", "app:1", "/etc", check=True).stdout.decode()
    assert "os-release" in listing and "motd" not in listing
    assert layerfs("cat", "app:1", "/etc/os-release", check=True).stdout == b"ID=test2\n"
    assert "-> /bin/sh" in layerfs("ls", "app:1", "/usr/bin", check=True).stdout.decode()


def test_load_twice_is_a_no_op(tmp_path, layerfs, store_root):
    path, config = _image_layout(str(tmp_path / "lay"))
    first = _loaded_id(layerfs("load", path))
    before = store_snapshot(store_root)
    assert _loaded_id(layerfs("load", path)) == first
    assert store_snapshot(store_root) == before
    images = json.loads(layerfs("images", "--json", check=True).stdout)
    assert [i["id"] for i in images] == [first]


def test_load_on_two_stores_gives_one_id(tmp_path, layerfs):
    path, config = _image_layout(str(tmp_path / "lay"))
    a = _loaded_id(layerfs("load", path, root=str(tmp_path / "s1")))
    b = _loaded_id(layerfs("load", path, root=str(tmp_path / "s2")))
    assert a == b == sha(config)


def test_stored_layers_are_not_read_again(tmp_path, layerfs):
    path, _ = _image_layout(str(tmp_path / "lay"))
    layerfs("load", path, check=True)
    # A second image on the same base, in a layout whose base blob is garbage: loading
    # it works only if the stored base is not read again.
    top = tar_bytes([("opt", "d"), ("opt/new", "f", "new\n")])
    lay = Layout(str(tmp_path / "lay2"))
    desc, config = lay.image([BASE, top])
    base_blob = json.loads(open(lay.blob_path(desc["digest"]), "rb").read())["layers"][0]["digest"]
    with open(lay.blob_path(base_blob), "wb") as f:
        f.write(b"not the base layer")
    lay.add(desc, "app:2")
    assert _loaded_id(layerfs("load", lay.write())) == sha(config)
    assert layerfs("cat", "app:2", "/opt/new", check=True).stdout == b"new\n"
    assert layerfs("cat", "app:2", "/etc/motd", check=True).stdout == b"hello\n"


def test_load_tar_of_layout_and_stdin(tmp_path, layerfs):
    path, config = _image_layout(str(tmp_path / "lay"))
    archive = tar_dir(path, str(tmp_path / "lay.tar"), prefix="./")
    assert _loaded_id(layerfs("load", archive, root=str(tmp_path / "s1"))) == sha(config)
    with open(archive, "rb") as f:
        proc = layerfs("load", "-t", "piped:1", input=f.read(), root=str(tmp_path / "s2"))
    assert _loaded_id(proc) == sha(config)
    assert "Loaded image: piped:1" in proc.stdout.decode()
    assert "Loaded image: app:1" in proc.stdout.decode()
    import gzip  # an archive compressed as a whole (docker save | gzip) is read too
    (tmp_path / "lay.tar.gz").write_bytes(gzip.compress(open(archive, "rb").read()))
    assert _loaded_id(layerfs("load", str(tmp_path / "lay.tar.gz"), root=str(tmp_path / "s3"))) == sha(config)


def _multi_platform(root: str, with_amd64: bool = True):
    lay = Layout(root)
    amd, amd_config = lay.image([BASE])
    arm_config = config_for([UPDATE]).replace(b'"amd64"', b'"arm64"')
    arm, _ = lay.image([UPDATE], config=arm_config)
    entries = [{**arm, "platform": {"os": "linux", "architecture": "arm64"}}]
    if with_amd64:
        entries.insert(0, {**amd, "platform": {"os": "linux", "architecture": "amd64"}})
    lay.add(lay.index(entries), "multi:1")
    return lay.write(), amd_config, arm_config


def test_nested_index_picks_the_platform(tmp_path, layerfs):
    if os.uname().machine != "x86_64":
        pytest.skip("the test's default platform is amd64")
    path, amd_config, arm_config = _multi_platform(str(tmp_path / "lay"))
    assert _loaded_id(layerfs("load", path)) == sha(amd_config)
    assert _loaded_id(layerfs("load", path, "--platform", "linux/arm64",
                              root=str(tmp_path / "s2"))) == sha(arm_config)


def test_only_another_platform_is_an_error(tmp_path, layerfs, store_root):
    if os.uname().machine != "x86_64":
        pytest.skip("the test's default platform is amd64")
    path, _, _ = _multi_platform(str(tmp_path / "lay"), with_amd64=False)
    Store(store_root).close()  # an empty store (a read-only command makes none)
    before = store_snapshot(store_root)
    line = assert_one_line_error(layerfs("load", path), mentions=("linux/amd64", "linux/arm64"))
    assert "--platform" in line
    assert store_snapshot(store_root) == before


@pytest.mark.parametrize("legacy_dirs", [True, False])
def test_load_docker_archive(tmp_path, layerfs, legacy_dirs):
    config = config_for([BASE, UPDATE])
    archive = docker_archive(str(tmp_path / "d.tar"), [(config, [BASE, UPDATE], ["docker.io/library/app:3"])],
                             legacy_dirs)
    proc = layerfs("load", archive)
    assert _loaded_id(proc) == sha(config)
    assert "Loaded image: app:3" in proc.stdout.decode()
    assert layerfs("cat", "app:3", "/etc/os-release", check=True).stdout == b"ID=test2\n"


def test_load_docker25_archive_reads_the_layout(tmp_path, layerfs):
    """docker 25+ writes an OCI layout plus manifest.json; the layout's tags (the full name
    in io.containerd.image.name) are used, not a bare ref.name."""
    lay = Layout(str(tmp_path / "lay"))
    desc, config = lay.image([BASE], "none")
    desc["annotations"] = {"io.containerd.image.name": "docker.io/library/busy:1",
                           "org.opencontainers.image.ref.name": "1"}
    lay.entries.append(desc)
    lay.write()
    cfg_hex = sha(config).split(":")[1]
    with open(os.path.join(lay.root, "manifest.json"), "w") as f:
        json.dump([{"Config": f"blobs/sha256/{cfg_hex}", "RepoTags": ["docker.io/library/busy:1"],
                    "Layers": [f"blobs/sha256/{sha(BASE).split(':')[1]}"]}], f)
    proc = layerfs("load", tar_dir(lay.root, str(tmp_path / "d25.tar")))
    assert _loaded_id(proc) == sha(config)
    assert proc.stdout.decode().count("Loaded image: busy:1") == 1


def test_tag_option(tmp_path, layerfs):
    path, _ = _image_layout(str(tmp_path / "lay"), ref=None)
    proc = layerfs("load", path, "-t", "mine:2")
    assert "Loaded image: mine:2" in proc.stdout.decode()
    lay = Layout(str(tmp_path / "two"))
    for ref, layers in (("a:1", [BASE]), ("b:1", [BASE, UPDATE])):
        desc, _ = lay.image(layers)
        lay.add(desc, ref)
    assert_one_line_error(layerfs("load", lay.write(), "-t", "x:1"), mentions=("2 images",))
    out = layerfs("load", lay.root, check=True).stdout.decode()
    assert "Loaded image: a:1" in out and "Loaded image: b:1" in out


# -- save ---------------------------------------------------------------------------


def _read_tar(path: str) -> dict[str, bytes]:
    with tarfile.open(path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}


@pytest.mark.parametrize("compress", ["gzip", "zstd", "none"])
def test_save_oci_round_trip(tmp_path, layerfs, compress):
    path, config = _image_layout(str(tmp_path / "lay"), "gzip")
    layerfs("load", path, check=True)
    out1, out2 = str(tmp_path / "o1.tar"), str(tmp_path / "o2.tar")
    layerfs("save", "app:1", "-o", out1, "--compress", compress, check=True)
    layerfs("save", "app:1", "-o", out2, "--compress", compress, check=True)
    assert open(out1, "rb").read() == open(out2, "rb").read()  # the same bytes every time
    files = _read_tar(out1)
    index = json.loads(files["index.json"])
    [entry] = index["manifests"]
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == "app:1"
    manifest = files["blobs/sha256/" + entry["digest"].split(":")[1]]
    assert sha(manifest) == entry["digest"]
    m = json.loads(manifest)
    assert files["blobs/sha256/" + m["config"]["digest"].split(":")[1]] == config
    for layer, original in zip(m["layers"], [BASE, UPDATE]):
        blob = files["blobs/sha256/" + layer["digest"].split(":")[1]]
        assert sha(blob) == layer["digest"] and len(blob) == layer["size"]
        if compress == "none":
            assert blob == original  # the original tar, byte for byte
    assert _loaded_id(layerfs("load", out1, root=str(tmp_path / "s2"))) == sha(config)


def test_save_docker_and_oci_dir_round_trip(tmp_path, layerfs):
    path, config = _image_layout(str(tmp_path / "lay"))
    layerfs("load", path, check=True)
    layerfs("save", "app:1", "-o", str(tmp_path / "d.tar"), "--format", "docker", check=True)
    files = _read_tar(str(tmp_path / "d.tar"))
    [item] = json.loads(files["manifest.json"])
    assert item["RepoTags"] == ["app:1"]
    assert files[item["Config"]] == config
    assert [files[p] for p in item["Layers"]] == [BASE, UPDATE]
    assert _loaded_id(layerfs("load", str(tmp_path / "d.tar"), root=str(tmp_path / "s2"))) == sha(config)
    layerfs("save", "app:1", "-o", str(tmp_path / "dir"), "--format", "oci-dir", check=True)
    assert sorted(os.listdir(tmp_path / "dir")) == ["blobs", "index.json", "oci-layout"]
    assert _loaded_id(layerfs("load", str(tmp_path / "dir"), root=str(tmp_path / "s3"))) == sha(config)


def test_save_to_stdout_and_by_id(tmp_path, layerfs):
    path, config = _image_layout(str(tmp_path / "lay"))
    layerfs("load", path, check=True)
    proc = layerfs("save", sha(config)[:19], "-o", "-", check=True)
    (tmp_path / "s.tar").write_bytes(proc.stdout)
    index = json.loads(_read_tar(str(tmp_path / "s.tar"))["index.json"])
    assert "annotations" not in index["manifests"][0]  # named by id: no tag, as docker save
    assert _loaded_id(layerfs("load", str(tmp_path / "s.tar"), root=str(tmp_path / "s2"))) == sha(config)


def test_save_errors_write_nothing(tmp_path, layerfs):
    path, _ = _image_layout(str(tmp_path / "lay"))
    layerfs("load", path, check=True)
    out = str(tmp_path / "out.tar")
    assert_one_line_error(layerfs("save", "app:1", "nosuch:1", "-o", out), mentions=("nosuch",))
    assert_one_line_error(layerfs("save", "app:1", "-o", out, "--format", "docker", "--compress", "gzip"))
    assert not os.path.exists(out)
    open(out, "w").close()
    assert_one_line_error(layerfs("save", "app:1", "-o", out), mentions=("exists",))
    assert os.listdir(tmp_path) == ["lay", "out.tar", "store"] or sorted(os.listdir(tmp_path)) == \
        sorted(["lay", "out.tar", "store"])


# -- import-layer ids, commit on a loaded config ---------------------------------------


def test_import_layer_id_is_reproducible(tmp_path, layerfs):
    tar = tmp_path / "l.tar"
    tar.write_bytes(BASE)
    renamed = tmp_path / "other-name.tar"
    renamed.write_bytes(BASE)
    a = layerfs("import-layer", str(tar), root=str(tmp_path / "s1"), check=True).stdout.strip()
    b = layerfs("import-layer", str(renamed), root=str(tmp_path / "s2"), check=True).stdout.strip()
    assert a == b
    c = layerfs("import-layer", str(tar), "--parent", a.decode(), root=str(tmp_path / "s1"),
                check=True).stdout.strip()
    d = layerfs("import-layer", str(tar), "--parent", a.decode(), root=str(tmp_path / "s2"),
                check=True).stdout.strip()
    assert c == d != a
    now = layerfs("import-layer", str(tar), "--created", "now", root=str(tmp_path / "s3"),
                  check=True).stdout.strip()
    assert now != a
    at = layerfs("import-layer", str(tar), "--created", "2024-05-06T07:08:09Z",
                 root=str(tmp_path / "s4"), check=True).stdout.strip()
    cfg = json.loads(layerfs("inspect", at.decode(), "--config", root=str(tmp_path / "s4"), check=True).stdout)
    assert cfg["created"] == "2024-05-06T07:08:09Z"
    assert_one_line_error(layerfs("import-layer", str(tar), "--created", "yesterday"), mentions=("yesterday",))


def test_source_date_epoch_sets_created(tmp_path, layerfs, monkeypatch):
    tar = tmp_path / "l.tar"
    tar.write_bytes(BASE)
    plain = layerfs("import-layer", str(tar), root=str(tmp_path / "s1"), check=True).stdout.strip()
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    dated = layerfs("import-layer", str(tar), root=str(tmp_path / "s2"), check=True).stdout.strip()
    assert dated != plain
    cfg = json.loads(layerfs("inspect", dated.decode(), "--config", root=str(tmp_path / "s2"),
                             check=True).stdout)
    assert cfg["created"] == "2023-11-14T22:13:20Z"


def test_commit_builds_on_the_loaded_config(tmp_path, store, layerfs):
    from layerfs.store.commit import commit

    config = config_for([BASE, UPDATE], Env=["PATH=/bin", "A=1"], Cmd=["/bin/sh"], WorkingDir="/srv",
                        Labels={"org.example": "yes"})
    lay = Layout(str(tmp_path / "lay"))
    desc, _ = lay.image([BASE, UPDATE], config=config)
    lay.add(desc, "app:1")
    layerfs("load", lay.write(), check=True)
    c = store.create_container("app:1")
    with open(os.path.join(store.containers.upper(c), "new-file"), "w") as f:
        f.write("changed\n")
    new = commit(store, c, tag="app:2", message="a change", changes=("ENV B=2", "CMD [\"/bin/true\"]"))
    cfg = json.loads(new.config)
    parent = json.loads(config)
    assert cfg["config"]["Env"] == ["PATH=/bin", "A=1", "B=2"]
    assert cfg["config"]["Cmd"] == ["/bin/true"]
    assert cfg["config"]["WorkingDir"] == "/srv" and cfg["config"]["Labels"] == {"org.example": "yes"}
    assert cfg["history"][:2] == parent["history"]
    assert cfg["history"][2]["comment"] == "a change"
    assert cfg["rootfs"]["diff_ids"][:2] == parent["rootfs"]["diff_ids"]
    assert len(cfg["rootfs"]["diff_ids"]) == 3
    assert new.image_id == "sha256:" + hashlib.sha256(new.config).hexdigest()


# -- bad input: one line, non-zero exit, nothing stored ---------------------------------


def _broken_layouts(tmp_path):
    """(name, path, words the error must mention) for each kind of damage."""
    out = []

    def fresh(name):
        root = str(tmp_path / name)
        lay = Layout(root)
        desc, config = lay.image([BASE, UPDATE])
        manifest = json.loads(open(lay.blob_path(desc["digest"]), "rb").read())
        return lay, desc, manifest

    lay, desc, m = fresh("missing-blob")
    os.unlink(lay.blob_path(m["layers"][1]["digest"]))
    lay.add(desc, "x:1")
    out.append(("missing blob", lay.write(), ("missing", m["layers"][1]["digest"])))

    lay = Layout(str(tmp_path / "digest-mismatch"))
    desc, _ = lay.image([BASE, UPDATE], "none")
    m = json.loads(open(lay.blob_path(desc["digest"]), "rb").read())
    p = lay.blob_path(m["layers"][1]["digest"])
    data = open(p, "rb").read()
    open(p, "wb").write(data.replace(b"ID=test2", b"ID=evil2"))  # same size, other bytes
    lay.add(desc, "x:1")
    out.append(("digest mismatch", lay.write(), ("layer 2", "does not match its digest")))

    lay, desc, m = fresh("corrupt-gzip")
    p = lay.blob_path(m["layers"][1]["digest"])
    data = open(p, "rb").read()
    open(p, "wb").write(data[:len(data) // 2])
    lay.add(desc, "x:1")
    out.append(("truncated gzip", lay.write(), ("layer 2",)))

    lay, desc, m = fresh("size-mismatch")
    with open(lay.blob_path(m["config"]["digest"]), "ab") as f:
        f.write(b" ")
    lay.add(desc, "x:1")
    out.append(("config larger than its descriptor", lay.write(), ("config",)))

    lay, desc, m = fresh("media-type")
    m["layers"][0]["mediaType"] = "application/vnd.example.unknown"
    lay.add(lay.blob(json.dumps(m).encode(), "application/vnd.oci.image.manifest.v1+json"), "x:1")
    out.append(("unknown media type", lay.write(), ("media type", "application/vnd.example.unknown")))

    lay = Layout(str(tmp_path / "diff-ids"))
    other = tar_bytes([("other", "f", "x")])
    desc, _ = lay.image([BASE, UPDATE], config=config_for([BASE, other]))
    lay.add(desc, "x:1")
    out.append(("diff_ids disagree", lay.write(), ("layer 2", "diff_id", sha(other))))

    lay = Layout(str(tmp_path / "diff-ids-plain"))
    desc, _ = lay.image([BASE, UPDATE], "none", config=config_for([BASE, BASE]))
    lay.add(desc, "x:1")
    out.append(("uncompressed layer named by another diff_id", lay.write(), ("layer 2", "diff_id")))

    lay = Layout(str(tmp_path / "count"))
    desc, _ = lay.image([BASE, UPDATE], config=config_for([BASE]))
    lay.add(desc, "x:1")
    out.append(("diff_ids count", lay.write(), ("1 layers", "2")))

    lay, desc, m = fresh("config-digest")
    m["config"]["digest"] = sha(b"something else")
    lay.add(lay.blob(json.dumps(m).encode(), "application/vnd.oci.image.manifest.v1+json"), "x:1")
    out.append(("config blob missing", lay.write(), ("missing",)))

    lay, desc, m = fresh("bad-json")
    open(os.path.join(lay.root, "index.json"), "w").write("{not json")
    out.append(("bad index.json", lay.root, ("index.json", "JSON")))

    lay, desc, m = fresh("escape")
    os.unlink(lay.blob_path(m["layers"][0]["digest"]))
    os.symlink("/etc/passwd", lay.blob_path(m["layers"][0]["digest"]))
    lay.add(desc, "x:1")
    out.append(("symlink out of the layout", lay.write(), ("out of",)))

    os.makedirs(tmp_path / "empty-dir")
    out.append(("not a layout", str(tmp_path / "empty-dir"), ("neither",)))
    return out


def test_bad_layouts(tmp_path, layerfs, store_root):
    Store(store_root).close()  # an empty store (a read-only command makes none)
    before = store_snapshot(store_root)
    for name, path, words in _broken_layouts(tmp_path):
        proc = layerfs("load", path)
        try:
            assert_one_line_error(proc, mentions=words)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None
        assert store_snapshot(store_root) == before, name
    assert os.listdir(os.path.join(store_root, "tmp")) == []


def test_bad_archives(tmp_path, layerfs, store_root):
    path, _ = _image_layout(str(tmp_path / "lay"))
    good = tar_dir(path, str(tmp_path / "good.tar"))
    data = open(good, "rb").read()
    Store(store_root).close()  # an empty store (a read-only command makes none)
    before = store_snapshot(store_root)
    cases = []
    (tmp_path / "truncated.tar").write_bytes(data[:len(data) // 2])
    cases.append(("truncated", str(tmp_path / "truncated.tar"), ("truncated",)))
    with tarfile.open(tmp_path / "escape.tar", "w") as tf:
        ti = tarfile.TarInfo("../evil")
        tf.addfile(ti)
    cases.append(("member escapes", str(tmp_path / "escape.tar"), ("escapes",)))
    with tarfile.open(tmp_path / "abs.tar", "w") as tf:
        tf.addfile(tarfile.TarInfo("/etc/evil"))
    cases.append(("absolute member", str(tmp_path / "abs.tar"), ("absolute",)))
    shutil.copytree(path, tmp_path / "linkout")
    blobs = tmp_path / "linkout" / "blobs" / "sha256"
    victim = sorted(os.listdir(blobs))[0]
    os.unlink(blobs / victim)
    os.symlink(f"../../../{victim}", blobs / victim)
    cases.append(("link out of the archive", tar_dir(str(tmp_path / "linkout"), str(tmp_path / "linkout.tar")),
                  ("escapes",)))
    (tmp_path / "garbage.tar").write_bytes(b"\x1f\x8b" + os.urandom(2000))
    cases.append(("corrupt gzip", str(tmp_path / "garbage.tar"), ("corrupt",)))
    docker_bad = docker_archive(str(tmp_path / "dbad.tar"), [(config_for([BASE]), [UPDATE], ["x:1"])])
    cases.append(("docker layer with another diff_id", docker_bad, ("diff_id",)))
    cases.append(("no such file", str(tmp_path / "nope.tar"), ("no such",)))
    for name, p, words in cases:
        try:
            assert_one_line_error(layerfs("load", p), mentions=words)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None
        assert store_snapshot(store_root) == before, name


# -- the API a registry client uses ------------------------------------------------------


def test_export_then_import_through_the_api(tmp_path, store):
    """A stored image out as blobs, then in again through a fetch function (what a
    registry push and pull do), with progress reported per layer."""
    import contextlib
    import io

    from layerfs.store import Store
    from layerfs.store.oci import LoadProgress, export_image, import_manifest

    path, config = _image_layout(str(tmp_path / "lay"))
    from layerfs.store.oci.loadsave import load
    load(store, path)
    blobs: dict[str, bytes] = {}
    with export_image(store, "app:1", "zstd") as image:
        for blob in image.blobs:
            with blob.open() as f:
                data = f.read()
            assert sha(data) == blob.descriptor.digest and len(data) == blob.descriptor.size
            blobs[blob.descriptor.digest] = data
        manifest = blobs[image.manifest.descriptor.digest]
        assert image.tags == ["app:1"]

    events = []

    class Recorder(LoadProgress):
        @contextlib.contextmanager
        def layer(self, number, count, diff_id, size, stored):
            got = []
            yield got.append
            events.append((number, count, diff_id, size, stored, sum(got)))

    fetched = []

    def fetch(desc):
        fetched.append(desc.digest)
        return contextlib.nullcontext(io.BytesIO(blobs[desc.digest]))

    with Store(str(tmp_path / "other")) as other:
        rec = import_manifest(other, manifest, fetch, ["pulled:1"], Recorder())
        assert rec.image_id == sha(config)
        assert [(e[0], e[4]) for e in events] == [(1, False), (2, False)]
        assert all(e[3] == e[5] > 0 for e in events)  # every byte of each blob reported
        events.clear()
        fetched.clear()
        # Again: both layers are stored, so only the config is fetched.
        assert import_manifest(other, manifest, fetch, (), Recorder()).image_id == rec.image_id
        assert fetched == [json.loads(manifest)["config"]["digest"]]
        assert [e[4] for e in events] == [True, True]
