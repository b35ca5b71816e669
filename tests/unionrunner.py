"""Differential testing of the layerfs union mount against the kernel's overlayfs.

The same layers are written as plain directories (the kernel's lower directories) and
imported into a layerfs store (``Store.import_dir``); the kernel overlay and a layerfs
mount of the image are mounted side by side, the same operations run on both, and every
result (value or errno) and the whole visible tree afterwards must agree.

Layers are given bottom first, each as ``{path: spec}`` with the specs below (a path
may hold undecodable bytes as surrogate escapes, as os.fsdecode gives them); parent
directories that are not listed are made with ``D()``. Whiteouts use the form both sides
read: a char device 0/0 (``W()``); opaque directories the ``trusted.overlay.opaque=y``
xattr (``D(opaque=True)``).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import pickle
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field

from layerfs.store import Store
from layerfs.unionfs.kernel import OVERLAY_OPTIONS

# Every lower entry gets this mtime; times a test sets are below RECENT as well, so a
# time >= RECENT was set by the filesystem ("now") and compares as "new".
T0 = 1_600_000_000
RECENT = 1_650_000_000 * 10**9
KERNEL_OPTIONS = "redirect_dir=on,index=on,metacopy=on"
# The oracle of the kernel backend: the kernel overlay with the options it mounts with.
KERNEL_BACKEND_OPTIONS = OVERLAY_OPTIONS

LAYERFS = os.path.join(os.path.dirname(sys.executable), "layerfs")


# -- layer specs ------------------------------------------------------------------------


@dataclass(frozen=True)
class F:
    """A regular file."""
    data: bytes | str = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    xattrs: tuple = ()  # ((name, value), ...)


@dataclass(frozen=True)
class D:
    """A directory."""
    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    opaque: bool = False
    xattrs: tuple = ()


@dataclass(frozen=True)
class L:
    """A symbolic link."""
    target: str
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True)
class H:
    """A hard link to another path of the same layer (listed before it)."""
    to: str


@dataclass(frozen=True)
class W:
    """A whiteout: a char device 0/0, as the kernel writes it."""


@dataclass(frozen=True)
class P:
    """A named pipe."""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True)
class C:
    """A character device (not 0/0, which is a whiteout)."""
    major: int
    minor: int
    mode: int = 0o666


def build_layer(root: str, spec: dict) -> str:
    """Create the layer ``spec`` as a directory tree at ``root``; every mtime is T0."""
    os.makedirs(root)
    os.chmod(root, 0o755)
    paths = set(spec)
    for p in list(spec):
        parts = p.split("/")
        for i in range(1, len(parts)):
            paths.add("/".join(parts[:i]))
    for p in sorted(paths, key=lambda s: (s.count("/"), s)):
        full = os.path.join(root, p)
        s = spec.get(p, D())
        if isinstance(s, D):
            os.mkdir(full)
            os.chown(full, s.uid, s.gid)
            os.chmod(full, s.mode)
            if s.opaque:
                os.setxattr(full, "trusted.overlay.opaque", b"y")
        elif isinstance(s, F):
            data = s.data.encode() if isinstance(s.data, str) else s.data
            with open(full, "wb") as f:
                f.write(data)
            os.chown(full, s.uid, s.gid)
            os.chmod(full, s.mode)
        elif isinstance(s, L):
            os.symlink(s.target, full)
            os.chown(full, s.uid, s.gid, follow_symlinks=False)
        elif isinstance(s, H):
            pass  # after every file exists
        elif isinstance(s, W):
            os.mknod(full, stat.S_IFCHR | 0o600, os.makedev(0, 0))
        elif isinstance(s, P):
            os.mkfifo(full)
            os.chown(full, s.uid, s.gid)
            os.chmod(full, s.mode)
        elif isinstance(s, C):
            os.mknod(full, stat.S_IFCHR | s.mode, os.makedev(s.major, s.minor))
            os.chmod(full, s.mode)
        else:
            raise TypeError(f"{p}: unknown spec {s!r}")
        for name, value in getattr(s, "xattrs", ()):
            os.setxattr(full, name, value if isinstance(value, bytes) else value.encode())
    for p, s in sorted(spec.items()):
        if isinstance(s, H):
            os.link(os.path.join(root, s.to), os.path.join(root, p))
    for p in sorted(paths, key=lambda s: -s.count("/")):
        os.utime(os.path.join(root, p), ns=(T0 * 10**9, T0 * 10**9), follow_symlinks=False)
    os.utime(root, ns=(T0 * 10**9, T0 * 10**9))
    return root


@dataclass
class LayerSet:
    """Layers written as directories (bottom first) and imported into a layerfs store."""
    lowers: list[str]  # bottom first
    store_root: str
    image_id: str


def make_layers(base: str, layers: list[dict], store_root: str) -> LayerSet:
    os.makedirs(base, exist_ok=True)
    dirs = [build_layer(os.path.join(base, f"layer{i}"), spec) for i, spec in enumerate(layers)]
    image = None
    with Store(store_root) as store:
        for d in dirs:
            image = store.import_dir(d, parent=image.image_id if image else None)
    return LayerSet(dirs, store_root, image.image_id)


# -- mounts -------------------------------------------------------------------------------


def _mounted(path: str) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4].encode().decode("unicode_escape") == target for line in f)


def force_umount(path: str) -> None:
    if not _mounted(path):
        return
    subprocess.run(["fusermount3", "-u", path], capture_output=True)
    if _mounted(path):
        subprocess.run(["umount", path], capture_output=True)
    if _mounted(path):
        subprocess.run(["umount", "-l", path], capture_output=True)


class KernelOverlay:
    """The kernel's overlayfs over ``lowers`` (bottom first) with a fresh upper."""

    def __init__(self, lowers: list[str], base: str, options: str = KERNEL_OPTIONS, *,
                 read_only: bool = False) -> None:
        self.lowers = lowers
        self.upper = os.path.join(base, "upper")
        self.work = os.path.join(base, "work")
        self.mnt = os.path.join(base, "mnt")
        self.options = options
        self.read_only = read_only
        for d in (self.upper, self.work, self.mnt):
            os.makedirs(d, exist_ok=True)
        os.chmod(self.upper, 0o755)

    def mount(self) -> str:
        opts = f"lowerdir={':'.join(reversed(self.lowers))}"
        if not self.read_only:  # no upper: a read-only overlay
            opts += f",upperdir={self.upper},workdir={self.work}" + (f",{self.options}" if self.options else "")
        res = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, self.mnt],
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise OverlayUnavailable(f"mount -t overlay -o {opts} failed: "
                                     f"{res.stderr.strip() or res.returncode}")
        return self.mnt

    def umount(self) -> None:
        if _mounted(self.mnt):
            res = subprocess.run(["umount", self.mnt], capture_output=True)
            if res.returncode != 0:
                subprocess.run(["umount", "-l", self.mnt], capture_output=True)


class OverlayUnavailable(Exception):
    pass


def layerfs_cli(store_root: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, LAYERFS_ROOT=store_root)
    proc = subprocess.run([LAYERFS, *args], capture_output=True, text=True, env=env, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"layerfs {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc


class LayerfsMount:
    """``layerfs mount [--backend BACKEND] REF DIR`` and everything needed to undo it."""

    def __init__(self, store_root: str, ref: str, mnt: str, backend: str = "fuse") -> None:
        self.store_root = store_root
        self.ref = ref
        self.mnt = mnt
        self.backend = backend
        self.container = ""
        self.pid = 0
        os.makedirs(mnt, exist_ok=True)

    def mount(self, ref: str | None = None, *options: str) -> str:
        out = layerfs_cli(self.store_root, "mount", "--backend", self.backend, *options,
                          ref or self.container or self.ref, self.mnt)
        self.container = out.stdout.strip().splitlines()[-1]
        for c in json.loads(layerfs_cli(self.store_root, "ps", "--json").stdout):
            if c["id"] == self.container:
                self.pid = c["pid"] or 0
        return self.mnt

    def umount(self) -> None:
        """Unmount whatever happens: layerfs umount, then fusermount3 -u, then umount -l,
        then kill the serving process if it is still there."""
        try:
            if _mounted(self.mnt):
                layerfs_cli(self.store_root, "umount", self.mnt, check=False)
        finally:
            force_umount(self.mnt)
            if self.pid:
                deadline = time.monotonic() + 5
                while _alive(self.pid) and time.monotonic() < deadline:
                    time.sleep(0.02)
                if _alive(self.pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.pid, signal.SIGKILL)
                self.pid = 0

    def remove(self) -> None:
        if self.container:
            layerfs_cli(self.store_root, "rm", "-f", self.container, check=False)
            self.container = ""


FUSE_LAYERFS = os.path.join(os.path.dirname(sys.executable), "fuse-layerfs")


def fuse_layerfs_pids(mnt: str) -> list[int]:
    """Running fuse-layerfs servers of ``mnt`` (their command line names it): forked by the
    fuse-layerfs command, or started as ``python -m layerfs.unionfs.compat``."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        forked = any(a == b"fuse-layerfs" or a.endswith(b"/fuse-layerfs") for a in args)
        # a forked server has its caller's command line, where the mountpoint may be relative
        target = os.fsencode(mnt)
        names_it = any(a == target or (a and not a.startswith(b"/") and target.endswith(b"/" + a)) for a in args)
        if (forked or b"layerfs.unionfs.compat" in args) and names_it:
            out.append(int(pid))
    return out


class FuseLayerfs:
    """``fuse-layerfs`` over ``lowers`` (bottom first) with a fresh upper, and its undoing."""

    def __init__(self, lowers: list[str], base: str, *options: str) -> None:
        self.lowers = lowers
        self.upper = os.path.join(base, "upper")
        self.work = os.path.join(base, "work")
        self.mnt = os.path.join(base, "mnt")
        self.options = options
        for d in (self.upper, self.work, self.mnt):
            os.makedirs(d, exist_ok=True)
        os.chmod(self.upper, 0o755)

    def mount(self) -> str:
        opts = f"lowerdir={':'.join(reversed(self.lowers))},upperdir={self.upper},workdir={self.work}"
        opts += "".join("," + o for o in self.options)
        res = subprocess.run([FUSE_LAYERFS, "-o", opts, self.mnt], capture_output=True, text=True,
                             timeout=120)
        if res.returncode != 0:
            raise AssertionError(f"fuse-layerfs -o {opts} failed: {res.stderr.strip()}")
        return self.mnt

    def umount(self) -> None:
        """Unmount, then make sure the server has gone (killed if it lingers)."""
        pids = fuse_layerfs_pids(self.mnt)
        force_umount(self.mnt)
        deadline = time.monotonic() + 5
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.02)
        for p in pids:
            if _alive(p):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@dataclass
class Pair:
    kernel: str  # the kernel overlay's mountpoint
    layerfs: str  # the layerfs mountpoint
    k: KernelOverlay
    lf: LayerfsMount

    @property
    def backend(self) -> str:
        return self.lf.backend

    def roots(self):
        return (("kernel", self.kernel), ("layerfs", self.layerfs))


@contextlib.contextmanager
def union_pair(layers: LayerSet, base: str, kernel_options: str | None = None, *,
               keep_container: bool = False, read_only: bool = False, backend: str = "fuse"):
    """Mount the kernel overlay and layerfs (``backend``) over the same layers; always
    unmount both. ``read_only``: the kernel without an upper, layerfs with --read-only.
    The kernel's options default to the ones the backend follows."""
    os.makedirs(base, exist_ok=True)
    if kernel_options is None:
        kernel_options = KERNEL_BACKEND_OPTIONS if backend == "kernel" else KERNEL_OPTIONS
    k = KernelOverlay(layers.lowers, os.path.join(base, "kernel"), kernel_options, read_only=read_only)
    lf = LayerfsMount(layers.store_root, layers.image_id, os.path.join(base, "layerfs"), backend)
    try:
        k.mount()
        lf.mount(None, *(["--read-only"] if read_only else []))
        yield Pair(k.mnt, lf.mnt, k, lf)
    finally:
        try:
            lf.umount()
        finally:
            try:
                k.umount()
            finally:
                if not keep_container:
                    lf.remove()


# -- operations ---------------------------------------------------------------------------

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT = 1, 2, 4


def renameat2(old: str, new: str, flags: int) -> None:
    if _libc.renameat2(-100, os.fsencode(old), -100, os.fsencode(new), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), new)


def norm_time(ns: int):
    return ns if ns < RECENT else "new"


def kind_of(mode: int) -> str:
    return {stat.S_IFREG: "reg", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
            stat.S_IFCHR: "chr", stat.S_IFBLK: "blk", stat.S_IFIFO: "fifo",
            stat.S_IFSOCK: "sock"}[stat.S_IFMT(mode)]


def norm_stat(st: os.stat_result, dir_mtime: bool = True) -> tuple:
    kind = kind_of(st.st_mode)
    return (kind,
            None if kind == "symlink" else oct(stat.S_IMODE(st.st_mode)),
            st.st_uid, st.st_gid,
            st.st_size if kind in ("reg", "symlink") else None,
            None if kind == "dir" else st.st_nlink,
            norm_time(st.st_mtime_ns) if kind != "dir" or dir_mtime else None,
            (os.major(st.st_rdev), os.minor(st.st_rdev)) if kind in ("chr", "blk") else None)


def user_xattrs(path: str) -> dict:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        return {"<listxattr>": errno.errorcode[e.errno]}
    out = {}
    for n in sorted(names):
        if n.startswith("user."):
            try:
                out[n] = os.getxattr(path, n, follow_symlinks=False)
            except OSError as e:
                out[n] = errno.errorcode[e.errno]
    return out


def _read(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _write(path: str, flags: int, data: bytes = b"", offset: int | None = None, mode: int = 0o644):
    fd = os.open(path, flags | os.O_NONBLOCK, mode)  # a fifo without a reader: ENXIO, no hang
    try:
        if offset is not None:
            return os.pwrite(fd, data, offset)
        return os.write(fd, data) if data else 0
    finally:
        os.close(fd)


def _b(v) -> bytes:
    return v if isinstance(v, bytes) else str(v).encode()


def do_op(root: str, op: tuple):
    """Run one operation under ``root``; returns its value (exceptions propagate)."""
    name, *args = op
    P = lambda p: os.path.join(root, p)  # noqa: E731
    if name == "read":
        return _read(P(args[0]))
    if name == "append":
        return _write(P(args[0]), os.O_WRONLY | os.O_APPEND, _b(args[1]))
    if name == "write_at":
        return _write(P(args[0]), os.O_WRONLY, _b(args[2]), offset=args[1])
    if name == "create":  # O_CREAT|O_EXCL
        return _write(P(args[0]), os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode=args[1])
    if name == "create_write":  # O_CREAT|O_TRUNC, then write
        return _write(P(args[0]), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, _b(args[1]))
    if name == "trunc_open":  # O_TRUNC on an existing name, nothing written
        return _write(P(args[0]), os.O_WRONLY | os.O_TRUNC)
    if name == "truncate":
        return os.truncate(P(args[0]), args[1])
    if name == "unlink":
        return os.unlink(P(args[0]))
    if name == "mkdir":
        return os.mkdir(P(args[0]), args[1] if len(args) > 1 else 0o755)
    if name == "rmdir":
        return os.rmdir(P(args[0]))
    if name == "rename":
        flags = args[2] if len(args) > 2 else 0
        return os.rename(P(args[0]), P(args[1])) if not flags else renameat2(P(args[0]), P(args[1]), flags)
    if name == "symlink":
        return os.symlink(args[0], P(args[1]))
    if name == "readlink":
        return os.readlink(P(args[0]))
    if name == "link":
        return os.link(P(args[0]), P(args[1]), follow_symlinks=False)
    if name == "chmod":
        return os.chmod(P(args[0]), args[1])
    if name == "chown":
        return os.chown(P(args[0]), args[1], args[2], follow_symlinks=False)
    if name == "utime":
        return os.utime(P(args[0]), ns=(args[1] * 10**9, args[1] * 10**9), follow_symlinks=False)
    if name == "setxattr":
        flags = args[3] if len(args) > 3 else 0
        return os.setxattr(P(args[0]), args[1], _b(args[2]), flags, follow_symlinks=False)
    if name == "getxattr":
        return os.getxattr(P(args[0]), args[1], follow_symlinks=False)
    if name == "listxattr":
        return sorted(n for n in os.listxattr(P(args[0]), follow_symlinks=False) if n.startswith("user."))
    if name == "removexattr":
        return os.removexattr(P(args[0]), args[1], follow_symlinks=False)
    if name == "mkfifo":
        return os.mkfifo(P(args[0]), args[1] if len(args) > 1 else 0o644)
    if name == "stat":
        return norm_stat(os.lstat(P(args[0])))
    if name == "listdir":
        return sorted(os.listdir(P(args[0])))
    if name == "fallocate":  # (path, mode, offset, length) on a file opened read-write
        fd = os.open(P(args[0]), os.O_RDWR)
        try:
            if _libc.fallocate(fd, args[1], ctypes.c_int64(args[2]), ctypes.c_int64(args[3])) != 0:
                code = ctypes.get_errno()
                raise OSError(code, os.strerror(code))
            return None
        finally:
            os.close(fd)
    raise ValueError(f"unknown op {name}")


_libc = ctypes.CDLL(None, use_errno=True)
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10


# ops whose path argument should keep its inode number (copy-up must not renumber it)
_INO_KEEPING = {"append", "write_at", "trunc_open", "truncate", "chmod", "chown", "utime",
                "setxattr", "removexattr", "read", "stat", "getxattr", "listxattr", "readlink"}


OP_TIMEOUT = 10.0


class OpTimeout(Exception):
    pass


def _timeout(signum, frame):
    raise OpTimeout()


def _ino(path: str):
    try:
        return os.lstat(path).st_ino
    except OSError:
        return None


def outcome(root: str, op: tuple):
    """("ok", value) or ("err", ERRNO), plus whether the inode number was kept."""
    name = op[0]
    watch = None
    if name in _INO_KEEPING or (name == "rename" and (len(op) < 4 or op[3] != RENAME_EXCHANGE)) \
            or name == "link":
        watch = os.path.join(root, op[1])
    before = _ino(watch) if watch else None
    old = signal.signal(signal.SIGALRM, _timeout)
    signal.setitimer(signal.ITIMER_REAL, OP_TIMEOUT)
    try:
        result = ("ok", do_op(root, op))
    except OSError as e:
        result = ("err", errno.errorcode.get(e.errno, e.errno))
    except OpTimeout:
        result = ("hang", f"no answer in {OP_TIMEOUT} s")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    if before is not None and result[0] == "ok":
        after_path = os.path.join(root, op[2]) if name in ("rename", "link") else watch
        after = _ino(after_path)
        result += ("ino kept" if after == before else f"ino changed",)
    return result


def fmt_op(op: tuple) -> str:
    name, *args = op

    def f(a):
        if isinstance(a, int) and name in ("chmod", "mkdir", "create", "mkfifo") and a > 7:
            return oct(a)
        if isinstance(a, str) and len(a) > 40:  # a long name: say how long
            parts = [p if len(p) <= 20 else f"{p[0]}*{len(p)}" for p in a.split("/")]
            return repr("/".join(parts))
        return repr(a)
    return f"{name}({', '.join(f(a) for a in args)})"


class Mismatch(AssertionError):
    pass


def run_ops(pair: Pair, ops: list[tuple], *, check_tree: bool = True, dir_mtimes: bool = True) -> list:
    """Apply ``ops`` to both mounts; every outcome must agree, then the trees must
    (``dir_mtimes=False`` leaves directories' mtimes out of the tree comparison)."""
    done = []
    results = []
    for op in ops:
        k = outcome(pair.kernel, op)
        lf = outcome(pair.layerfs, op)
        done.append(op)
        assert k[0] != "hang", f"the kernel did not answer {fmt_op(op)}: a test that blocks"
        if k != lf:
            history = "\n".join(f"  {i}. {fmt_op(o)}" for i, o in enumerate(done, 1))
            raise Mismatch(f"operation {fmt_op(op)} differs:\n  kernel : {k!r}\n  layerfs: {lf!r}\n"
                           f"sequence:\n{history}")
        results.append(k)
    if check_tree:
        assert_same_trees(pair, ops, dir_mtimes=dir_mtimes)
    return results


# -- whole-tree comparison -----------------------------------------------------------------


@dataclass
class TreeView:
    entries: dict = field(default_factory=dict)  # path -> tuple of visible properties
    links: list = field(default_factory=list)  # hard-link groups (paths sharing st_ino)
    problems: list = field(default_factory=list)  # d_ino != st_ino, duplicate inode numbers


def snapshot(root: str, *, dir_mtimes: bool = True) -> TreeView:
    view = TreeView()
    by_ino: dict[int, list[str]] = {}
    todo = [""]
    while todo:
        rel = todo.pop()
        with os.scandir(os.path.join(root, rel) if rel else root) as it:
            items = sorted(it, key=lambda e: e.name)
        for entry in items:
            path = f"{rel}/{entry.name}" if rel else entry.name
            full = os.path.join(root, path)
            st = os.lstat(full)
            kind = kind_of(st.st_mode)
            if entry.inode() != st.st_ino:
                view.problems.append(f"{path}: readdir d_ino {entry.inode()} != st_ino {st.st_ino}")
            by_ino.setdefault(st.st_ino, []).append((path, kind))
            content = target = None
            if kind == "reg":
                data = _read(full)
                content = data if len(data) <= 64 else hashlib.sha256(data).hexdigest()
            elif kind == "symlink":
                target = os.readlink(full)
            view.entries[path] = norm_stat(st, dir_mtimes) + (content, target, user_xattrs(full))
            if kind == "dir":
                todo.append(path)
    for ino, names in by_ino.items():
        if len(names) > 1:  # hard links (of files, symlinks, fifos): one kind, never dirs
            kinds = {k for _, k in names}
            if len(kinds) == 1 and "dir" not in kinds:
                view.links.append(tuple(sorted(p for p, _ in names)))
            else:
                view.problems.append(f"inode number {ino} shared by {names}")
    view.links.sort()
    return view


FIELDS = ("type", "mode", "uid", "gid", "size", "nlink", "mtime", "rdev", "content", "target", "xattrs")


def tree_diff(a: TreeView, b: TreeView) -> list[str]:
    out = []
    for p in sorted(set(a.entries) | set(b.entries)):
        ea, eb = a.entries.get(p), b.entries.get(p)
        if ea == eb:
            continue
        if ea is None or eb is None:
            out.append(f"/{p}: kernel {ea!r}, layerfs {eb!r}")
            continue
        diffs = [f"{n} {x!r} vs {y!r}" for n, x, y in zip(FIELDS, ea, eb) if x != y]
        out.append(f"/{p}: (kernel vs layerfs) " + "; ".join(diffs))
    if a.links != b.links:
        out.append(f"hard-link groups: kernel {a.links}, layerfs {b.links}")
    return out


def assert_same_trees(pair: Pair, ops=(), *, dir_mtimes: bool = True) -> TreeView:
    k = snapshot(pair.kernel, dir_mtimes=dir_mtimes)
    lf = snapshot(pair.layerfs, dir_mtimes=dir_mtimes)
    lines = tree_diff(k, lf)
    lines += [f"layerfs: {p}" for p in lf.problems]
    lines += [f"kernel: {p}" for p in k.problems]
    if lines:
        history = "\n".join(f"  {i}. {fmt_op(o)}" for i, o in enumerate(ops, 1))
        raise Mismatch("trees differ after the operations:\n" + "\n".join(lines)
                       + (f"\nsequence:\n{history}" if ops else ""))
    return lf


# -- running as another user -------------------------------------------------------------------


def as_user(uid: int, gid: int, fn, *args, cwd: str | None = None):
    """Run ``fn(*args)`` in a forked child with real, effective and saved ids uid/gid;
    returns ("ok", value) or ("err", ERRNO). The child enters ``cwd`` first, as root, so
    relative paths work below directories the user could not search (pytest's 0700
    temporary directories)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(r)
            if cwd is not None:
                os.chdir(cwd)
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            try:
                res = ("ok", fn(*args))
            except OSError as e:
                res = ("err", errno.errorcode.get(e.errno, e.errno))
            os.write(w, pickle.dumps(res))
        except BaseException as e:  # noqa: BLE001
            with contextlib.suppress(Exception):
                os.write(w, pickle.dumps(("crash", repr(e))))
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    res = pickle.loads(data)
    if res[0] == "crash":
        raise AssertionError(f"child as uid {uid} crashed: {res[1]}")
    return res
