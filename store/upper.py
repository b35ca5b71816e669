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

import os
import stat
from dataclasses import dataclass

from .builder import LayerBuilder
from .dirimport import Files, add_file, make_entry, primary_first, tree_entry
from .errors import StoreCorrupt
from .fstree import Tree
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
    """One line of ``layerfs diff``: A added, C changed, D deleted; ``left_out`` says why
    a commit cannot carry it (a socket), "" when it can."""

    kind: str
    path: str
    left_out: str = ""


def left_out(st: os.stat_result) -> str:
    """Why a file of this type cannot go into a layer (a tar holds no sockets), or ""."""
    if stat.S_ISSOCK(st.st_mode):
        return "a socket"
    known = (stat.S_ISREG, stat.S_ISDIR, stat.S_ISLNK, stat.S_ISCHR, stat.S_ISBLK, stat.S_ISFIFO)
    return "" if any(is_type(st.st_mode) for is_type in known) else "an unknown file type"


class UpperReader:
    """Reads an upper directory against the image's merged tree below it.

    The upper is read through directory fds (store.fstree): a container may have made it
    deeper than a host path can name, and nothing in it is followed out of it. The walks
    keep their own stacks, so depth is bounded by path length, not by Python's recursion
    limit. Use as a context manager (it holds the upper open).
    """

    def __init__(self, upper: str, lower: MergedTree) -> None:
        self.upper = upper
        self.lower = lower
        if not stat.S_ISDIR(os.lstat(upper).st_mode):
            raise_damaged(upper, "the upper layer is not a directory")
        self.tree = Tree(upper)
        self._copied_groups: dict[str, str] = {}  # lower hard-link group -> its first new path
        self.left_out: list[tuple[str, str]] = []  # (path, why): what layer() could not carry

    def close(self) -> None:
        self.tree.close()

    def __enter__(self) -> "UpperReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _lower(self, path: str | None) -> Entry | None:
        return self.lower.lookup(path) if path is not None else None

    def _xattr_text(self, rel: str, name: str, xattrs: dict[str, bytes] | None = None) -> str | None:
        """An xattr's value as text, from ``xattrs`` (all of the file's, read already)
        when given."""
        value = self.tree.xattr(rel, name) if xattrs is None else xattrs.get(name)
        return value.decode("utf-8", "surrogateescape") if value is not None else None

    def _is_opaque(self, rel: str) -> bool:
        if self.tree.lexists(_join(rel, OPQ)):
            return True
        return any(self.tree.xattr(rel, n) == b"y" for n in OVERLAY_OPAQUE)

    def _dir_redirect(self, rel: str, parent_lower: str | None,
                      xattrs: dict[str, bytes] | None = None) -> str | None:
        """The lower path a renamed directory merges (either format), or None."""
        value = self._xattr_text(rel, REDIRECT, xattrs)
        if value is not None:
            return value
        value = self._xattr_text(rel, KERNEL_REDIRECT, xattrs)
        return None if value is None else kernel_redirect(self.tree.where(rel), value, parent_lower)

    def _metacopy_origin(self, rel: str, parent_lower: str | None,
                         xattrs: dict[str, bytes]) -> str | None:
        """For a file whose data is still below, the lower path of that data; else None."""
        origin = self._xattr_text(rel, METACOPY, xattrs)
        if origin is not None or self._xattr_text(rel, KERNEL_METACOPY, xattrs) is None:
            return origin
        value = self._xattr_text(rel, KERNEL_REDIRECT, xattrs)
        if value is not None:
            origin = kernel_redirect(self.tree.where(rel), value, parent_lower)
        elif parent_lower is not None:
            origin = _join(parent_lower, rel.rpartition("/")[2])
        if origin is None:
            raise_damaged(self.tree.where(rel), "a metacopy file with no lower file below it")
        return origin

    def _listing(self, rel: str) -> tuple[list[str], set[str]]:
        """(names of real entries, names whited out) of an upper directory."""
        names, whiteouts = [], set()
        for name, plain in self.tree.listdir_typed(rel):
            child = _join(rel, name)
            if name.startswith(WH):
                st = self.tree.lstat(child)
                if not stat.S_ISREG(st.st_mode) or st.st_size:
                    raise_damaged(self.tree.where(child), "a whiteout that is not an empty file")
                if name != OPQ and not name.startswith(WH + WH):
                    whiteouts.add(name[len(WH):])
                continue
            if not plain and is_whiteout_st(self.tree.lstat(child)):
                whiteouts.add(name)
                continue
            names.append(name)
        for name in whiteouts.intersection(names):
            raise_damaged(self.tree.where(_join(rel, WH + name)), f"a whiteout beside {name!r} itself")
        return names, whiteouts

    # -- the layer --------------------------------------------------------------------

    def layer(self) -> tuple[dict[str, Entry], Files]:
        """The new layer's entries, and for each file whose data is new its path in the
        upper and lstat (read with ``self.tree``)."""
        builder = LayerBuilder()
        files: Files = {}
        first_name: dict[tuple[int, int], str] = {}
        root = _public(tree_entry(self.tree, "")[1])
        below = self.lower.lookup("")
        if below is None or (root.mode, root.uid, root.gid) != (below.mode, below.uid, below.gid):
            builder.add("", root._replace(flags=0))  # chmod/chown of "/"
        opaque_root = self._is_opaque("")
        if opaque_root:
            builder.opaque("")
        # (upper directory, where its lower contents are (None: hidden), written out in
        # full?) A renamed lower directory is written out in full, so lower children the
        # upper does not change are copied into the layer as entries.
        todo: list[tuple[str, str | None, bool]] = [("", None if opaque_root else "", False)]
        while todo:
            self._walk_dir(builder, files, first_name, todo, *todo.pop())
        return primary_first(builder.finish(canonical=True), files)

    def _walk_dir(self, builder: LayerBuilder, files: Files, first_name: dict, todo: list,
                  rel: str, lower_path: str | None, explicit: bool) -> None:
        """Record the upper directory ``rel``; its subdirectories go on ``todo``."""
        names, whiteouts = self._listing(rel)
        for name in sorted(whiteouts):
            if not explicit and self._lower(_join(lower_path, name) if lower_path is not None else None):
                builder.whiteout(_join(rel, name))
        if explicit and lower_path is not None:
            present = set(names) | whiteouts
            for name, e in self.lower.listdir(lower_path):
                if name not in present:
                    self._copy_lower(builder, _join(rel, name), _join(lower_path, name), e)
        for name in names:
            path = _join(rel, name)
            # The xattrs are read once: the entry's and the private ones asked below.
            st, xattrs = self.tree.lstat(path), self.tree.xattrs(path)
            e = make_entry(st, xattrs, lambda: self.tree.readlink(path))
            child_lower = _join(lower_path, name) if lower_path is not None else None
            if e is None:
                self.left_out.append(("/" + path, left_out(st)))
                # The container saw no lower file here: neither may the new image.
                if not explicit and self._lower(child_lower) is not None:
                    builder.whiteout(path)
                continue
            e = _public(e)
            if e.kind == Kind.DIR:
                redirect = self._dir_redirect(path, lower_path, xattrs)
                if redirect is not None:
                    builder.add(path, e._replace(flags=OPAQUE))
                    todo.append((path, redirect, True))
                elif self._is_opaque(path):
                    builder.add(path, e._replace(flags=OPAQUE))
                    todo.append((path, None, False))
                else:
                    below = self._lower(child_lower)
                    if below is None or below.kind != Kind.DIR:
                        child_lower = None
                    builder.add(path, e)
                    todo.append((path, child_lower, explicit))
            else:
                origin = self._metacopy_origin(path, lower_path, xattrs) if e.kind == Kind.REG else None
                if origin is not None:
                    data = self.lower.lookup(origin)
                    if data is None or data.kind != Kind.REG:
                        raise_damaged(self.tree.where(path), "its metacopy xattr names no lower file")
                    builder.add(path, e._replace(size=data.size, blob=data.blob))
                    continue
                add_file(builder, files, first_name, path, st, e)

    def _copy_lower(self, builder: LayerBuilder, path: str, lower_path: str, e: Entry) -> None:
        """Copy a lower entry (and a directory's subtree) into the layer at ``path``;
        names of one lower file copied together stay hard links of each other."""
        todo = [(path, lower_path, e)]
        while todo:
            path, lower_path, e = todo.pop()
            if e.hardlink:
                first = self._copied_groups.get(e.hardlink)
                if first is not None:
                    builder.hardlink(path, first, path)
                    continue
                self._copied_groups[e.hardlink] = path
                builder.add(path, e._replace(hardlink=path, nlink=1, flags=0))
                continue
            builder.add(path, e._replace(nlink=1, flags=0))
            if e.kind == Kind.DIR:
                todo += [(_join(path, name), _join(lower_path, name), child)
                         for name, child in self.lower.listdir(lower_path)]

    # -- the diff ----------------------------------------------------------------------

    def changes(self) -> list[Change]:
        """What changed, as docker diff shows it, sorted by path.

        Each path of the new tree is compared with the same path of the image: present in
        both is C, only now is A, only before is D (once, for a removed directory).
        """
        out: list[Change] = []
        todo: list[tuple[str, str | None]] = [("", None if self._is_opaque("") else "")]
        while todo:
            self._diff_dir(out, todo, *todo.pop())
        return sorted(out, key=lambda c: c.path)

    def _before(self, path: str) -> Entry | None:
        return self.lower.lookup(path)

    def _names_before(self, path: str) -> set[str]:
        e = self._before(path)
        return {n for n, _ in self.lower.listdir(path)} if e is not None and e.kind == Kind.DIR else set()

    def _diff_dir(self, out: list[Change], todo: list, rel: str, source: str | None) -> None:
        """Changes in the upper directory ``rel``, whose lower contents (if any) come
        from ``source``; its subdirectories go on ``todo``."""
        names, whiteouts = self._listing(rel)
        from_lower = set()
        if source is not None:
            from_lower = {n for n, _ in self.lower.listdir(source)} - whiteouts - set(names)
        for name in sorted(self._names_before(rel) - set(names) - from_lower):
            out.append(Change("D", "/" + _join(rel, name)))
        if source is not None and source != rel:  # contents moved here with a renamed dir
            for name in sorted(from_lower):
                self._diff_moved(out, _join(source, name), _join(rel, name))
        for name in names:
            path = _join(rel, name)
            st = self.tree.lstat(path)
            out.append(Change("C" if self._before(path) is not None else "A", "/" + path, left_out(st)))
            if stat.S_ISDIR(st.st_mode):
                redirect = self._dir_redirect(path, source)
                if redirect is not None:
                    child_source = redirect
                elif self._is_opaque(path):
                    child_source = None
                else:
                    below = self.lower.lookup(_join(source, name)) if source is not None else None
                    child_source = _join(source, name) if below is not None and below.kind == Kind.DIR else None
                todo.append((path, child_source))

    def _diff_moved(self, out: list[Change], source: str, path: str) -> None:
        """A lower entry shown at a new path (inside a renamed directory)."""
        todo = [(source, path)]
        while todo:
            source, path = todo.pop()
            out.append(Change("C" if self._before(path) is not None else "A", "/" + path))
            e = self.lower.lookup(source)
            if e is not None and e.kind == Kind.DIR:
                now = {n for n, _ in self.lower.listdir(source)}
                for name in sorted(self._names_before(path) - now):
                    out.append(Change("D", "/" + _join(path, name)))
                todo += [(_join(source, name), _join(path, name)) for name in sorted(now)]


def _public(e: Entry) -> Entry:
    """The entry without layerfs's private xattrs."""
    if any(n.startswith(PRIVATE_PREFIX) for n, _ in e.xattrs):
        return e._replace(xattrs=tuple((n, v) for n, v in e.xattrs if not n.startswith(PRIVATE_PREFIX)))
    return e


def raise_damaged(path: str, why: str) -> None:
    raise StoreCorrupt(f"the container's upper layer is damaged at {path}: {why}")
