"""The registry client: the OCI Distribution API over the standard library's HTTP.

``Registry`` talks to one registry (probe, auth, manifests); ``BlobReader`` downloads a
blob as a verified stream; ``push_blob`` uploads one (HEAD, mount, PUT or PATCH chunks).
"""

from .client import Manifest, Registry
from .credentials import Credentials, find_credentials
from .download import BlobReader
from .errors import (AccessDenied, AuthenticationRequired, DigestMismatch, ManifestUnknown,
                     RegistryError, RegistryUnreachable, TooLarge, UnsupportedManifest)
from .reference import Reference
from .transport import RetryPolicy
from .upload import Outcome, push_blob, stream_source

__all__ = ["AccessDenied", "AuthenticationRequired", "BlobReader", "Credentials",
           "DigestMismatch", "Manifest", "ManifestUnknown", "Outcome",
           "Reference", "Registry", "RegistryError", "RegistryUnreachable", "RetryPolicy", "TooLarge",
           "UnsupportedManifest", "find_credentials", "push_blob", "stream_source"]
