"""Where credentials for a registry come from: the command line, $REGISTRY_AUTH_FILE, or
docker's config (``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json``), in that order.

Both files use docker's format: ``auths`` maps a registry (podman also allows
``registry/namespace``) to ``{"auth": base64("user:password")}``; ``credHelpers`` and
``credsStore`` name a ``docker-credential-*`` program to ask instead.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import subprocess
from dataclasses import dataclass

from .errors import RegistryError

_HUB_KEYS = ("index.docker.io", "registry-1.docker.io", "docker.io")
# What docker itself writes for Docker Hub, and what its credential helpers expect.
_HUB_SERVER_URL = "https://index.docker.io/v1/"


@dataclass(slots=True, frozen=True)
class Credentials:
    """A user name and password (or token) for one registry, and where they were found."""

    username: str
    password: str
    source: str = "the command line"

    def __repr__(self) -> str:  # never print a password in a traceback
        return f"Credentials({self.username!r}, source={self.source!r})"


def _normalise_key(key: str) -> str:
    """``https://host/v1/`` -> ``host``; ``host/ns`` stays; Hub's aliases -> ``docker.io``."""
    if "://" in key:
        key = key.split("://", 1)[1].split("/", 1)[0]
    key = key.rstrip("/")
    host, slash, path = key.partition("/")
    if host in _HUB_KEYS:
        host = "docker.io"
    return host + slash + path


def _candidates(registry: str, repository: str) -> list[str]:
    """Keys to try, most specific first: ``reg/a/b``, ``reg/a``, ``reg``."""
    parts = repository.split("/")
    return [f"{registry}/{'/'.join(parts[:n])}" for n in range(len(parts), 0, -1)] + [registry]


def _decode_entry(entry: object, source: str) -> Credentials | None:
    if not isinstance(entry, dict):
        return None
    if entry.get("auth"):
        try:
            user, sep, password = base64.b64decode(entry["auth"], validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError, TypeError):
            raise RegistryError(f"{source}: an \"auth\" entry is not base64 of user:password") from None
        if not sep:
            raise RegistryError(f"{source}: an \"auth\" entry is not base64 of user:password")
        return Credentials(user, password, source)
    if entry.get("username") and entry.get("password"):
        return Credentials(str(entry["username"]), str(entry["password"]), source)
    return None


def _helper(name: str, registry: str, source: str) -> Credentials | None:
    """Ask ``docker-credential-NAME get``; None when it knows nothing of this registry."""
    server = _HUB_SERVER_URL if registry == "docker.io" else registry
    try:
        proc = subprocess.run([f"docker-credential-{name}", "get"], input=server.encode(),
                              capture_output=True, timeout=60)
    except FileNotFoundError:
        raise RegistryError(f"{source} names the credential helper {name!r}, but "
                            f"docker-credential-{name} is not installed") from None
    except subprocess.TimeoutExpired:
        raise RegistryError(f"the credential helper docker-credential-{name} did not answer") from None
    if proc.returncode != 0:
        return None  # "credentials not found": anonymous, as docker does
    try:
        out = json.loads(proc.stdout)
        return Credentials(str(out["Username"]), str(out["Secret"]), f"docker-credential-{name}")
    except (ValueError, KeyError, TypeError):
        raise RegistryError(f"docker-credential-{name} answered something that is not "
                            "its JSON (Username, Secret)") from None


def _from_file(path: str, registry: str, repository: str) -> Credentials | None:
    try:
        with open(path, "rb") as f:
            config = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise RegistryError(f"cannot read credentials from {path}: {e}") from None
    if not isinstance(config, dict):
        raise RegistryError(f"cannot read credentials from {path}: not a JSON object")
    auths = {_normalise_key(k): v for k, v in (config.get("auths") or {}).items()}
    helpers = {_normalise_key(k): v for k, v in (config.get("credHelpers") or {}).items()}
    for key in _candidates(registry, repository):
        if key in helpers:
            return _helper(str(helpers[key]), registry, path)
        if key in auths:
            found = _decode_entry(auths[key], path)
            if found:
                return found
    if config.get("credsStore"):
        return _helper(str(config["credsStore"]), registry, path)
    return None


def docker_config_path() -> str:
    """docker's config file: ``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json``."""
    return os.path.join(os.environ.get("DOCKER_CONFIG") or os.path.expanduser("~/.docker"), "config.json")


def find_credentials(registry: str, repository: str) -> Credentials | None:
    """Stored credentials for ``registry`` (as the user writes it: docker.io for Hub)."""
    registry = _normalise_key(registry)
    auth_file = os.environ.get("REGISTRY_AUTH_FILE")
    if auth_file:
        found = _from_file(auth_file, registry, repository)
        if found:
            return found
    return _from_file(docker_config_path(), registry, repository)
