"""Manifests and indexes as a registry serves them: media types, descriptors, and the
choice of one manifest for a platform from an index (OCI) or manifest list (Docker)."""

from __future__ import annotations

import json
import platform as _platform
from dataclasses import dataclass, field

from ..images import OCI_ARCH
from .errors import RegistryError, UnsupportedManifest
from .reference import valid_digest

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
IMAGE_MANIFESTS = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEXES = frozenset({OCI_INDEX, DOCKER_LIST})
# CNCF distribution answers MANIFEST_UNKNOWN to a client that does not list the OCI types.
ACCEPT = ", ".join([OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST])
_SCHEMA1 = ("application/vnd.docker.distribution.manifest.v1+json",
            "application/vnd.docker.distribution.manifest.v1+prettyjws")

# Registries must accept manifests of at least 4 MiB (distribution-spec); a client
# needs to read no more, and a hostile registry cannot make it buffer gigabytes.
MAX_MANIFEST = 4 << 20


@dataclass(slots=True, frozen=True)
class Descriptor:
    """What a manifest says of a blob or a child manifest."""

    media_type: str
    digest: str
    size: int
    platform: dict = field(default_factory=dict, compare=False)
    urls: tuple[str, ...] = ()

    @classmethod
    def parse(cls, obj: object, where: str) -> "Descriptor":
        """Validate a descriptor from JSON (digest syntax, a non-negative integer size)."""
        if not isinstance(obj, dict):
            raise RegistryError(f"{where}: a descriptor is not a JSON object")
        digest, size, mt = obj.get("digest"), obj.get("size"), obj.get("mediaType", "")
        if not isinstance(digest, str) or not valid_digest(digest):
            raise RegistryError(f"{where}: bad digest {digest!r}")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise RegistryError(f"{where}: bad size {size!r} for {digest}")
        plat = obj.get("platform") if isinstance(obj.get("platform"), dict) else {}
        urls = tuple(u for u in obj.get("urls") or () if isinstance(u, str))
        return cls(str(mt), digest, size, plat, urls)

    def to_json(self) -> dict:
        out: dict = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.platform:
            out["platform"] = self.platform
        if self.urls:
            out["urls"] = list(self.urls)
        return out


@dataclass(slots=True, frozen=True)
class Platform:
    """An os/architecture[/variant] triple, as in ``--platform linux/arm64/v8``."""

    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def parse(cls, text: str) -> "Platform":
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise RegistryError(f"invalid platform {text!r}: expected OS/ARCH[/VARIANT]")
        return cls(*parts)

    @classmethod
    def current(cls) -> "Platform":
        machine = _platform.machine()
        arch = OCI_ARCH.get(machine, machine)
        variant = {"armv7l": "v7", "armv6l": "v6"}.get(machine, "")
        return cls("linux", arch, variant)

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)

    def score(self, plat: dict) -> int:
        """How well an index entry's platform fits: 0 not at all, higher is better."""
        if plat.get("os") != self.os or plat.get("architecture") != self.architecture:
            return 0
        theirs = plat.get("variant", "")
        if self.architecture == "arm64":  # arm64 means v8 unless said otherwise
            theirs, mine = theirs or "v8", self.variant or "v8"
        else:
            mine = self.variant
        if theirs == mine:
            return 2
        return 1 if not mine else 0


def parse_json(data: bytes, what: str) -> dict:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise RegistryError(f"{what} is not valid JSON") from None
    if not isinstance(doc, dict):
        raise RegistryError(f"{what} is not a JSON object")
    return doc


def media_type(data: bytes, content_type: str | None, what: str) -> str:
    """A manifest's type: its own ``mediaType`` field, else the response's Content-Type."""
    doc = parse_json(data, what)
    mt = doc.get("mediaType") or (content_type or "").split(";")[0].strip()
    if mt in _SCHEMA1 or doc.get("schemaVersion") == 1:
        raise UnsupportedManifest(f"{what} is a Docker schema 1 manifest, which layerfs does not pull")
    if not mt and "manifests" in doc:
        mt = OCI_INDEX
    elif not mt and "layers" in doc:
        mt = OCI_MANIFEST
    return mt


def select_platform(index: dict, want: Platform, what: str) -> Descriptor:
    """The index entry that best fits ``want`` (the first of equals, as docker picks)."""
    entries = index.get("manifests")
    if not isinstance(entries, list):
        raise RegistryError(f"{what} has no manifests list")
    best, best_score = None, 0
    seen = []
    for i, obj in enumerate(entries):
        desc = Descriptor.parse(obj, f"{what}, entry {i}")
        if desc.platform:
            seen.append("/".join(str(desc.platform.get(k)) for k in ("os", "architecture", "variant")
                                 if desc.platform.get(k)))
        score = want.score(desc.platform)
        if score > best_score:
            best, best_score = desc, score
    if best is None:
        raise UnsupportedManifest(f"{what} has no image for {want} (it has: {', '.join(seen) or 'none'})")
    return best


@dataclass(slots=True, frozen=True)
class ImageManifest:
    """An image manifest's parts: config and layers, in order (base first)."""

    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]

    @classmethod
    def parse(cls, data: bytes, mt: str, what: str) -> "ImageManifest":
        doc = parse_json(data, what)
        if mt not in IMAGE_MANIFESTS:
            raise UnsupportedManifest(f"{what} has media type {mt!r}, not an image manifest")
        config = Descriptor.parse(doc.get("config"), f"{what}, config")
        layers = doc.get("layers")
        if not isinstance(layers, list):
            raise RegistryError(f"{what} has no layers list")
        return cls(mt, config, tuple(Descriptor.parse(d, f"{what}, layer {i}") for i, d in enumerate(layers)))
