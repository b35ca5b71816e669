"""Records kept in the index, and their compact ``struct`` packing.

A record is a frozen dataclass, except ``Entry``, which is a ``NamedTuple``: every index
read makes one (thousands per directory listed), and a frozen dataclass takes 1.5 us to
build against 0.3 us for a tuple. ``pack``/``unpack`` are the only places that know the
byte layout, so a schema change touches one file (and bumps ``index.SCHEMA_VERSION``).
"""

from __future__ import annotations

import enum
import stat
import struct
from dataclasses import dataclass
from typing import NamedTuple


class Kind(enum.IntEnum):
    """What an entry is; WHITEOUT hides the same name in the layers below."""

    REG = 1
    DIR = 2
    SYMLINK = 3
    CHR = 4
    BLK = 5
    FIFO = 6
    WHITEOUT = 7


# Entry flags.
OPAQUE = 1  # a directory that hides everything below it
IMPLICIT = 2  # a directory the layer implies (a parent of an entry) but never described

_S_IFMT = {
    Kind.REG: stat.S_IFREG,
    Kind.DIR: stat.S_IFDIR,
    Kind.SYMLINK: stat.S_IFLNK,
    Kind.CHR: stat.S_IFCHR,
    Kind.BLK: stat.S_IFBLK,
    Kind.FIFO: stat.S_IFIFO,
}


class Entry(NamedTuple):
    """One name in one layer: metadata, and where its bytes are (``_replace`` for a changed copy)."""

    kind: Kind
    mode: int = 0o644  # permission bits only (incl. setuid/setgid/sticky)
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    size: int = 0
    blob: str = ""  # blob id of a regular file's contents; "" when empty
    target: str = ""  # symlink target
    hardlink: str = ""  # for a hard-linked file: the group's first path in this layer
    nlink: int = 1
    rdev_major: int = 0
    rdev_minor: int = 0
    flags: int = 0
    xattrs: tuple[tuple[str, bytes], ...] = ()

    @property
    def st_mode(self) -> int:
        """The full ``st_mode`` (type and permission bits)."""
        return _S_IFMT.get(self.kind, 0) | self.mode

    @property
    def is_dir(self) -> bool:
        return self.kind == Kind.DIR

    @property
    def opaque(self) -> bool:
        return bool(self.flags & OPAQUE)

    @property
    def implicit(self) -> bool:
        return bool(self.flags & IMPLICIT)


_ENTRY = struct.Struct("<BBIIIqIQIIIHIIH")  # mtime as seconds and nanoseconds


def _b(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def _s(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def pack_entry(e: Entry) -> bytes:
    """Serialise an entry for the ``entries`` database."""
    blob, target, hardlink = _b(e.blob), _b(e.target), _b(e.hardlink)
    secs, nsec = divmod(e.mtime_ns, 1_000_000_000)
    parts = [
        _ENTRY.pack(
            e.kind, e.flags, e.mode, e.uid, e.gid, secs, nsec, e.size, e.nlink,
            e.rdev_major, e.rdev_minor, len(blob), len(target), len(hardlink), len(e.xattrs),
        ),
        blob, target, hardlink,
    ]
    for name, value in e.xattrs:
        n = _b(name)
        parts.append(struct.pack("<HI", len(n), len(value)))
        parts.append(n)
        parts.append(value)
    return b"".join(parts)


_BLOB_LEN_AT = struct.calcsize("<BBIIIqIQIII")  # where the blob id's length is packed


def entry_blob(buf: bytes) -> bytes:
    """Just the blob id of a packed entry (gc and fsck scan millions of these)."""
    (n,) = struct.unpack_from("<H", buf, _BLOB_LEN_AT)
    return bytes(buf[_ENTRY.size:_ENTRY.size + n])


def entry_is_dir(buf: bytes) -> bool:
    """Whether a packed entry is a directory (without unpacking it)."""
    return buf[0] == Kind.DIR


_KINDS = {k.value: k for k in Kind}  # Kind(n) costs 0.3 us, a dict lookup 0.02


def unpack_entry(buf: bytes) -> Entry:
    """Inverse of :func:`pack_entry`."""
    (kind, flags, mode, uid, gid, secs, nsec, size, nlink, major, minor,
     lblob, ltarget, lhard, nx) = _ENTRY.unpack_from(buf)
    mtime_ns = secs * 1_000_000_000 + nsec
    pos = _ENTRY.size
    blob = _s(buf[pos:pos + lblob]); pos += lblob
    target = _s(buf[pos:pos + ltarget]); pos += ltarget
    hardlink = _s(buf[pos:pos + lhard]); pos += lhard
    xattrs = []
    for _ in range(nx):
        ln, lv = struct.unpack_from("<HI", buf, pos)
        pos += 6
        name = _s(buf[pos:pos + ln]); pos += ln
        xattrs.append((name, bytes(buf[pos:pos + lv]))); pos += lv
    return Entry(_KINDS[kind], mode, uid, gid, mtime_ns, size, blob, target, hardlink,
                 nlink, major, minor, flags, tuple(xattrs))


class Source(enum.IntEnum):
    """Where a layer came from; decides how it is exported."""

    TAR = 1  # exported byte for byte from its tar-split record
    DIR = 2  # exported as a canonical tar
    COMMIT = 3  # exported as a canonical tar


@dataclass(slots=True, frozen=True)
class LayerRecord:
    """A layer: an immutable set of entries named by its diff_id."""

    diff_id: str  # "sha256:<hex>" of the uncompressed tar
    num: int  # short local number used as the key prefix of its entries
    size: int  # bytes of the uncompressed tar
    entries: int
    file_bytes: int  # sum of regular file sizes (each hard-link group once)
    created_ns: int
    source: Source
    comment: str = ""  # where it came from, for humans


_LAYER = struct.Struct("<IQIQqB")


def pack_layer(r: LayerRecord) -> bytes:
    return _LAYER.pack(r.num, r.size, r.entries, r.file_bytes, r.created_ns, r.source) + _b(r.comment)


def unpack_layer(diff_id: str, buf: bytes) -> LayerRecord:
    num, size, entries, file_bytes, created, source = _LAYER.unpack_from(buf)
    return LayerRecord(diff_id, num, size, entries, file_bytes, created, Source(source),
                       _s(bytes(buf[_LAYER.size:])))


@dataclass(slots=True, frozen=True)
class ImageRecord:
    """An image: its layers bottom-up and its OCI config (whose digest is the image id)."""

    image_id: str  # "sha256:<hex>" of config
    layers: tuple[str, ...]  # diff_ids, base first
    config: bytes  # the OCI image config JSON, exactly as hashed
    created_ns: int


def pack_image(r: ImageRecord) -> bytes:
    head = struct.pack("<qI", r.created_ns, len(r.layers))
    return head + b"".join(digest_bytes(d) for d in r.layers) + r.config


def unpack_image(image_id: str, buf: bytes) -> ImageRecord:
    created, n = struct.unpack_from("<qI", buf)
    pos = 12
    layers = tuple(bytes_digest(buf[pos + 32 * i: pos + 32 * (i + 1)]) for i in range(n))
    return ImageRecord(image_id, layers, bytes(buf[pos + 32 * n:]), created)


@dataclass(slots=True, frozen=True)
class LayerBlob:
    """A compressed form of a layer, as it was loaded or pulled: the digest registries and
    manifests know the layer by. Its bytes are kept (``blob``), so that a push sends the
    very same blob and the digest survives; a form known only by its descriptor (the layer
    was already stored) has no ``blob``, and can still be mounted or found on a registry."""

    diff_id: str
    digest: str  # sha256 of the compressed bytes
    media_type: str
    size: int
    blob: str = ""  # the store blob holding the bytes; "" when only the descriptor is known
    sources: tuple[str, ...] = ()  # "registry/repository" names known to hold it, newest first


_LAYERBLOB = struct.Struct("<QHH")
MAX_SOURCES = 16


def layer_blob_key(diff_id: str, digest: str) -> bytes:
    """``diff_id | digest``: a layer's compressed forms are one contiguous range."""
    return digest_bytes(diff_id) + digest_bytes(digest)


def pack_layer_blob(r: LayerBlob) -> bytes:
    media_type, blob = _b(r.media_type), _b(r.blob)
    return (_LAYERBLOB.pack(r.size, len(media_type), len(blob)) + media_type + blob
            + _b("\n".join(r.sources)))


def unpack_layer_blob(key: bytes, buf: bytes) -> LayerBlob:
    size, lmt, lblob = _LAYERBLOB.unpack_from(buf)
    pos = _LAYERBLOB.size
    media_type = _s(buf[pos:pos + lmt]); pos += lmt
    blob = _s(buf[pos:pos + lblob]); pos += lblob
    rest = _s(bytes(buf[pos:]))
    return LayerBlob(bytes_digest(key[:32]), bytes_digest(key[32:64]), media_type, size, blob,
                     tuple(rest.split("\n")) if rest else ())


def merge_layer_blob(old: LayerBlob | None, new: LayerBlob) -> LayerBlob:
    """What the index keeps when a form is seen again: the bytes already kept (or the new
    ones), and the new sources before the old."""
    if old is None:
        return new
    sources = tuple(dict.fromkeys(new.sources + old.sources))[:MAX_SOURCES]
    return LayerBlob(old.diff_id, old.digest, old.media_type or new.media_type, old.size,
                     old.blob or new.blob, sources)


def digest_bytes(digest: str) -> bytes:
    """``sha256:<hex>`` -> 32 raw bytes (index keys)."""
    return bytes.fromhex(digest.split(":", 1)[1])


def bytes_digest(raw: bytes) -> str:
    return "sha256:" + bytes(raw).hex()
