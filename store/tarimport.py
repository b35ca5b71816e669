"""Import a layer from a tar stream (plain, gzip, zstd, bzip2 or xz).

One pass over the stream: ``tarfile`` parses the headers, contents are streamed straight
into blobs, everything else goes to the tar-split record, and every byte goes through
sha256 for the layer's diff_id. Nothing is recorded unless the whole stream was a valid
tar that ended properly.
"""

from __future__ import annotations

import base64
import bz2
import decimal
import gzip
import hashlib
import io
import lzma
import os
import tarfile
import urllib.parse
import zlib
from collections.abc import Callable, Iterator
from typing import BinaryIO

import zstandard

from .blobs import CHUNK, SMALL, Ingest
from .builder import LayerBuilder, PendingLayer, clean_path, shown
from .errors import BadArchive, HostileArchive, StoreError
from .records import OPAQUE, Entry, Kind, Source
from .tarformat import OPAQUE_MARKER, PRIVATE_XATTR_PREFIXES, WHITEOUT_PREFIX
from .tarsplit import TarSplitWriter

MAX_HEADER = 16 << 20  # the largest single header read (PAX records, GNU long names)
MAX_TRAILER = 16 << 20  # bytes tolerated after the end-of-archive blocks
MAX_RAW = 1 << 30  # non-content bytes of one layer (headers, padding)

_DECODE_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError, zstandard.ZstdError)


def decompressed(src: BinaryIO) -> tuple[BinaryIO, str]:
    """Wrap ``src`` in the decompressor its magic bytes call for."""
    buffered = src if hasattr(src, "peek") else io.BufferedReader(src)  # type: ignore[arg-type]
    magic = buffered.peek(6)[:6]
    if magic.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=buffered, mode="rb"), "gzip"
    if magic.startswith(b"\x28\xb5\x2f\xfd"):
        checked = _ZstdFrameCheck(buffered)
        reader = zstandard.ZstdDecompressor().stream_reader(checked, read_across_frames=True)
        return reader, "zstd"  # type: ignore[return-value]
    if magic.startswith(b"BZh"):
        return bz2.BZ2File(buffered), "bzip2"
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(buffered), "xz"
    return buffered, "tar"


class _ZstdFrameCheck(io.RawIOBase):
    """Passes a zstd stream through and raises if it ends inside a frame.

    python-zstandard's stream reader returns end-of-file when its input ends mid-frame,
    so a truncated layer would look complete; this walks the frame and block headers
    (RFC 8878 section 3.1) of the compressed bytes as they go by, without decoding.
    """

    def __init__(self, src: BinaryIO) -> None:
        self.src = src
        self.buf = bytearray()  # header bytes not yet parsed
        self.skip = 0  # bytes of block content (or skippable frame) still to pass
        self.state = "magic"  # magic | frame_header | block_header | checksum
        self.checksum = False

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.src.read(len(b))
        if not data:
            if self.state != "magic" or self.buf or self.skip:
                raise BadArchive("the zstd stream is truncated (it ends inside a frame)")
            return 0
        self._parse(data)
        b[:len(data)] = data
        return len(data)

    def _parse(self, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            if self.skip:
                n = min(self.skip, len(data) - pos)
                self.skip -= n
                pos += n
                continue
            self.buf.append(data[pos])
            pos += 1
            self._step()

    def _step(self) -> None:
        buf = self.buf
        if self.state == "magic" and len(buf) == 4:
            magic = int.from_bytes(buf, "little")
            if magic == 0xFD2FB528:
                self.state = "frame_header"
            elif magic & 0xFFFFFFF0 == 0x184D2A50:
                self.state = "skippable"
            else:
                raise BadArchive("the zstd stream is corrupt (bad frame magic)")
            buf.clear()
        elif self.state == "skippable" and len(buf) == 4:
            self.skip = int.from_bytes(buf, "little")
            self.state = "magic"
            buf.clear()
        elif self.state == "frame_header":
            fhd = buf[0]
            single = fhd >> 5 & 1
            fcs = (1 if single else 0, 2, 4, 8)[fhd >> 6]
            size = 1 + (0 if single else 1) + (0, 1, 2, 4)[fhd & 3] + fcs
            if len(buf) == size:
                self.checksum = bool(fhd >> 2 & 1)
                self.state = "block_header"
                buf.clear()
        elif self.state == "block_header" and len(buf) == 3:
            header = int.from_bytes(buf, "little")
            last, kind, size = header & 1, header >> 1 & 3, header >> 3
            self.skip = 1 if kind == 1 else size  # an RLE block holds one byte
            if kind == 3:
                raise BadArchive("the zstd stream is corrupt (reserved block type)")
            if last:
                self.state = "checksum" if self.checksum else "magic"
            buf.clear()
        elif self.state == "checksum" and len(buf) == 4:
            self.state = "magic"
            buf.clear()


_POSIX_MAGIC = b"ustar\x0000"
_PLAIN_TYPES = frozenset((tarfile.REGTYPE, tarfile.LNKTYPE, tarfile.SYMTYPE, tarfile.CHRTYPE,
                          tarfile.BLKTYPE, tarfile.DIRTYPE, tarfile.FIFOTYPE, tarfile.XHDTYPE,
                          tarfile.XGLTYPE))
# (start, end) of mode, uid, gid, size, mtime, checksum, device major and minor
_NUMBERS = ((100, 108), (108, 116), (116, 124), (124, 136), (136, 148), (148, 156), (329, 337),
            (337, 345))


class _PlainTarInfo(tarfile.TarInfo):
    """A TarInfo whose header parse is short for the usual header: POSIX ustar, a plain
    type, octal numbers, the unsigned checksum. Any other header, and any header this
    cannot read, goes to tarfile's own parse, which gives the same result or error."""

    __slots__ = ()

    @classmethod
    def frombuf(cls, buf: bytes, encoding: str, errors: str) -> tarfile.TarInfo:
        if (len(buf) != tarfile.BLOCKSIZE or not buf[0] or buf[257:265] != _POSIX_MAGIC
                or buf[156:157] not in _PLAIN_TYPES):
            return super().frombuf(buf, encoding, errors)
        try:
            # tarfile.nti's reading of an octal field (a base-256 one goes the long way).
            numbers = [int(buf[a:b].partition(b"\0")[0].decode("ascii").strip() or "0", 8)
                       if buf[a] not in (0o200, 0o377) else None for a, b in _NUMBERS]
        except ValueError:
            return super().frombuf(buf, encoding, errors)
        mode, uid, gid, size, mtime, chksum, devmajor, devminor = numbers
        if None in numbers or chksum != 256 + sum(buf) - sum(buf[148:156]):
            return super().frombuf(buf, encoding, errors)
        obj = cls()
        obj.name = tarfile.nts(buf[0:100], encoding, errors)
        obj.mode, obj.uid, obj.gid, obj.size, obj.mtime = mode, uid, gid, size, mtime
        obj.chksum = chksum
        obj.type = buf[156:157]
        obj.linkname = tarfile.nts(buf[157:257], encoding, errors)
        obj.uname = tarfile.nts(buf[265:297], encoding, errors)
        obj.gname = tarfile.nts(buf[297:329], encoding, errors)
        obj.devmajor, obj.devminor = devmajor, devminor
        prefix = tarfile.nts(buf[345:500], encoding, errors)
        if obj.type == tarfile.DIRTYPE:
            obj.name = obj.name.rstrip("/")
        if prefix:
            obj.name = prefix + "/" + obj.name
        return obj


class _TarStream:
    """The uncompressed tar, read forward only, hashed and split as it is read.

    ``tarfile`` reads headers through :meth:`read`/:meth:`seek` (those bytes go to the
    tar-split record); the importer reads file contents through :meth:`content`.
    """

    def __init__(self, src: BinaryIO, kind: str, split: TarSplitWriter) -> None:
        self.src, self.kind, self.split = src, kind, split
        self.pos = 0
        self.raw_bytes = 0
        self.sha = hashlib.sha256()
        self.last = b""
        # Bytes read ahead (hashed already) and how many of them were taken: a small
        # file costs a slice, not a read from the decompressor and a hash update each.
        self._buf = b""
        self._off = 0

    def _fill(self, n: int) -> bytes:
        try:
            data = self.src.read(n)
        except _DECODE_ERRORS as e:
            raise BadArchive(f"the {self.kind} stream is corrupt: {e}") from None
        self.sha.update(data)
        return data

    def _read(self, n: int) -> bytes:
        off = self._off
        if len(self._buf) - off >= n:
            self._off = off + n
            data = self._buf[off:off + n]
        else:
            parts = [self._buf[off:]] if len(self._buf) > off else []
            want = n - len(self._buf) + off
            self._buf, self._off = b"", 0
            while want > 0:
                more = self._fill(max(want, CHUNK))
                if not more:
                    break
                if len(more) > want:
                    parts.append(more[:want])
                    self._buf, self._off = more, want
                    break
                parts.append(more)
                want -= len(more)
            data = parts[0] if len(parts) == 1 else b"".join(parts)
        self.pos += len(data)
        return data

    def _raw(self, data: bytes) -> None:
        self.raw_bytes += len(data)
        if self.raw_bytes > MAX_RAW:
            raise HostileArchive("the tar's headers exceed 1 GiB")
        self.split.raw(data)

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0 or n > MAX_HEADER:
            raise HostileArchive(f"a tar header of more than {MAX_HEADER >> 20} MiB")
        self.last = data = self._read(n)
        self._raw(data)
        return data

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence != 0 or pos < self.pos:
            raise io.UnsupportedOperation("the tar stream only moves forward")
        while self.pos < pos:
            data = self._read(min(CHUNK, pos - self.pos))
            if not data:
                break  # tarfile notices the short read itself
            self._raw(data)
        return self.pos

    def content(self, size: int) -> Iterator[bytes]:
        remaining = size
        while remaining:
            data = self._read(min(CHUNK, remaining))
            if not data:
                raise BadArchive("the tar is truncated (it ends inside a file)")
            remaining -= len(data)
            yield data

    def drain(self) -> None:
        """Keep whatever follows the end blocks (tar writers pad to a record size)."""
        trailer = 0
        while data := self._read(CHUNK):
            trailer += len(data)
            if trailer > MAX_TRAILER:
                raise HostileArchive("more than 16 MiB of data after the end of the tar")
            self._raw(data)


_MAX_SECONDS = 1 << 62  # far beyond any clock, well inside the index's 64-bit seconds


def _mtime_ns(ti: tarfile.TarInfo) -> int:
    raw = ti.pax_headers.get("mtime")
    if raw is None:
        return int(ti.mtime) * 1_000_000_000
    try:
        value = decimal.Decimal(raw)
        if not value.is_finite() or abs(value) >= _MAX_SECONDS:
            raise ValueError
        return int((value * 1_000_000_000).to_integral_value(rounding=decimal.ROUND_FLOOR))
    except (decimal.InvalidOperation, ValueError):
        raise BadArchive(f"{shown(ti.name)} has an invalid PAX mtime {raw[:40]!r}") from None


def _xattrs(ti: tarfile.TarInfo) -> tuple[bool, tuple[tuple[str, bytes], ...]]:
    """(opaque?, xattrs) from PAX SCHILY.xattr.* and LIBARCHIVE.xattr.* records."""
    out: dict[str, bytes] = {}
    for key, value in ti.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            out[key[13:]] = value.encode("utf-8", "surrogateescape")
        elif key.startswith("LIBARCHIVE.xattr."):
            try:
                out[urllib.parse.unquote(key[17:])] = base64.b64decode(value + "==")
            except ValueError:
                raise BadArchive(f"{shown(ti.name)} has an invalid {key} record") from None
    opaque = out.get("trusted.overlay.opaque") == b"y" or out.get("user.overlay.opaque") == b"y"
    kept = tuple(sorted((k, v) for k, v in out.items() if not k.startswith(PRIVATE_XATTR_PREFIXES)))
    return opaque, kept


def _entry(ti: tarfile.TarInfo, kind: Kind, xattrs, **kw) -> Entry:
    for what, value in (("uid", ti.uid), ("gid", ti.gid)):
        if not 0 <= value <= 0xFFFFFFFF:
            raise BadArchive(f"{shown(ti.name)} has a {what} of {value}, beyond 32 bits")
    return Entry(kind, mode=ti.mode & 0o7777, uid=ti.uid, gid=ti.gid, mtime_ns=_mtime_ns(ti),
                 xattrs=xattrs, **kw)


def read_tar(ingest: Ingest, src: BinaryIO, comment: str = "",
             progress: Callable[[int], None] | None = None) -> PendingLayer:
    """Read a (possibly compressed) layer tar from ``src``, staging its file contents."""
    if progress is not None:
        src = Tap(src, lambda data: progress(len(data)))  # type: ignore[assignment]
    stream_src, kind = decompressed(src)
    split = TarSplitWriter()
    stream = _TarStream(stream_src, kind, split)
    builder = LayerBuilder()
    try:
        tf = tarfile.open(fileobj=stream, mode="r:", encoding="utf-8", errors="surrogateescape",
                          tarinfo=_PlainTarInfo)
        while True:
            ti = tf.next()
            if ti is None:
                break
            tf.members.clear()  # tarfile keeps every member otherwise
            _add_member(builder, ingest, stream, split, ti)
        if stream.last != b"\0" * 512:
            raise BadArchive("the tar is truncated (no end-of-archive blocks)")
        stream.drain()
    except tarfile.TarError as e:
        raise BadArchive(f"not a valid tar archive ({e})") from None
    except UnicodeError as e:
        raise BadArchive(f"a tar header has an undecodable field ({e})") from None
    return PendingLayer("sha256:" + stream.sha.hexdigest(), stream.pos,
                        builder.finish(canonical=False), Source.TAR, comment, split.chunks())


def _add_member(builder: LayerBuilder, ingest, stream: _TarStream, split: TarSplitWriter,
                ti: tarfile.TarInfo) -> None:
    if ti.issparse():
        raise BadArchive(f"{shown(ti.name)} is a sparse file; sparse members are not supported")
    if ti.size < 0:
        raise BadArchive(f"{shown(ti.name)} has a negative size ({ti.size})")
    path = clean_path(ti.name)
    parent, _, base = path.rpartition("/")
    if base.startswith(WHITEOUT_PREFIX):
        if base == OPAQUE_MARKER:
            builder.opaque(parent)
        elif base.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
            pass  # aufs metadata (.wh..wh.plnk, .wh..wh.aufs): not content
        elif base == WHITEOUT_PREFIX:
            raise BadArchive(f"invalid whiteout {shown(ti.name)} (no name after .wh.)")
        else:
            builder.whiteout((parent + "/" if parent else "") + base[len(WHITEOUT_PREFIX):])
        return  # a whiteout's own data, if any, stays in the tar-split record
    opaque, xattrs = _xattrs(ti)
    if ti.isreg():
        if stream.pos != ti.offset_data:
            raise BadArchive(f"unexpected layout at {shown(ti.name)}")
        if ti.size <= SMALL:
            blob = ingest.add(b"".join(stream.content(ti.size)), shown(ti.name))
        else:
            writer = ingest.writer()
            for chunk in stream.content(ti.size):
                writer.write(chunk)
            blob = writer.finish()
        split.file(blob, ti.size)
        builder.add(path, _entry(ti, Kind.REG, xattrs, size=ti.size, blob=blob))
    elif ti.isdir():
        builder.add(path, _entry(ti, Kind.DIR, xattrs, flags=OPAQUE if opaque else 0))
    elif ti.issym():
        builder.add(path, _entry(ti, Kind.SYMLINK, xattrs, target=ti.linkname))
    elif ti.islnk():
        builder.hardlink(path, clean_path(ti.linkname), ti.name)
    elif ti.ischr() or ti.isblk():
        kind = Kind.CHR if ti.ischr() else Kind.BLK
        builder.add(path, _entry(ti, kind, xattrs, rdev_major=ti.devmajor, rdev_minor=ti.devminor))
    elif ti.isfifo():
        builder.add(path, _entry(ti, Kind.FIFO, xattrs))
    # Other types (volume labels, unknown vendor types) carry no file: tar-split keeps them.


class Tap(io.RawIOBase):
    """A reader that hands every chunk it reads to ``on_read`` (a progress bar's count,
    a copy of the bytes being staged)."""

    def __init__(self, src: BinaryIO, on_read: Callable[[bytes], object]) -> None:
        self.src, self.on_read = src, on_read

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.src.read(len(b))
        n = len(data)
        b[:n] = data
        self.on_read(data)
        return n


def open_input(path: str) -> BinaryIO:
    """Open a layer file ("-" is stdin) with a clear error."""
    if path == "-":
        import sys
        return sys.stdin.buffer
    try:
        if os.path.isdir(path):
            raise StoreError(f"{path} is a directory (use import-dir)")
        return open(path, "rb")
    except OSError as e:
        raise StoreError(f"cannot open {path}: {e.strerror}") from None
