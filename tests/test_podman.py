"""podman (Debian's podman 4.3 with crun) using fuse-layerfs as its overlay mount program.

Each test runs podman with its own --root and --runroot in a temporary directory and
``--storage-opt overlay.mount_program=<the venv's fuse-layerfs>``, so containers/storage
starts fuse-layerfs exactly as it starts fuse-overlayfs: lowers as symlinks
(``overlay/l/SHORTID -> ../ID/diff``), options with empty items, its own directory as the
working directory. The image is made here (``podman import`` of a busybox rootfs tar, no
registry). What is checked is what a podman user sees: create, mount, write, diff,
commit, and the committed image mounted again holds the container's tree.

``podman run``/``start`` need crun to set the container's rlimits, which a sandbox
without CAP_SYS_RESOURCE refuses ("setrlimit RLIMIT_NPROC: Operation not permitted");
that test skips with crun's message there and runs everywhere else.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import tempfile
import time

import pytest

from helpers import tree_and_links, tree_differences
from unionrunner import FUSE_LAYERFS, force_umount, fuse_layerfs_pids

BUSYBOX = "/bin/busybox"


def _mounts_below(path: str) -> list[str]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mnt = line.split()[4].encode().decode("unicode_escape")
            if mnt == path or mnt.startswith(path + "/"):
                out.append(mnt)
    return sorted(out, key=len, reverse=True)


def _fstype(path: str) -> str:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4].encode().decode("unicode_escape") == path:
                return fields[fields.index("-") + 1]
    return ""


class Podman:
    """podman with a private store, graph driver overlay and fuse-layerfs as mount program."""

    def __init__(self, base: str) -> None:
        self.root = os.path.join(base, "root")
        self.runroot = os.path.join(base, "runroot")
        self.base = base

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = ["podman", "--root", self.root, "--runroot", self.runroot, "--storage-driver", "overlay",
               "--storage-opt", f"overlay.mount_program={FUSE_LAYERFS}", "--cgroup-manager", "cgroupfs",
               "--events-backend", "none", *args]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if check and res.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
        return res

    def container_diff(self, name: str) -> set[str]:
        """The lines of ``podman container diff NAME``.

        Not ``podman diff NAME``: podman 4.3 looks NAME up as an image first, and the
        start of an image's ID is an image name too. A container named "c2" was diffed
        as the image whose (random) ID began with "c2": every file "A", about one run
        in a hundred."""
        return set(self("container", "diff", name).stdout.split("\n")) - {""}

    def cleanup(self) -> None:
        """Unmount and remove everything; no mount or server may stay behind."""
        for args in (("umount", "-a"), ("image", "umount", "-a"), ("rm", "-af"), ("rmi", "-af")):
            with contextlib.suppress(Exception):
                self(*args, check=False)
        pids = fuse_layerfs_pids_below(self.base)
        for mnt in _mounts_below(self.base):
            force_umount(mnt)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)


def fuse_layerfs_pids_below(base: str) -> list[int]:
    return sorted({pid for mnt in _mounts_below(base) for pid in fuse_layerfs_pids(mnt)})


def _rootfs(path: str) -> str:
    """A small busybox rootfs with what a diff and a commit must carry."""
    for d in ("bin", "etc", "tmp", "data/dir/nested", "data/rename-dir/sub"):
        os.makedirs(os.path.join(path, d))
    shutil.copy2(BUSYBOX, os.path.join(path, "bin/busybox"))
    for applet in ("sh", "cat", "ls", "echo", "touch"):
        os.symlink("busybox", os.path.join(path, "bin", applet))
    files = {"etc/passwd": "root:x:0:0:root:/root:/bin/sh\n", "etc/group": "root:x:0:\n",
             "data/keep": "keep\n", "data/rm-me": "remove me\n", "data/chmod-me": "mode\n",
             "data/secret": "0600 of uid 1000\n", "data/hl1": "linked\n",
             "data/dir/nested/file": "nested\n", "data/rename-dir/a": "a\n",
             "data/rename-dir/sub/b": "b\n"}
    for rel, text in files.items():
        with open(os.path.join(path, rel), "w") as f:
            f.write(text)
    os.chmod(os.path.join(path, "tmp"), 0o1777)
    os.chmod(os.path.join(path, "data/secret"), 0o600)
    os.chown(os.path.join(path, "data/secret"), 1000, 1000)
    os.link(os.path.join(path, "data/hl1"), os.path.join(path, "data/hl2"))
    os.symlink("keep", os.path.join(path, "data/link"))
    return path


@pytest.fixture
def podman(tmp_path):
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("needs root and /dev/fuse")
    missing = [p for p in ("podman", "crun", "fusermount3") if shutil.which(p) is None]
    if missing or not os.path.exists(BUSYBOX):
        pytest.skip(f"needs {' '.join(missing) or 'busybox-static'} (apt-get install podman crun busybox-static)")
    # podman refuses a runroot path longer than 50 characters: a short directory of its own.
    short = tempfile.mkdtemp(prefix="lfpod-", dir="/tmp")
    p = Podman(short)
    rootfs = _rootfs(str(tmp_path / "rootfs"))
    subprocess.run(["tar", "--numeric-owner", "-C", rootfs, "-cf", str(tmp_path / "rootfs.tar"), "."],
                   check=True)
    try:
        p("import", str(tmp_path / "rootfs.tar"), "localhost/layerfs-test:base")
        yield p
    finally:
        p.cleanup()
        left = _mounts_below(str(tmp_path)) + _mounts_below(short)
        if not left:
            shutil.rmtree(short, ignore_errors=True)
        assert not left, f"mounts left behind: {left}"


def _change(m: str) -> None:
    """What a container does: add, modify, remove, chmod, rename a lower directory, write
    through a hard link."""
    with open(os.path.join(m, "data/new"), "w") as f:
        f.write("added\n")
    with open(os.path.join(m, "data/keep"), "a") as f:
        f.write("changed\n")
    os.unlink(os.path.join(m, "data/rm-me"))
    os.makedirs(os.path.join(m, "data/newdir"))
    with open(os.path.join(m, "data/newdir/f"), "w") as f:
        f.write("in a new dir\n")
    os.chmod(os.path.join(m, "data/chmod-me"), 0o600)
    os.rename(os.path.join(m, "data/rename-dir"), os.path.join(m, "data/renamed"))
    with open(os.path.join(m, "data/hl1"), "a") as f:
        f.write("through one name\n")


def test_create_mount_write_diff_commit(podman, tmp_path):
    podman("create", "--name", "c1", "localhost/layerfs-test:base", "/bin/sh")
    m = podman("mount", "c1").stdout.strip()
    assert _fstype(m) == "fuse.fuse-layerfs", "podman did not mount through fuse-layerfs"
    # (times left out: podman import keeps whole seconds only)
    expected, links = tree_and_links(str(tmp_path / "rootfs"), mtimes=False)
    got, got_links = tree_and_links(m, mtimes=False)
    assert not tree_differences(expected, got), tree_differences(expected, got)[:20]
    assert got_links == links == [("data/hl1", "data/hl2")]

    _change(m)
    assert open(os.path.join(m, "data/hl2")).read() == "linked\nthrough one name\n"
    container_tree = tree_and_links(m, mtimes=False)

    diff = podman.container_diff("c1")
    for line in ("A /data/new", "C /data/keep", "D /data/rm-me", "A /data/newdir", "A /data/newdir/f",
                 "C /data/chmod-me", "D /data/rename-dir", "A /data/renamed", "A /data/renamed/a",
                 "A /data/renamed/sub/b", "C /data/hl1"):
        assert line in diff, f"{line!r} missing from podman diff: {sorted(diff)}"
    for unchanged in ("/bin/busybox", "/data/secret", "/data/link", "/etc/passwd", "/data/dir/nested/file"):
        assert not any(line.endswith(" " + unchanged) for line in diff), (unchanged, sorted(diff))

    podman("commit", "-q", "c1", "localhost/layerfs-test:committed")
    podman("umount", "c1")
    deadline = time.monotonic() + 10
    while fuse_layerfs_pids(m) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not fuse_layerfs_pids(m), "the container's server outlived podman umount"
    im = podman("image", "mount", "localhost/layerfs-test:committed").stdout.strip()
    assert _fstype(im) == "fuse.fuse-layerfs"
    image_tree = tree_and_links(im, mtimes=False)
    assert not tree_differences(container_tree[0], image_tree[0]), \
        tree_differences(container_tree[0], image_tree[0])[:20]
    assert image_tree[1] == container_tree[1]
    with pytest.raises(OSError):
        open(os.path.join(im, "data/new"), "a")  # an image mount is read-only

    # A new container of the committed image starts from that tree, and mounts again.
    podman("create", "--name", "c2", "localhost/layerfs-test:committed", "/bin/sh")
    m2 = podman("mount", "c2").stdout.strip()
    assert not tree_differences(container_tree[0], tree_and_links(m2, mtimes=False)[0])
    assert podman.container_diff("c2") == set()


def test_container_named_like_the_start_of_an_image_id(podman):
    """The diff of a container whose name begins an image's ID is the container's own
    (podman diff would show that image instead, every file of it "A")."""
    image_id = podman("image", "inspect", "--format", "{{.Id}}", "localhost/layerfs-test:base").stdout.strip()
    name = image_id[:2]
    podman("create", "--name", name, "localhost/layerfs-test:base", "/bin/sh")
    m = podman("mount", name).stdout.strip()
    with open(os.path.join(m, "data/new"), "w") as f:
        f.write("added\n")
    assert podman.container_diff(name) == {"C /data", "A /data/new"}


def test_container_layer_reads_back_in_the_kernel_overlay(podman, tmp_path):
    """The container's layer that fuse-layerfs wrote (containers/storage's diff directory)
    is an overlay upper: the kernel's overlayfs over it and the image's layer shows the
    tree the container saw."""
    podman("create", "--name", "c1", "localhost/layerfs-test:base", "/bin/sh")
    m = podman("mount", "c1").stdout.strip()
    _change(m)
    container_tree = tree_and_links(m, mtimes=False)
    podman("umount", "c1")
    data = podman("inspect", "c1", "--format", "{{.GraphDriver.Data.UpperDir}} {{.GraphDriver.Data.LowerDir}}")
    upper, lowers = data.stdout.split()
    kmnt, kwork = tmp_path / "kernel", tmp_path / "kwork"
    kmnt.mkdir()
    kwork.mkdir()
    # The kernel reads the container's upper as its top lower layer (nothing is written).
    res = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                          f"lowerdir={upper}:{lowers},redirect_dir=follow,metacopy=on", str(kmnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"the kernel's overlay cannot be mounted here: {res.stderr.strip()}")
    try:
        got = tree_and_links(str(kmnt), mtimes=False)
    finally:
        force_umount(str(kmnt))
    diff = tree_differences(container_tree[0], got[0])
    assert not diff, "the kernel reads another tree from the container's layer:\n" + "\n".join(diff[:20])


def test_podman_run(podman, tmp_path):
    """A container process writes through the mount; its write is in the container."""
    res = podman("run", "--name", "r1", "--network", "none", "localhost/layerfs-test:base",
                 "/bin/sh", "-c", "echo from-run > /data/run && cat /data/keep /data/hl2", check=False)
    if res.returncode != 0 and "setrlimit" in res.stderr and "Operation not permitted" in res.stderr:
        pytest.skip(f"crun cannot set rlimits in this sandbox: {res.stderr.strip()}")
    assert res.returncode == 0, res.stderr
    assert res.stdout == "keep\nlinked\n"
    m = podman("mount", "r1").stdout.strip()
    assert open(os.path.join(m, "data/run")).read() == "from-run\n"
    assert stat.S_ISREG(os.lstat(os.path.join(m, "data/run")).st_mode)
