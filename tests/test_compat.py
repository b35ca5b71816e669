"""fuse-layerfs, the fuse-overlayfs compatible mount program: plain lower directories,
an upper in overlayfs's own format. The kernel's overlayfs is the oracle: it must read
the upper that fuse-layerfs wrote and show the same tree."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys

import pytest

BIN = os.path.dirname(sys.executable)
pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                                reason="needs root and /dev/fuse")


def _mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == os.path.realpath(path) for line in f)


def _umount(path: str) -> None:
    for cmd in (["fusermount3", "-u", path], ["umount", path], ["umount", "-l", path]):
        if not _mounted(path):
            return
        subprocess.run(cmd, capture_output=True)


def tree(root: str) -> dict:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            rel = os.path.relpath(full, root)
            if stat.S_ISREG(st.st_mode):
                out[rel] = ("f", stat.S_IMODE(st.st_mode), hashlib.sha256(open(full, "rb").read()).hexdigest())
            elif stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("d", stat.S_IMODE(st.st_mode))
            else:
                out[rel] = ("o", st.st_mode)
    return out


@pytest.fixture
def layers(tmp_path):
    """Two lower dirs with overlayfs markers, an upper, a work dir and mountpoints."""
    l1, l2 = tmp_path / "l1", tmp_path / "l2"
    for d in ("etc", "docs", "gone"):
        (l1 / d).mkdir(parents=True)
    (l1 / "etc/a").write_text("a from l1\n")
    (l1 / "etc/b").write_text("b from l1\n")
    (l1 / "docs/old").write_text("old doc\n")
    (l1 / "gone/x").write_text("x\n")
    (l1 / "top").write_text("top\n")
    os.symlink("etc/a", l1 / "link")
    (l2 / "etc").mkdir(parents=True)
    (l2 / "docs").mkdir()
    (l2 / "etc/a").write_text("a from l2\n")
    os.mknod(l2 / "etc/b", stat.S_IFCHR, 0)  # whiteout of etc/b
    os.setxattr(l2 / "docs", "trusted.overlay.opaque", b"y")
    (l2 / "docs/new").write_text("new doc\n")
    for d in ("upper", "work", "kwork", "mnt", "kmnt"):
        (tmp_path / d).mkdir()
    yield tmp_path
    for d in ("mnt", "kmnt"):
        _umount(str(tmp_path / d))


def _kernel_mount(tmp, upper=None, target="kmnt"):
    opts = f"lowerdir={tmp / 'l2'}:{tmp / 'l1'}"
    if upper:
        opts += f",upperdir={upper},workdir={tmp / 'kwork'}"
    res = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(tmp / target)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"the kernel's overlay cannot be mounted here: {res.stderr.strip()}")


def _fuse_layerfs(tmp, *extra):
    opts = f"lowerdir={tmp / 'l2'}:{tmp / 'l1'},upperdir={tmp / 'upper'},workdir={tmp / 'work'}"
    res = subprocess.run([os.path.join(BIN, "fuse-layerfs"), "-o", opts, *extra, str(tmp / "mnt")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert _mounted(str(tmp / "mnt"))


def test_same_tree_as_the_kernel(layers):
    _fuse_layerfs(layers)
    _kernel_mount(layers)
    assert tree(str(layers / "mnt")) == tree(str(layers / "kmnt"))
    assert open(layers / "mnt/etc/a").read() == "a from l2\n"
    assert sorted(os.listdir(layers / "mnt/docs")) == ["new"]
    assert not os.path.exists(layers / "mnt/etc/b")


def test_upper_written_in_overlay_format_reads_back_in_the_kernel(layers):
    _fuse_layerfs(layers)
    m = layers / "mnt"
    os.unlink(m / "etc/a")  # lower file: leaves a whiteout
    shutil.rmtree(m / "gone")  # lower dir: whiteout
    os.mkdir(m / "gone")  # a dir where a lower one was removed: opaque
    (m / "gone/fresh").write_text("fresh\n")
    with open(m / "top", "a") as f:  # copy-up
        f.write("more\n")
    os.chmod(m / "etc", 0o700)
    (m / "etc/c").write_text("c\n")
    os.symlink("top", m / "link2")
    expected = tree(str(m))
    _umount(str(m))
    up = layers / "upper"
    st = os.lstat(up / "etc/a")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert os.getxattr(up / "gone", "trusted.overlay.opaque") == b"y"
    assert not any(n.startswith(".wh.") for _, _, names in os.walk(up) for n in names)
    _kernel_mount(layers, upper=layers / "upper")
    assert tree(str(layers / "kmnt")) == expected


def test_mount_through_mount_fuse3(layers):
    # mount(8) runs /sbin/mount.fuse3 for -t fuse.fuse-layerfs with a sanitised PATH, so
    # an installed system needs fuse-layerfs on that PATH; the test calls the same helper
    # directly with the venv on PATH instead of changing the machine.
    env = dict(os.environ, PATH=BIN + os.pathsep + os.environ.get("PATH", ""))
    opts = f"lowerdir={layers / 'l2'}:{layers / 'l1'},upperdir={layers / 'upper'},workdir={layers / 'work'}"
    helper = shutil.which("mount.fuse3") or "/sbin/mount.fuse3"
    res = subprocess.run([helper, "fuse-layerfs", str(layers / "mnt"), "-t", "fuse-layerfs",
                          "-o", opts], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    assert open(layers / "mnt/etc/a").read() == "a from l2\n"
    subprocess.run(["umount", str(layers / "mnt")], check=True)
    assert not _mounted(str(layers / "mnt"))


def test_lowerdir_only_is_read_only(layers):
    opts = f"lowerdir={layers / 'l2'}:{layers / 'l1'}"
    res = subprocess.run([os.path.join(BIN, "fuse-layerfs"), "-o", opts, str(layers / "mnt")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert open(layers / "mnt/etc/a").read() == "a from l2\n"
    with pytest.raises(OSError) as e:
        (layers / "mnt/new").write_text("x")
    assert e.value.errno == 30  # EROFS


def test_bad_command_lines(layers):
    fl = os.path.join(BIN, "fuse-layerfs")
    res = subprocess.run([fl, str(layers / "mnt")], capture_output=True, text=True)
    assert res.returncode != 0 and "lowerdir" in res.stderr
    res = subprocess.run([fl, "-o", f"lowerdir={layers / 'nope'}", str(layers / "mnt")],
                         capture_output=True, text=True)
    assert res.returncode != 0 and "not a directory" in res.stderr
    res = subprocess.run([fl, "-o", f"lowerdir={layers / 'l1'},upperdir={layers / 'upper'}",
                          str(layers / "mnt")], capture_output=True, text=True)
    assert res.returncode != 0 and "workdir" in res.stderr
    assert not _mounted(str(layers / "mnt"))
