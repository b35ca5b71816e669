"""HTTP for the registry client, on the standard library's ``http.client``: pooled
keep-alive connections, https first with a plain-http fallback only where allowed,
redirects that never carry credentials to another host, and retries with backoff.

Why not ``requests``/``urllib3``: streaming bodies both ways, connection reuse and a
retry loop are each a few lines over ``http.client``, while the retry policy a registry
needs (resume an upload from its status, resume a download with ``Range``) lives above
any library's generic retries anyway; one dependency less to install and audit.
"""

from __future__ import annotations

import http.client
import random
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .errors import RegistryUnreachable
from .reference import host_part, is_loopback

USER_AGENT = "layerfs/0.1"
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
# Errors after which the same request may simply be sent again on a new connection.
DROPPED = (ConnectionError, http.client.RemoteDisconnected, http.client.IncompleteRead,
           http.client.BadStatusLine, socket.timeout, ssl.SSLEOFError, ssl.SSLZeroReturnError)


@dataclass(slots=True, frozen=True)
class RetryPolicy:
    """How often, and how patiently, to retry a failed request."""

    attempts: int = 6  # tries in all, the first included
    base_delay: float = 0.5
    max_delay: float = 10.0

    def delay(self, attempt: int, retry_after: str | None = None) -> float:
        """Seconds to wait before try ``attempt + 1`` (exponential, jittered; Retry-After wins)."""
        if retry_after and retry_after.strip().isdigit():
            return min(float(retry_after), 60.0)
        return min(self.max_delay, self.base_delay * 2 ** attempt) * random.uniform(0.5, 1.0)


class Response:
    """A response whose connection goes back to the pool once its body is read (or closed)."""

    def __init__(self, transport: "Transport", key: tuple, conn: http.client.HTTPConnection,
                 resp: http.client.HTTPResponse, url: str) -> None:
        self._transport, self._key, self._conn, self._resp = transport, key, conn, resp
        self.status = resp.status
        self.headers = resp.headers
        self.url = url

    def header(self, name: str) -> str | None:
        """A response header (None when absent)."""
        return self._resp.getheader(name)

    def read1(self, n: int) -> bytes:
        """What has arrived, up to ``n`` bytes (one read: a stalled download still hands
        over what it got, so an interruption loses nothing already received)."""
        return self._resp.read1(n)

    def read_limited(self, limit: int) -> bytes | None:
        """The whole body, or None when it is longer than ``limit`` bytes."""
        data = self._resp.read(limit + 1)
        if len(data) > limit:
            self.close()
            return None
        self.close()
        return data

    def close(self) -> None:
        """Give the connection back when the body was read to its end; else drop it."""
        if self._conn is None:
            return
        conn, self._conn = self._conn, None
        if self._resp.isclosed() and not self._resp.will_close:
            self._transport._release(self._key, conn)
        else:
            self._resp.close()
            conn.close()

    def discard(self) -> None:
        """Read and drop a small body (an error document) so the connection can be reused."""
        try:
            self._resp.read(1 << 16)
        except DROPPED + (OSError,):
            pass
        self.close()


class Transport:
    """Connections to one registry (and to whatever its redirects point at)."""

    def __init__(self, host_port: str, insecure: bool = False, timeout: float = 60.0,
                 retry: RetryPolicy | None = None) -> None:
        self.host_port = host_port
        self.insecure = insecure
        # docker's rule: loopback registries are "insecure" without being asked.
        self.plain_allowed = insecure or is_loopback(host_port)
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.scheme: str | None = None  # decided by the first request
        self._reached = False  # refused connections are retried only once the host answered
        self._idle: dict[tuple, list[http.client.HTTPConnection]] = {}
        self._loopback: dict[str, bool] = {}
        self._lock = threading.Lock()
        self._scheme_lock = threading.Lock()

    # -- connections -----------------------------------------------------------------

    def base(self) -> str:
        """``scheme://host:port``, probing https (then http where allowed) on first use."""
        with self._scheme_lock:
            if self.scheme is None:
                self.scheme = self._choose_scheme()
        return f"{self.scheme}://{self.host_port}"

    def _ssl_context(self, host: str) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        if self.plain_allowed and host == host_part(self.host_port):
            # An insecure registry: TLS if it speaks it, but its certificate is not checked.
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def _choose_scheme(self) -> str:
        host, port = self._split(self.host_port, 443)
        conn = http.client.HTTPSConnection(host, port, timeout=self.timeout, context=self._ssl_context(host))
        try:
            conn.connect()
            self._reached = True
            return "https"
        except ssl.SSLCertVerificationError as e:
            raise self.unreachable(e) from None
        except ssl.SSLError as e:
            if self.plain_allowed:
                self._reached = True
                return "http"
            raise RegistryUnreachable(
                f"TLS with {self.host_port} failed ({e.reason or e}); if it serves plain http, "
                "use --insecure") from None
        except OSError as e:
            if self.plain_allowed and isinstance(e, ConnectionRefusedError) and ":" not in self.host_port:
                return "http"  # nothing on 443: a loopback registry on port 80
            raise self.unreachable(e) from None
        finally:
            conn.close()

    @staticmethod
    def _split(host_port: str, default_port: int) -> tuple[str, int]:
        host = host_part(host_port)
        rest = host_port[host_port.index("]") + 1:] if host_port.startswith("[") else host_port[len(host):]
        return host, int(rest[1:]) if rest.startswith(":") else default_port

    def _plain_ok(self, netloc: str) -> bool:
        """Plain http to the registry with --insecure, or to any loopback host (a token
        service next to a local registry); never to another host, credentials could leak."""
        if netloc == self.host_port:
            return self.plain_allowed
        with self._lock:
            ok = self._loopback.get(netloc)
        if ok is None:
            ok = is_loopback(netloc)
            with self._lock:
                self._loopback[netloc] = ok
        return ok

    def _connect(self, key: tuple) -> http.client.HTTPConnection:
        scheme, host, port = key
        with self._lock:
            idle = self._idle.get(key)
            if idle:
                return idle.pop()
        if scheme == "https":
            conn = http.client.HTTPSConnection(host, port, timeout=self.timeout,
                                               context=self._ssl_context(host), blocksize=1 << 20)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=self.timeout, blocksize=1 << 20)
        return conn

    def _release(self, key: tuple, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            self._idle.setdefault(key, []).append(conn)

    def close(self) -> None:
        """Close every idle connection."""
        with self._lock:
            for conns in self._idle.values():
                for c in conns:
                    c.close()
            self._idle.clear()

    def unreachable(self, e: BaseException, what: str = "") -> RegistryUnreachable:
        """The one-line error for a connection failure."""
        if isinstance(e, socket.gaierror):
            why = f"cannot resolve {host_part(self.host_port)!r}"
        elif isinstance(e, ConnectionRefusedError):
            why = "connection refused"
        elif isinstance(e, socket.timeout):
            why = f"no answer within {self.timeout:g} s"
        elif isinstance(e, ssl.SSLCertVerificationError):
            why = f"its TLS certificate is not trusted ({e.verify_message})"
        elif isinstance(e, DROPPED):
            why = f"the connection was dropped ({type(e).__name__})"
        else:
            why = getattr(e, "strerror", None) or str(e) or type(e).__name__
        return RegistryUnreachable(f"registry {self.host_port}: {why}{what}")

    def url(self, path_or_url: str) -> str:
        """An absolute URL for a path on the registry, or a Location it sent."""
        if "://" in path_or_url:
            return path_or_url
        return urllib.parse.urljoin(self.base() + "/", path_or_url)

    # -- requests ---------------------------------------------------------------------

    def send(self, method: str, url: str, headers: Mapping[str, str] | None = None,
             body: bytes | Iterable[bytes] | None = None, length: int | None = None) -> Response:
        """One request, no retries, no redirects (connection errors raise as they are)."""
        url = self.url(url)
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme
        if scheme == "http" and not self._plain_ok(parts.netloc):
            raise RegistryUnreachable(f"refusing plain http to {parts.netloc} (use --insecure)")
        host, port = self._split(parts.netloc, 443 if scheme == "https" else 80)
        key = (scheme, host, port)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        hdrs = {"User-Agent": USER_AGENT, **(headers or {})}
        if body is not None:
            hdrs["Content-Length"] = str(len(body) if isinstance(body, bytes) else length)
        elif method in ("PUT", "POST", "PATCH"):
            hdrs["Content-Length"] = "0"
        for fresh in (False, True):
            conn = self._connect(key) if not fresh else self._connect_new(key)
            reused = conn.sock is not None
            try:
                conn.request(method, target, body=body, headers=hdrs)
                resp = conn.getresponse()
            except DROPPED as e:
                conn.close()
                # A keep-alive connection the server closed while idle: try once on a new one,
                # unless a streamed body was already consumed.
                if reused and not fresh and (body is None or isinstance(body, bytes)):
                    continue
                raise e
            except BaseException:
                conn.close()
                raise
            self._reached = True
            return Response(self, key, conn, resp, url)
        raise AssertionError("unreachable")

    def _connect_new(self, key: tuple) -> http.client.HTTPConnection:
        with self._lock:
            for c in self._idle.pop(key, []):
                c.close()
        return self._connect(key)

    def request(self, method: str, url: str, what: str, headers: Mapping[str, str] | None = None,
                body: bytes | None = None, follow: bool = True) -> Response:
        """A request with a replayable body: retried on dropped connections, 5xx and 429,
        redirects followed (without the Authorization header once the host changes).
        ``what`` names the work in errors ("reading manifest ...")."""
        url = self.url(url)
        origin = urllib.parse.urlsplit(url).netloc
        hdrs = dict(headers or {})
        attempt = redirects = 0
        while True:
            try:
                resp = self.send(method, url, hdrs, body)
            except socket.gaierror as e:
                raise self.unreachable(e, f" while {what}") from None
            except ssl.SSLCertVerificationError as e:
                raise self.unreachable(e, f" while {what}") from None
            except (ConnectionRefusedError,) + DROPPED as e:
                refused_first = isinstance(e, ConnectionRefusedError) and not self._reached
                attempt += 1
                if refused_first or attempt >= self.retry.attempts:
                    raise self.unreachable(e, f" while {what}" + (f" ({attempt} attempts)" if attempt > 1 else "")) from None
                time.sleep(self.retry.delay(attempt - 1))
                continue
            except OSError as e:
                raise self.unreachable(e, f" while {what}") from None
            if resp.status in RETRY_STATUSES and attempt + 1 < self.retry.attempts:
                retry_after = resp.header("Retry-After")
                resp.discard()
                time.sleep(self.retry.delay(attempt, retry_after))
                attempt += 1
                continue
            if follow and resp.status in _REDIRECTS and method in ("GET", "HEAD"):
                location = resp.header("Location")
                resp.discard()
                redirects += 1
                if not location or redirects > 10:
                    raise RegistryUnreachable(f"registry {self.host_port}: too many redirects")
                url = urllib.parse.urljoin(url, location)
                if urllib.parse.urlsplit(url).netloc != origin:
                    hdrs = {k: v for k, v in hdrs.items() if k.lower() != "authorization"}
                continue
            return resp
