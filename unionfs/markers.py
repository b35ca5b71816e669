"""How an upper layer records what the union hides, renames and copies lazily.

Two formats, one interface, so that the union view states the semantics once:

- :class:`OciMarkers`, the store's containers (``store/upper.py`` turns it into a layer
  at commit): ``.wh.NAME`` hides NAME, ``.wh..wh..opq`` hides a whole lower directory,
  and two private xattrs where OCI has no word: ``user.layerfs.metacopy`` = the lower
  path whose data a sparse upper file still shows, ``user.layerfs.redirect`` = the lower
  path a renamed directory merges.
- :class:`OverlayMarkers`, fuse-layerfs: the kernel overlayfs's own format, so that the
  kernel, fuse-overlayfs and containers/storage read the upper (and so does fuse-layerfs
  when an old upper becomes a lower layer). Whiteouts are character devices 0/0, an
  opaque directory carries ``<prefix>opaque=y``, a renamed directory ``<prefix>redirect``
  (an absolute path from the layer root, or a bare name when renamed within its
  parent), and with ``metacopy=on`` a file whose data is still below carries an empty
  ``<prefix>metacopy`` (plus a redirect once it is renamed). The prefix is
  ``trusted.overlay.``, or ``user.overlay.`` under ``userxattr``.

Both read the other's whiteouts and opaque markers as fuse-overlayfs does. Directory
entries are addressed as (descriptor of the parent directory, name), so a marker is
never looked up through a symlink.
"""

from __future__ import annotations

import errno
import os
import stat

from layerfs.store.upper import METACOPY, OPQ, PRIVATE_PREFIX, REDIRECT, WH

from .realdir import xattr_at

OVERLAY_PREFIXES = ("trusted.overlay.", "user.overlay.")


def is_whiteout_st(st: os.stat_result) -> bool:
    """An overlayfs whiteout: a character device 0/0."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def checked_lower_path(value: str, where: str) -> str:
    """A lower path read from a marker, refused (EIO) if it could leave the layers."""
    names = value.split("/")
    if not value or "\0" in value or any(n in ("", ".", "..") for n in names):
        raise OSError(errno.EIO, f"invalid redirect or metacopy origin {value!r}", where)
    return value


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def _exists_at(dirfd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False


class OciMarkers:
    """The store's upper format: OCI whiteouts plus layerfs's private xattrs."""

    hidden_xattrs: tuple[str, ...] = (PRIVATE_PREFIX, *OVERLAY_PREFIXES)
    metacopy = True  # chmod, chown, utimens, setxattr and renames of lower files copy no data

    def whited_out(self, dirfd: int, name: str) -> bool:
        """``name`` is absent from the upper directory: does a marker hide it below?"""
        return len(name) <= 251 and _exists_at(dirfd, WH + name)

    def opaque(self, dirfd: int) -> bool:
        """The directory hides every lower entry of the same name."""
        return _exists_at(dirfd, OPQ)

    def redirect(self, dirfd: int, name: str, parent_lower: str | None) -> str | None:
        """The lower path a renamed directory merges, or None."""
        value = xattr_at(dirfd, name, REDIRECT)
        return None if value is None else checked_lower_path(value, name)

    def metacopy_origin(self, dirfd: int, name: str, natural: str | None) -> str | None:
        """For a metacopy file, the lower path of its data (``natural``: the lower path at
        its own place); None for a file with all its data."""
        value = xattr_at(dirfd, name, METACOPY)
        return None if value is None else checked_lower_path(value, name)

    def write_whiteout(self, dirfd: int, name: str) -> None:
        if len(WH + name) > 255 and len((WH + name).encode("utf-8", "surrogateescape")) > 255:
            # ".wh." + a name of 252-255 bytes cannot exist: the overlay form then, which
            # commit reads as well (and writes as an OCI whiteout in the layer's tar).
            os.mknod(name, stat.S_IFCHR | 0o600, 0, dir_fd=dirfd)
            return
        os.close(os.open(WH + name, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600, dir_fd=dirfd))

    def write_opaque(self, dirfd: int) -> None:
        os.close(os.open(OPQ, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600, dir_fd=dirfd))

    def write_redirect(self, dirfd: int, name: str, lower_path: str, parent_lower: str | None) -> None:
        os.setxattr(f"/proc/self/fd/{dirfd}/{name}", REDIRECT,
                    lower_path.encode("utf-8", "surrogateescape"), follow_symlinks=False)

    def write_metacopy(self, fd: int, origin: str) -> None:
        """Mark a new sparse file (``fd``, not yet in place) as showing ``origin``'s data."""
        os.setxattr(fd, METACOPY, origin.encode("utf-8", "surrogateescape"))

    def moved_metacopy(self, dirfd: int, name: str, origin: str, parent_lower: str | None) -> None:
        """A metacopy file now sits at ``name``: the origin is recorded already."""

    def clear_metacopy(self, fd: int) -> None:
        """The file holds all of its data now (the marker goes last)."""
        os.removexattr(fd, METACOPY)


class OverlayMarkers(OciMarkers):
    """The kernel overlayfs's upper format (``prefix`` trusted.overlay. or user.overlay.)."""

    def __init__(self, prefix: str = "trusted.overlay.", metacopy: bool = False) -> None:
        self.prefix = prefix
        self.metacopy = metacopy  # off by default, as the kernel and fuse-overlayfs
        self._opaque = prefix + "opaque"
        self._redirect = prefix + "redirect"
        self._metacopy = prefix + "metacopy"

    def opaque(self, dirfd: int) -> bool:
        # fuse-overlayfs writes .wh..wh..opq beside the xattr; read both.
        return xattr_at(dirfd, "", self._opaque) == "y" or _exists_at(dirfd, OPQ)

    def redirect(self, dirfd: int, name: str, parent_lower: str | None) -> str | None:
        value = xattr_at(dirfd, name, self._redirect)
        return None if value is None else self._lower_of(value, name, parent_lower)

    def _lower_of(self, value: str, name: str, parent_lower: str | None) -> str | None:
        if value.startswith("/"):
            return checked_lower_path(value[1:], name)
        if "/" in value:
            raise OSError(errno.EIO, f"invalid redirect {value!r}", name)
        if parent_lower is None:
            return None  # relative to a parent that merges nothing: nothing below
        return checked_lower_path(_join(parent_lower, value), name)

    def metacopy_origin(self, dirfd: int, name: str, natural: str | None) -> str | None:
        if xattr_at(dirfd, name, self._metacopy) is None:
            return None
        value = xattr_at(dirfd, name, self._redirect)
        parent_lower = natural.rpartition("/")[0] if natural is not None else None
        origin = natural if value is None else self._lower_of(value, name, parent_lower)
        if origin is None:
            raise OSError(errno.EIO, "a metacopy file with no lower data", name)
        return origin

    def write_whiteout(self, dirfd: int, name: str) -> None:
        try:
            os.mknod(name, stat.S_IFCHR | 0o600, 0, dir_fd=dirfd)
        except PermissionError:
            super().write_whiteout(dirfd, name)  # no right to make devices: as fuse-overlayfs

    def write_opaque(self, dirfd: int) -> None:
        try:
            os.setxattr(f"/proc/self/fd/{dirfd}", self._opaque, b"y")
        except PermissionError:
            super().write_opaque(dirfd)  # trusted.* needs CAP_SYS_ADMIN: as fuse-overlayfs

    def write_redirect(self, dirfd: int, name: str, lower_path: str, parent_lower: str | None) -> None:
        # As the kernel writes it: a bare name when the directory stays in its lower
        # parent, else the absolute path from the layer root.
        if self.prefix.startswith("user."):
            # A kernel mounted with userxattr never follows redirects: renaming a lower
            # directory gives EXDEV there, and so it does here (mv copies instead).
            raise OSError(errno.EXDEV, "directory renames are not recorded under userxattr")
        parent, _, base = lower_path.rpartition("/")
        value = base if parent_lower is not None and parent == parent_lower else "/" + lower_path
        try:
            os.setxattr(f"/proc/self/fd/{dirfd}/{name}", self._redirect,
                        value.encode("utf-8", "surrogateescape"), follow_symlinks=False)
        except PermissionError:
            raise OSError(errno.EXDEV, "cannot record a directory rename here") from None

    def write_metacopy(self, fd: int, origin: str) -> None:
        os.setxattr(fd, self._metacopy, b"")  # empty: no fs-verity digest, as the kernel writes it

    def moved_metacopy(self, dirfd: int, name: str, origin: str, parent_lower: str | None) -> None:
        self.write_redirect(dirfd, name, origin, parent_lower)

    def clear_metacopy(self, fd: int) -> None:
        os.removexattr(fd, self._metacopy)
        try:
            os.removexattr(fd, self._redirect)
        except OSError:
            pass
