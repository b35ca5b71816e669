"""Tar-split: what a layer's tar holds besides file contents, so export is byte-exact.

A tar is a sequence of segments: raw bytes (headers, PAX records, padding, the end
blocks and anything after them) and file contents (a blob id and a size). The segments
are serialised and cut into zlib-compressed chunks of about 1 MiB, stored in the index.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator

from .errors import StoreCorrupt

CHUNK = 1 << 20
_RAW, _FILE = b"R", b"F"


class TarSplitWriter:
    """Collects segments in order; :meth:`chunks` gives the compressed records.

    Raw bytes that follow each other (a file's padding, the next header) are kept as
    one segment: fewer, larger segments to write and to read back.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._raw = bytearray()  # raw bytes not yet made a segment
        self._chunks: list[bytes] = []

    def raw(self, data: bytes) -> None:
        self._raw += data
        if len(self._raw) >= CHUNK:
            self._flush_raw()

    def _flush_raw(self) -> None:
        data = self._raw
        for i in range(0, len(data), CHUNK):
            piece = data[i:i + CHUNK]
            self._buf += _RAW + struct.pack("<I", len(piece)) + piece
            self._maybe_flush()
        data.clear()

    def file(self, blob_id: str, size: int) -> None:
        if self._raw:
            self._flush_raw()
        b = blob_id.encode()
        self._buf += _FILE + struct.pack("<QH", size, len(b)) + b
        self._maybe_flush()

    def _maybe_flush(self, force: bool = False) -> None:
        if len(self._buf) >= CHUNK or (force and self._buf):
            self._chunks.append(zlib.compress(bytes(self._buf), 6))
            self._buf.clear()

    def chunks(self) -> list[bytes]:
        self._flush_raw()
        self._maybe_flush(force=True)
        return self._chunks


def segments(chunks: Iterator[bytes]) -> Iterator[tuple[bytes, str, int]]:
    """Decode stored chunks into ``(raw_bytes, "", 0)`` or ``(b"", blob_id, size)``."""
    try:
        yield from _segments(chunks)
    except (zlib.error, ValueError, struct.error, UnicodeDecodeError) as e:
        raise StoreCorrupt(f"a tar-split record is damaged ({e}); run layerfs fsck") from None


def _segments(chunks: Iterator[bytes]) -> Iterator[tuple[bytes, str, int]]:
    for chunk in chunks:
        buf = zlib.decompress(chunk)
        pos = 0
        while pos < len(buf):
            tag = buf[pos:pos + 1]
            if tag == _RAW:
                (n,) = struct.unpack_from("<I", buf, pos + 1)
                yield buf[pos + 5:pos + 5 + n], "", 0
                pos += 5 + n
            elif tag == _FILE:
                size, n = struct.unpack_from("<QH", buf, pos + 1)
                yield b"", buf[pos + 11:pos + 11 + n].decode(), size
                pos += 11 + n
            else:
                raise ValueError(f"bad tar-split segment tag {tag!r}")
