"""Interop with the real tools: images built with umoci (several layers: deletions, a
renamed file and directory, setuid, hard links, an absolute symlink, other owners),
turned into a docker archive by skopeo; layerfs loads each, and its merged tree (from
the index and through a mount) equals umoci unpack's rootfs. layerfs save goes back out
to umoci, skopeo and podman, and podman save comes back in, with equal image ids."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile

import pytest

from helpers import full_tree_of_dir, full_tree_of_image, tree_differences

TOOLS = ("umoci", "skopeo")
pytestmark = [
    pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS),
                       reason="needs umoci and skopeo (apt-get install umoci skopeo)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="umoci unpack keeps owners only as root"),
]


def run(*cmd: str, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, timeout=300, **kw)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed: {proc.stderr.decode()[-2000:]}")
    return proc


def _layer(layout: str, work: str, base: str, tag: str, change) -> None:
    """umoci unpack ``base``, let ``change`` edit the rootfs, repack it as ``tag``."""
    bundle = os.path.join(work, f"bundle-{tag}")
    run("umoci", "unpack", "--image", f"{layout}:{base}", bundle)
    change(os.path.join(bundle, "rootfs"))
    run("umoci", "repack", "--image", f"{layout}:{tag}", bundle)
    shutil.rmtree(bundle)


def _base(r: str) -> None:
    for d in ("bin", "etc", "usr/bin", "srv/old", "var/lib/gone", "data"):
        os.makedirs(os.path.join(r, d), exist_ok=True)
    with open(f"{r}/bin/tool", "w") as f:
        f.write("#!/bin/sh\necho tool\n")
    os.chmod(f"{r}/bin/tool", 0o755)
    os.link(f"{r}/bin/tool", f"{r}/bin/tool-link")
    os.link(f"{r}/bin/tool", f"{r}/usr/bin/tool-hard")
    shutil.copy("/bin/busybox", f"{r}/bin/su-tool") if os.path.exists("/bin/busybox") else \
        open(f"{r}/bin/su-tool", "wb").write(os.urandom(70_000))
    os.chmod(f"{r}/bin/su-tool", 0o4755)
    os.symlink("/bin/tool", f"{r}/usr/bin/tool")  # absolute: must not leave the image
    for name, data in (("etc/motd", "welcome\n"), ("etc/rename-me", "renamed content\n"),
                       ("srv/old/a", "a\n"), ("var/lib/gone/x", "x\n"), ("etc/secret", "s3cret\n")):
        with open(f"{r}/{name}", "w") as f:
            f.write(data)
    os.chmod(f"{r}/etc/secret", 0o600)
    os.chown(f"{r}/data", 1000, 1000)
    with open(f"{r}/data/owned", "wb") as f:
        f.write(os.urandom(200_000))
    os.chown(f"{r}/data/owned", 1000, 1001)
    os.mkfifo(f"{r}/data/fifo")


def _update(r: str) -> None:
    os.unlink(f"{r}/etc/motd")  # deleted
    os.rename(f"{r}/etc/rename-me", f"{r}/etc/renamed")  # renamed file
    os.rename(f"{r}/srv/old", f"{r}/srv/new")  # renamed directory
    shutil.rmtree(f"{r}/var/lib/gone")  # deleted directory
    with open(f"{r}/bin/tool", "a") as f:  # changes every name of the hard-linked file
        f.write("echo v2\n")


def _top(r: str) -> None:
    os.makedirs(f"{r}/var/lib/gone")  # recreated where a directory was deleted
    with open(f"{r}/var/lib/gone/new", "w") as f:
        f.write("new\n")
    os.chmod(f"{r}/etc/secret", 0o640)  # metadata only
    os.unlink(f"{r}/bin/tool-link")  # one name of a hard-link group


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """An OCI layout with a three-layer image tagged v3, its config set by umoci, the
    same image as a docker archive (skopeo), and umoci's own unpacked rootfs of it."""
    work = str(tmp_path_factory.mktemp("umoci"))
    layout = os.path.join(work, "layout")
    run("umoci", "init", "--layout", layout)
    run("umoci", "new", "--image", f"{layout}:empty")
    _layer(layout, work, "empty", "v1", _base)
    _layer(layout, work, "v1", "v2", _update)
    _layer(layout, work, "v2", "v3", _top)
    run("umoci", "config", "--image", f"{layout}:v3", "--config.env", "GREETING=hello",
        "--config.cmd", "/bin/tool", "--config.workingdir", "/srv", "--config.label", "org.example=yes",
        "--author", "interop test")
    for tag in ("empty", "v1", "v2"):
        run("umoci", "rm", "--image", f"{layout}:{tag}")
    run("skopeo", "copy", "-q", f"oci:{layout}:v3", f"docker-archive:{work}/docker.tar:interop/app:v3")
    rootfs_bundle = os.path.join(work, "reference")
    run("umoci", "unpack", "--image", f"{layout}:v3", rootfs_bundle)
    index = json.load(open(os.path.join(layout, "index.json")))
    manifest = json.load(open(os.path.join(layout, "blobs", "sha256",
                                           index["manifests"][0]["digest"].split(":")[1])))
    config_digest = manifest["config"]["digest"]
    assert len(manifest["layers"]) == 3
    return {"layout": layout, "docker": f"{work}/docker.tar", "rootfs": f"{rootfs_bundle}/rootfs",
            "image_id": config_digest, "work": work}


def hardlink_groups(root: str) -> set[frozenset[str]]:
    by_inode: dict[int, set[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            if st.st_nlink > 1:
                by_inode.setdefault(st.st_ino, set()).add(os.path.relpath(full, root))
    return {frozenset(g) for g in by_inode.values()}


def test_load_umoci_layout_and_skopeo_archive(built, layerfs, store, tmp_path):
    out = layerfs("load", built["layout"], check=True).stdout.decode()
    assert f"Loaded image ID: {built['image_id']}" in out and "Loaded image: v3:latest" in out
    expected = full_tree_of_dir(built["rootfs"])
    assert tree_differences(expected, full_tree_of_image(store, "v3:latest")) == []
    assert expected["bin/su-tool"][1] == 0o4755 and expected["etc/secret"][1] == 0o640  # the tree is rich
    # skopeo's docker archive of the same image: the same config, so the same id
    out = layerfs("load", built["docker"], check=True).stdout.decode()
    assert f"Loaded image ID: {built['image_id']}" in out and "interop/app:v3" in out
    cfg = json.loads(layerfs("inspect", "interop/app:v3", "--config", check=True).stdout)
    assert cfg["config"]["Env"][-1] == "GREETING=hello" and cfg["config"]["Labels"] == {"org.example": "yes"}


@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse")
def test_mounted_tree_equals_umoci_rootfs(built, layerfs, tmp_path):
    layerfs("load", built["docker"], check=True)
    mnt = str(tmp_path / "mnt")
    os.makedirs(mnt)
    layerfs("mount", "--read-only", "interop/app:v3", mnt, check=True)
    try:
        assert tree_differences(full_tree_of_dir(built["rootfs"]), full_tree_of_dir(mnt)) == []
        groups = hardlink_groups(built["rootfs"])
        assert frozenset({"bin/tool", "usr/bin/tool-hard"}) in groups
        assert hardlink_groups(mnt) == groups
        assert os.readlink(os.path.join(mnt, "usr/bin/tool")) == "/bin/tool"
    finally:
        layerfs("umount", mnt)


def test_save_goes_to_umoci_and_skopeo(built, layerfs, tmp_path):
    layerfs("load", built["layout"], check=True)
    out_dir = str(tmp_path / "saved")
    layerfs("save", "v3", "-o", out_dir, "--format", "oci-dir", check=True)
    run("umoci", "unpack", "--image", f"{out_dir}:v3:latest", str(tmp_path / "unpacked"))
    assert tree_differences(full_tree_of_dir(built["rootfs"]),
                            full_tree_of_dir(str(tmp_path / "unpacked" / "rootfs"))) == []
    assert hardlink_groups(str(tmp_path / "unpacked" / "rootfs")) == hardlink_groups(built["rootfs"])
    archive = str(tmp_path / "saved.tar")
    layerfs("save", "v3", "-o", archive, "--compress", "zstd", check=True)
    info = json.loads(run("skopeo", "inspect", f"oci-archive:{archive}").stdout)
    assert info["Labels"] == {"org.example": "yes"} and "GREETING=hello" in info["Env"]
    raw = run("skopeo", "inspect", "--raw", "--config", f"oci-archive:{archive}").stdout
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == built["image_id"]
    run("skopeo", "copy", "-q", f"oci-archive:{archive}", f"dir:{tmp_path}/copied")
    # The layers loaded from umoci's tarballs leave with their original diff_ids.
    original = json.loads(run("skopeo", "inspect", f"oci:{built['layout']}:v3", "--config").stdout)
    again = json.loads(run("skopeo", "inspect", f"oci-archive:{archive}", "--config").stdout)
    assert again["rootfs"]["diff_ids"] == original["rootfs"]["diff_ids"]


@pytest.fixture
def podman(tmp_path):
    if shutil.which("podman") is None:
        pytest.skip("needs podman (apt-get install podman crun)")
    run_root = tempfile.mkdtemp(prefix="lfpod", dir="/tmp")  # podman wants it under 50 characters
    base = ["podman", "--root", str(tmp_path / "podman-root"), "--runroot", run_root,
            "--storage-driver", "vfs", "--events-backend", "none", "--cgroup-manager", "cgroupfs"]

    def call(*args: str) -> subprocess.CompletedProcess:
        return run(*base, *args, env=dict(os.environ, TMPDIR=str(tmp_path)))
    yield call
    subprocess.run([*base, "system", "reset", "--force"], capture_output=True, timeout=120)
    shutil.rmtree(run_root, ignore_errors=True)


def test_podman_loads_layerfs_save_and_back(built, layerfs, podman, tmp_path):
    layerfs("load", built["docker"], check=True)
    for fmt in ("docker", "oci"):
        archive = str(tmp_path / f"to-podman-{fmt}.tar")
        layerfs("save", "interop/app:v3", "-o", archive, "--format", fmt, check=True)
        podman("load", "-q", "-i", archive)
        pid = podman("image", "inspect", "--format", "{{.Id}}", "interop/app:v3").stdout.decode().strip()
        assert "sha256:" + pid == built["image_id"]
        podman("rmi", "-f", "interop/app:v3")
    podman("load", "-q", "-i", str(tmp_path / "to-podman-docker.tar"))
    back = str(tmp_path / "from-podman.tar")
    podman("save", "-q", "-o", back, "interop/app:v3")
    out = layerfs("load", back, "-t", "back:1", root=str(tmp_path / "s2"), check=True).stdout.decode()
    assert f"Loaded image ID: {built['image_id']}" in out
