"""A client of one registry, speaking the OCI Distribution API: the ``/v2/`` probe,
authentication, manifests by tag or digest, and blobs (see download.py and upload.py)."""

from __future__ import annotations

import collections
import hashlib
import io
import json
import threading
import urllib.parse
from dataclasses import dataclass

from ..oci.descriptor import Descriptor, Platform
from ..oci.image import resolve_manifest
from .auth import Authenticator
from .credentials import Credentials, find_credentials
from .errors import DigestMismatch, ManifestUnknown, RegistryError, TooLarge
from .manifests import ACCEPT, MAX_MANIFEST, media_type
from .reference import Reference, api_host, valid_digest
from .transport import Response, RetryPolicy, Transport

# Blobs up to this size go in one PUT; larger ones in PATCH chunks, so that a dropped
# connection costs one chunk, not the whole layer.
MONOLITHIC_MAX = 64 << 20
CHUNK_SIZE = 16 << 20


def pull_scope(repo: str) -> str:
    """The token scope to read ``repo``."""
    return f"repository:{repo}:pull"


def push_scope(repo: str) -> str:
    """The token scope to write ``repo`` (pushing reads too: HEAD, mounts)."""
    return f"repository:{repo}:pull,push"


def digest_of(data: bytes, like: str = "sha256:") -> str:
    """The digest of ``data`` with the algorithm of ``like`` (sha256 or sha512)."""
    alg = like.split(":", 1)[0]
    return f"{alg}:{hashlib.new(alg, data).hexdigest()}"


def error_detail(resp: Response) -> str:
    """``CODE: message`` from a registry's JSON error document ("" if it sent none)."""
    body = resp.read_limited(1 << 16) or b""
    try:
        errs = json.loads(body).get("errors") or []
        return "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errs if isinstance(e, dict))
    except (ValueError, AttributeError):
        pass
    if resp.headers.get("Content-Type", "").startswith("text/plain"):
        return body[:200].decode(errors="replace").strip()
    return ""


@dataclass(slots=True, frozen=True)
class Manifest:
    """A manifest or index as the registry sent it: exact bytes, type and digest."""

    media_type: str
    data: bytes
    digest: str


@dataclass(slots=True, frozen=True)
class Resolved:
    """An image manifest found for a reference, and the index it was chosen from (if any)."""

    manifest: Manifest
    index: Manifest | None


class Registry:
    """One registry (``localhost:5000``, ``docker.io``...): connections, authentication,
    and counts of the requests that matter (uploads started, chunks, resumes, mounts)."""

    def __init__(self, registry: str, credentials: Credentials | None = None, *,
                 insecure: bool = False, retry: RetryPolicy | None = None, timeout: float = 60.0,
                 monolithic_max: int = MONOLITHIC_MAX, chunk_size: int = CHUNK_SIZE) -> None:
        self.name = registry
        self.transport = Transport(api_host(registry), insecure, timeout, retry)
        self.auth = Authenticator(self.transport, credentials)
        self.monolithic_max = monolithic_max
        self.chunk_size = chunk_size
        self.counts: collections.Counter[str] = collections.Counter()
        self._counts_lock = threading.Lock()
        self._pinged = False
        self._ping_lock = threading.Lock()

    @classmethod
    def for_reference(cls, ref: Reference, credentials: Credentials | None = None, **kwargs) -> "Registry":
        """A client for ``ref``'s registry, with the given credentials or the stored ones."""
        creds = credentials or find_credentials(ref.registry, ref.repository)
        return cls(ref.registry, creds, **kwargs)

    def close(self) -> None:
        """Close the idle connections."""
        self.transport.close()

    def __enter__(self) -> "Registry":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def count(self, what: str, n: int = 1) -> None:
        """Count an event (thread-safe: blobs move in parallel)."""
        with self._counts_lock:
            self.counts[what] += n

    # -- plumbing --------------------------------------------------------------------

    def ping(self) -> None:
        """``GET /v2/``: is this a registry, and which authentication does it want?"""
        with self._ping_lock:
            if self._pinged:
                return
            resp = self.transport.request("GET", "/v2/", "probing /v2/")
            if resp.status == 401:
                self.auth.on_unauthorized(resp.header("WWW-Authenticate"), (), False)
                resp.discard()
            elif resp.status == 200:
                resp.discard()
            else:
                resp.discard()
                raise RegistryError(f"{self.name} does not look like a registry "
                                    f"(GET /v2/ answered {resp.status})")
            self._pinged = True

    def request(self, method: str, url: str, scopes: tuple[str, ...], what: str,
                headers: dict | None = None, body: bytes | None = None) -> Response:
        """A request with authentication: a 401 teaches the authenticator and the request
        goes again; after a second refusal of credentials the 401 is the caller's."""
        self.ping()
        refusals = 0
        while True:
            hdrs = {**self.auth.headers(scopes), **(headers or {})}
            resp = self.transport.request(method, url, what, hdrs, body)
            if resp.status != 401:
                return resp
            sent = "Authorization" in hdrs
            refusals += sent
            again = self.auth.on_unauthorized(resp.header("WWW-Authenticate"), scopes, sent)
            if refusals >= 2 or not again:
                return resp
            resp.discard()

    def error(self, resp: Response, what: str) -> RegistryError:
        """The one-line error for an unexpected answer (its body is read and dropped)."""
        if resp.status in (401, 403):
            resp.discard()
            return self.auth.refused(resp.status, what)
        detail = error_detail(resp)
        return RegistryError(f"registry {self.name}: {what} failed: {resp.status}"
                             + (f" ({detail})" if detail else ""))

    # -- manifests -------------------------------------------------------------------

    def get_manifest(self, repo: str, ref: str) -> Manifest:
        """A manifest or index by tag or digest, its digest checked (against ``ref`` when
        it is one, else against the registry's Docker-Content-Digest)."""
        what = f"{self.name}/{repo}{'@' if valid_digest(ref) else ':'}{ref}"
        resp = self.request("GET", f"/v2/{repo}/manifests/{ref}", (pull_scope(repo),),
                            f"reading manifest {what}", {"Accept": ACCEPT})
        if resp.status == 404:
            detail = error_detail(resp)
            raise ManifestUnknown(f"{what}: not found on the registry" + (f" ({detail})" if detail else ""))
        if resp.status != 200:
            raise self.error(resp, f"reading manifest {what}")
        length = resp.header("Content-Length")
        if length and length.isdigit() and int(length) > MAX_MANIFEST:
            resp.close()
            raise TooLarge(f"{what}: manifest of {int(length)} bytes is over the {MAX_MANIFEST} byte limit")
        data = resp.read_limited(MAX_MANIFEST)
        if data is None:
            raise TooLarge(f"{what}: manifest is over the {MAX_MANIFEST} byte limit")
        if valid_digest(ref):
            digest = digest_of(data, ref)
            if digest != ref:
                raise DigestMismatch(f"{what}: the registry sent a manifest whose digest is {digest}")
        else:
            digest = digest_of(data)
            claimed = resp.header("Docker-Content-Digest")
            if claimed and valid_digest(claimed) and digest_of(data, claimed) != claimed:
                raise DigestMismatch(f"{what}: the manifest's digest is not the {claimed} "
                                     "the registry claims")
        return Manifest(media_type(data, resp.header("Content-Type"), f"manifest {what}"), data, digest)

    def resolve(self, repo: str, ref: str, platform: Platform | None = None) -> "Resolved":
        """The image manifest ``ref`` (tag or digest) names, through indexes (nested ones
        too) to the one for ``platform`` (default: this machine's)."""
        top = self.get_manifest(repo, ref)
        fetched = {top.digest: top}

        def fetch(desc: Descriptor):
            m = fetched.get(desc.digest) or self.get_manifest(repo, desc.digest)
            fetched[m.digest] = m
            return io.BytesIO(m.data)

        what = f"{self.name}/{repo}{'@' if valid_digest(ref) else ':'}{ref}"
        desc, _ = resolve_manifest(Descriptor(top.media_type, top.digest, len(top.data)), fetch, platform, what)
        chosen = fetched[desc.digest]
        return Resolved(chosen, top if chosen is not top else None)

    def put_manifest(self, repo: str, ref: str, manifest: Manifest) -> str:
        """Store a manifest under a tag (or its digest), with its media type; returns its digest."""
        what = f"{self.name}/{repo}:{ref}"
        resp = self.request("PUT", f"/v2/{repo}/manifests/{ref}", (push_scope(repo),),
                            f"pushing manifest {what}", {"Content-Type": manifest.media_type}, manifest.data)
        if resp.status not in (200, 201, 202):
            raise self.error(resp, f"pushing manifest {what}")
        resp.discard()
        claimed = resp.header("Docker-Content-Digest")
        if claimed and claimed != manifest.digest:
            raise DigestMismatch(f"{what}: the registry stored the manifest as {claimed}, "
                                 f"not {manifest.digest}")
        return manifest.digest

    # -- blobs -------------------------------------------------------------------------

    def blob_size(self, repo: str, digest: str) -> int | None:
        """``HEAD`` a blob: its size when the repository has it, else None."""
        what = f"checking blob {digest[:19]} in {repo}"
        resp = self.request("HEAD", f"/v2/{repo}/blobs/{digest}", (pull_scope(repo),), what)
        resp.close()
        if resp.status == 404:
            return None
        if resp.status != 200:
            raise self.error(resp, what)
        length = resp.header("Content-Length")
        return int(length) if length and length.isdigit() else -1

    def blob_url(self, repo: str, digest: str) -> str:
        """The path of a blob of ``repo``."""
        return f"/v2/{repo}/blobs/{digest}"

    def upload_url(self, location: str, **query: str) -> str:
        """An upload's Location (absolute or not) with more query parameters."""
        parts = urllib.parse.urlsplit(self.transport.url(location))
        q = urllib.parse.parse_qsl(parts.query, keep_blank_values=True) + list(query.items())
        return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(q)))
