"""The mount lifecycle through the real CLI: mount, serve, umount, stale mounts, errors,
concurrency, two containers of one image, and a real program run from a mounted image."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import threading
import time

import pytest

from helpers import assert_listing_agrees_with_lstat, listed_names, make_tar

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse")


def _fuse_mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == os.path.realpath(path) for line in f)


@pytest.fixture
def image(tmp_path, layerfs):
    """A two-layer image: a base with files, dirs, a hard link, and an update."""
    base = make_tar(str(tmp_path / "l1.tar"), [
        ("etc", "d"), ("etc/hostname", "f", "base\n"), ("bin", "d"),
        ("bin/tool", "f", "#!/bin/sh\necho tool\n", {"mode": 0o755}),
        ("bin/tool2", "h", "bin/tool"),
        ("data", "d"), ("data/big", "f", os.urandom(300_000)),
    ])
    top = make_tar(str(tmp_path / "l2.tar"), [("etc", "d"), ("etc/hostname", "f", "top\n")])
    img = layerfs("import-layer", base, check=True).stdout.decode().strip()
    layerfs("import-layer", top, "--parent", img, "-t", "app:1", check=True)
    return "app:1"


def test_mount_read_write_umount(tmp_path, layerfs, mounts, image, store_root):
    mnt = str(tmp_path / "mnt")
    cid = mounts(image, mnt)
    assert open(os.path.join(mnt, "etc/hostname")).read() == "top\n"
    with open(os.path.join(mnt, "etc/new"), "w") as f:
        f.write("new file\n")
    with open(os.path.join(mnt, "etc/hostname"), "a") as f:
        f.write("more\n")
    os.unlink(os.path.join(mnt, "bin/tool2"))
    assert sorted(os.listdir(os.path.join(mnt, "etc"))) == ["hostname", "new"]
    assert open(os.path.join(mnt, "etc/hostname")).read() == "top\nmore\n"
    ps = json.loads(layerfs("ps", "--json", check=True).stdout)
    assert [(c["id"], c["state"], c["mountpoint"]) for c in ps] == [(cid, "mounted", mnt)]
    layerfs("umount", mnt, check=True)
    assert not _fuse_mounted(mnt)
    # The changes live in the container's upper layer, never in the image.
    upper = os.path.join(store_root, "containers", cid, "upper")
    assert open(os.path.join(upper, "etc/new")).read() == "new file\n"
    assert os.path.exists(os.path.join(upper, "bin/.wh.tool2"))
    assert layerfs("cat", image, "/etc/hostname", check=True).stdout == b"top\n"
    # Mounting the container again shows its changes.
    mounts(cid, mnt)
    assert open(os.path.join(mnt, "etc/hostname")).read() == "top\nmore\n"
    assert not os.path.exists(os.path.join(mnt, "bin/tool2"))


def test_two_containers_of_one_image_are_isolated(tmp_path, mounts, image):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    mounts(image, a)
    mounts(image, b)
    with open(os.path.join(a, "etc/hostname"), "w") as f:
        f.write("changed in a\n")
    os.mkdir(os.path.join(a, "only-a"))
    assert open(os.path.join(b, "etc/hostname")).read() == "top\n"
    assert not os.path.exists(os.path.join(b, "only-a"))


def test_read_only_mount_refuses_writes(tmp_path, mounts, image, layerfs):
    mnt = str(tmp_path / "ro")
    mounts(image, mnt, "--read-only")
    assert open(os.path.join(mnt, "etc/hostname")).read() == "top\n"
    with pytest.raises(OSError) as e:
        open(os.path.join(mnt, "etc/x"), "w")
    assert e.value.errno == 30  # EROFS
    layerfs("umount", mnt, check=True)
    # An anonymous read-only view leaves no container behind.
    assert json.loads(layerfs("ps", "--json", check=True).stdout) == []


def test_stale_mount_after_kill(tmp_path, layerfs, mounts, image):
    mnt = str(tmp_path / "mnt")
    cid = mounts(image, mnt)
    with open(os.path.join(mnt, "etc/kept"), "w") as f:
        f.write("kept\n")
    pid = next(c["pid"] for c in json.loads(layerfs("ps", "--json", check=True).stdout))
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(OSError) as e:
        os.listdir(mnt)
    assert e.value.errno == 107  # ENOTCONN: the kernel keeps the dead mount
    states = {c["id"]: c["state"] for c in json.loads(layerfs("ps", "--json", check=True).stdout)}
    assert states[cid] == "dead"
    layerfs("umount", mnt, check=True)
    assert not _fuse_mounted(mnt)
    mounts(cid, mnt)
    assert open(os.path.join(mnt, "etc/kept")).read() == "kept\n"


def test_mount_errors(tmp_path, layerfs, mounts, image):
    def err(*args):
        proc = layerfs(*args)
        lines = proc.stderr.decode().strip().splitlines()
        assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("layerfs:"), proc.stderr
        return lines[0]

    assert "does not exist" in err("mount", image, str(tmp_path / "missing"))
    (tmp_path / "file").write_text("x")
    assert "not a directory" in err("mount", image, str(tmp_path / "file"))
    assert "no such image" in err("mount", "nosuch:tag", str(tmp_path))
    mnt = str(tmp_path / "m1")
    cid = mounts(image, mnt)
    assert "is busy: something is mounted there already" in err("mount", image, mnt)
    other = str(tmp_path / "m2")
    os.mkdir(other)
    assert "already mounted" in err("mount", cid, other)
    assert "is mounted" in err("rm", cid)
    assert "not mounted" in err("umount", str(tmp_path))
    layerfs("rm", "-f", cid, check=True)
    assert not _fuse_mounted(mnt)


def test_parallel_readers_and_writers(tmp_path, mounts, image):
    mnt = str(tmp_path / "mnt")
    mounts(image, mnt)
    big = open(os.path.join(mnt, "data/big"), "rb").read()
    errors: list[BaseException] = []

    def reader():
        try:
            for _ in range(20):
                assert open(os.path.join(mnt, "data/big"), "rb").read() == big
                os.listdir(os.path.join(mnt, "etc"))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    def writer(n: int):
        try:
            d = os.path.join(mnt, f"w{n}")
            os.mkdir(d)
            for i in range(50):
                with open(os.path.join(d, f"f{i}"), "wb") as f:
                    f.write(bytes([n]) * (i + 1))
            for i in range(50):
                assert open(os.path.join(d, f"f{i}"), "rb").read() == bytes([n]) * (i + 1)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    threads += [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(os.listdir(mnt)) == ["bin", "data", "etc", "w0", "w1", "w2", "w3"]


def test_hard_links_share_inode_and_survive_copy_up(tmp_path, mounts, image, layerfs):
    mnt = str(tmp_path / "mnt")
    cid = mounts(image, mnt)
    a, b = os.path.join(mnt, "bin/tool"), os.path.join(mnt, "bin/tool2")
    sa, sb = os.stat(a), os.stat(b)
    assert sa.st_ino == sb.st_ino and sa.st_nlink == sb.st_nlink == 2
    with open(a, "a") as f:
        f.write("echo more\n")
    assert open(b).read().endswith("echo more\n")
    assert os.stat(a).st_ino == sa.st_ino == os.stat(b).st_ino
    layerfs("umount", mnt, check=True)
    mounts(cid, mnt)
    assert open(b).read().endswith("echo more\n")
    assert os.stat(a).st_ino == os.stat(b).st_ino and os.stat(a).st_nlink == 2


@pytest.mark.skipif(not os.path.exists("/bin/busybox") or os.geteuid() != 0,
                    reason="needs root and busybox-static (apt-get install busybox-static)")
def test_chroot_runs_a_program_from_the_image(tmp_path, mounts, layerfs):
    rootfs = tmp_path / "rootfs"
    for d in ("bin", "etc", "tmp"):
        (rootfs / d).mkdir(parents=True)
    shutil.copy2("/bin/busybox", rootfs / "bin/busybox")
    for applet in ("sh", "echo", "cat", "ls", "mkdir", "rm", "wc"):
        os.symlink("busybox", rootfs / "bin" / applet)
    (rootfs / "etc/motd").write_text("from the image\n")
    layerfs("import-dir", str(rootfs), "-t", "busybox:test", check=True)
    mnt = str(tmp_path / "mnt")
    mounts("busybox:test", mnt)
    out = subprocess.run(["chroot", mnt, "/bin/sh", "-c",
                          "cat /etc/motd; echo written > /tmp/out; cat /tmp/out; ls /bin | wc -l"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["from the image", "written"]
    assert out.stdout.split("\n")[2].strip() == "8"
    assert stat.S_IMODE(os.stat(os.path.join(mnt, "bin/busybox")).st_mode) == 0o755


def test_open_directories_keep_their_own_listings(tmp_path, mounts, image):
    """A directory read in pieces while other directories are listed (git status, rsync,
    os.walk) sees its own names: every open directory has its own listing."""
    mnt = str(tmp_path / "mnt")
    mounts(image, mnt)
    p = os.path.join(mnt, "p")
    for d in ("a", "b"):
        os.makedirs(os.path.join(p, d))
    for i in range(30):
        open(os.path.join(p, "b", f"f{i}"), "w").close()
    open(os.path.join(p, "x"), "w").close()
    seen = []
    with os.scandir(p) as it:
        for entry in it:
            seen.append(entry.name)
            if entry.is_dir():
                os.listdir(entry.path)
    assert sorted(seen) == ["a", "b", "x"]
    # A snapshot: a listing read in many pieces is not disturbed by changes made meanwhile.
    c = os.path.join(p, "c")
    os.mkdir(c)
    for i in range(300):
        open(os.path.join(c, f"f{i}"), "w").close()
    fd = os.open(c, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with os.scandir(fd) as it:
            first = next(it).name
            for i in range(300):
                os.rename(os.path.join(c, f"f{i}"), os.path.join(c, f"g{i}"))
            rest = [e.name for e in it]
        assert sorted([first] + rest) == sorted(f"f{i}" for i in range(300))
    finally:
        os.close(fd)
    assert sorted(os.listdir(c)) == sorted(f"g{i}" for i in range(300))


@pytest.mark.parametrize("kernel_cache", [True, False], ids=["cached", "LAYERFS_NO_DIR_CACHE"])
def test_the_kernel_keeps_directory_listings(tmp_path, layerfs, image, store_root, kernel_cache, monkeypatch):
    """The kernel caches a directory's listing across opens (libfuse 3.14 drops the flag
    that asks for it; the server sets it where libfuse answers OPENDIR), and drops it when
    the directory changes through the mount. Seen by changing the upper behind the
    mount's back, which nothing but the mount may do: a cached listing does not see it."""
    if not kernel_cache:
        monkeypatch.setenv("LAYERFS_NO_DIR_CACHE", "1")
    cid = layerfs("create", image, check=True).stdout.decode().strip()
    mnt = str(tmp_path / "mnt")
    os.makedirs(mnt)
    layerfs("mount", cid, mnt, check=True)
    try:
        upper = os.path.join(store_root, "containers", cid, "upper")
        open(os.path.join(mnt, "etc/seed"), "w").close()  # etc is now an upper directory
        before = sorted(os.listdir(os.path.join(mnt, "etc")))
        st = os.stat(os.path.join(upper, "etc"))
        open(os.path.join(upper, "etc/behind"), "w").close()
        os.utime(os.path.join(upper, "etc"), ns=(st.st_atime_ns, st.st_mtime_ns))
        open(os.path.join(mnt, "elsewhere"), "w").close()  # the server's own cache is stale now
        again = sorted(os.listdir(os.path.join(mnt, "etc")))
        assert ("behind" in again) != kernel_cache, again
        assert "behind" not in before
        os.unlink(os.path.join(mnt, "etc/seed"))  # a change through the mount: listed afresh
        assert sorted(os.listdir(os.path.join(mnt, "etc"))) == sorted((set(before) | {"behind"}) - {"seed"})
    finally:
        layerfs("umount", mnt)


def test_a_listing_in_pieces_gives_every_name_its_own_inode_type_and_attributes(tmp_path, layerfs, mounts):
    """A directory too big for one reply is read in pieces: the first piece (and any after
    a lookup in the directory) as readdirplus, whose full attributes the kernel keeps, the
    others plain, with inode numbers and types only. Every piece must describe its own
    names: in a directory of lower names only, and in one with upper names merged in."""
    kinds = ["f", "d", "l", "h", "p"]  # n(5k+3) is a hard link of the file n(5k)
    members = [("big", "d"), ("mixed", "d")]
    expected: dict[str, tuple] = {}  # name -> (file type, permissions, uid, size); None: not checked
    for d in ("big", "mixed"):
        for i in range(1500):
            kind, name, perm = kinds[i % 5], f"{d}/n{i:04d}", 0o600 + i % 64
            if kind == "h":
                members.append((name, "h", f"{d}/n{i - 3:04d}"))
                expected[name] = expected[f"{d}/n{i - 3:04d}"]
                continue
            data = {"f": "x" * (i % 97), "d": b"", "l": f"target{i}", "p": b""}[kind]
            members.append((name, kind, data, {"mode": perm, "uid": i}))
            expected[name] = {"f": (stat.S_IFREG, perm, i, i % 97), "d": (stat.S_IFDIR, perm, i, None),
                              "l": (stat.S_IFLNK, None, i, len(data)), "p": (stat.S_IFIFO, perm, i, 0)}[kind]
    layerfs("import-layer", make_tar(str(tmp_path / "big.tar"), members), "-t", "big:1", check=True)
    mnt = str(tmp_path / "mnt")
    mounts("big:1", mnt)
    m = lambda name: os.path.join(mnt, name)  # noqa: E731
    # mixed/ gets upper names: copied-up files (with their hard links), a new file and
    # directory, and a whiteout.
    os.chmod(m("mixed/n0000"), 0o640)
    expected["mixed/n0000"] = expected["mixed/n0003"] = (stat.S_IFREG, 0o640, 0, 0)
    os.chown(m("mixed/n0005"), 7, 7)
    expected["mixed/n0005"] = expected["mixed/n0008"] = (stat.S_IFREG, 0o605, 7, 5)
    os.close(os.open(m("mixed/new"), os.O_CREAT | os.O_WRONLY, 0o600))
    expected["mixed/new"] = (stat.S_IFREG, 0o600, 0, 0)
    os.mkdir(m("mixed/newdir"), 0o700)
    expected["mixed/newdir"] = (stat.S_IFDIR, 0o700, 0, None)
    os.unlink(m("mixed/n0010"))
    del expected["mixed/n0010"]
    for d in ("big", "mixed"):
        in_d = {name.partition("/")[2]: v for name, v in expected.items() if name.startswith(d + "/")}
        for stat_while_listing in (False, True):
            seen = listed_names(m(d), stat_while_listing)
            assert_listing_agrees_with_lstat(m(d), seen, in_d)
            for i in range(3, 1500, 5):  # a hard link is listed with its file's inode number
                if f"n{i:04d}" in seen and f"n{i - 3:04d}" in seen:
                    assert seen[f"n{i:04d}"][0] == seen[f"n{i - 3:04d}"][0], (d, i)
