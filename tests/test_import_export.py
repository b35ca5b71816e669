"""Layers from tarballs and from directories, and their export.

Tarballs are made by Python's tarfile (PAX and GNU formats) and by GNU tar; every entry
type, mode bit, owner, nanosecond mtime and xattr must come through the store as it was,
whiteouts must become entries (never files), and export must give back a tar whose
sha256 is the layer id: the original bytes for a tarball, a canonical tar for a directory.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import os
import stat
import subprocess
import tarfile

import pytest
import zstandard

from helpers import make_tar, sha256_file
from layerfs.store import Store
from layerfs.store.records import Kind

MTIME = 1_700_000_000
NS_MTIME = 1_700_000_000_123_456_789
BINARY = b"\xff\xfe\x00\x80 not utf-8 \xc3"


def _import(via: str, store, layerfs, path: str, *args: str):
    """Import a tarball through the API or the CLI; return (image, layer record)."""
    if via == "api":
        img = store.import_tar(path)
    else:
        out = layerfs("import-layer", path, *args, check=True).stdout.decode().strip()
        assert out.startswith("sha256:") and len(out) == 71, out
        img = store.resolve_image(out)
    return img, store.resolve_layer(img.layers[-1])


def _blob(store, entry) -> bytes:
    with store.blobs.open(entry.blob) as f:
        return f.read()


def _export(layerfs, layer_id: str, out) -> bytes:
    layerfs("export-layer", layer_id, "-o", str(out), check=True)
    return out.read_bytes()


def _no_whiteout_names(entries) -> None:
    """No entry is named like a whiteout marker: they are all recorded as entries."""
    for path in entries:
        assert not path.rpartition("/")[2].startswith(".wh."), f"{path} kept as a file"


# -- Python tarfile ------------------------------------------------------------------

ALL_TYPES = [
    ("d", "d", b"", {"mode": 0o750, "uid": 1234, "gid": 5678}),
    ("d/file", "f", b"regular contents\n", {"mode": 0o4755, "uid": 1000, "gid": 1001}),
    ("d/sgid", "f", b"setgid\n", {"mode": 0o2711}),
    ("d/empty", "f", b"", {"mode": 0o600}),
    ("tmp", "d", b"", {"mode": 0o1777}),
    ("d/sym", "l", "file", {"mode": 0o777}),
    ("d/abs", "l", "/d/file", {"mode": 0o777}),
    ("d/hard", "h", "d/file"),
    ("dev", "d"),
    ("dev/null", "c", (1, 3), {"mode": 0o666}),
    ("dev/loop0", "b", (7, 0), {"mode": 0o660, "gid": 6}),
    ("run", "d"),
    ("run/fifo", "p", b"", {"mode": 0o620}),
]


@pytest.mark.parametrize("via", ["api", "cli"])
@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT], ids=["pax", "gnu"])
def test_every_entry_type_from_python_tarfile(store, layerfs, tmp_path, fmt, via):
    tar = make_tar(str(tmp_path / "all.tar"), ALL_TYPES, fmt)
    img, layer = _import(via, store, layerfs, tar)
    assert layer.diff_id == sha256_file(tar)
    e = store.layer_entries(layer)
    assert set(e) == {m[0] for m in ALL_TYPES}

    assert (e["d"].kind, e["d"].mode, e["d"].uid, e["d"].gid) == (Kind.DIR, 0o750, 1234, 5678)
    f = e["d/file"]
    assert (f.kind, f.mode, f.uid, f.gid, f.size) == (Kind.REG, 0o4755, 1000, 1001, 17)
    assert f.mtime_ns == MTIME * 1_000_000_000
    assert _blob(store, f) == b"regular contents\n"
    assert e["d/sgid"].mode == 0o2711 and _blob(store, e["d/sgid"]) == b"setgid\n"
    assert e["d/empty"].kind == Kind.REG and e["d/empty"].size == 0 and _blob(store, e["d/empty"]) == b""
    assert e["tmp"].kind == Kind.DIR and e["tmp"].mode == 0o1777
    assert (e["d/sym"].kind, e["d/sym"].target) == (Kind.SYMLINK, "file")
    assert (e["d/abs"].kind, e["d/abs"].target) == (Kind.SYMLINK, "/d/file")
    h = e["d/hard"]
    assert h.kind == Kind.REG and h.blob == f.blob and h.size == f.size and h.mode == 0o4755
    assert f.nlink == h.nlink == 2
    assert (e["dev/null"].kind, e["dev/null"].rdev_major, e["dev/null"].rdev_minor) == (Kind.CHR, 1, 3)
    assert e["dev/null"].mode == 0o666
    lp = e["dev/loop0"]
    assert (lp.kind, lp.rdev_major, lp.rdev_minor, lp.mode, lp.gid) == (Kind.BLK, 7, 0, 0o660, 6)
    assert (e["run/fifo"].kind, e["run/fifo"].mode) == (Kind.FIFO, 0o620)

    # the merged tree of the one-layer image shows the same
    tree = store.tree(img)
    assert sorted(n for n, _ in tree.listdir("d")) == ["abs", "empty", "file", "hard", "sgid", "sym"]
    assert tree.lookup("d/hard").blob == f.blob
    assert tree.lookup("dev/null").st_mode == stat.S_IFCHR | 0o666
    assert tree.lookup("tmp").st_mode == stat.S_IFDIR | 0o1777


def test_pax_nanosecond_mtime_xattrs_and_big_ids(store, tmp_path):
    name = "dir/" + "long-name-" * 12 + "ünïcödé"
    members = [
        ("dir", "d", b"", {"pax_headers": {"mtime": "1700000000.000000001"}}),
        ("dir/f", "f", b"data", {"pax_headers": {
            "mtime": "1700000000.123456789",
            "SCHILY.xattr.user.foo": "bar",
            "SCHILY.xattr.user.bin": BINARY.decode("utf-8", "surrogateescape"),
            "SCHILY.xattr.security.capability": "\x01\x00\x00\x02",
        }}),
        (name, "f", b"long", {"uid": 3_000_000, "gid": 4_000_000}),
        ("dir/link", "l", "/" + "t" * 150),
    ]
    tar = make_tar(str(tmp_path / "pax.tar"), members, tarfile.PAX_FORMAT)
    img = store.import_tar(tar)
    layer = store.resolve_layer(img.layers[0])
    e = store.layer_entries(layer)
    f = e["dir/f"]
    assert f.mtime_ns == NS_MTIME
    assert e["dir"].mtime_ns == 1_700_000_000_000_000_001
    assert dict(f.xattrs) == {"user.foo": b"bar", "user.bin": BINARY,
                              "security.capability": b"\x01\x00\x00\x02"}
    assert (e[name].uid, e[name].gid) == (3_000_000, 4_000_000)
    assert e["dir/link"].target == "/" + "t" * 150
    # and the merged tree says the same
    m = store.tree(img).lookup("dir/f")
    assert m.mtime_ns == NS_MTIME and dict(m.xattrs)["user.bin"] == BINARY
    assert _blob(store, store.tree(img).lookup(name)) == b"long"


@pytest.mark.parametrize("extra", [
    {"pax_headers": {"mtime": "99999999999"}},  # year 5138: beyond a signed 64-bit ns count
    {"uid": 5_000_000_000},  # beyond 32 bits
], ids=["mtime-year-5138", "uid-over-32-bits"])
def test_pax_values_beyond_the_index_fields_import_or_fail_in_one_line(store, tmp_path, layerfs, extra):
    """A valid PAX tar whose numbers do not fit the store's fields: either imported and
    exported byte for byte, or refused with one line; never a traceback."""
    tar = make_tar(str(tmp_path / "far.tar"), [("f", "f", "x", extra)], tarfile.PAX_FORMAT)
    proc = layerfs("import-layer", tar)
    err = proc.stderr.decode()
    assert "Traceback" not in err, "a traceback instead of one line: " + err.strip().splitlines()[-1]
    if proc.returncode != 0:
        assert len(err.strip().splitlines()) == 1, err
        assert proc.stdout == b""
    else:
        layer = sha256_file(tar)
        assert _export(layerfs, layer, tmp_path / "out.tar") == open(tar, "rb").read()


# -- GNU tar -------------------------------------------------------------------------


def _make_source_tree(root) -> None:
    """A directory with every entry type, special mode bits, owners, xattrs, long names."""
    os.makedirs(root / "bin")
    os.makedirs(root / "dev")
    os.makedirs(root / "run")
    os.makedirs(root / "tmp")
    deep = root / ("deep-" * 15) / ("deeper-" * 15)
    os.makedirs(deep)
    (deep / ("file-" * 25)).write_bytes(b"long path\n")
    (root / "bin" / "tool").write_bytes(b"#!/bin/sh\necho tool\n" * 100)
    os.chmod(root / "bin" / "tool", 0o4755)
    os.link(root / "bin" / "tool", root / "bin" / "tool-again")
    (root / "bin" / "sgid").write_bytes(b"sgid")
    os.chown(root / "bin" / "sgid", 1000, 2000)
    os.chmod(root / "bin" / "sgid", 0o2750)
    os.symlink("tool", root / "bin" / "link")
    os.symlink("/" + "x" * 120, root / "bin" / "longlink")
    os.chmod(root / "tmp", 0o1777)
    os.mknod(root / "dev" / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(root / "dev" / "sda", stat.S_IFBLK | 0o660, os.makedev(8, 0))
    os.mkfifo(root / "run" / "fifo", 0o600)
    (root / "xattr").write_bytes(b"has xattrs")
    os.setxattr(root / "xattr", "user.foo", b"bar")
    os.setxattr(root / "xattr", "user.bin", BINARY)
    os.utime(root / "xattr", ns=(NS_MTIME, NS_MTIME))
    os.utime(root / "bin" / "tool", ns=(NS_MTIME, NS_MTIME))


def _check_entries_match_source(store, entries, root, exact_ns: bool, xattrs: bool) -> None:
    seen = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            seen.add(rel)
            st = os.lstat(full)
            e = entries[rel]
            assert e.st_mode == st.st_mode or stat.S_ISLNK(st.st_mode), rel
            assert (e.uid, e.gid) == (st.st_uid, st.st_gid), rel
            want = st.st_mtime_ns if exact_ns else st.st_mtime_ns // 10**9 * 10**9
            assert e.mtime_ns == want, rel
            if stat.S_ISREG(st.st_mode):
                with open(full, "rb") as fh:
                    assert _blob(store, e) == fh.read(), rel
                assert e.nlink == st.st_nlink, rel
            elif stat.S_ISLNK(st.st_mode):
                assert e.kind == Kind.SYMLINK and e.target == os.readlink(full), rel
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                assert (e.rdev_major, e.rdev_minor) == (os.major(st.st_rdev), os.minor(st.st_rdev)), rel
    assert {p for p in entries if p} == seen
    assert entries["bin/tool"].blob == entries["bin/tool-again"].blob
    got = dict(entries["xattr"].xattrs)
    if xattrs:
        assert got == {"user.foo": b"bar", "user.bin": BINARY}


GNU_TAR_KINDS = {
    "gnu": (["tar", "-c"], "tar", False, False),
    "posix-xattrs": (["tar", "--format=posix", "--xattrs", "-c"], "tar", True, True),
    "gzip": (["tar", "-cz"], "tar.gz", False, False),
}


@pytest.mark.parametrize("via", ["api", "cli"])
@pytest.mark.parametrize("kind", sorted(GNU_TAR_KINDS))
def test_gnu_tar_layers(store, layerfs, tmp_path, kind, via):
    cmd, ext, exact_ns, xattrs = GNU_TAR_KINDS[kind]
    src = tmp_path / "src"
    _make_source_tree(src)
    tarball = tmp_path / f"layer.{ext}"
    subprocess.run(cmd + ["-f", str(tarball), "-C", str(src), "."], check=True)
    raw = tarball.read_bytes()
    plain = gzip.decompress(raw) if ext == "tar.gz" else raw
    img, layer = _import(via, store, layerfs, str(tarball))
    assert layer.diff_id == "sha256:" + hashlib.sha256(plain).hexdigest()
    entries = store.layer_entries(layer)
    _check_entries_match_source(store, entries, str(src), exact_ns, xattrs)
    if xattrs:
        assert dict(store.tree(img).lookup("xattr").xattrs)["user.bin"] == BINARY
    exported = _export(layerfs, layer.diff_id, tmp_path / "export.tar")
    assert exported == plain


# -- whiteouts -----------------------------------------------------------------------

LOWER = [
    ("gone", "f", "gone"), ("gonedir", "d"), ("gonedir/x", "f", "x"), ("gonedir/sub", "d"),
    ("gonedir/sub/y", "f", "y"), ("dir", "d"), ("dir/x", "f", "x"), ("dir/keep", "f", "keep"),
    ("opq", "d"), ("opq/old", "f", "old"), ("late", "d"), ("late/old", "f", "old"),
]


def _whiteout_upper(tmp_path, builder: str) -> str:
    if builder == "python":
        return make_tar(str(tmp_path / "upper.tar"), [
            (".wh.gone", "f"), (".wh.gonedir", "f"), ("dir", "d"), ("dir/.wh.x", "f"),
            ("opq", "d"), ("opq/.wh..wh..opq", "f"), ("opq/new", "f", "new"),
            # a marker before its directory's own header
            ("late/.wh..wh..opq", "f"), ("late", "d", b"", {"mode": 0o700}), ("late/new", "f", "n"),
        ])
    src = tmp_path / "upper"
    for d in ("dir", "opq", "late"):
        os.makedirs(src / d)
    os.chmod(src / "late", 0o700)
    for name in (".wh.gone", ".wh.gonedir", "dir/.wh.x", "opq/.wh..wh..opq", "late/.wh..wh..opq"):
        (src / name).write_bytes(b"")
    (src / "opq" / "new").write_bytes(b"new")
    (src / "late" / "new").write_bytes(b"n")
    out = str(tmp_path / "upper.tar")
    subprocess.run(["tar", "-c", "-f", out, "-C", str(src), "."], check=True)
    return out


@pytest.mark.parametrize("builder", ["python", "gnu-tar"])
def test_tar_whiteouts_are_entries(store, tmp_path, layerfs, builder):
    lower = store.import_tar(make_tar(str(tmp_path / "lower.tar"), LOWER))
    upper_tar = _whiteout_upper(tmp_path, builder)
    img = store.import_tar(upper_tar, parent=lower.image_id)
    e = store.layer_entries(store.resolve_layer(img.layers[-1]))
    _no_whiteout_names(e)
    for p in ("gone", "gonedir", "dir/x"):
        assert e[p].kind == Kind.WHITEOUT, p
    assert e["opq"].kind == Kind.DIR and e["opq"].opaque
    assert e["late"].kind == Kind.DIR and e["late"].opaque and e["late"].mode == 0o700
    assert not e["dir"].opaque
    tree = store.tree(img)
    assert sorted(n for n, _ in tree.listdir("")) == ["dir", "late", "opq"]
    assert sorted(n for n, _ in tree.listdir("dir")) == ["keep"]
    assert sorted(n for n, _ in tree.listdir("opq")) == ["new"]
    assert sorted(n for n, _ in tree.listdir("late")) == ["new"]
    # the whiteouts are still in the exported tar, which is the original
    assert _export(layerfs, img.layers[-1], tmp_path / "out.tar") == open(upper_tar, "rb").read()


def _lower_for_dir_whiteouts(store, tmp_path):
    return store.import_tar(make_tar(str(tmp_path / "lower.tar"), [
        ("gone", "f", "g"), ("cdev", "f", "c"), ("sub", "d"), ("sub/x", "f", "x"),
        ("sub/keep", "f", "k"), ("opq_user", "d"), ("opq_user/old", "f", "o"),
        ("opq_marker", "d"), ("opq_marker/old", "f", "o"), ("opq_trusted", "d"),
        ("opq_trusted/old", "f", "o")]))


def _dir_with_whiteouts(root, trusted: bool) -> None:
    os.makedirs(root / "sub")
    os.makedirs(root / "opq_user")
    os.makedirs(root / "opq_marker")
    (root / ".wh.gone").write_bytes(b"")
    os.mknod(root / "cdev", stat.S_IFCHR | 0o600, 0)  # overlayfs whiteout
    (root / "sub" / ".wh.x").write_bytes(b"")
    os.setxattr(root / "opq_user", "user.overlay.opaque", b"y")
    os.setxattr(root / "opq_user", "user.kept", b"kept")
    (root / "opq_user" / "new").write_bytes(b"new")
    os.mknod(root / "opq_user" / "wh-inside", stat.S_IFCHR | 0o600, 0)  # redundant
    (root / "opq_marker" / ".wh..wh..opq").write_bytes(b"")
    (root / "opq_marker" / ".wh.inside").write_bytes(b"")  # redundant
    (root / "opq_marker" / "new").write_bytes(b"new")
    (root / "plain").write_bytes(b"plain")
    os.setxattr(root / "plain", "user.note", b"kept too")
    (root / "aaa").write_bytes(b"sorts before the whited-out names")
    (root / "sub" / "aaa").write_bytes(b"so does this one")
    if trusted:
        os.makedirs(root / "opq_trusted")
        os.setxattr(root / "opq_trusted", "trusted.overlay.opaque", b"y")
        (root / "opq_trusted" / "new").write_bytes(b"new")


def test_directory_whiteouts_are_entries(store, tmp_path, layerfs):
    lower = _lower_for_dir_whiteouts(store, tmp_path)
    src = tmp_path / "upper"
    _dir_with_whiteouts(src, trusted=False)
    img = store.import_dir(str(src), parent=lower.image_id)
    layer = store.resolve_layer(img.layers[-1])
    e = store.layer_entries(layer)
    _no_whiteout_names(e)
    for p in ("gone", "cdev", "sub/x"):
        assert e[p].kind == Kind.WHITEOUT, p
    assert e["opq_user"].opaque and e["opq_marker"].opaque and not e["sub"].opaque
    assert dict(e["opq_user"].xattrs) == {"user.kept": b"kept"}  # overlay's own xattr dropped
    assert dict(e["plain"].xattrs) == {"user.note": b"kept too"}
    tree = store.tree(img)
    assert sorted(n for n, _ in tree.listdir("")) == ["aaa", "opq_marker", "opq_trusted",
                                                      "opq_user", "plain", "sub"]
    assert sorted(n for n, _ in tree.listdir("sub")) == ["aaa", "keep"]
    assert sorted(n for n, _ in tree.listdir("opq_user")) == ["new"]
    assert sorted(n for n, _ in tree.listdir("opq_marker")) == ["new"]
    assert sorted(n for n, _ in tree.listdir("opq_trusted")) == ["old"]

    # the export: canonical, whiteouts first in each directory, none inside an opaque one,
    # and no overlay xattrs
    out = tmp_path / "out.tar"
    data = _export(layerfs, layer.diff_id, out)
    assert "sha256:" + hashlib.sha256(data).hexdigest() == layer.diff_id
    _check_canonical_whiteouts(out)
    with tarfile.open(out) as tf:
        members = {m.name.rstrip("/"): m for m in tf.getmembers()}
    assert {".wh.gone", ".wh.cdev", "sub/.wh.x", "opq_user/.wh..wh..opq",
            "opq_marker/.wh..wh..opq"} <= set(members)
    assert "opq_user/.wh.wh-inside" not in members and "opq_marker/.wh.inside" not in members
    for m in members.values():
        assert not any("overlay" in k for k in m.pax_headers), m.name
    assert members["opq_user"].pax_headers["SCHILY.xattr.user.kept"] == "kept"


def test_directory_trusted_overlay_opaque_xattr(store, tmp_path):
    src = tmp_path / "upper"
    os.makedirs(src)
    probe = src / "probe"
    os.makedirs(probe)
    try:
        os.setxattr(probe, "trusted.overlay.opaque", b"y")
    except OSError as e:
        print(f"skipping: {tmp_path} refuses trusted.* xattrs ({e.strerror})")
        pytest.skip(f"the tmp filesystem refuses trusted.* xattrs ({e.strerror})")
    os.rmdir(probe)
    lower = _lower_for_dir_whiteouts(store, tmp_path)
    _dir_with_whiteouts(src, trusted=True)
    img = store.import_dir(str(src), parent=lower.image_id)
    e = store.layer_entries(store.resolve_layer(img.layers[-1]))
    assert e["opq_trusted"].opaque and e["opq_trusted"].xattrs == ()
    assert sorted(n for n, _ in store.tree(img).listdir("opq_trusted")) == ["new"]


def _check_canonical_whiteouts(tar_path) -> None:
    """In each directory: the opaque marker right after the directory, whiteouts before
    the other entries, and no ``.wh.NAME`` inside an opaque directory."""
    with tarfile.open(tar_path) as tf:
        names = [os.path.normpath(m.name) for m in tf.getmembers()]
    opaque = {os.path.dirname(n) for n in names if os.path.basename(n) == ".wh..wh..opq"}
    seen_other: set[str] = set()
    for i, n in enumerate(names):
        parent, base = os.path.split(n)
        if base == ".wh..wh..opq":
            assert i > 0 and names[i - 1] == (parent or "."), f"{n} does not follow its directory"
        elif base.startswith(".wh."):
            assert parent not in seen_other, f"{n} comes after a sibling that is not a whiteout"
            assert not any(parent == o or parent.startswith(o + "/") for o in opaque if o), \
                f"{n} is inside an opaque directory"
        else:
            seen_other.add(parent)


# -- duplicates ----------------------------------------------------------------------


def test_later_duplicate_replaces_earlier(store, tmp_path, layerfs):
    tar = make_tar(str(tmp_path / "dup.tar"), [
        ("a", "f", "first"), ("a", "f", "second", {"mode": 0o600}),
        ("d", "d"), ("d/x", "f", "x"), ("d", "f", "d is a file now"),
        ("f", "f", "f is a dir next"), ("f", "d"), ("f/y", "f", "y"),
        ("s", "l", "a"), ("s", "f", "s is a file"),
    ])
    img = store.import_tar(tar)
    tree = store.tree(img)
    assert tree.lookup("a").mode == 0o600 and _blob(store, tree.lookup("a")) == b"second"
    assert tree.lookup("d").kind == Kind.REG and _blob(store, tree.lookup("d")) == b"d is a file now"
    assert tree.lookup("d/x") is None
    assert tree.lookup("f").kind == Kind.DIR and _blob(store, tree.lookup("f/y")) == b"y"
    assert tree.lookup("s").kind == Kind.REG
    assert sorted(n for n, _ in tree.listdir("")) == ["a", "d", "f", "s"]
    proc = layerfs("cat", img.image_id, "/a", check=True)
    assert proc.stdout == b"second"
    assert _export(layerfs, img.layers[0], tmp_path / "out.tar") == open(tar, "rb").read()


def test_hard_link_to_a_replaced_name_links_the_new_file(store, tmp_path):
    """b links to the first a; a is then replaced; c links to the second a.

    As a container engine extracts it: b keeps the old contents with one link, a and c
    share the new contents with two links.
    """
    tar = make_tar(str(tmp_path / "dup.tar"), [
        ("a", "f", "old"), ("b", "h", "a"), ("a", "f", "new"), ("c", "h", "a")])
    img = store.import_tar(tar)
    tree = store.tree(img)
    a, b, c = (tree.lookup(n) for n in "abc")
    assert _blob(store, b) == b"old"
    assert _blob(store, a) == _blob(store, c) == b"new"
    assert a.blob == c.blob
    assert (a.nlink, b.nlink, c.nlink) == (2, 1, 2)


# -- compression ---------------------------------------------------------------------

COMPRESSORS = {
    "gzip": gzip.compress,
    "zstd": lambda b: zstandard.ZstdCompressor().compress(b),
    "bzip2": bz2.compress,
    "xz": lzma.compress,
}


@pytest.mark.parametrize("algo", sorted(COMPRESSORS))
def test_compressed_layer_has_the_plain_tar_id(store, tmp_path, layerfs, algo):
    plain_path = make_tar(str(tmp_path / "l.tar"), ALL_TYPES + [("big", "f", os.urandom(300_000))])
    plain = open(plain_path, "rb").read()
    packed = tmp_path / f"l.tar.{algo}"
    packed.write_bytes(COMPRESSORS[algo](plain))
    img = store.import_tar(str(packed))
    layer_id = "sha256:" + hashlib.sha256(plain).hexdigest()
    assert img.layers == (layer_id,)
    assert store.resolve_layer(layer_id).size == len(plain)
    assert _blob(store, store.tree(img).lookup("d/file")) == b"regular contents\n"
    assert _export(layerfs, layer_id, tmp_path / "out.tar") == plain
    # and the same through the CLI, from stdin, into another store
    other = str(tmp_path / "other-store")
    proc = layerfs("import-layer", "-", input=packed.read_bytes(), root=other, check=True)
    with Store(other) as s2:
        assert s2.resolve_image(proc.stdout.decode().strip()).layers == (layer_id,)


def test_zstd_with_several_frames_and_concatenated_gzip(store, tmp_path):
    plain_path = make_tar(str(tmp_path / "l.tar"), [("a", "f", "a" * 5000), ("b", "f", "b" * 5000)])
    plain = open(plain_path, "rb").read()
    half = len(plain) // 2
    cz = zstandard.ZstdCompressor()
    (tmp_path / "multi.zst").write_bytes(cz.compress(plain[:half]) + cz.compress(plain[half:]))
    (tmp_path / "multi.gz").write_bytes(gzip.compress(plain[:half]) + gzip.compress(plain[half:]))
    layer_id = "sha256:" + hashlib.sha256(plain).hexdigest()
    for name in ("multi.zst", "multi.gz"):
        with Store(str(tmp_path / f"store-{name}")) as s:
            assert s.import_tar(str(tmp_path / name)).layers == (layer_id,), name


# -- export of tar layers ------------------------------------------------------------


def _long_name_tars(tmp_path) -> dict[str, str]:
    long_dir = "d" * 90 + "/" + "e" * 90
    members = [(long_dir.split("/")[0], "d"), (long_dir, "d"), (long_dir + "/" + "f" * 100, "f", "long"),
               ("link", "l", "/" + "t" * 200), ("hard-" + "h" * 120, "h", long_dir + "/" + "f" * 100)]
    out = {}
    for fmt, label in ((tarfile.GNU_FORMAT, "python-gnu-longlink"), (tarfile.PAX_FORMAT, "python-pax")):
        out[label] = make_tar(str(tmp_path / f"{label}.tar"), members, fmt)
    src = tmp_path / "src-long"
    os.makedirs(src / long_dir)
    (src / long_dir / ("f" * 100)).write_bytes(b"long")
    os.symlink("/" + "t" * 200, src / "link")
    for label, args in (("gnu-tar-longlink", []), ("gnu-tar-posix", ["--format=posix"]),
                        ("gnu-tar-blocking-64", ["-b", "64"])):
        path = str(tmp_path / f"{label}.tar")
        subprocess.run(["tar", "-c", *args, "-f", path, "-C", str(src), "."], check=True)
        out[label] = path
    return out


def test_export_of_tar_layers_is_byte_identical(store, tmp_path, layerfs):
    tars = _long_name_tars(tmp_path)
    blocked = open(tars["gnu-tar-blocking-64"], "rb").read()
    assert len(blocked) % (64 * 512) == 0 and blocked.endswith(b"\0" * 4096)  # padded
    for label, path in tars.items():
        original = open(path, "rb").read()
        img = store.import_tar(path)
        layer_id = img.layers[0]
        assert layer_id == sha256_file(path), label
        data = _export(layerfs, layer_id, tmp_path / f"{label}.out")
        assert data == original, label
        assert layerfs("export-layer", layer_id, "-o", "-", check=True).stdout == original, label


def test_export_of_empty_layer(store, tmp_path, layerfs):
    """The well-known empty layer: 1024 zero bytes."""
    path = tmp_path / "empty.tar"
    path.write_bytes(b"\0" * 1024)
    img = store.import_tar(str(path))
    assert img.layers == ("sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef",)
    assert list(store.tree(img).listdir("")) == []
    assert _export(layerfs, img.layers[0], tmp_path / "out.tar") == b"\0" * 1024


def test_trailing_bytes_after_the_end_blocks_are_kept(store, tmp_path, layerfs):
    path = make_tar(str(tmp_path / "l.tar"), [("a", "f", "a")])
    data = open(path, "rb").read() + b"\0" * 512 * 7
    (tmp_path / "padded.tar").write_bytes(data)
    img = store.import_tar(str(tmp_path / "padded.tar"))
    assert _export(layerfs, img.layers[0], tmp_path / "out.tar") == data


# -- directories ---------------------------------------------------------------------


def _rich_dir(root) -> None:
    _make_source_tree(root)
    os.makedirs(root / "wh" / "opq")
    (root / "wh" / ".wh.deleted").write_bytes(b"")
    (root / "wh" / "zzz").write_bytes(b"after the whiteout")
    (root / "wh" / "aaa").write_bytes(b"before it by name")
    os.mknod(root / "wh" / "chardev-whiteout", stat.S_IFCHR, 0)
    (root / "wh" / "opq" / ".wh..wh..opq").write_bytes(b"")
    (root / "wh" / "opq" / ".wh.redundant").write_bytes(b"")
    (root / "wh" / "opq" / "a").write_bytes(b"a")
    (root / "unicode-ü").write_bytes(b"u")
    (root / os.fsdecode(b"not-utf8-\xff\xfe")).write_bytes(b"raw name")
    os.symlink(os.fsdecode(b"/target-\xff"), root / "raw-target")
    (root / "before-1970").write_bytes(b"old")
    os.utime(root / "before-1970", ns=(-1_500_000_000, -1_500_000_000))
    (root / "big-owner").write_bytes(b"big")
    os.chown(root / "big-owner", 3_000_000, 4_000_000)
    (root / "after-2242").write_bytes(b"late")
    os.utime(root / "after-2242", ns=(2**33 * 10**9 + 7, 2**33 * 10**9 + 7))


def test_directory_layer_exports_canonical_tar(store, tmp_path, layerfs):
    src = tmp_path / "src"
    _rich_dir(src)
    out = layerfs("import-dir", str(src), check=True).stdout.decode().strip()
    layer = store.resolve_layer(store.resolve_image(out).layers[-1])
    first = _export(layerfs, layer.diff_id, tmp_path / "one.tar")
    second = _export(layerfs, layer.diff_id, tmp_path / "two.tar")
    assert first == second
    assert "sha256:" + hashlib.sha256(first).hexdigest() == layer.diff_id
    assert len(first) == layer.size
    _check_canonical_whiteouts(tmp_path / "one.tar")

    # importing the same directory again gives the same layer
    again = store.import_dir(str(src))
    assert again.layers[-1] == layer.diff_id
    # so does a copy of it (same names, contents, modes, owners, times, xattrs), elsewhere
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", "--preserve=all", str(src), str(copy)], check=True)
    with Store(str(tmp_path / "store-copy")) as s2:
        assert s2.import_dir(str(copy)).layers == (layer.diff_id,)

    # the export, imported as a tarball into a fresh store, is the same layer
    with Store(str(tmp_path / "store-reimport")) as s3:
        img3 = s3.import_tar(str(tmp_path / "one.tar"))
        assert img3.layers == (layer.diff_id,)
        assert s3.layer_entries(s3.resolve_layer(layer.diff_id)) == store.layer_entries(layer)


def test_empty_directory_is_the_empty_layer(store, tmp_path, layerfs):
    os.makedirs(tmp_path / "empty")
    img = store.import_dir(str(tmp_path / "empty"))
    assert img.layers == ("sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef",)
    assert _export(layerfs, img.layers[0], tmp_path / "out.tar") == b"\0" * 1024


def test_directory_export_lists_what_the_directory_holds(store, tmp_path, layerfs):
    src = tmp_path / "src"
    _rich_dir(src)
    img = store.import_dir(str(src))
    out = tmp_path / "out.tar"
    _export(layerfs, img.layers[0], out)
    with tarfile.open(out) as tf:
        members = {os.path.normpath(m.name): m for m in tf.getmembers()}
        tool = tf.extractfile(members["bin/tool"]).read()
    assert tool == (src / "bin" / "tool").read_bytes()
    assert members["bin/tool"].mode == 0o4755
    assert members["bin/sgid"].mode == 0o2750 and (members["bin/sgid"].uid, members["bin/sgid"].gid) == (1000, 2000)
    assert members["tmp"].mode == 0o1777
    assert members["bin/link"].issym() and members["bin/link"].linkname == "tool"
    assert members["bin/longlink"].linkname == "/" + "x" * 120
    assert members["dev/null"].ischr() and (members["dev/null"].devmajor, members["dev/null"].devminor) == (1, 3)
    assert members["dev/sda"].isblk()
    assert members["run/fifo"].isfifo()
    assert members["xattr"].pax_headers["mtime"] == "1700000000.123456789"
    assert members["xattr"].pax_headers["SCHILY.xattr.user.bin"].encode("utf-8", "surrogateescape") == BINARY
    assert {"wh/.wh.deleted", "wh/.wh.chardev-whiteout", "wh/opq/.wh..wh..opq"} <= set(members)
    assert "wh/opq/.wh.redundant" not in members and "wh/chardev-whiteout" not in members
    assert "unicode-ü" in members and os.fsdecode(b"not-utf8-\xff\xfe") in members
    assert members["raw-target"].linkname == os.fsdecode(b"/target-\xff")
    assert members["before-1970"].pax_headers["mtime"] == "-1.5"
    assert (members["big-owner"].uid, members["big-owner"].gid) == (3_000_000, 4_000_000)
    assert members["after-2242"].pax_headers["mtime"] == "8589934592.000000007"
    # exactly one copy of the hard-linked file's data
    tool_names = [n for n in members if n.startswith("bin/tool")]
    assert sorted(tool_names) == ["bin/tool", "bin/tool-again"]
    assert members["bin/tool"].isreg() and members["bin/tool-again"].islnk()
    assert members["bin/tool-again"].linkname == "bin/tool"


def test_directory_hard_links_become_one_blob(store, tmp_path, layerfs):
    src = tmp_path / "src"
    os.makedirs(src / "a")
    (src / "a" / "one").write_bytes(b"shared inode" * 1000)
    os.link(src / "a" / "one", src / "a" / "two")
    os.link(src / "a" / "one", src / "three")
    (src / "other").write_bytes(b"other")
    img = store.import_dir(str(src))
    layer = store.resolve_layer(img.layers[0])
    e = store.layer_entries(layer)
    group = [e["a/one"], e["a/two"], e["three"]]
    assert len({x.blob for x in group}) == 1 and group[0].blob
    assert [x.nlink for x in group] == [3, 3, 3]
    assert e["other"].nlink == 1
    usage = json.loads(layerfs("df", "--json", check=True).stdout)
    assert usage["blobs"] == 2
    assert usage["stored_bytes"] == 12000 + 5
    assert layer.file_bytes == 12000 + 5  # the group counted once
    out = tmp_path / "out.tar"
    _export(layerfs, layer.diff_id, out)
    with tarfile.open(out) as tf:
        ms = {m.name: m for m in tf.getmembers()}
    regular = [n for n in ("a/one", "a/two", "three") if ms[n].isreg()]
    links = [n for n in ("a/one", "a/two", "three") if ms[n].islnk()]
    assert len(regular) == 1 and len(links) == 2
    assert all(ms[n].linkname == regular[0] for n in links)
    assert ms[regular[0]].size == 12000


# -- dedup ---------------------------------------------------------------------------


def test_same_content_is_stored_once(store, tmp_path, layerfs):
    x, y, z = b"X" * 10_000, b"Y" * 5_000, b"Z" * 3_000
    tar = make_tar(str(tmp_path / "a.tar"), [("d", "d"), ("d/x", "f", x), ("d/y", "f", y),
                                             ("d/x-copy", "f", x), ("empty", "f", b"")])
    layerfs("import-layer", tar, "-t", "one", check=True)
    src = tmp_path / "dir"
    os.makedirs(src)
    (src / "x-again").write_bytes(x)
    (src / "z").write_bytes(z)
    layerfs("import-dir", str(src), "-t", "two", check=True)
    # and a third image on top of the first, with x once more
    tar3 = make_tar(str(tmp_path / "c.tar"), [("x3", "f", x)])
    layerfs("import-layer", tar3, "--parent", "one", "-t", "three", check=True)
    usage = json.loads(layerfs("df", "--json", check=True).stdout)
    assert usage["blobs"] == 3
    assert usage["stored_bytes"] == 18_000
    assert usage["logical_bytes"] == 25_000 + 13_000 + 10_000
    assert usage["saved_bytes"] == 30_000
    assert (usage["images"], usage["layers"]) == (3, 3)
    blob_files = [f for _, _, fs in os.walk(os.path.join(store.root, "blobs")) for f in fs]
    assert len(blob_files) == 3
    # importing the same layer again stores nothing new
    layerfs("import-layer", tar, "-t", "one-again", check=True)
    assert json.loads(layerfs("df", "--json", check=True).stdout)["blobs"] == 3
    assert json.loads(layerfs("df", "--json", check=True).stdout)["layers"] == 3


@pytest.mark.parametrize("field,limit", [("uid", 8 ** 7), ("gid", 8 ** 7), ("rdev_major", 8 ** 7),
                                         ("rdev_minor", 8 ** 7), ("size", 8 ** 11)])
def test_canonical_headers_on_both_sides_of_each_field_limit(field, limit):
    """Canonical headers are made by a short path when every number fits its field and
    by the general one otherwise: on either side of each limit the header reads back
    (with its checksum) as what the entry says, in the tar that tarfile reads."""
    from layerfs.store.records import Entry
    from layerfs.store.tarformat import END, header

    kind = Kind.CHR if field.startswith("rdev") else Kind.REG
    for value in (limit - 1, limit):
        fields = {"uid": 1000, "gid": 1000, field: value}
        entry = Entry(kind, mode=0o640, mtime_ns=1_700_000_000 * 10**9, **fields)
        raw = header("dir/file", entry)
        assert len(raw) % 512 == 0
        # No data follows a file's header here: only the header is read.
        with tarfile.open(fileobj=io.BytesIO(raw + END), mode="r:") as tf:
            ti = tf.next()
        got = {"uid": ti.uid, "gid": ti.gid, "rdev_major": ti.devmajor, "rdev_minor": ti.devminor,
               "size": ti.size}
        assert (ti.name, ti.mode, ti.mtime) == ("dir/file", 0o640, 1_700_000_000)
        assert got[field] == value, (field, value)


def test_long_runs_of_headers_export_byte_identical(store, tmp_path, layerfs):
    """Headers with no file contents between them (thousands of directories, a PAX
    record over 1 MiB) are kept in tar-split records of bounded size, and come back as
    the original bytes."""
    members = [(f"d{i:05d}", "d") for i in range(4000)]  # about 2 MiB of headers
    members += [("big-pax", "f", b"x", {"pax_headers": {"comment": "c" * (1 << 21)}}),
                ("after", "f", b"after\n")]
    t = make_tar(str(tmp_path / "headers.tar"), members)
    img = store.import_tar(t)
    out = _export(layerfs, img.layers[-1], tmp_path / "out.tar")
    assert out == open(t, "rb").read()
    assert "sha256:" + hashlib.sha256(out).hexdigest() == img.layers[-1]
