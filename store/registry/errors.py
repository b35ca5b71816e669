"""What can go wrong talking to a registry, as StoreErrors the CLI prints in one line."""

from __future__ import annotations

import errno as _errno

from ..errors import NotFound, StoreError


class RegistryError(StoreError):
    """A registry refused a request, or answered something a client cannot use."""

    exit_code = 6
    errno = _errno.EIO


class RegistryUnreachable(RegistryError):
    """No answer: the host does not resolve, refuses the connection, or keeps dropping it."""


class AuthenticationRequired(RegistryError):
    """401: no credentials, or the registry (or its token service) rejected them."""

    errno = _errno.EACCES


class AccessDenied(RegistryError):
    """403: the credentials are valid but do not allow this."""

    errno = _errno.EACCES


class ManifestUnknown(RegistryError, NotFound):
    """No such repository, tag or digest on the registry."""

    exit_code = 3
    errno = _errno.ENOENT


class DigestMismatch(RegistryError):
    """Bytes from the registry that are not what their digest says."""


class TooLarge(RegistryError):
    """A manifest, index or config over the size a client accepts."""


class UnsupportedManifest(RegistryError):
    """A manifest type layerfs cannot pull (schema 1, an artifact), or no entry for this platform."""
