"""The canonical tar format of layers made from directories and commits.

Written here rather than by ``tarfile`` so that the bytes (and so the layer id, their
sha256) never change with the Python version: ustar headers, a PAX header only where
ustar cannot say it (long or non-ASCII names, nanosecond mtimes, large numbers,
xattrs), records sorted, two zero blocks at the end and no record padding.

Order: depth first; in each directory the opaque marker, then whiteouts, then the other
entries, each group sorted by name bytes. A hard-linked file's first path in that order
holds the data; the others are hard links to it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from .errors import StoreCorrupt
from .records import Entry, Kind

BLOCK = 512
OPAQUE_MARKER = ".wh..wh..opq"
WHITEOUT_PREFIX = ".wh."
# overlayfs keeps its own state in these xattrs: meaningful to overlay, never content.
PRIVATE_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.", "user.fuseoverlayfs.")

_TYPEFLAG = {
    Kind.REG: b"0", Kind.DIR: b"5", Kind.SYMLINK: b"2", Kind.CHR: b"3",
    Kind.BLK: b"4", Kind.FIFO: b"6", Kind.WHITEOUT: b"0",
}


def _enc(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def _pax_record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n).encode()) + len(body) != n:
        n = len(str(n).encode()) + len(body)
    return str(n).encode() + body


_MAX7 = 8 ** 7  # the numbers that fit 7 octal digits (an 8-byte field), and 11 below
_MAX11 = 8 ** 11
_MAGIC_UNAMES = b"ustar\x0000" + b"\0" * 64
_PREFIX_PAD = b"\0" * (155 + 12)


def _ustar(name: bytes, mode: int, uid: int, gid: int, size: int, mtime: int,
           typeflag: bytes, linkname: bytes = b"", major: int = 0, minor: int = 0) -> bytes:
    if (0 <= mode < _MAX7 and 0 <= uid < _MAX7 and 0 <= gid < _MAX7 and 0 <= size < _MAX11
            and 0 <= mtime < _MAX11 and 0 <= major < _MAX7 and 0 <= minor < _MAX7):
        # Every number fits its field: the same bytes as below, in fewer steps (a
        # commit makes two headers per file).
        header = b"".join((
            name.ljust(100, b"\0"),
            b"%07o\0%07o\0%07o\0%011o\0%011o\0" % (mode, uid, gid, size, mtime), b" " * 8,
            typeflag, linkname.ljust(100, b"\0"), _MAGIC_UNAMES, b"%07o\0%07o\0" % (major, minor),
            _PREFIX_PAD))
        return header[:148] + b"%06o\0 " % sum(header) + header[156:]
    header = b"".join([
        name.ljust(100, b"\0"), _octal(mode, 8), _octal(uid, 8), _octal(gid, 8),
        _octal(size, 12), _octal(mtime, 12), b" " * 8, typeflag, linkname.ljust(100, b"\0"),
        b"ustar\x0000", b"\0" * 32, b"\0" * 32, _octal(major, 8), _octal(minor, 8),
        b"\0" * 155,
    ]).ljust(BLOCK, b"\0")
    checksum = b"%06o\0 " % sum(header)
    return header[:148] + checksum + header[156:]


def padding(size: int) -> bytes:
    """Zero bytes that round ``size`` up to a whole block."""
    return b"\0" * (-size % BLOCK)


def _fits(value: int, width: int) -> bool:
    return 0 <= value < 8 ** (width - 1)


def _mtime_pax(mtime_ns: int) -> bytes:
    secs, ns = divmod(mtime_ns, 1_000_000_000)
    if secs < 0 and ns:  # -1.5 s is secs=-2, ns=5e8: write "-1.5"
        secs, ns = secs + 1, 1_000_000_000 - ns
        text = b"-%d.%09d" % (-secs, ns) if secs <= 0 else b"%d.%09d" % (secs, ns)
    else:
        text = b"%d.%09d" % (secs, ns)
    return text.rstrip(b"0").rstrip(b".") if ns else b"%d" % secs


def header(path: str, entry: Entry, link_to: str = "") -> bytes:
    """The header block(s) of one entry; ``link_to`` makes it a hard link to that path.

    A whiteout entry is written as its OCI marker ``.wh.NAME``.
    """
    parent, _, name = path.rpartition("/")
    if entry.kind == Kind.WHITEOUT:
        path = (parent + "/" if parent else "") + WHITEOUT_PREFIX + name
        return _with_pax(_enc(path), 0, 0, 0, 0, 0, b"0")
    if entry.kind == Kind.DIR:
        path += "/"
    if link_to:
        return _with_pax(_enc(path), entry.mode, entry.uid, entry.gid, 0, entry.mtime_ns, b"1",
                         _enc(link_to), xattrs=entry.xattrs)
    size = entry.size if entry.kind == Kind.REG else 0
    return _with_pax(_enc(path), entry.mode, entry.uid, entry.gid, size, entry.mtime_ns,
                     _TYPEFLAG[entry.kind], _enc(entry.target), entry.rdev_major,
                     entry.rdev_minor, entry.xattrs)


def opaque_marker(dir_path: str) -> bytes:
    """The header of the ``.wh..wh..opq`` marker that makes ``dir_path`` opaque."""
    path = (dir_path + "/" if dir_path else "") + OPAQUE_MARKER
    return _with_pax(_enc(path), 0, 0, 0, 0, 0, b"0")


def _with_pax(name: bytes, mode: int, uid: int, gid: int, size: int, mtime_ns: int,
              typeflag: bytes, linkname: bytes = b"", major: int = 0, minor: int = 0,
              xattrs: Iterable[tuple[str, bytes]] = ()) -> bytes:
    pax: dict[bytes, bytes] = {}
    if len(name) > 100 or not name.isascii():
        pax[b"path"] = name
        name = name[:100].decode("ascii", "replace").encode("ascii", "replace")
    if len(linkname) > 100 or not linkname.isascii():
        pax[b"linkpath"] = linkname
        linkname = linkname[:100].decode("ascii", "replace").encode("ascii", "replace")
    mtime = mtime_ns // 1_000_000_000
    if mtime_ns % 1_000_000_000 or not _fits(mtime, 12):
        pax[b"mtime"] = _mtime_pax(mtime_ns)
        mtime = mtime if _fits(mtime, 12) else 0
    for key, value, width in ((b"uid", uid, 8), (b"gid", gid, 8), (b"size", size, 12)):
        if not _fits(value, width):
            pax[key] = b"%d" % value
    uid, gid = (v if _fits(v, 8) else 0 for v in (uid, gid))
    ustar_size = size if _fits(size, 12) else 0
    for xname, xvalue in xattrs:
        pax[b"SCHILY.xattr." + _enc(xname)] = xvalue
    main = _ustar(name, mode, uid, gid, ustar_size, mtime, typeflag, linkname, major, minor)
    if not pax:
        return main
    data = b"".join(_pax_record(k, pax[k]) for k in sorted(pax))
    return _ustar(b"././@PaxHeader", 0o644, 0, 0, len(data), 0, b"x") + data + padding(len(data)) + main


END = b"\0" * (2 * BLOCK)


def sort_key(name: str, entry: Entry) -> tuple[int, bytes]:
    """How a directory's children are ordered in the canonical tar."""
    return (0 if entry.kind == Kind.WHITEOUT else 1, _enc(name))


def canonical_order(entries: dict[str, Entry]) -> list[str]:
    """Every path of a layer in canonical tar order (the root "" first, if present)."""
    children: dict[str, list[str]] = {}
    for path in entries:
        if path:
            children.setdefault(path.rpartition("/")[0], []).append(path)
    out: list[str] = [""] if "" in entries else []
    # Depth first without recursion: a deep tree must not hit Python's recursion limit.
    pending: list[Iterator[str]] = []

    def sorted_children(d: str) -> Iterator[str]:
        kids = children.get(d, [])
        kids.sort(key=lambda p: sort_key(p.rpartition("/")[2], entries[p]))
        return iter(kids)

    pending.append(sorted_children(""))
    while pending:
        nxt = next(pending[-1], None)
        if nxt is None:
            pending.pop()
            continue
        out.append(nxt)
        if entries[nxt].kind == Kind.DIR:
            pending.append(sorted_children(nxt))
    return out


def canonical_tar(entries: dict[str, Entry],
                  open_chunks: Callable[[str, Entry], Iterable[bytes]]) -> Iterator[bytes]:
    """The canonical tar of a layer, as chunks; ``open_chunks(path, entry)`` streams a file."""
    primaries: dict[str, str] = {}
    for path in canonical_order(entries):
        entry = entries[path]
        if path == "":
            if not entry.implicit:
                yield header(".", entry)
            if entry.opaque:
                yield opaque_marker("")
            continue
        if entry.implicit:
            continue
        group = entry.hardlink
        if group and group in primaries:
            yield header(path, entry, link_to=primaries[group])
            continue
        if group:
            primaries[group] = path
        yield header(path, entry)
        if entry.kind == Kind.DIR and entry.opaque:
            yield opaque_marker(path)
        if entry.kind == Kind.REG and entry.size:
            written = 0
            for chunk in open_chunks(path, entry):
                written += len(chunk)
                yield chunk
            if written != entry.size:
                raise StoreCorrupt(f"{path} has {written} bytes where {entry.size} were expected")
            yield padding(entry.size)
    yield END
