"""The store: one root directory holding the index, the blobs and scratch space.

This is the API that the CLI and the union filesystem use; it knows nothing of FUSE.
"""

from __future__ import annotations

import contextlib
import os
import stat
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

import lmdb

from . import images as imagesmod
from .blobs import BlobStore, Ingest
from .containers import Containers
from . import marker as markermod
from .errors import (AmbiguousName, ImageNotFound, IndexDamaged, LayerNotFound, NoStore, NotAStore,
                     StoreError)
from .index import Index, prefix_scan
from .merged import MergedTree
from .progress import SILENT, Progress
from .records import (Entry, ImageRecord, LayerBlob, LayerRecord, bytes_digest, digest_bytes,
                      layer_blob_key, merge_layer_blob, pack_image, pack_layer_blob, unpack_image,
                      unpack_layer, unpack_layer_blob)
from .lock import StoreLock

if TYPE_CHECKING:
    from .builder import PendingLayer

# Importing, exporting and recording layers (builder, tarimport, dirimport, export, and
# tarfile with them) are imported where used: a mount or a listing needs none of them.

_STORE_DIRS = ("blobs", "tmp", "containers")


def make_private(path: str, create: bool = True) -> bool:
    """Make ``path`` (a directory, created if missing) accessible to its owner only: a
    store holds other people's files (blobs of 0600 files, names in the index). Returns
    True if an existing, looser mode was tightened."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if not create:
            return False
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)
    mode = stat.S_IMODE(st.st_mode)
    if not mode & 0o077:
        return False
    os.chmod(path, mode & 0o700)
    return True


def holds_data(root: str) -> bool:
    """Whether ``root`` holds blob files or containers (a store whose index may be lost)."""
    for sub in ("blobs", "containers"):
        try:
            with os.scandir(os.path.join(root, sub)) as it:
                for entry in it:
                    if sub == "containers" or (entry.is_dir(follow_symlinks=False) and os.listdir(entry.path)):
                        return True
        except (FileNotFoundError, NotADirectoryError):
            continue
    return False


def default_root() -> str:
    """$LAYERFS_ROOT, else /var/lib/layerfs for root, else ~/.local/share/layerfs."""
    if os.environ.get("LAYERFS_ROOT"):
        return os.environ["LAYERFS_ROOT"]
    if os.geteuid() == 0:
        return "/var/lib/layerfs"
    return os.path.join(os.path.expanduser("~"), ".local", "share", "layerfs")


@dataclass(slots=True, frozen=True)
class Usage:
    """What ``df`` reports."""

    blobs: int
    stored_bytes: int  # bytes in blob files
    logical_bytes: int  # file bytes of all layers, as if nothing were shared
    layers: int
    images: int

    @property
    def saved_bytes(self) -> int:
        return max(0, self.logical_bytes - self.stored_bytes)


class Store:
    """A layerfs store at ``root``, created on first use unless ``create`` is False (then
    a missing store is NoStore: a mistyped root is not made into a new, empty store)."""

    @staticmethod
    def root_of(root: str | None) -> str:
        """The store directory ``Store(root)`` opens."""
        return os.path.abspath(root or default_root())

    def __init__(self, root: str | None = None, map_size: int | None = None, create: bool = True) -> None:
        self.root = self.root_of(root)
        index_path = os.path.join(self.root, "index.lmdb")
        marker = markermod.read(self.root)
        has_data = marker is not None or holds_data(self.root)
        if not os.path.exists(index_path) and not has_data:
            if os.path.isdir(self.root) and os.listdir(self.root):
                raise NotAStore(f"{self.root} is not a layerfs store (it has no index.lmdb)")
            if os.path.exists(self.root) and not os.path.isdir(self.root):
                raise NotAStore(f"{self.root} is not a directory")
            if not create:
                raise NoStore(f"no store at {self.root}")
        # Notes for the user (the CLI prints them): a store found readable by others.
        self.notes: list[str] = []
        try:
            tightened = make_private(self.root)
            for d in _STORE_DIRS:
                tightened |= make_private(os.path.join(self.root, d))
            # A store with data whose index is gone gets no new one here: Index refuses.
            tightened |= make_private(index_path, create=not has_data)
            for f in ("data.mdb", "lock.mdb"):
                tightened |= make_private(os.path.join(index_path, f), create=False)
        except OSError as e:
            raise StoreError(f"cannot create the store at {self.root} or make it private: "
                             f"{e.strerror}") from None
        if tightened:
            self.notes.append(f"made the store at {self.root} private: other users could read it")
        self.index = Index(index_path, map_size, create=not has_data)
        try:
            for f in ("data.mdb", "lock.mdb"):  # made now if the index is new
                make_private(os.path.join(index_path, f), create=False)
            store_id = self.index.store_id()
            if marker is None:
                markermod.update(self.root, self.index)
            elif marker.store_id != store_id:
                raise IndexDamaged(f"the index {os.path.join(index_path, 'data.mdb')} is not this "
                                   f"store's (store id {store_id[:12]}, the store's is "
                                   f"{marker.store_id[:12] or 'unreadable'}); run layerfs fsck")
        except BaseException:
            self.index.close()
            raise
        self.blobs = BlobStore(self.root, self.index)
        self.containers = Containers(self.root, self.index)
        self.lock = StoreLock(self.root)

    def close(self) -> None:
        self.index.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- import -------------------------------------------------------------------

    def import_tar(self, path: str, parent: str | None = None, tag: str | None = None,
                   progress: Callable[[int], None] | None = None,
                   created_ns: int | None = None) -> ImageRecord:
        """Import a layer tarball ("-" for stdin) as a new image on top of ``parent``.

        The config's created time is ``created_ns``, else SOURCE_DATE_EPOCH, else 1970:
        the same tar on the same parent gives the same image id.
        """
        from .tarimport import open_input, read_tar

        tag = imagesmod.parse_reference(tag) if tag else None
        base = self.resolve_image(parent) if parent else None
        name = os.path.basename(path)
        src_cm = contextlib.nullcontext(open_input(path)) if path == "-" else open_input(path)
        with src_cm as src, self.blobs.ingest() as ingest:
            pending = read_tar(ingest, src, name, progress)
            # The file's name stays in the layer record, out of the config: renaming a
            # tarball must not change the image id.
            return self.record(ingest, pending, base, {"created_by": "layerfs import-layer"}, tag,
                               created_ns=imagesmod.fixed_ns() if created_ns is None else created_ns)

    def import_dir(self, path: str, parent: str | None = None, tag: str | None = None,
                   created_ns: int | None = None, progress: Progress = SILENT) -> ImageRecord:
        """Import a directory tree as a new image on top of ``parent`` (created as in
        :meth:`import_tar`)."""
        from .dirimport import read_dir

        tag = imagesmod.parse_reference(tag) if tag else None
        base = self.resolve_image(parent) if parent else None
        with self.blobs.ingest() as ingest:
            pending = read_dir(ingest, self.blobs, path, os.path.abspath(path), progress)
            return self.record(ingest, pending, base, {"created_by": "layerfs import-dir"}, tag,
                               created_ns=imagesmod.fixed_ns() if created_ns is None else created_ns)

    def record(self, ingest: Ingest, pending: PendingLayer, base: ImageRecord | None, history: dict,
               tag: str | None, config: dict | None = None, created_ns: int | None = None) -> ImageRecord:
        """Record a read layer and the image ``base`` + that layer, in one transaction.

        ``config`` is the base's config, edited (commit --change); history is the new entry.
        The created time is ``created_ns``, else SOURCE_DATE_EPOCH, else the clock.
        """
        created = imagesmod.now_ns() if created_ns is None else created_ns
        parent = config if config is not None else (base.config if base else None)
        raw_config = imagesmod.new_config(parent, pending.diff_id, created, history)
        rec = ImageRecord(imagesmod.digest(raw_config), (base.layers if base else ()) + (pending.diff_id,),
                          raw_config, created)
        return self.record_images(ingest, [pending], [(rec, [tag] if tag else [])])[0]

    def record_images(self, ingest: Ingest, pendings: list[PendingLayer],
                      images: list[tuple[ImageRecord, list[str]]],
                      layer_blobs: Sequence[LayerBlob] = ()) -> list[ImageRecord]:
        """Record read layers (those not stored yet) and images made of stored and new
        layers, each with its tags (normalised NAME:TAG), and the compressed forms the
        layers came in, in one transaction."""
        from .builder import record_layers

        def add_images(txn: lmdb.Transaction, layers: list[LayerRecord]) -> list[ImageRecord]:
            self._put_layer_blobs(txn, layer_blobs)
            for rec, tags in images:
                for d in rec.layers:  # an rmi and gc may have taken a stored layer meanwhile
                    if txn.get(digest_bytes(d), db=self.index.db("layers")) is None:
                        raise LayerNotFound(f"layer {d} disappeared while the image was created")
                txn.put(digest_bytes(rec.image_id), pack_image(rec), db=self.index.db("images"))
                for tag in tags:
                    txn.put(tag.encode(), digest_bytes(rec.image_id), db=self.index.db("tags"))
            return [rec for rec, _ in images]

        with self.lock.shared():
            images = record_layers(self.index, ingest, pendings, add_images)
        self.update_marker()
        return images

    def update_marker(self) -> None:
        """Bring the marker outside the index up to date (after images or tags changed)."""
        markermod.update(self.root, self.index)

    # -- lookups -------------------------------------------------------------------

    def images(self) -> list[tuple[ImageRecord, list[str]]]:
        """Every image with its tags, newest first."""
        with self.index.read() as txn:
            tags: dict[bytes, list[str]] = {}
            for k, v in txn.cursor(db=self.index.db("tags")):
                tags.setdefault(v, []).append(k.decode())
            out = [(unpack_image(bytes_digest(k), v), sorted(tags.get(k, [])))
                   for k, v in txn.cursor(db=self.index.db("images"))]
        return sorted(out, key=lambda r: -r[0].created_ns)

    def layers(self) -> list[LayerRecord]:
        """Every layer, oldest first."""
        with self.index.read() as txn:
            out = [unpack_layer(bytes_digest(k), v) for k, v in txn.cursor(db=self.index.db("layers"))]
        return sorted(out, key=lambda r: r.num)

    def tags_of(self, image_id: str) -> list[str]:
        key = digest_bytes(image_id)
        with self.index.read() as txn:
            return sorted(k.decode() for k, v in txn.cursor(db=self.index.db("tags")) if v == key)

    def resolve_image(self, ref: str) -> ImageRecord:
        """An image by tag, full id or unique id prefix."""
        with self.index.read() as txn:
            key = self._find(txn, "images", ref, tags=True)
            raw = txn.get(key, db=self.index.db("images")) if key is not None else None
            if raw is None:
                raise ImageNotFound(f"no such image: {ref}")
            return unpack_image(bytes_digest(key), raw)

    def resolve_layer(self, ref: str) -> LayerRecord:
        """A layer by full diff_id or unique prefix."""
        with self.index.read() as txn:
            key = self._find(txn, "layers", ref, tags=False)
            if key is None:
                raise LayerNotFound(f"no such layer: {ref}")
            return unpack_layer(bytes_digest(key), txn.get(key, db=self.index.db("layers")))

    def _put_layer_blobs(self, txn: lmdb.Transaction, records: Sequence[LayerBlob]) -> None:
        db = self.index.db("layerblobs")
        for rec in records:
            if txn.get(digest_bytes(rec.diff_id), db=self.index.db("layers")) is None:
                continue  # its layer went (a gc after a push): nothing to name
            key = layer_blob_key(rec.diff_id, rec.digest)
            raw = txn.get(key, db=db)
            txn.put(key, pack_layer_blob(merge_layer_blob(unpack_layer_blob(key, raw) if raw else None, rec)),
                    db=db)

    def layer_blobs(self, diff_id: str) -> list[LayerBlob]:
        """The compressed forms a layer was loaded or pulled in (kept bytes first)."""
        with self.index.read() as txn:
            out = [unpack_layer_blob(bytes(k), v)
                   for k, v in prefix_scan(txn, self.index.db("layerblobs"), digest_bytes(diff_id))]
        return sorted(out, key=lambda r: not r.blob)

    def add_layer_sources(self, records: Sequence[LayerBlob]) -> None:
        """Note compressed forms (and the repositories holding them) of stored layers,
        e.g. after a push, so that a later push to the same registry can mount them."""
        self.index.write(lambda txn: self._put_layer_blobs(txn, records))

    def has_layer(self, diff_id: str) -> bool:
        """True if a layer with this diff_id is stored."""
        with self.index.read() as txn:
            return txn.get(digest_bytes(diff_id), db=self.index.db("layers")) is not None

    def _find(self, txn, dbname: str, ref: str, tags: bool) -> bytes | None:
        if tags and not ref.startswith("sha256:"):
            try:
                raw = txn.get(imagesmod.parse_reference(ref).encode(), db=self.index.db("tags"))
            except StoreError:
                raw = None
            if raw is not None:
                return bytes(raw)
        hexpart = ref.removeprefix("sha256:").lower()
        if not hexpart or len(hexpart) > 64 or any(c not in "0123456789abcdef" for c in hexpart):
            return None
        lo = bytes.fromhex(hexpart[: len(hexpart) & ~1])
        matches = []
        for k, _ in prefix_scan(txn, self.index.db(dbname), lo):
            if k.hex().startswith(hexpart):
                matches.append(bytes(k))
                if len(matches) > 1:
                    raise AmbiguousName(f"{ref} matches more than one {dbname[:-1]}; give more digits")
        return matches[0] if matches else None

    # -- changes -------------------------------------------------------------------

    def tag(self, image: str, ref: str) -> str:
        """Point ``ref`` (NAME[:TAG]) at an image; returns the normalised tag."""
        ref = imagesmod.parse_reference(ref)
        rec = self.resolve_image(image)
        self.index.write(lambda txn: txn.put(ref.encode(), digest_bytes(rec.image_id),
                                             db=self.index.db("tags")))
        self.update_marker()
        return ref

    def rmi(self, ref: str) -> tuple[list[str], str | None]:
        """Remove a tag, and the image once no tag names it; or an image by id with its tags.

        Returns (tags removed, image id removed or None). Layers and blobs stay until gc.
        """
        rec = self.resolve_image(ref)
        tag = None
        if not ref.startswith("sha256:"):
            try:
                name = imagesmod.parse_reference(ref)
                if name in self.tags_of(rec.image_id):
                    tag = name  # a tag wins over an id prefix, as in resolve_image
            except StoreError:
                pass

        def txn_fn(txn: lmdb.Transaction) -> tuple[list[str], str | None]:
            tdb, key = self.index.db("tags"), digest_bytes(rec.image_id)
            names = [k.decode() for k, v in txn.cursor(db=tdb) if v == key]
            removed = [tag] if tag else names
            for name in removed:
                txn.delete(name.encode(), db=tdb)
            if len(removed) < len(names):
                return removed, None
            users = [c.name for c in self.containers.list_in(txn) if c.image_id == rec.image_id]
            if users:
                raise StoreError(f"image {rec.image_id[7:19]} is used by container "
                                 f"{', '.join(users)}; remove the container first (layerfs rm)")
            txn.delete(key, db=self.index.db("images"))
            return removed, rec.image_id

        result = self.index.write(txn_fn)
        self.update_marker()
        return result

    # -- reading -------------------------------------------------------------------

    def create_container(self, image: str, name: str | None = None, flags: int = 0, volumes=()):
        """A new container of an image (its upper root takes the image root's metadata),
        with ``volumes`` (containers.Volume) bound over its mount whenever it is mounted."""
        rec = self.resolve_image(image)
        return self.containers.create(rec.image_id, name, flags, root=self.tree(rec).lookup(""),
                                      volumes=tuple(volumes))

    def image_layers(self, image: ImageRecord) -> list[LayerRecord]:
        return [self.resolve_layer(d) for d in image.layers]

    def tree(self, image: str | ImageRecord) -> MergedTree:
        """The merged tree of an image (flattened in the index on first use)."""
        rec = image if isinstance(image, ImageRecord) else self.resolve_image(image)
        return MergedTree.of(self.index, list(rec.layers), lambda: self.image_layers(rec))

    def layer_entries(self, layer: LayerRecord) -> dict[str, Entry]:
        from .export import layer_entries

        return layer_entries(self.index, layer.num)

    def export_layer(self, ref: str, out: str | BinaryIO) -> int:
        """Write a layer's tar (sha256 == its id) to a path or a binary stream. An image
        given instead is refused with the layers it has."""
        try:
            layer = self.resolve_layer(ref)
        except LayerNotFound as e:
            try:
                image = self.resolve_image(ref)
            except StoreError:
                raise e from None
            ids = ", ".join(d.removeprefix("sha256:")[:12] for d in image.layers)
            raise LayerNotFound(f"{ref} is an image, not a layer; its {len(image.layers)} "
                                f"layer{'s' if len(image.layers) != 1 else ''}, bottom first: {ids} "
                                "(layerfs export-layer LAYER, or layerfs save for the image)") from None
        from .export import export_to_path, write_layer

        if isinstance(out, str):
            return export_to_path(self.index, self.blobs, layer, out)
        return write_layer(self.index, self.blobs, layer, out)

    def image_usage(self) -> list[tuple[ImageRecord, list[str], int, int]]:
        """Per image: (image, tags, bytes of blobs only it uses, bytes of blobs it shares)."""
        images = self.images()
        with self.index.read() as txn:
            sizes = {bytes(k).decode(): struct.unpack("<Q", v)[0]
                     for k, v in txn.cursor(db=self.index.db("blobs"))}
        layer_blobs: dict[str, set[str]] = {}
        for layer in self.layers():
            layer_blobs[layer.diff_id] = {e.blob for e in self.layer_entries(layer).values() if e.blob}
        used_by: dict[str, int] = {}
        per_image = []
        for image, tags in images:
            blobs = set().union(*(layer_blobs.get(d, set()) for d in image.layers))
            per_image.append((image, tags, blobs))
            for b in blobs:
                used_by[b] = used_by.get(b, 0) + 1
        return [(image, tags, sum(sizes.get(b, 0) for b in blobs if used_by[b] == 1),
                 sum(sizes.get(b, 0) for b in blobs if used_by[b] > 1))
                for image, tags, blobs in per_image]

    def gc(self, dry_run: bool = False, grace_seconds: float = 0.0,
           ignore_images: frozenset[str] = frozenset(), progress: Progress = SILENT):
        """Free what nothing reaches (see store.gc)."""
        from .gc import collect
        report = collect(self, dry_run=dry_run, grace_seconds=grace_seconds, ignore_images=ignore_images,
                         progress=progress)
        if not dry_run:
            self.update_marker()
        return report

    def prune(self, dry_run: bool = False, ignore_containers: frozenset[str] = frozenset(),
              progress: Progress = SILENT):
        """Remove untagged images that no container uses, then collect; returns (ids, report).

        ``ignore_containers`` (ids) count as gone: what a dry run removes before this."""

        def txn_fn(txn: lmdb.Transaction) -> list[str]:
            # Decided inside the transaction, so an image tagged or given a container
            # meanwhile is kept.
            tagged = {bytes(v) for _, v in txn.cursor(db=self.index.db("tags"))}
            used = {digest_bytes(c.image_id) for c in self.containers.list_in(txn)
                    if c.id not in ignore_containers}
            doomed = [bytes(k) for k, _ in txn.cursor(db=self.index.db("images"))
                      if bytes(k) not in tagged and bytes(k) not in used]
            if not dry_run:
                for key in doomed:
                    txn.delete(key, db=self.index.db("images"))
            return [bytes_digest(k) for k in doomed]

        removed = self.index.write(txn_fn)
        return removed, self.gc(dry_run=dry_run, ignore_images=frozenset(removed) if dry_run else frozenset(),
                                progress=progress)

    def fsck(self, fast: bool = False, repair: bool = False, progress: Progress = SILENT):
        """Check the store (see store.fsck)."""
        from .fsck import check
        return check(self, fast=fast, repair=repair, progress=progress)

    def df(self) -> Usage:
        """Blobs, bytes stored, and what the layers would take without dedup."""
        with self.index.read() as txn:
            n = stored = 0
            for _, v in txn.cursor(db=self.index.db("blobs")):
                n += 1
                stored += struct.unpack("<Q", v)[0]
            layers = [unpack_layer(bytes_digest(k), v) for k, v in txn.cursor(db=self.index.db("layers"))]
            images = txn.stat(self.index.db("images"))["entries"]
        return Usage(n, stored, sum(layer.file_bytes for layer in layers), len(layers), images)
