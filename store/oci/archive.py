"""Where image files are read from and written to: a directory, or a tar of one.

A :class:`DirSource` or :class:`TarSource` opens files by their name inside the image
(``index.json``, ``blobs/sha256/<hex>``, ``manifest.json``...). Nothing is extracted:
a tar is indexed once (names, offsets, sizes) and its members are read in place, so a
member cannot escape anywhere; a name that tries (absolute, ``..``, a link out of the
archive) is refused all the same, as the input is hostile. A :class:`TarWriter` writes
the same bytes for the same contents every time.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import stat
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from typing import BinaryIO, Protocol

from ..builder import clean_path
from ..errors import BadArchive, HostileArchive, StoreError
from ..records import Entry, Kind
from ..tarformat import END, header, padding
from ..tarimport import decompressed

MAX_MEMBERS = 100_000  # a docker archive of 1,000 layers has ~3,000
MAX_LINK_HOPS = 16


class MissingFile(BadArchive):
    """A file the image needs is not in the directory or archive."""


class Source(Protocol):
    """Files of an image layout or archive, by name."""

    location: str

    def exists(self, name: str) -> bool: ...

    def size(self, name: str) -> int: ...

    def open(self, name: str) -> contextlib.AbstractContextManager[BinaryIO]: ...


def member_name(name: str, where: str) -> str:
    """A member name as ``a/b`` (no ``./``); refuses names that leave the archive."""
    try:
        return clean_path(name)
    except HostileArchive:
        how = "has an absolute path" if name.startswith("/") else "escapes the archive"
        raise HostileArchive(f"{where}: member {name!r} {how}") from None


class DirSource:
    """An image layout in a directory. A file reached through a symlink must stay in it."""

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)
        self.location = root

    def _path(self, name: str) -> str:
        path = os.path.realpath(os.path.join(self.root, member_name(name, self.location)))
        if os.path.commonpath([path, self.root]) != self.root:
            raise HostileArchive(f"{self.location}: {name} leads out of the directory")
        return path

    def exists(self, name: str) -> bool:
        return os.path.isfile(self._path(name))

    def size(self, name: str) -> int:
        try:
            return os.stat(self._path(name)).st_size
        except OSError:
            raise MissingFile(f"{name} is missing from {self.location}") from None

    def open(self, name: str) -> contextlib.AbstractContextManager[BinaryIO]:
        path = self._path(name)
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            raise MissingFile(f"{name} is missing from {self.location}") from None
        except OSError as e:
            raise StoreError(f"cannot read {path}: {e.strerror}") from None
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            f.close()
            raise BadArchive(f"{self.location}: {name} is not a regular file")
        return f


class _Slice(io.RawIOBase):
    """Bytes ``offset .. offset+size`` of a file descriptor, read with pread."""

    def __init__(self, fd: int, offset: int, size: int) -> None:
        self.fd, self.offset, self.size, self.pos = fd, offset, size, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        want = min(len(b), self.size - self.pos)
        if want <= 0:
            return 0
        data = os.pread(self.fd, want, self.offset + self.pos)
        if not data:
            raise BadArchive("the archive is truncated (it ends inside a member)")
        b[:len(data)] = data
        self.pos += len(data)
        return len(data)


class TarSource:
    """An image archive (a tar, possibly gzip or zstd compressed, or "-" for stdin).

    A plain tar file is read in place; stdin and compressed archives are first copied
    (decompressed) into an anonymous temporary file, as random access needs one.
    """

    def __init__(self, path: str) -> None:
        self.location = "stdin" if path == "-" else path
        self._stack = contextlib.ExitStack()
        try:
            self.file = self._seekable_tar(path)
            self.members: dict[str, tuple[int, int]] = {}  # name -> (offset, size)
            self._links: dict[str, tuple[str, bool]] = {}  # name -> (target, symbolic)
            self._index()
        except BaseException:
            self._stack.close()
            raise

    def _seekable_tar(self, path: str) -> BinaryIO:
        if path == "-":
            src: BinaryIO = sys.stdin.buffer
        else:
            try:
                if os.path.isdir(path):
                    raise StoreError(f"{path} is a directory")
                src = self._stack.enter_context(open(path, "rb"))
            except OSError as e:
                raise StoreError(f"cannot open {path}: {e.strerror}") from None
        plain, kind = decompressed(src)
        if kind == "tar" and path != "-":
            return src
        spool = self._stack.enter_context(tempfile.TemporaryFile(prefix="layerfs-load-"))
        try:
            shutil.copyfileobj(plain, spool, 1 << 20)
        except (OSError, EOFError, ValueError) as e:
            if isinstance(e, StoreError):
                raise
            raise BadArchive(f"{self.location}: the {kind} stream is corrupt ({e})") from None
        return spool

    def _index(self) -> None:
        end = os.fstat(self.file.fileno()).st_size
        self.file.seek(0)
        try:
            tf = tarfile.open(fileobj=self.file, mode="r:", encoding="utf-8", errors="surrogateescape")
            while (ti := tf.next()) is not None:
                tf.members.clear()
                if len(self.members) + len(self._links) >= MAX_MEMBERS:
                    raise HostileArchive(f"{self.location} has more than {MAX_MEMBERS} members")
                name = member_name(ti.name, self.location)
                if ti.isreg():
                    if ti.offset_data + ti.size > end:
                        raise BadArchive(f"{self.location} is truncated (it ends inside {ti.name!r})")
                    self.members[name] = (ti.offset_data, ti.size)
                    self._links.pop(name, None)
                elif ti.issym() or ti.islnk():
                    base = name.rpartition("/")[0] if ti.issym() else ""
                    target = ti.linkname if ti.islnk() else (base + "/" + ti.linkname if base else ti.linkname)
                    self._links[name] = (member_name(target, self.location), ti.issym())
                    self.members.pop(name, None)
        except tarfile.TarError as e:
            raise BadArchive(f"{self.location} is not a valid tar archive ({e})") from None
        if not self.members:
            raise BadArchive(f"{self.location} is empty or not a tar archive")

    def _resolve(self, name: str) -> tuple[int, int] | None:
        name = member_name(name, self.location)
        for _ in range(MAX_LINK_HOPS):
            if name in self.members:
                return self.members[name]
            if name not in self._links:
                return None
            name = self._links[name][0]
        raise HostileArchive(f"{self.location}: too many links from {name!r}")

    def exists(self, name: str) -> bool:
        return self._resolve(name) is not None

    def size(self, name: str) -> int:
        found = self._resolve(name)
        if found is None:
            raise MissingFile(f"{name} is missing from {self.location}")
        return found[1]

    def open(self, name: str) -> contextlib.AbstractContextManager[BinaryIO]:
        found = self._resolve(name)
        if found is None:
            raise MissingFile(f"{name} is missing from {self.location}")
        return contextlib.closing(io.BufferedReader(_Slice(self.file.fileno(), *found), 1 << 20))

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> "TarSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_source(path: str) -> contextlib.AbstractContextManager[Source]:
    """A directory or an archive (``-`` is stdin) as a :class:`Source`."""
    if path != "-" and os.path.isdir(path):
        return contextlib.nullcontext(DirSource(path))
    if path != "-" and not os.path.exists(path):
        raise StoreError(f"{path}: no such file or directory")
    return TarSource(path)


class TarWriter:
    """Writes a tar stream: ustar headers, mtime 0, root-owned, no record padding."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out

    def add_dir(self, name: str) -> None:
        self.out.write(header(name, Entry(Kind.DIR, mode=0o755)))

    def add_file(self, name: str, size: int, src: BinaryIO) -> None:
        """A member of ``size`` bytes read from ``src`` (which must hold exactly that)."""
        self.out.write(header(name, Entry(Kind.REG, mode=0o644, size=size)))
        left = size
        while left:
            chunk = src.read(min(1 << 20, left))
            if not chunk:
                raise StoreError(f"{name} ended {left} bytes early while it was written")
            self.out.write(chunk)
            left -= len(chunk)
        if src.read(1):
            raise StoreError(f"{name} is longer than the {size} bytes announced")
        self.out.write(padding(size))

    def add_bytes(self, name: str, data: bytes) -> None:
        self.add_file(name, len(data), io.BytesIO(data))

    def close(self) -> None:
        self.out.write(END)


@contextlib.contextmanager
def atomic_output(path: str, directory: bool = False) -> Iterator[str]:
    """A temporary path next to ``path`` that becomes ``path`` only if the block succeeds
    (a failed save leaves nothing behind, and never a half-written archive)."""
    if os.path.lexists(path) and not (directory and os.path.isdir(path) and not os.listdir(path)):
        raise StoreError(f"{path} already exists")
    parent = os.path.dirname(os.path.abspath(path))
    try:
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", dir=parent)
    except OSError as e:
        raise StoreError(f"cannot write in {parent}: {e.strerror}") from None
    target = tmp if directory else os.path.join(tmp, "archive.tar")
    try:
        yield target
        if directory:
            os.chmod(tmp, 0o755)
            if os.path.isdir(path):
                os.rmdir(path)  # empty, checked above
            os.rename(tmp, path)
        else:
            os.rename(target, path)
    except OSError as e:
        raise StoreError(f"cannot write {path}: {e.strerror}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
