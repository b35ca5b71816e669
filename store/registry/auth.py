"""Registry authentication: what the ``WWW-Authenticate`` challenge of a 401 asks for.

``Basic``: the user name and password on every request. ``Bearer`` (docker's token
flow): fetch a token for the request's scopes (``repository:NAME:pull,push``) from the
challenge's realm, with the credentials (if any) as Basic auth, then send it as
``Authorization: Bearer``; tokens are cached per scope set until they expire.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass, field

from .credentials import Credentials
from .errors import AccessDenied, AuthenticationRequired, RegistryError
from .transport import Transport

_PARAM_RE = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)\s*,?')
_MAX_TOKEN_RESPONSE = 1 << 20


@dataclass(slots=True, frozen=True)
class Challenge:
    """One ``WWW-Authenticate`` challenge: its scheme (lowercase) and parameters."""

    scheme: str
    params: dict[str, str] = field(default_factory=dict)


def parse_challenge(header: str) -> Challenge | None:
    """``Bearer realm="...",service="...",scope="..."`` -> Challenge (None if unreadable)."""
    m = re.match(r"\s*([A-Za-z][A-Za-z0-9_-]*)(?:\s+|$)", header or "")
    if not m:
        return None
    params: dict[str, str] = {}
    for pm in _PARAM_RE.finditer(header, m.end()):
        value = pm.group(2)
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        params[pm.group(1).lower()] = value
    return Challenge(m.group(1).lower(), params)


@dataclass(slots=True)
class _Token:
    value: str
    expires: float


class Authenticator:
    """Authorization headers for one registry, learnt from its challenges."""

    def __init__(self, transport: Transport, credentials: Credentials | None) -> None:
        self.transport = transport
        self.credentials = credentials
        self.challenge: Challenge | None = None
        self._tokens: dict[tuple[str, ...], _Token] = {}
        self._lock = threading.Lock()
        self.token_requests = 0  # for tests: tokens really are cached

    def _who(self) -> str:
        if self.credentials is None:
            return "anonymous access"
        return f"the credentials of {self.credentials.username!r} (from {self.credentials.source})"

    def _basic(self) -> str:
        assert self.credentials is not None
        raw = f"{self.credentials.username}:{self.credentials.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def headers(self, scopes: tuple[str, ...]) -> dict[str, str]:
        """The Authorization header for a request needing ``scopes`` (none before a challenge)."""
        ch = self.challenge
        if ch is None:
            return {}
        if ch.scheme == "basic":
            if self.credentials is None:
                raise AuthenticationRequired(
                    f"registry {self.transport.host_port} requires a user name and password "
                    "(--username and --password-stdin, or docker/podman login)")
            return {"Authorization": self._basic()}
        if ch.scheme == "bearer":
            return {"Authorization": "Bearer " + self._token(tuple(sorted(set(scopes))))}
        raise AuthenticationRequired(
            f"registry {self.transport.host_port} asks for {ch.scheme!r} authentication, "
            "which layerfs does not speak (only Basic and Bearer)")

    def on_unauthorized(self, header: str | None, scopes: tuple[str, ...], sent_auth: bool) -> bool:
        """Learn from a 401; True when the request is worth sending again.

        A first challenge, or a bearer challenge naming a scope the cached token lacks
        (or a token that expired meanwhile), gives one more try; a second refusal of
        the same credentials is final.
        """
        ch = parse_challenge(header or "")
        if ch is None:
            raise AuthenticationRequired(
                f"registry {self.transport.host_port} refused {self._who()} (401, no challenge)")
        first = self.challenge is None or self.challenge.scheme != ch.scheme
        self.challenge = ch
        if first or not sent_auth:
            return True
        if ch.scheme == "bearer":
            key = tuple(sorted(set(scopes)))
            with self._lock:
                stale = self._tokens.pop(key, None)
            # Retry once with a fresh token; the caller bounds the number of tries.
            return stale is not None
        return False

    def refused(self, status: int, what: str) -> RegistryError:
        """The error for a final 401 or 403."""
        host = self.transport.host_port
        if status == 401 and self.credentials is None:
            return AuthenticationRequired(
                f"registry {host} requires authentication for {what} "
                "(--username and --password-stdin, or docker/podman login)")
        if status == 403 or (self.challenge and self.challenge.params.get("error") == "insufficient_scope"):
            return AccessDenied(f"registry {host}: {what} is not allowed for {self._who()}")
        return AuthenticationRequired(f"registry {host} refused {self._who()} for {what}")

    def _token(self, scopes: tuple[str, ...]) -> str:
        with self._lock:
            tok = self._tokens.get(scopes)
            if tok and tok.expires > time.monotonic():
                return tok.value
        tok = self._fetch_token(scopes)
        with self._lock:
            self._tokens[scopes] = tok
        return tok.value

    def _fetch_token(self, scopes: tuple[str, ...]) -> _Token:
        ch = self.challenge
        assert ch is not None
        realm = ch.params.get("realm")
        if not realm:
            raise AuthenticationRequired(f"registry {self.transport.host_port}: its Bearer challenge has no realm")
        query = []
        if ch.params.get("service"):
            query.append(("service", ch.params["service"]))
        query += [("scope", s) for s in scopes]
        sep = "&" if urllib.parse.urlsplit(realm).query else "?"
        url = realm + (sep + urllib.parse.urlencode(query) if query else "")
        if urllib.parse.urlsplit(url).scheme not in ("https", "http"):
            raise AuthenticationRequired(f"registry {self.transport.host_port}: bad token realm {realm!r}")
        headers = {"Authorization": self._basic()} if self.credentials else {}
        self.token_requests += 1
        resp = self.transport.request("GET", url, "asking for a token", headers)
        body = resp.read_limited(_MAX_TOKEN_RESPONSE)
        if resp.status in (401, 403):
            raise AuthenticationRequired(
                f"the token service of {self.transport.host_port} ({urllib.parse.urlsplit(realm).netloc}) "
                f"refused {self._who()}")
        if resp.status != 200 or body is None:
            raise RegistryError(f"the token service of {self.transport.host_port} answered {resp.status}")
        try:
            doc = json.loads(body)
            value = doc.get("token") or doc.get("access_token")
            lifetime = float(doc.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError):
            value = None
        if not isinstance(value, str) or not value:
            raise RegistryError(f"the token service of {self.transport.host_port} sent no token")
        # Renew a little early: a token that expires in flight costs a 401 and a retry.
        return _Token(value, time.monotonic() + max(lifetime - 10, lifetime / 2))
