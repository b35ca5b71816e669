"""The union filesystem side by side: layerfs, kernel overlayfs, fuse-overlayfs, a plain dir.

One stack of layers is generated in a temporary directory (removed at the end):

* layer 0 (the bottom): --files small files (256 B - 4 KiB of random bytes) spread over
  --dirs leaf directories (grouped under ~sqrt(--dirs) parents), plus ``big.bin``, one
  --big-mib MiB file;
* every layer above changes a few files: it rewrites 2 files, adds 2 new ones and
  whites out 1 (a character device 0/0, the overlayfs whiteout, which all three union
  filesystems honour). ``big.bin`` and the files read by the small-read workload are
  never touched, so they come from the bottom layer at every depth.

For each depth N of --layers (default 1,8,32,128) the same N layers are served by

* ``plain``          the merged tree of the N layers copied flat into one directory
                     (no union at all: the floor);
* ``kernel``         ``mount -t overlay`` (mount(2) called directly) with the N layer
                     directories as lowerdirs, module defaults (no metacopy, no
                     redirect_dir, no index). The lowerdirs are short symlinks
                     (/tmp/lbXXXXXXXX/0, /1, ...) so 128 layers fit into the one page
                     that mount(2) accepts for options;
* ``fuse-overlayfs`` /usr/bin/fuse-overlayfs with the same lowerdirs, default options;
* ``layerfs``        the same directories imported with ``layerfs import-dir``, each
                     layer on the previous image, mounted with ``layerfs mount``;
* ``layerfs-kernel`` the same images mounted with ``layerfs mount --backend kernel``:
                     the kernel's overlayfs over the image's metadata image and the
                     blob store (one metadata layer whatever the depth). The metadata
                     image of each depth is built before the timed runs, by a first
                     mount whose time is reported apart (setup).

A configuration that cannot be mounted is reported (with the reason) and shown as n/a.

Workloads. Each group runs on a fresh mount with a fresh, empty upper directory (for
``plain``, a write is undone untimed afterwards). Dirty pages are written back (sync,
untimed) before every workload; "cold" means the page cache, dentries and inodes were
also dropped (``echo 3 > /proc/sys/vm/drop_caches``) just before it.

* cold walk    os.walk over the whole mount + lstat of every file (cold)
* warm walk    the same again, on the same mount
* negative     10,000 stats of names that do not exist, spread over the leaf dirs
* seq read     read big.bin sequentially in 1 MiB reads (cold)
* small read   open, read and close 2,000 small bottom-layer files (cold)
* copy-up      open big.bin O_APPEND, write 1 byte, close: copies 1 GiB up. big.bin's
               lower data is read once untimed before, so the copy reads from memory
* chmod        chmod 0600 big.bin (a full copy-up without metacopy; lower data warm
               as for copy-up)
* create       mkdir + create 5,000 empty files in it
* mount        wall time until the mount serves (layerfs, layerfs-kernel: ``layerfs
               mount`` returns; fuse-overlayfs: the mount appears in /proc/self/mountinfo)

Each group is repeated --repeat times (default 3; the systems take turns within a
repeat) and the median is reported in seconds, with ratios to fuse-overlayfs (and of
layerfs-kernel to the kernel overlay over the extracted layers). Every run
checks what it saw: the walk must find exactly the files of the simulated merged tree
with the right total size, every read the right number of bytes, every write must show.

Everything that is mounted is unmounted in a ``finally`` (also on Ctrl-C or SIGTERM),
and the temporary directories are removed once nothing is mounted below them.

Needs root (mount(2), drop_caches), /dev/fuse, the overlay module and fuse-overlayfs.

    .venv/bin/python benchmarks/bench_union.py [--quick] [--layers 1,8,32,128]
        [--repeat 3] [--big-mib 1024] [--json union.json]
"""

from __future__ import annotations

import argparse
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
import tempfile
import time

from _common import layerfs_cmd, loadavg, machine, median, print_table, run, write_json

SYSTEMS = ("plain", "kernel", "fuse-overlayfs", "layerfs", "layerfs-kernel")
RATIO_BASE = "fuse-overlayfs"
LAYERFS = ("layerfs", "layerfs-kernel")
GROUPS = {  # a group runs on one fresh mount
    "walk": ("cold_walk", "warm_walk"),
    "negative": ("negative",),
    "seq_read": ("seq_read",),
    "small_read": ("small_read",),
    "copy_up": ("copy_up",),
    "chmod": ("chmod",),
    "create": ("create",),
}
LABELS = {
    "mount": "mount",
    "cold_walk": "cold walk + lstat",
    "warm_walk": "warm walk + lstat",
    "negative": "negative lookups",
    "seq_read": "seq read big (cold)",
    "small_read": "read small files (cold)",
    "copy_up": "copy-up big (append 1 B)",
    "chmod": "chmod big",
    "create": "create files",
}
BIG = "big.bin"
BLOCK = 4 << 20
FUSE_OVERLAYFS = shutil.which("fuse-overlayfs") or "/usr/bin/fuse-overlayfs"
MNT_DETACH = 2


class NotAvailable(Exception):
    """A configuration that cannot be mounted here; the message says why."""


class Interrupted(BaseException):
    """SIGTERM/SIGHUP, turned into an exception so that the cleanup runs."""


# -- the layers ---------------------------------------------------------------------


class Plan:
    """What every layer holds; paths relative to the layer root."""

    def __init__(self, nfiles: int, ndirs: int, nlayers: int, nsmall: int, nneg: int, seed: int = 11) -> None:
        rng = random.Random(seed)
        groups = max(1, math.isqrt(ndirs))
        self.leaves = sorted(f"g{d % groups:02d}/d{d:03d}" for d in range(ndirs))
        self.parents = sorted({leaf.partition("/")[0] for leaf in self.leaves})
        self.bottom: dict[str, int] = {}  # path -> size
        for i in range(nfiles):
            self.bottom[f"{self.leaves[i % ndirs]}/f{i:05d}.dat"] = rng.randint(256, 4096)
        self.small = sorted(rng.sample(sorted(self.bottom), min(nsmall, nfiles)))
        protected = set(self.small)
        # layers[k] for k >= 1: (files written: path -> size, whiteouts)
        self.layers: list[tuple[dict[str, int], list[str]]] = [({}, [])]
        alive = dict(self.bottom)
        for k in range(1, nlayers):
            candidates = sorted(p for p in alive if p not in protected)
            files = {p: 40 + rng.randint(0, 200) for p in rng.sample(candidates, 2)}
            for j in range(2):
                files[f"{rng.choice(self.leaves)}/l{k:03d}-{j}.dat"] = 40 + rng.randint(0, 200)
            gone = rng.choice([p for p in candidates if p not in files])
            alive.update(files)
            del alive[gone]
            self.layers.append((files, [gone]))
        self.negatives = [f"{self.leaves[i % ndirs]}/missing-{i:05d}" for i in range(nneg)]

    def visible(self, n: int) -> dict[str, tuple[int, int]]:
        """The small files of the merged tree of layers 0..n-1: path -> (size, layer)."""
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
            for p in plan.parents:
                os.mkdir(os.path.join(d, p))
            for leaf in plan.leaves:
                os.mkdir(os.path.join(d, leaf))
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
    for p in plan.parents:
        os.mkdir(os.path.join(dst, p))
    for leaf in plan.leaves:
        os.mkdir(os.path.join(dst, leaf))
    for p, (_, k) in sorted(plan.visible(n).items()):
        shutil.copy2(os.path.join(layer_dirs[k], p), os.path.join(dst, p))
    os.link(big_copy, os.path.join(dst, BIG))


# -- mounting -------------------------------------------------------------------------

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def mountpoints_under(*roots: str) -> list[str]:
    """Mount points at or below any of ``roots`` (deepest first)."""
    roots = tuple(os.path.realpath(r) for r in roots)
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mnt = line.split()[4].encode().decode("unicode_escape")
            if any(mnt == r or mnt.startswith(r + "/") for r in roots):
                out.append(mnt)
    return sorted(out, key=len, reverse=True)


def is_mounted(path: str) -> bool:
    return os.path.realpath(path) in mountpoints_under(path)


class Mount:
    """One mounted configuration (or the plain directory)."""

    def __init__(self, system: str, path: str, seconds: float, **info) -> None:
        self.system, self.path, self.seconds, self.info = system, path, seconds, info


class Bench:
    """Mounts the four systems over one set of layers and cleans up after them."""

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

    def _overlay_options(self, n: int, upper: str, work: str) -> str:
        lowers = ":".join(os.path.join(self.short, str(k)) for k in reversed(range(n)))  # top first
        return f"lowerdir={lowers},upperdir={upper},workdir={work}"

    def mount(self, system: str, n: int) -> Mount:
        if system == "plain":
            return Mount("plain", self.flat, 0.0)
        if system == "kernel":
            upper, work = self._fresh_upper()
            opts = self._overlay_options(n, upper, work)
            page = os.sysconf("SC_PAGE_SIZE")
            if len(opts) + 1 > page:
                shutil.rmtree(upper), shutil.rmtree(work)
                raise NotAvailable(f"the mount(2) option string is {len(opts) + 1} bytes, more than "
                                   f"one page ({page})")
            t0 = time.perf_counter()
            rc = _libc.mount(b"overlay", os.fsencode(self.mnt), b"overlay", 0, opts.encode())
            secs = time.perf_counter() - t0
            if rc != 0:
                code = ctypes.get_errno()
                shutil.rmtree(upper), shutil.rmtree(work)
                raise NotAvailable(f"mount(2) overlay failed: {os.strerror(code)}{_dmesg_tail()}")
            m = Mount(system, self.mnt, secs, upper=upper, work=work)
            self.active.append(m)
            return m
        if system == "fuse-overlayfs":
            if not os.access(FUSE_OVERLAYFS, os.X_OK):
                raise NotAvailable(f"{FUSE_OVERLAYFS} is not installed (apt-get install -y fuse-overlayfs)")
            upper, work = self._fresh_upper()
            log = os.path.join(self.tmp, f"fuse-overlayfs-{self.seq}.log")
            t0 = time.perf_counter()
            with open(log, "wb") as logf:  # -f: our child, in its own session (Ctrl-C spares it)
                proc = subprocess.Popen([FUSE_OVERLAYFS, "-f", "-o", self._overlay_options(n, upper, work),
                                         self.mnt], stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                        start_new_session=True)
            m = Mount(system, self.mnt, 0.0, upper=upper, work=work, proc=proc, log=log)
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
        if system in LAYERFS:
            t0 = time.perf_counter()
            # the mount is registered before it is known to exist: cleanup finds it by path
            m = Mount(system, self.mnt, 0.0, container=None)
            self.active.append(m)
            backend = "kernel" if system == "layerfs-kernel" else "fuse"
            try:
                p = run(self.cli + ["mount", "--root", self.store, "--backend", backend, f"bench:{n}", self.mnt])
            except RuntimeError as e:
                self.unmount(m)
                raise NotAvailable(f"layerfs mount failed: {e}") from None
            m.seconds = time.perf_counter() - t0
            m.info["container"] = p.stdout.decode().strip()
            return m
        raise ValueError(system)

    def unmount(self, m: Mount) -> None:
        """Unmount and remove the upper; never raises (reports what it could not do)."""
        if m.system == "plain":
            return
        try:
            if m.system == "kernel":
                for attempt in range(50):
                    if _libc.umount2(os.fsencode(m.path), 0) == 0 or not is_mounted(m.path):
                        break
                    if ctypes.get_errno() != errno.EBUSY or attempt == 49:
                        _libc.umount2(os.fsencode(m.path), MNT_DETACH)
                        break
                    time.sleep(0.1)
            elif m.system == "fuse-overlayfs":
                if is_mounted(m.path):
                    if subprocess.run(["fusermount3", "-u", m.path], capture_output=True).returncode != 0:
                        subprocess.run(["umount", "-l", m.path], capture_output=True)
                proc = m.info["proc"]
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            elif m.system in LAYERFS:
                if is_mounted(m.path):
                    res = subprocess.run(self.cli + ["umount", "--root", self.store, m.path],
                                         capture_output=True, text=True)
                    if res.returncode != 0:
                        print(f"  warning: layerfs umount: {res.stderr.strip()}", file=sys.stderr)
                        if subprocess.run(["fusermount3", "-u", m.path], capture_output=True).returncode != 0:
                            subprocess.run(["umount", "-l", m.path], capture_output=True)
                if m.info.get("container"):  # its upper holds up to a copy of big.bin
                    subprocess.run(self.cli + ["rm", "-f", "--root", self.store, m.info["container"]],
                                   capture_output=True)
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
        if system in LAYERFS:
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


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


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


def run_group(bench: Bench, group: str, m: Mount, plan: Plan, n: int, args) -> dict[str, float]:
    """Time one group of workloads on the mount ``m``; returns workload -> seconds."""
    root = m.path
    big = os.path.join(root, BIG)
    out: dict[str, float] = {}
    if group == "walk":
        vis = plan.visible(n)
        want = (len(vis) + 1, sum(s for s, _ in vis.values()) + bench.big_bytes)
        for name in ("cold_walk", "warm_walk"):
            if name == "cold_walk":
                drop_caches()
            else:
                os.sync()
            t0 = time.perf_counter()
            got = walk(root)
            out[name] = time.perf_counter() - t0
            if got != want:
                raise Check(f"{name}: found {got[0]} files / {got[1]} bytes, expected {want[0]} / {want[1]}")
    elif group == "negative":
        paths = [os.path.join(root, p) for p in plan.negatives]
        os.sync()
        found = 0
        t0 = time.perf_counter()
        for p in paths:
            try:
                os.stat(p)
                found += 1
            except FileNotFoundError:
                pass
        out["negative"] = time.perf_counter() - t0
        if found:
            raise Check(f"negative: {found} missing names were found")
    elif group == "seq_read":
        drop_caches()
        buf = bytearray(1 << 20)
        t0 = time.perf_counter()
        got = read_all(big, buf)
        out["seq_read"] = time.perf_counter() - t0
        if got != bench.big_bytes:
            raise Check(f"seq_read: read {got} bytes of {bench.big_bytes}")
    elif group == "small_read":
        paths = [os.path.join(root, p) for p in plan.small]
        want = sum(plan.bottom[p] for p in plan.small)
        drop_caches()
        t0 = time.perf_counter()
        got = sum(read_all(p) for p in paths)
        out["small_read"] = time.perf_counter() - t0
        if got != want:
            raise Check(f"small_read: read {got} bytes, expected {want}")
    elif group in ("copy_up", "chmod"):
        read_all(bench.underlying_big(m.system), bytearray(1 << 20))  # lower data warm
        os.sync()
        try:
            t0 = time.perf_counter()
            if group == "copy_up":
                fd = os.open(big, os.O_WRONLY | os.O_APPEND)
                os.write(fd, b"x")
                os.close(fd)
            else:
                os.chmod(big, 0o600)
            out[group] = time.perf_counter() - t0
            st = os.stat(big)
            if group == "copy_up" and st.st_size != bench.big_bytes + 1:
                raise Check(f"copy_up: size {st.st_size} after the append, expected {bench.big_bytes + 1}")
            if group == "chmod" and stat.S_IMODE(st.st_mode) != 0o600:
                raise Check(f"chmod: mode {stat.S_IMODE(st.st_mode):o} after chmod 600")
        finally:
            if m.system == "plain":  # undo, untimed
                os.truncate(big, bench.big_bytes)
                os.chmod(big, 0o644)
    elif group == "create":
        d = os.path.join(root, "new")
        names = [os.path.join(d, f"c{i:05d}") for i in range(args.creates)]
        os.sync()
        try:
            t0 = time.perf_counter()
            os.mkdir(d)
            for p in names:
                os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            out["create"] = time.perf_counter() - t0
            if len(os.listdir(d)) != args.creates:
                raise Check(f"create: {len(os.listdir(d))} files listed, expected {args.creates}")
        finally:
            if m.system == "plain":
                shutil.rmtree(d, ignore_errors=True)
    else:
        raise ValueError(group)
    return out


# -- the run --------------------------------------------------------------------------


def fmt(v: float | None) -> str:
    if v is None:
        return "n/a"
    if v >= 100:
        return f"{v:.1f}"
    if v >= 10:
        return f"{v:.2f}"
    if v >= 1:
        return f"{v:.3f}"
    return f"{v:.4f}"


def workload_names(groups: list[str]) -> list[str]:
    return ["mount"] + [w for g in groups for w in GROUPS[g]]


def print_results(results: dict, systems: list[str], groups: list[str]) -> None:
    names = workload_names(groups)
    others = [s for s in systems if s != RATIO_BASE]
    for depth in results["depths"]:
        n = depth["layers"]
        print(f"\n{n} layer{'s' if n > 1 else ''}: median seconds of {results['repeat']} run(s); "
              f"ratio = time / {RATIO_BASE} time")
        for s in systems:
            if s in depth["not_available"]:
                print(f"  {s}: n/a: {depth['not_available'][s]}")
        header = ["workload"] + systems
        if RATIO_BASE in systems:
            header += [f"{s}/fuse" for s in others]
        vs_kernel = "kernel" in systems and "layerfs-kernel" in systems
        if vs_kernel:
            header.append("layerfs-kernel/kernel")
        rows = [header]
        for w in names:
            med = {s: depth["median_s"].get(s, {}).get(w) for s in systems}
            row = [LABELS[w]] + [fmt(med[s]) for s in systems]
            if RATIO_BASE in systems:
                base = med[RATIO_BASE]
                for s in others:
                    row.append(f"{med[s] / base:.2f}x" if med[s] is not None and base else "n/a")
            if vs_kernel:
                lk, k = med["layerfs-kernel"], med["kernel"]
                row.append(f"{lk / k:.2f}x" if lk is not None and k else "n/a")
            rows.append(row)
        print_table(rows)
        for err in depth["errors"]:
            print(f"  error: {err}")
    for system, base, key in (("layerfs", RATIO_BASE, "ratio_to_fuse"),
                              ("layerfs-kernel", "kernel", "ratio_to_kernel")):
        if system not in systems or base not in systems:
            continue
        print(f"\n{system} / {base} by depth")
        rows = [["workload"] + [f"{d['layers']} layer{'s' if d['layers'] > 1 else ''}" for d in results["depths"]]]
        for w in names:
            row = [LABELS[w]]
            for d in results["depths"]:
                r = d[key].get(system, {}).get(w)
                row.append(f"{r:.2f}x" if r is not None else "n/a")
            rows.append(row)
        print_table(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default=None, help="comma-separated depths (default 1,8,32,128)")
    ap.add_argument("--repeat", type=int, default=None, help="runs of every workload (default 3)")
    ap.add_argument("--big-mib", type=int, default=None, help="size of big.bin in MiB (default 1024)")
    ap.add_argument("--files", type=int, default=20000, help="small files in the bottom layer (default 20000)")
    ap.add_argument("--dirs", type=int, default=400, help="leaf directories of the bottom layer (default 400)")
    ap.add_argument("--small-reads", type=int, default=2000, help="small files read (default 2000)")
    ap.add_argument("--negatives", type=int, default=10000, help="stats of missing names (default 10000)")
    ap.add_argument("--creates", type=int, default=5000, help="files created (default 5000)")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"subset of {','.join(SYSTEMS)}")
    ap.add_argument("--workloads", default=",".join(GROUPS),
                    help=f"subset of {','.join(GROUPS)} (walk = cold + warm walk)")
    ap.add_argument("--quick", action="store_true", help="layers 1,8; big file 128 MiB; repeat 1")
    ap.add_argument("--json", help="write every run and the medians as JSON to this path")
    ap.add_argument("--tmpdir", default=None, help="where to put layers, store and uppers (default /tmp)")
    args = ap.parse_args()
    depths = [int(x) for x in (args.layers or ("1,8" if args.quick else "1,8,32,128")).split(",")]
    repeat = args.repeat or (1 if args.quick else 3)
    big_mib = args.big_mib or (128 if args.quick else 1024)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    groups = [g.strip() for g in args.workloads.split(",") if g.strip()]
    if bad := [s for s in systems if s not in SYSTEMS] + [g for g in groups if g not in GROUPS]:
        ap.error(f"unknown system or workload: {', '.join(bad)}")
    if min(depths) < 1:
        ap.error("--layers: depths start at 1")
    if os.geteuid() != 0:
        print("bench_union.py needs root (mount(2), drop_caches)", file=sys.stderr)
        return 2

    def on_signal(signum, frame):
        raise Interrupted(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with SIGINT ignored
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    t_start = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="layerfs-bench-union-", dir=args.tmpdir)
    short = tempfile.mkdtemp(prefix="lb", dir="/tmp")  # /tmp/lbXXXXXXXX: short lowerdir paths
    bench = None
    clean = False
    try:
        big_bytes = big_mib << 20
        nlayers = max(depths)
        results: dict = {
            "benchmark": "union", "machine": machine(tmp), "repeat": repeat, "layers": depths,
            "systems": systems, "workloads": workload_names(groups),
            "config": {"files": args.files, "dirs": args.dirs, "big_mib": big_mib,
                       "small_reads": args.small_reads, "negatives": args.negatives,
                       "creates": args.creates},
            "fuse_overlayfs": _version([FUSE_OVERLAYFS, "--version"]),
            "layerfs_cmd": layerfs_cmd(), "layerfs_code": _layerfs_code(), "setup_s": {}, "depths": []}
        print(f"working in {tmp} (short lowerdir links in {short})", flush=True)

        t0 = time.perf_counter()
        plan = Plan(args.files, args.dirs, nlayers, args.small_reads, args.negatives)
        print(f"writing {nlayers} layers: {args.files} small files in {len(plan.leaves)} dirs and "
              f"a {big_mib} MiB file at the bottom ...", flush=True)
        layer_dirs = write_layers(plan, os.path.join(tmp, "layers"), big_bytes)
        results["setup_s"]["write_layers"] = round(time.perf_counter() - t0, 2)

        store = os.path.join(tmp, "store")
        bench = Bench(tmp, short, layer_dirs, store, big_bytes)
        if set(LAYERFS) & set(systems):
            print(f"importing {nlayers} layers with layerfs import-dir ...", flush=True)
            t0 = time.perf_counter()
            parent = None
            for k, d in enumerate(layer_dirs):
                cmd = bench.cli + ["import-dir", "--root", store, d]
                cmd += ["--parent", parent] if parent else []
                cmd += ["-t", f"bench:{k + 1}"] if k + 1 in depths else []
                t1 = time.perf_counter()
                parent = run(cmd).stdout.decode().strip()
                if k == 0:
                    results["setup_s"]["import_bottom"] = round(time.perf_counter() - t1, 2)
            results["setup_s"]["import_all"] = round(time.perf_counter() - t0, 2)
        big_copy = os.path.join(tmp, "big-copy.bin")
        if "plain" in systems:
            shutil.copyfile(os.path.join(layer_dirs[0], BIG), big_copy)

        for n in depths:
            depth = {"layers": n, "visible_files": len(plan.visible(n)) + 1, "not_available": {},
                     "runs_s": {s: {w: [] for w in workload_names(groups)} for s in systems},
                     "errors": []}
            if "layerfs-kernel" in systems:  # the first mount builds the metadata image
                try:
                    m = bench.mount("layerfs-kernel", n)
                    results["setup_s"][f"first_kernel_mount_{n}"] = round(m.seconds, 3)
                    bench.unmount(m)
                except NotAvailable as e:
                    depth["not_available"]["layerfs-kernel"] = str(e)
                    print(f"[{n} layers] layerfs-kernel: n/a: {e}", flush=True)
            if "plain" in systems:
                t0 = time.perf_counter()
                bench.flat = os.path.join(tmp, f"flat-{n}")
                build_flat(plan, layer_dirs, n, bench.flat, big_copy)
                results["setup_s"][f"flat_{n}"] = round(time.perf_counter() - t0, 2)
            for rep in range(repeat):
                for s in systems:
                    if s in depth["not_available"]:
                        continue
                    line = []
                    for g in groups:
                        try:
                            m = bench.mount(s, n)
                        except NotAvailable as e:
                            depth["not_available"][s] = str(e)
                            print(f"[{n} layers] {s}: n/a: {e}", flush=True)
                            break
                        try:
                            depth["runs_s"][s]["mount"].append(m.seconds)
                            times = run_group(bench, g, m, plan, n, args)
                        except (OSError, Check) as e:
                            depth["errors"].append(f"{s} {g} (run {rep + 1}): {e}")
                            print(f"[{n} layers] {s} {g}: ERROR {e}", flush=True)
                            times = {}
                        finally:
                            bench.unmount(m)
                        for w, t in times.items():
                            depth["runs_s"][s][w].append(t)
                            line.append(f"{w} {fmt(t)}")
                    if line:
                        print(f"[{n} layers, run {rep + 1}/{repeat}] {s}: mount "
                              f"{fmt(median(depth['runs_s'][s]['mount']))}, " + ", ".join(line), flush=True)
            if bench.flat:
                shutil.rmtree(bench.flat, ignore_errors=True)
                bench.flat = None
            depth["median_s"] = {s: {w: round(median(v), 5) for w, v in ws.items() if v}
                                 for s, ws in depth["runs_s"].items()}
            depth["runs_s"] = {s: {w: [round(x, 5) for x in v] for w, v in ws.items()}
                               for s, ws in depth["runs_s"].items()}
            for key, name in (("ratio_to_fuse", RATIO_BASE), ("ratio_to_kernel", "kernel")):
                base = depth["median_s"].get(name, {})
                depth[key] = {s: {w: round(v / base[w], 3) for w, v in ws.items() if base.get(w)}
                              for s, ws in depth["median_s"].items()}
            results["depths"].append(depth)

        results["total_wall_s"] = round(time.perf_counter() - t_start, 1)
        results["loadavg_end"] = loadavg()
        m = results["machine"]
        print(f"\nunion filesystems: {args.files} small files in {len(plan.leaves)} dirs + one "
              f"{big_mib} MiB file at the bottom, each upper layer: 2 files rewritten, 2 added, "
              f"1 whited out")
        print(f"{m['cpus']} CPUs, kernel {m['kernel']}, {m['tmp_fs']} at {os.path.dirname(tmp)}; "
              f"{results['fuse_overlayfs']}; negative = {args.negatives} stats, small = "
              f"{args.small_reads} files, create = {args.creates} files")
        print_results(results, systems, groups)
        print(f"\nsetup (untimed): " + ", ".join(f"{k} {v}s" for k, v in results["setup_s"].items()))
        print(f"total wall time {results['total_wall_s']}s; load average at start {m['loadavg_start']}, "
              f"at end {results['loadavg_end']}")
        slow = [(d["layers"], w, r) for d in results["depths"]
                for w, r in d["ratio_to_fuse"].get("layerfs", {}).items() if r > 10]
        for n, w, r in slow:
            print(f"layerfs is {r:.1f}x slower than {RATIO_BASE}: {LABELS[w]} at {n} layers")
        write_json(args.json, results)
        return 0
    except (KeyboardInterrupt, Interrupted) as e:
        print(f"\ninterrupted ({str(e) or 'SIGINT'}); unmounting and cleaning up ...", file=sys.stderr, flush=True)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not stop the cleanup
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if bench is not None:
            clean = bench.cleanup()
        else:
            clean = not mountpoints_under(short, tmp)
        if clean:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(short, ignore_errors=True)
        else:
            print(f"left {tmp} and {short} in place because something is still mounted there", file=sys.stderr)


def _layerfs_code() -> dict:
    """Which layerfs code runs: PYTHONPATH (if set, it comes first) and the checkout's HEAD."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        head = "?"
    return {"pythonpath": os.environ.get("PYTHONPATH", ""), "checkout": repo, "checkout_head": head}


def _version(cmd: list[str]) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        lines = [l for l in (p.stdout + p.stderr).splitlines() if "version" in l]
        return "; ".join(lines) or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


if __name__ == "__main__":
    sys.exit(main())
