"""Malformed and hostile tar headers: numbers out of range, too many or invalid xattrs,
over-long names and targets are one clear error line with the store untouched; names
with control characters import, and ls and diff print them escaped (raw in --json)."""

from __future__ import annotations

import io
import json
import os
import tarfile

import pytest

from helpers import assert_one_line_error, make_tar, store_snapshot


@pytest.fixture
def seeded(layerfs, tmp_path, store_root):
    good = make_tar(str(tmp_path / "good.tar"), [("etc", "d"), ("etc/hello", "f", b"hello\n")])
    layerfs("import-layer", good, "-t", "good:1", check=True)
    assert layerfs("ls", "-R", "good:1", check=True).stdout
    return store_root


def _tar(members: list[tarfile.TarInfo | tuple[tarfile.TarInfo, bytes] | bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        fresh = tarfile.TarInfo("fresh.txt")
        data = os.urandom(64)  # contents no other case has: a leak would be a new blob
        fresh.size = len(data)
        tf.addfile(fresh, io.BytesIO(data))
        for m in members:
            if isinstance(m, bytes):  # raw header blocks tarfile would not write
                tf.fileobj.write(m)
                tf.offset += len(m)
                continue
            ti, data = m if isinstance(m, tuple) else (m, b"")
            tf.addfile(ti, io.BytesIO(data) if data else None)
    return buf.getvalue()


def _member(name: str, pax: dict | None = None, **attrs) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.mtime = 1_700_000_000
    ti.pax_headers = dict(pax or {})
    for k, v in attrs.items():
        setattr(ti, k, v)
    return ti


def _raw_ustar(name: bytes, size_field: bytes, typeflag: bytes = b"0", dev_field: bytes | None = None) -> bytes:
    """A ustar header with raw numeric fields (GNU base-256 among them)."""
    def octal(v: int, width: int) -> bytes:
        return b"%0*o\0" % (width - 1, v)
    dev = dev_field or octal(0, 8)
    hdr = b"".join([name.ljust(100, b"\0"), octal(0o644, 8), octal(0, 8), octal(0, 8), size_field,
                    octal(1_700_000_000, 12), b" " * 8, typeflag, b"\0" * 100, b"ustar\x0000",
                    b"\0" * 32, b"\0" * 32, dev, octal(0, 8), b"\0" * 155]).ljust(512, b"\0")
    return hdr[:148] + b"%06o\0 " % sum(hdr) + hdr[156:]


def _many_xattrs(n: int) -> dict:
    return {f"SCHILY.xattr.user.a{i:06}": "1" for i in range(n)}


CASES = {
    "PAX mtime inf": lambda: _tar([_member("f", {"mtime": "inf"})]),
    "PAX mtime -inf": lambda: _tar([_member("f", {"mtime": "-inf"})]),
    "PAX mtime nan": lambda: _tar([_member("f", {"mtime": "nan"})]),
    "PAX mtime 1e40": lambda: _tar([_member("f", {"mtime": "1e40"})]),
    "PAX mtime 40 digits": lambda: _tar([_member("f", {"mtime": "9" * 40})]),
    "PAX size -1": lambda: _tar([_member("f", {"size": "-1"})]),
    "base-256 size -1": lambda: _tar([_raw_ustar(b"neg", b"\xff" * 12)]),
    "base-256 device major 2**55": lambda: _tar([_raw_ustar(
        b"dev", b"%011o\0" % 0, b"3", b"\x80" + (1 << 55).to_bytes(7, "big"))]),
    "70,000 xattrs": lambda: _tar([_member("f", _many_xattrs(70_000))]),
    "xattr names over 64 KiB": lambda: _tar([_member("f", {f"SCHILY.xattr.user.{'n' * 200}{i:04}": "1"
                                                           for i in range(400)})]),
    "empty xattr name": lambda: _tar([_member("f", {"SCHILY.xattr.": "x"})]),
    "xattr name of 256 bytes": lambda: _tar([_member("f", {"SCHILY.xattr.user." + "n" * 251: "x"})]),
    "xattr value over 64 KiB": lambda: _tar([_member("f", {"SCHILY.xattr.user.big": "v" * 65537})]),
    "symlink target of 4096 bytes": lambda: _tar([_member("l", type=tarfile.SYMTYPE,
                                                          linkname="/" + "t" * 4095)]),
    "symlink target of 100,000 bytes": lambda: _tar([_member("l", type=tarfile.SYMTYPE,
                                                             linkname="t/" * 50_000)]),
    "name of 256 bytes": lambda: _tar([_member("n" * 256)]),
    "path of 4096 bytes": lambda: _tar([_member("/".join(["p" * 63] * 64) + "/xxxxxxxxxxxxxxx")]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_header_is_one_line(layerfs, seeded, tmp_path, case):
    data = CASES[case]()
    path = tmp_path / "bad.tar"
    path.write_bytes(data)
    before = store_snapshot(seeded)
    line = assert_one_line_error(layerfs("import-layer", str(path)))
    assert len(line) < 700, line
    assert store_snapshot(seeded) == before
    assert os.listdir(os.path.join(seeded, "tmp")) == []
    assert layerfs("cat", "good:1", "/etc/hello", check=True).stdout == b"hello\n"


def test_the_limits_themselves_import(layerfs, tmp_path):
    """What Linux takes exactly is kept: the refusals above are at the limits."""
    xattrs = {f"SCHILY.xattr.user.{'n' * 200}{i:04}": "1" for i in range(300)}  # 63,300 bytes of names
    data = _tar([_member("f", xattrs), _member("x", {"SCHILY.xattr.user." + "n" * 250: "v" * 65536}),
                 _member("l", type=tarfile.SYMTYPE, linkname="/" + "t" * 4094),
                 _member("n" * 255, {"mtime": "-1.5"})])
    (tmp_path / "ok.tar").write_bytes(data)
    layerfs("import-layer", str(tmp_path / "ok.tar"), "-t", "limits:1", check=True)
    rows = {r["path"]: r for r in json.loads(layerfs("ls", "--json", "limits:1", check=True).stdout)}
    assert len(rows["/f"]["xattrs"]) == 300 and len(rows["/l"]["target"]) == 4095
    assert rows["/" + "n" * 255]["mtime_ns"] == -1_500_000_000


NASTY = {
    "new\nline": "a name with a newline",
    "esc\x1b[31mred\x1b[0m": "an ANSI colour sequence",
    "bell\x07": "a bell",
    "bs\\x41": "a backslash",
    "bidi\u202eevil": "a bidi override",
    "del\x7f": "DEL",
}


def test_ls_and_diff_escape_control_characters(layerfs, tmp_path, store_root):
    members = [(name, "f", b"x\n") for name in NASTY]
    members += [("dir\nx", "d"), ("dir\nx/inner\x1b]0;title\x07", "f", b"y\n"),
                ("link", "l", "target\nwith\x1bline")]
    tar = make_tar(str(tmp_path / "nasty.tar"), members)
    raw = tarfile.open(tar)
    raw.close()
    layerfs("import-layer", tar, "-t", "nasty:1", check=True)

    out = layerfs("ls", "-R", "nasty:1", check=True).stdout
    assert b"\x1b" not in out and b"\x07" not in out and b"\x7f" not in out
    assert "\u202e".encode() not in out
    text = out.decode()
    lines = text.splitlines()
    for shown in ("new\\nline", "esc\\x1b[31mred\\x1b[0m", "bell\\x07", "bs\\\\x41", "bidi\\u202eevil",
                  "del\\x7f", "dir\\nx", "link -> target\\nwith\\x1bline"):
        assert any(line.endswith(shown) for line in lines), (shown, text)
    assert "/dir\\nx:" in lines and any(line.endswith("inner\\x1b]0;title\\x07") for line in lines)

    rows = json.loads(layerfs("ls", "-R", "--json", "nasty:1", check=True).stdout)
    paths = {r["path"] for r in rows}
    assert {"/" + n for n in NASTY} <= paths and "/dir\nx/inner\x1b]0;title\x07" in paths
    assert {r["target"] for r in rows if r["type"] == "symlink"} == {"target\nwith\x1bline"}

    cid = layerfs("create", "nasty:1", "--name", "nasty", check=True).stdout.decode().strip()
    upper = os.path.join(store_root, "containers", cid, "upper")
    with open(os.path.join(upper, "made\x1b[2Jhere"), "w") as f:
        f.write("z")
    diff = layerfs("diff", "nasty", check=True).stdout
    assert diff == b"A /made\\x1b[2Jhere\n"
    assert json.loads(layerfs("diff", "--json", "nasty", check=True).stdout) == \
        [{"kind": "A", "path": "/made\x1b[2Jhere", "left_out": None}]


def _header_blocks() -> list[bytes]:
    """Header blocks as tar writers make them, in every format and type, then mangled:
    bytes flipped, numbers in base-256, fields without their NUL, bad checksums."""
    import random

    rng = random.Random(12)
    blocks = []
    names = ["f", "dir/", "a/b/c.txt", "ünï/cödé", "x" * 99, "p/" * 60 + "long", "d" * 100]
    for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        for kind in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE,
                     tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE,
                     tarfile.CONTTYPE):
            for name in names:
                ti = tarfile.TarInfo(name)
                ti.type, ti.mode, ti.uid, ti.gid = kind, rng.randrange(0o10000), 1000, 100
                ti.size = rng.randrange(5000) if kind in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
                ti.mtime, ti.linkname = 1_700_000_000, "target"
                ti.devmajor, ti.devminor = rng.randrange(300), rng.randrange(300)
                try:
                    raw = ti.tobuf(fmt, "utf-8", "surrogateescape")
                except ValueError:
                    continue  # a name this format cannot hold
                blocks += [raw[i:i + 512] for i in range(0, len(raw), 512)]
    mangled = []
    for block in blocks:
        for _ in range(6):
            b = bytearray(block)
            what = rng.randrange(5)
            if what == 0:
                b[rng.randrange(512)] = rng.randrange(256)
            elif what == 1:  # a number in base-256
                a = rng.choice((100, 108, 116, 124, 136, 329, 337))
                b[a] = rng.choice((0o200, 0o377))
            elif what == 2:  # a field filled to its end
                a, n = rng.choice(((0, 100), (124, 12), (136, 12), (157, 100), (345, 155)))
                b[a:a + n] = bytes(rng.choice(b"0123 7\x1cx") for _ in range(n))
            elif what == 3:  # a checksum off by one, or signed
                b[148:156] = b"%06o\0 " % (sum(b) - sum(b[148:156]) + 256 + rng.choice((-1, 1)))
            if what != 3 and rng.randrange(2):  # mostly with a checksum that matches again
                b[148:156] = b" " * 8
                b[148:156] = b"%06o\0 " % sum(b)
            mangled.append(bytes(b))
    return blocks + mangled + [b"\0" * 512, b"", b"x" * 100]


def _parse(cls, block: bytes):
    try:
        ti = cls.frombuf(block, "utf-8", "surrogateescape")
    except Exception as e:  # the error is part of the answer
        return type(e).__name__, str(e)
    return {k: getattr(ti, k, None) for k in tarfile.TarInfo.__slots__}


def test_the_short_header_parse_reads_every_header_as_tarfile_does():
    """The importer's short parse of plain ustar headers gives what tarfile's own gives,
    value for value and error for error, on headers of every format and type and on
    mangled ones."""
    from layerfs.store.tarimport import _PlainTarInfo

    blocks = _header_blocks()
    assert len(blocks) > 1000
    short = 0
    for block in blocks:
        assert _parse(_PlainTarInfo, block) == _parse(tarfile.TarInfo, block), block
        short += len(block) == 512 and block[257:265] == b"ustar\x0000"
    assert short > 300  # the short path ran, on clean and on mangled headers
