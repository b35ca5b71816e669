"""The container `mount IMAGE` makes: named when it is made, shown by ps, removed by
prune once unmounted, and by umount itself with --rm; a named container is never taken."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from helpers import assert_one_line_error, make_tar

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse")

KEEPS = "; it keeps its changes after umount (layerfs rm or layerfs prune removes it)\n"


@pytest.fixture
def image(layerfs, tmp_path) -> str:
    tar = make_tar(str(tmp_path / "app.tar"), [("etc", "d"), ("etc/hostname", "f", "app\n")])
    layerfs("import-layer", tar, "-t", "app:1", check=True)
    return "app:1"


def _ps(layerfs) -> dict[str, dict]:
    return {c["name"]: c for c in json.loads(layerfs("ps", "--json", check=True).stdout)}


def _containers_dir(store_root: str) -> list[str]:
    return sorted(os.listdir(os.path.join(store_root, "containers")))


def test_named_when_made_shown_by_ps_and_pruned_once_unmounted(layerfs, image, tmp_path, store_root):
    mnt = str(tmp_path / "mnt")
    os.mkdir(mnt)
    proc = layerfs("mount", image, mnt)
    assert proc.returncode == 0, proc.stderr
    try:
        cid = proc.stdout.decode().strip()
        name = f"layerfs-{cid[:12]}"
        assert proc.stderr.decode() == f"layerfs: made container {name} for {image}{KEEPS}"
        row = _ps(layerfs)[name]
        assert (row["id"], row["state"], row["anonymous"], row["remove_at_umount"]) == (cid, "mounted", True, False)
        with open(os.path.join(mnt, "etc/changed"), "w") as f:
            f.write("a change\n")
        # mounted: prune leaves it
        assert "Deleted container" not in layerfs("prune", check=True).stdout.decode()
    finally:
        umount = layerfs("umount", mnt)
    assert umount.returncode == 0, umount.stderr
    assert umount.stderr.decode() == (f"layerfs: container {name} keeps its changes (layerfs commit, "
                                      "layerfs rm, or layerfs prune)\n")
    assert _ps(layerfs)[name]["state"] == "created"
    assert layerfs("diff", name, check=True).stdout.decode().splitlines() == ["C /etc", "A /etc/changed"]

    layerfs("create", image, "--name", "web", check=True)  # named: prune never takes it
    unnamed = layerfs("create", image, check=True).stdout.decode().strip()  # named by create
    dry = layerfs("prune", "--dry-run", check=True).stdout.decode().splitlines()
    assert dry[0] == f"Would delete container: {name}" and len(_ps(layerfs)) == 3
    out = layerfs("prune", check=True).stdout.decode().splitlines()
    assert out[0] == f"Deleted container: {name}"
    assert sorted(_ps(layerfs)) == sorted(["web", f"layerfs-{unnamed[:12]}"])
    assert cid not in _containers_dir(store_root)


def test_prune_frees_the_untagged_image_only_its_anonymous_container_kept(layerfs, tmp_path):
    tar = make_tar(str(tmp_path / "untagged.tar"), [("f", "f", "untagged\n")])
    image_id = layerfs("import-layer", tar, check=True).stdout.decode().strip()
    mnt = str(tmp_path / "mnt")
    os.mkdir(mnt)
    layerfs("mount", image_id, mnt, check=True)
    layerfs("umount", mnt, check=True)
    assert layerfs("images", "-q", check=True).stdout.decode().split() == [image_id]
    dry = json.loads(layerfs("prune", "--dry-run", "--json", check=True).stdout)
    assert len(dry["containers"]) == 1 and dry["images"] == [image_id] and len(dry["layers"]) == 1
    assert layerfs("images", "-q", check=True).stdout.decode().split() == [image_id]
    done = json.loads(layerfs("prune", "--json", check=True).stdout)
    assert done["containers"] == dry["containers"] and done["images"] == [image_id]
    assert layerfs("images", "-q", check=True).stdout == b"" and _ps(layerfs) == {}


def test_mount_rm_removes_the_container_at_umount(layerfs, image, tmp_path, store_root):
    mnt = str(tmp_path / "mnt")
    os.mkdir(mnt)
    proc = layerfs("mount", "--rm", image, mnt)
    assert proc.returncode == 0, proc.stderr
    cid = proc.stdout.decode().strip()
    try:
        assert proc.stderr.decode() == (f"layerfs: made container layerfs-{cid[:12]} for {image}; "
                                        "removed when the mount ends\n")
        assert _ps(layerfs)[f"layerfs-{cid[:12]}"]["remove_at_umount"] is True
        with open(os.path.join(mnt, "etc/new"), "w") as f:
            f.write("kept only by a commit\n")
        committed = layerfs("commit", cid, "-t", "app:2", check=True).stdout.decode().strip()
    finally:
        umount = layerfs("umount", mnt)
    assert umount.returncode == 0 and umount.stderr == b"", umount.stderr
    assert _ps(layerfs) == {} and _containers_dir(store_root) == []
    assert layerfs("cat", committed, "/etc/new", check=True).stdout == b"kept only by a commit\n"


def test_mount_rm_removes_it_when_unmounted_by_fusermount(layerfs, image, tmp_path, store_root):
    """However the mount ends, the serving process removes a --rm container."""
    mnt = str(tmp_path / "mnt")
    os.mkdir(mnt)
    layerfs("mount", "--rm", image, mnt, check=True)
    subprocess.run(["fusermount3", "-u", mnt], check=True)
    deadline = time.monotonic() + 20
    while _ps(layerfs):
        assert time.monotonic() < deadline, "the --rm container outlived its mount"
        time.sleep(0.05)
    assert _containers_dir(store_root) == []


def test_foreground_mount_rm(layerfs, image, tmp_path, store_root):
    mnt = str(tmp_path / "mnt")
    os.mkdir(mnt)
    exe = os.path.join(os.path.dirname(sys.executable), "layerfs")
    server = subprocess.Popen([exe, "mount", "-f", "--rm", image, mnt], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=dict(os.environ, LAYERFS_ROOT=store_root))
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(os.path.join(mnt, "etc/hostname")):
            assert server.poll() is None and time.monotonic() < deadline, server.stderr.read()
            time.sleep(0.05)
        assert [c["state"] for c in _ps(layerfs).values()] == ["mounted"]
    finally:
        layerfs("umount", mnt)
        out, err = server.communicate(timeout=30)
    assert server.returncode == 0, err
    # one line: its name; nothing of libfuse's start-up chatter, no traceback
    assert err.decode().startswith("layerfs: made container layerfs-") and err.decode().count("\n") == 1, err
    assert out == b""
    assert _ps(layerfs) == {} and _containers_dir(store_root) == []


def test_a_foreground_mount_that_fails_leaves_no_container(layerfs, image, tmp_path, store_root):
    mnt = str(tmp_path / "mnt")
    os.mkdir(mnt)
    # an option libfuse refuses: the mount fails inside fuse_main, after the container was made
    assert_one_line_error(layerfs("mount", "-f", image, mnt, "-o", "no_such_option"),
                          mentions=("the mount failed",))
    assert_one_line_error(layerfs("mount", image, mnt, "-o", "no_such_option"),
                          mentions=("the mount failed",))
    assert _ps(layerfs) == {} and _containers_dir(store_root) == []


def test_mount_rm_of_an_existing_container_is_refused(layerfs, image, tmp_path, store_root):
    cid = layerfs("create", image, "--name", "web", check=True).stdout.decode().strip()
    mnt = str(tmp_path / "mnt")
    os.mkdir(mnt)
    assert_one_line_error(layerfs("mount", "--rm", "web", mnt),
                          mentions=("--rm removes a container that mount makes from an image",))
    assert list(_ps(layerfs)) == ["web"] and _containers_dir(store_root) == [cid]


def test_read_only_view_leaves_nothing(layerfs, image, tmp_path, store_root):
    mnt = str(tmp_path / "mnt")
    os.mkdir(mnt)
    proc = layerfs("mount", "--read-only", image, mnt)
    assert proc.returncode == 0, proc.stderr
    try:
        assert proc.stderr.decode().endswith("; removed when the mount ends\n")
    finally:
        layerfs("umount", mnt, check=True)
    assert _ps(layerfs) == {} and _containers_dir(store_root) == []
