"""``layerfs pull``: an image from a registry into the store.

1. The manifest the reference names (through indexes, for the platform) and its config.
2. The layers the store lacks (by diff_id) are downloaded a few at a time into a
   scratch directory under the store's ``tmp/``, which a lease keeps from gc: each blob
   verified as it streams, renamed to its digest once whole. An interrupted pull leaves
   them there; the next pull takes over the directories of pulls that died and goes on
   from them (a finished blob is not fetched again, a partial one resumes where it
   stopped). A gc in between removes them, as it removes any dead work.
3. The image is recorded from those files in one transaction (store.oci's
   import_images): nothing half-pulled shows as an image; each layer's compressed blob
   is kept, so a push sends the same digests back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import queue
import shutil
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .. import images as imagesmod
from .. import leases
from ..errors import BadArchive
from ..oci.descriptor import BadImage, Descriptor, Platform, parse_json
from ..oci.image import ImageInput, LoadProgress, config_diff_ids, import_images, manifest_input
from ..records import ImageRecord
from ..store import Store
from .client import Registry
from .download import BlobReader
from .errors import DigestMismatch
from .reference import Reference

JOBS = 3  # layers downloaded at once
_PREFIX = "pull-"


class PullProgress(LoadProgress):
    """What a pull reports (the default: nothing). Layers are numbered from 1; the load
    part (:class:`LoadProgress`) follows once every layer is here."""

    def plan(self, layers: Sequence[Descriptor], states: Sequence[str]) -> None:
        """The manifest's layers, each "stored" (the store has it), "here" (an interrupted
        pull downloaded it) or "fetch"."""

    def fetching(self, number: int, done: int) -> None:
        """``done`` bytes of layer ``number`` are here (it may go back after a retry)."""

    def fetched(self, number: int) -> None:
        """Layer ``number`` is downloaded and verified."""


@dataclass(slots=True, frozen=True)
class PullResult:
    """The image recorded, the manifest it came from, and where its layers came from."""

    image: ImageRecord
    manifest_digest: str
    tag: str | None
    fetched: int  # layers downloaded now
    resumed: int  # layers an interrupted pull had downloaded, whole or in part
    stored: int  # layers the store already had


class _Cancelled(Exception):
    """Another download failed: this one stops (its partial file stays for a resume)."""


class _Scratch:
    """This pull's directory under tmp/, named as its lease (so gc leaves it alone)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.id = f"{_PREFIX}{uuid.uuid4().hex}"
        leases.take(store.index, self.id)  # before the directory exists (see gc)
        self.dir = os.path.join(store.blobs.tmp, self.id)
        os.makedirs(self.dir)

    def path(self, digest: str) -> str:
        """Where the blob ``digest`` goes once downloaded (``.part`` while it comes)."""
        return os.path.join(self.dir, digest.replace(":", "-"))

    def adopt(self, digests: set[str]) -> None:
        """Take over what dead pulls downloaded of ``digests``: renamed into this directory
        (a rename that fails because gc took the file meanwhile just means "fetch it")."""
        tmp = self.store.blobs.tmp
        live = {lease.id for lease in leases.all_leases(self.store.index) if lease.alive()}
        wanted = {d.replace(":", "-") for d in digests}
        for name in os.listdir(tmp):
            if not name.startswith(_PREFIX) or name == self.id or name in live:
                continue
            try:
                files = os.listdir(os.path.join(tmp, name))
            except OSError:
                continue
            for f in files:
                base = f.removesuffix(".part")
                mine = os.path.join(self.dir, base)
                if base in wanted and not os.path.exists(mine) and not os.path.exists(mine + ".part"):
                    try:
                        os.rename(os.path.join(tmp, name, f), os.path.join(self.dir, f))
                    except OSError:
                        pass
            try:
                os.rmdir(os.path.join(tmp, name))  # only when all of it was taken over
            except OSError:
                pass

    def close(self, keep: bool) -> None:
        """Remove the directory (unless kept for a resume) and drop the lease: a kept one
        is then dead work, which the next pull takes over or gc removes."""
        if not keep:
            shutil.rmtree(self.dir, ignore_errors=True)
        try:
            leases.release(self.store.index, self.id)
        except Exception:  # noqa: BLE001 - an expired lease is collected by gc anyway
            pass


def _hash_file(path: str, digest: str, limit: int):
    """(hasher over the first ``limit`` bytes of ``path``, how many there were)."""
    hasher = hashlib.new(digest.split(":", 1)[0])
    n = 0
    try:
        with open(path, "rb") as f:
            while n < limit and (chunk := f.read(min(1 << 20, limit - n))):
                hasher.update(chunk)
                n += len(chunk)
    except FileNotFoundError:
        pass
    return hasher, n


def _download(registry: Registry, repo: str, desc: Descriptor, path: str,
              progress: Callable[[int], None], stop: threading.Event) -> None:
    """Bring ``desc``'s blob to ``path``, verified, going on from ``path + ".part"``."""
    part = path + ".part"
    if os.path.exists(path):
        os.rename(path, part)  # taken over from a dead pull: checked again like a partial
    for attempt in (1, 2):
        hasher, offset = _hash_file(part, desc.digest, desc.size)
        with open(part, "ab") as out:
            out.truncate(offset)
            progress(offset)
            try:
                if offset == desc.size:  # all here already: only the digest to check
                    if f"{desc.digest.split(':', 1)[0]}:{hasher.hexdigest()}" != desc.digest:
                        raise DigestMismatch(f"blob {desc.digest}: the bytes kept from an earlier pull are damaged")
                else:
                    with BlobReader(registry, repo, desc, progress, offset=offset, hasher=hasher) as reader:
                        while chunk := reader.read(1 << 20):
                            if stop.is_set():
                                raise _Cancelled()
                            out.write(chunk)
                        reader.finish()
            except DigestMismatch:
                out.truncate(0)
                if offset and attempt == 1:  # what was kept from before was bad: start over
                    continue
                raise
        os.rename(part, path)
        return


def _run(tasks: list[Callable[[], None]], jobs: int, stop: threading.Event) -> None:
    """Run tasks on up to ``jobs`` threads; the first error stops the others and is raised
    at once. Daemon threads, and a main thread that only waits: Ctrl-C ends a pull
    without waiting for a download stuck on a slow socket (its partial file stays)."""
    pending: queue.SimpleQueue = queue.SimpleQueue()
    for t in tasks:
        pending.put(t)
    done: queue.SimpleQueue = queue.SimpleQueue()

    def worker() -> None:
        while True:
            try:
                task = pending.get_nowait()
            except queue.Empty:
                return
            try:
                if stop.is_set():
                    raise _Cancelled()
                task()
                done.put(None)
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                stop.set()
                done.put(e)

    for _ in range(min(jobs, len(tasks))):
        threading.Thread(target=worker, daemon=True).start()
    try:
        for _ in tasks:
            while True:
                try:
                    result = done.get(timeout=0.2)  # a timeout keeps the wait interruptible
                    break
                except queue.Empty:
                    continue
            if isinstance(result, BaseException) and not isinstance(result, _Cancelled):
                raise result
    finally:
        stop.set()


def pull(store: Store, ref: Reference, registry: Registry, tag: str | None = None,
         platform: Platform | None = None, progress: PullProgress | None = None,
         jobs: int = JOBS) -> PullResult:
    """Pull ``ref`` into the store and tag it ``tag`` (default: the reference's
    ``name:tag``; none for a reference by digest only). All or nothing."""
    progress = progress or PullProgress()
    repo = ref.repository
    if tag is None and ref.tag:
        tag = f"{ref.name}:{ref.tag}"
    tag = imagesmod.parse_reference(tag) if tag else None
    resolved = registry.resolve(repo, ref.manifest_ref, platform)
    manifest = resolved.manifest
    what = f"{ref.registry}/{repo}@{manifest.digest}"
    scratch = _Scratch(store)
    keep = False
    try:
        def fetch(desc: Descriptor):
            path = scratch.path(desc.digest)
            if os.path.exists(path):
                return open(path, "rb")
            return BlobReader(registry, repo, desc)  # the config (or a layer gc took meanwhile)

        image = manifest_input(manifest.data, fetch, [tag] if tag else [], what)
        source = f"{ref.registry}/{repo}"
        image = ImageInput(image.config, [dataclasses.replace(layer, source=source) for layer in image.layers],
                           image.tags, image.what)
        descs = [layer.descriptor for layer in image.layers]
        diff_ids = config_diff_ids(parse_json(image.config, f"the config of {what}"))
        if len(diff_ids) != len(descs):  # before anything is downloaded
            raise BadImage(f"the config of {what} lists {len(diff_ids)} layers (diff_ids) but its "
                           f"manifest has {len(descs)}")
        need = {d.digest for d, diff_id in zip(descs, diff_ids) if not store.has_layer(diff_id)}
        scratch.adopt(need)
        states = ["stored" if d.digest not in need else
                  "here" if os.path.exists(scratch.path(d.digest)) or os.path.exists(scratch.path(d.digest) + ".part")
                  else "fetch" for d in descs]
        progress.plan(descs, states)
        stop = threading.Event()
        tasks = []
        queued: set[str] = set()
        for number, (d, state) in enumerate(zip(descs, states), 1):
            if state == "stored" or d.digest in queued:
                continue
            queued.add(d.digest)

            def task(d=d, number=number) -> None:
                _download(registry, repo, d, scratch.path(d.digest),
                          lambda done, n=number: progress.fetching(n, done), stop)
                progress.fetched(number)
            tasks.append(task)
        _run(tasks, jobs, stop)
        record = import_images(store, [image], progress)[0]
        return PullResult(record, manifest.digest, tag, states.count("fetch"), states.count("here"),
                          states.count("stored"))
    except BadArchive:
        raise  # the image is bad: what was downloaded of it goes
    except BaseException:
        keep = True  # interrupted, or the registry failed: the next pull goes on from here
        raise
    finally:
        scratch.close(keep)
