"""Paths as long as the kernel allows (4,095 bytes, 255-byte names, any depth) through
import, ls, cat, export, mount, commit, gc and fsck; longer ones refused in one line; an
index written by the previous schema (whole parent paths in the keys) upgraded on open."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import struct
import tarfile

import lmdb
import pytest

from helpers import assert_one_line_error, make_tar, sha256_file, store_snapshot
from layerfs.store import Store
from layerfs.store import index as index_module

SEG = "s" * 99
DEEP_DIR = "/".join([SEG] * 40)  # 3,999 bytes, 40 levels
DEEP_FILE = DEEP_DIR + "/file"  # 4,004 bytes
NARROW_DIR = "/".join(["a"] * 2040)  # 4,079 bytes, 2,040 levels
NARROW_FILE = NARROW_DIR + "/f"
LONG_NAME = "n" * 255
MAX_PATH = "/".join([SEG] * 40) + "/" + "t" * 95  # exactly 4,095 bytes

MEMBERS = [
    (DEEP_FILE, "f", b"at the bottom of a deep tree\n"),
    (DEEP_DIR + "/link", "l", "file"),
    (NARROW_FILE, "f", b"at the bottom of a narrow tree\n"),
    (LONG_NAME, "f", b"a name of 255 bytes\n"),
    (SEG + "/" + LONG_NAME, "d"),
    (MAX_PATH, "f", b"a path of 4095 bytes\n"),
    ("short", "f", b"short\n"),
]


def test_paths_of_the_maximum_length():
    assert len(DEEP_FILE.encode()) == 4004 and len(NARROW_FILE.encode()) == 4081
    assert len(MAX_PATH.encode()) == 4095 and NARROW_DIR.count("/") == 2039


@pytest.fixture
def deep_image(layerfs, tmp_path):
    tar = make_tar(str(tmp_path / "deep.tar"), MEMBERS)
    layerfs("import-layer", tar, "-t", "deep:1", check=True)
    return tar


def test_import_ls_cat_export_gc_fsck(layerfs, deep_image, store_root, tmp_path):
    for path, _, data in [m for m in MEMBERS if m[1] == "f"]:
        assert layerfs("cat", "deep:1", "/" + path, check=True).stdout == data, path[-40:]
    assert layerfs("cat", "deep:1", "/" + DEEP_DIR + "/link", check=True).stdout.startswith(b"at the")
    listing = json.loads(layerfs("ls", "--json", "deep:1", "/" + DEEP_DIR, check=True).stdout)
    assert [row["path"] for row in listing] == ["/" + DEEP_DIR + n for n in ("/file", "/link", "/" + "t" * 95)]
    top = layerfs("ls", "deep:1", "/", check=True).stdout.decode().split()
    assert LONG_NAME in top and "a" in top and SEG in top
    layers = layerfs("layers", "--json", check=True)
    (layer,) = json.loads(layers.stdout)
    out = str(tmp_path / "out.tar")
    layerfs("export-layer", layer["id"], "-o", out, check=True)
    assert sha256_file(out) == sha256_file(deep_image) == layer["id"]
    before = store_snapshot(store_root)
    layerfs("gc", check=True)
    assert store_snapshot(store_root)[1] == before[1], "gc removed blobs of a deep image"
    fsck = layerfs("fsck", check=True)
    assert b"clean" in fsck.stdout


class _CountingTxn:
    def __init__(self, txn, keys: list) -> None:
        self.txn, self.keys = txn, keys

    def get(self, key, *args, **kw):
        self.keys.append(key)
        return self.txn.get(key, *args, **kw)


def test_lookup_is_one_read_at_any_depth(deep_image, store_root, monkeypatch):
    """A lookup reads one merged record and one entry, with short keys, whatever the
    depth: count the LMDB reads of a lookup at depth 1 and at depth 2,041."""
    with Store(store_root) as s:
        tree = s.tree("deep:1")
        real_read = type(s.index).read
        keys: list[bytes] = []

        @contextlib.contextmanager
        def counting_read(self):
            with real_read(self) as txn:
                yield _CountingTxn(txn, keys)

        monkeypatch.setattr(type(s.index), "read", counting_read)
        for path in ("short", NARROW_FILE, MAX_PATH):
            keys.clear()
            assert tree.lookup(path) is not None
            assert len(keys) == 2, f"{len(keys)} reads at depth {path.count('/') + 1}"
            assert all(len(k) <= 4 + 16 + 255 for k in keys)


def test_mount_shows_deep_paths(layerfs, deep_image, mounts, tmp_path):
    mnt = str(tmp_path / "m")
    mounts("deep:1", mnt, "--read-only")
    root = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for directory, name, data in ((NARROW_DIR, "f", b"at the bottom of a narrow tree\n"),
                                      (DEEP_DIR, "file", b"at the bottom of a deep tree\n")):
            fd = _walk_to(root, directory)
            try:
                assert name in os.listdir(fd)
                f = os.open(name, os.O_RDONLY, dir_fd=fd)
                try:
                    assert os.read(f, 100) == data
                finally:
                    os.close(f)
            finally:
                os.close(fd)
        assert sorted(os.listdir(root)) == sorted(["a", LONG_NAME, SEG, "short"])
    finally:
        os.close(root)


def _walk_to(root_fd: int, path: str) -> int:
    fd = os.dup(root_fd)
    for part in path.split("/"):
        nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        os.close(fd)
        fd = nfd
    return fd


def test_commit_of_deep_paths(layerfs, deep_image, store_root, tmp_path):
    """A container's upper holding paths of up to 4,095 bytes (written straight into it,
    as the mount writes it) commits, and the new image shows them."""
    cid = layerfs("create", "deep:1", "--name", "deepc", check=True).stdout.decode().strip()
    upper = os.open(os.path.join(store_root, "containers", cid, "upper"), os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = upper
        for part in ["b"] * 2045:
            os.mkdir(part, dir_fd=fd)
            nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            if fd != upper:
                os.close(fd)
            fd = nfd
        w = os.open("new", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(w, b"new at depth 2046\n")
        os.close(w)
        os.close(fd)
    finally:
        os.close(upper)
    try:
        new_path = "/".join(["b"] * 2045) + "/new"
        assert len(new_path.encode()) == 4093
        diff = layerfs("diff", "deepc", check=True).stdout.decode().splitlines()
        assert "A /" + new_path in diff and len(diff) == 2046
        layerfs("commit", "deepc", "-t", "deep:2", check=True)
        assert layerfs("cat", "deep:2", "/" + new_path, check=True).stdout == b"new at depth 2046\n"
        assert layerfs("cat", "deep:2", "/" + NARROW_FILE, check=True).stdout.startswith(b"at the bottom")
        assert layerfs("fsck", check=True).returncode == 0
        # The commit's canonical tar exports, its sha256 the layer id, the deep file in it.
        top = json.loads(layerfs("inspect", "deep:2", check=True).stdout)["layers"][-1]
        out = layerfs("export-layer", top, "-o", "-", check=True).stdout
        assert "sha256:" + hashlib.sha256(out).hexdigest() == top
        assert new_path in tarfile.open(fileobj=io.BytesIO(out)).getnames()
    finally:
        # rm takes the deep upper away (pytest's own clean-up recurses once per level).
        layerfs("rm", "deepc", check=True)
    assert not os.path.exists(os.path.join(store_root, "containers", cid))


def test_name_of_256_bytes_is_refused(layerfs, tmp_path, store_root):
    tar = make_tar(str(tmp_path / "n256.tar"), [("ok", "f", b"x"), ("d/" + "n" * 256, "f", b"x")])
    line = assert_one_line_error(layerfs("import-layer", tar))
    assert "256 bytes" in line and "255" in line
    assert layerfs("images", "-q", check=True).stdout == b""


@pytest.mark.parametrize("what", ["file", "dir", "whiteout", "symlink target", "hard link name"])
def test_path_over_4095_bytes_is_refused(layerfs, tmp_path, what):
    long = MAX_PATH + "x"
    members = {
        "file": [(long, "f", b"x")],
        "dir": [(long, "d")],
        "whiteout": [(MAX_PATH[:-95] + ".wh." + "t" * 96, "f", b"")],
        "symlink target": [("l", "l", "/" + "t" * 4095)],
        "hard link name": [("f", "f", b"x"), (long, "h", "f")],
    }[what]
    tar = make_tar(str(tmp_path / "long.tar"), members)
    line = assert_one_line_error(layerfs("import-layer", tar))
    assert "4095 bytes" in line, line
    assert layerfs("images", "-q", check=True).stdout == b""


# -- an index of schema 1 ------------------------------------------------------------------------


def _downgrade_to_schema_1(root: str) -> None:
    """Rewrite a schema-2 index as the previous layerfs wrote it: entries keyed by
    ``num | parent path | NUL | name``, no merged views, schema 1."""
    with Store(root) as s:
        from layerfs.store.keys import walk
        from layerfs.store.records import entry_is_dir
        layers = s.layers()
        records = []
        with s.index.read() as txn:
            for layer in layers:
                prefix = struct.pack(">I", layer.num)
                for path, key, value in walk(txn, s.index.db("entries"), prefix, entry_is_dir):
                    parent, _, name = path.rpartition("/")
                    records.append((key, prefix + parent.encode() + b"\0" + name.encode(), value))

        def txn_fn(txn):
            for new_key, _, _ in records:
                txn.delete(new_key, db=s.index.db("entries"))
            for _, old_key, value in records:
                txn.put(old_key, value, db=s.index.db("entries"))
            txn.drop(s.index.db("merged"), delete=False)
            txn.drop(s.index.db("chains"), delete=False)
            txn.put(b"schema", struct.pack("<I", 1), db=s.index.db("meta"))
        s.index.write(txn_fn)


def test_schema_1_index_is_upgraded_on_open(layerfs, tmp_path, store_root):
    one = make_tar(str(tmp_path / "one.tar"), [("etc", "d"), ("etc/a", "f", b"a\n"),
                                               ("etc/sub", "d"), ("etc/sub/b", "f", b"b\n"),
                                               ("gone", "f", b"gone\n")])
    two = make_tar(str(tmp_path / "two.tar"), [("etc", "d"), ("etc/sub", "d"),
                                               ("etc/sub/c", "l", "b"), (".wh.gone", "f", b"")])
    img = layerfs("import-layer", one, "-t", "one:1", check=True).stdout.decode().strip()
    layerfs("import-layer", two, "--parent", img, "-t", "two:1", check=True)
    before = layerfs("ls", "-R", "--json", "two:1", check=True).stdout
    _downgrade_to_schema_1(store_root)

    assert layerfs("ls", "-R", "--json", "two:1", check=True).stdout == before
    assert layerfs("cat", "two:1", "/etc/sub/c", check=True).stdout == b"b\n"
    assert layerfs("cat", "one:1", "/gone", check=True).stdout == b"gone\n"
    env = lmdb.open(os.path.join(store_root, "index.lmdb"), max_dbs=32, readonly=True, lock=False)
    with env.begin() as txn:
        raw = txn.get(b"schema", db=env.open_db(b"meta", txn=txn, create=False))
    env.close()
    assert struct.unpack("<I", raw)[0] == index_module.SCHEMA_VERSION == 2
    assert layerfs("fsck", check=True).returncode == 0
    # Export still gives the original bytes.
    ids = {layer["comment"]: layer["id"] for layer in json.loads(layerfs("layers", "--json", check=True).stdout)}
    for name, tar in (("one.tar", one), ("two.tar", two)):
        buf = layerfs("export-layer", ids[name], "-o", "-", check=True).stdout
        assert "sha256:" + hashlib.sha256(buf).hexdigest() == sha256_file(tar)
        assert len(tarfile.open(fileobj=io.BytesIO(buf)).getnames()) >= 2


def test_container_creates_and_commits_long_paths_through_the_mount(layerfs, deep_image, mounts,
                                                                     tmp_path):
    """What the issue saw fail (MDB_BAD_VALSIZE at commit from 508 bytes): a container
    makes 1,500-byte paths through the mount, and they commit."""
    mnt = str(tmp_path / "m")
    mounts("deep:1", mnt)
    tail = "/".join(["c" * 99] * 15)  # 1,499 bytes
    os.makedirs(os.path.join(mnt, tail))
    with open(os.path.join(mnt, tail, "made"), "w") as f:
        f.write("made in the container\n")
    os.rename(os.path.join(mnt, "short"), os.path.join(mnt, tail, "moved"))
    (c,) = json.loads(layerfs("ps", "--json", check=True).stdout)
    layerfs("commit", c["id"], "-t", "deep:3", check=True)
    assert layerfs("cat", "deep:3", f"/{tail}/made", check=True).stdout == b"made in the container\n"
    assert layerfs("cat", "deep:3", f"/{tail}/moved", check=True).stdout == b"short\n"
    assert layerfs("cat", "deep:3", "/short").returncode != 0
    diff = layerfs("diff", c["id"], check=True).stdout.decode().splitlines()
    assert f"A /{tail}/made" in diff and "D /short" in diff
