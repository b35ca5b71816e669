"""Blobs and the index: dedup, hash collisions, a 2 GiB file in bounded memory, schema
versions and a map that grows instead of failing."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tarfile
import threading

import lmdb
import pytest

from layerfs.store import Store
from layerfs.store import blobs as blobs_module
from layerfs.store import index as index_module
from layerfs.store.records import Kind

from helpers import assert_one_line_error, make_tar, store_snapshot

LAYERFS = os.path.join(os.path.dirname(sys.executable), "layerfs")


def read_back(store: Store, image, path: str) -> bytes:
    """A file of an image's merged tree, read the way a user of the API would."""
    _, entry = store.tree(image).resolve(path)
    assert entry.kind == Kind.REG, f"{path} is a {entry.kind.name}"
    with store.blobs.open(entry.blob) as f:
        return f.read()


def blob_of(store: Store, image, path: str) -> str:
    return store.tree(image).resolve(path)[1].blob


def blob_files(root: str) -> list[str]:
    out = []
    for dirpath, _, filenames in os.walk(os.path.join(root, "blobs")):
        out += [os.path.join(dirpath, f) for f in filenames]
    return sorted(out)


def tar_sha(path: str) -> str:
    with open(path, "rb") as f:
        return "sha256:" + hashlib.sha256(f.read()).hexdigest()


def exported(store: Store, diff_id: str) -> str:
    buf = io.BytesIO()
    store.export_layer(diff_id, buf)
    return "sha256:" + hashlib.sha256(buf.getvalue()).hexdigest()


# -- (a) dedup --------------------------------------------------------------------------------


def test_identical_contents_are_stored_once(store, store_root, tmp_path):
    same = b"the same bytes in many places\n" * 1000
    other = b"something else\n"
    t1 = make_tar(str(tmp_path / "one.tar"), [
        ("etc", "d"), ("etc/a", "f", same), ("usr/share/b", "f", same), ("etc/other", "f", other)])
    t2 = make_tar(str(tmp_path / "two.tar"), [("opt/c", "f", same), ("opt/other2", "f", other)])
    t3 = make_tar(str(tmp_path / "three.tar"), [("d", "f", same)])
    base = store.import_tar(t1, tag="one:1")
    top = store.import_tar(t2, parent=base.image_id, tag="two:1")
    alone = store.import_tar(t3, tag="three:1")  # an unrelated image
    src = tmp_path / "dir"
    (src / "x").mkdir(parents=True)
    (src / "x" / "e").write_bytes(same)
    from_dir = store.import_dir(str(src), tag="four:1")

    ids = {blob_of(store, top, p) for p in ("/etc/a", "/usr/share/b", "/opt/c")}
    ids |= {blob_of(store, alone, "/d"), blob_of(store, from_dir, "/x/e")}
    assert len(ids) == 1, f"identical contents got {len(ids)} blobs: {ids}"
    assert blob_of(store, top, "/etc/other") == blob_of(store, top, "/opt/other2")
    assert blob_of(store, top, "/etc/other") not in ids

    assert len(blob_files(store_root)) == 2
    usage = store.df()
    assert usage.blobs == 2
    assert usage.stored_bytes == len(same) + len(other)
    assert usage.logical_bytes == 5 * len(same) + 2 * len(other)
    assert usage.saved_bytes == 4 * len(same) + len(other)
    for img, path in ((top, "/etc/a"), (top, "/opt/c"), (alone, "/d"), (from_dir, "/x/e")):
        assert read_back(store, img, path) == same


def test_reimporting_a_layer_adds_nothing(layerfs, store_root, tmp_path):
    t = make_tar(str(tmp_path / "one.tar"), [("a", "f", b"aaa\n" * 100), ("b", "f", b"bbb\n")])
    layerfs("import-layer", t, "-t", "one:1", check=True)
    files = blob_files(store_root)
    layerfs("import-layer", t, "-t", "one:2", check=True)
    assert blob_files(store_root) == files
    layers = json.loads(layerfs("layers", "--json", check=True).stdout)
    assert len(layers) == 1


# -- (a2) how blobs are staged and published ------------------------------------------------------

STAGED = {"small": b"small contents\n" * 3, "at-limit": b"s" * blobs_module.SMALL,
          "above": b"b" * (blobs_module.SMALL + 1), "empty": b""}


def _import_staged(store: Store, tmp_path, name: str):
    t = make_tar(str(tmp_path / f"{name}.tar"), [(k, "f", v) for k, v in STAGED.items()])
    img = store.import_tar(t, tag=f"{name}:1")
    for k, v in STAGED.items():
        assert read_back(store, img, "/" + k) == v
    assert exported(store, img.layers[-1]) == tar_sha(t) == img.layers[-1]
    return img


def test_blobs_are_private_and_read_only_whatever_the_umask(store, store_root, tmp_path):
    """Staged files are created 0400; a umask that takes the owner's read bit away does
    not leave a blob nobody may read."""
    old = os.umask(0o477)
    try:
        _import_staged(store, tmp_path, "umask")
    finally:
        os.umask(old)
    files = blob_files(store_root)
    assert len(files) == 3  # the empty file has no blob
    assert {oct(os.stat(f).st_mode & 0o7777) for f in files} == {oct(0o400)}


def test_blobs_are_published_without_renameat2(store, store_root, tmp_path, monkeypatch):
    """Where the C library has no renameat2, a blob is published by link and unlink,
    and an existing blob is never replaced."""
    monkeypatch.setattr(blobs_module, "_renameat2", None)
    img = _import_staged(store, tmp_path, "nort2")
    files = blob_files(store_root)
    assert len(files) == 3
    before = {f: os.stat(f).st_ino for f in files}
    _import_staged(store, tmp_path, "nort2-again")  # the same contents: nothing replaced
    assert {f: os.stat(f).st_ino for f in blob_files(store_root)} == before
    assert not os.listdir(os.path.join(store_root, "tmp"))  # nothing staged is left behind
    assert store.fsck().clean
    assert img.layers


# -- (b) forced xxh3 collisions -------------------------------------------------------------------


class ConstantHasher:
    """Every content gets the same 'hash'."""

    DIGEST = "c0111de5" * 4

    def update(self, data: bytes) -> None:
        pass

    def hexdigest(self) -> str:
        return self.DIGEST


@pytest.fixture
def colliding(monkeypatch):
    monkeypatch.setattr(blobs_module, "new_hasher", ConstantHasher)


BIG = random.Random(11).randbytes((2 << 20) + 5)  # spans several compare chunks
CONTENTS = {
    "a": b"alpha\n" * 10,
    "b": b"alphb\n" * 10,  # same length as a, different bytes
    "c": b"alpha\n" * 10 + b"!",  # a with one more byte
    "d": b"alpha\n" * 9,  # a prefix of a
    "big1": BIG,
    "big2": BIG[:-1] + bytes([BIG[-1] ^ 1]),  # differs only in the last byte
    "big3": bytes([BIG[0] ^ 1]) + BIG[1:],  # differs only in the first byte
}


def test_collision_within_one_layer(store, store_root, tmp_path, colliding):
    members = [(f"files/{k}", "f", v) for k, v in CONTENTS.items()]
    members += [("files/a-again", "f", CONTENTS["a"]), ("files/big1-again", "f", CONTENTS["big1"]),
                ("files/empty", "f", b"")]
    t = make_tar(str(tmp_path / "collide.tar"), members)
    img = store.import_tar(t, tag="collide:1")

    ids = {k: blob_of(store, img, f"/files/{k}") for k in CONTENTS}
    assert len(set(ids.values())) == len(CONTENTS), f"different contents share a blob: {ids}"
    assert all(i.startswith(ConstantHasher.DIGEST) for i in ids.values()), ids
    assert blob_of(store, img, "/files/a-again") == ids["a"]
    assert blob_of(store, img, "/files/big1-again") == ids["big1"]
    for k, v in CONTENTS.items():
        assert read_back(store, img, f"/files/{k}") == v, f"{k} came back different"
    assert read_back(store, img, "/files/a-again") == CONTENTS["a"]
    assert read_back(store, img, "/files/empty") == b""
    assert len(blob_files(store_root)) == len(CONTENTS)
    assert store.df().stored_bytes == sum(len(v) for v in CONTENTS.values())
    layer = store.image_layers(img)[0]
    assert exported(store, layer.diff_id) == tar_sha(t) == layer.diff_id


def test_collision_across_imports(store, store_root, tmp_path, colliding):
    first = {k: CONTENTS[k] for k in ("a", "b", "big1")}
    t1 = make_tar(str(tmp_path / "one.tar"), [(k, "f", v) for k, v in first.items()])
    img1 = store.import_tar(t1, tag="one:1")
    ids1 = {k: blob_of(store, img1, "/" + k) for k in first}
    assert len(set(ids1.values())) == 3

    # New contents under the same hash, and old contents again, on top and separately.
    second = {"c2": CONTENTS["c"], "big2": CONTENTS["big2"], "b2": CONTENTS["b"],
              "a2": CONTENTS["a"], "big1b": CONTENTS["big1"]}
    t2 = make_tar(str(tmp_path / "two.tar"), [(k, "f", v) for k, v in second.items()])
    img2 = store.import_tar(t2, parent=img1.image_id, tag="two:1")
    t3 = make_tar(str(tmp_path / "three.tar"), [("d3", "f", CONTENTS["d"]),
                                                ("b3", "f", CONTENTS["b"]),
                                                ("big3", "f", CONTENTS["big3"])])
    img3 = store.import_tar(t3, tag="three:1")

    ids2 = {k: blob_of(store, img2, "/" + k) for k in list(first) + list(second)}
    ids3 = {k: blob_of(store, img3, "/" + k) for k in ("d3", "b3", "big3")}
    assert ids2["a2"] == ids1["a"] and ids2["b2"] == ids1["b"] and ids2["big1b"] == ids1["big1"]
    assert ids3["b3"] == ids1["b"]
    distinct = {ids1["a"], ids1["b"], ids1["big1"], ids2["c2"], ids2["big2"], ids3["d3"], ids3["big3"]}
    assert len(distinct) == 7, f"different contents share a blob: {ids2} {ids3}"
    assert all(i.startswith(ConstantHasher.DIGEST) for i in distinct), distinct
    assert len(blob_files(store_root)) == 7

    expected2 = {**first, **second}
    for k, v in expected2.items():
        assert read_back(store, img2, "/" + k) == v, f"{k} came back different"
    for k, v in {"d3": CONTENTS["d"], "b3": CONTENTS["b"], "big3": CONTENTS["big3"]}.items():
        assert read_back(store, img3, "/" + k) == v, f"{k} came back different"
    for img, t in ((img1, t1), (img2, t2), (img3, t3)):
        diff_id = img.layers[-1]
        assert exported(store, diff_id) == tar_sha(t) == diff_id


def test_collision_in_a_directory_import(store, tmp_path, colliding):
    src = tmp_path / "dir"
    src.mkdir()
    for k, v in CONTENTS.items():
        (src / k).write_bytes(v)
    (src / "a-again").write_bytes(CONTENTS["a"])
    img = store.import_dir(str(src), tag="dir:1")
    ids = {k: blob_of(store, img, "/" + k) for k in CONTENTS}
    assert len(set(ids.values())) == len(CONTENTS)
    assert blob_of(store, img, "/a-again") == ids["a"]
    for k, v in CONTENTS.items():
        assert read_back(store, img, "/" + k) == v


def test_collided_blobs_read_back_in_a_new_process(store_root, tmp_path, colliding, layerfs):
    t = make_tar(str(tmp_path / "collide.tar"), [(k, "f", v) for k, v in CONTENTS.items()])
    with Store(store_root) as s:
        s.import_tar(t, tag="collide:1")
    # A new process with the same forced hash reads every content back intact.
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import layerfs.store.blobs, test_blobs_index; "
            "layerfs.store.blobs.new_hasher = test_blobs_index.ConstantHasher; import layerfs.cli; "
            "sys.argv = ['layerfs', 'cat', 'collide:1', sys.argv[2]]; layerfs.cli.main()")
    env = dict(os.environ, LAYERFS_ROOT=store_root)
    for k, v in CONTENTS.items():
        proc = subprocess.run([sys.executable, "-c", code, os.path.dirname(__file__), "/" + k],
                              capture_output=True, env=env)
        assert proc.returncode == 0, proc.stderr.decode()
        assert proc.stdout == v
    # Without the forced hash, reads check contents against the blob id and refuse.
    proc = layerfs("cat", "collide:1", "/a")
    assert proc.returncode != 0 and b"damaged" in proc.stderr and proc.stdout == b""


# -- (c) a 2 GiB file in bounded memory ---------------------------------------------------------------

TWO_GIB = 2 << 30
MAX_RSS = 200 * 1000 * 1000
WATCHDOG = 300  # seconds


def _wait_with_rusage(proc: subprocess.Popen) -> tuple[int, int]:
    """(exit code, peak RSS in bytes) of a child, from wait4 (only that child's usage)."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss * 1024


def test_2gib_file_imports_in_bounded_memory(tmp_path):
    root = tmp_path / "bigstore"
    env = dict(os.environ, LAYERFS_ROOT=str(root))
    try:
        ti = tarfile.TarInfo("big.bin")
        ti.size, ti.mode, ti.mtime = TWO_GIB, 0o644, 1_700_000_000
        header = ti.tobuf(format=tarfile.USTAR_FORMAT)
        base = random.Random(13).randbytes(1 << 20)
        sha = hashlib.sha256()

        err_path = tmp_path / "import.err"
        with open(err_path, "wb") as err:
            proc = subprocess.Popen([LAYERFS, "import-layer", "-", "-t", "big:1"],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                    env=env)
            watchdog = threading.Timer(WATCHDOG, proc.kill)  # a hung import fails, not hangs
            watchdog.start()
            try:
                proc.stdin.write(header)
                for i in range(TWO_GIB >> 20):
                    chunk = i.to_bytes(8, "little") + base[8:]  # every MiB different
                    sha.update(chunk)
                    proc.stdin.write(chunk)
                proc.stdin.write(b"\0" * 1024)
                proc.stdin.close()
            except BrokenPipeError:
                pass
            out = proc.stdout.read()
            proc.stdout.close()
            code, rss = _wait_with_rusage(proc)
            watchdog.cancel()
        assert code == 0, f"import failed ({code}): {err_path.read_text()}"
        assert out.startswith(b"sha256:")
        assert rss < MAX_RSS, f"importing a 2 GiB file took {rss / 1e6:.0f} MB of memory"

        cat = subprocess.Popen([LAYERFS, "cat", "big:1", "/big.bin"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=env)
        watchdog = threading.Timer(WATCHDOG, cat.kill)
        watchdog.start()
        got, n = hashlib.sha256(), 0
        while chunk := cat.stdout.read(1 << 20):
            got.update(chunk)
            n += len(chunk)
        cat.stdout.close()
        cat_err = cat.stderr.read()
        cat.stderr.close()
        code, cat_rss = _wait_with_rusage(cat)
        watchdog.cancel()
        assert code == 0, cat_err
        assert n == TWO_GIB
        assert got.hexdigest() == sha.hexdigest(), "the 2 GiB file came back different"
        assert cat_rss < MAX_RSS, f"reading a 2 GiB file took {cat_rss / 1e6:.0f} MB of memory"
    finally:
        shutil.rmtree(root, ignore_errors=True)


# -- (d) the index ----------------------------------------------------------------------------------------


def _index_path(root: str) -> str:
    return os.path.join(root, "index.lmdb")


def _schema(root: str) -> int:
    env = lmdb.open(_index_path(root), max_dbs=32, readonly=True, lock=False)
    try:
        meta = env.open_db(b"meta", create=False)
        with env.begin() as txn:
            return struct.unpack("<I", txn.get(b"schema", db=meta))[0]
    finally:
        env.close()


def test_store_from_a_newer_layerfs_is_refused(layerfs, store_root, tmp_path):
    good = make_tar(str(tmp_path / "good.tar"), [("hello", "f", b"hello\n")])
    layerfs("import-layer", good, "-t", "good:1", check=True)
    assert _schema(store_root) == index_module.SCHEMA_VERSION
    newer = index_module.SCHEMA_VERSION + 1
    env = lmdb.open(_index_path(store_root), max_dbs=32)
    meta = env.open_db(b"meta")
    with env.begin(write=True) as txn:
        txn.put(b"schema", struct.pack("<I", newer), db=meta)
    env.close()
    before = store_snapshot(store_root)

    other = make_tar(str(tmp_path / "other.tar"), [("other", "f", b"other\n")])
    for args in (["images"], ["ls", "good:1"], ["cat", "good:1", "/hello"], ["df"],
                 ["import-layer", other, "-t", "other:1"], ["rmi", "good:1"]):
        line = assert_one_line_error(layerfs(*args))
        assert "newer layerfs" in line, line
    assert _schema(store_root) == newer, "an older layerfs rewrote the schema version"
    assert store_snapshot(store_root) == before


def _many_entries_tar(path: str) -> tuple[str, dict[str, bytes], dict[str, str]]:
    """~5,000 entries: 50 dirs, each with 40 files of their own contents, 40 empty files
    and 19 symlinks. Returns (path, files -> contents, symlinks -> targets)."""
    members, files, links = [], {}, {}
    for d in range(50):
        members.append((f"d{d:02}", "d"))
        for i in range(40):
            name, data = f"d{d:02}/file{i:02}", f"contents of {d}/{i}\n".encode() * (1 + i % 5)
            files[name] = data
            members.append((name, "f", data))
        for i in range(40):
            files[f"d{d:02}/empty{i:02}"] = b""
            members.append((f"d{d:02}/empty{i:02}", "f", b""))
        for i in range(19):
            links[f"d{d:02}/link{i:02}"] = f"file{i:02}"
            members.append((f"d{d:02}/link{i:02}", "l", f"file{i:02}"))
    assert len(members) == 5000
    return make_tar(path, members), files, links


SMALL_MAP = 1 << 20


def test_index_map_grows_instead_of_failing(layerfs, store_root, tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERFS_MAP_SIZE", str(SMALL_MAP))
    t, files, links = _many_entries_tar(str(tmp_path / "many.tar"))
    proc = layerfs("import-layer", t, "-t", "many:1")
    assert proc.returncode == 0, proc.stderr.decode()
    data_mdb = os.path.join(_index_path(store_root), "data.mdb")
    assert os.path.getsize(data_mdb) > SMALL_MAP, "the import never needed more than the map"

    # A second process, starting again from the small map size, reads it all.
    proc = layerfs("ls", "-R", "--json", "many:1")
    assert proc.returncode == 0, proc.stderr.decode()
    listed = {row["path"]: row for row in json.loads(proc.stdout)}
    expected = {"/" + p for p in files} | {"/" + p for p in links} | {f"/d{d:02}" for d in range(50)}
    assert set(listed) == expected
    for p, target in links.items():
        assert listed["/" + p]["type"] == "symlink" and listed["/" + p]["target"] == target
    for p, data in files.items():
        assert listed["/" + p]["size"] == len(data)
    assert layerfs("cat", "many:1", "/d49/file39", check=True).stdout == files["d49/file39"]
    assert layerfs("cat", "many:1", "/d07/link03", check=True).stdout == files["d07/file03"]

    # And a third, through the API: every file's bytes.
    with Store(store_root) as s:
        tree = s.tree("many:1")
        for p, data in files.items():
            entry = tree.lookup(p)
            with s.blobs.open(entry.blob) as f:
                assert f.read() == data, p
        layer = s.image_layers(s.resolve_image("many:1"))[0]
        assert layer.entries >= 5000
        assert exported(s, layer.diff_id) == tar_sha(t)


def test_open_store_follows_a_map_grown_by_another_process(layerfs, store_root, tmp_path,
                                                            monkeypatch):
    monkeypatch.setenv("LAYERFS_MAP_SIZE", str(SMALL_MAP))
    small = make_tar(str(tmp_path / "small.tar"), [("hello", "f", b"hello\n")])
    layerfs("import-layer", small, "-t", "small:1", check=True)
    t, files, _ = _many_entries_tar(str(tmp_path / "many.tar"))
    with Store(store_root, map_size=SMALL_MAP) as s:
        assert read_back(s, "small:1", "/hello") == b"hello\n"
        # Another process grows the map while this one has the store open.
        proc = layerfs("import-layer", t, "-t", "many:1")
        assert proc.returncode == 0, proc.stderr.decode()
        assert os.path.getsize(os.path.join(_index_path(store_root), "data.mdb")) > SMALL_MAP
        assert {tag for _, tags in s.images() for tag in tags} == {"small:1", "many:1"}
        tree = s.tree("many:1")  # writes the merged view: a write after the growth
        for p in ("d00/file00", "d25/file17", "d49/file39"):
            with s.blobs.open(tree.lookup(p).blob) as f:
                assert f.read() == files[p]
        # And this process can still import.
        again = make_tar(str(tmp_path / "again.tar"), [("again", "f", b"again\n")])
        s.import_tar(again, tag="again:1")
        assert read_back(s, "again:1", "/again") == b"again\n"
