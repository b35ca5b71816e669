"""A store on a shared host: another local user (uid 65534, through ``setpriv``) must not
read what the store holds nor gain privileges through a mount, and a directory that
user owns cannot make root's import-dir read a file outside it."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import threading

import pytest

from helpers import NOBODY, as_nobody, assert_one_line_error, make_tar
from layerfs.store import Store, StoreError
from layerfs.store.records import Kind
from unionrunner import RENAME_EXCHANGE, renameat2

SECRET = b"root's secret, mode 0600\n" * 40

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="acting as a second user needs root")


# -- import-dir: a symlink swapped in for a file -----------------------------------------------------


@needs_root
def test_symlink_swap_race_on_import_dir(layerfs, tmp_path, store_root):
    """Root imports a directory that uid 65534 owns while a thread keeps swapping one of
    its files with a symlink to a root-only file of the same size (renameat2 exchange,
    atomic). Every import either records what the directory held at one instant (the
    harmless file, or the symlink as a symlink) or is refused in one line; the secret
    never enters the store."""
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    os.chmod(secret, 0o600)
    src, stage = tmp_path / "src", tmp_path / "stage"
    for d in (src, stage):
        d.mkdir()
    for i in range(50):  # files copied before "victim" (name order): a wider window
        (src / f"pad{i:03}").write_bytes(b"padding %d\n" % i)
    harmless = b"h" * len(SECRET)
    (src / "victim").write_bytes(harmless)
    os.symlink(str(secret), stage / "alt")
    for p in [src, stage, *src.iterdir(), stage / "alt"]:
        os.lchown(p, NOBODY, NOBODY)

    stop = threading.Event()
    swaps = 0

    def swapper():
        nonlocal swaps
        while not stop.is_set():
            renameat2(str(stage / "alt"), str(src / "victim"), RENAME_EXCHANGE)
            swaps += 1

    t = threading.Thread(target=swapper, daemon=True)
    t.start()
    outcomes = {"file": 0, "symlink": 0, "refused": 0}
    try:
        # The code before this check leaked the secret in about one import in seven.
        for attempt in range(40):
            proc = layerfs("import-dir", str(src), "-t", f"race:{attempt}")
            if proc.returncode != 0:
                line = assert_one_line_error(proc)
                assert "changed" in line or "replaced" in line, line
                outcomes["refused"] += 1
            else:
                with Store(store_root) as s:
                    e = s.tree(f"race:{attempt}").lookup("victim")
                    if e.kind == Kind.SYMLINK:
                        assert e.target == str(secret)
                        outcomes["symlink"] += 1
                    else:
                        with s.blobs.open(e.blob) as f:
                            data = f.read()
                        assert data != SECRET, "the root-only file entered the image"
                        assert data == harmless
                        outcomes["file"] += 1
            if attempt >= 20 and outcomes["refused"] and outcomes["symlink"]:
                break
    finally:
        stop.set()
        t.join()
    assert swaps > 1000
    assert outcomes["refused"], f"the race was never hit: {outcomes}"
    # Nothing of the secret in any blob either.
    blobs = os.path.join(store_root, "blobs")
    for dirpath, _, names in os.walk(blobs):
        for n in names:
            with open(os.path.join(dirpath, n), "rb") as f:
                assert f.read() != SECRET


def _refused_after_scan(monkeypatch, store_root: str, src, change, word: str) -> None:
    """Import ``src`` with ``change(tree)`` run between the scan and the reading of the
    files: the import must fail, saying ``word``, and record nothing."""
    from layerfs.store import dirimport

    real_scan = dirimport.scan_dir

    def scan_then_change(tree):
        out = real_scan(tree)
        change(tree)
        return out

    monkeypatch.setattr(dirimport, "scan_dir", scan_then_change)
    with Store(store_root) as s:
        with pytest.raises(StoreError) as err:
            s.import_dir(str(src))
        assert word in str(err.value)
        assert s.images() == []


def test_file_replaced_between_scan_and_read_is_refused(tmp_path, store_root, monkeypatch):
    """A regular file replaced by another regular file of the same size (a new inode)
    after the scan: refused, not read."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"first\n")

    def swap(tree):
        (src / "b").write_bytes(b"other\n")
        os.replace(src / "b", src / "a")

    _refused_after_scan(monkeypatch, store_root, src, swap, "changed")


def test_directory_replaced_by_symlink_between_scan_and_read_is_refused(tmp_path, store_root,
                                                                         monkeypatch):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f").write_bytes(b"outside\n")
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"inside!\n")

    def swap(tree):
        tree.close()  # drop the directory fds the scan kept open
        tree._chain, tree.root_fd = [], os.open(tree.root, os.O_RDONLY | os.O_DIRECTORY)
        os.rename(src / "d", tmp_path / "d-old")
        os.symlink(str(outside), src / "d")

    _refused_after_scan(monkeypatch, store_root, src, swap, "replaced")


# -- a second user -----------------------------------------------------------------------------------


def _secret_image(layerfs, tmp_path, root: str) -> str:
    tar = make_tar(str(tmp_path / "secret.tar"), [
        ("etc", "d"), ("etc/shadow", "f", SECRET, {"mode": 0o600}),
        ("etc/motd", "f", b"hello\n")])
    layerfs("import-layer", tar, "-t", "secret:1", root=root, check=True)
    return tar


def _blob_files(root: str) -> list[str]:
    return [os.path.join(d, n) for d, _, names in os.walk(os.path.join(root, "blobs")) for n in names]


def _private(path: str) -> bool:
    return not stat.S_IMODE(os.lstat(path).st_mode) & 0o077


@needs_root
def test_store_is_private_to_its_owner(layerfs, tmp_path, public_dir):
    root = os.path.join(public_dir, "store")
    _secret_image(layerfs, tmp_path, root)
    for p in ["", "blobs", "tmp", "containers", "index.lmdb", "index.lmdb/data.mdb",
              "index.lmdb/lock.mdb", "store.json"]:
        assert _private(os.path.join(root, p)), f"{p or 'the store root'} is readable by others"
    (blob,) = [b for b in _blob_files(root) if os.path.getsize(b) == len(SECRET)]
    for path in (blob, os.path.join(root, "index.lmdb", "data.mdb")):
        proc = as_nobody("cat", path)
        assert proc.returncode != 0 and b"Permission denied" in proc.stderr, proc
        assert SECRET[:20] not in proc.stdout
    assert b"Permission denied" in as_nobody("ls", os.path.join(root, "blobs")).stderr


@needs_root
def test_a_store_left_readable_is_made_private(layerfs, tmp_path, public_dir):
    """A store an older layerfs made (0755 directories, 0644 index, 0444 blobs) is
    tightened on its next use, and the user is told."""
    root = os.path.join(public_dir, "store")
    _secret_image(layerfs, tmp_path, root)
    for d, dirs, files in os.walk(root):
        os.chmod(d, 0o755)
        for f in files:
            os.chmod(os.path.join(d, f), 0o444 if "/blobs/" in os.path.join(d, f) else 0o644)
    (blob,) = [b for b in _blob_files(root) if os.path.getsize(b) == len(SECRET)]
    assert as_nobody("cat", blob).stdout == SECRET  # what the issue found

    proc = layerfs("images", root=root, check=True)
    assert b"private" in proc.stderr
    assert as_nobody("cat", blob).returncode != 0
    assert as_nobody("cat", os.path.join(root, "index.lmdb", "data.mdb")).returncode != 0
    assert layerfs("images", root=root, check=True).stderr == b""  # said once


@needs_root
def test_a_users_store_is_private_to_them(tmp_path, public_dir):
    home = os.path.join(public_dir, "home")
    os.mkdir(home)
    os.chown(home, NOBODY, NOBODY)
    tar = make_tar(os.path.join(home, "l.tar"), [("mine", "f", b"mine\n", {"mode": 0o600})])
    os.chown(tar, NOBODY, NOBODY)
    exe = os.path.join(os.path.dirname(sys.executable), "layerfs")
    env = dict(os.environ, HOME=home)
    env.pop("LAYERFS_ROOT", None)
    proc = as_nobody(exe, "import-layer", tar, env=env)
    assert proc.returncode == 0, proc.stderr
    root = os.path.join(home, ".local", "share", "layerfs")
    assert os.stat(root).st_uid == NOBODY and _private(root)
    assert all(_private(b) for b in _blob_files(root))


# -- setuid bits and device nodes in mounts ----------------------------------------------------------


@pytest.fixture
def suid_image(layerfs, tmp_path):
    """An image with a setuid-root copy of id(1) and a world-writable null device."""
    src = tmp_path / "suid-src"
    (src / "bin").mkdir(parents=True)
    shutil.copy2("/usr/bin/id", src / "bin" / "id")
    os.chmod(src / "bin" / "id", 0o4755)
    (src / "dev").mkdir()
    os.mknod(src / "dev" / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.chmod(src / "dev" / "null", 0o666)
    layerfs("import-dir", str(src), "-t", "suid:1", check=True)
    return "suid:1"


def _euid_of_suid_id(mnt: str) -> bytes:
    proc = as_nobody(os.path.join(mnt, "bin", "id"), "-u")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def _nobody_opens_device(mnt: str) -> bool:
    proc = as_nobody(sys.executable, "-c", f"open({os.path.join(mnt, 'dev', 'null')!r}, 'wb').write(b'x')")
    assert proc.returncode == 0 or b"Permission denied" in proc.stderr, proc.stderr
    return proc.returncode == 0


def _access(layerfs, cid: str) -> dict:
    ps = {c["id"]: c for c in json.loads(layerfs("ps", "--json", check=True).stdout)}
    inspected = json.loads(layerfs("inspect", cid, check=True).stdout)
    assert inspected["type"] == "container" and inspected["access"] == ps[cid]["access"]
    return ps[cid]["access"]


@needs_root
def test_setuid_file_in_a_mount_other_users_reach_runs_without_privilege(layerfs, public_dir,
                                                                         mounts, suid_image):
    """Root mounts at a mountpoint any user can reach and lets them in (allow_other): a
    setuid-root program runs with the caller's uid, and a 0666 device node cannot be
    opened. The issue's attack gave euid 0 here."""
    mnt = os.path.join(public_dir, "mnt")
    cid = mounts(suid_image, mnt, "-o", "allow_other")
    assert os.stat(os.path.join(mnt, "bin", "id")).st_mode & stat.S_ISUID  # the bit is shown
    assert _euid_of_suid_id(mnt) == b"65534"
    assert not _nobody_opens_device(mnt)
    assert _access(layerfs, cid) == {"allow_other": True, "suid": False, "dev": False}
    table = layerfs("ps", check=True).stdout.decode()
    assert "all users" in table and ",suid" not in table


@needs_root
def test_mount_other_users_reach_is_roots_alone_by_default(layerfs, public_dir, mounts, suid_image):
    mnt = os.path.join(public_dir, "mnt")
    cid = mounts(suid_image, mnt)
    assert as_nobody("ls", mnt).returncode != 0  # FUSE lets only the mounting user in
    assert _access(layerfs, cid) == {"allow_other": False, "suid": True, "dev": True}


@needs_root
def test_suid_when_asked(layerfs, public_dir, mounts, suid_image):
    mnt = os.path.join(public_dir, "mnt")
    cid = mounts(suid_image, mnt, "-o", "allow_other", "--suid")
    assert _euid_of_suid_id(mnt) == b"0"
    assert _nobody_opens_device(mnt)
    assert _access(layerfs, cid) == {"allow_other": True, "suid": True, "dev": True}


@needs_root
def test_mount_only_root_reaches_is_a_full_container_rootfs(layerfs, mounts, suid_image, tmp_path):
    """Below a directory only root may search (pytest's temporary directories are), the
    mount lets every uid in and honours setuid bits and devices, as docker's and podman's
    do below /var/lib: a process started inside (a container's) gets them; host users
    cannot walk there."""
    mnt = str(tmp_path / "rootfs")
    cid = mounts(suid_image, mnt)
    assert _access(layerfs, cid) == {"allow_other": True, "suid": True, "dev": True}
    assert b"Permission denied" in as_nobody("ls", mnt).stderr
    # A process already inside (its cwd there, as a container's would be) runs the
    # setuid program with its privilege.
    proc = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                           "./bin/id", "-u"], cwd=mnt, capture_output=True)
    assert proc.stdout.strip() == b"0"


def test_users_cannot_ask_for_suid(monkeypatch, tmp_path):
    from layerfs.unionfs.mount import MountError, exposure

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert exposure(str(tmp_path), {}) == {"allow_other": False, "nosuid": True, "nodev": True}
    with pytest.raises(MountError):
        exposure(str(tmp_path), {"suid": True})


@needs_root
def test_removing_a_container_does_not_enter_a_filesystem_mounted_in_it(layerfs, tmp_path, store_root):
    """rm deletes the container's directory, not what someone mounted below it."""
    tar = make_tar(str(tmp_path / "l.tar"), [("f", "f", b"f\n")])
    layerfs("import-layer", tar, "-t", "l:1", check=True)
    cid = layerfs("create", "l:1", "--name", "c", check=True).stdout.decode().strip()
    sub = os.path.join(store_root, "containers", cid, "upper", "sub")
    os.mkdir(sub)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", sub], check=True)
    try:
        with open(os.path.join(sub, "precious"), "w") as f:
            f.write("not the container's\n")
        layerfs("rm", "c", check=True)
        assert open(os.path.join(sub, "precious")).read() == "not the container's\n"
    finally:
        subprocess.run(["umount", sub], check=True)
