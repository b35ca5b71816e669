"""Real servers for the registry tests: CNCF distribution (Debian's ``docker-registry``)
on a free loopback port, a TCP proxy that drops connections on cue, and a token service
implementing docker's token flow (JWTs signed by openssl, which the registry verifies).

Nothing here is a mock: the registry is the real program, the proxy forwards real TCP,
and the tokens are the real format the registry checks against a real certificate.
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field

REGISTRY = shutil.which("docker-registry")
SKOPEO = shutil.which("skopeo")
HTPASSWD = shutil.which("htpasswd")
OPENSSL = shutil.which("openssl")

# Access log lines: 127.0.0.1 - - [date] "PATCH /v2/x/blobs/uploads/ID?_state=... HTTP/1.1" 202 0 ...
_ACCESS_RE = re.compile(r'^\S+ - \S+ \[[^]]+\] "(\w+) (\S+) HTTP/[\d.]+" (\d+) ')


def self_signed(cert: str, key: str, cn: str, ip: str | None = None) -> None:
    """A self-signed certificate and its key (for an IP address too, when given)."""
    extra = ["-addext", f"subjectAltName=IP:{ip}"] if ip else []
    subprocess.run([OPENSSL, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "2", "-subj", f"/CN={cn}", *extra], check=True, capture_output=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, host: str = "127.0.0.1", timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class RegistryServer:
    """``docker-registry serve`` with a config and storage of its own; stop() kills it."""

    def __init__(self, workdir: str, auth: dict | None = None, tls: tuple[str, str] | None = None,
                 bind: str = "127.0.0.1") -> None:
        self.dir = workdir
        os.makedirs(workdir, exist_ok=True)
        self.bind = bind
        self.port = free_port()
        self.host = f"{bind}:{self.port}"
        self.auth = auth
        self.tls = tls
        self.log_path = os.path.join(workdir, "registry.log")
        self.config_path = os.path.join(workdir, "config.yml")
        self.proc: subprocess.Popen | None = None
        self._write_config()

    def _write_config(self) -> None:
        config = {
            "version": 0.1,
            "log": {"level": "info", "accesslog": {"disabled": False}},
            "storage": {"filesystem": {"rootdirectory": os.path.join(self.dir, "data")},
                        "delete": {"enabled": True}},
            # A fixed secret: upload Locations stay valid across a restart.
            "http": {"addr": self.host, "secret": "layerfs-test-secret"},
        }
        if self.tls:
            config["http"]["tls"] = {"certificate": self.tls[0], "key": self.tls[1]}
        if self.auth:
            config["auth"] = self.auth
        with open(self.config_path, "w") as f:
            json.dump(config, f)  # YAML is a superset of JSON

    def start(self) -> "RegistryServer":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([REGISTRY, "serve", self.config_path], stdout=log, stderr=log,
                                     stdin=subprocess.DEVNULL)
        log.close()
        try:
            wait_for_port(self.port, self.bind)
        except OSError:
            self.stop()
            raise RuntimeError(f"the registry did not start: {open(self.log_path).read()[-2000:]}")
        return self

    def stop(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if kill:
            proc.kill()
        else:
            proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def requests(self, method: str | None = None, path: str = "") -> list[tuple[str, str, int]]:
        """(method, path, status) of every request the registry logged, filtered."""
        out = []
        with open(self.log_path, errors="replace") as f:
            for line in f:
                m = _ACCESS_RE.match(line)
                if m and (method is None or m.group(1) == method) and path in m.group(2):
                    out.append((m.group(1), m.group(2), int(m.group(3))))
        return out

    def blob_path(self, digest: str) -> str:
        """Where the registry's filesystem storage keeps a blob's bytes (to damage them)."""
        hexpart = digest.split(":", 1)[1]
        return os.path.join(self.dir, "data", "docker", "registry", "v2", "blobs", "sha256",
                            hexpart[:2], hexpart, "data")

    def uploads(self) -> int:
        """Blob uploads started (POST .../blobs/uploads/ answered 202)."""
        return sum(1 for m, p, s in self.requests("POST", "/blobs/uploads/") if s == 202)


# -- a TCP proxy that drops connections on cue ---------------------------------------

_REQUEST_LINE = re.compile(rb"(GET|HEAD|POST|PUT|PATCH|DELETE) (\S+) HTTP/1\.1\r\n")


@dataclass
class DropRule:
    """Drop the connection once ``after`` bytes of a matching request (direction "up",
    the request as sent) or of its response ("down") have passed, ``times`` times. An
    "up" rule with ``after=0`` drops the request before any of it reaches the server."""

    method: str
    path: str  # a substring of the request path
    after: int
    direction: str = "up"
    times: int = 1
    skip: int = 0  # let this many matching requests through first
    respond: int = 0  # instead of dropping, answer this HTTP status (a failing front proxy)
    hold: threading.Event | None = None  # instead of dropping, stall until this is set
    holding: threading.Event = field(default_factory=threading.Event)  # set while stalled
    then_drop: bool = False  # after the stall, drop (the server died meanwhile) rather than go on
    fired: int = 0
    seen: int = 0


class _Conn:
    def __init__(self) -> None:
        self.request: tuple[str, str] | None = None
        self.up = 0  # bytes of the current request forwarded
        self.down = 0  # bytes of its response forwarded
        self.rule: DropRule | None = None


class DropProxy:
    """Forwards 127.0.0.1:port to a registry; drops connections as its rules say."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.rules: list[DropRule] = []
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.host = f"127.0.0.1:{self.port}"
        self.drops = 0
        self.answered = 0
        self._stop = False
        self._open: set[socket.socket] = set()
        threading.Thread(target=self._accept, daemon=True).start()

    def add(self, rule: DropRule) -> DropRule:
        with self.lock:
            self.rules.append(rule)
        return rule

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()  # the registry is down: as good as a refused connection
                continue
            conn = _Conn()
            with self.lock:
                self._open.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream, conn, "up"), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, conn, "down"), daemon=True).start()

    def _match(self, conn: _Conn) -> DropRule | None:
        if conn.request is None:
            return None
        with self.lock:
            for rule in self.rules:
                if (rule.fired < rule.times and rule.method == conn.request[0]
                        and rule.path in conn.request[1]):
                    rule.seen += 1
                    if rule.seen > rule.skip:
                        return rule
        return None

    def _drop(self, a: socket.socket, b: socket.socket, rule: DropRule) -> None:
        with self.lock:
            rule.fired += 1
            self.drops += 1
        for s in (a, b):
            try:
                # Linger 0: a reset, as after a crash. shutdown() first, so that the other
                # pump thread, blocked in recv() on this socket, wakes up and lets go.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def _answer(self, client: socket.socket, upstream: socket.socket, rule: DropRule) -> None:
        with self.lock:
            rule.fired += 1
            self.answered += 1
        body = b'{"errors":[{"code":"UNAVAILABLE","message":"backend restarting"}]}'
        head = (f"HTTP/1.1 {rule.respond} Injected\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        try:
            client.sendall(head + body)
        except OSError:
            pass
        for s in (client, upstream):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def _pump(self, src: socket.socket, dst: socket.socket, conn: _Conn, direction: str) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if direction == "up":
                    m = _REQUEST_LINE.search(data)
                    if m:
                        conn.request = (m.group(1).decode(), m.group(2).decode())
                        conn.up = conn.down = 0
                        conn.rule = self._match(conn)
                        if conn.rule and conn.rule.respond:
                            self._answer(src, dst, conn.rule)
                            return
                        if (conn.rule and conn.rule.direction == "up" and conn.rule.after == 0
                                and conn.rule.hold is None):
                            self._drop(src, dst, conn.rule)
                            return
                rule = conn.rule if conn.rule and conn.rule.direction == direction else None
                count = conn.up if direction == "up" else conn.down
                if rule and rule.hold is not None and count + len(data) > rule.after:
                    # Stall mid-message: forward up to the mark, wait, then go on.
                    dst.sendall(data[: max(0, rule.after - count)])
                    with self.lock:
                        rule.fired += 1
                    rule.holding.set()
                    rule.hold.wait(120)
                    if rule.then_drop:
                        self._drop(src, dst, rule)
                        return
                    data = data[max(0, rule.after - count):]
                    count = rule.after
                    conn.rule = rule = None
                if rule and count + len(data) > rule.after:
                    dst.sendall(data[: max(0, rule.after - count)])
                    time.sleep(0.05)  # let those bytes go out before the reset
                    self._drop(src, dst, rule)
                    conn.rule = None
                    return
                dst.sendall(data)
                if direction == "up":
                    conn.up += len(data)
                else:
                    conn.down += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop = True
        self.sock.close()
        with self.lock:
            for rule in self.rules:
                if rule.hold is not None:
                    rule.hold.set()
            for s in self._open:
                try:
                    s.close()
                except OSError:
                    pass


# -- a token service -------------------------------------------------------------------

def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class TokenService:
    """Docker's token flow: GET /token?service=S&scope=repository:NAME:ACTIONS with optional
    Basic auth returns a JWT (RS256, the signing certificate in ``x5c``) granting, per
    scope, the actions the user may have. ``users`` maps user -> password; ``grants`` maps
    user ("" for anonymous) -> the actions granted on every repository."""

    workdir: str
    users: dict[str, str]
    grants: dict[str, tuple[str, ...]]
    service: str = "layerfs-test-registry"
    issuer: str = "layerfs-test-issuer"
    requests: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.key = os.path.join(self.workdir, "token.key")
        self.cert = os.path.join(self.workdir, "token.crt")
        self_signed(self.cert, self.key, "layerfs test token issuer")
        with open(self.cert) as f:
            self.cert_der = ssl.PEM_cert_to_DER_cert(f.read())
        service = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                service._handle(self)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.realm = f"http://127.0.0.1:{self.port}/token"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def registry_auth(self) -> dict:
        """The ``auth`` section of the registry's config that trusts this service."""
        return {"token": {"realm": self.realm, "service": self.service, "issuer": self.issuer,
                          "rootcertbundle": self.cert}}

    def _sign(self, claims: dict) -> str:
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(self.cert_der).decode()]}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        sig = subprocess.run([OPENSSL, "dgst", "-sha256", "-sign", self.key], input=signing_input.encode(),
                             capture_output=True, check=True).stdout
        return f"{signing_input}.{_b64url(sig)}"

    def _handle(self, h: http.server.BaseHTTPRequestHandler) -> None:
        url = urllib.parse.urlsplit(h.path)
        query = urllib.parse.parse_qs(url.query)
        user = ""
        auth = h.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            name, _, password = base64.b64decode(auth[6:]).decode().partition(":")
            if self.users.get(name) != password:
                self.requests.append({"user": name, "scope": query.get("scope", []), "status": 401})
                h.send_response(401)
                h.send_header("Content-Type", "application/json")
                body = b'{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}'
                h.send_header("Content-Length", str(len(body)))
                h.end_headers()
                h.wfile.write(body)
                return
            user = name
        allowed = self.grants.get(user, ())
        access = []
        for scope in query.get("scope", []):
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            granted = [a for a in actions.split(",") if a in allowed]
            access.append({"type": kind, "name": name, "actions": granted})
        self.requests.append({"user": user, "scope": query.get("scope", []), "status": 200})
        now = int(time.time())
        token = self._sign({"iss": self.issuer, "sub": user, "aud": query.get("service", [""])[0],
                            "exp": now + 300, "nbf": now - 10, "iat": now, "jti": uuid.uuid4().hex,
                            "access": access})
        body = json.dumps({"token": token, "expires_in": 300}).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def htpasswd_auth(workdir: str, users: dict[str, str]) -> dict:
    """An htpasswd file (bcrypt, as distribution requires) and the registry config for it."""
    path = os.path.join(workdir, "htpasswd")
    with open(path, "w") as f:
        for user, password in users.items():
            f.write(subprocess.run([HTPASSWD, "-Bbn", user, password], capture_output=True,
                                   check=True, text=True).stdout.strip() + "\n")
    return {"htpasswd": {"realm": "layerfs-test", "path": path}}


class HostileRegistry:
    """A registry that serves fixed answers ({path: (status, headers, body)}), for what a
    well-behaved registry never sends: oversized manifests, wrong digests, schema 1.
    ``chunked`` answers go without Content-Length (the size shows only while reading)."""

    def __init__(self, answers: dict[str, tuple[int, dict, bytes]], chunked: bool = False) -> None:
        self.answers = answers
        hostile = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                status, headers, body = hostile.answers.get(self.path.split("?")[0], (404, {}, b""))
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                if chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for i in range(0, len(body), 1 << 16):
                        piece = body[i:i + (1 << 16)]
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    self.wfile.write(b"0\r\n\r\n")
                else:
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

            do_HEAD = do_GET

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
