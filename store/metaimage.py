"""Metadata images: an image's merged tree as overlayfs's metadata-only lower layer.

The kernel backend mounts ``lowerdir=META::BLOBS``: META holds the image's merged tree
(directories, symlinks, devices, and for each regular file an empty file of the right
size with ``trusted.overlay.metacopy`` and ``trusted.overlay.redirect=/ab/cdef...``), and
the blob directory, stacked as a data-only lower layer, gives the bytes (the composefs
design, over layerfs's own blobs and merged index).

META is built once per layer chain from the merged index and kept until gc finds no
image of that chain: ``meta/v1-<chain id hex>.erofs``, an EROFS image (store/erofs.py)
that the kernel mounts from the file, or ``meta/v1-<chain id hex>/``, the same tree as a
plain directory, where the kernel cannot mount EROFS images from files. The tree always
comes out the same, so fsck checks an image against the index by writing it again.

A layer's own ``trusted.overlay.*`` xattrs are written escaped (``trusted.overlay.overlay.*``,
which overlayfs shows without the escape and never follows), so no image can point a file
at another file's blob. The store imports none today; this keeps it so whatever comes in.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import uuid
from dataclasses import dataclass

from . import erofs, leases
from .blobs import syncfs
from .errors import StoreCorrupt, StoreError
from .merged import MergedTree, chain_ids
from .records import Entry, ImageRecord, Kind

VERSION = 1  # bump when the tree written for the same index changes: old images are rebuilt
METACOPY = "trusted.overlay.metacopy"
REDIRECT = "trusted.overlay.redirect"
_OVERLAY = "trusted.overlay."
_ESCAPED = "trusted.overlay.overlay."
_TYPE = {Kind.DIR: stat.S_IFDIR, Kind.REG: stat.S_IFREG, Kind.SYMLINK: stat.S_IFLNK,
         Kind.CHR: stat.S_IFCHR, Kind.BLK: stat.S_IFBLK, Kind.FIFO: stat.S_IFIFO}


@dataclass(slots=True, frozen=True)
class MetaImage:
    """A built metadata image: an EROFS image file, or a directory."""

    key: str  # the chain id's hex ("empty" for an image without layers)
    path: str
    erofs: bool


def meta_dir(root: str) -> str:
    return os.path.join(root, "meta")


def key_of(image: ImageRecord) -> str:
    """Images of one layer chain share a metadata image: it is named by the chain id."""
    return chain_ids(list(image.layers))[-1].removeprefix("sha256:") if image.layers else "empty"


def _name(key: str, as_erofs: bool) -> str:
    return f"v{VERSION}-{key}" + (".erofs" if as_erofs else "")


def find(root: str, key: str, as_erofs: bool) -> MetaImage | None:
    """The stored metadata image of a chain in the form asked for, if built."""
    path = os.path.join(meta_dir(root), _name(key, as_erofs))
    return MetaImage(key, path, as_erofs) if os.path.lexists(path) else None


def stored(root: str) -> list[MetaImage]:
    """Every metadata image in the store (of this layerfs's version or not)."""
    try:
        names = sorted(os.listdir(meta_dir(root)))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        base = name.removesuffix(".erofs")
        key = base.partition("-")[2] if base.startswith(f"v{VERSION}-") else ""
        out.append(MetaImage(key, os.path.join(meta_dir(root), name), name.endswith(".erofs")))
    return out


# -- the tree -------------------------------------------------------------------------------


def _xattrs(e: Entry) -> tuple[tuple[str, bytes], ...]:
    return tuple((_ESCAPED + n[len(_OVERLAY):] if n.startswith(_OVERLAY) else n, v) for n, v in e.xattrs)


def _node(e: Entry, blob_path) -> erofs.Node:
    node = erofs.Node(_TYPE[e.kind] | e.mode, e.uid, e.gid, e.mtime_ns, xattrs=_xattrs(e))
    if e.kind == Kind.DIR:
        node.children = {}
    elif e.kind == Kind.REG:
        node.size = e.size
        if e.size:
            if not e.blob:
                raise StoreCorrupt(f"a file of {e.size} bytes has no blob in the index")
            # Its bytes are the blob's, found through the data-only layer.
            node.xattrs += ((METACOPY, b""), (REDIRECT, blob_path(e.blob).encode()))
    elif e.kind == Kind.SYMLINK:
        node.target = e.target.encode("utf-8", "surrogateescape")
    elif e.kind in (Kind.CHR, Kind.BLK):
        node.rdev = (e.rdev_major, e.rdev_minor)
    return node


def tree_of(tree: MergedTree, blob_path) -> erofs.Node:
    """The metadata tree of a merged image tree; ``blob_path(blob id)`` is where the blob
    lies below the data-only layer's root ("/ab/cdef...")."""
    root_entry = tree.lookup("")
    root = _node(root_entry, blob_path)
    links: dict[tuple[int, str], erofs.Node] = {}  # (layer, hard-link group) -> its inode
    todo = [("", root)]
    while todo:
        path, node = todo.pop()
        for name, layer, e in tree.listdir_in_layers(path):
            if e.kind == Kind.WHITEOUT:
                continue
            child = links.get((layer, e.hardlink)) if e.hardlink else None
            if child is None:
                child = _node(e, blob_path)
                if e.hardlink:
                    links[(layer, e.hardlink)] = child
            node.children[name.encode("utf-8", "surrogateescape")] = child
            if child.children is not None:
                todo.append((f"{path}/{name}" if path else name, child))
    return root


def write_dir(root: erofs.Node, dest: str) -> None:
    """Write the metadata tree as a plain directory at ``dest`` (which must not exist).

    Every name is made relative to its parent's descriptor, so nothing is followed
    through a symlink and depth is not bounded by PATH_MAX; a directory's descriptor
    stays open only while its subtree is written.
    """
    os.mkdir(dest, 0o700)
    top = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    made: dict[int, str] = {}  # a non-directory inode -> its first path (for hard links)
    opened = {top}
    try:
        # ("dir", node, parent fd, name, path) makes a directory's entries;
        # ("leave", node, its fd) sets its times once they are all there.
        todo: list[tuple] = [("leave", root, top), ("entries", root, top, "")]
        while todo:
            step = todo.pop()
            if step[0] == "leave":
                _, node, fd = step
                _set_meta(node, fd)
                opened.discard(fd)
                os.close(fd)
                continue
            if step[0] == "dir":
                _, node, parent_fd, name, rel = step
                fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                             dir_fd=parent_fd)
                opened.add(fd)
                todo.append(("leave", node, fd))
            else:
                _, node, fd, rel = step
            for bname, child in sorted(node.children.items(), reverse=True):
                name = os.fsdecode(bname)
                path = f"{rel}/{name}" if rel else name
                kind = stat.S_IFMT(child.mode)
                if kind == stat.S_IFDIR:
                    os.mkdir(name, 0o700, dir_fd=fd)
                    todo.append(("dir", child, fd, name, path))
                elif id(child) in made:
                    os.link(made[id(child)], name, src_dir_fd=top, dst_dir_fd=fd, follow_symlinks=False)
                else:
                    made[id(child)] = path
                    _make(child, fd, name)
    finally:
        for fd in opened:
            os.close(fd)


def _make(node: erofs.Node, dir_fd: int, name: str) -> None:
    kind = stat.S_IFMT(node.mode)
    if kind == stat.S_IFREG:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=dir_fd)
        try:
            os.ftruncate(fd, node.size)  # sparse: the bytes are the blob's
            _set_meta(node, fd)
        finally:
            os.close(fd)
        return
    if kind == stat.S_IFLNK:
        os.symlink(node.target, name, dir_fd=dir_fd)
    else:
        os.mknod(name, node.mode, os.makedev(*node.rdev), dir_fd=dir_fd)
    _set_meta(node, dir_fd, name)


def _set_meta(node: erofs.Node, fd: int, name: str | None = None) -> None:
    """Owner, xattrs, mode, then times (a chown clears setuid bits; every change moves
    the times) of ``fd``, or of ``name`` in the directory ``fd``."""
    if name is None:
        os.fchown(fd, node.uid, node.gid)
    else:
        os.chown(name, node.uid, node.gid, dir_fd=fd, follow_symlinks=False)
    for xname, value in node.xattrs:
        try:
            if name is None:
                os.setxattr(fd, xname, value)
            else:
                os.setxattr(f"/proc/self/fd/{fd}/{name}", xname, value, follow_symlinks=False)
        except OSError as e:
            raise StoreError(f"cannot build the metadata image: the store's filesystem refuses "
                             f"the xattr {xname} ({e.strerror})") from None
    times = (node.mtime_ns, node.mtime_ns)
    if name is None:
        os.fchmod(fd, stat.S_IMODE(node.mode))
        os.utime(fd, ns=times)
    else:
        if not stat.S_ISLNK(node.mode):
            os.chmod(name, stat.S_IMODE(node.mode), dir_fd=fd)
        os.utime(name, ns=times, dir_fd=fd, follow_symlinks=False)


# -- building, keeping, checking, collecting ----------------------------------------------------


def _blob_path(store):
    return lambda blob_id: "/" + store.blobs.name(blob_id)


def _uuid(key: str) -> bytes:
    return hashlib.sha256(f"layerfs-meta-{key}".encode()).digest()[:16]


def ensure(store, image: ImageRecord, as_erofs: bool) -> MetaImage:
    """The image's metadata image in the form asked for, built and stored if missing.

    Built in tmp/ under a lease (gc leaves it alone), then published with one link or
    rename: a concurrent build of the same chain just finds the other's.
    """
    key = key_of(image)
    found = find(store.root, key, as_erofs)
    if found is not None:
        return found
    tree = tree_of(store.tree(image), _blob_path(store))
    lease_id = "meta-" + uuid.uuid4().hex
    staging = os.path.join(store.blobs.tmp, lease_id)
    leases.take(store.index, lease_id)
    try:
        os.mkdir(staging, 0o700)
        os.makedirs(meta_dir(store.root), mode=0o700, exist_ok=True)
        final = os.path.join(meta_dir(store.root), _name(key, as_erofs))
        if as_erofs:
            path = os.path.join(staging, "meta.erofs")
            with open(path, "xb") as f:
                erofs.write(tree, f, _uuid(key))
                f.flush()
                os.fsync(f.fileno())
            os.chmod(path, 0o600)
            try:
                os.link(path, final)
            except FileExistsError:
                pass
        else:
            path = os.path.join(staging, "meta")
            write_dir(tree, path)
            syncfs(path)
            try:
                os.rename(path, final)
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
        return MetaImage(key, final, as_erofs)
    except OSError as e:
        raise StoreError(f"cannot build the metadata image of {key[:12]}: {e.strerror}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        leases.release(store.index, lease_id)


class _Digest:
    """A file-like sink that only hashes what is written to it."""

    def __init__(self) -> None:
        self.hash = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        return len(data)


def _file_digest(path: str) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.digest()


def verify(store, meta: MetaImage, image: ImageRecord, fast: bool = False) -> str | None:
    """Why ``meta`` does not show ``image``'s merged tree as the index has it, or None.

    An EROFS image is written again and the bytes compared; a directory is walked.
    ``fast``: only that the image is there and is an EROFS image or a directory.
    """
    try:
        st = os.lstat(meta.path)
    except FileNotFoundError:
        return "it is missing"
    if meta.erofs:
        if not stat.S_ISREG(st.st_mode):
            return "it is not a file"
        with open(meta.path, "rb") as f:
            f.seek(1024)
            if f.read(4) != b"\xe2\xe1\xf5\xe0":
                return "it is not an EROFS image"
        if fast:
            return None
        expected = _Digest()
        size = erofs.write(tree_of(store.tree(image), _blob_path(store)), expected, _uuid(meta.key))
        if size != st.st_size or expected.hash.digest() != _file_digest(meta.path):
            return "its bytes differ from the image the index describes"
        return None
    if not stat.S_ISDIR(st.st_mode):
        return "it is not a directory"
    if fast:
        return None
    return _compare_dir(meta.path, tree_of(store.tree(image), _blob_path(store)))


def _compare_dir(path: str, root: erofs.Node) -> str | None:
    """The first difference between a metadata directory and the tree it should hold."""
    todo = [("", root)]
    while todo:
        rel, node = todo.pop()
        full = os.path.join(path, rel) if rel else path
        try:
            st = os.lstat(full)
            have = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns,
                    st.st_size if stat.S_ISREG(st.st_mode) else 0,
                    (os.major(st.st_rdev), os.minor(st.st_rdev)) if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else (0, 0),
                    os.fsencode(os.readlink(full)) if stat.S_ISLNK(st.st_mode) else b"",
                    sorted((n, os.getxattr(full, n, follow_symlinks=False))
                           for n in os.listxattr(full, follow_symlinks=False)))
        except OSError as e:
            return f"/{rel}: {e.strerror}"
        mode = stat.S_IFLNK | 0o777 if stat.S_ISLNK(node.mode) else node.mode  # a symlink has no mode
        want = (mode, node.uid, node.gid, node.mtime_ns, node.size, node.rdev, node.target,
                sorted(node.xattrs))
        if have != want:
            return f"/{rel} differs from the index"
        if node.children is not None:
            names = sorted(os.fsencode(n) for n in os.listdir(full))
            if names != sorted(node.children):
                return f"/{rel}: the names differ from the index"
            for bname, child in node.children.items():
                todo.append((os.path.join(rel, os.fsdecode(bname)) if rel else os.fsdecode(bname), child))
    return None


def remove(meta: MetaImage) -> None:
    """Delete a metadata image (a mount that uses it keeps its own reference)."""
    if meta.erofs:
        try:
            os.unlink(meta.path)
        except FileNotFoundError:
            pass
    else:
        shutil.rmtree(meta.path, ignore_errors=True)


def collect(root: str, live_keys: set[str], dry_run: bool = False) -> int:
    """Remove the metadata images of chains no image has (and of older layerfs
    versions); returns how many."""
    n = 0
    for meta in stored(root):
        if meta.key not in live_keys:
            n += 1
            if not dry_run:
                remove(meta)
    return n
