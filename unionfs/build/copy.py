"""COPY and ADD: files from the context (or a tar archive) written into a mounted root.

Every path inside the root is resolved as the container would resolve it
(unionfs.inroot): a destination that is a symlink to ``/etc`` lands in the image's
/etc, never the host's. New files and directories belong to root, or to ``--chown``;
modes and times come from the source, as docker copies them.
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat
import tarfile
from dataclasses import dataclass

from .. import inroot
from .context import Item, Source
from .dockerfile import DockerfileError

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


@dataclass(slots=True, frozen=True)
class Owner:
    """Who new files belong to, and the mode ``--chmod`` forces (None: the source's)."""

    uid: int = 0
    gid: int = 0
    chmod: int | None = None


class _Writer:
    """Writes entries below one directory of the root, keeping its subdirectories open."""

    def __init__(self, root_fd: int, base: str, owner: Owner, what: str) -> None:
        self.root_fd, self.base, self.owner, self.what = root_fd, base, owner, what
        self.fds: dict[str, int] = {}
        self.dir_times: list[tuple[str, int]] = []

    def close(self) -> None:
        for rel, ns in reversed(self.dir_times):  # after their contents changed them
            parent, name = self._parent(rel)
            os.utime(name, ns=(ns, ns), dir_fd=parent, follow_symlinks=False)
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def dir_fd(self, rel: str) -> int:
        fd = self.fds.get(rel)
        if fd is None:
            where = posixpath.join(self.base, rel) if rel else self.base
            fd = inroot.make_dirs(self.root_fd, where, uid=self.owner.uid, gid=self.owner.gid)
            self.fds[rel] = fd
        return fd

    def _parent(self, rel: str) -> tuple[int, str]:
        parent, _, name = rel.rpartition("/")
        return self.dir_fd(parent), name

    def _clear(self, fd: int, name: str, rel: str, want_dir: bool) -> bool:
        """Make room for ``name``; True if a directory is already there (merged into)."""
        st = inroot.lstat_at(fd, name)
        if st is None:
            return False
        if stat.S_ISDIR(st.st_mode):
            if want_dir:
                return True
            raise DockerfileError(f"{self.what}: cannot replace the directory "
                                  f"{posixpath.join(self.base, rel)} with a file")
        os.unlink(name, dir_fd=fd)
        return False

    def _meta(self, fd: int, name: str, mode: int, uid: int, gid: int, mtime_ns: int,
              is_dir: bool, rel: str, is_link: bool = False) -> None:
        os.chown(name, uid, gid, dir_fd=fd, follow_symlinks=False)
        if not is_link:
            forced = self.owner.chmod
            os.chmod(name, forced if forced is not None else mode, dir_fd=fd)
        if is_dir:
            self.dir_times.append((rel, mtime_ns))
        else:
            os.utime(name, ns=(mtime_ns, mtime_ns), dir_fd=fd, follow_symlinks=False)

    def add(self, rel: str, st: os.stat_result, *, data=None, target: str = "",
            uid: int | None = None, gid: int | None = None) -> None:
        """Write one entry at ``rel``: a file's data from ``data`` (an fd or a file
        object), a symlink's ``target``; owner ``uid``/``gid`` or the writer's."""
        uid = self.owner.uid if uid is None else uid
        gid = self.owner.gid if gid is None else gid
        fd, name = self._parent(rel)
        mode, kind = stat.S_IMODE(st.st_mode), stat.S_IFMT(st.st_mode)
        if kind == stat.S_IFDIR:
            if not self._clear(fd, name, rel, want_dir=True):
                os.mkdir(name, 0o700, dir_fd=fd)
            self._meta(fd, name, mode, uid, gid, st.st_mtime_ns, True, rel)
            return
        self._clear(fd, name, rel, want_dir=False)
        if kind == stat.S_IFREG:
            out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                          0o600, dir_fd=fd)
            try:
                _copy(data, out)
            finally:
                os.close(out)
        elif kind == stat.S_IFLNK:
            os.symlink(target, name, dir_fd=fd)
            self._meta(fd, name, mode, uid, gid, st.st_mtime_ns, False, rel, is_link=True)
            return
        elif kind == stat.S_IFIFO:
            os.mkfifo(name, 0o600, dir_fd=fd)
        elif kind in (stat.S_IFCHR, stat.S_IFBLK):
            os.mknod(name, kind | 0o600, st.st_rdev, dir_fd=fd)
        else:
            return  # a socket: no layer can hold one
        self._meta(fd, name, mode, uid, gid, st.st_mtime_ns, False, rel)

    def link(self, rel: str, target_rel: str) -> None:
        """A hard link at ``rel`` to the entry already written at ``target_rel``."""
        fd, name = self._parent(rel)
        tfd, tname = self._parent(target_rel)
        self._clear(fd, name, rel, want_dir=False)
        os.link(tname, name, src_dir_fd=tfd, dst_dir_fd=fd, follow_symlinks=False)


def _copy(data, out: int) -> None:
    if isinstance(data, int):
        data = os.fdopen(os.dup(data), "rb")  # across filesystems (into a FUSE mount): read and write
        with data:
            _copy(data, out)
        return
    while chunk := data.read(1 << 20):
        view = memoryview(chunk)
        while view:
            view = view[os.write(out, view):]


def _open_source(item: Item) -> int:
    return os.open(item.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)


def resolve_dest(dest: str, workdir: str) -> str:
    """A destination as an absolute path in the image (relative ones are below WORKDIR)."""
    path = dest if dest.startswith("/") else posixpath.join(workdir or "/", dest)
    return posixpath.normpath(path) + ("/" if dest.endswith("/") and path != "/" else "")


def copy_sources(root: str, sources: list[Source], dest: str, owner: Owner, what: str,
                 extract: bool = False) -> None:
    """Write ``sources`` at ``dest`` (absolute, inside the mounted ``root``) as COPY does,
    or ADD with ``extract`` (a local tar archive is unpacked at ``dest``)."""
    root_fd = os.open(root, _DIR)
    try:
        into_dir = (dest.endswith("/") or len(sources) > 1 or
                    inroot.is_dir_in_root(root_fd, dest))
        if len(sources) > 1 and not dest.endswith("/"):
            raise DockerfileError(f"{what}: with more than one source the destination must be a "
                                  f"directory and end with /")
        for source in sources:
            top = source.items[0]
            archive = extract and stat.S_ISREG(top.st.st_mode) and _is_archive(top.path)
            if source.is_dir or archive:
                base = dest.rstrip("/") or "/"
                writer = _Writer(root_fd, base, owner, what)
                try:
                    writer.dir_fd("")
                    if archive:
                        _extract(writer, top.path, what)
                    else:
                        _copy_tree(writer, source.items[1:])
                finally:
                    writer.close()
                continue
            if into_dir:
                base, name = dest.rstrip("/") or "/", posixpath.basename(source.name)
            else:
                base, name = posixpath.dirname(dest) or "/", posixpath.basename(dest)
            writer = _Writer(root_fd, base, owner, what)
            try:
                _copy_tree(writer, [Item(name, top.path, top.st)], follow_top=True)
            finally:
                writer.close()
    except OSError as e:
        raise DockerfileError(f"{what}: {e.strerror or e}"
                              + (f": {e.filename}" if e.filename else "")) from None
    finally:
        os.close(root_fd)


def _copy_tree(writer: _Writer, items, follow_top: bool = False) -> None:
    for i, item in enumerate(items):
        st = item.st
        if stat.S_ISREG(st.st_mode):
            src = os.open(item.path, os.O_RDONLY | os.O_CLOEXEC) if follow_top and i == 0 else _open_source(item)
            try:
                writer.add(item.rel, st, data=src)
            finally:
                os.close(src)
        elif stat.S_ISLNK(st.st_mode):
            writer.add(item.rel, st, target=os.readlink(item.path))
        else:
            writer.add(item.rel, st)


def _is_archive(path: str) -> bool:
    try:
        with tarfile.open(path, "r:*") as tf:
            return tf.next() is not None
    except (tarfile.TarError, EOFError, OSError):
        return False


class _TarStat:
    """What _Writer.add needs of a tar member, in os.stat_result's names."""

    def __init__(self, m: tarfile.TarInfo) -> None:
        kinds = {tarfile.DIRTYPE: stat.S_IFDIR, tarfile.SYMTYPE: stat.S_IFLNK, tarfile.FIFOTYPE: stat.S_IFIFO,
                 tarfile.CHRTYPE: stat.S_IFCHR, tarfile.BLKTYPE: stat.S_IFBLK}
        self.st_mode = kinds.get(m.type, stat.S_IFREG) | (m.mode & 0o7777)
        self.st_mtime_ns = int(m.mtime) * 1_000_000_000
        self.st_rdev = os.makedev(m.devmajor, m.devminor) if m.ischr() or m.isblk() else 0


def _member_path(name: str, what: str) -> str:
    clean = posixpath.normpath("/" + name).lstrip("/")
    if any(part == ".." for part in name.split("/")):
        raise DockerfileError(f"{what}: the archive's entry {name!r} climbs out of the destination")
    return "" if clean == "." else clean


def _extract(writer: _Writer, path: str, what: str) -> None:
    """Unpack a tar archive (plain, gzip, bzip2 or xz) below the writer's directory;
    entries keep the archive's owners unless --chown says otherwise."""
    chown = writer.owner.uid != 0 or writer.owner.gid != 0
    try:
        with tarfile.open(path, "r:*") as tf:
            for m in tf:
                rel = _member_path(m.name, what)
                if not rel:
                    continue
                uid, gid = (None, None) if chown else (m.uid, m.gid)
                if m.islnk():
                    writer.link(rel, _member_path(m.linkname, what))
                elif m.isreg():
                    with tf.extractfile(m) as data:
                        writer.add(rel, _TarStat(m), data=data, uid=uid, gid=gid)
                elif m.issym():
                    writer.add(rel, _TarStat(m), target=m.linkname, uid=uid, gid=gid)
                elif m.isdir() or m.isfifo() or m.ischr() or m.isblk():
                    writer.add(rel, _TarStat(m), uid=uid, gid=gid)
    except (tarfile.TarError, EOFError) as e:
        raise DockerfileError(f"{what}: {os.path.basename(path)} is a damaged archive ({e})") from None
    except OSError as e:
        if e.errno == errno.EINVAL:
            raise DockerfileError(f"{what}: cannot write {e.filename or 'an entry'} from "
                                  f"{os.path.basename(path)} (a name the image cannot hold)") from None
        raise
