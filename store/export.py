"""Export a layer as the tar whose sha256 is its id.

Tar layers are rebuilt byte for byte from their tar-split record; directory and commit
layers are written in the canonical format. Either way the digest is checked while
writing, so a damaged store fails loudly instead of exporting different bytes.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterator
from typing import BinaryIO

from .blobs import CHUNK, BlobStore
from .errors import StoreCorrupt, StoreError
from .index import Index, prefix_scan
from .keys import walk
from .records import Entry, LayerRecord, Source, entry_is_dir, unpack_entry
from .tarformat import canonical_tar
from .tarsplit import segments


def layer_entries(index: Index, num: int) -> dict[str, Entry]:
    """Every entry of a layer, by path."""
    prefix = struct.pack(">I", num)
    with index.read() as txn:
        return {path: unpack_entry(v)
                for path, _, v in walk(txn, index.db("entries"), prefix, entry_is_dir)}


def _blob_chunks(blobs: BlobStore, blob_id: str, size: int) -> Iterator[bytes]:
    with blobs.open(blob_id) as f:
        remaining = size
        while remaining:
            chunk = f.read(min(CHUNK, remaining))
            if not chunk:
                raise StoreCorrupt(f"blob {blob_id} is shorter than the {size} bytes recorded")
            remaining -= len(chunk)
            yield chunk


def layer_tar(index: Index, blobs: BlobStore, layer: LayerRecord) -> Iterator[bytes]:
    """The layer's tar as a stream of chunks."""
    if layer.source == Source.TAR:
        prefix = struct.pack(">I", layer.num)
        with index.read() as txn:
            chunks = [v for _, v in prefix_scan(txn, index.db("tarsplit"), prefix)]
        for raw, blob_id, size in segments(iter(chunks)):
            if raw:
                yield raw
            elif size:
                yield from _blob_chunks(blobs, blob_id, size)
    else:
        entries = layer_entries(index, layer.num)
        yield from canonical_tar(entries, lambda path, e: _blob_chunks(blobs, e.blob, e.size))


def write_layer(index: Index, blobs: BlobStore, layer: LayerRecord, out: BinaryIO) -> int:
    """Write the layer's tar to ``out``, checking its digest; returns the bytes written."""
    sha = hashlib.sha256()
    n = 0
    for chunk in layer_tar(index, blobs, layer):
        sha.update(chunk)
        n += len(chunk)
        out.write(chunk)
    if "sha256:" + sha.hexdigest() != layer.diff_id:
        raise StoreCorrupt(f"layer {layer.diff_id} exported with digest sha256:{sha.hexdigest()}: "
                           "the store is damaged (run layerfs fsck)")
    return n


def export_to_path(index: Index, blobs: BlobStore, layer: LayerRecord, path: str) -> int:
    """Export to a file, atomically: the file appears only once complete and verified."""
    tmp = f"{path}.layerfs-tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            n = write_layer(index, blobs, layer, f)
        os.replace(tmp, path)
        return n
    except OSError as e:
        raise StoreError(f"cannot write {path}: {e.strerror}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
