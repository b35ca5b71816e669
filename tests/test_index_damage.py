"""A damaged index next to a store's blobs: missing, emptied, cut short, or another
store's. Every command fails in one line (never a SIGBUS), fsck exits 1 and names what
the index held, and gc deletes nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from helpers import assert_one_line_error, make_tar
from layerfs.store import Store

EXE = os.path.join(os.path.dirname(sys.executable), "layerfs")
TAGS = ["dir:1", "img:0", "img:1", "img:2", "latest:1"]


def lf(root: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([EXE, *args], capture_output=True, env=dict(os.environ, LAYERFS_ROOT=root),
                          timeout=300)


def blob_files(root: str) -> dict[str, bytes]:
    out = {}
    for d, _, names in os.walk(os.path.join(root, "blobs")):
        for n in names:
            with open(os.path.join(d, n), "rb") as f:
                out[os.path.join(d, n)] = f.read()
    return out


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A store with three images (one tagged twice) and a container."""
    tmp = tmp_path_factory.mktemp("damage")
    root = str(tmp / "store")
    parent = None
    for i in range(3):
        tar = make_tar(str(tmp / f"l{i}.tar"), [(f"d{i}", "d"), (f"d{i}/empty", "f", b""),
                                                (f"d{i}/link", "l", "f0")] + [
            (f"d{i}/f{j}", "f", os.urandom(300)) for j in range(200)])
        args = ["import-layer", tar, "-t", f"img:{i}"] + (["--parent", parent] if parent else [])
        proc = lf(root, *args)
        assert proc.returncode == 0, proc.stderr
        parent = proc.stdout.decode().strip()
        assert lf(root, "ls", f"img:{i}").returncode == 0  # flattened views: more pages
    assert lf(root, "tag", "img:2", "latest:1").returncode == 0
    src = tmp / "dir"
    (src / "d0").mkdir(parents=True)
    for j in range(50):
        (src / "d0" / f"f{j}").write_bytes(os.urandom(200))
    assert lf(root, "import-dir", str(src), "--parent", "img:0", "-t", "dir:1").returncode == 0
    assert lf(root, "create", "img:1", "--name", "box").returncode == 0
    return root


@pytest.fixture
def store_copy(template, tmp_path):
    root = str(tmp_path / "store")
    shutil.copytree(template, root, symlinks=True)
    return root


def data_mdb(root: str) -> str:
    return os.path.join(root, "index.lmdb", "data.mdb")


def _cut(fraction: float):
    def damage(root: str) -> None:
        size = os.path.getsize(data_mdb(root))
        os.truncate(data_mdb(root), int(size * fraction) // 4096 * 4096 + 1000)
    return damage


def _foreign(root: str) -> None:
    other = root + "-other"
    Store(other).close()  # a new, empty store (a read-only command would not make one)
    shutil.copy(data_mdb(other), data_mdb(root))


DAMAGE = {
    "emptied": lambda root: os.truncate(data_mdb(root), 0),
    "data.mdb removed": lambda root: os.unlink(data_mdb(root)),
    "index.lmdb removed": lambda root: shutil.rmtree(os.path.join(root, "index.lmdb")),
    "cut at 10%": _cut(0.1),
    "cut at 50%": _cut(0.5),
    "cut at 95%": _cut(0.95),
    "another store's index": _foreign,
}


@pytest.mark.parametrize("how", list(DAMAGE))
def test_damaged_index_is_refused_and_nothing_is_lost(store_copy, tmp_path, how):
    root = store_copy
    blobs = blob_files(root)
    assert len(blobs) >= 600
    DAMAGE[how](root)
    good = make_tar(str(tmp_path / "new.tar"), [("new", "f", b"new\n")])
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for args in (["images"], ["layers"], ["ls", "img:1"], ["cat", "img:0", "/d0/f0"], ["df"],
                 ["import-layer", good], ["rmi", "img:0"], ["ps"], ["gc"], ["prune"],
                 ["mount", "img:1", str(mnt)], ["rm", "box"], ["commit", "box"]):
        proc = lf(root, *args)
        assert proc.returncode > 0, f"layerfs {args[0]}: exit {proc.returncode}"
        line = assert_one_line_error(proc, mentions=("index",))
        assert "fsck" in line, line
    fsck = lf(root, "fsck")
    assert fsck.returncode == 1, fsck
    out = fsck.stdout.decode()
    assert "index" in out and fsck.stderr == b""
    # It names what the index held, from the marker beside it.
    for tag in TAGS:
        assert tag in out, out
    assert blob_files(root) == blobs, "a blob was deleted or changed"
    assert not os.path.ismount(str(mnt)) and os.listdir(mnt) == []


def test_fsck_json_of_a_damaged_index(store_copy):
    os.truncate(data_mdb(store_copy), 0)
    proc = lf(store_copy, "fsck", "--json")
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    assert report["clean"] is False
    assert report["problems"][0]["kind"] == "index-damaged"
    assert sorted(t for tags in report["index_held"]["images"].values() for t in tags) == TAGS


def test_a_store_made_before_the_marker_is_still_protected(store_copy):
    """No store.json (a store an older layerfs made), and the index emptied: its blob
    files alone make the empty index damage."""
    os.unlink(os.path.join(store_copy, "store.json"))
    blobs = blob_files(store_copy)
    os.truncate(data_mdb(store_copy), 0)
    assert_one_line_error(lf(store_copy, "gc"), mentions=("index",))
    assert lf(store_copy, "fsck").returncode == 1
    assert blob_files(store_copy) == blobs


def test_marker_follows_images_and_tags(store_copy):
    def held():
        with open(os.path.join(store_copy, "store.json")) as f:
            return json.load(f)["images"]
    assert sorted(t for tags in held().values() for t in tags) == TAGS
    assert lf(store_copy, "rmi", "latest:1").returncode == 0
    assert lf(store_copy, "tag", "img:0", "again:1").returncode == 0
    assert sorted(t for tags in held().values() for t in tags) == ["again:1", "dir:1", "img:0", "img:1", "img:2"]
    assert len(held()) == 4


# -- fsck --repair ------------------------------------------------------------------------------------


def _images(root: str) -> dict[str, list[str]]:
    proc = lf(root, "images", "--json")
    assert proc.returncode == 0, proc.stderr
    return {i["id"]: i["tags"] for i in json.loads(proc.stdout)}


def _whole(root: str, template_root: str, image: str) -> bool:
    """The image lists and reads as in the undamaged store."""
    for args in (["ls", "-R", "--json", image], ["cat", image, "/d0/f7"]):
        if lf(root, *args).stdout != lf(template_root, *args).stdout:
            return False
    return True


@pytest.mark.parametrize("how", ["emptied", "cut at 50%", "data.mdb removed"])
def test_repair_of_an_unreadable_index_says_what_is_lost(store_copy, tmp_path, how):
    root = store_copy
    blobs = blob_files(root)
    DAMAGE[how](root)
    proc = lf(root, "fsck", "--repair")
    assert proc.returncode == 1
    out = proc.stdout.decode()
    for tag in TAGS:
        assert "lost image: " in out and tag in out, out
    (cid,) = os.listdir(os.path.join(root, "containers"))
    # Named if its record could still be read, else by its id.
    assert any(line.startswith(("lost container box ", f"lost container {cid} "))
               and line.endswith(f"(its changes stay in containers/{cid}/upper)") for line in out.splitlines())
    assert f"moved {len(blobs)} blob files" in out and "REPAIRED" in out
    # Nothing deleted: the blobs are in lost+found/, the damaged index is kept.
    aside = {os.path.join(root, "blobs", n[:2], n[2:]): open(os.path.join(root, "lost+found", n), "rb").read()
             for n in os.listdir(os.path.join(root, "lost+found"))}
    assert aside == blobs
    assert [d for d in os.listdir(root) if d.startswith("index.lmdb.damaged-")]
    # The store works again, empty, and gc takes nothing from lost+found/.
    assert _images(root) == {}
    good = make_tar(str(tmp_path / "new.tar"), [("new", "f", b"new\n")])
    assert lf(root, "import-layer", good, "-t", "new:1").returncode == 0
    assert lf(root, "gc").returncode == 0 and len(os.listdir(os.path.join(root, "lost+found"))) == len(blobs)
    assert lf(root, "fsck").returncode == 0


def test_repair_rebuilds_lost_entries_from_the_tar_split(store_copy, template):
    """The entries of a tar layer lost (its tar-split and blobs whole): fsck finds it,
    and the repair re-reads the layer's tar to get them back."""
    import lmdb
    import struct

    env = lmdb.open(os.path.join(store_copy, "index.lmdb"), max_dbs=32)
    with env.begin(write=True) as txn:
        entries = env.open_db(b"entries", txn=txn, create=False)
        cur = txn.cursor(db=entries)
        prefix = struct.pack(">I", 2)
        cur.set_range(prefix)
        n = 0
        while cur.key()[:4] == prefix and cur.delete():
            n += 1
    env.close()
    assert n > 100
    check = lf(store_copy, "fsck")
    assert check.returncode == 1 and b"missing-entries" in check.stdout
    proc = lf(store_copy, "fsck", "--repair")
    assert proc.returncode == 1
    assert b"rebuilt 4 of 4 layers, 4 images" in proc.stdout, proc.stdout
    assert _images(store_copy) == _images(template)
    for image in TAGS:
        assert _whole(store_copy, template, image)
    assert lf(store_copy, "fsck").returncode == 0


def test_repair_of_damaged_pages_keeps_every_whole_image(store_copy, template, tmp_path):
    """Pages in the middle of the index overwritten: the repair keeps each image that
    still reads whole, names each it lost, and leaves a store fsck finds clean."""
    size = os.path.getsize(data_mdb(store_copy))
    tried = 0
    for off in range(size // 3 // 4096 * 4096, size, 4096 * 7):
        root = str(tmp_path / f"s{off}")
        shutil.copytree(template, root)
        with open(data_mdb(root), "r+b") as f:
            f.seek(off)
            f.write(b"\xa5" * 8192)
        if lf(root, "fsck").returncode == 0:
            shutil.rmtree(root)
            continue  # pages no record lives in
        tried += 1
        proc = lf(root, "fsck", "--repair")
        assert proc.returncode == 1 and b"REPAIRED" in proc.stdout, proc
        kept = _images(root)
        lost = {line.split()[2] for line in proc.stdout.decode().splitlines() if line.startswith("lost image:")}
        assert set(kept) | lost == set(_images(template)) and not set(kept) & lost
        for image_id in kept:
            assert _whole(root, template, image_id)
        assert lf(root, "fsck").returncode == 0, lf(root, "fsck").stdout
        shutil.rmtree(root)
        if tried == 4:
            break
    assert tried, "no damaged page was found that fsck noticed"


def test_repair_cannot_rebuild_a_directory_layer_without_its_entries(store_copy, template):
    """A layer made from a directory has no tar-split: with its entries lost it is lost,
    and so is its image; the others stay whole."""
    import lmdb
    import struct

    env = lmdb.open(os.path.join(store_copy, "index.lmdb"), max_dbs=32)
    with env.begin(write=True) as txn:
        cur = txn.cursor(db=env.open_db(b"entries", txn=txn, create=False))
        prefix = struct.pack(">I", 4)
        cur.set_range(prefix)
        while cur.key()[:4] == prefix and cur.delete():
            pass
    env.close()
    proc = lf(store_copy, "fsck", "--repair")
    out = proc.stdout.decode()
    assert proc.returncode == 1 and "rebuilt 3 of 4 layers, 3 images" in out, out
    dir_image = json.loads(lf(template, "inspect", "dir:1").stdout)["id"]
    assert f"lost image: {dir_image} (dir:1)" in out and "lost layer: sha256:" in out
    assert set(_images(store_copy)) == set(_images(template)) - {dir_image}
    for image in ("img:0", "img:1", "img:2"):
        assert _whole(store_copy, template, image)
    assert lf(store_copy, "fsck").returncode == 0


def test_a_data_file_that_ends_in_free_pages_is_not_taken_for_a_truncated_one(tmp_path):
    # LMDB leaves pages it allocated and freed within a transaction unwritten: the data
    # file may end before the last page number, with only free pages missing. Seen under
    # concurrent imports, commits and gc as a false "truncated". A cut into a page in
    # use is still damage.
    import lmdb

    from layerfs.store import index

    path = str(tmp_path / "db")
    env = lmdb.open(path, map_size=1 << 30)
    with env.begin(write=True) as txn:
        txn.put(b"keep", b"v")
    with env.begin(write=True) as txn:
        txn.put(b"big", b"x" * 100_000)  # overflow pages at the end of the file
    with env.begin(write=True) as txn:
        txn.delete(b"big")  # freed; later transactions move the tree into low pages
    for i in range(4):
        with env.begin(write=True) as txn:
            txn.put(b"k%d" % i, b"v")
    env.close()
    size, page_size, last_pg, free_root = index._newest_meta(path)
    with open(index.data_file(path), "rb") as f:
        free = index._free_pages(f.fileno(), page_size, free_root, size // page_size)
    used = [p for p in range(last_pg + 1) if p not in free]
    assert used[-1] < last_pg - 2, f"no free pages at the end to cut: in use {used}"

    damaged = str(tmp_path / "damaged")
    shutil.copytree(path, damaged)
    os.truncate(index.data_file(path), (used[-1] + 1) * page_size)  # only free pages go
    assert index.truncation(path) is None
    env = lmdb.open(path, map_size=1 << 30)
    with env.begin() as txn:
        assert [k for k, _ in txn.cursor()] == [b"k0", b"k1", b"k2", b"k3", b"keep"]
    env.close()

    os.truncate(index.data_file(damaged), used[-1] * page_size)  # a page in use goes too
    assert "truncated" in index.truncation(damaged)
