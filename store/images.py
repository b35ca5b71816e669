"""Image references (``name:tag``) and OCI image configs.

An image id is the sha256 of its config, as in docker and the OCI image spec.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import re
import time

from .errors import InvalidReference, InvalidTime

# The docker reference grammar, without digests: [host[:port]/]component(/component)*[:tag]
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
_HOST = r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::[0-9]+)?/)"
# A first part is a registry host when it looks like one (a dot, a port, or localhost),
# as docker reads it: localhost:5000/app, registry.example/app, but team/app is a name.
_NAME_RE = re.compile(rf"^(?:(?=[^/]*[.:]|localhost/){_HOST})?{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")

OCI_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le",
            "s390x": "s390x", "riscv64": "riscv64", "i686": "386"}


def parse_reference(ref: str) -> str:
    """Validate ``name[:tag]`` and return it as ``name:tag`` (``latest`` by default)."""
    name, tag = ref, "latest"
    slash = ref.rfind("/")
    colon = ref.rfind(":")
    if colon > slash:
        name, tag = ref[:colon], ref[colon + 1:]
    if len(name) > 255 or not _NAME_RE.match(name) or not _TAG_RE.match(tag):
        raise InvalidReference(f"invalid reference {ref!r}: expected NAME[:TAG] "
                               "(lowercase name components, tag of [A-Za-z0-9_.-])")
    # Docker Hub names in their short form, as docker shows them: archives written by
    # skopeo and podman spell them out (docker.io/library/busybox), users do not.
    for hub in ("docker.io/library/", "docker.io/"):
        if name.startswith(hub) and (hub == "docker.io/" or "/" not in name[len(hub):]):
            name = name[len(hub):]
            break
    return f"{name}:{tag}"


def now_ns() -> int:
    """The creation time: SOURCE_DATE_EPOCH when set (reproducible builds), else the clock."""
    epoch = _source_date_epoch()
    return epoch if epoch is not None else time.time_ns()


def fixed_ns() -> int:
    """A creation time that does not come from the clock: SOURCE_DATE_EPOCH, else 1970.

    Imports use it, so the same tar on the same parent gives the same config, hence
    the same image id, wherever and whenever it is imported.
    """
    epoch = _source_date_epoch()
    return epoch if epoch is not None else 0


def _source_date_epoch() -> int | None:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch:
        try:
            return int(epoch) * 1_000_000_000
        except ValueError:
            pass
    return None


def parse_time(value: str) -> int:
    """``now``, ``@SECONDS`` or an RFC 3339 time (``2024-01-31T12:00:00Z``) -> ns."""
    if value == "now":
        return time.time_ns()
    try:
        if value.startswith("@"):
            return int(value[1:]) * 1_000_000_000
        text = value.strip().replace("z", "Z")
        frac = 0
        m = re.match(r"^(.*T\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$", text)
        if not m:
            raise ValueError(value)
        head, fraction, zone = m.groups()
        if fraction:
            frac = int((fraction[1:] + "000000000")[:9])
        dt = datetime.datetime.fromisoformat(head + ("+00:00" if zone == "Z" else zone))
        return int(dt.timestamp()) * 1_000_000_000 + frac
    except ValueError:
        raise InvalidTime(f"invalid time {value!r}: expected now, @SECONDS or RFC 3339 "
                          "(2024-01-31T12:00:00Z)") from None


def config_created_ns(config: bytes) -> int | None:
    """The ``created`` time of an image config, or None when it has none (or a bad one)."""
    try:
        created = json.loads(config).get("created")
        return parse_time(created) if isinstance(created, str) and created != "now" else None
    except (ValueError, AttributeError, InvalidTime):
        return None


def rfc3339(ns: int) -> str:
    dt = datetime.datetime.fromtimestamp(ns // 1_000_000_000, datetime.timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def new_config(parent: bytes | dict | None, diff_id: str | None, created_ns: int, history: dict) -> bytes:
    """The OCI config of ``parent`` (or a fresh one) with one more layer (none if
    ``diff_id`` is None: a change of the config only) and history entry."""
    if isinstance(parent, dict):
        config = json.loads(json.dumps(parent))
    elif parent:
        config = json.loads(parent)
    else:
        config = {"architecture": OCI_ARCH.get(platform.machine(), platform.machine()),
                  "os": "linux", "config": {}, "rootfs": {"type": "layers", "diff_ids": []},
                  "history": []}
    created = rfc3339(created_ns)
    config["created"] = created
    diff_ids = config.setdefault("rootfs", {"type": "layers", "diff_ids": []})["diff_ids"]
    if diff_id is not None:
        diff_ids.append(diff_id)
    config.setdefault("history", []).append({"created": created, **history})
    return canonical_json(config)


def canonical_json(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()
