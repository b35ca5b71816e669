"""Bad input through the real CLI: one clear line, a non-zero exit, and the store untouched.

Every case first imports a good image, so "untouched" is checked against a store that
holds something, and every hostile layer starts with a file of fresh contents, so a
blob staged before the bad member was seen would show up as a stray file in blobs/.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import random
import subprocess
import tarfile

import pytest
import zstandard

from helpers import assert_one_line_error, make_tar, store_snapshot

GOOD_MEMBERS = [
    ("etc", "d"),
    ("etc/hello", "f", b"hello from the good image\n"),
    ("etc/motd", "f", b"welcome\n"),
]


def tmp_leftovers(root: str) -> list[str]:
    tmp = os.path.join(root, "tmp")
    return sorted(os.listdir(tmp)) if os.path.isdir(tmp) else []


@pytest.fixture
def seeded(layerfs, store_root, tmp_path):
    """A store holding one good image, tagged good:1."""
    good = make_tar(str(tmp_path / "good.tar"), GOOD_MEMBERS)
    layerfs("import-layer", good, "-t", "good:1", check=True)
    # The first read flattens the image into the index (a cache of the merged tree);
    # do it now so the snapshots compare content, not that cache being filled.
    assert layerfs("cat", "good:1", "/etc/hello", check=True).stdout == b"hello from the good image\n"
    return store_root


@pytest.fixture
def refused(layerfs, seeded):
    """Run a command that must fail cleanly and leave the seeded store as it was."""
    def run(*args, input: bytes | None = None, mentions: tuple[str, ...] = ()) -> str:
        before = store_snapshot(seeded)
        proc = layerfs(*args, input=input)
        line = assert_one_line_error(proc, mentions=mentions)
        assert store_snapshot(seeded) == before, f"layerfs {' '.join(args)} changed the store"
        assert tmp_leftovers(seeded) == [], "the failed command left files in tmp/"
        # The good image is still whole.
        cat = layerfs("cat", "good:1", "/etc/hello", check=True)
        assert cat.stdout == b"hello from the good image\n"
        return line
    return run


def fresh(tag: str) -> tuple:
    """A member with contents no other case has: if it leaks, it leaks a new blob."""
    return ("fresh.txt", "f", f"fresh contents for case {tag}\n".encode() * 50)


def tar_bytes(members: list[tuple], tmp_path, fmt=tarfile.PAX_FORMAT) -> bytes:
    path = make_tar(str(tmp_path / "built.tar"), members, fmt=fmt)
    with open(path, "rb") as f:
        data = f.read()
    os.unlink(path)
    return data


def write(tmp_path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


# -- not a tar at all ------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    b"this is not a tar archive\n",
    b"".join(b"line %d of a plain text file that is certainly not a tar\n" % i for i in range(100)),
], ids=["short", "long"])
def test_text_file(refused, tmp_path, text):
    refused("import-layer", write(tmp_path, "notes.txt", text))


def test_empty_file(refused, tmp_path):
    refused("import-layer", write(tmp_path, "empty.tar", b""))


def test_empty_stdin(refused):
    refused("import-layer", "-", input=b"")


# -- truncated tars ---------------------------------------------------------------------


def _two_file_tar(tmp_path) -> tuple[bytes, int, int, int]:
    """A tar of two files; returns (bytes, 2nd header offset, 2nd data offset, end of data)."""
    rnd = random.Random(1)
    one = rnd.randbytes(3000)
    two = rnd.randbytes(5000)
    data = tar_bytes([("one.bin", "f", one), ("two.bin", "f", two)], tmp_path,
                     fmt=tarfile.USTAR_FORMAT)
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        m1, m2 = tf.getmembers()
    end_of_data = m2.offset_data + (m2.size + 511) // 512 * 512
    assert data[end_of_data:] == b"\0" * (len(data) - end_of_data)
    return data, m2.offset, m2.offset_data, end_of_data


@pytest.mark.parametrize("where", ["first header", "second header", "file data",
                                   "data padding", "no end blocks"])
def test_truncated_tar(refused, tmp_path, where):
    data, hdr2, data2, end = _two_file_tar(tmp_path)
    cut = {"first header": 300, "second header": hdr2 + 200, "file data": data2 + 2500,
           "data padding": end - 20, "no end blocks": end}[where]
    refused("import-layer", write(tmp_path, "cut.tar", data[:cut]))


def test_truncated_tar_on_stdin(refused, tmp_path):
    data, _, data2, _ = _two_file_tar(tmp_path)
    refused("import-layer", "-", input=data[:data2 + 2500])


# -- broken compression ---------------------------------------------------------------


def _layer_with_new_data(tmp_path) -> bytes:
    return tar_bytes([fresh("compressed"), ("big.bin", "f", random.Random(2).randbytes(200_000))],
                     tmp_path)


def test_gzip_bad_crc(refused, tmp_path):
    gz = bytearray(gzip.compress(_layer_with_new_data(tmp_path), mtime=0))
    gz[-8] ^= 0xFF  # the CRC32 of the trailer
    refused("import-layer", write(tmp_path, "bad-crc.tar.gz", bytes(gz)))


def test_gzip_bad_isize(refused, tmp_path):
    gz = bytearray(gzip.compress(_layer_with_new_data(tmp_path), mtime=0))
    gz[-1] ^= 0x01  # the length in the trailer
    refused("import-layer", write(tmp_path, "bad-size.tar.gz", bytes(gz)))


@pytest.mark.parametrize("codec", ["gzip", "zstd", "bzip2", "xz"])
def test_truncated_compressed(refused, tmp_path, codec):
    raw = _layer_with_new_data(tmp_path)
    comp = {"gzip": lambda b: gzip.compress(b, mtime=0),
            "zstd": lambda b: zstandard.ZstdCompressor().compress(b),
            "bzip2": bz2.compress, "xz": lzma.compress}[codec](raw)
    refused("import-layer", write(tmp_path, f"cut.{codec}", comp[: len(comp) * 2 // 3]))


def test_gzip_cut_in_trailer(refused, tmp_path):
    gz = gzip.compress(_layer_with_new_data(tmp_path), mtime=0)
    refused("import-layer", write(tmp_path, "cut-trailer.tar.gz", gz[:-3]))


def _tar_ending_before_its_padding(tmp_path) -> tuple[bytes, int]:
    """A tar whose end-of-archive blocks end at 128 KiB, followed by record padding.

    Returns (tar, offset just after the end blocks). A decoder that stops early anywhere
    in the padding still yields a complete-looking tar, so only the codec can tell.
    """
    data = random.Random(5).randbytes(128 * 1024 - 1536)
    raw = tar_bytes([("data.bin", "f", data)], tmp_path, fmt=tarfile.USTAR_FORMAT)
    end = 512 + len(data) + 1024
    assert end == 128 * 1024 and len(raw) > end and raw[end - 1024:] == bytes(len(raw) - end + 1024)
    return raw, end


def _zstd_cut_in_padding(raw: bytes, end: int) -> bytes:
    """The zstd frame cut so that what still decodes ends inside the padding."""
    comp = zstandard.ZstdCompressor().compress(raw)
    for cut in range(len(comp) - 1, 0, -1):
        out = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(comp[:cut])).read()
        if end <= len(out) < len(raw):
            return comp[:cut]
    pytest.fail("no cut of the zstd frame decodes to a prefix ending in the padding")


@pytest.mark.parametrize("how", ["gzip trailer", "bzip2 end marker", "xz footer",
                                 "zstd checksum", "zstd last block"])
def test_compressed_cut_after_the_tar_ends(refused, tmp_path, how):
    """A download cut short is refused even when the cut falls after the tar's end blocks."""
    raw, end = _tar_ending_before_its_padding(tmp_path)
    comp = {
        "gzip trailer": lambda: gzip.compress(raw, mtime=0)[:-4],
        "bzip2 end marker": lambda: bz2.compress(raw)[:-4],
        "xz footer": lambda: lzma.compress(raw)[:-6],
        "zstd checksum": lambda: zstandard.ZstdCompressor(write_checksum=True).compress(raw)[:-2],
        "zstd last block": lambda: _zstd_cut_in_padding(raw, end),
    }[how]()
    refused("import-layer", write(tmp_path, "cut-layer.tar.z", comp))


def test_zstd_bad_checksum(refused, tmp_path):
    comp = bytearray(zstandard.ZstdCompressor(write_checksum=True).compress(_layer_with_new_data(tmp_path)))
    comp[-1] ^= 0xFF
    refused("import-layer", write(tmp_path, "bad-checksum.tar.zst", bytes(comp)))


def test_zstd_garbage(refused, tmp_path):
    junk = b"\x28\xb5\x2f\xfd" + random.Random(3).randbytes(4000)
    refused("import-layer", write(tmp_path, "junk.tar.zst", junk))


def test_gzip_garbage(refused, tmp_path):
    junk = b"\x1f\x8b\x08\x00" + random.Random(4).randbytes(4000)
    refused("import-layer", write(tmp_path, "junk.tar.gz", junk))


# -- hostile members ----------------------------------------------------------------------

HOSTILE = {
    "parent traversal": [("../evil", "f", b"evil\n")],
    "nested traversal": [("a", "d"), ("a/../../evil", "f", b"evil\n")],
    "traversal dir": [("../evildir", "d")],
    "traversal symlink name": [("../evil-link", "l", "/etc/passwd")],
    "absolute path": [("/etc/passwd", "f", b"root::0:0::/root:/bin/sh\n")],
    "absolute dir": [("/etc", "d")],
    "hardlink escapes": [("shadow", "h", "../../etc/shadow")],
    "hardlink absolute": [("shadow", "h", "/etc/shadow")],
    "hardlink to later name": [("early", "h", "later"), ("later", "f", b"later\n")],
    "hardlink to missing name": [("lnk", "h", "nosuch")],
    "hardlink to directory": [("dir", "d"), ("lnk", "h", "dir")],
    "hardlink to itself": [("self", "h", "self")],
    "under symlink abs": [("link", "l", "/etc"), ("link/passwd", "f", b"root::0:0::/:/bin/sh\n")],
    "under symlink rel": [("link", "l", "../../.."), ("link/evil", "f", b"evil\n")],
    "under symlink deep": [("link", "l", "/etc"), ("link/sub/evil", "f", b"evil\n")],
    "dir under symlink": [("link", "l", "/etc"), ("link/cron.d", "d")],
    "symlink under symlink": [("link", "l", "/etc"), ("link/x", "l", "/bin/sh")],
    "hardlink under symlink": [("link", "l", "/etc"), ("link/x", "h", "fresh.txt")],
    "whiteout under symlink": [("link", "l", "/etc"), ("link/.wh.passwd", "f", b"")],
    "opaque under symlink": [("link", "l", "/etc"), ("link/.wh..wh..opq", "f", b"")],
    "whiteout without name": [(".wh.", "f", b"")],
    "whiteout without name in dir": [("d", "d"), ("d/.wh.", "f", b"")],
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_member(refused, tmp_path, case):
    data = tar_bytes([fresh(case)] + HOSTILE[case], tmp_path)
    refused("import-layer", write(tmp_path, "hostile.tar", data))


@pytest.mark.parametrize("name", ["../evil", "a/../../evil", "/etc/passwd"])
def test_hostile_name_is_in_the_message(refused, tmp_path, name):
    data = tar_bytes([fresh(name), (name, "f", b"x\n")], tmp_path)
    refused("import-layer", write(tmp_path, "hostile.tar", data), mentions=(name,))


def test_hostile_member_gzip_on_stdin(refused, tmp_path):
    data = tar_bytes([fresh("stdin"), ("../evil", "f", b"evil\n")], tmp_path)
    refused("import-layer", "-", input=gzip.compress(data, mtime=0))


# -- huge headers (raw bytes: tarfile would not write these) --------------------------------


def _ustar(name: bytes, size: int, typeflag: bytes) -> bytes:
    def octal(v: int, width: int) -> bytes:
        return b"%0*o\0" % (width - 1, v)
    hdr = b"".join([name.ljust(100, b"\0"), octal(0o644, 8), octal(0, 8), octal(0, 8),
                    octal(size, 12), octal(1_700_000_000, 12), b" " * 8, typeflag,
                    b"\0" * 100, b"ustar\x0000", b"\0" * 32, b"\0" * 32, octal(0, 8),
                    octal(0, 8), b"\0" * 155]).ljust(512, b"\0")
    return hdr[:148] + b"%06o\0 " % sum(hdr) + hdr[156:]


def _pad(n: int) -> bytes:
    return b"\0" * (-n % 512)


def _pax_record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    n = len(body) + 1
    while len(b"%d" % n) + len(body) != n:
        n = len(b"%d" % n) + len(body)
    return b"%d" % n + body


def _file(name: bytes, data: bytes) -> bytes:
    return _ustar(name, len(data), b"0") + data + _pad(len(data))


HUGE = 17 << 20  # more than the 16 MiB a single header may take


def test_raw_tar_builder_is_valid(seeded, layerfs, tmp_path):
    """The raw builder below makes tars the importer accepts (so the refusals mean something)."""
    rec = _pax_record(b"comment", b"a small comment")
    data = (_file(b"fresh.txt", b"fresh raw contents\n") + _ustar(b"././@PaxHeader", len(rec), b"x")
            + rec + _pad(len(rec)) + _file(b"small.txt", b"small\n") + b"\0" * 1024)
    proc = layerfs("import-layer", write(tmp_path, "ok.tar", data), "-t", "raw:ok")
    assert proc.returncode == 0, proc.stderr
    assert layerfs("cat", "raw:ok", "/small.txt", check=True).stdout == b"small\n"


@pytest.mark.parametrize("kind", ["pax holds", "pax claims", "global pax holds",
                                  "gnu longname holds", "gnu longname claims"])
def test_huge_header(refused, tmp_path, kind):
    head = _file(b"fresh.txt", f"fresh contents before a {kind} header\n".encode())
    if kind.startswith("pax") or kind.startswith("global"):
        rec = _pax_record(b"comment", b"A" * HUGE)
        flag, name = (b"g", b"././@GlobalHead") if kind.startswith("global") else (b"x", b"././@PaxHeader")
    else:
        rec = b"n" * HUGE + b"\0"
        flag, name = b"L", b"././@LongLink"
    assert len(rec) > 16 << 20
    body = rec + _pad(len(rec)) if kind.endswith("holds") else rec[:1000]
    data = head + _ustar(name, len(rec), flag) + body
    if kind.endswith("holds"):
        data += _file(b"after.txt", b"after\n") + b"\0" * 1024
    refused("import-layer", write(tmp_path, "huge-header.tar", data))


# -- sparse files -------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["gnu", "posix"])
def test_sparse_file(refused, tmp_path, fmt):
    src = tmp_path / "src"
    src.mkdir()
    (src / "fresh.txt").write_bytes(b"fresh contents before a sparse file\n")
    with open(src / "sparse.img", "wb") as f:
        f.seek(1 << 20)
        f.write(b"data in the middle of a hole")
        f.truncate(4 << 20)
    out = tmp_path / "sparse.tar"
    subprocess.run(["tar", "--sparse", f"--format={fmt}", "-cf", str(out), "-C", str(src),
                    "fresh.txt", "sparse.img"], check=True)
    with tarfile.open(out) as tf:
        assert tf.getmember("sparse.img").issparse(), "GNU tar did not write a sparse member"
    refused("import-layer", str(out))


# -- names that match nothing ----------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ("ls", "nosuch"),
    ("ls", "nosuch:v1", "/etc"),
    ("ls", "sha256:" + "ab" * 32),
    ("ls", "abcdef012345"),
    ("cat", "nosuch", "/etc/hello"),
    ("cat", "good:2", "/etc/hello"),
    ("rmi", "nosuch"),
    ("rmi", "good:2"),
    ("inspect", "nosuch"),
    ("tag", "nosuch", "other:1"),
], ids=lambda a: " ".join(a))
def test_unknown_image(refused, args):
    refused(*args)


def test_unknown_path_in_image(refused):
    refused("cat", "good:1", "/etc/nosuch", mentions=("/etc/nosuch",))


def test_cat_of_a_directory(refused):
    refused("cat", "good:1", "/etc")


def test_unknown_layer_for_export(refused, tmp_path):
    out = tmp_path / "out.tar"
    refused("export-layer", "nosuch", "-o", str(out))
    refused("export-layer", "sha256:" + "cd" * 32, "-o", str(out))
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("out.tar")] == []


def test_unknown_parent(refused, tmp_path):
    other = make_tar(str(tmp_path / "other.tar"), [fresh("parent"), ("x", "f", b"x\n")])
    refused("import-layer", other, "--parent", "nosuch", mentions=("nosuch",))
    refused("import-layer", other, "--parent", "sha256:" + "ef" * 32)


@pytest.mark.parametrize("ref", ["UPPER:bad tag", "UPPER:ok", "name:bad tag", "name:", ":tag",
                                 "a" * 300, "name:" + "t" * 200])
def test_invalid_tag_on_import(refused, tmp_path, ref):
    other = make_tar(str(tmp_path / "other.tar"), [fresh(ref[:20]), ("x", "f", b"x\n")])
    refused("import-layer", other, "-t", ref)


def test_invalid_tag_for_tag_command(refused):
    refused("tag", "good:1", "UPPER:bad tag")


# -- the store itself -------------------------------------------------------------------------


def _listing(path) -> dict:
    out = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for n in dirnames + filenames:
            full = os.path.join(dirpath, n)
            out[os.path.relpath(full, path)] = open(full, "rb").read() if os.path.isfile(full) else None
    return out


@pytest.mark.parametrize("how", ["--root", "env"])
def test_root_is_a_directory_that_is_not_a_store(layerfs, tmp_path, how):
    notstore = tmp_path / "photos"
    notstore.mkdir()
    (notstore / "holiday.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (notstore / "sub").mkdir()
    before = _listing(notstore)
    good = make_tar(str(tmp_path / "good.tar"), GOOD_MEMBERS)
    for args in (["images"], ["import-layer", good], ["df"]):
        if how == "--root":
            proc = layerfs(*args, "--root", str(notstore))
        else:
            proc = layerfs(*args, root=str(notstore))
        assert_one_line_error(proc)
        assert _listing(notstore) == before, f"layerfs {args[0]} wrote into a non-store directory"


@pytest.mark.parametrize("how", ["--root", "env"])
def test_root_is_a_regular_file(layerfs, tmp_path, how):
    f = tmp_path / "notes.txt"
    f.write_bytes(b"my notes\n")
    good = make_tar(str(tmp_path / "good.tar"), GOOD_MEMBERS)
    for args in (["images"], ["import-layer", good]):
        if how == "--root":
            proc = layerfs(*args, "--root", str(f))
        else:
            proc = layerfs(*args, root=str(f))
        assert_one_line_error(proc)
        assert f.read_bytes() == b"my notes\n"


def test_directory_given_to_import_layer(refused, tmp_path):
    d = tmp_path / "layerdir"
    d.mkdir()
    (d / "file").write_bytes(b"x")
    refused("import-layer", str(d), mentions=(str(d),))


def test_missing_file(refused, tmp_path):
    missing = str(tmp_path / "no-such-layer.tar")
    refused("import-layer", missing, mentions=(missing,))


# -- full disk ------------------------------------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 3 MiB tmpfs, always unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)],
                          capture_output=True)
    assert proc.returncode == 0, f"cannot mount a tmpfs as root: {proc.stderr.decode()}"
    try:
        yield str(mnt)
    finally:
        r = subprocess.run(["umount", str(mnt)], capture_output=True)
        if r.returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_full_disk(layerfs, tmp_path, small_tmpfs):
    root = os.path.join(small_tmpfs, "store")
    good = make_tar(str(tmp_path / "good.tar"), GOOD_MEMBERS)
    layerfs("import-layer", good, "-t", "good:1", root=root, check=True)
    before = store_snapshot(root)

    big = make_tar(str(tmp_path / "big.tar"),
                   [("small.txt", "f", b"small file before the big one\n"),
                    ("big.bin", "f", os.urandom(5 << 20))])
    proc = layerfs("import-layer", big, "-t", "big:1", root=root)
    line = assert_one_line_error(proc)
    assert "space" in line.lower(), line

    assert store_snapshot(root) == before
    assert tmp_leftovers(root) == []
    cat = layerfs("cat", "good:1", "/etc/hello", root=root, check=True)
    assert cat.stdout == b"hello from the good image\n"
    images = layerfs("images", "-q", root=root, check=True).stdout.split()
    assert len(images) == 1
    # The space is free again: a small layer imports fine afterwards.
    small = make_tar(str(tmp_path / "small.tar"), [("after.txt", "f", b"after the full disk\n")])
    layerfs("import-layer", small, "-t", "after:1", root=root, check=True)
    assert layerfs("cat", "after:1", "/after.txt", root=root, check=True).stdout == b"after the full disk\n"


def test_full_disk_on_stdin(layerfs, tmp_path, small_tmpfs):
    root = os.path.join(small_tmpfs, "store")
    good = make_tar(str(tmp_path / "good.tar"), GOOD_MEMBERS)
    layerfs("import-layer", good, "-t", "good:1", root=root, check=True)
    before = store_snapshot(root)
    big = make_tar(str(tmp_path / "big.tar"), [("big.bin", "f", os.urandom(5 << 20))])
    with open(big, "rb") as f:
        data = gzip.compress(f.read(), compresslevel=1, mtime=0)
    proc = layerfs("import-layer", "-", input=data, root=root)
    line = assert_one_line_error(proc)
    assert "space" in line.lower(), line
    assert store_snapshot(root) == before
    assert tmp_leftovers(root) == []
    assert layerfs("cat", "good:1", "/etc/motd", root=root, check=True).stdout == b"welcome\n"


def _index_filler(tmp_path) -> str:
    """A layer whose file data is tiny but whose index records need several MiB:
    10,000 symlinks with 200-character targets, and one file of new contents."""
    rnd = random.Random(21)
    members = [("fresh.txt", "f", b"fresh contents of a layer too big for the index\n")]
    members += [(f"links/l{i:05}", "l", rnd.randbytes(100).hex()) for i in range(10_000)]
    return make_tar(str(tmp_path / "many-links.tar"), members)


def test_full_disk_while_recording_the_index_is_one_clear_line(layerfs, tmp_path, small_tmpfs):
    root = os.path.join(small_tmpfs, "store")
    good = make_tar(str(tmp_path / "good.tar"), GOOD_MEMBERS)
    layerfs("import-layer", good, "-t", "good:1", root=root, check=True)
    proc = layerfs("import-layer", _index_filler(tmp_path), "-t", "links:1", root=root)
    line = assert_one_line_error(proc)
    assert "space" in line.lower(), line


def test_full_disk_while_recording_the_index_leaves_the_store_as_it_was(layerfs, tmp_path,
                                                                         small_tmpfs):
    root = os.path.join(small_tmpfs, "store")
    good = make_tar(str(tmp_path / "good.tar"), GOOD_MEMBERS)
    layerfs("import-layer", good, "-t", "good:1", root=root, check=True)
    assert layerfs("cat", "good:1", "/etc/hello", root=root, check=True).stdout
    before = store_snapshot(root)
    proc = layerfs("import-layer", _index_filler(tmp_path), "-t", "links:1", root=root)
    assert proc.returncode != 0
    records, files = store_snapshot(root)
    assert records == before[0], "the failed import changed the index"
    assert files == before[1], "the failed import left blob files no record refers to"
    assert tmp_leftovers(root) == []
    cat = layerfs("cat", "good:1", "/etc/hello", root=root, check=True)
    assert cat.stdout == b"hello from the good image\n"
