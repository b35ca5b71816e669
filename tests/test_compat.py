"""fuse-layerfs, the fuse-overlayfs compatible mount program: plain lower directories,
an upper in overlayfs's own format. The kernel's overlayfs is the oracle: it must read
the upper that fuse-layerfs wrote and show the same tree."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import time

import pytest

from helpers import assert_listing_agrees_with_lstat, listed_names
from unionrunner import fuse_layerfs_pids

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


def test_a_listing_opens_each_merged_directory_once(layers, monkeypatch):
    """DirLower lists a directory through one descriptor per merged layer directory, and
    shows what looking each name up on its own shows (whiteouts of every form, opaque)."""
    from layerfs.unionfs.lower import DirLower
    from layerfs.unionfs.realdir import RealDir

    (layers / "l2/etc/.wh.gone").write_text("")  # an OCI whiteout of a name l1 lacks
    (layers / "l1/etc/hidden").write_text("h\n")
    (layers / "l2/etc/.wh.hidden").write_text("")  # an OCI whiteout of l1's etc/hidden
    (layers / "l1/etc/xwh").write_text("x\n")
    (layers / "l2/etc/xwh").write_text("")
    os.setxattr(layers / "l2/etc/xwh", "trusted.overlay.whiteout", b"y")  # an xattr whiteout
    os.mkdir(layers / "l1/etc/sub")
    dirs = [str(layers / "l2"), str(layers / "l1")]
    opened = []
    real_at = RealDir.at
    monkeypatch.setattr(RealDir, "at", lambda self, rel: opened.append(rel) or real_at(self, rel))
    listed = dict(DirLower(dirs).listdir("etc"))
    below = [rel for rel in opened if rel.startswith("etc/")]  # "etc" itself is looked up
    assert below == [], "a name of the listing was looked up through its own descriptor"
    monkeypatch.undo()
    one_by_one = DirLower(dirs)
    assert sorted(listed) == ["a", "sub"]
    for n, node in listed.items():  # the full entry, made when asked for, is the lookup's
        assert (node.entry, node.ident) == one_by_one.lookup(f"etc/{n}")
    assert one_by_one.lookup("etc/hidden") is None and one_by_one.lookup("etc/xwh") is None


def test_a_name_in_no_layer_is_looked_up_in_none(layers, monkeypatch):
    """The names of a directory's layers are listed once; a name none of them holds is
    absent without a probe of each layer, and every other name is found as before."""
    from layerfs.unionfs.lower import DirLower
    from layerfs.unionfs.realdir import RealDir

    dirs = [str(layers / "l2"), str(layers / "l1")]
    lower = DirLower(dirs)
    assert lower.lookup("etc/a") is not None  # etc's names are listed by this lookup
    probes = []
    real_at = RealDir.at
    monkeypatch.setattr(RealDir, "at", lambda self, rel: probes.append(rel) or real_at(self, rel))
    assert [lower.lookup(f"etc/missing{i}") for i in range(5)] == [None] * 5
    assert lower.lookup("etc/b") is None  # whited out in l2
    assert probes == ["etc/b"], "a name in no layer was looked for in the layers"
    monkeypatch.undo()
    (layers / "l1/etc/late").write_text("added after the listing\n")
    assert lower.lookup("etc/late") is None  # layers must not change while mounted
    assert DirLower(dirs).lookup("etc/late") is not None


def test_a_directory_too_large_to_keep_is_listed_once_and_probed_by_name(layers, monkeypatch):
    """Past the name budget a directory's names are not kept, and its lookups probe the
    layers by name, as before; the directory is not listed again for every lookup."""
    from layerfs.unionfs.lower import DirLower

    monkeypatch.setattr(DirLower, "NAMES_MAX", 4)  # etc holds a, b (and l2's whiteout b)
    lower = DirLower([str(layers / "l2"), str(layers / "l1")])
    listings = []
    real = lower._listed_names
    monkeypatch.setattr(lower, "_listed_names", lambda found, *fds: listings.append(found) or real(found, *fds))
    assert lower.lookup("etc/a").entry.kind.name == "REG"
    assert lower.lookup("etc/b") is None and lower.lookup("etc/missing") is None
    listed = [[rel for _, rel in found.merged] for found in listings]
    assert listed == [["", ""], ["etc", "etc"]]  # the root, then etc: each once
    assert [n for n, _ in lower.listdir("etc")] == ["a"]


def test_a_listed_name_is_what_its_lookup_finds(layers, monkeypatch):
    """A listed non-directory gets its full entry from its top layer and the listing's
    lstat, without a lookup through the layers, and that entry is the lookup's: kinds,
    xattrs, hard links, the file's data. A metacopy file, whose data is below, and a
    directory, merged with the layers below, are looked up in full."""
    from layerfs.unionfs.lower import DirLower

    etc1, etc2 = layers / "l1/etc", layers / "l2/etc"
    (etc1 / "meta").write_text("the data of meta\n")
    (etc2 / "meta").write_text("")
    os.setxattr(etc2 / "meta", "trusted.overlay.metacopy", b"")  # its data is l1's
    (etc2 / "tagged").write_text("tagged\n")
    os.setxattr(etc2 / "tagged", "user.origin", b"l2")
    os.symlink("../top", etc2 / "up")
    os.mkfifo(etc2 / "fifo")
    os.link(etc2 / "a", etc2 / "a-link")
    (etc1 / "sub").mkdir()
    (etc2 / "sub").mkdir()
    (etc1 / "sub/from-l1").write_text("1\n")
    dirs = [str(layers / "l2"), str(layers / "l1")]

    lower = DirLower(dirs)
    listed = dict(lower.listdir("etc"))
    assert sorted(listed) == ["a", "a-link", "fifo", "meta", "sub", "tagged", "up"]
    full_lookups = []
    real = lower._lookup_in
    monkeypatch.setattr(lower, "_lookup_in", lambda parent, path, name:
                        full_lookups.append(path) or real(parent, path, name))
    nodes = {n: lower.listed_node(node) for n, node in listed.items()}
    assert sorted(full_lookups) == ["etc/meta", "etc/sub"]
    one_by_one = DirLower(dirs)
    for n, node in nodes.items():
        assert node == one_by_one.lookup(f"etc/{n}"), n
        assert lower.lookup(f"etc/{n}") == node, n  # kept: a later lookup finds the same
    assert dict(nodes["tagged"].entry.xattrs) == {"user.origin": b"l2"}
    assert nodes["a"].entry.nlink == 2 and nodes["a"].ident == nodes["a-link"].ident
    assert sorted(lower.hardlink_names(nodes["a"])) == ["etc/a", "etc/a-link"]
    for n, data in (("a", b"a from l2\n"), ("meta", b"the data of meta\n")):
        fd = lower.open(f"etc/{n}", nodes[n])
        try:
            assert os.read(fd, 100) == data
        finally:
            os.close(fd)
    assert [n for n, _ in lower.listdir("etc/sub")] == ["from-l1"]


def test_lower_directories_kept_open_are_closed_with_the_tree(tmp_path):
    """A tree that keeps directories open keeps at most as many as it was told, finds
    names below them as before, and closes them with itself; a changing tree keeps none."""
    from layerfs.unionfs.realdir import RealDir

    for d in ("a", "b", "c"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "f").write_text(d)
    fds_before = set(os.listdir("/proc/self/fd"))
    kept = RealDir(str(tmp_path), keep_dirs=2)
    changing = RealDir(str(tmp_path))
    for tree in (kept, changing):
        for _ in range(2):
            assert [tree.lstat(f"{d}/f").st_size for d in ("a", "b", "c")] == [1, 1, 1]
    assert len(set(os.listdir("/proc/self/fd")) - fds_before) == 2 + 2  # two roots, two kept
    kept.close()
    changing.close()
    assert set(os.listdir("/proc/self/fd")) == fds_before


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


# -- a drop-in mount_program ------------------------------------------------------------


def test_containers_storage_command_line(layers):
    """What containers/storage runs: lowers as absolute symlinks (overlay/l/SHORTID ->
    ../ID/diff), an empty option that leaves ",," and a trailing comma, volatile, and its
    own directory as the working directory; every access must work."""
    home = layers / "overlay"
    (home / "l").mkdir(parents=True)
    for name, target in (("AAAA", layers / "l2"), ("BBBB", layers / "l1")):
        os.symlink(os.path.relpath(target, home / "l"), home / "l" / name)
    opts = (f"lowerdir={home}/l/AAAA:{home}/l/BBBB,upperdir={layers / 'upper'},"
            f"workdir={layers / 'work'},,volatile,")
    res = subprocess.run([os.path.join(BIN, "fuse-layerfs"), "-o", opts, str(layers / "mnt")],
                         capture_output=True, text=True, timeout=60, cwd=home)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "" and res.stderr == ""
    _kernel_mount(layers)
    assert tree(str(layers / "mnt")) == tree(str(layers / "kmnt"))
    (layers / "mnt/etc/new").write_text("written\n")
    assert (layers / "upper/etc/new").read_text() == "written\n"


def test_relative_paths_in_the_background(layers):
    """Relative layer paths and mountpoint are taken from the caller's directory, although
    the server runs on in the background from another one."""
    res = subprocess.run([os.path.join(BIN, "fuse-layerfs"), "-o",
                          "lowerdir=l2:l1,upperdir=upper,workdir=work", "mnt"],
                         capture_output=True, text=True, timeout=60, cwd=layers)
    assert res.returncode == 0, res.stderr
    assert _mounted(str(layers / "mnt"))
    assert open(layers / "mnt/etc/a").read() == "a from l2\n"
    [pid] = fuse_layerfs_pids(str(layers / "mnt"))
    with open(f"/proc/{pid}/cwd/.probe", "w"):
        pass  # the server does not keep the caller's directory busy
    os.unlink("/.probe")
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    assert argv[1].endswith(b"/fuse-layerfs"), argv  # forked by the command: no second Python


def test_called_with_threads_running_it_starts_a_new_interpreter(layers):
    """fuse-layerfs's main called in a program with other threads (forking one is unsafe)
    starts its server as ``python -m layerfs.unionfs.compat -f``, which mounts as well."""
    import threading

    from layerfs.unionfs import compat

    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        compat.main(["-o", f"lowerdir={layers / 'l2'}:{layers / 'l1'},upperdir={layers / 'upper'},"
                           f"workdir={layers / 'work'}", str(layers / "mnt")])
    finally:
        stop.set()
        t.join()
    assert open(layers / "mnt/etc/a").read() == "a from l2\n"
    [pid] = fuse_layerfs_pids(str(layers / "mnt"))
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    assert argv[1:4] == [b"-m", b"layerfs.unionfs.compat", b"-f"], argv


def test_empty_and_repeated_options(layers):
    args = ["-o", "", "-o", f"lowerdir={layers / 'l2'}:{layers / 'l1'}", "-o",
            f",upperdir={layers / 'upper'},,workdir={layers / 'work'},"]
    res = subprocess.run([os.path.join(BIN, "fuse-layerfs"), *args, str(layers / "mnt")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert sorted(os.listdir(layers / "mnt/docs")) == ["new"]


@pytest.mark.parametrize("option", ["fsync=0", "fsync=1", "volatile", "noacl", "nodev,nosuid",
                                    "noexec", "noatime", "relatime", "rw", "dev,suid",
                                    "defaults", "x-systemd.automount", "_netdev"])
def test_accepted_options(layers, option):
    """Options podman, containers/storage, mount(8) and mount.fuse3 pass mount a working
    union (their effect, where they have one, is checked below)."""
    _fuse_layerfs(layers, "-o", option)
    assert open(layers / "mnt/etc/a").read() == "a from l2\n"
    (layers / "mnt/fresh").write_text("x")
    flags = next(line.split()[5] for line in open("/proc/self/mountinfo")
                 if line.split()[4] == str(layers / "mnt"))
    for flag in ("nodev", "nosuid", "noexec", "noatime"):
        assert (flag in flags.split(",")) == (flag in option.split(",")), (option, flags)


def test_nodev_reaches_the_kernel(layers):
    os.mknod(layers / "l1/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    _fuse_layerfs(layers, "-o", "nodev")
    with pytest.raises(PermissionError):
        open(layers / "mnt/null", "wb")


@pytest.mark.parametrize("option", ["uidmapping=0:100000:65536", "gidmapping=0:100000:65536",
                                    "squash_to_uid=1000", "squash_to_gid=1000", "squash_to_root",
                                    "xattr_permissions=2", "timeout=5", "frobnicate",
                                    "fsync=2", "volatile=yes"])
def test_refused_options(layers, option):
    """An option fuse-layerfs cannot honour is one line naming it, exit 2, nothing mounted."""
    opts = (f"lowerdir={layers / 'l2'}:{layers / 'l1'},upperdir={layers / 'upper'},"
            f"workdir={layers / 'work'},{option}")
    res = subprocess.run([os.path.join(BIN, "fuse-layerfs"), "-o", opts, str(layers / "mnt")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fuse-layerfs: ") and option.split("=")[0] in lines[0], \
        res.stderr
    assert not _mounted(str(layers / "mnt"))
    assert os.listdir(layers / "upper") == []


def test_layers_under_the_mountpoint_are_refused(layers):
    """Mounting over a layer directory would make the server read its own mount (a hang)."""
    fl = os.path.join(BIN, "fuse-layerfs")
    for opts, mnt in ((f"lowerdir={layers / 'l1'}", layers / "l1"),
                      (f"lowerdir={layers / 'l1'},upperdir={layers / 'upper'},workdir={layers / 'work'}",
                       layers)):
        res = subprocess.run([fl, "-o", opts, str(mnt)], capture_output=True, text=True, timeout=60)
        assert res.returncode == 2 and "under the mountpoint" in res.stderr, res.stderr
        assert not _mounted(str(mnt))


def test_server_log_in_the_background(layers):
    """The background server logs to WORKDIR/layerfs/server.log; a failed mount names it."""
    _fuse_layerfs(layers)
    log = layers / "work/layerfs/server.log"
    assert f"mounting {layers / 'mnt'}" in log.read_text()
    assert os.stat(log).st_mode & 0o077 == 0
    _umount(str(layers / "mnt"))
    deadline = time.monotonic() + 10
    while "unmounted" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert f"unmounted {layers / 'mnt'}" in log.read_text()
    # A mountpoint that is already a mount: libfuse refuses it in the server.
    _kernel_mount(layers)
    opts = f"lowerdir={layers / 'l2'}:{layers / 'l1'},upperdir={layers / 'upper'},workdir={layers / 'work'}"
    res = subprocess.run([os.path.join(BIN, "fuse-layerfs"), "-o", opts + ",allow_other=bad",
                          str(layers / "mnt")], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert f"(log: {log})" in res.stderr, res.stderr
    assert not _mounted(str(layers / "mnt"))
    assert not fuse_layerfs_pids(str(layers / "mnt"))


def test_lower_hard_links_keep_their_link_count(layers):
    os.link(layers / "l1/top", layers / "l1/etc/top-link")
    _fuse_layerfs(layers)
    _kernel_mount(layers)
    for root in ("mnt", "kmnt"):
        a, b = os.lstat(layers / root / "top"), os.lstat(layers / root / "etc/top-link")
        assert (a.st_nlink, b.st_nlink, a.st_ino == b.st_ino) == (2, 2, True), root


def test_lower_hard_links_survive_copy_up(layers):
    """As the kernel's overlayfs with index=on: a write through one name shows through
    the other, in the mount and in the upper; removing a name lowers the count."""
    os.link(layers / "l1/top", layers / "l1/etc/top-link")
    os.link(layers / "l1/gone/x", layers / "l1/gone/x2")
    _fuse_layerfs(layers)
    m = layers / "mnt"
    with open(m / "etc/top-link", "a") as f:
        f.write("more\n")
    assert (m / "top").read_text() == "top\nmore\n"
    assert os.lstat(m / "top").st_ino == os.lstat(m / "etc/top-link").st_ino
    assert os.lstat(layers / "upper/top").st_ino == os.lstat(layers / "upper/etc/top-link").st_ino
    assert (layers / "l1/top").read_text() == "top\n"  # the lower is untouched
    os.unlink(m / "gone/x2")
    assert os.lstat(m / "gone/x").st_nlink == 1


# mount(8) looks for /sbin/mount.<type> with a reset PATH; mount.fuse3 then runs the
# program through sh with PATH=/usr/local/sbin:...:/bin. Each install path is tried in a
# private mount namespace in which only this test sees the link (an overlay on /usr/sbin,
# a tmpfs on /usr/local/sbin), so the machine is not changed.
_MOUNT_SCRIPT = r"""
set -eu
trap 'umount -l "$MNT" 2>/dev/null || true' EXIT
case "$HOW" in
helper)
    mkdir -p "$T/su" "$T/sw"
    mount -t overlay overlay -o "lowerdir=/usr/sbin,upperdir=$T/su,workdir=$T/sw" /usr/sbin
    ln -s "$BIN/mount.fuse.fuse-layerfs" /usr/sbin/mount.fuse.fuse-layerfs
    ln -s "$BIN/mount.fuse-layerfs" /usr/sbin/mount.fuse-layerfs ;;
path)
    mount -t tmpfs tmpfs /usr/local/sbin
    ln -s "$BIN/fuse-layerfs" /usr/local/sbin/fuse-layerfs ;;
esac
env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin mount -t "$TYPE" fuse-layerfs "$MNT" -o "$OPTS"
cat "$MNT/etc/a"
grep " $MNT " /proc/self/mounts | cut -d' ' -f3
echo changed > "$MNT/etc/b"
umount "$MNT"
"""


@pytest.mark.parametrize("how,fstype", [("helper", "fuse.fuse-layerfs"), ("helper", "fuse-layerfs"),
                                        ("path", "fuse.fuse-layerfs")])
def test_mount_t_fuse_layerfs(layers, how, fstype):
    env = dict(os.environ, HOW=how, TYPE=fstype, T=str(layers), BIN=BIN, MNT=str(layers / "mnt"),
               OPTS=f"lowerdir={layers / 'l2'}:{layers / 'l1'},upperdir={layers / 'upper'},"
                    f"workdir={layers / 'work'}")
    res = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", _MOUNT_SCRIPT],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["a from l2", "fuse.fuse-layerfs"]
    assert (layers / "upper/etc/b").read_text() == "changed\n"
    deadline = time.monotonic() + 10
    while fuse_layerfs_pids(str(layers / "mnt")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not fuse_layerfs_pids(str(layers / "mnt")), "the server outlived its unmount"


@pytest.mark.parametrize("reader", ["kernel", "fuse-layerfs"])
def test_upper_rotated_into_the_lowers(layers, reader):
    """The upper fuse-layerfs wrote becomes the top lower layer (what a commit does in a
    container engine): the kernel's overlayfs and fuse-layerfs itself read the same tree
    through it as the mount showed."""
    _fuse_layerfs(layers)
    m = layers / "mnt"
    os.chmod(m / "etc/a", 0o600)
    os.chown(m / "top", 1000, 1000)
    os.rename(m / "docs", m / "documents")
    os.rename(m / "gone", m / "gone2")
    os.rename(m / "gone2", m / "gone")
    (m / "gone/added").write_text("added\n")
    os.unlink(m / "link")
    expected = tree(str(m))
    owners = {p: os.lstat(m / p).st_uid for p in ("top", "etc/a")}
    _umount(str(m))
    lowers = f"{layers / 'upper'}:{layers / 'l2'}:{layers / 'l1'}"
    if reader == "kernel":
        res = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                              f"lowerdir={lowers},redirect_dir=follow,metacopy=on", str(layers / "kmnt")],
                             capture_output=True, text=True)
        if res.returncode != 0:
            pytest.skip(f"the kernel's overlay cannot be mounted here: {res.stderr.strip()}")
        out = layers / "kmnt"
    else:
        res = subprocess.run([os.path.join(BIN, "fuse-layerfs"), "-o", f"lowerdir={lowers}", str(m)],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        out = m
    assert tree(str(out)) == expected
    assert {p: os.lstat(out / p).st_uid for p in owners} == owners


def test_a_name_whose_attributes_cannot_be_read_is_still_listed(layers):
    """A metacopy file with no data below it: its lookup fails (EIO, as on the kernel's
    overlay), but every listing of its directory shows it, readdirplus pieces too."""
    for i in range(600):
        (layers / f"l1/etc/n{i:03d}").write_text("")
    (layers / "l2/etc/broken").write_text("")  # nothing below carries its data
    os.setxattr(layers / "l2/etc/broken", "trusted.overlay.metacopy", b"")
    _fuse_layerfs(layers)
    etc = layers / "mnt/etc"
    with pytest.raises(OSError) as e:
        os.lstat(etc / "broken")
    assert e.value.errno == errno.EIO
    expected = sorted(["a", "broken"] + [f"n{i:03d}" for i in range(600)])  # etc/b is whited out
    for stat_while_listing in (False, True):  # lookups make the later pieces readdirplus
        listed = []
        with os.scandir(etc) as it:
            for entry in it:
                if stat_while_listing and entry.name != "broken":
                    os.lstat(entry.path)
                listed.append(entry.name)
        assert sorted(listed) == expected


def test_a_listing_in_pieces_gives_every_name_its_own_inode_type_and_attributes(tmp_path):
    """As test_mount's test of the same name, for fuse-layerfs over three lower layers: a
    listing too big for one reply comes in pieces, readdirplus (full attributes) and plain
    (inode numbers and types only). Every name shows its top layer's file, whiteouts of
    every form hide what is below, and each listed inode number is what lstat gives."""
    ls = [tmp_path / f"l{i}" for i in (1, 2, 3)]  # bottom first
    for d in ls:
        (d / "big").mkdir(parents=True)
    for d in ("upper", "work", "mnt"):
        (tmp_path / d).mkdir()
    expected: dict[str, tuple] = {}  # name -> (file type, permissions, uid, size)

    def put(layer, name, kind, i, size=0):
        p = ls[layer] / "big" / name
        if kind == "f":
            p.write_bytes(b"x" * size)
        elif kind == "d":
            p.mkdir()
            (p / "inside").write_text(name)
        elif kind == "l":
            os.symlink(f"t{i}", p)
        elif kind == "p":
            os.mkfifo(p)
        perm = 0o600 + i % 64 + 64 * layer
        if kind != "l":
            os.chmod(p, perm)
        os.chown(p, i, layer, follow_symlinks=False)
        fmt = {"f": stat.S_IFREG, "d": stat.S_IFDIR, "l": stat.S_IFLNK, "p": stat.S_IFIFO}[kind]
        expected[name] = (fmt, None if kind == "l" else perm, i, size if kind == "f" else len(f"t{i}") if kind == "l" else None)

    for i in range(1500):
        name, kind = f"n{i:04d}", i % 10
        if kind in (0, 5, 6, 7, 8):
            put(0, name, "f", i, i % 97)  # l1's file; 5-8: changed or hidden above
        elif kind in (1, 2, 4):
            put(0, name, "dlp"[(1, 2, 4).index(kind)], i)
        elif kind == 3:  # a hard link of n(i-3), listed with its inode number
            os.link(ls[0] / f"big/n{i - 3:04d}", ls[0] / "big" / name)
            expected[name] = expected[f"n{i - 3:04d}"]
        if kind == 5:
            put(1, name, "f", i + 1, i % 13)  # l2's file over l1's
        elif kind == 6:
            os.mknod(ls[1] / "big" / name, stat.S_IFCHR, 0)  # an overlay whiteout in l2
            del expected[name]
            if i % 20 == 6:
                put(2, name, "l", i)  # l3 brings the name back, as a symlink
        elif kind == 7:
            (ls[2] / f"big/.wh.{name}").write_text("")  # an OCI whiteout in l3
            del expected[name]
        elif kind == 8:
            (ls[1] / "big" / name).write_text("")  # an xattr whiteout in l2
            os.setxattr(ls[1] / "big" / name, "trusted.overlay.whiteout", b"")
            del expected[name]
        elif kind == 9:
            if i % 20 == 19:  # a directory of l1 under an opaque one of l2
                put(0, name, "d", i)
                put(1, name, "d", i + 2)
                os.setxattr(ls[1] / "big" / name, "trusted.overlay.opaque", b"y")
            else:
                put(2, name, "f", i, 3)  # a name only l3 has
    # l3: a metacopy file whose data is l1's, and a renamed directory (a redirect).
    put(0, "meta", "f", 7, 40)
    put(2, "meta", "f", 8)
    os.truncate(ls[2] / "big/meta", 40)  # sparse: no data of its own
    os.setxattr(ls[2] / "big/meta", "trusted.overlay.metacopy", b"")
    expected["meta"] = (stat.S_IFREG, 0o600 + 8 + 128, 8, 40)
    put(2, "moved", "d", 11)
    os.unlink(ls[2] / "big/moved/inside")
    os.setxattr(ls[2] / "big/moved", "trusted.overlay.redirect", b"n0001")
    lowers = ":".join(str(d) for d in reversed(ls))
    opts = f"lowerdir={lowers},upperdir={tmp_path / 'upper'},workdir={tmp_path / 'work'}"
    mnt = tmp_path / "mnt"
    res = subprocess.run([os.path.join(BIN, "fuse-layerfs"), "-o", opts, str(mnt)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    try:
        assert (mnt / "big/meta").read_bytes() == b"x" * 40  # the metacopy file's data: l1's
        assert sorted(os.listdir(mnt / "big/moved")) == ["inside"]
        assert (mnt / "big/moved/inside").read_text() == "n0001"  # l1's n0001, merged below
        for changes in (False, True):
            if changes:  # upper names merged in: copy-ups (with a hard link), new names, a removal
                os.chmod(mnt / "big/n0010", 0o640)
                expected["n0010"] = expected["n0013"] = (stat.S_IFREG, 0o640, 10, 10 % 97)
                os.chown(mnt / "big/n0015", 7, 7)
                expected["n0015"] = (stat.S_IFREG, 0o600 + 16 % 64 + 64, 7, 15 % 13)
                (mnt / "big/new").write_text("")
                expected["new"] = (stat.S_IFREG, 0o644, 0, 0)
                os.mkdir(mnt / "big/newdir", 0o700)
                expected["newdir"] = (stat.S_IFDIR, 0o700, 0, None)
                os.unlink(mnt / "big/n0020")
                del expected["n0020"]
            for stat_while_listing in (False, True):
                seen = listed_names(str(mnt / "big"), stat_while_listing)
                assert_listing_agrees_with_lstat(str(mnt / "big"), seen, expected)
                for i in range(3, 1500, 10):  # a hard link is listed with its file's inode number
                    linked = f"n{i - 3:04d}" in seen  # unless that name was removed
                    assert not linked or seen[f"n{i:04d}"][0] == seen[f"n{i - 3:04d}"][0], i
                    assert os.lstat(mnt / f"big/n{i:04d}").st_nlink == (2 if linked else 1), i
    finally:
        _umount(str(mnt))
