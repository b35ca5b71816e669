"""fuse-layerfs's upper is an overlay layer that others can read: after chmod, chown,
renames of lower files and directories (and renames back), removals and new files, the
upper it wrote, rotated into the lower layers (the old upper becomes the top lower),
shows the same tree through the kernel's overlayfs and through fuse-layerfs itself, for
a second rotation too; with ``-o metacopy=on`` it is written as the kernel writes
metacopy. And the other way round: an upper the kernel wrote with redirect_dir and
metacopy reads the same through fuse-layerfs. Markers that point outside the layers are
refused."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from helpers import full_tree_of_dir, tree_differences

BIN = os.path.dirname(sys.executable)
pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                                reason="needs root and /dev/fuse")


def _mounted(path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == os.path.realpath(path) for line in f)


def _umount(path) -> None:
    for cmd in (["fusermount3", "-u", str(path)], ["umount", str(path)], ["umount", "-l", str(path)]):
        if not _mounted(path):
            return
        subprocess.run(cmd, capture_output=True)


@pytest.fixture
def tmp(tmp_path):
    """Two lower layers; every mountpoint made under it is unmounted afterwards."""
    l1, l2 = tmp_path / "l1", tmp_path / "l2"
    for d in ("etc/deep", "docs", "gone", "srv/www", "keep"):
        (l1 / d).mkdir(parents=True)
    (l1 / "etc/a").write_text("a from l1\n")
    (l1 / "etc/deep/conf").write_text("deep\n")
    (l1 / "docs/old").write_text("old doc\n")
    (l1 / "gone/x").write_text("x\n")
    (l1 / "srv/www/index.html").write_text("<html>\n")
    (l1 / "keep/k").write_text("k" * 100_000)
    (l1 / "top").write_text("top\n")
    os.chmod(l1 / "top", 0o755)
    os.symlink("etc/a", l1 / "link")
    (l2 / "etc").mkdir(parents=True)
    (l2 / "etc/a").write_text("a from l2\n")
    (l2 / "docs").mkdir()
    (l2 / "docs/new").write_text("new doc\n")
    yield tmp_path
    with open("/proc/self/mountinfo") as f:
        left = [line.split()[4] for line in f if line.split()[4].startswith(str(tmp_path))]
    for mnt in sorted(left, key=len, reverse=True):
        _umount(mnt)


def fuse_layerfs(tmp, lowers: list[str], mnt: str, upper: str | None = None, opts: str = "") -> str:
    path = tmp / mnt
    path.mkdir(exist_ok=True)
    o = "lowerdir=" + ":".join(str(tmp / d) for d in lowers)
    if upper:
        (tmp / upper).mkdir(exist_ok=True)
        (tmp / (upper + ".work")).mkdir(exist_ok=True)
        o += f",upperdir={tmp / upper},workdir={tmp / (upper + '.work')}"
    if opts:
        o += "," + opts
    res = subprocess.run([os.path.join(BIN, "fuse-layerfs"), "-o", o, str(path)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return str(path)


def kernel(tmp, lowers: list[str], mnt: str, upper: str | None = None, opts: str = "") -> str:
    path = tmp / mnt
    path.mkdir(exist_ok=True)
    o = "lowerdir=" + ":".join(str(tmp / d) for d in lowers)
    if upper:
        (tmp / upper).mkdir(exist_ok=True)
        (tmp / (upper + ".work")).mkdir(exist_ok=True)
        o += f",upperdir={tmp / upper},workdir={tmp / (upper + '.work')}"
    if opts:
        o += "," + opts
    res = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", o, str(path)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"the kernel's overlay cannot be mounted here: {res.stderr.strip()}")
    return str(path)


def first_changes(m: str) -> None:
    os.chmod(f"{m}/etc/a", 0o600)  # a lower file: metadata
    os.chown(f"{m}/top", 1000, 1000)
    os.rename(f"{m}/etc/deep/conf", f"{m}/etc/deep/conf2")  # a lower file
    os.rename(f"{m}/docs", f"{m}/docs2")  # a merged lower dir, same parent: relative redirect
    os.mkdir(f"{m}/sub")
    os.rename(f"{m}/srv/www", f"{m}/sub/www")  # to another parent: absolute redirect
    os.rename(f"{m}/keep", f"{m}/kept")
    os.rename(f"{m}/kept", f"{m}/keep")  # and back: it still merges its own lower dir
    os.unlink(f"{m}/link")
    os.unlink(f"{m}/gone/x")
    os.rmdir(f"{m}/gone")
    os.mkdir(f"{m}/gone")  # opaque now
    with open(f"{m}/gone/fresh", "w") as f:
        f.write("fresh\n")
    with open(f"{m}/top", "a") as f:
        f.write("more\n")
    os.symlink("top", f"{m}/link2")
    os.setxattr(f"{m}/docs2/new", "user.note", b"n")


def second_changes(m: str) -> None:
    os.rename(f"{m}/docs2", f"{m}/etc/docs3")  # a dir redirected in a lower layer, moved again
    os.rename(f"{m}/sub/www", f"{m}/www")
    os.chmod(f"{m}/keep/k", 0o640)
    os.unlink(f"{m}/etc/deep/conf2")
    with open(f"{m}/etc/docs3/old", "a") as f:
        f.write("appended\n")


def same_tree(expected: dict, root: str, what: str) -> None:
    diff = tree_differences(expected, full_tree_of_dir(root))
    assert not diff, f"{what} differs:\n" + "\n".join(diff[:30])


@pytest.mark.parametrize("metacopy", [False, True], ids=["full-copy-up", "metacopy=on"])
def test_rotated_uppers_read_the_same_in_the_kernel_and_in_fuse_layerfs(tmp, metacopy):
    opts = "metacopy=on" if metacopy else ""
    kopts = "metacopy=on" if metacopy else ""  # the default kernel follows redirects
    m = fuse_layerfs(tmp, ["l2", "l1"], "m1", upper="u1", opts=opts)
    first_changes(m)
    expected = full_tree_of_dir(m)
    _umount(m)

    u1 = tmp / "u1"
    st = os.lstat(u1 / "etc/a")
    meta = "trusted.overlay.metacopy" in os.listxattr(u1 / "etc/a")
    assert meta == metacopy  # data copied up in full unless metacopy=on
    if metacopy:
        assert st.st_blocks == 0  # sparse: no data
    assert os.getxattr(u1 / "docs2", "trusted.overlay.redirect") == b"docs"
    assert os.getxattr(u1 / "sub/www", "trusted.overlay.redirect") == b"/srv/www"
    assert os.getxattr(u1 / "gone", "trusted.overlay.opaque") == b"y"

    same_tree(expected, kernel(tmp, ["u1", "l2", "l1"], "k1", opts=kopts), "the kernel over the upper")
    same_tree(expected, fuse_layerfs(tmp, ["u1", "l2", "l1"], "f1"), "fuse-layerfs over the upper")

    # A second rotation: fuse-layerfs follows the redirects and metacopies in its lowers.
    m2 = fuse_layerfs(tmp, ["u1", "l2", "l1"], "m2", upper="u2", opts=opts)
    second_changes(m2)
    expected2 = full_tree_of_dir(m2)
    _umount(m2)
    same_tree(expected2, kernel(tmp, ["u2", "u1", "l2", "l1"], "k2", opts=kopts), "the kernel over two uppers")
    same_tree(expected2, fuse_layerfs(tmp, ["u2", "u1", "l2", "l1"], "f2"), "fuse-layerfs over two uppers")


def test_an_upper_the_kernel_wrote_reads_the_same_in_fuse_layerfs(tmp):
    k = kernel(tmp, ["l2", "l1"], "k1", upper="ku", opts="redirect_dir=on,metacopy=on")
    first_changes(k)
    expected = full_tree_of_dir(k)
    _umount(k)
    assert os.getxattr(tmp / "ku/docs2", "trusted.overlay.redirect")  # the kernel's own markers
    same_tree(expected, fuse_layerfs(tmp, ["ku", "l2", "l1"], "f1"), "fuse-layerfs over the kernel's upper")


def test_userxattr_writes_user_overlay_markers(tmp):
    """Under userxattr the markers are user.overlay.*; such a kernel mount follows no
    redirects, so a lower directory cannot be renamed (EXDEV, as there: mv copies)."""
    m = fuse_layerfs(tmp, ["l2", "l1"], "m1", upper="u1", opts="userxattr")
    with pytest.raises(OSError) as e:
        os.rename(f"{m}/docs", f"{m}/docs2")
    assert e.value.errno == errno.EXDEV
    subprocess.run(["mv", f"{m}/srv", f"{m}/srv2"], check=True)
    os.unlink(f"{m}/gone/x")
    os.rmdir(f"{m}/gone")
    os.mkdir(f"{m}/gone")
    expected = full_tree_of_dir(m)
    _umount(m)
    assert os.getxattr(tmp / "u1/gone", "user.overlay.opaque") == b"y"
    assert not any(n.startswith("trusted.") for n in os.listxattr(tmp / "u1/gone"))
    same_tree(expected, kernel(tmp, ["u1", "l2", "l1"], "k1", opts="userxattr"), "the kernel (userxattr)")


@pytest.mark.parametrize("marker,value", [
    ("trusted.overlay.redirect", b"/../../../etc"),
    ("trusted.overlay.redirect", b"../etc"),
    ("trusted.overlay.redirect", b"/srv/../../etc"),
])
def test_markers_pointing_out_of_the_layers_are_refused(tmp, marker, value):
    """A hostile lower layer's redirect cannot make the server read a host path."""
    evil = tmp / "evil"
    (evil / "d").mkdir(parents=True)
    os.setxattr(evil / "d", marker, value)
    m = fuse_layerfs(tmp, ["evil", "l1"], "m")
    with pytest.raises(OSError) as e:
        os.listdir(f"{m}/d")
    assert e.value.errno == errno.EIO
    assert sorted(os.listdir(f"{m}/etc")) == ["a", "deep"]  # the rest still serves


def test_symlinks_in_a_lower_layer_are_never_followed_by_a_redirect(tmp):
    """A redirect through a symlink of a lower layer (to a host directory) finds nothing."""
    evil = tmp / "evil"
    evil.mkdir()
    os.symlink("/etc", evil / "hostetc")
    (evil / "d").mkdir()
    os.setxattr(evil / "d", "trusted.overlay.redirect", b"/hostetc")
    m = fuse_layerfs(tmp, ["evil"], "m")
    assert os.listdir(f"{m}/d") == []
    assert os.readlink(f"{m}/hostetc") == "/etc"
