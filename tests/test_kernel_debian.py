"""A real Debian image on the kernel backend: apt-get installs and removes a package in a
chroot, and the commit holds exactly what apt and dpkg did.

The image is built here with ``debootstrap --variant=minbase bookworm`` (apt's package
cache as its cache: a minute here, longer where it must download) and imported as a
layer. The package is made here too, with dpkg-deb, so nothing else is downloaded.
Root only; skipped with the reason where debootstrap is missing or cannot reach a mirror.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from helpers import tree_and_links, tree_differences
from layerfs.unionfs import kernel

pytestmark = pytest.mark.skipif(kernel.unsupported() is not None, reason=kernel.unsupported() or "")

MIRROR = os.environ.get("LAYERFS_DEBIAN_MIRROR", "http://deb.debian.org/debian")


@pytest.fixture(scope="module")
def debian(tmp_path_factory):
    """(store root, image id) of a minbase bookworm image."""
    if shutil.which("debootstrap") is None:
        pytest.skip("needs debootstrap (apt-get install debootstrap)")
    base = tmp_path_factory.mktemp("debian")
    rootfs = str(base / "rootfs")
    res = subprocess.run(["debootstrap", "--variant=minbase", "--cache-dir=/var/cache/apt/archives", "bookworm",
                          rootfs, MIRROR], capture_output=True, text=True, timeout=1200)
    if res.returncode != 0:
        pytest.skip(f"debootstrap could not build bookworm from {MIRROR}: {res.stdout[-300:]}{res.stderr[-300:]}")
    store_root = str(base / "store")
    image = _layerfs(store_root, "import-dir", rootfs, "-t", "debian:bookworm").strip()
    shutil.rmtree(rootfs)
    return store_root, image


def _layerfs(store_root: str, *args: str) -> str:
    exe = os.path.join(os.path.dirname(sys.executable), "layerfs")
    res = subprocess.run([exe, *args], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, LAYERFS_ROOT=store_root))
    assert res.returncode == 0, f"layerfs {' '.join(args)}: {res.stderr}"
    return res.stdout


def _deb(where: str) -> str:
    """A small package: /usr/bin/layerfs-hello and its documentation directory."""
    pkg = os.path.join(where, "pkg")
    os.makedirs(os.path.join(pkg, "DEBIAN"))
    os.makedirs(os.path.join(pkg, "usr/bin"))
    os.makedirs(os.path.join(pkg, "usr/share/doc/layerfs-hello"))
    with open(os.path.join(pkg, "DEBIAN/control"), "w") as f:
        f.write("Package: layerfs-hello\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@example.org>\n"
                "Depends: coreutils\nDescription: a test package\n")
    with open(os.path.join(pkg, "usr/bin/layerfs-hello"), "w") as f:
        f.write("#!/bin/sh\necho hello from the kernel backend\n")
    os.chmod(os.path.join(pkg, "usr/bin/layerfs-hello"), 0o755)
    with open(os.path.join(pkg, "usr/share/doc/layerfs-hello/copyright"), "w") as f:
        f.write("public domain\n")
    out = os.path.join(where, "layerfs-hello_1.0_all.deb")
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", pkg, out], check=True, capture_output=True)
    return out


def _chroot(root: str, *argv: str) -> str:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"}
    res = subprocess.run(["chroot", root, *argv], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, f"{' '.join(argv)} in the chroot: {res.stdout[-2000:]}{res.stderr[-2000:]}"
    return res.stdout


def test_apt_get_in_a_chroot_of_a_kernel_backend_mount(debian, tmp_path):
    store_root, image = debian
    if shutil.which("dpkg-deb") is None:
        pytest.skip("needs dpkg-deb")
    mnt = str(tmp_path / "mnt")
    os.makedirs(mnt)
    cid = _layerfs(store_root, "mount", "--backend", "kernel", image, mnt).strip()
    try:
        assert json.loads(_layerfs(store_root, "inspect", cid))["backend"] == "kernel"
        shutil.copy(_deb(str(tmp_path)), os.path.join(mnt, "tmp"))
        out = _chroot(mnt, "apt-get", "install", "-y", "/tmp/layerfs-hello_1.0_all.deb")
        assert "Setting up layerfs-hello (1.0)" in out
        assert _chroot(mnt, "layerfs-hello") == "hello from the kernel backend\n"
        assert "Status: install ok installed" in _chroot(mnt, "dpkg", "-s", "layerfs-hello")
        _chroot(mnt, "apt-get", "check")
        _chroot(mnt, "apt-get", "remove", "-y", "layerfs-hello")
        assert not os.path.exists(os.path.join(mnt, "usr/bin/layerfs-hello"))
        _chroot(mnt, "apt-get", "install", "-y", "/tmp/layerfs-hello_1.0_all.deb")
        os.unlink(os.path.join(mnt, "tmp/layerfs-hello_1.0_all.deb"))
        seen = tree_and_links(mnt)
    finally:
        _layerfs(store_root, "umount", mnt)
    new = _layerfs(store_root, "commit", cid, "-t", "debian:hello").strip()
    diff = _layerfs(store_root, "diff", cid).splitlines()
    assert "A /usr/bin/layerfs-hello" in diff and "C /var/lib/dpkg/status" in diff
    check = str(tmp_path / "check")
    os.makedirs(check)
    _layerfs(store_root, "mount", "--read-only", new, check)  # read back through the fuse backend
    try:
        got = tree_and_links(check)
        assert tree_differences(seen[0], got[0]) == [] and seen[1] == got[1]
        assert _chroot(check, "layerfs-hello") == "hello from the kernel backend\n"
    finally:
        _layerfs(store_root, "umount", check)
