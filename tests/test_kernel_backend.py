"""The kernel backend through the real CLI: ``layerfs mount --backend kernel|auto``.

What a user checks: the mount serves the image and shows up as such in ps and inspect;
auto picks the kernel where it can and says nothing else; the refusals are one line
that says why; the metadata image is built once, shared, checked by fsck and collected
by gc with its chain (also while containers are mounted); what the kernel wrote in the
upper commits to exactly the tree the mount showed, to the same layer as the same
changes made through the fuse backend, and the fuse backend mounts it too; a mounted
kernel container commits only with its writers frozen; the store's files stay private.

Runs as root on Linux 6.5+ (overlayfs's data-only layers); skipped with the reason
elsewhere. The operation-by-operation comparison with the kernel overlay over plain
layers is tests/test_union_vs_kernel.py (each test runs on both backends).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import time

import pytest

from helpers import assert_one_line_error, tree_and_links, tree_differences
from layerfs.store import Store
from layerfs.store import metaimage
from layerfs.unionfs import kernel
from unionrunner import C, D, F, H, L, P, as_user, build_layer

pytestmark = pytest.mark.skipif(kernel.unsupported() is not None, reason=kernel.unsupported() or "")

LAYERS = [
    {"etc/motd": F("hello\n", mode=0o640), "etc/shadow": F("secret\n", mode=0o600),
     "etc/group": F("root:x:0:\n"), "bin/tool": F("#!/bin/sh\necho tool\n", mode=0o755),
     "bin/tool-hard": H("bin/tool"), "lib": L("usr/lib"), "usr/lib/libx.so": F(b"\x7fELF" * 5000),
     "dev/null": C(1, 3), "run/fifo": P(), "var/cache/a": F("a"), "var/cache/b": F("b"),
     "var/log/old": F("old log\n"), "srv/data/x": F("x"), "srv/data/y": F("y"),
     "home/u": D(mode=0o700, uid=1000, gid=1000), "home/u/.profile": F("PS1=$\n", uid=1000, gid=1000)},
    {"etc/motd": F("hello again\n", mode=0o644, xattrs=(("user.k", "v"),)), "var/log/new": F("new\n")},
]


def _mounted_at(path: str) -> str | None:
    """The filesystem type mounted (on top) at ``path``, or None."""
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == os.path.realpath(path):
                found = fields[fields.index("-") + 1]
    return found


@pytest.fixture
def image(tmp_path, store_root):
    dirs = [build_layer(str(tmp_path / f"layer{i}"), spec) for i, spec in enumerate(LAYERS)]
    with Store(store_root) as s:
        img = None
        for d in dirs:
            img = s.import_dir(d, parent=img.image_id if img else None, tag="app:1" if d == dirs[-1] else None)
    return img.image_id


@pytest.fixture
def mounts(layerfs, tmp_path):
    """mount(ref, name, *options) -> (container id, mountpoint); everything mounted is
    unmounted afterwards, also when the test fails."""
    made: list[str] = []

    def mount(ref: str, name: str, *options: str, expect_ok: bool = True):
        mnt = str(tmp_path / name)
        os.makedirs(mnt, exist_ok=True)
        proc = layerfs("mount", *options, ref, mnt)
        if proc.returncode == 0:
            made.append(mnt)
        if expect_ok:
            assert proc.returncode == 0, proc.stderr.decode()
            return proc.stdout.decode().strip(), mnt
        return proc

    yield mount
    for mnt in made:
        if _mounted_at(mnt):
            layerfs("umount", mnt)
        for _ in range(5):  # stacked mounts come off one at a time
            if _mounted_at(mnt):
                subprocess.run(["umount", "-l", mnt], capture_output=True)


def _ps(layerfs) -> dict:
    return {c["id"]: c for c in json.loads(layerfs("ps", "--json", check=True).stdout)}


def _meta_mounts() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if " - erofs " in line]


# -- mounting ------------------------------------------------------------------------------------


def test_mount_shows_the_image_and_ps_inspect_say_kernel(image, layerfs, mounts, store_root):
    before = _meta_mounts()
    cid, mnt = mounts("app:1", "m", "--backend", "kernel")
    assert _mounted_at(mnt) == "overlay"
    assert _meta_mounts() == before  # the metadata image was mounted only while the overlay was made
    with open(os.path.join(mnt, "etc/motd")) as f:
        assert f.read() == "hello again\n"
    assert os.getxattr(os.path.join(mnt, "etc/motd"), "user.k") == b"v"
    assert os.lstat(os.path.join(mnt, "bin/tool")).st_ino == os.lstat(os.path.join(mnt, "bin/tool-hard")).st_ino
    assert os.readlink(os.path.join(mnt, "lib")) == "usr/lib"
    assert stat.S_ISCHR(os.lstat(os.path.join(mnt, "dev/null")).st_mode)
    assert sorted(os.listdir(os.path.join(mnt, "var/log"))) == ["new", "old"]
    assert subprocess.run([os.path.join(mnt, "bin/tool")], capture_output=True, text=True).stdout == "tool\n"
    row = _ps(layerfs)[cid]
    assert (row["state"], row["backend"], row["upper_format"], row["mountpoint"]) == \
        ("mounted", "kernel", "kernel", os.path.realpath(mnt))
    table = layerfs("ps", check=True).stdout.decode().splitlines()
    assert "BACKEND" in table[0] and " kernel " in table[1]
    shown = json.loads(layerfs("inspect", cid[:12], check=True).stdout)
    assert (shown["type"], shown["backend"], shown["state"]) == ("container", "kernel", "mounted")
    layerfs("umount", mnt, check=True)
    assert _mounted_at(mnt) is None
    row = _ps(layerfs)[cid]
    assert (row["state"], row["backend"]) == ("created", None)


def test_read_only_mount(image, layerfs, mounts):
    cid, mnt = mounts("app:1", "ro", "--backend", "kernel", "--read-only")
    with open(os.path.join(mnt, "etc/group")) as f:
        assert f.read() == "root:x:0:\n"
    with pytest.raises(OSError) as e:
        open(os.path.join(mnt, "etc/group"), "a")
    assert e.value.strerror == "Read-only file system"
    layerfs("umount", mnt, check=True)
    assert cid not in _ps(layerfs)  # an anonymous read-only view leaves nothing behind


def test_auto_picks_the_kernel_and_the_fuse_backend_where_it_must(image, layerfs, mounts):
    cid, mnt = mounts("app:1", "auto", "--backend", "auto")
    assert _ps(layerfs)[cid]["backend"] == "kernel"
    layerfs("umount", mnt, check=True)
    # A container changed through the fuse backend keeps its OCI-format upper: the kernel
    # cannot read it, so auto takes fuse and --backend kernel says why.
    layerfs("create", "app:1", "--name", "f", check=True)
    _, fmnt = mounts("f", "fuse")
    with open(os.path.join(fmnt, "new"), "w") as f:
        f.write("via fuse")
    layerfs("umount", fmnt, check=True)
    assert_one_line_error(mounts("f", "k", "--backend", "kernel", expect_ok=False),
                          mentions=("fuse backend", "--backend fuse"))
    fid, _ = mounts("f", "a2", "--backend", "auto")
    assert _ps(layerfs)[fid]["backend"] == "fuse"


@pytest.mark.parametrize("args,words", [
    (("-f",), ("foreground",)),
    (("-o", "allow_root"), ("does not take -o allow_root",)),
    (("-o", "uid=5"), ("does not take -o uid=5",)),
])
def test_what_the_kernel_backend_refuses(image, layerfs, mounts, args, words):
    proc = mounts("app:1", "x", "--backend", "kernel", *args, expect_ok=False)
    assert_one_line_error(proc, mentions=words)
    assert _ps(layerfs) == {}  # the container made for it went away again


def test_the_kernel_backend_needs_root():
    """As another user the kernel backend says why it cannot be. (In a forked child: this
    machine's Python lives where other users cannot run it, so not through the CLI; its
    refusals reach the CLI as the ones above do.)"""
    res = as_user(65534, 65534, kernel.unsupported)
    assert res[0] == "ok" and "needs root" in res[1], res


# -- the metadata image --------------------------------------------------------------------------


def test_metadata_image_is_built_once_shared_and_collected_with_its_chain(image, layerfs, mounts, store_root):
    c1, m1 = mounts("app:1", "one", "--backend", "kernel")
    metas = metaimage.stored(store_root)
    assert len(metas) == 1 and metas[0].erofs
    ino = os.stat(metas[0].path).st_ino
    c2, m2 = mounts("app:1", "two", "--backend", "kernel")
    assert metaimage.stored(store_root) == metas and os.stat(metas[0].path).st_ino == ino
    with open(os.path.join(m1, "only-in-one"), "w") as f:
        f.write("1")
    assert not os.path.exists(os.path.join(m2, "only-in-one"))
    # gc, rmi and fsck with both mounted: nothing of theirs goes, the store is whole
    assert json.loads(layerfs("gc", "--json", check=True).stdout)["meta_images"] == 0
    assert_one_line_error(layerfs("rmi", "app:1"), mentions=("used by container",))
    assert layerfs("fsck", check=True).returncode == 0
    assert metaimage.stored(store_root) == metas
    with open(os.path.join(m2, "etc/motd")) as f:
        assert f.read() == "hello again\n"
    for cid in (c1, c2):
        layerfs("rm", "-f", cid, check=True)
    layerfs("rmi", "app:1", check=True)
    assert json.loads(layerfs("gc", "--json", check=True).stdout)["meta_images"] == 1
    assert metaimage.stored(store_root) == []


def test_fsck_finds_a_damaged_metadata_image_and_repair_removes_it(image, layerfs, mounts, store_root):
    _, mnt = mounts("app:1", "m", "--backend", "kernel")
    layerfs("umount", mnt, check=True)
    meta = metaimage.stored(store_root)[0]
    with open(meta.path, "r+b") as f:
        f.seek(1024 + 128 + 40)  # inside the root inode
        f.write(b"\xff\xff")
    proc = layerfs("fsck")
    assert proc.returncode == 1 and b"damaged-meta-image" in proc.stdout
    assert layerfs("fsck", "--fast").returncode == 0  # still an EROFS image: only the full check sees it
    layerfs("fsck", "--repair")
    assert metaimage.stored(store_root) == []
    _, mnt = mounts("app:1", "again", "--backend", "kernel")  # built again
    with open(os.path.join(mnt, "etc/motd")) as f:
        assert f.read() == "hello again\n"
    assert layerfs("fsck").returncode == 0


def test_directory_form_where_the_kernel_cannot_mount_erofs_from_a_file(image, store_root, tmp_path, monkeypatch):
    """Kernels before 6.12 mount EROFS only from block devices: the metadata image is then
    a plain directory. (This kernel can: the version check is patched, in process, to
    take the path an older kernel takes.)"""
    from layerfs.unionfs import mount as mnt_mod

    monkeypatch.setattr(kernel, "FILE_EROFS_KERNEL", (999, 0))
    dest = str(tmp_path / "dirform")
    os.makedirs(dest)
    with Store(store_root) as s:
        c = mnt_mod.mount(s, "app:1", dest, backend="kernel")
        try:
            metas = metaimage.stored(store_root)
            assert len(metas) == 1 and not metas[0].erofs and os.path.isdir(metas[0].path)
            assert stat.S_IMODE(os.stat(os.path.dirname(metas[0].path)).st_mode) == 0o700
            seen, links = tree_and_links(dest)
            fuse_dest = str(tmp_path / "viafuse")
            os.makedirs(fuse_dest)
            c2 = mnt_mod.mount(s, "app:1", fuse_dest, read_only=True)
            try:
                want, want_links = tree_and_links(fuse_dest)
            finally:
                mnt_mod.umount(s, c2.id)
            assert tree_differences(want, seen) == [] and links == want_links
        finally:
            mnt_mod.umount(s, c.id)
        assert s.fsck().clean


# -- the kernel's upper: diff, commit, the fuse backend --------------------------------------------


def _kernel_changes(root: str) -> None:
    """Changes whose upper markers are the kernel's: data and metadata copy-up, whiteouts,
    an opaque dir, redirects (relative: a rename in the same dir; absolute: into another),
    metacopy files moved, a file in a moved dir, new files, links, xattrs."""
    j = lambda p: os.path.join(root, p)  # noqa: E731
    with open(j("etc/group"), "a") as f:
        f.write("users:x:100:\n")
    os.chmod(j("etc/shadow"), 0o400)  # metacopy
    os.chown(j("usr/lib/libx.so"), 5, 5)  # metacopy
    os.rename(j("usr/lib/libx.so"), j("usr/lib/libx.so.1"))  # a metacopy file moved: redirect
    os.rename(j("srv/data"), j("srv/data2"))  # same parent: a relative redirect
    os.rename(j("var/cache"), j("srv/cache"))  # another parent: an absolute one
    os.unlink(j("srv/cache/a"))
    os.chmod(j("srv/cache/b"), 0o600)
    os.unlink(j("var/log/old"))
    shutil.rmtree(j("home/u"))
    os.mkdir(j("home/u"), 0o750)  # opaque over the removed dir
    with open(j("home/u/new"), "w") as f:
        f.write("fresh")
    os.symlink("../etc/motd", j("srv/motd-link"))
    os.link(j("home/u/new"), j("home/u/new-hard"))
    os.mkfifo(j("run/fifo2"))
    os.setxattr(j("etc/motd"), "user.k", b"changed")
    os.unlink(j("lib"))
    for p in ("etc", "usr/lib", "srv", "srv/data2", "srv/cache", "var", "var/log", "home", "home/u", "run", ""):
        os.utime(j(p), ns=(1_700_000_000 * 10**9, 1_700_000_000 * 10**9))


EXPECTED_DIFF = [
    "C /etc", "C /etc/group", "C /etc/motd", "C /etc/shadow", "C /home", "C /home/u",
    "A /home/u/new", "A /home/u/new-hard", "D /home/u/.profile", "D /lib", "C /run", "A /run/fifo2",
    "C /srv", "A /srv/cache", "A /srv/cache/b", "D /srv/data", "A /srv/data2", "A /srv/data2/x",
    "A /srv/data2/y", "A /srv/motd-link", "C /usr", "C /usr/lib", "D /usr/lib/libx.so",
    "A /usr/lib/libx.so.1", "C /var", "D /var/cache", "C /var/log", "D /var/log/old",
]


def test_commit_of_the_kernels_upper_is_the_tree_the_mount_showed(image, layerfs, mounts, store_root, tmp_path):
    cid, mnt = mounts("app:1", "k", "--backend", "kernel")
    _kernel_changes(mnt)
    seen = tree_and_links(mnt)
    upper = os.path.join(store_root, "containers", cid, "upper")
    assert os.getxattr(os.path.join(upper, "srv/data2"), "trusted.overlay.redirect") == b"data"
    assert os.getxattr(os.path.join(upper, "srv/cache"), "trusted.overlay.redirect") == b"/var/cache"
    assert "trusted.overlay.metacopy" in os.listxattr(os.path.join(upper, "etc/shadow"))
    layerfs("umount", mnt, check=True)
    diff = layerfs("diff", cid, check=True).stdout.decode().splitlines()
    assert sorted(diff, key=lambda line: line[2:]) == sorted(EXPECTED_DIFF, key=lambda line: line[2:])
    new = layerfs("commit", cid, "-t", "app:2", check=True).stdout.decode().strip()
    _, check = mounts(new, "check", "--read-only")  # read back through the other backend
    got = tree_and_links(check)
    assert tree_differences(seen[0], got[0]) == [] and seen[1] == got[1]
    assert layerfs("fsck", check=True).returncode == 0


def _same_script(root: str) -> None:
    """One change script for both backends: everything a layer records, with times fixed."""
    _kernel_changes(root)
    j = lambda p: os.path.join(root, p)  # noqa: E731
    for p in ("etc/group", "home/u/new", "srv/motd-link", "run/fifo2"):
        os.utime(j(p), ns=(1_700_000_001 * 10**9, 1_700_000_001 * 10**9), follow_symlinks=False)


def test_the_same_changes_commit_to_the_same_layer_through_either_backend(image, layerfs, mounts, tmp_path):
    layers = {}
    for backend in ("fuse", "kernel"):
        cid, mnt = mounts("app:1", backend, "--backend", backend)
        _same_script(mnt)
        layerfs("umount", mnt, check=True)
        new = layerfs("commit", cid, check=True).stdout.decode().strip()
        layers[backend] = json.loads(layerfs("inspect", new, check=True).stdout)["layers"][-1]
        layerfs("export-layer", layers[backend], "-o", str(tmp_path / f"{backend}.tar"), check=True)
    if layers["fuse"] != layers["kernel"]:
        listing = {b: subprocess.run(["tar", "-tvf", str(tmp_path / f"{b}.tar"), "--full-time", "--xattrs"],
                                     capture_output=True, text=True).stdout.splitlines() for b in layers}
        assert listing["fuse"] == listing["kernel"]
    assert layers["fuse"] == layers["kernel"]


def test_the_fuse_backend_mounts_a_kernel_container_and_back(image, layerfs, mounts):
    cid, kmnt = mounts("app:1", "k1", "--backend", "kernel")
    _kernel_changes(kmnt)
    seen = tree_and_links(kmnt)
    layerfs("umount", kmnt, check=True)
    _, fmnt = mounts(cid, "f", "--backend", "fuse")
    assert _ps(layerfs)[cid]["backend"] == "fuse"
    got = tree_and_links(fmnt)
    assert tree_differences(seen[0], got[0]) == [] and seen[1] == got[1]
    # changes through fuse, in the kernel's format, read back by the kernel
    os.rename(os.path.join(fmnt, "bin"), os.path.join(fmnt, "sbin"))
    os.chmod(os.path.join(fmnt, "etc/motd"), 0o600)
    os.unlink(os.path.join(fmnt, "srv/data2/x"))
    seen = tree_and_links(fmnt)
    layerfs("umount", fmnt, check=True)
    _, kmnt2 = mounts(cid, "k2", "--backend", "kernel")
    got = tree_and_links(kmnt2)
    assert tree_differences(seen[0], got[0]) == [] and seen[1] == got[1]


# -- commit of a mounted kernel container -------------------------------------------------------------


def test_commit_of_a_mounted_kernel_container_without_freeze_is_refused(image, layerfs, mounts):
    cid, mnt = mounts("app:1", "k", "--backend", "kernel")
    with open(os.path.join(mnt, "new"), "w") as f:
        f.write("x")
    images = layerfs("images", "-q", check=True).stdout
    assert_one_line_error(layerfs("commit", cid), mentions=("kernel backend", "--freeze"))
    assert layerfs("images", "-q", check=True).stdout == images


def _cgroup_dir(tmp_name: str) -> str:
    """A new cgroup with a freezer: cgroup v2 where mounted, else the v1 freezer."""
    with open("/proc/self/mountinfo") as f:
        mounts = [(line.split()[4], line.split(" - ")[1].split()) for line in f]
    for point, (fstype, *_rest) in mounts:
        if fstype == "cgroup2" and os.path.exists(os.path.join(point, "cgroup.procs")):
            path = os.path.join(point, tmp_name)
            os.mkdir(path)
            if os.path.exists(os.path.join(path, "cgroup.freeze")):
                return path
            os.rmdir(path)
    for point, (fstype, _src, opts, *_rest) in mounts:
        if fstype == "cgroup" and "freezer" in opts.split(","):
            path = os.path.join(point, tmp_name)
            os.mkdir(path)
            return path
    pytest.skip("no cgroup freezer here (cgroup v2 cgroup.freeze or the v1 freezer)")


WRITER = """
echo $$ > "$1/cgroup.procs"
cd "$2"
i=0
while [ $i -lt 200000 ]; do
    i=$((i+1))
    echo $i > count.tmp
    mv count.tmp count
    mkdir d$i
done
"""


def test_commit_with_freeze_holds_the_writers_and_thaws_them(image, layerfs, mounts, store_root, tmp_path):
    """A shell loop keeps writing: count = i, then directory d<i>. Frozen, the upper stands
    still, so the layer holds d1..d<count> (or d1..d<count-1>, frozen between the two).
    Unfrozen, a commit that lists the directory and then reads count finds them apart.
    After the commit the writer runs on."""
    cid, mnt = mounts("app:1", "k", "--backend", "kernel")
    work = os.path.join(mnt, "w")
    os.mkdir(work)
    cgroup = _cgroup_dir(f"layerfs-test-{os.getpid()}")
    writer = subprocess.Popen(["sh", "-c", WRITER, "sh", cgroup, work], start_new_session=True)
    try:
        while not os.path.exists(os.path.join(work, "d300")):
            assert writer.poll() is None
            time.sleep(0.01)
        new = layerfs("commit", "--freeze", cgroup, cid, check=True).stdout.decode().strip()
        with Store(store_root) as s:
            tree = s.tree(new)
            n = int(s.blobs.open(tree.lookup("w/count").blob).read())
            dirs = {name for name, e in tree.listdir("w") if e.is_dir}
        assert dirs in ({f"d{i}" for i in range(1, n + 1)}, {f"d{i}" for i in range(1, n)}), \
            f"count {n}, {len(dirs)} directories: the upper changed while it was read"
        time.sleep(0.2)
        with open(os.path.join(work, "count")) as f:
            assert int(f.read()) > n  # thawed: the writer ran on
        control = os.path.join(cgroup, "cgroup.freeze")
        if os.path.exists(control):
            with open(control) as f:
                assert f.read().strip() == "0"
    finally:
        os.killpg(writer.pid, signal.SIGKILL)
        writer.wait()
        for _ in range(100):
            try:
                os.rmdir(cgroup)
                break
            except OSError:
                time.sleep(0.05)


def test_freeze_of_something_that_is_not_a_cgroup(image, layerfs, mounts, tmp_path):
    cid, _ = mounts("app:1", "k", "--backend", "kernel")
    assert_one_line_error(layerfs("commit", "--freeze", str(tmp_path), cid), mentions=("not a cgroup",))


# -- security ------------------------------------------------------------------------------------------


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def test_private_files_stay_private(image, layerfs, mounts, store_root):
    """A 0600 root file of the image is unreadable to another user through the mount; the
    metadata images are root's alone, like the blobs they point into."""
    _, mnt = mounts("app:1", "k", "--backend", "kernel")
    assert _read(os.path.join(mnt, "etc/shadow")) == b"secret\n"
    # (the child enters the directory as root: pytest's temporary directories are 0700)
    assert as_user(65534, 65534, _read, "etc/shadow", cwd=mnt) == ("err", "EACCES")
    assert as_user(65534, 65534, _read, "etc/group", cwd=mnt) == ("ok", b"root:x:0:\n")
    meta = metaimage.stored(store_root)[0]
    assert stat.S_IMODE(os.stat(os.path.dirname(meta.path)).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(meta.path).st_mode) == 0o600
    assert as_user(65534, 65534, _read, os.path.basename(meta.path), cwd=os.path.dirname(meta.path)) == \
        ("err", "EACCES")


def _per_mount_flags(path: str) -> set[str]:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == os.path.realpath(path):
                found = set(fields[5].split(","))
    return found


def test_setuid_and_devices_follow_the_fuse_backends_options(image, layerfs, mounts):
    _, default = mounts("app:1", "default", "--backend", "kernel")
    assert not {"nosuid", "nodev"} & _per_mount_flags(default)  # as root's FUSE mounts: suid, dev
    _, off = mounts("app:1", "off", "--backend", "kernel", "-o", "nosuid,nodev,noexec,ro")
    assert {"nosuid", "nodev", "noexec", "ro"} <= _per_mount_flags(off)
    with pytest.raises(PermissionError):
        open(os.path.join(off, "dev/null"), "wb")


def test_a_container_cannot_point_a_file_at_another_blob(image, layerfs, mounts, store_root):
    """Setting overlayfs's own xattrs through the mount (as root in the container) stores
    them escaped: after a remount the file still shows its own bytes, and commit keeps
    nothing of them."""
    cid, mnt = mounts("app:1", "k", "--backend", "kernel")
    with Store(store_root) as s:
        secret = s.tree(s.resolve_image("app:1")).lookup("etc/shadow").blob
        redirect = s.blobs.path(secret)[len(s.blobs.dir):].encode()
    target = os.path.join(mnt, "etc/group")
    os.chmod(target, 0o644)  # a metacopy upper, whose data is found by its redirect
    os.setxattr(target, "trusted.overlay.redirect", redirect)
    os.setxattr(target, "trusted.overlay.metacopy", b"")
    layerfs("umount", mnt, check=True)
    _, mnt = mounts(cid, "k2", "--backend", "kernel")
    assert _read(os.path.join(mnt, "etc/group")) == b"root:x:0:\n"
    layerfs("umount", mnt, check=True)
    new = layerfs("commit", cid, check=True).stdout.decode().strip()
    with Store(store_root) as s:
        e = s.tree(new).lookup("etc/group")
        assert s.blobs.open(e.blob).read() == b"root:x:0:\n"
        assert not [n for n, _ in e.xattrs if n.startswith("trusted.overlay.")]


def test_volatile_mounts_again_after_a_clean_umount_and_not_after_a_crash(image, layerfs, mounts, store_root):
    """-o volatile is overlayfs's volatile: no syncs, and a marker that refuses the upper
    from then on. After a clean unmount layerfs syncs and removes it; where it is left
    (as after a crash: made here by a second volatile mount whose unmount never came),
    the mount says why it refuses."""
    cid, mnt = mounts("app:1", "v", "--backend", "kernel", "-o", "volatile")
    with open(os.path.join(mnt, "kept"), "w") as f:
        f.write("written without syncs")
    layerfs("umount", mnt, check=True)
    _, mnt = mounts(cid, "v2", "--backend", "kernel", "-o", "volatile")
    assert _read(os.path.join(mnt, "kept")) == b"written without syncs"
    subprocess.run(["umount", mnt], check=True)  # not through layerfs: the marker stays
    assert_one_line_error(mounts(cid, "v3", "--backend", "kernel", expect_ok=False),
                          mentions=("volatile", "layerfs rm"))


def test_a_store_path_with_commas_and_colons(layerfs, tmp_path):
    """overlayfs splits its options on "," and lowerdir on ":": they are escaped."""
    root = str(tmp_path / "a,b:c" / "store")
    src = build_layer(str(tmp_path / "src"), {"f": F("odd path")})
    layerfs("import-dir", src, "-t", "odd", root=root, check=True)
    mnt = str(tmp_path / "m")
    os.makedirs(mnt)
    layerfs("mount", "--backend", "kernel", "odd", mnt, root=root, check=True)
    try:
        assert _read(os.path.join(mnt, "f")) == b"odd path"
    finally:
        layerfs("umount", mnt, root=root)
        if _mounted_at(mnt):
            subprocess.run(["umount", "-l", mnt])
