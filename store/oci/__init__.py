"""Images in and out of the store in the container world's formats.

Modules: ``descriptor`` (media types, digests, descriptors, platforms, a verifying
reader), ``image`` (the format-neutral core below), ``layout`` (OCI image layouts),
``docker`` (``docker save`` archives), ``archive`` (reading a directory or a tar in
place, writing reproducible tars), ``loadsave`` (``layerfs load`` / ``save``).

The API that every format (and a registry client) builds on, in ``store.oci.image``:

Into the store
    ``resolve_manifest(descriptor, fetch, platform=None) -> (descriptor, manifest bytes)``
        follows (nested) indexes to the manifest for a platform (default: this
        machine's). ``fetch(descriptor)`` returns a context manager that yields a
        binary stream of that blob; every blob read through it is checked against
        its descriptor (size first: nothing past it is read; then the digest).
    ``import_manifest(store, manifest, fetch, tags=(), progress=None) -> ImageRecord``
        stores the image a manifest describes: the config is kept byte for byte (the
        image id is its sha256, as in docker and podman); a layer already stored
        (same diff_id) is not fetched; each layer fetched is checked against its
        descriptor and against the config's diff_id. All or nothing.
    ``manifest_input(...) -> ImageInput`` and ``import_images(store, [ImageInput])``
        do the same for several images at once (all or nothing), or for a format
        whose layers have no descriptors (``LayerInput(open, descriptor=None)``).
    ``LoadProgress``: subclass it to be told of each layer and the bytes read.

Out of the store
    ``with export_image(store, ref, compression="gzip"|"zstd"|"none") as image:``
        an ``ExportedImage``: ``.manifest``, ``.config`` and ``.layers`` are
        ``ExportedBlob``s, each with a ``.descriptor`` (media type, digest, size,
        all known before any byte is read) and ``.open()`` (a context manager that
        yields the bytes). Layers are the stored tars (tar-split: a layer loaded from
        a tarball goes out as the original bytes, so its diff_id never changes);
        compressed ones are staged in a temporary directory, deterministically (the
        same image gives the same digests every time). gc waits while the ``with``
        is open. ``.image`` is the ImageRecord and ``.tags`` its tags.

Errors are ``StoreError`` subclasses: ``descriptor.BadImage`` (a wrong or inconsistent
image: bad JSON, digest or size mismatch, unknown media type, no manifest for the
platform), ``archive.MissingFile`` (a blob or file not there), ``HostileArchive``.
"""

from .descriptor import BadImage, Descriptor, Platform
from .image import (ExportedBlob, ExportedImage, ImageInput, LayerInput, LoadProgress, export_image,
                    import_images, import_manifest, manifest_input, resolve_manifest)

__all__ = ["BadImage", "Descriptor", "Platform", "ExportedBlob", "ExportedImage", "ImageInput",
           "LayerInput", "LoadProgress", "export_image", "import_images", "import_manifest",
           "manifest_input", "resolve_manifest"]
