"""Containers: an image plus a writable upper layer, and where it is mounted.

A container owns ``containers/<id>/upper`` (its changes: OCI whiteout format, or the
kernel overlayfs's own once the kernel backend has mounted it) and ``containers/<id>/work``
(scratch for atomic copy-up on the same filesystem). The record
also says where it is mounted and by which serving process, so a mount whose process
died can be told apart from a live one.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import struct
import time
from dataclasses import dataclass, replace

import lmdb

from .errors import AmbiguousName, NotFound, StoreError
from .fstree import remove_tree
from .index import Index
from .leases import process_start
from .records import Entry, bytes_digest, digest_bytes

_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$")
_REC = struct.Struct("<32sqiQBHH")  # image id, created ns, pid, its start time, flags, name, mountpoint
READ_ONLY = 1
KERNEL_FORMAT = 2  # the upper is in the kernel overlayfs's format (it was mounted by the kernel)
ANONYMOUS = 4  # made by ``mount IMAGE``, not named by anyone: prune removes it once unmounted
REMOVE_AT_UMOUNT = 8  # mount --rm: removed, with its changes, when its mount ends


class ContainerNotFound(NotFound):
    pass


@dataclass(slots=True, frozen=True)
class Volume:
    """A host directory bound over a path of the container's mount (outside its upper
    layer: diff and commit never see what is in it)."""

    host: str
    target: str
    read_only: bool = False

    @classmethod
    def parse(cls, spec: str) -> "Volume":
        """``HOST:CTR[:ro|rw]``, both absolute; HOST must exist."""
        parts = spec.split(":")
        mode = parts.pop() if len(parts) == 3 else "rw"
        if len(parts) != 2 or mode not in ("ro", "rw") or not all(p.startswith("/") for p in parts):
            raise StoreError(f"invalid volume {spec!r}: expected HOST:CONTAINER[:ro], both absolute paths")
        host, target = os.path.abspath(parts[0]), os.path.normpath(parts[1])
        if target == "/":
            raise StoreError(f"invalid volume {spec!r}: a volume cannot cover the container's root")
        if not os.path.exists(host):
            raise StoreError(f"invalid volume {spec!r}: {host} does not exist")
        return cls(host, target, mode == "ro")

    def __str__(self) -> str:
        return f"{self.host}:{self.target}" + (":ro" if self.read_only else "")


@dataclass(slots=True, frozen=True)
class Container:
    """A container record."""

    id: str  # 64 hex digits
    name: str
    image_id: str
    created_ns: int
    mountpoint: str = ""  # where it is mounted, "" when not
    pid: int = 0  # the serving process
    pid_start: int = 0  # its start time (a reused pid is another process)
    flags: int = 0
    volumes: tuple[Volume, ...] = ()

    @property
    def read_only(self) -> bool:
        return bool(self.flags & READ_ONLY)

    @property
    def kernel_format(self) -> bool:
        return bool(self.flags & KERNEL_FORMAT)

    @property
    def anonymous(self) -> bool:
        return bool(self.flags & ANONYMOUS)

    @property
    def remove_at_umount(self) -> bool:
        return bool(self.flags & REMOVE_AT_UMOUNT)


def _pack(c: Container) -> bytes:
    name, mnt = c.name.encode(), os.fsencode(c.mountpoint)
    # Volumes follow as JSON (a record without them ends after the mountpoint).
    vols = json.dumps([[v.host, v.target, v.read_only] for v in c.volumes]).encode() if c.volumes else b""
    return (_REC.pack(digest_bytes(c.image_id), c.created_ns, c.pid, c.pid_start, c.flags, len(name),
                      len(mnt)) + name + mnt + vols)


def _unpack(cid: bytes, buf: bytes) -> Container:
    image, created, pid, start, flags, ln, lm = _REC.unpack_from(buf)
    pos = _REC.size
    name = bytes(buf[pos:pos + ln]).decode()
    mnt = os.fsdecode(bytes(buf[pos + ln:pos + ln + lm]))
    rest = bytes(buf[pos + ln + lm:])
    vols = tuple(Volume(h, t, bool(ro)) for h, t, ro in json.loads(rest)) if rest else ()
    return Container(bytes(cid).decode(), name, bytes_digest(image), created, mnt, pid, start, flags, vols)


class Containers:
    """The ``containers`` database and the per-container directories."""

    def __init__(self, root: str, index: Index) -> None:
        self.dir = os.path.join(root, "containers")
        self.index = index

    def upper(self, c: Container) -> str:
        return os.path.join(self.dir, c.id, "upper")

    def work(self, c: Container) -> str:
        return os.path.join(self.dir, c.id, "work")

    def create(self, image_id: str, name: str | None = None, flags: int = 0,
               root: Entry | None = None, volumes: tuple[Volume, ...] = ()) -> Container:
        """A new container of an image, with an empty upper layer whose root directory
        has the image root's owner, mode and times (``root``), and its volumes."""
        cid = secrets.token_hex(32)
        name = name or f"layerfs-{cid[:12]}"
        if not _NAME_RE.match(name):
            raise StoreError(f"invalid container name {name!r}: use letters, digits, _ . -")
        c = Container(cid, name, image_id, time.time_ns(), flags=flags, volumes=tuple(volumes))
        base = os.path.join(self.dir, cid)
        try:
            os.makedirs(os.path.join(base, "upper"))
            os.makedirs(os.path.join(base, "work"))
            upper = os.path.join(base, "upper")
            if root is not None:
                if os.geteuid() == 0:  # a rootless store keeps its own uid
                    os.chown(upper, root.uid, root.gid)
                os.chmod(upper, root.mode)
                os.utime(upper, ns=(root.mtime_ns, root.mtime_ns))
            else:
                os.chmod(upper, 0o755)
        except OSError as e:
            shutil.rmtree(base, ignore_errors=True)
            raise StoreError(f"cannot create the container's directories: {e.strerror}") from None

        def txn_fn(txn: lmdb.Transaction) -> None:
            db = self.index.db("containers")
            for k, v in txn.cursor(db=db):
                if _unpack(k, v).name == name:
                    raise StoreError(f"a container named {name!r} exists already")
            if txn.get(digest_bytes(image_id), db=self.index.db("images")) is None:
                raise NotFound(f"no such image: {image_id}")
            txn.put(cid.encode(), _pack(c), db=db)

        try:
            self.index.write(txn_fn)
        except StoreError:
            shutil.rmtree(base, ignore_errors=True)
            raise
        return c

    def list(self) -> list[Container]:
        with self.index.read() as txn:
            return self.list_in(txn)

    def list_in(self, txn: lmdb.Transaction) -> list[Container]:
        """The containers as a transaction (read or write) sees them."""
        return sorted((_unpack(k, v) for k, v in txn.cursor(db=self.index.db("containers"))),
                      key=lambda c: c.created_ns)

    def get(self, ref: str) -> Container:
        """A container by name, full id or unique id prefix."""
        matches = [c for c in self.list() if c.name == ref]
        if not matches and re.fullmatch(r"[0-9a-f]{1,64}", ref):
            matches = [c for c in self.list() if c.id.startswith(ref)]
        if not matches:
            raise ContainerNotFound(f"no such container: {ref}")
        if len(matches) > 1:
            raise AmbiguousName(f"{ref} matches more than one container; give more digits")
        return matches[0]

    def find(self, ref: str) -> Container | None:
        try:
            return self.get(ref)
        except ContainerNotFound:
            return None

    def by_mountpoint(self, mountpoint: str) -> Container | None:
        mountpoint = os.path.realpath(mountpoint)
        for c in self.list():
            if c.mountpoint and os.path.realpath(c.mountpoint) == mountpoint:
                return c
        return None

    def set_mount(self, c: Container, mountpoint: str, pid: int) -> Container:
        """Record where the container is mounted and by which process (pid 0: nowhere);
        a container removed meanwhile (its mount ended with --rm) stays removed."""
        new = replace(c, mountpoint=mountpoint, pid=pid, pid_start=process_start(pid) if pid else 0)

        def txn_fn(txn: lmdb.Transaction) -> None:
            if txn.get(c.id.encode(), db=self.index.db("containers")) is not None:
                txn.put(c.id.encode(), _pack(new), db=self.index.db("containers"))

        self.index.write(txn_fn)
        return new

    def claim(self, c: Container, mountpoint: str, alive, flags: int = 0) -> Container:
        """Mark the container as being mounted by this process, in one transaction; refuse
        if a live mount (``alive(record)``) already serves it. ``flags`` are added to its
        record (KERNEL_FORMAT once the kernel writes its upper)."""
        def txn_fn(txn: lmdb.Transaction) -> Container:
            raw = txn.get(c.id.encode(), db=self.index.db("containers"))
            if raw is None:
                raise ContainerNotFound(f"no such container: {c.name}")
            current = _unpack(c.id.encode(), raw)
            if current.mountpoint and alive(current):
                raise StoreError(f"container {c.name} is already mounted at {current.mountpoint}")
            pid = os.getpid()
            new = replace(current, mountpoint=mountpoint, pid=pid, pid_start=process_start(pid),
                          flags=current.flags | flags)
            txn.put(c.id.encode(), _pack(new), db=self.index.db("containers"))
            return new

        return self.index.write(txn_fn)

    def remove(self, c: Container, if_unchanged: bool = False) -> bool:
        """Forget the container and delete its upper layer (removing one already gone is
        no error). With ``if_unchanged``, only if its record is still ``c`` (not claimed by
        a mount meanwhile); returns whether it was removed."""
        def txn_fn(txn: lmdb.Transaction) -> bool:
            raw = txn.get(c.id.encode(), db=self.index.db("containers"))
            if if_unchanged and (raw is None or _unpack(c.id.encode(), raw) != c):
                return False
            txn.delete(c.id.encode(), db=self.index.db("containers"))
            return True

        if not self.index.write(txn_fn):
            return False
        remove_tree(os.path.join(self.dir, c.id))  # a container may have made it very deep
        return True
