"""The kernel backend: the kernel's overlayfs over a metadata image and the blob store.

A container is mounted as

    overlay  lowerdir=META::BLOBS,upperdir=UPPER,workdir=WORK,
             redirect_dir=on,metacopy=on,index=off,xino=on

META is the image's metadata image (store/metaimage.py), mounted from its EROFS file for
the moment the overlay is made and then detached (overlayfs keeps its own private clone
of every layer, so nothing else stays mounted); BLOBS, after ``::``, is the blob
directory as a data-only layer: never listed, only where META's metacopy files find
their bytes. The kernel looks a name up in one layer whatever the image's depth, and no
request crosses into Python.

The options and why:

- ``redirect_dir=on``: renaming a lower directory works (as on the fuse backend) and is
  recorded as a redirect that commit reads;
- ``metacopy=on``: META's files are metacopy files; chmod and chown of lower files copy
  no data (as on the fuse backend);
- ``index=off``: what docker and containers/storage use. With ``index=on`` a copied-up
  lower hard link shows its new data under names the upper does not hold, which commit
  would have to reconstruct, and a rebuilt META would refuse the upper (ESTALE). The cost:
  a write to one name of a lower hard-link group does not show under its other names (the
  kernel's default; the fuse backend keeps them one file).
- ``xino=on``: META, the blobs and the upper are on different filesystems; xino gives
  every file one st_dev and a unique, copy-up-stable st_ino.

The mount's source is ``layerfs:<container id>``, which is how ``mounted`` knows it. The
upper is in the kernel's own format (the container record says so), which diff and
commit read (store/upper.py) and the fuse backend reads and writes too.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
from typing import TYPE_CHECKING

from layerfs.store import Store, StoreError
from layerfs.store.blobs import syncfs
from layerfs.store.containers import Container

if TYPE_CHECKING:  # imported where used: a fuse mount never needs it
    from layerfs.store.metaimage import MetaImage

BACKENDS = ("fuse", "kernel", "auto")
MIN_KERNEL = (6, 5)  # data-only lower layers ("::")
FILE_EROFS_KERNEL = (6, 12)  # EROFS mounted straight from an image file, no loop device

_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_NOATIME, _MS_NODIRATIME, _MS_RELATIME, _MS_STRICTATIME = 1 << 10, 1 << 11, 1 << 21, 1 << 24
_MNT_DETACH = 2
OVERLAY_OPTIONS = "redirect_dir=on,metacopy=on,index=off,xino=on"

# -o options and the mount flags they set or clear; allow_other and default_permissions
# are what a kernel mount always is (every user reaches it, the kernel checks permissions).
_FLAG_OPTIONS = {"ro": (_MS_RDONLY, 0), "rw": (0, 0),
                 "suid": (0, _MS_NOSUID), "nosuid": (_MS_NOSUID, 0), "dev": (0, _MS_NODEV),
                 "nodev": (_MS_NODEV, 0), "exec": (0, _MS_NOEXEC), "noexec": (_MS_NOEXEC, 0),
                 "atime": (0, _MS_NOATIME), "noatime": (_MS_NOATIME, 0),
                 "diratime": (0, _MS_NODIRATIME), "nodiratime": (_MS_NODIRATIME, 0),
                 "relatime": (_MS_RELATIME, 0), "strictatime": (_MS_STRICTATIME, 0),
                 "allow_other": (0, 0), "default_permissions": (0, 0)}

_libc = ctypes.CDLL(None, use_errno=True)


class KernelMountError(StoreError):
    pass


def _mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    if _libc.mount(os.fsencode(source), os.fsencode(target), fstype.encode(), ctypes.c_ulong(flags),
                   data.encode() if data else None) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), target)


def _umount(target: str, flags: int = 0) -> None:
    if _libc.umount2(os.fsencode(target), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), target)


def kernel_version() -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def unsupported() -> str | None:
    """Why this machine cannot use the kernel backend, or None."""
    if os.geteuid() != 0:
        return ("the kernel backend needs root (overlayfs's trusted.* xattrs and mount(2) "
                "need CAP_SYS_ADMIN); the fuse backend does not")
    if kernel_version() < MIN_KERNEL:
        return (f"the kernel backend needs Linux {MIN_KERNEL[0]}.{MIN_KERNEL[1]} or later "
                f"(overlayfs's data-only lower layers); this is {os.uname().release}")
    return None


def source_of(c: Container) -> str:
    return f"layerfs:{c.id}"


def _unescape(field: str) -> str:
    return os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), os.fsencode(field)))


def overlay_source_at(mountpoint: str) -> str | None:
    """The source of the overlay mounted (on top) at ``mountpoint``, or None."""
    target = os.path.realpath(mountpoint)
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if _unescape(fields[4]) != target:
                continue
            rest = fields[fields.index("-") + 1:]
            found = _unescape(rest[1]) if rest[0] == "overlay" else None
    return found


def mounted(c: Container) -> bool:
    """True if the container is mounted at its recorded mountpoint by the kernel backend."""
    return bool(c.mountpoint) and overlay_source_at(c.mountpoint) == source_of(c)


def fresh_upper(store: Store, c: Container) -> bool:
    """The container's upper holds nothing yet (so either upper format will do)."""
    return not os.listdir(store.containers.upper(c))


def mount_flags(options: dict, read_only: bool) -> int:
    """mount(2) flags from ``-o`` options; setuid bits and devices are honoured unless
    nosuid/nodev, as on the fuse backend's mounts as root."""
    flags = _MS_RDONLY if read_only else 0
    for key, value in options.items():
        if key not in _FLAG_OPTIONS or not isinstance(value, bool):
            raise KernelMountError(f"the kernel backend does not take -o {key if value is True else f'{key}={value}'}")
        if value:
            add, clear = _FLAG_OPTIONS[key]
            flags = (flags | add) & ~clear
    return flags


def choose_backend(store: Store, c: Container, backend: str, options: dict, foreground: bool) -> str:
    """"fuse" or "kernel" for ``backend`` (fuse, kernel or auto); says why kernel cannot be."""
    if backend not in BACKENDS:
        raise KernelMountError(f"unknown backend {backend!r}: use {', '.join(BACKENDS)}")
    if backend == "fuse":
        return "fuse"
    why = unsupported()
    if why is None and foreground:
        why = "the kernel backend has no serving process to run in the foreground (-f)"
    if why is None and not c.kernel_format and not fresh_upper(store, c):
        why = (f"container {c.name} was changed through the fuse backend, whose upper format "
               f"(OCI whiteouts) the kernel cannot read; mount it with --backend fuse")
    if why is None:
        try:
            mount_flags(options, False)
        except StoreError as e:
            why = str(e)
    if why is not None and backend == "kernel":
        raise KernelMountError(why)
    return "fuse" if why is not None else "kernel"


def _escape(path: str) -> str:
    # overlayfs splits its options on "," and lowerdir on ":"; a backslash escapes both.
    return path.replace("\\", "\\\\").replace(",", "\\,").replace(":", "\\:")


def _meta_image(store: Store, c: Container, as_erofs: bool | None = None) -> MetaImage:
    """The container's image's metadata image: an EROFS file where this kernel mounts one
    from a file (unless ``as_erofs`` says), else a directory tree."""
    from layerfs.store import metaimage

    if as_erofs is None:
        as_erofs = kernel_version() >= FILE_EROFS_KERNEL
    return metaimage.ensure(store, store.resolve_image(c.image_id), as_erofs=as_erofs)


def _volatile_marker(store: Store, c: Container) -> str:
    # overlayfs's own: made by a volatile mount, and then every later mount is refused
    return os.path.join(store.containers.work(c), "work", "incompat", "volatile")


def mount_container(store: Store, c: Container, mountpoint: str, *, read_only: bool,
                    options: dict, volatile: bool) -> None:
    """Mount the container at ``mountpoint`` with the kernel's overlayfs."""
    flags = mount_flags(options, read_only)
    if os.path.exists(_volatile_marker(store, c)):
        raise KernelMountError(
            f"container {c.name} was mounted with -o volatile and not unmounted cleanly, so its "
            f"upper may have lost writes; remove it (layerfs rm), or delete "
            f"{os.path.dirname(_volatile_marker(store, c))} to take it as it is")
    meta = _meta_image(store, c)
    stage = os.path.join(store.containers.dir, c.id, "meta")
    staged = False
    if meta.erofs:
        os.makedirs(stage, mode=0o700, exist_ok=True)
        try:
            _mount(meta.path, stage, "erofs", _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, "")
            staged = True
        except OSError as e:
            if e.errno not in (errno.ENODEV, errno.ENOTBLK):
                raise KernelMountError(f"cannot mount the metadata image {meta.path}: {e.strerror}") from None
            # This kernel has no EROFS, or none from files: the same tree as a directory.
            meta = _meta_image(store, c, as_erofs=False)
    data = (f"lowerdir={_escape(stage if staged else meta.path)}::{_escape(store.blobs.dir)},"
            f"upperdir={_escape(store.containers.upper(c))},workdir={_escape(store.containers.work(c))},"
            f"{OVERLAY_OPTIONS}" + (",volatile" if volatile else ""))
    try:
        _mount(source_of(c), mountpoint, "overlay", flags, data)
    except OSError as e:
        raise KernelMountError(f"the kernel refused the overlay mount at {mountpoint}: {e.strerror} "
                               f"(see dmesg)") from None
    finally:
        if staged:
            # The overlay holds its own clone; a stage left attached is only untidy.
            with contextlib.suppress(OSError):
                _umount(stage, _MNT_DETACH)


def umount(store: Store, c: Container) -> None:
    """Unmount a kernel-backend mount; lazily if it is busy, as fusermount -u falls back.

    A volatile mount wrote without syncing and left overlayfs's marker that refuses the
    upper from then on; once the unmount is known to be complete, the upper is synced and
    the marker removed, so only a crash (or a lazy unmount) leaves it.
    """
    try:
        _umount(c.mountpoint)
    except OSError as e:
        if e.errno != errno.EBUSY:
            raise KernelMountError(f"cannot unmount {c.mountpoint}: {e.strerror}") from None
        _umount(c.mountpoint, _MNT_DETACH)
        return
    marker = _volatile_marker(store, c)
    if os.path.exists(marker):
        syncfs(store.containers.upper(c))
        shutil.rmtree(os.path.dirname(marker))


def sync(mountpoint: str) -> None:
    """syncfs(2) of the mount: overlayfs syncs its upper filesystem."""
    syncfs(mountpoint)
