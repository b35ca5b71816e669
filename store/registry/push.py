"""``layerfs push``: an image from the store to a registry.

Layers go as the compressed blobs they were loaded or pulled in (so their digests do
not change); a layer made here (a commit, an import of a plain tar) is compressed with
gzip the same way every time, so pushing it again finds it on the registry. For each
blob: HEAD (the registry has it: nothing sent), else a mount from another repository
of the same registry known to hold it, else an upload. A few layers go at once; the
config next, and the manifest last, so the registry never names a blob it lacks.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import InvalidReference
from ..oci.descriptor import COMPRESSIONS, LAYER_TYPES, OCI_MANIFEST, Descriptor
from ..oci.image import ExportedBlob, export_image, manifest_bytes
from ..records import LayerBlob
from ..store import Store
from .client import Manifest, Registry, digest_of
from .pull import JOBS, _run
from .reference import Reference
from .upload import Outcome, mount_blob, push_blob, stream_source


class PushProgress:
    """What a push reports (the default: nothing). Blobs are numbered from 1: the layers,
    base first, then the config."""

    def plan(self, blobs: Sequence[Descriptor]) -> None:
        """The blobs about to go."""

    def sending(self, number: int, done: int) -> None:
        """``done`` bytes of blob ``number`` sent (it may go back after a retry)."""

    def finished(self, number: int, outcome: Outcome) -> None:
        """Blob ``number`` is on the registry: it was there, mounted, or uploaded."""


@dataclass(slots=True, frozen=True)
class PushResult:
    """The manifest's digest, and how each blob got there."""

    digest: str  # of the manifest
    outcomes: tuple[Outcome, ...]  # per blob: layers, then the config


def _repos_on(ref: Reference, sources: Sequence[str]) -> list[str]:
    """The other repositories of ``ref``'s registry among ``registry/repository`` sources."""
    prefix = f"{ref.registry}/"
    return [s[len(prefix):] for s in sources if s.startswith(prefix) and s[len(prefix):] != ref.repository]


class _Pusher:
    def __init__(self, store: Store, registry: Registry, ref: Reference, progress: PushProgress) -> None:
        self.store, self.registry, self.ref, self.progress = store, registry, ref, progress

    def other_form(self, blob: ExportedBlob, forms: list[LayerBlob]) -> Descriptor | None:
        """A compressed form known only by descriptor (pulled while the store already had
        the layer) that the target has or can mount: it keeps the digest the layer was
        pulled with, and costs no upload."""
        for form in forms:
            if form.digest == blob.descriptor.digest or form.blob:
                continue
            desc = Descriptor(COMPRESSIONS[LAYER_TYPES[form.media_type]], form.digest, form.size)
            if self.registry.blob_size(self.ref.repository, form.digest) == form.size:
                return desc
            if any(mount_blob(self.registry, self.ref.repository, desc, repo)
                   for repo in _repos_on(self.ref, form.sources)):
                return desc
        return None

    def send(self, number: int, blob: ExportedBlob) -> tuple[Descriptor, Outcome]:
        """Make sure the target has the blob (or another form of the layer)."""
        forms = self.store.layer_blobs(blob.diff_id) if blob.diff_id else []
        other = self.other_form(blob, forms)
        if other is not None:
            self.progress.finished(number, Outcome.EXISTS)
            return other, Outcome.EXISTS
        mount_from = [repo for form in forms if form.digest == blob.descriptor.digest
                      for repo in _repos_on(self.ref, form.sources)]
        outcome = push_blob(self.registry, self.ref.repository, blob.descriptor, stream_source(blob.open),
                            mount_from, lambda done: self.progress.sending(number, done))
        self.progress.finished(number, outcome)
        return blob.descriptor, outcome


def push(store: Store, image: str, ref: Reference, registry: Registry,
         progress: PushProgress | None = None, jobs: int = JOBS) -> PushResult:
    """Push a stored image (tag or id) to ``ref`` (``registry/repository:tag``)."""
    if ref.digest or not ref.tag:
        raise InvalidReference(f"push to a tag, not a digest: {ref}")
    progress = progress or PushProgress()
    pusher = _Pusher(store, registry, ref, progress)
    with export_image(store, image, compression="gzip", originals=True) as exported:
        progress.plan([b.descriptor for b in [*exported.layers, exported.config]])
        sent: list[tuple[Descriptor, Outcome] | None] = [None] * len(exported.layers)

        def task(i: int, blob: ExportedBlob) -> None:
            sent[i] = pusher.send(i + 1, blob)

        _run([lambda i=i, b=b: task(i, b) for i, b in enumerate(exported.layers)], jobs, threading.Event())
        _, config_outcome = pusher.send(len(exported.layers) + 1, exported.config)
        layers = [s[0] for s in sent if s is not None]
        data = manifest_bytes(exported.config.descriptor, layers)
        manifest = Manifest(OCI_MANIFEST, data, digest_of(data))
        registry.put_manifest(ref.repository, ref.tag, manifest)
        # The target holds each layer now: a later push to another repository of the
        # same registry mounts it from there.
        target = f"{ref.registry}/{ref.repository}"
        store.add_layer_sources([LayerBlob(b.diff_id, d.digest, d.media_type, d.size, "", (target,))
                                 for b, d in zip(exported.layers, layers)])
    return PushResult(manifest.digest, tuple(s[1] for s in sent if s) + (config_outcome,))
