"""Commit a container's upper layer as a new layer and image; show its diff.

The new layer is written in the canonical form (so identical changes give the same
layer id) and recorded all or nothing; the image is the container's image plus that
layer, with the config changes and a history entry, as ``docker commit`` makes it.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable

from . import images as imagesmod
from .containers import Container
from .dirimport import canonical_layer
from .errors import StoreCorrupt, StoreError
from .progress import SILENT, Progress
from .records import ImageRecord, Source
from .store import Store
from .upper import Change, UpperReader

_CHANGE_KEYS = ("ENV", "CMD", "ENTRYPOINT", "WORKDIR", "USER", "LABEL", "EXPOSE")


def diff(store: Store, c: Container) -> list[Change]:
    """What the container changed: A added, C changed, D deleted, sorted by path."""
    image = store.resolve_image(c.image_id)
    try:
        with UpperReader(store.containers.upper(c), store.tree(image)) as reader:
            return reader.changes()
    except OSError as e:
        raise StoreCorrupt(f"cannot read the container's upper layer at {e.filename}: {e.strerror}") from None


def _command(value: str) -> list[str]:
    """CMD/ENTRYPOINT in exec form (a JSON list) or shell form, as a Dockerfile takes them."""
    value = value.strip()
    if value.startswith("["):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            raise StoreError(f"invalid JSON list {value!r}") from None
        if not isinstance(parsed, list) or not all(isinstance(x, str) for x in parsed):
            raise StoreError(f"{value!r} is not a list of strings")
        return parsed
    return ["/bin/sh", "-c", value]


def apply_change(config: dict, change: str) -> None:
    """Apply one ``--change`` instruction (ENV, CMD, ENTRYPOINT, WORKDIR, USER, LABEL, EXPOSE)."""
    key, _, value = change.strip().partition(" ")
    key = key.upper()
    if key not in _CHANGE_KEYS or not value.strip():
        raise StoreError(f"invalid change {change!r}: expected one of {', '.join(_CHANGE_KEYS)} with a value")
    cfg = config.setdefault("config", {})
    value = value.strip()
    if key == "ENV":
        name, sep, val = value.partition("=")
        if not sep:
            name, _, val = value.partition(" ")
        if not name.strip() or any(c in name for c in " \t"):
            raise StoreError(f"invalid change {change!r}: ENV needs a variable name")
        env = [e for e in cfg.get("Env", []) if e.split("=", 1)[0] != name]
        cfg["Env"] = env + [f"{name}={val}"]
    elif key in ("CMD", "ENTRYPOINT"):
        cfg["Cmd" if key == "CMD" else "Entrypoint"] = _command(value)
    elif key == "WORKDIR":
        cfg["WorkingDir"] = value
    elif key == "USER":
        cfg["User"] = value
    elif key == "LABEL":
        for item in shlex.split(value):
            k, sep, v = item.partition("=")
            if not sep or not k:
                raise StoreError(f"invalid LABEL {item!r}: expected key=value")
            cfg.setdefault("Labels", {})[k] = v
    elif key == "EXPOSE":
        for port in value.split():
            number, _, proto = port.partition("/")
            if not number.isdigit() or not 1 <= int(number) <= 65535 or proto not in ("", "tcp", "udp", "sctp"):
                raise StoreError(f"invalid change {change!r}: EXPOSE takes PORT[/tcp|udp|sctp]")
            cfg.setdefault("ExposedPorts", {})[f"{int(number)}/{proto or 'tcp'}"] = {}


def commit(store: Store, c: Container, tag: str | None = None, message: str = "",
           author: str = "", changes: tuple[str, ...] = (), *, config: dict | None = None,
           created_by: str = "layerfs commit",
           on_left_out: Callable[[str, str], None] | None = None,
           progress: Progress = SILENT) -> ImageRecord:
    """Record the container's changes as a new layer on its image; return the new image.

    ``config`` replaces the image's config as the starting point (a builder's, edited
    by earlier steps); ``created_by`` is the history entry's. If the container is
    mounted, the caller holds its writes while this runs. What a layer cannot hold
    (sockets) is left out, and ``on_left_out(path, why)`` hears of it.
    """
    tag = imagesmod.parse_reference(tag) if tag else None
    base = store.resolve_image(c.image_id)
    config = json.loads(base.config) if config is None else config
    for change in changes:
        apply_change(config, change)
    history = {"created_by": created_by}
    if message:
        history["comment"] = message
    if author:
        history["author"] = author
        config["author"] = author
    with store.blobs.ingest() as ingest:
        try:
            with UpperReader(store.containers.upper(c), store.tree(base)) as reader:
                progress.stage("scanning the changes")
                entries, files = reader.layer()
                for path, why in sorted(reader.left_out):
                    if on_left_out is not None:
                        on_left_out(path, why)
                pending = canonical_layer(ingest, store.blobs, entries, files, reader.tree,
                                          Source.COMMIT, f"commit of {c.name}", progress)
        except OSError as e:
            raise StoreCorrupt(f"cannot read the container's upper layer at {e.filename}: "
                               f"{e.strerror}") from None
        return store.record(ingest, pending, base, history, tag, config=config)
