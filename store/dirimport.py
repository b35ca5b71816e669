"""Import a layer from a directory tree (an OCI rootfs diff or an overlayfs upper).

Whiteouts are read in every form seen in the wild: OCI ``.wh.NAME`` and ``.wh..wh..opq``
files, overlayfs char-device 0/0 whiteouts and xattr whiteouts, and the
``trusted.overlay.opaque`` / ``user.overlay.opaque`` = ``y`` opaque directories. The
layer's id is the sha256 of its canonical tar, which is produced while the files are
read into blobs, so each file is read once.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable

from .blobs import CHUNK, BlobStore, Ingest
from .builder import LayerBuilder, PendingLayer
from .errors import StoreCorrupt, StoreError
from .fstree import Tree, TreeChanged, read_xattrs, same_file
from .progress import SILENT, Progress
from .records import OPAQUE, Entry, Kind, Source
from .tarformat import OPAQUE_MARKER, PRIVATE_XATTR_PREFIXES, WHITEOUT_PREFIX, canonical_order, canonical_tar

_OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")
_WHITEOUT_XATTRS = ("trusted.overlay.whiteout", "user.overlay.whiteout")

# For each regular file whose data is read from disk: its path in the tree and its lstat.
Files = dict[str, tuple[str, os.stat_result]]


def _is_opaque(xattrs: dict[str, bytes]) -> bool:
    return any(xattrs.get(n) == b"y" for n in _OPAQUE_XATTRS)


def _entry(st: os.stat_result, kind: Kind, xattrs: dict[str, bytes], **kw) -> Entry:
    kept = tuple(sorted((k, v) for k, v in xattrs.items() if not k.startswith(PRIVATE_XATTR_PREFIXES)))
    return Entry(kind, mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid,
                 mtime_ns=st.st_mtime_ns, xattrs=kept, **kw)


def entry_of(full: str, st: os.stat_result) -> Entry | None:
    """The entry a file on disk stands for: a whiteout where it is one, None for sockets.

    A directory's entry carries the OPAQUE flag when its opaque xattr says so; a regular
    file's has no blob yet (its size and metadata only).
    """
    return make_entry(st, read_xattrs(full), lambda: os.readlink(full))


def make_entry(st: os.stat_result, xattrs: dict[str, bytes], readlink: Callable[[], str]) -> Entry | None:
    """:func:`entry_of` from the file's lstat, its xattrs and a way to read its target."""
    mode = st.st_mode
    if stat.S_ISCHR(mode) and st.st_rdev == 0:
        return Entry(Kind.WHITEOUT, mode=0)
    if stat.S_ISREG(mode) and st.st_size == 0 and any(n in xattrs for n in _WHITEOUT_XATTRS):
        return Entry(Kind.WHITEOUT, mode=0)
    if stat.S_ISDIR(mode):
        return _entry(st, Kind.DIR, xattrs, flags=OPAQUE if _is_opaque(xattrs) else 0)
    if stat.S_ISREG(mode):
        return _entry(st, Kind.REG, xattrs, size=st.st_size)
    if stat.S_ISLNK(mode):
        return _entry(st, Kind.SYMLINK, xattrs, target=readlink())
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return _entry(st, Kind.CHR if stat.S_ISCHR(mode) else Kind.BLK, xattrs,
                      rdev_major=os.major(st.st_rdev), rdev_minor=os.minor(st.st_rdev))
    if stat.S_ISFIFO(mode):
        return _entry(st, Kind.FIFO, xattrs)
    return None  # sockets cannot be put in a tar: skipped, as docker and tar do


def tree_entry(tree: Tree, rel: str) -> tuple[os.stat_result, Entry | None]:
    """(lstat, entry) of ``rel`` in a tree read through directory fds."""
    st = tree.lstat(rel)
    return st, make_entry(st, tree.xattrs(rel), lambda: tree.readlink(rel))


def dir_entry(path: str) -> Entry:
    """The entry of the directory ``path`` (OPAQUE if marked so)."""
    e = entry_of(path, os.lstat(path))
    if e is None or e.kind != Kind.DIR:
        raise StoreError(f"{path} is not a directory")
    if os.path.lexists(os.path.join(path, OPAQUE_MARKER)):
        e = e._replace(flags=e.flags | OPAQUE)
    return e


def scan_dir(tree: Tree) -> tuple[dict[str, Entry], Files]:
    """Entries of the tree and, for each regular file, its path in the tree and lstat."""
    if not stat.S_ISDIR(tree.lstat("").st_mode):
        raise StoreError(f"{tree.root} is not a directory")
    builder = LayerBuilder()
    if _is_opaque(tree.xattrs("")):
        builder.opaque("")
    files: Files = {}
    first_name: dict[tuple[int, int], str] = {}
    stack = [""]
    while stack:
        rel = stack.pop()
        try:
            names = tree.listdir(rel)
        except OSError as e:
            raise StoreError(f"cannot read {tree.where(rel)}: {e.strerror}") from None
        for name in names:
            path = f"{rel}/{name}" if rel else name
            if name.startswith(WHITEOUT_PREFIX):
                if name == OPAQUE_MARKER:
                    builder.opaque(rel)
                elif not name.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX) and name != WHITEOUT_PREFIX:
                    builder.whiteout(f"{rel}/{name[4:]}" if rel else name[4:])
                continue
            try:
                st, e = tree_entry(tree, path)
            except FileNotFoundError:
                continue  # removed since it was listed: as if it never was
            if e is None:
                continue
            if e.kind == Kind.WHITEOUT:
                builder.whiteout(path)
            elif e.kind == Kind.DIR:
                builder.add(path, e._replace(flags=0))
                if e.opaque:
                    builder.opaque(path)
                stack.append(path)
            else:
                add_file(builder, files, first_name, path, st, e)
    return primary_first(builder.finish(canonical=True), files)


def add_file(builder: LayerBuilder, files: Files, first_name: dict[tuple[int, int], str],
             path: str, st: os.stat_result, e: Entry) -> None:
    """Add a non-directory read from disk; a second name of an inode becomes a hard link
    (of a symlink or a device too, as link(2) makes them and tar carries them)."""
    key = (st.st_dev, st.st_ino)
    if st.st_nlink > 1 and key in first_name:
        builder.hardlink(path, first_name[key], path)
        return
    if st.st_nlink > 1:
        first_name[key] = path
        e = e._replace(hardlink=path)
    builder.add(path, e)
    if e.kind == Kind.REG:
        files[path] = (path, st)


def primary_first(entries: dict[str, Entry], files: Files) -> tuple[dict[str, Entry], Files]:
    """Name each hard-link group by its first path in canonical tar order, the path whose
    data the tar holds, and key the group's file on disk by that path."""
    primary: dict[str, str] = {}
    for path in canonical_order(entries):
        group = entries[path].hardlink
        if group and group not in primary:
            primary[group] = path
    new_files = {p: f for p, f in files.items() if not entries[p].hardlink}
    for p, e in entries.items():
        if e.hardlink and p in files:
            new_files[primary[e.hardlink]] = files[p]
    return ({p: e._replace(hardlink=primary[e.hardlink]) if e.hardlink else e
             for p, e in entries.items()}, new_files)


def read_dir(ingest: Ingest, blobs: BlobStore, root: str, comment: str = "",
             progress: Progress = SILENT) -> PendingLayer:
    """Read the tree at ``root`` as a layer whose id is the sha256 of its canonical tar.

    Files are opened without following symlinks and only if still the inode the scan
    described, so a file swapped for a symlink (to a file the importer may read and the
    tree's owner may not) is refused, never read.
    """
    with Tree(root) as tree:
        progress.stage("scanning")
        entries, files = scan_dir(tree)
        try:
            return canonical_layer(ingest, blobs, entries, files, tree, Source.DIR, comment, progress)
        except StoreCorrupt as e:
            raise StoreError(f"{root} changed while it was imported: {e}") from None


def canonical_layer(ingest: Ingest, blobs: BlobStore, entries: dict[str, Entry],
                    files: Files, tree: Tree | None, source: Source, comment: str,
                    progress: Progress = SILENT) -> PendingLayer:
    """A layer in canonical form, reading each file in ``files`` once.

    Files in ``files`` are copied from ``tree`` into new blobs while the canonical tar is
    hashed; every other regular file already names a stored blob, which is read for the
    hash only (nothing is copied).
    """
    sha = hashlib.sha256()
    size = 0
    blob_of: dict[str, str] = {}
    progress.stage("reading files", sum(e.size for p, e in entries.items()
                                        if e.kind == Kind.REG and e.hardlink in ("", p)), "B")

    def file_chunks(path: str, entry: Entry):
        for chunk in _file_chunks(path, entry):
            progress.advance(len(chunk))
            yield chunk

    def _file_chunks(path: str, entry: Entry):
        if path not in files:
            with blobs.open(entry.blob) as f:
                while chunk := f.read(CHUNK):
                    yield chunk
            return
        rel, scanned = files[path]
        fd = tree.open_file(rel, scanned)
        try:
            blob_of[path] = yield from ingest.copy_file(fd, tree.where(rel), scanned.st_size)
            # Written to while it was copied: its bytes may not match its metadata.
            if not same_file(os.fstat(fd), scanned):
                raise TreeChanged(f"{tree.where(rel)}: the file changed while it was read")
        finally:
            os.close(fd)

    for chunk in canonical_tar(entries, file_chunks):
        sha.update(chunk)
        size += len(chunk)
    final = {}
    for path, e in entries.items():
        key = e.hardlink or path
        if e.kind == Kind.REG and e.size and key in blob_of:
            e = e._replace(blob=blob_of[key])
        final[path] = e
    return PendingLayer("sha256:" + sha.hexdigest(), size, final, source, comment)
