"""Volumes: host directories bound over paths of a container's mount.

The bind mount sits on top of the FUSE mount, so what a container writes there goes to
the host directory and never through the union: not into the upper layer, not into a
diff or a commit. The path is resolved inside the container's root (unionfs.inroot),
so a container whose /data is a symlink to /etc gets the volume at its own /etc, never
over the host's; a missing mountpoint is made, as an empty directory, as docker does.
"""

from __future__ import annotations

import os

from layerfs.store.containers import Volume

from . import inroot
from .syscalls import MNT_DETACH, MS_BIND, MS_RDONLY, MS_REC, MS_REMOUNT, mount, umount


def attach(mountpoint: str, volumes: tuple[Volume, ...]) -> None:
    """Bind each volume over its path in the mount at ``mountpoint``; all or none."""
    done: list[str] = []
    root_fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for v in volumes:
            if os.path.isdir(v.host):
                fd = inroot.make_dirs(root_fd, v.target)
            else:
                parent, name = inroot.parent_and_name(root_fd, v.target, make=True)
                try:
                    fd = os.open(name, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=parent)
                finally:
                    os.close(parent)
            try:
                target = f"/proc/self/fd/{fd}"
                where = os.readlink(target)
                mount(v.host, target, None, MS_BIND | MS_REC)
                done.append(where)
                if v.read_only:
                    mount("none", where, None, MS_BIND | MS_REMOUNT | MS_RDONLY)
            finally:
                os.close(fd)
    except BaseException:
        for where in reversed(done):
            umount(where, MNT_DETACH)
        raise
    finally:
        os.close(root_fd)


def below(mountpoint: str) -> list[str]:
    """The mounts below ``mountpoint`` (volumes, or anything else mounted there), deepest first."""
    prefix = os.path.realpath(mountpoint).rstrip("/") + "/"
    with open("/proc/self/mountinfo") as f:
        found = [line.split()[4].encode().decode("unicode_escape") for line in f]
    return sorted({m for m in found if m.startswith(prefix)}, key=lambda m: m.count("/"), reverse=True)


def detach(mountpoint: str) -> None:
    """Unmount whatever is mounted below ``mountpoint`` (before the mount itself goes)."""
    for where in below(mountpoint):
        try:
            umount(where)
        except OSError:
            umount(where, MNT_DETACH)
