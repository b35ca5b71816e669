"""The layer stack the union benchmarks share: generated layers, and the systems that
mount them (a plain directory, the kernel's overlay, fuse-overlayfs, ``layerfs mount``,
``fuse-layerfs``), each with a fresh upper, unmounted and cleaned up whatever happens."""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import errno
import math
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time

from _common import layerfs_cmd, layerfs_server_pid, mountpoints_under, run, server_pid

BIG = "big.bin"
BLOCK = 4 << 20
FUSE_OVERLAYFS = shutil.which("fuse-overlayfs") or "/usr/bin/fuse-overlayfs"
MNT_DETACH = 2


class NotAvailable(Exception):
    """A configuration that cannot be mounted here; the message says why."""


class Interrupted(BaseException):
    """SIGTERM/SIGHUP, turned into an exception so that the cleanup runs."""


def catch_signals() -> None:
    """Ctrl-C as KeyboardInterrupt (also when started with SIGINT ignored), SIGTERM and
    SIGHUP as Interrupted: either way the ``finally`` that unmounts runs."""
    def on_signal(signum, frame):
        raise Interrupted(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)


def finish(bench: "Bench | None", tmp: str, short: str) -> None:
    """Unmount everything below ``tmp`` and ``short``, then remove them (kept, with a
    warning, if something could not be unmounted); a second Ctrl-C cannot stop it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    clean = bench.cleanup() if bench is not None else not mountpoints_under(short, tmp)
    if clean:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(short, ignore_errors=True)
    else:
        print(f"left {tmp} and {short} in place because something is still mounted there", file=sys.stderr)


# -- the layers ---------------------------------------------------------------------


class Plan:
    """What every layer holds; paths relative to the layer root."""

    def __init__(self, nfiles: int, ndirs: int, nlayers: int, nsmall: int, nneg: int, seed: int = 11,
                 wide: int = 0) -> None:
        rng = random.Random(seed)
        groups = max(1, math.isqrt(ndirs))
        self.leaves = sorted(f"g{d % groups:02d}/d{d:03d}" for d in range(ndirs))
        self.parents = sorted({leaf.partition("/")[0] for leaf in self.leaves})
        self.bottom: dict[str, int] = {}  # path -> size
        for i in range(nfiles):
            self.bottom[f"{self.leaves[i % ndirs]}/f{i:05d}.dat"] = rng.randint(256, 4096)
        self.small = sorted(rng.sample(sorted(self.bottom), min(nsmall, nfiles)))
        # wide/: one big directory of the bottom layer that no layer above changes
        self.wide = [f"wide/w{i:05d}" for i in range(wide)]
        wide_rng = random.Random(seed + 1)
        for p in self.wide:
            self.bottom[p] = wide_rng.randint(256, 4096)
        self.dirs = self.parents + self.leaves + (["wide"] if wide else [])
        # layers[k] for k >= 1: (files written: path -> size, whiteouts)
        self.layers: list[tuple[dict[str, int], list[str]]] = [({}, [])]
        protected = set(self.small) | set(self.wide)
        candidates = sorted(p for p in self.bottom if p not in protected)  # kept sorted, for 1,000 layers
        for k in range(1, nlayers):
            files = {p: 40 + rng.randint(0, 200) for p in rng.sample(candidates, 2)}
            gone = rng.choice(candidates)
            while gone in files:
                gone = rng.choice(candidates)
            for j in range(2):
                p = f"{rng.choice(self.leaves)}/l{k:03d}-{j}.dat"
                files[p] = 40 + rng.randint(0, 200)
                bisect.insort(candidates, p)
            del candidates[bisect.bisect_left(candidates, gone)]
            self.layers.append((files, [gone]))
        self.negatives = [f"{self.leaves[i % ndirs]}/missing-{i:05d}" for i in range(nneg)]

    def visible(self, n: int) -> dict[str, tuple[int, int]]:
        """The files of the merged tree of layers 0..n-1 (big.bin aside): path -> (size, layer)."""
        out = {p: (s, 0) for p, s in self.bottom.items()}
        for k in range(1, n):
            files, whiteouts = self.layers[k]
            for p in whiteouts:
                out.pop(p, None)
            for p, s in files.items():
                out[p] = (s, k)
        return out


def content(path: str, size: int, layer: int) -> bytes:
    """Bytes of a small file: random for the bottom layer, a marker line above."""
    if layer == 0:
        return os.urandom(size)
    line = f"{path} written by layer {layer}\n".encode()
    return (line * (size // len(line) + 1))[:size]


def write_layers(plan: Plan, root: str, big_bytes: int) -> list[str]:
    """Write every layer as a directory ``root/K``; returns their paths, bottom first."""
    dirs = []
    for k in range(len(plan.layers)):
        d = os.path.join(root, str(k))
        os.makedirs(d)
        dirs.append(d)
        if k == 0:
            for p in plan.dirs:
                os.mkdir(os.path.join(d, p))
            for p, size in plan.bottom.items():
                with open(os.path.join(d, p), "wb") as f:
                    f.write(content(p, size, 0))
            write_big(os.path.join(d, BIG), big_bytes)
            continue
        files, whiteouts = plan.layers[k]
        for p, size in files.items():
            full = os.path.join(d, p)
            os.makedirs(os.path.dirname(full), exist_ok=True)
            with open(full, "wb") as f:
                f.write(content(p, size, k))
        for p in whiteouts:
            full = os.path.join(d, p)
            os.makedirs(os.path.dirname(full), exist_ok=True)
            os.mknod(full, stat.S_IFCHR | 0o600, os.makedev(0, 0))
    for d in dirs:  # independent of the umask
        for dirpath, dirnames, filenames in os.walk(d):
            os.chmod(dirpath, 0o755)
            for name in filenames:
                full = os.path.join(dirpath, name)
                if stat.S_ISREG(os.lstat(full).st_mode):
                    os.chmod(full, 0o644)
    return dirs


def write_big(path: str, size: int) -> None:
    """A random 4 MiB block repeated, each copy stamped with its index (no two blocks equal)."""
    block = bytearray(os.urandom(BLOCK))
    with open(path, "wb") as f:
        done = 0
        i = 0
        while done < size:
            block[:8] = i.to_bytes(8, "little")
            n = min(BLOCK, size - done)
            f.write(block[:n] if n < BLOCK else block)
            done += n
            i += 1


def build_flat(plan: Plan, layer_dirs: list[str], n: int, dst: str, big_copy: str) -> None:
    """The merged tree of layers 0..n-1 as one plain directory (big.bin hard-linked to a
    private copy, so that writes to it never reach the layers)."""
    os.makedirs(dst)
    for p in plan.dirs:
        os.mkdir(os.path.join(dst, p))
    for p, (_, k) in sorted(plan.visible(n).items()):
        shutil.copy2(os.path.join(layer_dirs[k], p), os.path.join(dst, p))
    os.link(big_copy, os.path.join(dst, BIG))


# -- mounting -------------------------------------------------------------------------

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def is_mounted(path: str) -> bool:
    return os.path.realpath(path) in mountpoints_under(path)


class Mount:
    """One mounted configuration (or the plain directory); ``pid`` is its serving process."""

    def __init__(self, system: str, path: str, seconds: float, pid: int | None = None, **info) -> None:
        self.system, self.path, self.seconds, self.pid, self.info = system, path, seconds, pid, info


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


# The new mount API, for an overlay whose options do not fit in mount(2)'s one page. The
# numbers are the same on every architecture (the syscalls came after the tables merged).
_SYS_MOVE_MOUNT, _SYS_FSOPEN, _SYS_FSCONFIG, _SYS_FSMOUNT = 429, 430, 431, 432
_FSCONFIG_SET_STRING, _FSCONFIG_CMD_CREATE = 1, 6
_CLOEXEC, _MOVE_MOUNT_F_EMPTY_PATH, _AT_FDCWD = 1, 4, -100


def mount_overlay_fsapi(lowers: list[str], upper: str, work: str, target: str) -> None:
    """Mount an overlay with fsopen/fsconfig("lowerdir+", one layer each) and fsmount;
    raises OSError with the kernel's own message (e.g. its limit of lower layers)."""
    sc = _libc.syscall
    sc.restype = ctypes.c_long

    def fail(fd: int, what: str) -> OSError:
        code = ctypes.get_errno()
        log = []
        buf = ctypes.create_string_buffer(4096)
        while fd >= 0 and (n := _libc.read(fd, buf, len(buf))) > 0:
            line = buf.raw[:n].decode(errors="replace").strip()
            log.append(line[2:] if line[1:2] == " " else line)  # "e overlay: ...": drop the level
        return OSError(code, f"{what}: {os.strerror(code)}" + (f" ({'; '.join(log)})" if log else ""))

    fd = sc(_SYS_FSOPEN, b"overlay", _CLOEXEC)
    if fd < 0:
        raise fail(-1, "fsopen(overlay)")
    try:
        for key, value in [("lowerdir+", d) for d in lowers] + [("upperdir", upper), ("workdir", work)]:
            if sc(_SYS_FSCONFIG, fd, _FSCONFIG_SET_STRING, key.encode(), os.fsencode(value), 0) < 0:
                raise fail(fd, f"fsconfig {key}={value}")
        if sc(_SYS_FSCONFIG, fd, _FSCONFIG_CMD_CREATE, None, None, 0) < 0:
            raise fail(fd, "fsconfig create")
        mfd = sc(_SYS_FSMOUNT, fd, _CLOEXEC, 0)
        if mfd < 0:
            raise fail(fd, "fsmount")
        try:
            if sc(_SYS_MOVE_MOUNT, mfd, b"", _AT_FDCWD, os.fsencode(target), _MOVE_MOUNT_F_EMPTY_PATH) < 0:
                raise fail(-1, "move_mount")
        finally:
            os.close(mfd)
    finally:
        os.close(fd)


def fuse_layerfs_cmd() -> list[str] | None:
    """The venv's ``fuse-layerfs`` mount program (None if it is not installed)."""
    script = os.path.join(os.path.dirname(sys.executable), "fuse-layerfs")
    return [script] if os.access(script, os.X_OK) else None


class Bench:
    """Mounts the systems over one set of layers and cleans up after them.

    plain: a flat copy of the merged tree (``self.flat``); kernel: the overlay through
    mount(2) (or the new mount API beyond one page of options); fuse-overlayfs: its own
    process, started with -f; layerfs: ``layerfs mount`` of the imported image;
    fuse-layerfs: the ``fuse-layerfs`` mount program over the same layer directories;
    layerfs-kernel: ``layerfs mount --backend kernel`` of the imported image (the kernel's
    overlay over the image's metadata image and the blob store; no serving process).
    """

    SYSTEMS = ("plain", "kernel", "fuse-overlayfs", "layerfs", "fuse-layerfs", "layerfs-kernel")
    NO_DAEMON = ("plain", "kernel", "layerfs-kernel")  # nothing in user space serves these

    def __init__(self, tmp: str, short: str, layer_dirs: list[str], store: str, big_bytes: int) -> None:
        self.tmp, self.short, self.layer_dirs, self.store = tmp, short, layer_dirs, store
        self.big_bytes = big_bytes
        self.cli = layerfs_cmd()
        self.active: list[Mount] = []
        self.seq = 0
        self.mnt = os.path.join(short, "m")  # one mountpoint, reused
        os.mkdir(self.mnt)
        for k, d in enumerate(layer_dirs):
            os.symlink(d, os.path.join(short, str(k)))
        self.flat: str | None = None
        self.big_blob: str | None = None  # layerfs's copy of big.bin in the store

    def _fresh_upper(self) -> tuple[str, str]:
        self.seq += 1
        upper, work = os.path.join(self.short, f"u{self.seq}"), os.path.join(self.short, f"w{self.seq}")
        os.mkdir(upper)
        os.mkdir(work)
        return upper, work

    def mount(self, system: str, n: int, lowers: list[str] | None = None, image: str | None = None,
              options: tuple[str, ...] = ()) -> Mount:
        """Mount ``system`` over the bottom ``n`` generated layers (or over ``lowers``,
        bottom first, and the layerfs ``image`` made of them) at ``self.mnt``.
        ``options``: extra FUSE mount options (the FUSE systems only)."""
        if lowers is None:
            lowers = [os.path.join(self.short, str(k)) for k in range(n)]
        top_first = list(reversed(lowers))
        if system == "plain":
            return Mount("plain", self.flat, 0.0)
        if system == "kernel":
            upper, work = self._fresh_upper()
            opts = f"lowerdir={':'.join(top_first)},upperdir={upper},workdir={work}"
            fits = len(opts) + 1 <= os.sysconf("SC_PAGE_SIZE")
            t0 = time.perf_counter()
            try:
                if fits:
                    if _libc.mount(b"overlay", os.fsencode(self.mnt), b"overlay", 0, opts.encode()) != 0:
                        code = ctypes.get_errno()
                        raise OSError(code, f"mount(2) overlay: {os.strerror(code)}{_dmesg_tail()}")
                else:
                    mount_overlay_fsapi(top_first, upper, work, self.mnt)
            except OSError as e:
                shutil.rmtree(upper), shutil.rmtree(work)
                raise NotAvailable(f"the kernel did not mount {len(lowers)} lower layers: {e.strerror}") from None
            m = Mount(system, self.mnt, time.perf_counter() - t0, upper=upper, work=work)
            self.active.append(m)
            return m
        extra = [",".join(options)] if options else []
        if system == "fuse-overlayfs":
            if not os.access(FUSE_OVERLAYFS, os.X_OK):
                raise NotAvailable(f"{FUSE_OVERLAYFS} is not installed (apt-get install -y fuse-overlayfs)")
            upper, work = self._fresh_upper()
            log = os.path.join(self.tmp, f"fuse-overlayfs-{self.seq}.log")
            opts = f"lowerdir={':'.join(top_first)},upperdir={upper},workdir={work}"
            t0 = time.perf_counter()
            with open(log, "wb") as logf:  # -f: our child, in its own session (Ctrl-C spares it)
                proc = subprocess.Popen([FUSE_OVERLAYFS, "-f", "-o", opts, *(["-o"] + extra if extra else []),
                                         self.mnt], stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                        start_new_session=True)
            m = Mount(system, self.mnt, 0.0, proc.pid, upper=upper, work=work, proc=proc, log=log)
            self.active.append(m)
            deadline = time.monotonic() + 60
            while not is_mounted(self.mnt):
                if proc.poll() is not None or time.monotonic() > deadline:
                    self.unmount(m)
                    with open(log, errors="replace") as f:
                        why = f.read().strip().replace("\n", "; ")
                    raise NotAvailable(f"fuse-overlayfs did not mount (exit {proc.returncode}): {why}")
                time.sleep(0.002)
            m.seconds = time.perf_counter() - t0
            return m
        if system == "fuse-layerfs":
            cmd = fuse_layerfs_cmd()
            if cmd is None:
                raise NotAvailable(f"no fuse-layerfs next to {sys.executable} (pip install -e .)")
            upper, work = self._fresh_upper()
            opts = ",".join([f"lowerdir={':'.join(top_first)},upperdir={upper},workdir={work}"] + extra)
            # registered before it is known to exist: cleanup finds it by path
            m = Mount(system, self.mnt, 0.0, upper=upper, work=work)
            self.active.append(m)
            t0 = time.perf_counter()
            p = subprocess.run(cmd + ["-o", opts, self.mnt], stdin=subprocess.DEVNULL, capture_output=True)
            m.seconds = time.perf_counter() - t0
            try:
                m.pid = server_pid(self.mnt, "fuse-layerfs") if p.returncode == 0 else None
            except RuntimeError:
                pass
            if m.pid is None:
                self.unmount(m)
                why = p.stderr.decode(errors="replace").strip() or "its server is not running"
                raise NotAvailable(f"fuse-layerfs did not mount (exit {p.returncode}): {why}")
            return m
        if system in ("layerfs", "layerfs-kernel"):
            m = Mount(system, self.mnt, 0.0, container=None)
            self.active.append(m)
            cmd = self.cli + ["mount", "--root", self.store, image or f"bench:{n}", self.mnt]
            cmd += ["--backend", "kernel"] if system == "layerfs-kernel" else []
            cmd += ["-o", extra[0]] if extra else []
            t0 = time.perf_counter()
            try:
                p = run(cmd)
            except RuntimeError as e:
                self.unmount(m)
                raise NotAvailable(f"layerfs mount failed: {e}") from None
            m.seconds = time.perf_counter() - t0
            m.info["container"] = p.stdout.decode().strip()
            if system == "layerfs-kernel":
                return m
            try:
                m.pid = layerfs_server_pid(self.store, self.mnt)
            except RuntimeError as e:
                self.unmount(m)
                raise NotAvailable(f"layerfs mount returned, but {e}") from None
            return m
        raise ValueError(system)

    def unmount(self, m: Mount) -> None:
        """Unmount and remove the upper; never raises (reports what it could not do)."""
        if m.system == "plain":
            return
        try:
            for sub in mountpoints_under(m.path):  # what a workload mounted inside (chroot binds)
                if sub != os.path.realpath(m.path) and _libc.umount2(os.fsencode(sub), 0) != 0:
                    _libc.umount2(os.fsencode(sub), MNT_DETACH)
            if m.system == "kernel":
                for attempt in range(50):
                    if _libc.umount2(os.fsencode(m.path), 0) == 0 or not is_mounted(m.path):
                        break
                    if ctypes.get_errno() != errno.EBUSY or attempt == 49:
                        _libc.umount2(os.fsencode(m.path), MNT_DETACH)
                        break
                    time.sleep(0.1)
            elif m.system in ("fuse-overlayfs", "fuse-layerfs"):
                if is_mounted(m.path):
                    if subprocess.run(["fusermount3", "-u", m.path], capture_output=True).returncode != 0:
                        subprocess.run(["umount", "-l", m.path], capture_output=True)
                if "proc" in m.info:
                    try:
                        m.info["proc"].wait(timeout=20)
                    except subprocess.TimeoutExpired:
                        m.info["proc"].kill()
                        m.info["proc"].wait()
                elif m.pid is not None:  # fuse-layerfs's server is not our child
                    deadline = time.monotonic() + 20
                    while _pid_alive(m.pid) and time.monotonic() < deadline:
                        time.sleep(0.01)
                    if _pid_alive(m.pid):
                        os.kill(m.pid, signal.SIGKILL)
            elif m.system in ("layerfs", "layerfs-kernel"):
                if m.info.get("container"):
                    # What ``layerfs rm -f`` does (unmount, wait for the server, remove the
                    # container and its upper), without a CLI start-up per mount: untimed.
                    from layerfs.store import Store
                    from layerfs.unionfs.mount import remove

                    try:
                        with Store(self.store) as store:
                            remove(store, m.info["container"], force=True)
                    except Exception as e:  # noqa: BLE001 - reported; the unmount below still runs
                        print(f"  warning: removing container {m.info['container']}: {e}", file=sys.stderr)
                if is_mounted(m.path):
                    if subprocess.run(["fusermount3", "-u", m.path], capture_output=True).returncode != 0:
                        subprocess.run(["umount", "-l", m.path], capture_output=True)
        finally:
            if m in self.active:
                self.active.remove(m)
            if is_mounted(m.path):
                print(f"  warning: {m.path} is still mounted", file=sys.stderr)
            else:
                for key in ("upper", "work"):
                    if m.info.get(key):
                        shutil.rmtree(m.info[key], ignore_errors=True)

    def cleanup(self) -> bool:
        """Unmount everything still mounted below our directories; True if nothing is left."""
        for m in list(self.active):
            self.unmount(m)
        for path in mountpoints_under(self.short, self.tmp):  # anything we lost track of
            if subprocess.run(["umount", path], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", path], capture_output=True)
        left = mountpoints_under(self.short, self.tmp)
        if left:
            print(f"warning: still mounted, not removing them: {', '.join(left)}", file=sys.stderr)
        return not left

    def underlying_big(self, system: str) -> str:
        """The file that holds big.bin's data for ``system`` (to warm the page cache)."""
        if system == "plain":
            return os.path.join(self.flat, BIG)
        if system in ("layerfs", "layerfs-kernel"):
            if self.big_blob is None:
                for dirpath, _, files in os.walk(os.path.join(self.store, "blobs")):
                    for name in files:
                        if os.path.getsize(os.path.join(dirpath, name)) == self.big_bytes:
                            self.big_blob = os.path.join(dirpath, name)
                if self.big_blob is None:
                    raise RuntimeError("cannot find big.bin's blob in the layerfs store")
            return self.big_blob
        return os.path.join(self.layer_dirs[0], BIG)


def _dmesg_tail() -> str:
    try:
        out = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=5).stdout
        lines = [l for l in out.splitlines() if "overlay" in l]
        return f" (dmesg: {lines[-1].strip()})" if lines else ""
    except (OSError, subprocess.SubprocessError):
        return ""


# -- workloads ------------------------------------------------------------------------


def read_all(path: str, buf: bytearray | None = None) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        if buf is None:
            total = 0
            while chunk := os.read(fd, 1 << 20):
                total += len(chunk)
            return total
        total = 0
        with open(fd, "rb", buffering=0, closefd=False) as f:
            while n := f.readinto(buf):
                total += n
        return total
    finally:
        os.close(fd)


class Check(Exception):
    """A mount showed something other than the expected tree."""


def walk(root: str) -> tuple[int, int]:
    nfiles = nbytes = 0
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            nbytes += os.lstat(os.path.join(dirpath, name)).st_size
            nfiles += 1
    return nfiles, nbytes



def layerfs_code() -> dict:
    """Which layerfs code runs: PYTHONPATH (if set, it comes first) and the checkout's HEAD."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        head = "?"
    return {"pythonpath": os.environ.get("PYTHONPATH", ""), "checkout": repo, "checkout_head": head}


def version(cmd: list[str]) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        lines = (p.stdout + p.stderr).splitlines()
        return "; ".join(l for l in lines if "version" in l) or (lines[0] if lines else "?")
    except (OSError, subprocess.SubprocessError):
        return "?"


