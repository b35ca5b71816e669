"""What a registry client adds to the OCI types of store.oci.descriptor: the Accept header,
the size a manifest may have, and the media type of a manifest as served."""

from __future__ import annotations

from ..oci.descriptor import DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, parse_json
from .errors import UnsupportedManifest

# CNCF distribution answers MANIFEST_UNKNOWN to a client that does not list the OCI types.
ACCEPT = ", ".join([OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST])
_SCHEMA1 = ("application/vnd.docker.distribution.manifest.v1+json",
            "application/vnd.docker.distribution.manifest.v1+prettyjws")

# Registries must accept manifests of at least 4 MiB (distribution-spec); a client
# needs to read no more, and a hostile registry cannot make it buffer gigabytes.
MAX_MANIFEST = 4 << 20


def media_type(data: bytes, content_type: str | None, what: str) -> str:
    """A manifest's type: its own ``mediaType`` field, else the response's Content-Type,
    else what its fields say (an index has ``manifests``)."""
    doc = parse_json(data, what)
    mt = doc.get("mediaType") or (content_type or "").split(";")[0].strip()
    if mt in _SCHEMA1 or doc.get("schemaVersion") == 1:
        raise UnsupportedManifest(f"{what} is a Docker schema 1 manifest, which layerfs does not pull")
    if not isinstance(mt, str) or mt in ("", "application/json"):
        mt = OCI_INDEX if "manifests" in doc else OCI_MANIFEST
    return mt
