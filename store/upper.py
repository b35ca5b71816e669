"""A container's upper directory: its format, and the layer and diff it stands for.

The union view writes the upper in the OCI whiteout format (``.wh.NAME`` hides a lower
name, ``.wh..wh..opq`` hides a whole lower directory) plus two private xattrs where OCI
has no word: ``user.layerfs.metacopy`` (a file whose metadata changed but whose data is
still the lower file at the path it names) and ``user.layerfs.redirect`` (a directory
renamed from the lower directory it names). Overlayfs's own markers (char-device 0/0
whiteouts, the opaque xattr) are read too.

Turning the upper into a layer walks the upper only, never the whole lower tree: a
metacopy file reuses the lower blob (its data is neither read for the blob nor copied),
and only a renamed lower directory, which OCI cannot express, is written out in full
under its new name as an opaque directory, again with the lower blobs reused.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from .builder import LayerBuilder
from .dirimport import add_file, entry_of, primary_first, read_xattrs
from .merged import MergedTree
from .records import OPAQUE, Entry, Kind

WH = ".wh."
OPQ = ".wh..wh..opq"
PRIVATE_PREFIX = "user.layerfs."
METACOPY = "user.layerfs.metacopy"
REDIRECT = "user.layerfs.redirect"
OVERLAY_OPAQUE = ("trusted.overlay.opaque", "user.overlay.opaque")


def xattr_text(path: str, name: str) -> str | None:
    """A private xattr's value as text, or None."""
    try:
        return os.getxattr(path, name, follow_symlinks=False).decode("utf-8", "surrogateescape")
    except OSError:
        return None


def is_opaque_dir(path: str) -> bool:
    if os.path.lexists(os.path.join(path, OPQ)):
        return True
    return any(xattr_text(path, n) == "y" for n in OVERLAY_OPAQUE)


def is_whiteout_st(st: os.stat_result) -> bool:
    """An overlayfs whiteout: a character device 0/0."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


@dataclass(slots=True, frozen=True)
class Change:
    """One line of ``layerfs diff``: A added, C changed, D deleted."""

    kind: str
    path: str


class UpperReader:
    """Reads an upper directory against the image's merged tree below it."""

    def __init__(self, upper: str, lower: MergedTree) -> None:
        self.upper = upper
        self.lower = lower

    def _lower(self, path: str | None) -> Entry | None:
        return self.lower.lookup(path) if path is not None else None

    def _listing(self, real: str) -> tuple[list[str], set[str]]:
        """(names of real entries, names whited out) of an upper directory."""
        names, whiteouts = [], set()
        for name in sorted(os.listdir(real)):
            if name.startswith(WH):
                if name != OPQ and not name.startswith(WH + WH):
                    whiteouts.add(name[len(WH):])
                continue
            if is_whiteout_st(os.lstat(os.path.join(real, name))):
                whiteouts.add(name)
                continue
            names.append(name)
        return names, whiteouts

    # -- the layer --------------------------------------------------------------------

    def layer(self) -> tuple[dict[str, Entry], dict[str, str]]:
        """The new layer's entries, and the disk path of each file whose data is new."""
        builder = LayerBuilder()
        files: dict[str, str] = {}
        first_name: dict[tuple[int, int], str] = {}
        if is_opaque_dir(self.upper):
            builder.opaque("")
        root_lower = None if is_opaque_dir(self.upper) else ""
        self._walk(builder, files, first_name, self.upper, "", root_lower, explicit=False)
        return primary_first(builder.finish(canonical=True), files)

    def _walk(self, builder: LayerBuilder, files: dict[str, str], first_name: dict,
              real: str, rel: str, lower_path: str | None, explicit: bool) -> None:
        """Record the upper directory ``real`` (union path ``rel``).

        ``lower_path`` is where its lower contents are (None: hidden); ``explicit`` means
        the directory is written out in full (a renamed lower directory), so lower
        children the upper does not change are copied into the layer as entries.
        """
        names, whiteouts = self._listing(real)
        for name in sorted(whiteouts):
            if not explicit and self._lower(_join(lower_path, name) if lower_path is not None else None):
                builder.whiteout(_join(rel, name))
        if explicit and lower_path is not None:
            present = set(names) | whiteouts
            for name, e in self.lower.listdir(lower_path):
                if name not in present:
                    self._copy_lower(builder, _join(rel, name), _join(lower_path, name), e)
        for name in names:
            full = os.path.join(real, name)
            path = _join(rel, name)
            st = os.lstat(full)
            e = entry_of(full, st)
            if e is None:
                continue
            e = _public(e)
            child_lower = _join(lower_path, name) if lower_path is not None else None
            if e.kind == Kind.DIR:
                redirect = xattr_text(full, REDIRECT)
                opaque = is_opaque_dir(full)
                if redirect is not None:
                    builder.add(path, dataclasses.replace(e, flags=OPAQUE))
                    self._walk(builder, files, first_name, full, path, redirect, explicit=True)
                elif opaque:
                    builder.add(path, dataclasses.replace(e, flags=OPAQUE))
                    self._walk(builder, files, first_name, full, path, None, explicit=False)
                else:
                    below = self._lower(child_lower)
                    if below is None or below.kind != Kind.DIR:
                        child_lower = None
                    builder.add(path, e)
                    self._walk(builder, files, first_name, full, path, child_lower, explicit)
            elif e.kind == Kind.REG:
                origin = xattr_text(full, METACOPY)
                if origin is not None:
                    data = self.lower.lookup(origin)
                    if data is None or data.kind != Kind.REG:
                        raise_damaged(full, "its metacopy xattr names no lower file")
                    builder.add(path, dataclasses.replace(e, size=data.size, blob=data.blob))
                    continue
                add_file(builder, files, first_name, path, full, st, e)
            else:
                builder.add(path, e)

    def _copy_lower(self, builder: LayerBuilder, path: str, lower_path: str, e: Entry) -> None:
        """Copy a lower entry (and a directory's subtree) into the layer at ``path``."""
        builder.add(path, dataclasses.replace(e, hardlink="", nlink=1, flags=0))
        if e.kind == Kind.DIR:
            for name, child in self.lower.listdir(lower_path):
                self._copy_lower(builder, _join(path, name), _join(lower_path, name), child)

    # -- the diff ----------------------------------------------------------------------

    def changes(self) -> list[Change]:
        """What changed, as docker diff shows it, sorted by path."""
        out: list[Change] = []
        root_lower = None if is_opaque_dir(self.upper) else ""
        self._diff(out, self.upper, "", root_lower)
        return sorted(out, key=lambda c: c.path)

    def _diff(self, out: list[Change], real: str, rel: str, lower_path: str | None) -> None:
        names, whiteouts = self._listing(real)
        for name in whiteouts:
            if lower_path is not None and self._lower(_join(lower_path, name)) is not None:
                out.append(Change("D", "/" + _join(rel, name)))
        if lower_path is None and rel == "" and is_opaque_dir(real):
            for name, _ in self.lower.listdir(""):
                if name not in names:
                    out.append(Change("D", "/" + name))
        for name in names:
            full = os.path.join(real, name)
            path = _join(rel, name)
            below = self._lower(_join(lower_path, name)) if lower_path is not None else None
            st = os.lstat(full)
            is_dir = stat.S_ISDIR(st.st_mode)
            if is_dir and xattr_text(full, REDIRECT) is not None:
                out.append(Change("A", "/" + path))
                for sub in self._added_subtree(xattr_text(full, REDIRECT), path):
                    out.append(Change("A", "/" + sub))
                continue
            out.append(Change("C" if below is not None else "A", "/" + path))
            if is_dir:
                if is_opaque_dir(full):
                    if below is not None and below.kind == Kind.DIR:
                        kept = set(self._listing(full)[0])
                        for child, _ in self.lower.listdir(_join(lower_path, name)):
                            if child not in kept:
                                out.append(Change("D", "/" + _join(path, child)))
                    self._diff(out, full, path, None)
                else:
                    child_lower = _join(lower_path, name) if below is not None and below.kind == Kind.DIR else None
                    self._diff(out, full, path, child_lower)

    def _added_subtree(self, lower_path: str, path: str) -> Iterator[str]:
        for name, e in self.lower.listdir(lower_path):
            yield _join(path, name)
            if e.kind == Kind.DIR:
                yield from self._added_subtree(_join(lower_path, name), _join(path, name))


def _public(e: Entry) -> Entry:
    """The entry without layerfs's private xattrs."""
    if any(n.startswith(PRIVATE_PREFIX) for n, _ in e.xattrs):
        return dataclasses.replace(e, xattrs=tuple((n, v) for n, v in e.xattrs
                                                   if not n.startswith(PRIVATE_PREFIX)))
    return e


def raise_damaged(path: str, why: str) -> None:
    from .errors import StoreCorrupt
    raise StoreCorrupt(f"the container's upper layer is damaged at {path}: {why}")


__all__ = ["Change", "UpperReader", "WH", "OPQ", "METACOPY", "REDIRECT", "read_xattrs"]
