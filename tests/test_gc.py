"""Garbage collection, prune, df, fsck and crash safety, through the real CLI.

* gc after rmi frees exactly the layers and blobs only the removed image used, and its
  ``--dry-run`` reports the same and changes nothing; prune, tmp/ leftovers, leases and
  unrecorded blob files;
* df's per-image unique and shared bytes;
* fsck names damaged blobs with the layers and images that use them, ``--repair`` moves
  them aside, a mount gives EIO (never wrong bytes), and a re-import heals the store; a
  damaged index gives one error line, never a traceback;
* the store lock, and a stress run of importers, committers, rmi, gc and prune at once;
* a process killed (SIGKILL) at every named crash point leaves the store whole: after
  one gc, fsck is clean and the interrupted work is either all there or not at all.

Every image is checked byte for byte against what made it (its tarballs, or the files
written into the container it was committed from).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import xxhash

from helpers import assert_one_line_error, make_tar, store_snapshot
from layerfs.store import StoreError

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse")

EXE = os.path.join(os.path.dirname(sys.executable), "layerfs")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- running layerfs -------------------------------------------------------------------


def lf(root: str, *args: str, crash: str | None = None, timeout: float = 120,
       input: bytes | None = None) -> subprocess.CompletedProcess:
    """Run the real ``layerfs`` on ``root``; ``crash`` sets LAYERFS_CRASH_AT."""
    env = dict(os.environ, LAYERFS_ROOT=root)
    env.pop("LAYERFS_CRASH_AT", None)
    if crash:
        env["LAYERFS_CRASH_AT"] = crash
    return subprocess.run([EXE, *args], capture_output=True, env=env, timeout=timeout, input=input)


def ok(root: str, *args: str, **kw) -> str:
    """Run layerfs, require exit 0 and no traceback; return stdout."""
    proc = lf(root, *args, **kw)
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 0 and "Traceback" not in err, \
        f"layerfs {' '.join(args)} failed ({proc.returncode}): {err}"
    return proc.stdout.decode()


def jsn(root: str, *args: str, expect_rc: int = 0):
    proc = lf(root, *args, "--json")
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == expect_rc and "Traceback" not in err, \
        f"layerfs {' '.join(args)} --json: exit {proc.returncode}, expected {expect_rc}: {err}\n" \
        f"{proc.stdout.decode(errors='replace')}"
    return json.loads(proc.stdout)


def python_child(code: str, root: str) -> subprocess.Popen:
    """A Python process running ``code`` against the store (``root`` in scope)."""
    prog = f"import os, sys, time\nsys.path.insert(0, {REPO!r})\nroot = {root!r}\n" + code
    return subprocess.Popen([sys.executable, "-c", prog], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=REPO)


# -- contents, blobs and images --------------------------------------------------------


def blob_id(data: bytes) -> str:
    return xxhash.xxh3_128(data).hexdigest()


def blob_path(root: str, data: bytes) -> str:
    h = blob_id(data)
    return os.path.join(root, "blobs", h[:2], h[2:])


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def tar_of(path: str, files: dict[str, bytes]) -> str:
    """A layer tarball holding ``files`` with their parent directories."""
    dirs = sorted({"/".join(p.split("/")[:i]) for p in files for i in range(1, p.count("/") + 1)})
    return make_tar(path, [(d, "d") for d in dirs] + [(p, "f", data) for p, data in sorted(files.items())])


def image_files(root: str, ref: str) -> dict[str, bytes]:
    """Every regular file of an image's merged tree with its bytes (verified against its blob
    id), read with the Store API; any other non-directory shows as a tuple."""
    from layerfs.store import Store
    from layerfs.store.records import Kind

    with Store(root) as s:
        tree = s.tree(ref)
        out: dict = {}
        todo = [""]
        while todo:
            d = todo.pop()
            for name, e in tree.listdir(d):
                path = f"{d}/{name}" if d else name
                if e.kind == Kind.DIR:
                    todo.append(path)
                elif e.kind == Kind.REG:
                    with s.blobs.open_verified(e.blob) as f:
                        out[path] = f.read()
                else:
                    out[path] = ("other", e.kind.name)
    return out


def images_json(root: str) -> dict[str, dict]:
    return {i["id"]: i for i in jsn(root, "images")}


def layers_of(root: str, ref: str) -> list[str]:
    return json.loads(ok(root, "inspect", ref))["layers"]


def image_id(root: str, ref: str) -> str:
    return json.loads(ok(root, "inspect", ref))["id"]


def assert_exports(root: str, layer_ids) -> None:
    """``layerfs export-layer`` of every layer writes a tar whose sha256 is the layer id."""
    for d in layer_ids:
        proc = lf(root, "export-layer", d, "-o", "-")
        assert proc.returncode == 0, proc.stderr.decode()
        assert "sha256:" + hashlib.sha256(proc.stdout).hexdigest() == d


def assert_image(root: str, ref: str, expected: dict[str, bytes], cat: int = 2) -> None:
    """The image reads back exactly ``expected`` (all files, byte for byte), a few files
    through ``layerfs cat`` too, and its layers export to their ids."""
    got = image_files(root, ref)
    assert set(got) == set(expected), f"{ref}: files differ: missing {sorted(set(expected) - set(got))}, " \
                                      f"extra {sorted(set(got) - set(expected))}"
    bad = [p for p in expected if got[p] != expected[p]]
    assert not bad, f"{ref}: wrong bytes in {bad}"
    for p in sorted(expected)[:cat]:
        assert lf(root, "cat", ref, "/" + p).stdout == expected[p], p
    assert_exports(root, layers_of(root, ref))


def assert_fsck_clean(root: str) -> dict:
    r = jsn(root, "fsck", expect_rc=0)
    assert r["clean"] and not r["problems"], r
    return r


def tmp_entries(root: str) -> list[str]:
    return sorted(os.listdir(os.path.join(root, "tmp")))


# -- mounts ----------------------------------------------------------------------------


def fuse_mounted(path: str) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def force_umount(root: str, mnt: str) -> None:
    if fuse_mounted(mnt):
        lf(root, "umount", mnt, timeout=60)
    if fuse_mounted(mnt):
        subprocess.run(["fusermount3", "-u", mnt], capture_output=True)
        subprocess.run(["umount", "-l", mnt], capture_output=True)


@pytest.fixture
def mounts():
    """mount(root, ref, mnt, *extra): unmounted again at the end, also when a test fails."""
    made: list[tuple[str, str]] = []

    def mount(root: str, ref: str, mnt: str, *extra: str) -> str:
        os.makedirs(mnt, exist_ok=True)
        proc = lf(root, "mount", ref, mnt, *extra, timeout=60)
        if proc.returncode == 0 or fuse_mounted(mnt):
            made.append((root, mnt))
        assert proc.returncode == 0, proc.stderr.decode()
        return proc.stdout.decode().strip()

    yield mount
    for root, mnt in made:
        force_umount(root, mnt)
    assert not [m for _, m in made if fuse_mounted(m)], "a mount was left behind"


def read_mounted(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# -- a small store: base, a and b share the base layer -----------------------------------

SHARED = b"shared by the base layer and a copy in image a\n" * 20  # 980 bytes
BASE_ONLY = b"only the base layer has these bytes\n" * 15  # 540
A1 = b"a1 " * 333  # 999
A2 = bytes(range(256)) * 7  # 1792
AB = b"the top layers of a and b both hold this\n" * 11  # 451
B1 = b"b1: only b\n" * 123  # 1353
C1 = b"an unrelated image\n" * 17  # 323

BASE_FILES = {"etc/shared": SHARED, "etc/base": BASE_ONLY, "etc/empty": b""}
A_FILES = {"app/a1": A1, "app/a2": A2, "app/ab": AB, "app/shared-copy": SHARED, "etc/base": BASE_ONLY}
B_FILES = {"app/b1": B1, "app/ab": AB}


@pytest.fixture
def abc(store_root, tmp_path):
    """base:1 = base; a:1 = base + a; b:1 = base + b. Returns the tarball paths and ids."""
    root = store_root
    tars = {name: tar_of(str(tmp_path / f"{name}.tar"), files)
            for name, files in (("base", BASE_FILES), ("a", A_FILES), ("b", B_FILES))}
    ok(root, "import-layer", tars["base"], "-t", "base:1")
    ok(root, "import-layer", tars["a"], "--parent", "base:1", "-t", "a:1")
    ok(root, "import-layer", tars["b"], "--parent", "base:1", "-t", "b:1")
    layer = {name: sha256_file(path) for name, path in tars.items()}
    assert layers_of(root, "a:1") == [layer["base"], layer["a"]]
    return {"tars": tars, "layer": layer,
            "expected": {"base:1": dict(BASE_FILES), "a:1": {**BASE_FILES, **A_FILES},
                         "b:1": {**BASE_FILES, **B_FILES}}}


# == 1. gc basics ========================================================================


def test_gc_after_rmi_frees_unique_layers_and_blobs(store_root, abc):
    root = store_root
    # Flatten a:1's chain so that gc has a merged view to free as well.
    assert_image(root, "a:1", abc["expected"]["a:1"])
    assert jsn(root, "gc")["blobs"] == 0  # nothing to free yet
    ok(root, "rmi", "a:1")
    before = store_snapshot(root)
    dry = jsn(root, "gc", "--dry-run")
    assert store_snapshot(root) == before, "gc --dry-run changed the store"
    assert dry["dry_run"] is True
    assert dry["layers"] == [abc["layer"]["a"]]
    assert dry["blobs"] == 2 and dry["bytes"] == len(A1) + len(A2)
    assert dry["chains"] == 1  # the merged view of base + a
    for data in (A1, A2):
        assert os.path.exists(blob_path(root, data))

    real = jsn(root, "gc")
    assert real["dry_run"] is False
    for key in ("layers", "blobs", "bytes", "chains", "tmp_removed", "unrecorded_files"):
        assert real[key] == dry[key], (key, dry, real)
    assert real["txn_seconds"] >= 0
    for data in (A1, A2):
        assert not os.path.exists(blob_path(root, data)), "a blob only a:1 used is still there"
    for data in (SHARED, BASE_ONLY, AB, B1):
        assert os.path.exists(blob_path(root, data)), "a shared blob was freed"
    assert abc["layer"]["a"] not in {layer["id"] for layer in jsn(root, "layers")}
    assert_image(root, "b:1", abc["expected"]["b:1"], cat=5)
    assert_image(root, "base:1", abc["expected"]["base:1"])
    # The exported layers are the very tarballs imported.
    for name in ("base", "b"):
        proc = lf(root, "export-layer", abc["layer"][name], "-o", "-")
        assert proc.stdout == open(abc["tars"][name], "rb").read()
    assert_fsck_clean(root)
    again = jsn(root, "gc")
    assert (again["layers"], again["blobs"], again["bytes"]) == ([], 0, 0)
    # The text form says the same in one line.
    assert re.fullmatch(r"freed 0 layers, 0 blobs, 0B .*\n", ok(root, "gc"))


def test_prune_removes_untagged_unused_images_and_keeps_used_ones(store_root, abc, tmp_path):
    root = store_root
    c_id = ok(root, "import-layer", tar_of(str(tmp_path / "c.tar"), {"c/c1": C1})).strip()
    d_files = {"d/d1": b"d is untagged but a container uses it\n"}
    d_id = ok(root, "import-layer", tar_of(str(tmp_path / "d.tar"), d_files)).strip()
    ok(root, "create", d_id, "--name", "uses-d")
    ok(root, "rmi", "a:1")  # a's image goes; its layer waits for gc
    before = store_snapshot(root)
    dry = jsn(root, "prune", "--dry-run")
    assert store_snapshot(root) == before, "prune --dry-run changed the store"
    assert dry["images"] == [c_id]
    real = jsn(root, "prune")
    assert real["images"] == [c_id]
    assert sorted(real["layers"]) == sorted([abc["layer"]["a"], sha256_file(str(tmp_path / "c.tar"))])
    assert real["blobs"] == 3 and real["bytes"] == len(A1) + len(A2) + len(C1)
    ids = images_json(root)
    assert c_id not in ids and d_id in ids
    assert image_id(root, "b:1") in ids and image_id(root, "base:1") in ids
    assert not os.path.exists(blob_path(root, C1))
    assert_image(root, d_id, d_files)
    assert_image(root, "b:1", abc["expected"]["b:1"])
    assert_fsck_clean(root)
    assert jsn(root, "prune")["images"] == []
    # --dry-run says what prune would free, images it would delete included.
    assert sorted(dry["layers"]) == sorted(real["layers"]), "prune --dry-run under-reports the layers"
    assert (dry["blobs"], dry["bytes"]) == (real["blobs"], real["bytes"]), \
        "prune --dry-run under-reports the blobs and bytes"


def test_rmi_of_an_image_a_container_uses_is_refused(store_root, abc):
    root = store_root
    ok(root, "create", "b:1", "--name", "user-of-b")
    b_id = image_id(root, "b:1")
    for ref in ("b:1", b_id, b_id[7:19]):
        line = assert_one_line_error(lf(root, "rmi", ref), mentions=("user-of-b",))
        assert "container" in line
    # Nothing changed: the tag and the image are still there, and gc keeps its data.
    assert images_json(root)[b_id]["tags"] == ["b:1"]
    ok(root, "gc")
    assert_image(root, "b:1", abc["expected"]["b:1"])
    # Once the container is gone the image can go.
    ok(root, "rm", "user-of-b")
    ok(root, "rmi", "b:1")
    assert b_id not in images_json(root)


_LIVE_INGEST = """
from layerfs.store import Store
s = Store(root)
ing = s.blobs.ingest()
w = ing.writer()
w.write(b"staged by a live import " * 40)
print(ing.id, w.finish(), flush=True)
time.sleep(120)
"""

_DEAD_LEASE = """
from layerfs.store import Store, leases
s = Store(root)
leases.take(s.index, "ingest-deadimport")
os.makedirs(os.path.join(root, "tmp", "ingest-deadimport"))
with open(os.path.join(root, "tmp", "ingest-deadimport", "new-1"), "wb") as f:
    f.write(b"half an import")
# exits without releasing: the lease names a dead process
"""


def _leases(root: str) -> list[str]:
    from layerfs.store import Store, leases
    with Store(root) as s:
        return sorted(lease.id for lease in leases.all_leases(s.index))


def test_gc_removes_dead_tmp_leftovers_and_keeps_a_live_lease(store_root, abc):
    root = store_root
    orphan = os.path.join(root, "tmp", "ingest-xyz")
    os.makedirs(orphan)
    with open(os.path.join(orphan, "new-1"), "wb") as f:
        f.write(b"no lease names this")
    dead = python_child(_DEAD_LEASE, root)
    assert dead.wait(30) == 0, dead.stderr.read().decode()
    live = python_child(_LIVE_INGEST, root)
    try:
        line = live.stdout.readline().decode().split()
        assert len(line) == 2, live.stderr.read().decode()
        live_id, staged_blob = line
        live_dir = os.path.join(root, "tmp", live_id)
        assert os.path.exists(os.path.join(live_dir, staged_blob))
        assert _leases(root) == sorted(["ingest-deadimport", live_id])
        assert tmp_entries(root) == sorted(["ingest-xyz", "ingest-deadimport", live_id])

        before = store_snapshot(root)
        dry = jsn(root, "gc", "--dry-run")
        assert dry["tmp_removed"] == 2
        assert store_snapshot(root) == before
        assert tmp_entries(root) == sorted(["ingest-xyz", "ingest-deadimport", live_id])

        report = jsn(root, "gc")
        assert report["tmp_removed"] == 2
        assert tmp_entries(root) == [live_id], "gc left a dead import's staging, or took a live one's"
        assert os.path.exists(os.path.join(live_dir, staged_blob))
        assert _leases(root) == [live_id], "the dead lease was not released, or the live one was"
        assert live.poll() is None
    finally:
        live.kill()
        live.wait()
    report = jsn(root, "gc")
    assert report["tmp_removed"] == 1
    assert tmp_entries(root) == [] and _leases(root) == []
    assert_image(root, "a:1", abc["expected"]["a:1"])
    assert_fsck_clean(root)


def test_gc_spares_an_import_that_starts_while_gc_runs(store, monkeypatch):
    """An import may start at any moment while gc runs (only recording takes the lock).
    Here one takes its lease and makes its staging directory just after gc has read the
    leases: gc must neither delete that directory nor release that lease."""
    import layerfs.store.gc as gcmod
    from layerfs.store import leases

    real_all_leases = leases.all_leases
    started = []

    def all_leases_then_an_import_starts(index):
        out = real_all_leases(index)
        if not started:
            started.append(store.blobs.ingest())
        return out

    monkeypatch.setattr(gcmod.leases, "all_leases", all_leases_then_an_import_starts)
    store.gc()
    monkeypatch.undo()
    ingest = started[0]
    try:
        assert os.path.isdir(ingest.dir), "gc deleted the staging directory of a running import"
        assert ingest.id in [lease.id for lease in leases.all_leases(store.index)], \
            "gc released the lease of a running import"
    finally:
        ingest.abort()


def test_gc_removes_blob_files_with_no_record(store_root, abc):
    root = store_root
    stray = b"a blob file nobody recorded\n" * 9
    path = blob_path(root, stray)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(stray)
    # A copy of a recorded blob under another (unrecorded) name in an existing fan directory.
    real = blob_path(root, SHARED)
    junk = os.path.join(os.path.dirname(real), "0" * 30)
    shutil.copy(real, junk)
    before = store_snapshot(root)
    assert jsn(root, "gc", "--dry-run")["unrecorded_files"] == 2
    assert store_snapshot(root) == before
    report = jsn(root, "gc")
    assert report["unrecorded_files"] == 2 and report["blobs"] == 0
    assert not os.path.exists(path) and not os.path.exists(junk)
    for ref in ("a:1", "b:1"):
        assert_image(root, ref, abc["expected"][ref])
    assert_fsck_clean(root)


def test_gc_survives_a_stray_file_at_the_top_of_blobs(store_root, abc):
    """A file directly in blobs/ (not in a fan-out directory) is no blob: gc must not die
    of it with a traceback."""
    root = store_root
    stray = os.path.join(root, "blobs", "README")
    with open(stray, "w") as f:
        f.write("someone put this here\n")
    proc = lf(root, "gc", "--json")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr.decode(), proc.stderr.decode()
    assert_fsck_clean(root)
    assert_image(root, "a:1", abc["expected"]["a:1"], cat=0)


# -- races made deterministic: another process acts at the worst moment ---------------
#
# Only recording a layer takes the store lock (shared) and only gc takes it exclusively;
# tag, create, rmi and the staging of an import take no lock. These tests run the other
# process's step in-process, at the moment a hook fires, to show what the interleaving
# does to the store.


def test_prune_spares_images_tagged_or_used_meanwhile(store, tmp_path, monkeypatch):
    """An image tagged, or given a container, by another process just before prune's
    transaction must not be deleted (prune decides inside its transaction)."""
    t1 = store.import_tar(tar_of(str(tmp_path / "1.tar"), {"x/one": b"one\n"}))
    t2 = store.import_tar(tar_of(str(tmp_path / "2.tar"), {"x/two": b"two\n"}))
    real_write = store.index.write
    acted = []

    def others_act_first(fn):
        if not acted:
            acted.append(True)
            store.tag(t1.image_id, "tagged:meanwhile")  # `layerfs tag` in another process
            store.containers.create(t2.image_id, "made-meanwhile")  # `layerfs create`
        return real_write(fn)

    monkeypatch.setattr(store.index, "write", others_act_first)
    removed, _ = store.prune()
    monkeypatch.undo()
    assert acted
    report = store.fsck()
    assert report.clean, [(p.kind, p.subject, p.detail) for p in report.problems]
    assert t1.image_id not in removed, "prune deleted an image that had just been tagged"
    assert t2.image_id not in removed, "prune deleted an image a container had just started using"


def test_rmi_refuses_an_image_given_a_container_meanwhile(store, tmp_path, monkeypatch):
    """A container created by another process just before rmi's transaction must still
    stop it (rmi looks at the containers inside its transaction)."""
    img = store.import_tar(tar_of(str(tmp_path / "1.tar"), {"x/one": b"one\n"}), tag="img:1")
    real_write = store.index.write
    acted = []

    def a_container_is_created_first(fn):
        if not acted:
            acted.append(True)
            store.containers.create(img.image_id, "made-meanwhile")
        return real_write(fn)

    monkeypatch.setattr(store.index, "write", a_container_is_created_first)
    try:
        store.rmi("img:1")
    except StoreError:
        pass  # refused: right
    monkeypatch.undo()
    assert acted
    report = store.fsck()
    assert report.clean, [(p.kind, p.subject, p.detail) for p in report.problems]
    assert store.resolve_image("img:1").image_id == img.image_id


def test_failed_record_does_not_take_a_blob_another_import_recorded(store, tmp_path, monkeypatch):
    """Import A publishes a new blob X, then its record fails (here: its parent's layers
    were collected after A resolved the parent; a full disk does the same). Meanwhile
    import B, holding the same bytes, found X already published, so B published nothing
    itself and recorded X. A's failure must not delete the file B's image now needs."""
    from layerfs.store.errors import LayerNotFound
    from layerfs.store.tarimport import read_tar

    x = b"new bytes both imports hold\n" * 30
    parent = store.import_tar(tar_of(str(tmp_path / "p.tar"), {"p/file": b"the parent\n"}))
    store.rmi(parent.image_id)
    store.gc()  # the parent's layer is gone; A resolved the parent before this
    tb = tar_of(str(tmp_path / "b.tar"), {"b/x": x, "b/own": b"b's own\n"})
    real_write = store.index.write
    armed, b_image = [False], []

    def write(fn):
        if armed[0]:
            armed[0] = False
            b_image.append(store.import_tar(tb, tag="b:1"))  # B, between A's publish and record
        return real_write(fn)

    monkeypatch.setattr(store.index, "write", write)
    with open(tar_of(str(tmp_path / "a.tar"), {"a/x": x}), "rb") as src, store.blobs.ingest() as ingest:
        pending = read_tar(ingest, src, "a.tar")
        armed[0] = True
        with pytest.raises(LayerNotFound):
            store.record(ingest, pending, parent, {"created_by": "test"}, None)
    monkeypatch.undo()
    assert b_image
    report = store.fsck()
    assert report.clean, [(p.kind, p.subject, p.detail) for p in report.problems]
    tree = store.tree("b:1")
    for path, want in (("b/x", x), ("b/own", b"b's own\n")):
        with store.blobs.open_verified(tree.lookup(path).blob) as f:
            assert f.read() == want


# == 2. df per image ===================================================================


def test_df_unique_and_shared_bytes_per_image(store_root, abc):
    root = store_root

    def per_image():
        d = jsn(root, "df")
        return d, {tuple(i["tags"]) or i["id"]: (i["unique_bytes"], i["shared_bytes"]) for i in d["per_image"]}

    d, got = per_image()
    base = len(SHARED) + len(BASE_ONLY)  # used by all three images
    assert got == {("base:1",): (0, base),
                   ("a:1",): (len(A1) + len(A2), base + len(AB)),
                   ("b:1",): (len(B1), base + len(AB))}
    assert d["blobs"] == 6 and d["stored_bytes"] == base + len(A1) + len(A2) + len(AB) + len(B1)
    assert (d["images"], d["layers"]) == (3, 3)
    # Two images sharing the base layer, without the base image.
    ok(root, "rmi", "base:1")
    _, got = per_image()
    assert got == {("a:1",): (len(A1) + len(A2), base + len(AB)),
                   ("b:1",): (len(B1), base + len(AB))}
    # Once a is gone, what b shared only with a is b's alone.
    ok(root, "rmi", "a:1")
    ok(root, "gc")
    d, got = per_image()
    assert got == {("b:1",): (base + len(AB) + len(B1), 0)}
    assert d["stored_bytes"] == base + len(AB) + len(B1)
    # The text form has the per-image table.
    text = ok(root, "df")
    assert "UNIQUE" in text and "SHARED" in text and "b:1" in text


# == 3. fsck ===========================================================================


def _flip_byte(path: str, offset: int = 10) -> None:
    os.chmod(path, 0o644)  # blobs are read-only
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def _append(path: str, data: bytes = b"garbage") -> None:
    os.chmod(path, 0o644)
    with open(path, "ab") as f:
        f.write(data)


def test_fsck_damaged_blobs_repair_eio_and_heal(store_root, abc, tmp_path, mounts):
    """fsck --fast checks presence and size only: a byte flipped in place (same size) is
    caught by the full fsck, not by --fast."""
    root = store_root
    c_files = {"c/c1": C1}
    c_id = ok(root, "import-layer", tar_of(str(tmp_path / "c.tar"), c_files)).strip()
    ids = {ref: image_id(root, ref) for ref in ("base:1", "a:1", "b:1")}
    L = abc["layer"]
    assert_fsck_clean(root)

    # A flipped byte in a blob of the base layer (used by every image but c).
    _flip_byte(blob_path(root, SHARED))
    r = jsn(root, "fsck", expect_rc=1)
    assert not r["clean"]
    assert [(p["kind"], p["subject"]) for p in r["problems"]] == [("corrupt-blob", blob_id(SHARED))]
    assert r["damaged_layers"] == sorted([L["base"], L["a"]])  # a holds a copy too
    assert r["damaged_images"] == sorted(ids.values())
    assert c_id not in r["damaged_images"]
    text = lf(root, "fsck")
    assert text.returncode == 1 and blob_id(SHARED) in text.stdout.decode()
    assert "DAMAGED" in text.stdout.decode()
    # Documented limit: --fast does not read contents, so a same-size flip passes it.
    assert jsn(root, "fsck", "--fast", expect_rc=0)["clean"]

    # Bytes appended to a blob only b uses: --fast catches a size change.
    _append(blob_path(root, B1))
    r = jsn(root, "fsck", "--fast", expect_rc=1)
    assert [(p["kind"], p["subject"]) for p in r["problems"]] == [("size-mismatch", blob_id(B1))]
    assert r["damaged_layers"] == [L["b"]] and r["damaged_images"] == [ids["b:1"]]
    r = jsn(root, "fsck", expect_rc=1)
    assert sorted((p["kind"], p["subject"]) for p in r["problems"]) == \
        sorted([("corrupt-blob", blob_id(SHARED)), ("size-mismatch", blob_id(B1))])
    assert r["damaged_layers"] == sorted([L["base"], L["a"], L["b"]])

    # Reading damaged data: EIO through a mount, one error line from cat and export.
    mnt = str(tmp_path / "mnt")
    mounts(root, "b:1", mnt, "--read-only")

    def assert_eio(path: str) -> None:
        with pytest.raises(OSError) as e:
            read_mounted(path)
        assert e.value.errno == errno.EIO, e.value

    assert_eio(os.path.join(mnt, "etc/shared"))
    assert_eio(os.path.join(mnt, "app/b1"))
    assert read_mounted(os.path.join(mnt, "app/ab")) == AB  # undamaged files still read
    assert_one_line_error(lf(root, "cat", "b:1", "/etc/shared"), mentions=(blob_id(SHARED),))
    assert_one_line_error(lf(root, "cat", "b:1", "/app/b1"))
    assert lf(root, "cat", "b:1", "/app/ab").stdout == AB
    out = str(tmp_path / "base-layer.tar")
    assert_one_line_error(lf(root, "export-layer", L["base"], "-o", out))
    assert not os.path.exists(out), "a failed export left a file"
    # The export reads only the recorded size of each blob, so bytes appended to one do
    # not reach it: exporting b either fails in one line or gives the original tar.
    proc = lf(root, "export-layer", L["b"], "-o", "-")
    if proc.returncode == 0:
        assert proc.stdout == open(abc["tars"]["b"], "rb").read()
    else:
        assert_one_line_error(proc)

    # Repair: the damaged blobs move to corrupt/, and the store still says damaged.
    r = jsn(root, "fsck", "--repair", expect_rc=1)
    assert sorted(r["moved_aside"]) == sorted([blob_id(SHARED), blob_id(B1)])
    for data in (SHARED, B1):
        assert not os.path.exists(blob_path(root, data))
        assert os.path.exists(os.path.join(root, "corrupt", blob_id(data)))
    r = jsn(root, "fsck", expect_rc=1)
    assert r["damaged_images"] == sorted(ids.values())
    assert {p["subject"] for p in r["problems"]} >= {blob_id(SHARED), blob_id(B1)}
    assert jsn(root, "fsck", "--fast", expect_rc=1)["damaged_images"] == sorted(ids.values())
    assert_eio(os.path.join(mnt, "etc/shared"))  # the mount made before the repair
    assert_eio(os.path.join(mnt, "app/b1"))
    mnt2 = str(tmp_path / "mnt2")
    mounts(root, "a:1", mnt2, "--read-only")  # and a new one
    assert_eio(os.path.join(mnt2, "etc/shared"))
    assert_eio(os.path.join(mnt2, "app/shared-copy"))
    assert read_mounted(os.path.join(mnt2, "app/a1")) == A1
    assert_one_line_error(lf(root, "cat", "a:1", "/etc/shared"), mentions=(blob_id(SHARED),))
    assert_image(root, c_id, c_files)  # an image that never used them is fine
    ok(root, "gc")  # gc must not make it worse (nor fail)

    # Re-importing the original tarballs brings the blobs back.
    ok(root, "import-layer", abc["tars"]["base"])
    ok(root, "import-layer", abc["tars"]["b"], "--parent", "base:1")
    ok(root, "gc")
    assert_fsck_clean(root)
    for ref in ("base:1", "a:1", "b:1"):
        assert_image(root, ref, abc["expected"][ref])
    mnt3 = str(tmp_path / "mnt3")
    mounts(root, "b:1", mnt3, "--read-only")
    assert read_mounted(os.path.join(mnt3, "etc/shared")) == SHARED
    assert read_mounted(os.path.join(mnt3, "app/b1")) == B1
    assert read_mounted(os.path.join(mnt, "etc/shared")) == SHARED  # the old mount too


def test_mount_never_serves_bytes_damaged_after_it_first_read_them(store_root, abc, tmp_path, mounts):
    """A long-running mount reads a file, then its blob is damaged on disk. Once the page
    cache no longer holds the file, reading it again must give EIO (or the original bytes
    from a cache), never the damaged bytes."""
    root = store_root
    mnt = str(tmp_path / "mnt")
    mounts(root, "b:1", mnt, "--read-only")
    path = os.path.join(mnt, "etc/shared")
    assert read_mounted(path) == SHARED
    _flip_byte(blob_path(root, SHARED))
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        assert e.errno == errno.EIO  # the damage was seen at open: also right
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # drop the file's cached pages
    finally:
        os.close(fd)
    try:
        data = read_mounted(path)
    except OSError as e:
        assert e.errno == errno.EIO
    else:
        assert data == SHARED, "the mount served damaged bytes"


def _damage(root: str, start: int, length: int, fill: bytes) -> None:
    with open(os.path.join(root, "index.lmdb", "data.mdb"), "r+b") as f:
        f.seek(start)
        f.write((fill * (length // len(fill) + 1))[:length])


def _fsck_report_of_damage(proc) -> bool:
    """fsck's answer to damage: exit 1, its report on stdout ending DAMAGED, stderr empty."""
    out = proc.stdout.decode(errors="replace").splitlines()
    return proc.returncode == 1 and not proc.stderr.strip() and bool(out) and out[-1].startswith("DAMAGED")


def _unclear_failure(proc, cmd: str = "") -> str | None:
    """None if the command worked or failed in one "layerfs:" line (fsck: with its
    report of the damage); else what went wrong."""
    err = proc.stderr.decode(errors="replace")
    if proc.returncode < 0:
        return f"killed by signal {-proc.returncode}"
    lines = [line for line in err.splitlines() if line.strip()]
    if "Traceback" in err:
        return f"traceback ending {lines[-1][:120]!r}"
    if cmd == "fsck" and _fsck_report_of_damage(proc):
        return None
    if proc.returncode != 0 and (len(lines) != 1 or not lines[0].startswith("layerfs:")):
        return f"exit {proc.returncode} with {len(lines)} lines on stderr"
    return None


def test_damaged_index_gives_one_error_line(store_root, abc, tmp_path):
    root = store_root
    for ref in ("a:1", "b:1"):
        assert_image(root, ref, abc["expected"][ref], cat=0)  # flattened views, more pages
    ok(root, "gc")
    template = str(tmp_path / "template")
    shutil.copytree(root, template)
    size = os.path.getsize(os.path.join(template, "index.lmdb", "data.mdb"))
    page = 4096

    # The middle half of the file overwritten.
    shutil.rmtree(root)
    shutil.copytree(template, root)
    _damage(root, size // 4, size // 2, b"\xa5")
    assert_one_line_error(lf(root, "images", timeout=60), mentions=("index",))
    fsck = lf(root, "fsck", timeout=60)
    assert _fsck_report_of_damage(fsck) and b"index" in fsck.stdout, fsck

    # One page at a time, every page of the middle half: whatever a page held, each
    # command either works or fails in one line (a page LMDB no longer uses is harmless).
    failures, unclear = 0, []
    for off in range(size // 4 // page * page, 3 * size // 4, page):
        shutil.rmtree(root)
        shutil.copytree(template, root)
        _damage(root, off, page, b"\xa5\x5a")
        for cmd in ("images", "fsck"):
            proc = lf(root, cmd, timeout=60)
            failures += proc.returncode != 0
            why = _unclear_failure(proc, cmd)
            if why:
                unclear.append(f"layerfs {cmd}, page at {off} of {size} damaged: {why}")
    assert failures, "no damaged page made any command fail: the test damaged nothing"
    assert not unclear, "\n".join(unclear)


# == 4. concurrency ======================================================================

_HOLD_LOCK = """
from layerfs.store import Store
s = Store(root)
with s.lock.exclusive():
    print("locked", flush=True)
    time.sleep(2)
"""


def test_second_gc_waits_for_the_lock(store_root, abc):
    root = store_root
    ok(root, "rmi", "a:1")
    holder = python_child(_HOLD_LOCK, root)
    try:
        assert holder.stdout.readline() == b"locked\n", holder.stderr.read().decode()
        t0 = time.monotonic()
        proc = lf(root, "gc", "--json", timeout=60)
        waited = time.monotonic() - t0
        assert holder.wait(10) == 0
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 0, proc.stderr.decode()
    lines = [line for line in proc.stderr.decode().splitlines() if line.strip()]
    assert len(lines) == 1 and "waiting" in lines[0] and lines[0].startswith("layerfs:"), lines
    assert waited >= 1.0, f"gc did not wait for the lock ({waited:.2f}s)"
    assert json.loads(proc.stdout)["layers"] == [abc["layer"]["a"]]
    assert_fsck_clean(root)


STRESS_SECONDS = 55
# Failures a race may legitimately cause: the parent named went away meanwhile.
_ALLOWED_IMPORT_FAILURES = re.compile(r"no such image|disappeared while the image was created")
_ALLOWED_RMI_FAILURES = re.compile(r"no such image")


class _Stress:
    def __init__(self, root: str, tmp: str, deadline: float) -> None:
        self.root, self.tmp, self.deadline = root, tmp, deadline
        self.lock = threading.Lock()
        self.expected: dict[str, dict[str, bytes]] = {}  # image id -> its files
        self.removed: set[str] = set()  # ids rmi said it deleted
        self.problems: list[str] = []
        self.counts: dict[str, int] = {}
        rng = random.Random(7)
        self.pool = [rng.randbytes(rng.randint(1, 3000)) for _ in range(24)]

    def count(self, what: str) -> None:
        with self.lock:
            self.counts[what] = self.counts.get(what, 0) + 1

    def existing(self) -> list[str]:
        """Image ids the store has now (a moment ago)."""
        proc = lf(self.root, "images", "-q")
        return sorted(set(proc.stdout.decode().split()) & set(self.known())) if proc.returncode == 0 else []

    def check(self, proc, what: str, allowed: re.Pattern | None = None) -> bool:
        err = proc.stderr.decode(errors="replace")
        lines = [line for line in err.splitlines() if line.strip() and "waiting for" not in line]
        if "Traceback" in err or proc.returncode < 0:
            self.problems.append(f"{what}: exit {proc.returncode}\n{err}")
            return False
        if proc.returncode == 0:
            if lines:
                self.problems.append(f"{what}: succeeded but printed {lines}")
            return True
        if allowed is None or len(lines) != 1 or not allowed.search(lines[0]):
            self.problems.append(f"{what}: exit {proc.returncode}: {err.strip()}")
        else:
            self.count(what.split()[0] + " raced (allowed)")
        return False

    def known(self) -> list[str]:
        with self.lock:
            return sorted(self.expected)

    def guard(self, fn, *args):
        try:
            fn(*args)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            import traceback
            self.problems.append(f"{fn.__name__}{args}: {traceback.format_exc()}")
            raise SystemExit from e

    def importer(self, n: int) -> None:
        rng = random.Random(100 + n)
        i = 0
        while time.monotonic() < self.deadline:
            i += 1
            files = {}
            for _ in range(rng.randint(2, 7)):
                data = rng.choice(self.pool) if rng.random() < 0.6 else rng.randbytes(rng.randint(0, 4000))
                files[f"imp{n}/d{rng.randint(0, 2)}/f{rng.randint(0, 9)}"] = data
            if rng.random() < 0.3:
                files[f"base/f{rng.randint(0, 5)}"] = rng.choice(self.pool)  # over a base file
            tar = tar_of(os.path.join(self.tmp, f"imp{n}-{i}.tar"), files)
            args = ["import-layer", tar]
            parent = None
            if rng.random() < 0.5:
                parent = rng.choice(self.existing() or self.known())
                args += ["--parent", parent]
            if rng.random() < 0.25:
                args += ["-t", f"imp{n}:{i}"]
            proc = lf(self.root, *args)
            if self.check(proc, f"import {n}.{i}", _ALLOWED_IMPORT_FAILURES if parent else None):
                iid = proc.stdout.decode().strip()
                with self.lock:
                    self.expected[iid] = {**(self.expected[parent] if parent else {}), **files}
                self.count("import")
            os.unlink(tar)

    def committer(self, mnt: str, name: str, base_id: str) -> None:
        rng = random.Random(200)
        cur = dict(self.expected[base_id])
        i = 0
        while time.monotonic() < self.deadline:
            i += 1
            for _ in range(rng.randint(1, 4)):
                path = f"c/d{rng.randint(0, 1)}/f{rng.randint(0, 7)}"
                data = rng.choice(self.pool) if rng.random() < 0.5 else rng.randbytes(rng.randint(0, 3000))
                os.makedirs(os.path.dirname(os.path.join(mnt, path)), exist_ok=True)
                with open(os.path.join(mnt, path), "wb") as f:
                    f.write(data)
                cur[path] = data
            if rng.random() < 0.3:
                victim = rng.choice(sorted(cur))
                os.unlink(os.path.join(mnt, victim))  # a whiteout when it is a base file
                del cur[victim]
            tag = ["-t", f"commit:{i}"] if rng.random() < 0.3 else []
            proc = lf(self.root, "commit", name, *tag)
            if self.check(proc, f"commit {i}"):
                with self.lock:
                    self.expected[proc.stdout.decode().strip()] = dict(cur)
                self.count("commit")

    def remover(self, base_id: str) -> None:
        rng = random.Random(300)
        while time.monotonic() < self.deadline:
            time.sleep(rng.uniform(0.2, 0.8))
            victims = [i for i in self.existing() if i != base_id]
            if not victims:
                continue
            victim = rng.choice(victims)
            proc = lf(self.root, "rmi", victim)
            if self.check(proc, f"rmi {victim[:19]}", _ALLOWED_RMI_FAILURES):
                assert f"Deleted: {victim}" in proc.stdout.decode()
                with self.lock:
                    self.removed.add(victim)
                self.count("rmi")

    def collector(self) -> None:
        i = 0
        while time.monotonic() < self.deadline:
            i += 1
            cmd = ("gc",) if i % 5 else ("prune",)
            if i % 7 == 0:
                cmd += ("--dry-run",)
            if self.check(lf(self.root, *cmd), " ".join(cmd)):
                self.count(cmd[0])
            time.sleep(0.1)


def test_stress_import_commit_rmi_gc_prune(store_root, tmp_path, mounts):
    root = store_root
    deadline = time.monotonic() + STRESS_SECONDS
    st = _Stress(root, str(tmp_path), deadline)
    base_files = {f"base/f{i}": st.pool[i] for i in range(6)}
    base_files["base/own"] = b"only in base\n" * 50
    base_id = ok(root, "import-layer", tar_of(str(tmp_path / "base.tar"), base_files), "-t", "base:1").strip()
    st.expected[base_id] = base_files
    ok(root, "create", "base:1", "--name", "stress")
    mnt = str(tmp_path / "mnt")
    mounts(root, "stress", mnt)

    threads = [threading.Thread(target=st.guard, args=(st.importer, n)) for n in range(2)]
    threads.append(threading.Thread(target=st.guard, args=(st.committer, mnt, "stress", base_id)))
    threads.append(threading.Thread(target=st.guard, args=(st.remover, base_id)))
    threads.append(threading.Thread(target=st.guard, args=(st.collector,)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(STRESS_SECONDS + 120)
    assert not any(t.is_alive() for t in threads), "a worker hangs"
    print("stress:", dict(sorted(st.counts.items())), "images left:", len(images_json(root)))
    ok(root, "umount", mnt)
    assert not fuse_mounted(mnt)
    assert [c["state"] for c in jsn(root, "ps")] == ["created"]
    assert not st.problems, "\n".join(st.problems)
    assert st.counts.get("import", 0) >= 10 and st.counts.get("commit", 0) >= 3
    assert st.counts.get("gc", 0) >= 3 and st.counts.get("prune", 0) >= 1

    # Every image that still exists reads back exactly what made it.
    existing = images_json(root)
    assert base_id in existing
    unknown = set(existing) - set(st.expected)
    assert not unknown, f"images nobody made: {unknown}"
    assert not set(existing) & st.removed, "an image rmi deleted is back"
    for iid in existing:
        got = image_files(root, iid)
        exp = st.expected[iid]
        assert set(got) == set(exp), f"{iid}: missing {sorted(set(exp) - set(got))}, extra {sorted(set(got) - set(exp))}"
        assert [p for p in exp if got[p] != exp[p]] == [], f"{iid}: wrong bytes"
    layer_ids = {d for i in existing.values() for d in i["layers"]}
    assert_exports(root, layer_ids)
    assert_fsck_clean(root)
    ok(root, "gc")
    assert_fsck_clean(root)
    assert tmp_entries(root) == []
    for iid in sorted(existing)[:3]:
        assert_image(root, iid, st.expected[iid], cat=3)


# == 5. crash safety =====================================================================

_POOL = [bytes([65 + i]) * 100 + f"pool {i}\n".encode() * (i + 3) for i in range(8)]
CRASH_BASE = {f"base/f{i}": _POOL[i] for i in range(4)} | {"etc/conf": b"conf\n"}
CRASH_APP = {f"app/u{i}": f"unique to app {i}\n".encode() * (40 + i) for i in range(7)} | {"app/dup": _POOL[0]}
CRASH_UPPER = {f"work/n{i}": f"written into the container {i}\n".encode() * (10 + i) for i in range(6)}


def _crash_new_files(tag: str) -> dict[str, bytes]:
    """Six contents no store holds yet, plus two it holds (base's and app's)."""
    files = {f"new/{tag}/n{i}": f"new content {tag} {i}\n".encode() * (20 + i) for i in range(6)}
    files["new/dup-base"] = _POOL[1]
    files["new/dup-app"] = CRASH_APP["app/u0"]
    return files


@pytest.fixture(scope="module")
def crash_template(tmp_path_factory):
    """A store with base:1, app:1 (= base + app) and a container c1 of base:1 whose upper
    holds CRASH_UPPER (written through a mount); every view flattened, gc run."""
    tmp = tmp_path_factory.mktemp("crash-template")
    root = str(tmp / "store")
    ok(root, "import-layer", tar_of(str(tmp / "base.tar"), CRASH_BASE), "-t", "base:1")
    ok(root, "import-layer", tar_of(str(tmp / "app.tar"), CRASH_APP), "--parent", "base:1", "-t", "app:1")
    ok(root, "create", "base:1", "--name", "c1")
    mnt = str(tmp / "mnt")
    os.makedirs(mnt)
    try:
        ok(root, "mount", "c1", mnt)
        for path, data in CRASH_UPPER.items():
            os.makedirs(os.path.dirname(os.path.join(mnt, path)), exist_ok=True)
            with open(os.path.join(mnt, path), "wb") as f:
                f.write(data)
        os.unlink(os.path.join(mnt, "base/f3"))
    finally:
        force_umount(root, mnt)
    assert not fuse_mounted(mnt)
    for ref in ("base:1", "app:1"):
        image_files(root, ref)
    ok(root, "gc")
    return root


EXPECTED_CRASH = {"base:1": CRASH_BASE, "app:1": {**CRASH_BASE, **CRASH_APP}}
COMMIT_EXPECTED = {**{k: v for k, v in CRASH_BASE.items() if k != "base/f3"}, **CRASH_UPPER}


def _fresh(template: str, root: str) -> None:
    shutil.copytree(template, root, symlinks=True)


def _assert_earlier_images(root: str) -> None:
    for ref, files in EXPECTED_CRASH.items():
        assert_image(root, ref, files, cat=1)


_GROWING_DBS = {b"images", b"layers", b"layernums", b"entries", b"tarsplit", b"blobs", b"tags",
                b"chains", b"merged"}


def _blob_id_of_path(path: str) -> str:
    return os.path.basename(os.path.dirname(path)) + os.path.basename(path)


def _assert_only_additions(before, after) -> None:
    (rec0, files0), (rec1, files1) = before, after
    changed = [k for k, v in rec0.items() if rec1.get(k) != v]
    assert not changed, f"records changed or lost: {changed[:5]}"
    added = [k for k in rec1 if k not in rec0]
    assert {db for db, _ in added} <= _GROWING_DBS, {db for db, _ in added}
    assert set(files0) <= set(files1), "blob files lost"
    new_files = {_blob_id_of_path(p) for p in set(files1) - set(files0)}
    new_blobs = {k.decode() for db, k in added if db == b"blobs"}
    assert new_files == new_blobs, "new blob files and new blob records differ"


IMPORT_POINTS = [("ingest-staged", 0), ("ingest-linked:1", 1), ("ingest-linked:3", 3),
                 ("record-before-commit", 6), ("record-committed", 0)]


@pytest.mark.parametrize("point,unrecorded", IMPORT_POINTS, ids=[p for p, _ in IMPORT_POINTS])
def test_import_killed_at_crash_point(crash_template, store_root, tmp_path, point, unrecorded):
    root = store_root
    _fresh(crash_template, root)
    files = _crash_new_files(point.replace(":", "-"))
    tar = tar_of(str(tmp_path / "new.tar"), files)
    before = store_snapshot(root)
    images_before = set(images_json(root))

    proc = lf(root, "import-layer", tar, "--parent", "base:1", "-t", "new:1", crash=point, timeout=60)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr.decode())
    report = jsn(root, "gc")
    assert report["tmp_removed"] == 1, report  # the dead import's staging directory
    assert report["unrecorded_files"] == unrecorded, report  # blobs linked, never recorded
    assert report["layers"] == [] and report["blobs"] == 0
    assert_fsck_clean(root)
    _assert_earlier_images(root)
    assert tmp_entries(root) == []
    if point == "record-committed":
        new = images_json(root)
        assert set(new) - images_before == {image_id(root, "new:1")}
        assert_image(root, "new:1", {**CRASH_BASE, **files}, cat=3)
        _assert_only_additions(before, store_snapshot(root))
    else:
        assert set(images_json(root)) == images_before
        assert lf(root, "inspect", "new:1").returncode != 0
        assert store_snapshot(root) == before, "the killed import left something behind"
    # The import works when run again.
    ok(root, "import-layer", tar, "--parent", "base:1", "-t", "new:2")
    assert_image(root, "new:2", {**CRASH_BASE, **files}, cat=0)
    assert_fsck_clean(root)


COMMIT_POINTS = [("ingest-staged", 0), ("ingest-linked:1", 1), ("ingest-linked:3", 3),
                 ("record-before-commit", 6), ("record-committed", 0)]


@pytest.mark.parametrize("point,unrecorded", COMMIT_POINTS, ids=[p for p, _ in COMMIT_POINTS])
def test_commit_killed_at_crash_point(crash_template, store_root, point, unrecorded):
    root = store_root
    _fresh(crash_template, root)
    before = store_snapshot(root)
    images_before = set(images_json(root))
    proc = lf(root, "commit", "c1", "-t", "committed:1", crash=point, timeout=60)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr.decode())
    report = jsn(root, "gc")
    assert report["tmp_removed"] == 1 and report["unrecorded_files"] == unrecorded, report
    assert report["layers"] == [] and report["blobs"] == 0
    assert_fsck_clean(root)
    _assert_earlier_images(root)
    assert tmp_entries(root) == []
    if point == "record-committed":
        assert set(images_json(root)) - images_before == {image_id(root, "committed:1")}
        assert_image(root, "committed:1", COMMIT_EXPECTED, cat=3)
        _assert_only_additions(before, store_snapshot(root))
    else:
        assert set(images_json(root)) == images_before
        assert store_snapshot(root) == before, "the killed commit left something behind"
    ok(root, "commit", "c1", "-t", "committed:2")
    assert_image(root, "committed:2", COMMIT_EXPECTED, cat=0)
    assert_fsck_clean(root)


@pytest.mark.parametrize("point", ["ingest-linked:3", "record-before-commit"])
def test_commit_of_a_mounted_container_killed(crash_template, store_root, tmp_path, mounts, point):
    """The mount holds writes while a commit runs: a commit killed meanwhile must not
    leave the container's writes held."""
    root = store_root
    _fresh(crash_template, root)
    before = store_snapshot(root)
    mnt = str(tmp_path / "mnt")
    mounts(root, "c1", mnt)
    proc = lf(root, "commit", "c1", crash=point, timeout=60)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr.decode())
    writer = subprocess.run([sys.executable, "-c",
                             f"open({os.path.join(mnt, 'after')!r}, 'w').write('after the kill')"],
                            capture_output=True, timeout=20)
    assert writer.returncode == 0, writer.stderr.decode()
    assert read_mounted(os.path.join(mnt, "after")) == b"after the kill"
    ok(root, "umount", mnt)
    ok(root, "gc")
    assert_fsck_clean(root)
    _assert_earlier_images(root)
    assert store_snapshot(root) == before
    ok(root, "commit", "c1", "-t", "committed:1")
    assert_image(root, "committed:1", {**COMMIT_EXPECTED, "after": b"after the kill"}, cat=1)


GC_POINTS = [("gc-swept", 0), ("gc-deleting:1", 1), ("gc-deleting:5", 5)]


@pytest.mark.parametrize("point,deleted", GC_POINTS, ids=[p for p, _ in GC_POINTS])
def test_gc_killed_at_crash_point(crash_template, store_root, tmp_path, point, deleted):
    root = store_root
    _fresh(crash_template, root)
    # What a gc that runs to its end leaves: the reference.
    ref = str(tmp_path / "reference")
    _fresh(crash_template, ref)
    ok(ref, "rmi", "app:1")
    ref_report = jsn(ref, "gc")
    freed = ref_report["blobs"]
    assert freed == 7 and len(ref_report["layers"]) == 1  # app's seven unique blobs

    ok(root, "rmi", "app:1")
    proc = lf(root, "gc", crash=point, timeout=60)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr.decode())
    report = jsn(root, "gc")
    # The records went in the killed gc's transaction; the files it had not yet deleted
    # are now files without a record.
    assert report["layers"] == [] and report["blobs"] == 0
    assert report["unrecorded_files"] == freed - deleted, report
    assert_fsck_clean(root)
    assert_image(root, "base:1", CRASH_BASE, cat=1)
    assert lf(root, "inspect", "app:1").returncode != 0
    rec, files = store_snapshot(root)
    ref_rec, ref_files = store_snapshot(ref)
    assert rec == ref_rec
    assert [os.path.relpath(p, root) for p in files] == [os.path.relpath(p, ref) for p in ref_files]
    assert tmp_entries(root) == []
    ok(root, "commit", "c1", "-t", "committed:1")
    assert_image(root, "committed:1", COMMIT_EXPECTED, cat=0)
