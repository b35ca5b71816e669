"""Metadata images: the EROFS writer (store/erofs.py) and the images built from the
merged index (store/metaimage.py).

The writer is checked by two independent readers: erofs-utils' ``fsck.erofs`` and the
kernel, which mounts the image so that every name, type, mode, owner, time, size,
device number, link target, xattr and hard link is read back with lstat and compared
with the tree written. The images of real stores are checked the same way, in both
forms (EROFS file and directory), and against damage.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import stat
import struct
import subprocess

import pytest

from layerfs.store import Store
from layerfs.store import erofs, metaimage
from layerfs.store.erofs import Node
from layerfs.store.keys import entry_key
from layerfs.store.records import pack_entry
from unionrunner import D, F, H, L, P, C, build_layer

_libc = ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def mounted_erofs(image: str, mnt: str):
    """The EROFS image mounted read-only from its file at ``mnt`` (root, Linux 6.12+)."""
    os.makedirs(mnt, exist_ok=True)
    if _libc.mount(os.fsencode(image), os.fsencode(mnt), b"erofs", ctypes.c_ulong(1), None) != 0:
        code = ctypes.get_errno()
        pytest.skip(f"cannot mount an EROFS image from a file here: {os.strerror(code)}")
    try:
        yield mnt
    finally:
        _libc.umount2(os.fsencode(mnt), 2)


def _need_root():
    if os.geteuid() != 0:
        pytest.skip("needs root: mounts EROFS images, sets trusted.* xattrs")


def fsck_erofs(image: str) -> None:
    if shutil.which("fsck.erofs") is None:
        pytest.skip("needs fsck.erofs (apt-get install erofs-utils)")
    res = subprocess.run(["fsck.erofs", image], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def sample_tree() -> Node:
    """Every kind of inode, hard links across directories, a directory of several
    blocks, names that are not UTF-8, sizes up to terabytes, times before 1970."""
    root = Node(stat.S_IFDIR | 0o755, uid=0, gid=0, mtime_ns=1_600_000_000_000_000_000, children={})
    etc = Node(stat.S_IFDIR | 0o2750, uid=70000, gid=70001, mtime_ns=1_600_000_000_123_456_789, children={})
    motd = Node(stat.S_IFREG | 0o4640, uid=1000, gid=1000, size=18, mtime_ns=-5_500_000_000,
                xattrs=((metaimage.METACOPY, b""), (metaimage.REDIRECT, b"/ab/cdef"), ("user.k", b"v" * 300),
                        ("security.capability", b"\x01\x00\x00\x02" + b"\x00" * 16)))
    root.children.update({
        b"etc": etc, b"hl": motd, b"empty": Node(stat.S_IFREG | 0o600),
        b"huge": Node(stat.S_IFREG | 0o644, size=5 << 40),
        b"odd": Node(stat.S_IFREG | 0o644, size=4097),
        b"null": Node(stat.S_IFCHR | 0o666, rdev=(1, 3)),
        b"disk": Node(stat.S_IFBLK | 0o660, gid=6, rdev=(259, 70000)),
        b"fifo": Node(stat.S_IFIFO | 0o644),
        b"ln": Node(stat.S_IFLNK | 0o777, target=b"etc/motd", xattrs=(("trusted.t", b"1"),)),
        b"longln": Node(stat.S_IFLNK | 0o777, target=b"t" * 4095),
        b"bad\xff\xfe": Node(stat.S_IFDIR | 0o700, children={}),
    })
    etc.children[b"motd"] = motd
    many = Node(stat.S_IFDIR | 0o755, children={})
    root.children[b"many"] = many
    for i in range(2000):
        many.children[b"f%05d-" % i + b"x" * (i % 200)] = Node(stat.S_IFREG | 0o644, size=i)
    many.children[b"sub"] = Node(stat.S_IFDIR | 0o1777, children={b"inner": motd})
    return root


def test_erofs_writer_output_is_read_back_by_fsck_erofs_and_the_kernel(tmp_path):
    _need_root()
    image = str(tmp_path / "t.erofs")
    tree = sample_tree()
    with open(image, "wb") as f:
        size = erofs.write(tree, f)
    assert size == os.path.getsize(image) and size % erofs.BLOCK == 0
    assert size < 1 << 20  # 5 TiB of files and no data stored
    fsck_erofs(image)
    with mounted_erofs(image, str(tmp_path / "mnt")) as mnt:
        assert metaimage._compare_dir(mnt, tree) is None
        st = os.lstat(os.path.join(mnt, "etc", "motd"))
        assert st.st_nlink == 3 and st.st_ino == os.lstat(os.path.join(mnt, "many/sub/inner")).st_ino
        assert os.lstat(os.path.join(mnt, "many")).st_nlink == 3  # . , .. of sub, its own name
        with open(os.path.join(mnt, "huge"), "rb") as f:
            f.seek((5 << 40) - 3)
            assert f.read() == b"\0\0\0"  # a hole, never read by overlayfs
        assert sorted(os.listdir(os.path.join(mnt, "many")))[:2] == ["f00000-", "f00001-x"]
        assert len(os.listdir(os.path.join(mnt, "many"))) == 2001


def test_erofs_writer_is_deterministic():
    a, b = metaimage._Digest(), metaimage._Digest()
    erofs.write(sample_tree(), a, b"u" * 16)
    erofs.write(sample_tree(), b, b"u" * 16)
    assert a.hash.digest() == b.hash.digest()


def test_erofs_writer_refuses_an_xattr_it_cannot_name():
    root = Node(stat.S_IFDIR | 0o755, children={b"f": Node(stat.S_IFREG | 0o644, xattrs=(("system.nfs4_acl", b"x"),))})
    with pytest.raises(erofs.ErofsError, match="system.nfs4_acl"):
        erofs.write(root, metaimage._Digest())


# -- images of a store ---------------------------------------------------------------------------

LAYERS = [
    {"etc/motd": F("hello\n", mode=0o640, uid=1000, gid=1000, xattrs=(("user.a", "1"),)),
     "etc/hard": H("etc/motd"), "bin/tool": F("#!/bin/sh\n", mode=0o4755),
     "lib": L("usr/lib"), "usr/lib/x.so": F(b"\x7fELF" * 1000), "dev/null": C(1, 3), "run/p": P(),
     "empty": F(""), "gone": F("gone"), "d/old": F("old")},
    {"gone": F("back"), "d": D(opaque=True), "d/new": F("new"), "etc/more": F("m")},
]


@pytest.fixture
def store_image(tmp_path):
    _need_root()
    dirs = [build_layer(str(tmp_path / f"l{i}"), spec) for i, spec in enumerate(LAYERS)]
    store = Store(str(tmp_path / "store"))
    image = None
    for d in dirs:
        image = store.import_dir(d, parent=image.image_id if image else None)
    yield store, image
    store.close()


def _expected(store, image) -> dict:
    """What each path of the image's merged tree should show in the metadata image."""
    out = {}
    tree = store.tree(image)
    todo = [""]
    while todo:
        path = todo.pop()
        for name, e in tree.listdir(path):
            p = f"{path}/{name}" if path else name
            out[p] = e
            if e.is_dir:
                todo.append(p)
    return out


@pytest.mark.parametrize("as_erofs", [True, False], ids=["erofs", "dir"])
def test_image_of_a_store_shows_the_merged_tree_and_points_at_blobs(store_image, tmp_path, as_erofs):
    store, image = store_image
    meta = metaimage.ensure(store, image, as_erofs=as_erofs)
    assert meta.erofs == as_erofs and os.path.dirname(meta.path) == os.path.join(store.root, "meta")
    assert stat.S_IMODE(os.stat(os.path.join(store.root, "meta")).st_mode) == 0o700
    if as_erofs:
        assert stat.S_IMODE(os.stat(meta.path).st_mode) == 0o600
        fsck_erofs(meta.path)
    with (mounted_erofs(meta.path, str(tmp_path / "mnt")) if as_erofs else contextlib.nullcontext(meta.path)) as root:
        for path, e in _expected(store, image).items():
            full = os.path.join(root, path)
            st = os.lstat(full)
            assert (stat.S_IFMT(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns) == \
                (e.st_mode & 0o170000, e.uid, e.gid, e.mtime_ns), path
            if e.kind.name == "REG":
                assert st.st_size == e.size, path
                if e.size:  # a metacopy file whose bytes are its blob's
                    redirect = os.getxattr(full, "trusted.overlay.redirect")
                    assert os.path.join(store.blobs.dir, os.fsdecode(redirect[1:])) == store.blobs.path(e.blob)
                    assert os.getxattr(full, "trusted.overlay.metacopy") == b""
                else:
                    assert "trusted.overlay.metacopy" not in os.listxattr(full)
        assert os.lstat(os.path.join(root, "etc/motd")).st_ino == os.lstat(os.path.join(root, "etc/hard")).st_ino
        assert sorted(os.listdir(os.path.join(root, "d"))) == ["new"]  # the opaque dir hid d/old
        assert os.getxattr(os.path.join(root, "etc/motd"), "user.a") == b"1"
        assert stat.S_IMODE(os.lstat(os.path.join(root, "bin/tool")).st_mode) == 0o4755
    assert metaimage.verify(store, meta, image) is None


def test_image_is_built_once_and_found_again(store_image):
    store, image = store_image
    first = metaimage.ensure(store, image, as_erofs=True)
    st = os.stat(first.path)
    again = metaimage.ensure(store, image, as_erofs=True)
    assert again == first and os.stat(again.path).st_ino == st.st_ino
    assert not os.listdir(store.blobs.tmp)  # the staging went away
    other = store.import_dir(os.path.dirname(store.root) + "/l0")  # another chain: another image
    assert metaimage.ensure(store, other, as_erofs=True).path != first.path


@pytest.mark.parametrize("as_erofs", [True, False], ids=["erofs", "dir"])
def test_verify_finds_a_damaged_image(store_image, as_erofs):
    store, image = store_image
    meta = metaimage.ensure(store, image, as_erofs=as_erofs)
    if as_erofs:
        with open(meta.path, "r+b") as f:
            f.seek(os.path.getsize(meta.path) - 100)
            f.write(b"X")
        assert metaimage.verify(store, meta, image, fast=True) is None  # still an EROFS image
    else:
        os.chmod(os.path.join(meta.path, "etc", "motd"), 0o666)
    assert metaimage.verify(store, meta, image) is not None
    metaimage.remove(meta)
    assert metaimage.verify(store, meta, image) == "it is missing"


def test_a_layers_own_overlay_xattrs_are_escaped(store_image, tmp_path):
    """A store's entry carrying trusted.overlay.redirect/metacopy (no import keeps them;
    this one is written into the index as a damaged or hostile index would hold it) must
    not point its file at another file's blob: the image holds it escaped."""
    store, image = store_image
    tree = store.tree(image)
    target = tree.lookup("usr/lib/x.so")
    layer_num, entry = tree.lookup_in_layer("etc/more")
    crafted = [("trusted.overlay.redirect", store.blobs.path(target.blob)[len(store.blobs.dir):].encode()),
               ("trusted.overlay.metacopy", b"")]
    key = entry_key(struct.pack(">I", layer_num), "etc/more")
    hostile = pack_entry(entry._replace(xattrs=tuple(crafted)))
    store.index.write(lambda txn: txn.put(key, hostile, db=store.index.db("entries")))
    meta = metaimage.ensure(store, image, as_erofs=True)
    with mounted_erofs(meta.path, str(tmp_path / "mnt")) as mnt:
        names = os.listxattr(os.path.join(mnt, "etc/more"))
        assert "trusted.overlay.overlay.redirect" in names and "trusted.overlay.overlay.metacopy" in names
        assert os.getxattr(os.path.join(mnt, "etc/more"), "trusted.overlay.redirect") == \
            store.blobs.path(store.tree(image).lookup("etc/more").blob)[len(store.blobs.dir):].encode()


def test_collect_keeps_live_chains_and_removes_the_rest(store_image):
    store, image = store_image
    live = metaimage.ensure(store, image, as_erofs=True)
    os.makedirs(os.path.join(store.root, "meta", "v0-" + "a" * 64))  # an older layerfs's
    assert metaimage.collect(store.root, {live.key}, dry_run=True) == 1
    assert metaimage.collect(store.root, {live.key}) == 1
    assert [m.path for m in metaimage.stored(store.root)] == [live.path]
    assert metaimage.collect(store.root, set()) == 1 and metaimage.stored(store.root) == []
