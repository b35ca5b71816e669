"""`layerfs push` and `layerfs pull` against a real registry (CNCF distribution), run as a
user runs them; skopeo as the second client; interruptions through a real TCP proxy and
a registry really killed; gc really run while a pull is under way."""

from __future__ import annotations

import base64
import json
import os
import random
import re
import subprocess
import sys
import threading
import time

import pytest

from helpers import assert_one_line_error, on_terminal
from registryimages import DOCKER_MANIFEST, OCI_MANIFEST, make_image, sha, write_oci_layout
from registryserver import SKOPEO, DropRule, HostileRegistry, RegistryServer

LAYERFS = os.path.join(os.path.dirname(sys.executable), "layerfs")


def image_of(seed: int, n_layers: int = 3, size: int = 600_000, shared_base: bool = False, **kw):
    """An image whose layers hold random files; with ``shared_base`` its first layer is
    the same for every seed (a base image other images build on)."""
    rnd = random.Random(seed)
    layers = []
    for i in range(n_layers):
        r = random.Random(0 if (shared_base and i == 0) else seed * 100 + i)
        layers.append({f"layer{i}/data.bin": r.randbytes(size), f"layer{i}/note.txt": b"layer %d\n" % i,
                       "etc/os-release": b"ID=test\nVERSION=%d\n" % (rnd.randint(0, 9) if i else 0)})
    return make_image(layers, **kw)


def load_image(layerfs, tmp_path, image, tag: str) -> str:
    layout = write_oci_layout(str(tmp_path / f"layout-{tag.replace(':', '-')}"), {tag: image})
    out = layerfs("load", layout, check=True).stdout.decode()
    return out.strip().splitlines()[-1].split()[-1]  # "Loaded image ID: sha256:..."


def registry_manifest(registry, repo: str, tag: str) -> dict:
    proc = subprocess.run([SKOPEO, "inspect", "--raw", "--tls-verify=false",
                           f"docker://{registry.host}/{repo}:{tag}"], capture_output=True, check=True)
    return json.loads(proc.stdout)


def tree(layerfs, image: str) -> str:
    return layerfs("ls", "-R", image, check=True).stdout.decode()


def blob_gets(registry, digest: str) -> list[int]:
    return [s for m, p, s in registry.requests("GET", f"/blobs/{digest}")]


# -- the round trip ------------------------------------------------------------------


def test_push_delete_gc_pull_gives_the_same_image(layerfs, tmp_path, registry, store_root):
    image = image_of(1)
    image_id = load_image(layerfs, tmp_path, image, "app:v1")
    before = tree(layerfs, "app:v1")
    ref = f"{registry.host}/app:v2"  # one name component after the host, as in the docs
    out = layerfs("push", "app:v1", ref, check=True).stdout.decode()
    digest = out.strip().split("digest: ")[1]
    # Layers keep the digests they were loaded with (the layout's gzip blobs, not ours).
    pushed = registry_manifest(registry, "app", "v2")
    assert [d["digest"] for d in pushed["layers"]] == [sha(b) for b in image.layers]
    assert pushed["config"]["digest"] == image_id == sha(image.config)

    layerfs("rmi", "app:v1", check=True)
    layerfs("gc", check=True)
    assert json.loads(layerfs("layers", "--json", check=True).stdout) == []
    out = layerfs("pull", ref, check=True).stdout.decode()
    assert f"Digest: {digest}" in out and f"Image ID: {image_id}" in out
    assert tree(layerfs, ref) == before
    layerfs("fsck", check=True)
    # Pushed again elsewhere: the same layer digests, so the same manifest.
    again = layerfs("push", ref, f"{registry.host}/team/copy:v1", check=True).stdout.decode()
    assert again.strip().split("digest: ")[1] == digest


def test_pull_by_digest_and_for_a_platform(layerfs, tmp_path, registry):
    """An index of two platforms: this machine's by default, the other with --platform;
    by digest, nothing is tagged unless asked."""
    from layerfs.store.oci.descriptor import host_platform
    from layerfs.store.registry import Registry
    from layerfs.store.registry.client import Manifest
    here = host_platform().architecture
    other = "arm64" if here != "arm64" else "amd64"
    images = {arch: image_of(20 + n, n_layers=1, size=5000, arch=arch) for n, arch in enumerate((here, other))}
    entries = []
    for arch, image in images.items():
        load_image(layerfs, tmp_path, image, f"multi:{arch}")
        layerfs("push", f"multi:{arch}", f"{registry.host}/multi:{arch}", check=True)
        with Registry(registry.host) as reg:
            data = reg.get_manifest("multi", arch).data
        entries.append({"mediaType": OCI_MANIFEST, "digest": sha(data), "size": len(data),
                        "platform": {"os": "linux", "architecture": arch}})
    layerfs("rmi", f"multi:{here}", f"multi:{other}", check=True)
    index = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                        "manifests": entries}).encode()
    with Registry(registry.host) as reg:
        reg.put_manifest("multi", "latest", Manifest("application/vnd.oci.image.index.v1+json", index, sha(index)))
    out = layerfs("pull", f"{registry.host}/multi", check=True).stdout.decode()
    assert f"Image ID: {sha(images[here].config)}" in out
    out = layerfs("pull", f"{registry.host}/multi", "--platform", f"linux/{other}", "-t", "theirs:v1",
                  check=True).stdout.decode()
    assert f"Image ID: {sha(images[other].config)}" in out and "Pulled image: theirs:v1" in out
    layerfs("rmi", "theirs:v1", check=True)
    out = layerfs("pull", f"{registry.host}/multi@{entries[1]['digest']}", check=True).stdout.decode()
    assert f"Image ID: {sha(images[other].config)}" in out and "Pulled image" not in out
    assert_one_line_error(layerfs("pull", f"{registry.host}/multi", "--platform", "linux/s390x"),
                          mentions=("no manifest for linux/s390x",))


def test_second_push_sends_no_layer(layerfs, tmp_path, registry):
    load_image(layerfs, tmp_path, image_of(2), "app:v1")
    layerfs("push", "app:v1", f"{registry.host}/team/app:v1", check=True)
    uploads, patches = registry.uploads(), len(registry.requests("PATCH"))
    layerfs("push", "app:v1", f"{registry.host}/team/app:v2", check=True)
    assert registry.uploads() == uploads and len(registry.requests("PATCH")) == patches
    heads = [s for m, p, s in registry.requests("HEAD", "/blobs/")]
    assert heads[-4:] == [200] * 4  # three layers and the config, each found by HEAD


def test_push_to_another_repository_mounts_the_layers(layerfs, tmp_path, registry):
    image = image_of(3)
    load_image(layerfs, tmp_path, image, "app:v1")
    layerfs("push", "app:v1", f"{registry.host}/team/base:v1", check=True)
    uploads = registry.uploads()
    layerfs("push", "app:v1", f"{registry.host}/team/other:v1", check=True)
    mounts = [s for m, p, s in registry.requests("POST", "mount=")]
    assert mounts == [201] * 3  # every layer mounted from team/base
    assert registry.uploads() == uploads + 1  # only the config was sent


def test_commit_made_layers_get_the_same_digest_every_push(layerfs, tmp_path, registry):
    """A layer made here (import of a plain tar) is compressed the same way each time."""
    from ocihelpers import tar_bytes
    tar = tmp_path / "layer.tar"
    tar.write_bytes(tar_bytes([("etc/motd", "f", b"hello\n"), ("bin/tool", "f", os.urandom(200_000))]))
    layerfs("import-layer", str(tar), "-t", "made:v1", check=True)
    first = layerfs("push", "made:v1", f"{registry.host}/made/here:v1", check=True).stdout
    uploads = registry.uploads()
    second = layerfs("push", "made:v1", f"{registry.host}/made/here:v2", check=True).stdout
    assert first.split(b"digest: ")[1] == second.split(b"digest: ")[1]
    assert registry.uploads() == uploads


# -- skopeo, the second client -----------------------------------------------------------


@pytest.mark.skipif(SKOPEO is None, reason="needs skopeo")
def test_skopeo_copies_what_layerfs_pushed(layerfs, tmp_path, registry, store_root):
    image = image_of(4)
    image_id = load_image(layerfs, tmp_path, image, "app:v1")
    layerfs("push", "app:v1", f"{registry.host}/team/app:v1", check=True)
    out = tmp_path / "copy"
    subprocess.run([SKOPEO, "--insecure-policy", "copy", "--src-tls-verify=false",
                    f"docker://{registry.host}/team/app:v1", f"oci:{out}:v1"], check=True, capture_output=True)
    for blob in [image.config, *image.layers]:
        assert (out / "blobs" / "sha256" / sha(blob)[7:]).read_bytes() == blob
    # And what skopeo copied loads back as the same image, in a fresh store.
    proc = layerfs("load", str(out), root=str(tmp_path / "other-store"), check=True)
    assert image_id in proc.stdout.decode()


@pytest.mark.skipif(SKOPEO is None, reason="needs skopeo")
@pytest.mark.parametrize("fmt", ["oci", "v2s2"])
def test_layerfs_pulls_what_skopeo_pushed(layerfs, tmp_path, registry, fmt):
    image = image_of(5, media_type=OCI_MANIFEST)
    layout = write_oci_layout(str(tmp_path / "layout"), {"v1": image})
    subprocess.run([SKOPEO, "--insecure-policy", "copy", "--dest-tls-verify=false", "--format", fmt,
                    f"oci:{layout}:v1", f"docker://{registry.host}/from/skopeo:v1"], check=True, capture_output=True)
    pushed = registry_manifest(registry, "from/skopeo", "v1")
    assert pushed["mediaType"] == (OCI_MANIFEST if fmt == "oci" else DOCKER_MANIFEST)
    out = layerfs("pull", f"{registry.host}/from/skopeo:v1", "-t", "mine:v1", check=True).stdout.decode()
    assert "Pulled image: mine:v1" in out and f"Image ID: {sha(image.config)}" in out
    names = tree(layerfs, "mine:v1")
    assert "data.bin" in names and "os-release" in names
    # Pushed on, the layers keep skopeo's digests (a Docker media type becomes OCI's).
    layerfs("push", "mine:v1", f"{registry.host}/back/again:v1", check=True)
    back = registry_manifest(registry, "back/again", "v1")
    assert [d["digest"] for d in back["layers"]] == [d["digest"] for d in pushed["layers"]]


# -- what the store keeps ------------------------------------------------------------


def test_pull_skips_layers_the_store_has_and_stores_files_once(layerfs, tmp_path, registry, store_root):
    base_user = image_of(6, shared_base=True)
    other_user = image_of(7, shared_base=True)
    assert base_user.layers[0] == other_user.layers[0] and base_user.layers[1] != other_user.layers[1]
    for n, image in ((6, base_user), (7, other_user)):
        load_image(layerfs, tmp_path, image, f"img{n}:v1")
        layerfs("push", f"img{n}:v1", f"{registry.host}/team/img{n}:v1", check=True)
    layerfs("rmi", "img6:v1", "img7:v1", check=True)
    layerfs("gc", check=True)
    layerfs("pull", f"{registry.host}/team/img6:v1", check=True)
    base_digest = sha(base_user.layers[0])
    assert blob_gets(registry, base_digest) == [200]
    out = layerfs("pull", f"{registry.host}/team/img7:v1", check=True).stdout.decode()
    assert "Layers: 2 downloaded, 0 resumed from an interrupted pull, 1 already stored" in out
    assert blob_gets(registry, base_digest) == [200]  # not fetched for the second image
    assert len(blob_gets(registry, sha(other_user.layers[1]))) == 1
    # Every random data file is stored once: the shared base's, and two per image above it.
    blob_files = [os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(store_root, "blobs"))
                  for f in fs]
    assert blob_files.count(600_000) == 5


def test_a_layer_the_store_had_keeps_the_digest_it_was_pulled_with(layerfs, tmp_path, registry, store_root):
    """The store had the layer (from a plain tar) when the pull skipped it: the pull notes
    the registry's digest for it, and a push to that registry mounts that blob rather
    than sending layerfs's own compression of the layer."""
    from ocihelpers import tar_bytes
    image = image_of(18, n_layers=2, size=200_000)
    other_root = str(tmp_path / "other-store")
    load_image(lambda *a, **k: layerfs(*a, root=other_root, **k), tmp_path, image, "x:v1")
    layerfs("push", "x:v1", f"{registry.host}/team/x:v1", root=other_root, check=True)
    base = tmp_path / "base.tar"
    base.write_bytes(tar_bytes([(name, "f", data) for name, data in
                                _files_of(image, 0).items()]))
    assert sha(base.read_bytes()) == image.diff_ids[0]
    layerfs("import-layer", str(base), check=True)  # the base layer, from a plain tar
    layerfs("pull", f"{registry.host}/team/x:v1", check=True)
    assert blob_gets(registry, sha(image.layers[0])) == []  # skipped: the store had it
    uploads = registry.uploads()
    layerfs("push", f"{registry.host}/team/x:v1", f"{registry.host}/team/y:v1", check=True)
    pushed = registry_manifest(registry, "team/y", "v1")
    assert [d["digest"] for d in pushed["layers"]] == [sha(b) for b in image.layers]
    assert registry.uploads() == uploads + 1  # the config; both layers mounted
    assert sorted(s for m, p, s in registry.requests("POST", "mount="))[-2:] == [201, 201]


def _files_of(image, n: int) -> dict[str, bytes]:
    """The files of layer ``n`` of an image made by image_of (read back from its tar)."""
    import gzip
    import io
    import tarfile
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(image.layers[n]))) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}


# -- interruptions -------------------------------------------------------------------


def _popen(store_root: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([LAYERFS, *args], env=dict(os.environ, LAYERFS_ROOT=store_root),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _pushed(layerfs, tmp_path, registry, seed: int, repo: str, size: int = 1_500_000):
    image = image_of(seed, size=size)
    load_image(layerfs, tmp_path, image, "src:v1")
    layerfs("push", "src:v1", f"{registry.host}/{repo}:v1", check=True)
    layerfs("rmi", "src:v1", check=True)
    layerfs("gc", check=True)
    return image


def _pull_stalled_at_layer_3(store_root, registry, proxy, image, hold: threading.Event) -> subprocess.Popen:
    """Start `layerfs pull` through the proxy with layer 3's download stalled half-way;
    return once layers 1 and 2 have come down."""
    digests = [sha(b) for b in image.layers]
    rule = proxy.add(DropRule("GET", f"/blobs/{digests[2]}", after=len(image.layers[2]) // 2,
                              direction="down", hold=hold))
    proc = _popen(store_root, "pull", f"{proxy.host}/team/app:v1")
    assert rule.holding.wait(60), "the pull never reached layer 3"
    deadline = time.monotonic() + 30
    while not all(blob_gets(registry, d) == [200] for d in digests[:2]) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # a finished layer is renamed into place right after its last byte
    return proc


def test_killed_pull_resumes_without_fetching_finished_layers(layerfs, tmp_path, registry, proxy, store_root):
    image = _pushed(layerfs, tmp_path, registry, 8, "team/app")
    digests = [sha(b) for b in image.layers]
    hold = threading.Event()
    try:
        proc = _pull_stalled_at_layer_3(store_root, registry, proxy, image, hold)
        proc.kill()  # as hard as a crash
        proc.wait()
    finally:
        hold.set()
    # Nothing half-pulled shows as an image, nor as a layer.
    assert json.loads(layerfs("images", "--json", check=True).stdout) == []
    assert json.loads(layerfs("layers", "--json", check=True).stdout) == []
    out = layerfs("pull", f"{proxy.host}/team/app:v1", check=True).stdout.decode()
    assert f"Image ID: {sha(image.config)}" in out
    assert "Layers: 0 downloaded, 3 resumed from an interrupted pull, 0 already stored" in out
    assert blob_gets(registry, digests[0]) == [200] and blob_gets(registry, digests[1]) == [200]
    assert blob_gets(registry, digests[2]) == [200, 206]  # picked up where it stopped
    assert layerfs("fsck", check=True).returncode == 0
    assert [n for n in os.listdir(os.path.join(store_root, "tmp")) if n.startswith("pull-")] == []


def test_layers_download_in_parallel(layerfs, tmp_path, registry, proxy, store_root):
    image = _pushed(layerfs, tmp_path, registry, 9, "team/app")
    digests = [sha(b) for b in image.layers]
    hold = threading.Event()
    rule = proxy.add(DropRule("GET", f"/blobs/{digests[0]}", after=1000, direction="down", hold=hold))
    proc = _popen(store_root, "pull", f"{proxy.host}/team/app:v1")
    try:
        assert rule.holding.wait(60)
        deadline = time.monotonic() + 30
        # While layer 1 is stalled, layers 2 and 3 come down.
        while not all(blob_gets(registry, d) for d in digests[1:]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(blob_gets(registry, d) == [200] for d in digests[1:])
        assert proc.poll() is None
    finally:
        hold.set()
    assert proc.wait(60) == 0, proc.stderr.read()


def test_gc_during_a_pull_takes_nothing_of_it(layerfs, tmp_path, registry, proxy, store_root):
    image = _pushed(layerfs, tmp_path, registry, 10, "team/app")
    hold = threading.Event()
    try:
        proc = _pull_stalled_at_layer_3(store_root, registry, proxy, image, hold)
        report = json.loads(layerfs("gc", "--json", check=True).stdout)
        assert report["tmp_removed"] == 0  # the pull's downloads are under its lease
        scratch = [n for n in os.listdir(os.path.join(store_root, "tmp")) if n.startswith("pull-")]
        assert len(scratch) == 1
        assert len(os.listdir(os.path.join(store_root, "tmp", scratch[0]))) == 3
    finally:
        hold.set()
    assert proc.wait(60) == 0, proc.stderr.read()
    assert blob_gets(registry, sha(image.layers[0])) == [200]  # nothing fetched twice
    layerfs("fsck", check=True)
    assert sha(image.config) in layerfs("images", "-q", check=True).stdout.decode()


def _kill_and_restart(registry: RegistryServer, rule: DropRule, hold: threading.Event) -> None:
    """Kill the registry while a transfer through the proxy is stalled mid-blob (the
    connection dies with it), and start it again half a second later."""
    assert rule.holding.wait(60)
    registry.stop(kill=True)
    hold.set()
    time.sleep(0.5)
    registry.start()


def test_registry_killed_mid_pull_and_started_again(layerfs, tmp_path, registry, proxy, store_root):
    image = _pushed(layerfs, tmp_path, registry, 11, "team/app", size=3_000_000)
    digest = sha(image.layers[1])
    hold = threading.Event()
    rule = proxy.add(DropRule("GET", f"/blobs/{digest}", after=len(image.layers[1]) // 3,
                              direction="down", hold=hold, then_drop=True))
    proc = _popen(store_root, "pull", f"{proxy.host}/team/app:v1")
    _kill_and_restart(registry, rule, hold)
    assert proc.wait(120) == 0, proc.stderr.read()
    assert blob_gets(registry, digest)[-1] == 206
    layerfs("fsck", check=True)


def test_registry_killed_mid_push_and_started_again(layerfs, tmp_path, registry, proxy, store_root):
    image = image_of(12, size=3_000_000)
    load_image(layerfs, tmp_path, image, "app:v1")
    hold = threading.Event()
    rule = proxy.add(DropRule("PUT", "/blobs/uploads/", after=800_000, hold=hold, then_drop=True))
    proc = _popen(store_root, "push", "app:v1", f"{proxy.host}/team/app:v1")
    _kill_and_restart(registry, rule, hold)
    assert proc.wait(120) == 0, proc.stderr.read()
    pushed = registry_manifest(registry, "team/app", "v1")
    assert [d["digest"] for d in pushed["layers"]] == [sha(b) for b in image.layers]


# -- progress ------------------------------------------------------------------------


def test_one_progress_line_per_layer_on_a_terminal(layerfs, tmp_path, registry, store_root):
    _pushed(layerfs, tmp_path, registry, 13, "team/app")
    rc, _, seen = on_terminal([LAYERFS, "pull", f"{registry.host}/team/app:v1"],
                              dict(os.environ, LAYERFS_ROOT=store_root), timeout=60)
    assert rc == 0
    text = re.sub(r"\x1b\[\d+F", "\n", seen.replace("\r", ""))
    lines = [line.replace("\x1b[K", "") for line in text.split("\n") if line.startswith("layer ")]
    last = {line.split(":")[0]: line for line in lines}  # the screen's final state per label
    assert [label.split()[1] for label in last] == ["1/3", "2/3", "3/3"]
    assert all(line.endswith(": done") for line in last.values()), last
    assert any("downloading" in line for line in lines) and any("extracting" in line for line in lines)


# -- authentication ------------------------------------------------------------------


def test_basic_auth_from_the_command_line_and_docker_config(layerfs, tmp_path, monkeypatch, basic_registry):
    load_image(layerfs, tmp_path, image_of(14, size=10_000), "app:v1")
    ref = f"{basic_registry.host}/team/app:v1"
    assert_one_line_error(layerfs("push", "app:v1", ref), mentions=("requires a user name and password",))
    bad = layerfs("push", "app:v1", ref, "--username", "alice", "--password-stdin", input=b"nope\n")
    assert_one_line_error(bad, mentions=("refused the credentials of 'alice'",))
    layerfs("push", "app:v1", ref, "-u", "alice", "--password-stdin", input=b"s3cret\n", check=True)
    config = tmp_path / "docker"
    config.mkdir()
    (config / "config.json").write_text(json.dumps(
        {"auths": {basic_registry.host: {"auth": base64.b64encode(b"alice:s3cret").decode()}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(config))
    layerfs("rmi", "app:v1", check=True)
    layerfs("pull", ref, check=True)


def test_bearer_tokens_through_the_cli(layerfs, tmp_path, monkeypatch, token_registry):
    srv, _ = token_registry
    load_image(layerfs, tmp_path, image_of(15, size=10_000), "app:v1")
    ref = f"{srv.host}/team/app:v1"
    auth_file = tmp_path / "auth.json"
    auth_file.write_text(json.dumps({"auths": {srv.host: {"auth": base64.b64encode(b"alice:s3cret").decode()}}}))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth_file))
    layerfs("push", "app:v1", ref, check=True)
    monkeypatch.delenv("REGISTRY_AUTH_FILE")
    assert_one_line_error(layerfs("push", "app:v1", f"{srv.host}/team/anon:v1"), mentions=("requires authentication",))
    denied = layerfs("push", "app:v1", f"{srv.host}/team/bob:v1", "-u", "bob", "--password-stdin", input=b"b0b")
    assert_one_line_error(denied, mentions=("not allowed for the credentials of 'bob'",))
    layerfs("pull", ref, "-t", "back:v1", "-u", "bob", "--password-stdin", input=b"b0b\n", check=True)
    layerfs("pull", ref, "-t", "anonymous:v1", check=True)  # this service lets anyone pull


# -- bad input -----------------------------------------------------------------------


def _nothing_stored(layerfs) -> None:
    assert json.loads(layerfs("images", "--json", check=True).stdout) == []
    assert json.loads(layerfs("layers", "--json", check=True).stdout) == []


def test_bad_references_hosts_and_tags(layerfs, registry):
    assert_one_line_error(layerfs("pull", "UPPER/case"), mentions=("invalid reference",))
    assert_one_line_error(layerfs("pull", "no-such-host.invalid/a/b:v1"), mentions=("cannot resolve",))
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        assert_one_line_error(layerfs("pull", f"127.0.0.1:{s.getsockname()[1]}/a/b:v1"),
                              mentions=("connection refused",))
    assert_one_line_error(layerfs("pull", f"{registry.host}/a/b:nope"), mentions=("not found",))
    assert_one_line_error(layerfs("push", "no-such-image", f"{registry.host}/a/b:v1"), mentions=("no such image",))
    usage = layerfs("pull", f"{registry.host}/a/b", "--username", "x")  # click's usage error
    assert usage.returncode == 2 and b"--username needs --password-stdin" in usage.stderr
    _nothing_stored(layerfs)


def test_a_damaged_blob_stores_nothing(layerfs, tmp_path, registry):
    image = _pushed(layerfs, tmp_path, registry, 16, "team/app", size=50_000)
    hexd = sha(image.layers[2])[7:]
    path = registry.blob_path(sha(image.layers[2]))
    data = bytearray(open(path, "rb").read())
    data[100] ^= 1
    open(path, "wb").write(bytes(data))
    err = assert_one_line_error(layerfs("pull", f"{registry.host}/team/app:v1"), mentions=("digest",))
    assert hexd[:12] in err
    _nothing_stored(layerfs)


def test_manifest_over_the_cap_stores_nothing(layerfs):
    big = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": [],
                      "annotations": {"x": "y" * (5 << 20)}}).encode()
    hostile = HostileRegistry({"/v2/": (200, {}, b"{}"),
                               "/v2/a/b/manifests/v1": (200, {"Content-Type": OCI_MANIFEST}, big)})
    try:
        assert_one_line_error(layerfs("pull", f"{hostile.host}/a/b:v1"), mentions=("byte limit",))
    finally:
        hostile.close()
    _nothing_stored(layerfs)


def test_config_that_disagrees_with_the_manifest_fetches_no_layer(layerfs):
    image = image_of(19, n_layers=2, size=1000)
    doc = json.loads(image.config)
    doc["rootfs"]["diff_ids"] = doc["rootfs"]["diff_ids"][:1]
    config = json.dumps(doc).encode()
    manifest = json.loads(image.manifest)
    manifest["config"].update(digest=sha(config), size=len(config))
    # The layer blobs are not served: a client that asked for them would fail differently.
    hostile = HostileRegistry({"/v2/": (200, {}, b"{}"),
                               "/v2/a/b/manifests/v1": (200, {"Content-Type": OCI_MANIFEST},
                                                        json.dumps(manifest).encode()),
                               f"/v2/a/b/blobs/{sha(config)}": (200, {}, config)})
    try:
        assert_one_line_error(layerfs("pull", f"{hostile.host}/a/b:v1"), mentions=("lists 1 layers",))
    finally:
        hostile.close()
    _nothing_stored(layerfs)


def test_registry_gone_mid_blob_is_one_error_and_no_image(layerfs, tmp_path, registry, proxy, store_root):
    image = _pushed(layerfs, tmp_path, registry, 17, "team/app", size=2_000_000)
    hold = threading.Event()
    rule = proxy.add(DropRule("GET", f"/blobs/{sha(image.layers[1])}", after=300_000, direction="down",
                              hold=hold, then_drop=True))
    proc = _popen(store_root, "pull", f"{proxy.host}/team/app:v1")
    assert rule.holding.wait(60)
    registry.stop(kill=True)  # and it does not come back
    hold.set()
    out, err = proc.communicate(timeout=120)
    fake = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert_one_line_error(fake, mentions=("dropped", "while downloading blob"))
    _nothing_stored(layerfs)
