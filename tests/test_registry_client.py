"""The registry client against a real registry (CNCF distribution, Debian's docker-registry),
cross-checked with skopeo; interruptions through a real TCP proxy that drops connections,
and a registry really killed and started again."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import threading
import time

import pytest

from registryimages import DOCKER_MANIFEST, OCI_MANIFEST, Image, make_image, sha, write_oci_layout
from registryserver import (OPENSSL, REGISTRY, SKOPEO, DropProxy, DropRule, HostileRegistry, RegistryServer,
                            self_signed)
from layerfs.store.oci.descriptor import BadImage, Descriptor, Platform
from layerfs.store.registry import (AccessDenied, AuthenticationRequired, BlobReader, Credentials,
                            DigestMismatch, ManifestUnknown, Outcome, Reference, Registry,
                            RegistryError, RegistryUnreachable, RetryPolicy, TooLarge,
                            UnsupportedManifest, find_credentials, push_blob)
from layerfs.store.registry.client import Manifest
from layerfs.store.registry.reference import api_host
from layerfs.store.registry.manifests import OCI_INDEX

pytestmark = pytest.mark.skipif(REGISTRY is None, reason="needs docker-registry (apt-get install docker-registry)")

FAST = RetryPolicy(attempts=6, base_delay=0.05, max_delay=0.5)
# Short socket timeouts: a test that hangs fails in seconds, not minutes.
TIMEOUT = 15.0
# Patient enough for a registry that is being restarted (about a second).
PATIENT = RetryPolicy(attempts=10, base_delay=0.1, max_delay=1.0)


def client(host: str, *args, **kwargs) -> Registry:
    return Registry(host, *args, timeout=TIMEOUT, **kwargs)


def desc_of(data: bytes, media_type: str = "application/octet-stream") -> Descriptor:
    return Descriptor(media_type, sha(data), len(data))


def source_of(data: bytes):
    return lambda offset: io.BytesIO(data[offset:])


def push_image(reg: Registry, repo: str, tag: str, image: Image, **kw) -> list[Outcome]:
    """Blobs first, the manifest last (what `layerfs push` does, minus the store)."""
    outcomes = []
    for blob, d in zip(image.layers + [image.config], image.descriptors() + [image.config_descriptor()]):
        outcomes.append(push_blob(reg, repo, Descriptor.from_json(d, "test"), source_of(blob), **kw))
    reg.put_manifest(repo, tag, Manifest(image.media_type, image.manifest, image.digest))
    return outcomes


def pull_blobs(reg: Registry, repo: str, ref: str) -> tuple[Manifest, bytes, list[bytes]]:
    resolved = reg.resolve(repo, ref, Platform("linux", "amd64"))
    doc = json.loads(resolved.manifest.data)
    blobs = []
    for d in [doc["config"], *doc["layers"]]:
        with BlobReader(reg, repo, Descriptor.from_json(d, "test")) as r:
            blobs.append(r.read())
            r.finish()
    return resolved.manifest, blobs[0], blobs[1:]


def skopeo(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([SKOPEO, "--insecure-policy", *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


def random_image(n_layers: int = 2, size: int = 50_000, **kw) -> Image:
    return make_image([{f"dir{i}/file.bin": os.urandom(size), f"dir{i}/small.txt": b"layer %d\n" % i}
                       for i in range(n_layers)], **kw)


# -- push and pull -------------------------------------------------------------------


def test_push_then_pull_by_tag_and_digest(registry):
    image = random_image(3)
    with client(registry.host) as reg:
        assert push_image(reg, "layerfs/app", "v1", image) == [Outcome.UPLOADED] * 4
        for ref in ("v1", image.digest):
            manifest, config, layers = pull_blobs(reg, "layerfs/app", ref)
            assert manifest.data == image.manifest and manifest.digest == image.digest
            assert manifest.media_type == OCI_MANIFEST
            assert config == image.config and layers == image.layers
    # The registry saw blobs first, the manifest last.
    puts = [p for m, p, s in registry.requests("PUT")]
    assert puts[-1].endswith("/manifests/v1") and all("/blobs/uploads/" in p for p in puts[:-1])


def test_second_push_uploads_nothing(registry):
    image = random_image(2)
    with client(registry.host) as reg:
        push_image(reg, "layerfs/app", "v1", image)
    before = registry.uploads()
    with client(registry.host) as reg:
        assert push_image(reg, "layerfs/app", "v2", image) == [Outcome.EXISTS] * 3
        assert reg.counts["bytes_sent"] == 0
    assert registry.uploads() == before
    assert len(registry.requests("PATCH")) == 0


def test_large_blob_goes_in_chunks_small_in_one_put(registry):
    big, small = os.urandom(2_600_000), os.urandom(10_000)
    with client(registry.host, chunk_size=1 << 20, monolithic_max=1 << 20) as reg:
        push_blob(reg, "layerfs/app", desc_of(big), source_of(big))
        push_blob(reg, "layerfs/app", desc_of(small), source_of(small))
        assert reg.counts["patch"] == 3  # 1 MiB + 1 MiB + the rest
        with BlobReader(reg, "layerfs/app", desc_of(big)) as r:
            assert r.read() == big
    patches = registry.requests("PATCH")
    assert len(patches) == 3 and all(s == 202 for _, _, s in patches)
    assert sum(1 for m, p, s in registry.requests("PUT") if "digest=" in p and s == 201) == 2


def test_cross_repository_mount_and_fallback(registry):
    image = random_image(2)
    with client(registry.host) as reg:
        push_image(reg, "team/base", "v1", image)
        uploads = registry.uploads()
        outcomes = push_image(reg, "team/app", "v1", image, mount_from=["team/base"])
        assert outcomes == [Outcome.MOUNTED] * 3
        assert registry.uploads() == uploads  # nothing was uploaded
        mounts = registry.requests("POST", "mount=")
        assert len(mounts) == 3 and all(s == 201 for _, _, s in mounts)
        # A source repository without the blob: the registry opens an upload instead.
        other = os.urandom(5000)
        assert push_blob(reg, "team/app", desc_of(other), source_of(other),
                         mount_from=["team/base"]) == Outcome.UPLOADED
        assert registry.requests("POST", "mount=")[-1][2] == 202
        assert pull_blobs(reg, "team/app", "v1")[2] == image.layers
        with BlobReader(reg, "team/app", desc_of(other)) as r:
            assert r.read() == other


@pytest.mark.skipif(SKOPEO is None, reason="needs skopeo")
def test_skopeo_reads_what_we_push(registry, tmp_path):
    image = random_image(2)
    with client(registry.host) as reg:
        push_image(reg, "layerfs/app", "v1", image)
    out = tmp_path / "copy"
    skopeo("copy", "--src-tls-verify=false", f"docker://{registry.host}/layerfs/app:v1", f"oci:{out}:v1")
    index = json.loads((out / "index.json").read_text())
    assert index["manifests"][0]["digest"] == image.digest  # the same manifest bytes
    for blob in [image.config, *image.layers]:
        assert (out / "blobs" / "sha256" / sha(blob)[7:]).read_bytes() == blob
    info = json.loads(skopeo("inspect", "--tls-verify=false", f"docker://{registry.host}/layerfs/app:v1").stdout)
    assert info["Digest"] == image.digest and info["Layers"] == [sha(b) for b in image.layers]


@pytest.mark.skipif(SKOPEO is None, reason="needs skopeo")
@pytest.mark.parametrize("fmt", ["oci", "v2s2"])
def test_we_read_what_skopeo_pushes(registry, tmp_path, fmt):
    image = random_image(2)
    layout = tmp_path / "layout"
    write_oci_layout(str(layout), {"v1": image})
    skopeo("copy", "--dest-tls-verify=false", "--format", fmt, f"oci:{layout}:v1",
           f"docker://{registry.host}/from/skopeo:v1")
    with client(registry.host) as reg:
        manifest, config, layers = pull_blobs(reg, "from/skopeo", "v1")
    assert manifest.media_type == (OCI_MANIFEST if fmt == "oci" else DOCKER_MANIFEST)
    assert json.loads(config)["rootfs"]["diff_ids"] == image.diff_ids
    assert [sha(b) for b in layers] == [sha(b) for b in image.layers]  # skopeo keeps the blobs


def test_index_resolved_for_the_platform(registry):
    amd, arm = random_image(1, arch="amd64"), random_image(1, arch="arm64")
    with client(registry.host) as reg:
        push_image(reg, "multi/app", amd.digest.replace(":", "-"), amd)
        push_image(reg, "multi/app", arm.digest.replace(":", "-"), arm)
        entries = [
            # What buildx adds: an attestation manifest that is no platform's image.
            {"mediaType": OCI_MANIFEST, "digest": arm.digest, "size": len(arm.manifest),
             "platform": {"os": "unknown", "architecture": "unknown"}},
            {"mediaType": OCI_MANIFEST, "digest": arm.digest, "size": len(arm.manifest),
             "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
            {"mediaType": OCI_MANIFEST, "digest": amd.digest, "size": len(amd.manifest),
             "platform": {"os": "linux", "architecture": "amd64"}},
        ]
        index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()
        reg.put_manifest("multi/app", "v1", Manifest(OCI_INDEX, index, sha(index)))
        got = reg.resolve("multi/app", "v1", Platform("linux", "amd64"))
        assert got.manifest.digest == amd.digest and got.index.digest == sha(index)
        assert reg.resolve("multi/app", "v1", Platform.parse("linux/arm64")).manifest.digest == arm.digest
        with pytest.raises(BadImage, match="no manifest for linux/s390x .*linux/amd64, linux/arm64/v8"):
            reg.resolve("multi/app", "v1", Platform.parse("linux/s390x"))


# -- bad answers ---------------------------------------------------------------------


def test_unknown_tag_repository_and_blob(registry):
    image = random_image(1)
    with client(registry.host) as reg:
        push_image(reg, "layerfs/app", "v1", image)
        with pytest.raises(ManifestUnknown, match="layerfs/app:nope: not found.*MANIFEST_UNKNOWN"):
            reg.get_manifest("layerfs/app", "nope")
        with pytest.raises(ManifestUnknown, match="no/such-repo:v1: not found"):
            reg.get_manifest("no/such-repo", "v1")
        missing = os.urandom(100)
        with pytest.raises(RegistryError, match="not found on the registry"):
            BlobReader(reg, "layerfs/app", desc_of(missing))


def test_blob_with_wrong_bytes_is_refused(registry):
    """A registry whose storage was damaged serves other bytes under the digest."""
    image = random_image(1)
    with client(registry.host) as reg:
        push_image(reg, "layerfs/app", "v1", image)
        d = Descriptor.from_json(image.descriptors()[0], "test")
        path = registry.blob_path(d.digest)
        data = bytearray(open(path, "rb").read())
        data[len(data) // 2] ^= 0xFF  # same size, one bit flipped
        with open(path, "wb") as f:
            f.write(data)
        with BlobReader(reg, "layerfs/app", d) as r, pytest.raises(DigestMismatch, match="digest sha256:"):
            r.read()
        # A damaged manifest (pulled by digest) too.
        mpath = registry.blob_path(image.digest)
        with open(mpath, "wb") as f:
            f.write(image.manifest.replace(b'"schemaVersion": 2', b'"schemaVersion":  2'))
        with pytest.raises(DigestMismatch, match="manifest whose digest is"):
            reg.get_manifest("layerfs/app", image.digest)


def test_manifest_over_the_size_cap(registry):
    """Registries must take manifests of 4 MiB, so a client reads that much and no more."""
    image = random_image(1)
    doc = json.loads(image.manifest)
    doc["annotations"] = {"padding": ""}
    doc["annotations"]["padding"] = "x" * ((4 << 20) - len(json.dumps(doc)))
    at_cap = json.dumps(doc).encode()
    assert len(at_cap) == 4 << 20
    with client(registry.host) as reg:
        push_image(reg, "layerfs/app", "v1", image)
        reg.put_manifest("layerfs/app", "big", Manifest(OCI_MANIFEST, at_cap, sha(at_cap)))
        assert reg.get_manifest("layerfs/app", "big").data == at_cap
    # distribution itself stores no more, so a hostile registry serves the bigger one,
    # once with its length announced and once without (only reading shows it).
    doc["annotations"]["padding"] += "x"
    over = json.dumps(doc).encode()
    for chunked in (False, True):
        hostile = HostileRegistry({"/v2/": (200, {}, b"{}"),
                                   "/v2/layerfs/app/manifests/big": (200, {"Content-Type": OCI_MANIFEST}, over)},
                                  chunked=chunked)
        try:
            with client(hostile.host) as reg, pytest.raises(TooLarge, match="over the 4194304 byte limit"):
                reg.get_manifest("layerfs/app", "big")
        finally:
            hostile.close()


def test_hostile_manifest_answers():
    image = random_image(1)
    schema1 = json.dumps({"schemaVersion": 1, "name": "a/b", "tag": "v1", "fsLayers": []}).encode()
    hostile = HostileRegistry({
        "/v2/": (200, {}, b"{}"),
        # A tag whose manifest is not what the registry says it is.
        "/v2/a/b/manifests/v1": (200, {"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": sha(b"other")},
                                 image.manifest),
        "/v2/a/b/manifests/old": (200, {"Content-Type": "application/vnd.docker.distribution.manifest.v1+prettyjws"},
                                  schema1),
        "/v2/a/b/manifests/junk": (200, {"Content-Type": OCI_MANIFEST}, b"<html>not json</html>"),
    })
    try:
        with client(hostile.host) as reg:
            with pytest.raises(DigestMismatch, match="not the sha256:.* the registry claims"):
                reg.get_manifest("a/b", "v1")
            with pytest.raises(UnsupportedManifest, match="schema 1"):
                reg.get_manifest("a/b", "old")
            with pytest.raises(BadImage, match="is not valid JSON"):
                reg.get_manifest("a/b", "junk")
    finally:
        hostile.close()


def test_unknown_host_and_refused_connection_fail_fast():
    with client("no-such-host.invalid:5000") as reg, pytest.raises(RegistryUnreachable, match="cannot resolve"):
        reg.get_manifest("a/b", "v1")
    start = time.monotonic()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        with client(f"127.0.0.1:{port}") as reg, pytest.raises(RegistryUnreachable, match="connection refused"):
            reg.get_manifest("a/b", "v1")
    # A registry that never answered is not waited for (no retries with backoff).
    assert time.monotonic() - start < 5


def test_not_a_registry(tmp_path):
    import http.server
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        with client(f"127.0.0.1:{srv.server_address[1]}") as reg, \
                pytest.raises(RegistryError, match="does not look like a registry .*404"):
            reg.get_manifest("a/b", "v1")
    finally:
        srv.shutdown()
        srv.server_close()


# -- interruptions ----------------------------------------------------------------------


def test_dropped_chunk_resumes_from_the_upload_status(registry, proxy):
    """The second PATCH is cut before the registry sees it: the client asks the upload's
    status (GET of its Location, Range 0-1048575) and goes on from there."""
    big = os.urandom(3_500_000)
    proxy.add(DropRule("PATCH", "/blobs/uploads/", after=0, skip=1))
    with client(proxy.host, chunk_size=1 << 20, monolithic_max=1 << 20, retry=FAST) as reg:
        assert push_blob(reg, "layerfs/app", desc_of(big), source_of(big)) == Outcome.UPLOADED
        assert reg.counts["resume"] == 1 and reg.counts["restart"] == 0
    assert proxy.drops == 1
    assert registry.uploads() == 1  # the same upload, resumed
    status = [s for m, p, s in registry.requests("GET", "/blobs/uploads/")]
    assert status == [204]
    assert len(registry.requests("PATCH")) == 4  # no chunk sent twice
    with client(registry.host) as reg, BlobReader(reg, "layerfs/app", desc_of(big)) as r:
        assert r.read() == big


def test_chunk_dropped_midway_starts_a_new_upload(registry, proxy):
    """Cut in the middle of a chunk, distribution drops the whole upload (its state no
    longer matches); the client sees that in the status and starts over."""
    big = os.urandom(3_500_000)
    proxy.add(DropRule("PATCH", "/blobs/uploads/", after=300_000, skip=1))
    with client(proxy.host, chunk_size=1 << 20, monolithic_max=1 << 20, retry=FAST) as reg:
        assert push_blob(reg, "layerfs/app", desc_of(big), source_of(big)) == Outcome.UPLOADED
        assert reg.counts["restart"] == 1
    assert registry.uploads() == 2
    with client(registry.host) as reg, BlobReader(reg, "layerfs/app", desc_of(big)) as r:
        assert r.read() == big


def test_monolithic_put_dropped_is_sent_again(registry, proxy):
    blob = os.urandom(400_000)
    proxy.add(DropRule("PUT", "/blobs/uploads/", after=100_000))
    with client(proxy.host, retry=FAST) as reg:
        assert push_blob(reg, "layerfs/app", desc_of(blob), source_of(blob)) == Outcome.UPLOADED
    assert proxy.drops == 1 and registry.uploads() == 2


def test_download_dropped_resumes_with_range(registry, proxy):
    blob = os.urandom(3_000_000)
    with client(registry.host) as reg:
        push_blob(reg, "layerfs/app", desc_of(blob), source_of(blob))
    proxy.add(DropRule("GET", "/blobs/sha256:", after=1_000_000, direction="down", times=2))
    with client(proxy.host, retry=FAST) as reg, BlobReader(reg, "layerfs/app", desc_of(blob)) as r:
        assert r.read() == blob
        assert r.resumes == 2
    gets = [s for m, p, s in registry.requests("GET", "/blobs/sha256:")]
    assert gets == [200, 206, 206]


def test_download_resumed_from_a_registry_that_ignores_range():
    """A server without Range support answers the resumed request with the whole blob:
    the client drops the bytes it already has and goes on."""
    blob = os.urandom(2_000_000)
    hostile = HostileRegistry({"/v2/": (200, {}, b"{}"), f"/v2/a/b/blobs/{sha(blob)}": (200, {}, blob)})
    proxy = DropProxy(hostile.server.server_address[1])
    proxy.add(DropRule("GET", "/blobs/", after=700_000, direction="down"))
    try:
        with client(proxy.host, retry=FAST) as reg, BlobReader(reg, "a/b", desc_of(blob)) as r:
            assert r.read() == blob and r.resumes == 1
    finally:
        proxy.close()
        hostile.close()


def test_download_that_keeps_failing_is_one_clear_error(registry, proxy):
    blob = os.urandom(500_000)
    with client(registry.host) as reg:
        push_blob(reg, "layerfs/app", desc_of(blob), source_of(blob))
    proxy.add(DropRule("GET", "/blobs/sha256:", after=0, direction="down", times=100))
    with client(proxy.host, retry=FAST) as reg, \
            pytest.raises(RegistryUnreachable, match=r"dropped .* while downloading blob sha256:.* \(6 attempts\)"):
        BlobReader(reg, "layerfs/app", desc_of(blob)).read()


def _restart_when(registry: RegistryServer, offset: int, down_for: float = 0.8):
    """A progress callback that kills the registry once ``offset`` bytes went by, and
    starts it again (same port, storage and secret) ``down_for`` seconds later."""
    fired = threading.Event()
    restarted = threading.Event()

    def restart() -> None:
        time.sleep(down_for)
        registry.start()
        restarted.set()

    def progress(pos: int) -> None:
        if pos >= offset and not fired.is_set():
            fired.set()
            registry.stop(kill=True)
            threading.Thread(target=restart, daemon=True).start()

    return progress, fired, restarted


def test_registry_killed_mid_upload_and_started_again(registry):
    big = os.urandom(4_500_000)
    progress, fired, restarted = _restart_when(registry, 1_500_000)
    with client(registry.host, chunk_size=1 << 20, monolithic_max=1 << 20, retry=PATIENT) as reg:
        assert push_blob(reg, "layerfs/app", desc_of(big), source_of(big), progress=progress) == Outcome.UPLOADED
    assert fired.is_set() and restarted.wait(10)
    with client(registry.host) as reg, BlobReader(reg, "layerfs/app", desc_of(big)) as r:
        assert r.read() == big


def test_registry_killed_mid_download_and_started_again(registry):
    blob = os.urandom(6_000_000)
    with client(registry.host) as reg:
        push_blob(reg, "layerfs/app", desc_of(blob), source_of(blob))
    progress, fired, restarted = _restart_when(registry, 1_000_000)
    with client(registry.host, retry=PATIENT) as reg:
        with BlobReader(reg, "layerfs/app", desc_of(blob), progress=progress) as r:
            data = r.read()
            assert r.resumes >= 1
    assert fired.is_set() and data == blob


def test_5xx_answers_are_retried(registry, proxy):
    """A front proxy answering 503 while its backend restarts: the client waits and retries."""
    image = random_image(1)
    with client(registry.host) as reg:
        push_image(reg, "layerfs/app", "v1", image)
    proxy.add(DropRule("GET", "/manifests/", after=0, respond=503, times=2))
    proxy.add(DropRule("GET", "/blobs/sha256:", after=0, respond=502, times=2))
    with client(proxy.host, retry=FAST) as reg:
        assert pull_blobs(reg, "layerfs/app", "v1")[2] == image.layers
    assert proxy.answered == 4
    proxy.add(DropRule("GET", "/manifests/", after=0, respond=503, times=100))
    with client(proxy.host, retry=FAST) as reg, \
            pytest.raises(RegistryError, match="failed: 503 .*UNAVAILABLE: backend restarting"):
        reg.get_manifest("layerfs/app", "v1")


# -- authentication --------------------------------------------------------------------


def test_basic_auth(basic_registry):
    image = random_image(1)
    with client(basic_registry.host) as reg, \
            pytest.raises(AuthenticationRequired, match="requires a user name and password"):
        push_image(reg, "layerfs/app", "v1", image)
    with client(basic_registry.host, Credentials("alice", "wrong")) as reg, \
            pytest.raises(AuthenticationRequired, match="refused the credentials of 'alice'"):
        push_image(reg, "layerfs/app", "v1", image)
    with client(basic_registry.host, Credentials("alice", "s3cret")) as reg:
        push_image(reg, "layerfs/app", "v1", image)
        assert pull_blobs(reg, "layerfs/app", "v1")[2] == image.layers


def test_bearer_tokens_from_the_challenge(token_registry):
    srv, tokens = token_registry
    image = random_image(2)
    with client(srv.host, Credentials("alice", "s3cret")) as reg:
        push_image(reg, "team/app", "v1", image)
        assert pull_blobs(reg, "team/app", "v1")[2] == image.layers
        # One token per scope set, reused for every request that needs it.
        assert reg.auth.token_requests == 2
    assert {r["user"] for r in tokens.requests} == {"alice"}
    # Anonymous may pull (this service grants it), not push.
    with client(srv.host) as reg:
        assert pull_blobs(reg, "team/app", "v1")[1] == image.config
        with pytest.raises(AuthenticationRequired, match="requires authentication"):
            push_image(reg, "team/other", "v1", image)
    with client(srv.host, Credentials("bob", "b0b")) as reg, \
            pytest.raises(AccessDenied, match="not allowed for the credentials of 'bob'"):
        push_image(reg, "team/bob", "v1", random_image(1))
    with client(srv.host, Credentials("alice", "nope")) as reg, \
            pytest.raises(AuthenticationRequired, match="token service .* refused the credentials of 'alice'"):
        reg.get_manifest("team/app", "v1")


def test_bearer_mount_asks_for_pull_on_the_source(token_registry):
    srv, tokens = token_registry
    image = random_image(1)
    with client(srv.host, Credentials("alice", "s3cret")) as reg:
        push_image(reg, "team/base", "v1", image)
        assert push_image(reg, "team/app", "v1", image, mount_from=["team/base"]) == [Outcome.MOUNTED] * 2
    assert any(sorted(r["scope"]) == ["repository:team/app:pull,push", "repository:team/base:pull"]
               for r in tokens.requests)


# -- credentials ---------------------------------------------------------------------


def _auth_entry(user: str, password: str) -> dict:
    return {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_credentials_from_files(tmp_path, monkeypatch, basic_registry):
    docker_dir = tmp_path / "docker"
    docker_dir.mkdir()
    (docker_dir / "config.json").write_text(json.dumps(
        {"auths": {f"http://{basic_registry.host}/v1/": _auth_entry("alice", "s3cret"),
                   "https://index.docker.io/v1/": _auth_entry("hub", "hubpw")}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(docker_dir))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    ref = Reference.parse(f"{basic_registry.host}/layerfs/app:v1")
    creds = find_credentials(ref.registry, ref.repository)
    assert (creds.username, creds.password) == ("alice", "s3cret") and "config.json" in creds.source
    assert find_credentials("docker.io", "library/debian").username == "hub"
    with Registry.for_reference(ref, timeout=TIMEOUT) as reg:
        push_image(reg, ref.repository, "v1", random_image(1))
    # $REGISTRY_AUTH_FILE comes first, and its most specific namespace wins.
    auth_file = tmp_path / "auth.json"
    auth_file.write_text(json.dumps({"auths": {
        basic_registry.host: _auth_entry("alice", "wrong"),
        f"{basic_registry.host}/layerfs": _auth_entry("alice", "s3cret")}}))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth_file))
    assert find_credentials(ref.registry, "layerfs/app").source == str(auth_file)
    assert find_credentials(ref.registry, "layerfs/app").password == "s3cret"
    assert find_credentials(ref.registry, "other/app").password == "wrong"
    auth_file.write_text("{not json")
    with pytest.raises(RegistryError, match="cannot read credentials from .*auth.json"):
        find_credentials(ref.registry, "layerfs/app")


def test_credential_helper(tmp_path, monkeypatch, basic_registry):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    helper = bindir / "docker-credential-layerfstest"
    helper.write_text("#!/bin/sh\nread server\n"
                      f'if [ "$server" = "{basic_registry.host}" ]; then '
                      'echo \'{"ServerURL":"x","Username":"alice","Secret":"s3cret"}\'; '
                      'else echo "credentials not found in native keychain"; exit 1; fi\n')
    helper.chmod(0o755)
    (tmp_path / "config.json").write_text(json.dumps({"credsStore": "layerfstest"}))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    creds = find_credentials(basic_registry.host, "layerfs/app")
    assert creds.username == "alice" and creds.source == "docker-credential-layerfstest"
    assert find_credentials("other.example:5000", "a/b") is None  # the helper knows nothing: anonymous
    with Registry.for_reference(Reference.parse(f"{basic_registry.host}/layerfs/app"), timeout=TIMEOUT) as reg:
        push_image(reg, "layerfs/app", "v1", random_image(1))


# -- plain http and TLS ------------------------------------------------------------------


def _external_address() -> str | None:
    """An address of this machine that is not loopback (where plain http needs --insecure)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent for a UDP connect
            addr = s.getsockname()[0]
    except OSError:
        return None
    return None if addr.startswith("127.") else addr


def test_plain_http_only_with_insecure_off_loopback(tmp_path):
    addr = _external_address()
    if addr is None:
        pytest.skip("this machine has no non-loopback address")
    srv = RegistryServer(str(tmp_path / "reg"), bind=addr).start()
    try:
        image = random_image(1)
        with client(srv.host) as reg, pytest.raises(RegistryUnreachable, match="use --insecure"):
            push_image(reg, "layerfs/app", "v1", image)
        with client(srv.host, insecure=True) as reg:
            push_image(reg, "layerfs/app", "v1", image)
            assert reg.transport.scheme == "http"
    finally:
        srv.stop()


def test_tls_registry_needs_a_trusted_certificate(tmp_path, monkeypatch):
    addr = _external_address()
    if addr is None or OPENSSL is None:
        pytest.skip("needs a non-loopback address and openssl")
    cert, key = str(tmp_path / "reg.crt"), str(tmp_path / "reg.key")
    self_signed(cert, key, "layerfs test registry", ip=addr)
    srv = RegistryServer(str(tmp_path / "reg"), bind=addr, tls=(cert, key)).start()
    try:
        with client(srv.host) as reg, pytest.raises(RegistryUnreachable, match="certificate is not trusted"):
            reg.get_manifest("a/b", "v1")
        monkeypatch.setenv("SSL_CERT_FILE", cert)  # how a user trusts a private CA
        image = random_image(1)
        with client(srv.host) as reg:
            push_image(reg, "layerfs/app", "v1", image)
            assert reg.transport.scheme == "https"
            assert pull_blobs(reg, "layerfs/app", "v1")[2] == image.layers
    finally:
        srv.stop()


def test_loopback_tries_tls_first(tmp_path):
    if OPENSSL is None:
        pytest.skip("needs openssl")
    cert, key = str(tmp_path / "reg.crt"), str(tmp_path / "reg.key")
    self_signed(cert, key, "localhost")
    srv = RegistryServer(str(tmp_path / "reg"), tls=(cert, key)).start()
    try:
        # As docker does for loopback registries: TLS when it is served, certificate unchecked.
        with client(srv.host) as reg:
            push_image(reg, "layerfs/app", "v1", random_image(1))
            assert reg.transport.scheme == "https"
    finally:
        srv.stop()


def test_references():
    r = Reference.parse("localhost:5000/app:v2")
    assert (r.registry, r.repository, r.tag, r.digest) == ("localhost:5000", "app", "v2", None)
    r = Reference.parse("debian")
    assert (r.registry, api_host(r.registry), r.repository, r.tag, r.name) == \
        ("docker.io", "registry-1.docker.io", "library/debian", "latest", "debian")
    d = "sha256:" + "a" * 64
    r = Reference.parse(f"ghcr.io/org/tool@{d}")
    assert (r.tag, r.digest, r.manifest_ref) == (None, d, d)
    for bad in ("UPPER/case", "host:5000/app@sha256:short", "a//b", ""):
        with pytest.raises(Exception, match="invalid reference"):
            Reference.parse(bad)
