"""A container's upper directory: its format, and the layer and diff it stands for.

The union view writes the upper in the OCI whiteout format (``.wh.NAME`` hides a lower
name, ``.wh..wh..opq`` hides a whole lower directory) plus two private xattrs where OCI
has no word: ``user.layerfs.metacopy`` (a file whose metadata changed but whose data is
still the lower file at the path it names) and ``user.layerfs.redirect`` (a directory
renamed from the lower directory it names). Overlayfs's own format, which the kernel
backend's uppers are in, is read too: char-device 0/0 whiteouts, the opaque xattr,
``trusted.overlay.redirect`` on a renamed directory (an absolute path from the layer
root, or a bare name in the parent's lower directory), and ``trusted.overlay.metacopy``
on a file whose data is still the lower file at its redirect, or else at its own place
(its ``origin`` is a file handle of that same file).

Turning the upper into a layer walks the upper only, never the whole lower tree: a
metacopy file reuses the lower blob (its data is neither read for the blob nor copied),
and only a renamed lower directory, which OCI cannot express, is written out in full
under its new name as an opaque directory, again with the lower blobs reused.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from dataclasses import dataclass

from .builder import LayerBuilder
from .dirimport import add_file, entry_of, primary_first
from .errors import StoreCorrupt
from .merged import MergedTree
from .records import OPAQUE, Entry, Kind
from .tarformat import OPAQUE_MARKER, WHITEOUT_PREFIX

WH = WHITEOUT_PREFIX
OPQ = OPAQUE_MARKER
PRIVATE_PREFIX = "user.layerfs."
METACOPY = "user.layerfs.metacopy"
REDIRECT = "user.layerfs.redirect"
OVERLAY_OPAQUE = ("trusted.overlay.opaque", "user.overlay.opaque")
KERNEL_REDIRECT = "trusted.overlay.redirect"
KERNEL_METACOPY = "trusted.overlay.metacopy"


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


def kernel_redirect(full: str, value: str, parent_lower: str | None) -> str | None:
    """The lower path an overlayfs redirect names: absolute from the layer root, or a
    name in the parent's lower directory (None where the parent merges nothing)."""
    if value.startswith("/"):
        path = value[1:]
    elif "/" in value:
        raise_damaged(full, f"its redirect {value!r} is neither absolute nor a name")
    elif parent_lower is None:
        return None
    else:
        path = _join(parent_lower, value)
    if any(part in ("", ".", "..") for part in path.split("/")):
        raise_damaged(full, f"its redirect {value!r} could leave the layers")
    return path


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
        self._copied_groups: dict[str, str] = {}  # lower hard-link group -> its first new path

    def _lower(self, path: str | None) -> Entry | None:
        return self.lower.lookup(path) if path is not None else None

    def _dir_redirect(self, full: str, parent_lower: str | None) -> str | None:
        """The lower path a renamed directory merges (either format), or None."""
        value = xattr_text(full, REDIRECT)
        if value is not None:
            return value
        value = xattr_text(full, KERNEL_REDIRECT)
        return None if value is None else kernel_redirect(full, value, parent_lower)

    def _metacopy_origin(self, full: str, name: str, parent_lower: str | None) -> str | None:
        """For a file whose data is still below, the lower path of that data; else None."""
        origin = xattr_text(full, METACOPY)
        if origin is not None or xattr_text(full, KERNEL_METACOPY) is None:
            return origin
        value = xattr_text(full, KERNEL_REDIRECT)
        if value is not None:
            origin = kernel_redirect(full, value, parent_lower)
        elif parent_lower is not None:
            origin = _join(parent_lower, name)
        if origin is None:
            raise_damaged(full, "a metacopy file with no lower file below it")
        return origin

    def _listing(self, real: str) -> tuple[list[str], set[str]]:
        """(names of real entries, names whited out) of an upper directory."""
        names, whiteouts = [], set()
        for name in sorted(os.listdir(real)):
            if name.startswith(WH):
                st = os.lstat(os.path.join(real, name))
                if not stat.S_ISREG(st.st_mode) or st.st_size:
                    raise_damaged(os.path.join(real, name), "a whiteout that is not an empty file")
                if name != OPQ and not name.startswith(WH + WH):
                    whiteouts.add(name[len(WH):])
                continue
            if is_whiteout_st(os.lstat(os.path.join(real, name))):
                whiteouts.add(name)
                continue
            names.append(name)
        for name in whiteouts.intersection(names):
            raise_damaged(os.path.join(real, WH + name), f"a whiteout beside {name!r} itself")
        return names, whiteouts

    # -- the layer --------------------------------------------------------------------

    def layer(self) -> tuple[dict[str, Entry], dict[str, str]]:
        """The new layer's entries, and the disk path of each file whose data is new."""
        builder = LayerBuilder()
        files: dict[str, str] = {}
        first_name: dict[tuple[int, int], str] = {}
        if not stat.S_ISDIR(os.lstat(self.upper).st_mode):
            raise_damaged(self.upper, "the upper layer is not a directory")
        root = _public(entry_of(self.upper, os.lstat(self.upper)))
        below = self.lower.lookup("")
        if below is None or (root.mode, root.uid, root.gid) != (below.mode, below.uid, below.gid):
            builder.add("", dataclasses.replace(root, flags=0))  # chmod/chown of "/"
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
                redirect = self._dir_redirect(full, lower_path)
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
                origin = self._metacopy_origin(full, name, lower_path)
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
        """Copy a lower entry (and a directory's subtree) into the layer at ``path``;
        names of one lower file copied together stay hard links of each other."""
        if e.hardlink:
            first = self._copied_groups.get(e.hardlink)
            if first is not None:
                builder.hardlink(path, first, path)
                return
            self._copied_groups[e.hardlink] = path
            builder.add(path, dataclasses.replace(e, hardlink=path, nlink=1, flags=0))
            return
        builder.add(path, dataclasses.replace(e, nlink=1, flags=0))
        if e.kind == Kind.DIR:
            for name, child in self.lower.listdir(lower_path):
                self._copy_lower(builder, _join(path, name), _join(lower_path, name), child)

    # -- the diff ----------------------------------------------------------------------

    def changes(self) -> list[Change]:
        """What changed, as docker diff shows it, sorted by path.

        Each path of the new tree is compared with the same path of the image: present in
        both is C, only now is A, only before is D (once, for a removed directory).
        """
        out: list[Change] = []
        self._diff(out, self.upper, "", None if is_opaque_dir(self.upper) else "")
        return sorted(out, key=lambda c: c.path)

    def _before(self, path: str) -> Entry | None:
        return self.lower.lookup(path)

    def _names_before(self, path: str) -> set[str]:
        e = self._before(path)
        return {n for n, _ in self.lower.listdir(path)} if e is not None and e.kind == Kind.DIR else set()

    def _diff(self, out: list[Change], real: str, rel: str, source: str | None) -> None:
        """Changes under the upper directory ``real`` at union path ``rel``, whose lower
        contents (if any) come from ``source``."""
        names, whiteouts = self._listing(real)
        from_lower = set()
        if source is not None:
            from_lower = {n for n, _ in self.lower.listdir(source)} - whiteouts - set(names)
        for name in sorted(self._names_before(rel) - set(names) - from_lower):
            out.append(Change("D", "/" + _join(rel, name)))
        if source is not None and source != rel:  # contents moved here with a renamed dir
            for name in sorted(from_lower):
                self._diff_moved(out, _join(source, name), _join(rel, name))
        for name in names:
            full = os.path.join(real, name)
            path = _join(rel, name)
            out.append(Change("C" if self._before(path) is not None else "A", "/" + path))
            if stat.S_ISDIR(os.lstat(full).st_mode):
                redirect = self._dir_redirect(full, source)
                if redirect is not None:
                    child_source = redirect
                elif is_opaque_dir(full):
                    child_source = None
                else:
                    below = self.lower.lookup(_join(source, name)) if source is not None else None
                    child_source = _join(source, name) if below is not None and below.kind == Kind.DIR else None
                self._diff(out, full, path, child_source)

    def _diff_moved(self, out: list[Change], source: str, path: str) -> None:
        """A lower entry shown at a new path (inside a renamed directory)."""
        out.append(Change("C" if self._before(path) is not None else "A", "/" + path))
        e = self.lower.lookup(source)
        if e is not None and e.kind == Kind.DIR:
            now = {n for n, _ in self.lower.listdir(source)}
            for name in sorted(self._names_before(path) - now):
                out.append(Change("D", "/" + _join(path, name)))
            for name in sorted(now):
                self._diff_moved(out, _join(source, name), _join(path, name))


def _public(e: Entry) -> Entry:
    """The entry without layerfs's private xattrs."""
    if any(n.startswith(PRIVATE_PREFIX) for n, _ in e.xattrs):
        return dataclasses.replace(e, xattrs=tuple((n, v) for n, v in e.xattrs
                                                   if not n.startswith(PRIVATE_PREFIX)))
    return e


def raise_damaged(path: str, why: str) -> None:
    raise StoreCorrupt(f"the container's upper layer is damaged at {path}: {why}")
