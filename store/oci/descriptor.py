"""OCI descriptors, media types, platforms and digests, and a reader that checks a blob
against its descriptor while it is read.

Everything read from outside goes through :meth:`Descriptor.from_json` (a malformed
descriptor is a clear :class:`BadImage`) and :class:`VerifyingReader` (no byte beyond
the declared size is read, and a digest mismatch is an error at the end of the blob).
"""

from __future__ import annotations

import hashlib
import io
import json
import platform as _platform
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import BinaryIO

from ..errors import BadArchive

# Media types (OCI image-spec media-types.md, and Docker's schema 2 equivalents).
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = OCI_LAYER + "+gzip"
OCI_LAYER_ZSTD = OCI_LAYER + "+zstd"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
CONFIG_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG})
# Every layer media type a loader accepts, with the compression it names. The
# "nondistributable" and "foreign" variants are deprecated but still found in the wild.
LAYER_TYPES: Mapping[str, str] = {
    OCI_LAYER: "none", OCI_LAYER_GZIP: "gzip", OCI_LAYER_ZSTD: "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "none",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    DOCKER_LAYER_GZIP: "gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
}
COMPRESSIONS: Mapping[str, str] = {"none": OCI_LAYER, "gzip": OCI_LAYER_GZIP, "zstd": OCI_LAYER_ZSTD}

REF_NAME = "org.opencontainers.image.ref.name"  # the tag of an index.json entry
CONTAINERD_NAME = "io.containerd.image.name"  # docker 25+ writes the full name here

MAX_JSON = 16 << 20  # the largest manifest, index or config read (containerd allows 4 MiB)

_ALGORITHMS = {"sha256": 64, "sha512": 128}
_HEX = re.compile(r"^[a-f0-9]+$")


class BadImage(BadArchive):
    """An image whose manifest, index, config or blobs are wrong or disagree."""


def check_digest(digest: object, what: str) -> str:
    """Validate ``alg:hex`` (sha256 or sha512, lowercase hex of the right length)."""
    if not isinstance(digest, str):
        raise BadImage(f"{what} has no valid digest")
    alg, _, hexpart = digest.partition(":")
    if alg not in _ALGORITHMS:
        raise BadImage(f"{what} has an unsupported digest {digest[:80]!r} (sha256 or sha512)")
    if len(hexpart) != _ALGORITHMS[alg] or not _HEX.match(hexpart):
        raise BadImage(f"{what} has a malformed digest {digest[:80]!r}")
    return digest


def hasher(digest: str):
    """A fresh hashlib object of the digest's algorithm."""
    return hashlib.new(digest.partition(":")[0])


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(slots=True, frozen=True)
class Platform:
    """An OCI platform (``os/architecture[/variant]``)."""

    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        return f"{self.os}/{self.architecture}" + (f"/{self.variant}" if self.variant else "")

    @classmethod
    def parse(cls, text: str) -> "Platform":
        """``linux/amd64``, ``linux/arm64/v8``, ...; raises BadImage otherwise."""
        parts = text.split("/")
        if not 2 <= len(parts) <= 3 or not all(parts):
            raise BadImage(f"invalid platform {text!r}: expected OS/ARCH[/VARIANT]")
        return cls(*parts)

    def matches(self, other: "Platform") -> bool:
        """``other`` (a manifest's platform) can run here; no variant asked means any."""
        return (self.os == other.os and self.architecture == other.architecture
                and (not self.variant or self.variant == other.variant))


def host_platform() -> Platform:
    """The platform of this machine, in OCI's names."""
    from ..images import OCI_ARCH

    machine = _platform.machine()
    return Platform("linux", OCI_ARCH.get(machine, machine))


@dataclass(slots=True, frozen=True)
class Descriptor:
    """What the OCI spec calls a descriptor: media type, digest and size of a blob."""

    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)
    platform: Platform | None = None

    @classmethod
    def from_json(cls, obj: object, what: str) -> "Descriptor":
        """Parse and validate a descriptor read from an index or a manifest."""
        if not isinstance(obj, dict):
            raise BadImage(f"{what} is not a descriptor object")
        digest = check_digest(obj.get("digest"), what)
        size, media_type = obj.get("size"), obj.get("mediaType", "")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BadImage(f"{what} has an invalid size {size!r}")
        if not isinstance(media_type, str):
            raise BadImage(f"{what} has an invalid media type")
        annotations = obj.get("annotations") or {}
        if not isinstance(annotations, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()):
            raise BadImage(f"{what} has invalid annotations")
        plat = obj.get("platform")
        platform = None
        if isinstance(plat, dict) and isinstance(plat.get("os"), str) \
                and isinstance(plat.get("architecture"), str):
            variant = plat.get("variant")
            platform = Platform(plat["os"], plat["architecture"], variant if isinstance(variant, str) else "")
        return cls(media_type, digest, size, annotations, platform)

    def to_json(self) -> dict:
        """The descriptor as the spec writes it (mediaType, digest, size, annotations)."""
        out: dict = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.platform is not None:
            plat = {"architecture": self.platform.architecture, "os": self.platform.os}
            if self.platform.variant:
                plat["variant"] = self.platform.variant
            out["platform"] = plat
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out


def parse_json(data: bytes, what: str) -> dict:
    """A JSON object read from an image (manifest, index, config), with a clear error."""
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadImage(f"{what} is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise BadImage(f"{what} is not a JSON object")
    return obj


def read_small(src: BinaryIO, what: str, limit: int = MAX_JSON) -> bytes:
    """Read a whole small blob (JSON), refusing more than ``limit`` bytes."""
    data = src.read(limit + 1)
    if len(data) > limit:
        raise BadImage(f"{what} is larger than {limit >> 20} MiB")
    return data


class VerifyingReader(io.RawIOBase):
    """Reads a blob, counting and hashing it; :meth:`finish` checks it against its
    descriptor. Never reads past the declared size (a hostile blob cannot make a load
    read without end)."""

    def __init__(self, src: BinaryIO, desc: Descriptor, what: str) -> None:
        self.src, self.desc, self.what = src, desc, what
        self.hash = hasher(desc.digest)
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        want = min(len(b), self.desc.size - self.count)
        if want <= 0:
            return 0
        data = self.src.read(want)
        n = len(data)
        b[:n] = data
        self.hash.update(data)
        self.count += n
        return n

    def finish(self) -> None:
        """Read what is left of the blob, then check its size and digest."""
        while self.read(1 << 20):
            pass
        if self.count != self.desc.size:
            raise BadImage(f"{self.what} is truncated: {self.count} bytes where its descriptor "
                           f"says {self.desc.size}")
        if self.src.read(1):
            raise BadImage(f"{self.what} is larger than the {self.desc.size} bytes its "
                           "descriptor says")
        got = f"{self.desc.digest.partition(':')[0]}:{self.hash.hexdigest()}"
        if got != self.desc.digest:
            raise BadImage(f"{self.what} does not match its digest: expected {self.desc.digest}, "
                           f"got {got}")


def read_verified(src: BinaryIO, desc: Descriptor, what: str) -> bytes:
    """A small blob (JSON) read whole and checked against its descriptor."""
    if desc.size > MAX_JSON:
        raise BadImage(f"{what} is larger than {MAX_JSON >> 20} MiB")
    reader = VerifyingReader(src, desc, what)
    data = reader.readall()
    reader.finish()
    return data
