"""The README's first command: ``layerfs demo`` on an image built from this machine's
Debian packages. It must work, run real software, and leave nothing behind but its
one tagged image, however often it runs."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tarfile

import pytest

from layerfs.store import sample

pytestmark = pytest.mark.skipif(shutil.which("dpkg-query") is None, reason="needs a Debian machine")


def _members(tar: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        return {os.path.normpath(m.name): m for m in tf.getmembers()}


def test_package_layer_from_installed_files(monkeypatch, tmp_path):
    """Without the .deb in apt's cache, the layer is made of the installed files."""
    monkeypatch.setattr(sample, "APT_CACHE", str(tmp_path))
    tar, how = sample.package_layer("busybox-static")
    assert how.startswith("dpkg -L busybox-static")
    members = _members(tar)
    with open("/bin/busybox", "rb") as f:
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(
            tarfile.open(fileobj=io.BytesIO(tar)).extractfile("./bin/busybox").read()).digest()
    assert members["bin/busybox"].mode == 0o755
    assert sample.package_layer("busybox-static") == (tar, how)  # the same bytes every time


def test_package_layer_from_the_cached_deb():
    version, arch = sample._dpkg_query("busybox-static")
    deb = os.path.join(sample.APT_CACHE, f"busybox-static_{version.replace(':', '%3a')}_{arch}.deb")
    if not os.path.exists(deb):
        pytest.skip("apt's cache no longer has the busybox-static .deb")
    tar, how = sample.package_layer("busybox-static")
    assert how.startswith("dpkg-deb --fsys-tarfile")
    assert "bin/busybox" in _members(tar)


def test_missing_package_is_one_clear_error(monkeypatch, tmp_path):
    from layerfs.store import StoreError

    monkeypatch.setattr(sample, "PACKAGES", ("no-such-package-layerfs",))
    with pytest.raises(StoreError, match="apt-get install"):
        sample.write_demo_layout(str(tmp_path / "lay"))


@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse")
def test_demo_runs_twice_and_cleans_up(layerfs):
    for _ in range(2):
        proc = layerfs("demo")
        out = proc.stdout.decode()
        assert proc.returncode == 0, proc.stderr.decode() + out
        image_id = re.search(r"Loaded image ID: sha256:([0-9a-f]{64})", out).group(1)
        assert f"\n{image_id}  -\n" in out  # sha256sum of the config is the image id
        if os.geteuid() == 0:
            assert "hello from a layerfs container: Debian" in out
        assert "(same)" in out  # the saved image loads back with the same id
        images = json.loads(layerfs("images", "--json", check=True).stdout)
        assert [(i["id"], i["tags"]) for i in images] == [("sha256:" + image_id, ["layerfs-demo:latest"])]
        assert json.loads(layerfs("ps", "--json", check=True).stdout) == []
    with open("/proc/self/mountinfo") as f:
        assert "layerfs-demo-" not in f.read()
