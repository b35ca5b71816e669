"""The store's exception hierarchy: every failure a user can cause is a StoreError.

The CLI prints ``str(error)`` as one line and exits with ``error.exit_code``; the FUSE
layer maps ``error.errno`` to the errno it returns.
"""

from __future__ import annotations

import errno as _errno


class StoreError(Exception):
    """Base of every error the store raises on purpose."""

    exit_code: int = 1
    errno: int = _errno.EIO


class NotAStore(StoreError):
    """The store root exists but is not a layerfs store."""


class NoStore(StoreError):
    """No store at the root a command that needs one was given (it is not made there)."""

    exit_code = 3


class SchemaTooNew(StoreError):
    """The index was written by a newer layerfs."""


class StoreCorrupt(StoreError):
    """The index or a blob disagrees with itself."""


class IndexDamaged(StoreCorrupt):
    """The index file is missing, empty or truncated next to a store that has data, or
    belongs to another store: nothing may be decided from it (gc above all)."""


class NotFound(StoreError):
    """A name or id that matches nothing."""

    exit_code = 3
    errno = _errno.ENOENT


class ImageNotFound(NotFound):
    pass


class LayerNotFound(NotFound):
    pass


class PathNotFound(NotFound):
    pass


class AmbiguousName(StoreError):
    """An id prefix that matches more than one object."""


class InvalidReference(StoreError):
    """A NAME:TAG that is not a valid image reference."""

    exit_code = 2


class InvalidTime(StoreError):
    """A time that is neither ``now``, ``@SECONDS`` nor RFC 3339."""

    exit_code = 2


class BadArchive(StoreError):
    """An input layer that is not a valid tar (or its compression is broken)."""

    exit_code = 4


class HostileArchive(BadArchive):
    """An input layer that tries to escape the layer or exhaust resources."""


class StoreFull(StoreError):
    """The store's filesystem has no space left."""

    exit_code = 5
    errno = _errno.ENOSPC
