"""Registry references: ``[HOST[:PORT]/]REPO[:TAG][@DIGEST]``, as docker and podman read them."""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass

from ..errors import InvalidReference
from ..images import parse_reference

DOCKER_HUB = "docker.io"
# Docker Hub's API is not served at the name users write.
_API_HOSTS = {DOCKER_HUB: "registry-1.docker.io", "index.docker.io": "registry-1.docker.io"}
_DIGEST_RE = re.compile(r"^(sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})$")


def api_host(registry: str) -> str:
    """The host[:port] that serves a registry's API (Docker Hub's is not docker.io)."""
    return _API_HOSTS.get(registry, registry)


def valid_digest(digest: str) -> bool:
    """True for a ``sha256:``/``sha512:`` digest in canonical (lowercase hex) form."""
    return bool(_DIGEST_RE.match(digest))


@dataclass(slots=True, frozen=True)
class Reference:
    """An image on a registry: where, which repository, and a tag or digest (or both)."""

    registry: str  # host[:port] as the user wrote it (docker.io for Docker Hub)
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str) -> "Reference":
        """Parse a reference; a name without a registry is on Docker Hub (``library/`` for one part)."""
        rest, digest = text, None
        if "@" in text:
            rest, digest = text.split("@", 1)
            if not valid_digest(digest):
                raise InvalidReference(f"invalid reference {text!r}: bad digest {digest!r}")
        first, slash, remainder = rest.partition("/")
        # docker's rule: the first part names a registry if it looks like a host.
        if slash and ("." in first or ":" in first or first == "localhost"):
            registry, path = first, remainder
        else:
            registry, path = DOCKER_HUB, rest
        tag = None
        colon = path.rfind(":")
        if colon > path.rfind("/"):
            path, tag = path[:colon], path[colon + 1:]
        if registry == DOCKER_HUB and "/" not in path:
            path = "library/" + path
        # The store's grammar for names and tags (it also refuses uppercase repositories).
        try:
            parse_reference(f"{path}:{tag or 'latest'}")
        except InvalidReference:
            raise InvalidReference(f"invalid reference {text!r}: expected [HOST[:PORT]/]NAME[:TAG][@DIGEST]"
                                   " (lowercase name components)") from None
        if not re.match(r"^[A-Za-z0-9.-]+(:[0-9]+)?$|^\[[0-9a-fA-F:]+\](:[0-9]+)?$", registry):
            raise InvalidReference(f"invalid reference {text!r}: bad registry host {registry!r}")
        if tag is None and digest is None:
            tag = "latest"
        return cls(registry, path, tag, digest)

    @property
    def name(self) -> str:
        """``registry/repository``, the name a pulled image is tagged with (Hub names shortened)."""
        if self.registry == DOCKER_HUB:
            return self.repository.removeprefix("library/")
        return f"{self.registry}/{self.repository}"

    @property
    def manifest_ref(self) -> str:
        """What to ask ``/manifests/`` for: the digest when there is one, else the tag."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        out = f"{self.registry}/{self.repository}"
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def host_part(host_port: str) -> str:
    """The host of ``host[:port]`` (brackets of an IPv6 literal removed)."""
    if host_port.startswith("["):
        return host_port[1:host_port.index("]")]
    return host_port.rsplit(":", 1)[0] if host_port.count(":") == 1 else host_port


def is_loopback(host_port: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1 (and names resolving only to those), which
    docker treats as insecure registries: plain http allowed without asking."""
    host = host_part(host_port)
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except (OSError, UnicodeError):
        return False
    return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)
