"""Issue 12's performance table in one command: layerfs (both front ends) against
fuse-overlayfs and the kernel's overlay, on the same generated layers, side by side.

The layers (written in a temporary directory, removed at the end; see _stack.Plan):
the bottom layer holds --files small files in --dirs leaf directories, ``wide/`` with
--wide entries, and ``big.bin`` (--big-mib MiB); every layer above rewrites 2 files,
adds 2 and whites out 1. The same layer directories are

* ``plain``          the merged tree copied flat into one directory (no union: the floor)
* ``kernel``         the kernel's overlay (mount(2); the new mount API when the options
                     pass one page; more than 500 layers it refuses, and says so)
* ``fuse-overlayfs`` /usr/bin/fuse-overlayfs, default options
* ``layerfs``        imported into a layerfs store (one image per depth) and mounted with
                     ``layerfs mount``; the server is forked from the CLI (``layerfs ps`` has its pid)
* ``fuse-layerfs``   the fuse-overlayfs-compatible mount program over the same layer
                     directories; the server is forked by the ``fuse-layerfs`` command

Every group of workloads runs on a fresh mount with an empty upper; the systems take
turns within each group (their order rotates with each repetition), and each group is
repeated --repeat times: the tables give medians. For each workload the wall time and
the serving process's CPU time (utime + stime from /proc/PID/stat, before and after;
the kernel has no daemon) are recorded, and every run checks what it saw. "first"
means the first access on a fresh mount; the layers' own files (and layerfs's blobs)
are read once before each depth, so the lower filesystem's page cache is warm. Dirty
pages are written back (sync, untimed) before every workload. The load average is
recorded at the start and end of every depth.

    group      workloads
    walk       first walk (os.walk + lstat of everything), then the same again (warm)
    negative   --negatives stats of names that exist nowhere, spread over the leaf dirs
    small_read open + read + close of --small-reads bottom-layer files (first access)
    readdir    listdir of wide/ (first), then --readdirs more listdirs of it (repeated)
    mkdir      mkdir -p of --mkdir-chains chains --mkdir-depth levels deep; then
               --creates empty files created in a new directory
    copy_up    open(O_APPEND) big.bin, write 1 byte, close (a full copy-up)
    read_big   big.bin read once untimed, then: a timed sequential read (1 MiB reads), and
               fio 4 KiB psync random reads of --fio-mib MiB (invalidate=0: warm cache)
    dd         dd if=/dev/zero bs=4k of a --dd-mib MiB new file (small writes)
    mount      every fresh mount (until it serves); "first mount": the first at a depth
               (for layerfs, the image's first mount ever)
    apt        (not in --quick) a Debian bookworm minbase tree made by debootstrap (kept
               in --cache-dir for the next run) as the one lower layer (layerfs: its
               import-dir): in a chroot on each mount (/proc, /dev, resolv.conf mounted in,
               FUSE mounts with allow_other), apt-get update && apt-get install -y
               --apt-packages; plain is a fresh cp -a of the tree
    commit     bench_commit.py as it is: commit of --commit-files new small files, next
               to tar -c of the same upper
    import     bench_import.py as it is: import of a tar of --import-files small files,
               next to tar -x

Needs root, /dev/fuse, the overlay module, fuse-overlayfs and fio; for apt, debootstrap
and the mirror. Everything mounted is unmounted in a ``finally``, also on Ctrl-C and
SIGTERM.

    .venv/bin/python benchmarks/bench_perf.py --quick            # layers 1,32; < 5 minutes
    .venv/bin/python benchmarks/bench_perf.py [--json perf.json] # layers 1,8,32,128,1000, apt
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable

from _common import cached_debootstrap, cpu_seconds, layerfs_cmd, loadavg, machine, median, print_table, write_json
from _stack import (BIG, FUSE_OVERLAYFS, Bench, Check, Interrupted, Mount, NotAvailable, Plan, build_flat,
                    catch_signals, finish, layerfs_code, read_all, version, walk, write_layers)

from layerfs.store import Store

SYSTEMS = Bench.SYSTEMS
FRONT_ENDS = ("layerfs", "fuse-layerfs")
RATIO_BASE = "fuse-overlayfs"
EXTRAS = ("apt", "commit", "import")  # not per depth: a real image, and the store's own work
GROUPS = {  # each group runs on one fresh mount
    "walk": ("first_walk", "warm_walk"),
    "negative": ("negative",),
    "small_read": ("small_read",),
    "readdir": ("first_readdir", "repeat_readdir"),
    "mkdir": ("mkdir_p", "create"),
    "copy_up": ("copy_up",),
    "read_big": ("seq_read", "fio"),
    "dd": ("dd",),
}
ALL_GROUPS = (*GROUPS, *EXTRAS)
# workload -> (label, unit); a unit other than "s" is a throughput (higher is better)
ROWS = {
    "mount": ("mount", "s"),
    "first_mount": ("first mount (1 run)", "s"),
    "first_walk": ("first walk + lstat", "s"),
    "warm_walk": ("warm walk + lstat", "s"),
    "negative": ("negative lookups", "s"),
    "small_read": ("first open+read small files", "s"),
    "first_readdir": ("first readdir (wide/)", "s"),
    "repeat_readdir": ("repeated readdir (wide/)", "s"),
    "mkdir_p": ("mkdir -p", "s"),
    "create": ("create files", "s"),
    "copy_up": ("append copy-up big.bin", "s"),
    "seq_read": ("warm seq read big.bin", "MB/s"),
    "fio": ("fio 4k randread, warm", "IOPS"),
    "dd": ("small writes (dd bs=4k)", "s"),
    "apt": ("apt-get update + install", "s"),
}
# issue 12's targets, as ratios to fuse-overlayfs unless said otherwise
TARGETS = {
    "negative": "<=1.2x, cpu <=2x; 32+: <=1.0x",
    "first_walk": "(keep ahead)",
    "warm_walk": "<=1.2x, cpu <=2x; 32+: <=1.0x",
    "small_read": "<=1.2x, cpu <=2x; 32+: <=1.0x",
    "first_readdir": "<=1.2x, cpu <=2x; 32+: <=1.0x",
    "mkdir_p": "<=1.2x, cpu <=2x; 32+: <=1.0x",
    "repeat_readdir": "<=1.5x",
    "seq_read": ">=0.9x throughput",
    "fio": ">=0.9x throughput",
    "create": "<=1.2x",
    "copy_up": "<=1.2x",
    "dd": "<=2x the kernel",
    "mount": "<100 ms at 128 layers",
    "apt": "<=1.5x the kernel",
}
DD_BLOCK = 4096
TICK = 1 / os.sysconf("SC_CLK_TCK")  # the resolution of /proc/PID/stat CPU times
VS_KERNEL = ("dd", "apt")  # rows whose target is a ratio to the kernel's overlay


# -- measuring ------------------------------------------------------------------------


class Clock:
    """Wall time and the serving process's CPU time of a with block."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.wall = 0.0
        self.cpu: float | None = None

    def __enter__(self) -> "Clock":
        self._cpu0 = cpu_seconds(self.pid) if self.pid else None
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self._t0
        if self.pid and exc[0] is None:
            self.cpu = cpu_seconds(self.pid) - self._cpu0


def result(c: Clock, value: float | None = None) -> dict:
    """One run: wall seconds, daemon CPU seconds, and the row's value (wall, or a throughput)."""
    return {"wall": round(c.wall, 6), "cpu": None if c.cpu is None else round(c.cpu, 3),
            "value": round(c.wall if value is None else value, 6)}


def run_group(bench: Bench, group: str, m: Mount, plan: Plan, n: int, args) -> dict[str, dict]:
    """Run one group of workloads on the fresh mount ``m``; returns workload -> one run."""
    root = m.path
    big = os.path.join(root, BIG)
    out: dict[str, dict] = {}
    if group == "walk":
        vis = plan.visible(n)
        want = (len(vis) + 1, sum(s for s, _ in vis.values()) + bench.big_bytes)
        for name in GROUPS["walk"]:
            os.sync()
            with Clock(m.pid) as c:
                got = walk(root)
            if got != want:
                raise Check(f"{name}: found {got[0]} files / {got[1]} bytes, expected {want[0]} / {want[1]}")
            out[name] = result(c)
    elif group == "negative":
        paths = [os.path.join(root, p) for p in plan.negatives]
        found = 0
        os.sync()
        with Clock(m.pid) as c:
            for p in paths:
                try:
                    os.stat(p)
                    found += 1
                except FileNotFoundError:
                    pass
        if found:
            raise Check(f"negative: {found} missing names were found")
        out["negative"] = result(c)
    elif group == "small_read":
        paths = [os.path.join(root, p) for p in plan.small]
        want = sum(plan.bottom[p] for p in plan.small)
        os.sync()
        with Clock(m.pid) as c:
            got = sum(read_all(p) for p in paths)
        if got != want:
            raise Check(f"small_read: read {got} bytes, expected {want}")
        out["small_read"] = result(c)
    elif group == "readdir":
        wide = os.path.join(root, "wide")
        os.sync()
        with Clock(m.pid) as c:
            first = len(os.listdir(wide))
        out["first_readdir"] = result(c)
        with Clock(m.pid) as c:
            again = [len(os.listdir(wide)) for _ in range(args.readdirs)]
        out["repeat_readdir"] = result(c)
        if {first, *again} != {len(plan.wide)}:
            raise Check(f"readdir: listed {sorted({first, *again})} entries, expected {len(plan.wide)}")
    elif group == "mkdir":
        chains = [os.path.join(root, f"mk{i:03d}", *[f"l{j:02d}" for j in range(1, args.mkdir_depth)])
                  for i in range(args.mkdir_chains)]
        d = os.path.join(root, "new")
        names = [os.path.join(d, f"c{i:05d}") for i in range(args.creates)]
        os.sync()
        try:
            with Clock(m.pid) as c:
                for p in chains:
                    os.makedirs(p)
            out["mkdir_p"] = result(c)
            os.sync()
            with Clock(m.pid) as c:
                os.mkdir(d)
                for p in names:
                    os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            out["create"] = result(c)
            if not all(os.path.isdir(p) for p in chains):
                raise Check("mkdir_p: a chain's deepest directory is missing")
            if len(os.listdir(d)) != args.creates:
                raise Check(f"create: {len(os.listdir(d))} files listed, expected {args.creates}")
        finally:
            if m.system == "plain":
                for i in range(args.mkdir_chains):
                    shutil.rmtree(os.path.join(root, f"mk{i:03d}"), ignore_errors=True)
                shutil.rmtree(d, ignore_errors=True)
    elif group == "copy_up":
        read_all(bench.underlying_big(m.system), bytearray(1 << 20))  # lower data warm
        os.sync()
        try:
            with Clock(m.pid) as c:
                fd = os.open(big, os.O_WRONLY | os.O_APPEND)
                os.write(fd, b"x")
                os.close(fd)
            size = os.stat(big).st_size
            if size != bench.big_bytes + 1:
                raise Check(f"copy_up: size {size} after the append, expected {bench.big_bytes + 1}")
            out["copy_up"] = result(c)
        finally:
            if m.system == "plain":  # undo, untimed
                os.truncate(big, bench.big_bytes)
    elif group == "read_big":
        buf = bytearray(1 << 20)
        read_all(big, buf)  # the mount's page cache warm
        os.sync()
        with Clock(m.pid) as c:
            got = read_all(big, buf)
        if got != bench.big_bytes:
            raise Check(f"seq_read: read {got} bytes of {bench.big_bytes}")
        out["seq_read"] = result(c, got / 1e6 / c.wall)
        io_bytes = min(args.fio_mib, bench.big_bytes >> 20) << 20
        cmd = ["fio", "--name=randread", f"--filename={big}", "--readonly", "--rw=randread", "--bs=4k",
               "--ioengine=psync", "--invalidate=0", f"--io_size={io_bytes}", "--randrepeat=1",
               "--output-format=json"]
        os.sync()
        with Clock(m.pid) as c:
            p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            raise Check(f"fio failed ({p.returncode}): {p.stderr.strip()}")
        job = json.loads(p.stdout[p.stdout.index("{"):])["jobs"][0]["read"]
        if job["io_bytes"] != io_bytes:
            raise Check(f"fio: read {job['io_bytes']} bytes, expected {io_bytes}")
        out["fio"] = result(c, job["iops"])
    elif group == "dd":
        target = os.path.join(root, "dd.out")
        count = (args.dd_mib << 20) // DD_BLOCK
        os.sync()
        try:
            with Clock(m.pid) as c:
                p = subprocess.run(["dd", "if=/dev/zero", f"of={target}", f"bs={DD_BLOCK}", f"count={count}",
                                    "status=none"], capture_output=True, text=True)
            if p.returncode != 0:
                raise Check(f"dd failed ({p.returncode}): {p.stderr.strip()}")
            if os.stat(target).st_size != count * DD_BLOCK:
                raise Check(f"dd: {os.stat(target).st_size} bytes written, expected {count * DD_BLOCK}")
            out["dd"] = result(c)
        finally:
            if m.system == "plain":
                os.unlink(target)
    else:
        raise ValueError(group)
    return out


def warm_lower(paths: list[str]) -> None:
    """Read every file below ``paths`` once, so that no system's first access waits for the disk."""
    buf = bytearray(1 << 20)
    for top in paths:
        for dirpath, _, files in os.walk(top):
            for name in files:
                full = os.path.join(dirpath, name)
                if os.path.isfile(full) and not os.path.islink(full):
                    read_all(full, buf)


# -- output ---------------------------------------------------------------------------


def fmt(v: float | None, unit: str = "s") -> str:
    if v is None:
        return "-"
    if unit == "IOPS":
        return f"{v / 1000:.0f}k"
    if unit == "MB/s":
        return f"{v:.0f}"
    if v >= 100:
        return f"{v:.1f}"
    if v >= 10:
        return f"{v:.2f}"
    if v >= 1:
        return f"{v:.3f}"
    return f"{v:.4f}"


def ratio(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def cpu_ratio(r: dict) -> str:
    """The CPU ratio; ">Nx" when fuse-overlayfs used less than one clock tick."""
    if r.get("cpu") is not None:
        return ratio(r["cpu"])
    return f">{r['cpu_above']:.0f}x" if r.get("cpu_above") else "n/a"


def depth_rows(names: list[str]) -> list[str]:
    return [w for w in ["mount", "first_mount"] + names if w in ROWS]


def print_depth(depth: dict, systems: list[str], names: list[str], repeat: int, title: str | None = None) -> None:
    n = depth["layers"]
    title = title or f"{n} layer{'s' if n > 1 else ''}"
    print(f"\n{title}: medians of {repeat} interleaved runs; seconds unless "
          f"marked; cpu = serving process CPU s; ratios to {RATIO_BASE} (for MB/s and IOPS: "
          f"throughput, higher is better); load {depth['loadavg_start']} -> {depth['loadavg_end']}")
    for s, why in depth["not_available"].items():
        print(f"  {s}: n/a: {why}")
    others = [s for s in FRONT_ENDS if s in systems]
    header = ["workload"]
    for s in systems:
        header += [s] + (["cpu"] if s not in Bench.NO_DAEMON else [])
    if RATIO_BASE in systems:
        for s in others + (["kernel"] if "kernel" in systems else []):
            header += [f"{s}/fo"] + (["cpu"] if s != "kernel" else [])
    rows = [header]
    for w in depth_rows(names):
        label, unit = ROWS[w]
        med = {s: depth["median"].get(s, {}).get(w) for s in systems}
        if not any(med.values()):
            continue
        row = [label + ("" if unit == "s" else f", {unit}")]
        for s in systems:
            row.append(fmt(med[s]["value"], unit) if med[s] else ("n/a" if s in depth["not_available"] else "-"))
            if s not in Bench.NO_DAEMON:
                row.append(fmt(med[s]["cpu"]) if med[s] else "-")
        if RATIO_BASE in systems:
            for s in others + (["kernel"] if "kernel" in systems else []):
                r = depth["ratio_to_fuse"].get(s, {}).get(w, {})
                row.append(ratio(r.get("value")))
                if s != "kernel":
                    row.append(cpu_ratio(r))
        rows.append(row)
    print_table(rows)
    for w, by_system in depth.get("vs_kernel", {}).items():
        print(f"  {ROWS[w][0]} / kernel overlay: " + ", ".join(f"{s} {v:.2f}x" for s, v in by_system.items()))
    for err in depth["errors"]:
        print(f"  error: {err}")


def print_summary(results: dict, systems: list[str], names: list[str]) -> None:
    """Per front end: wall ratio (cpu ratio) to fuse-overlayfs at every depth, with the target."""
    depths = results["depths"]
    if not depths or RATIO_BASE not in systems:
        return
    for s in [s for s in FRONT_ENDS if s in systems]:
        print(f"\n{s} / {RATIO_BASE}: wall (server CPU), medians; MB/s and IOPS rows: throughput ratio; "
              "mount: the median time (its ratio)")
        rows = [["workload", "target"] + [f"{d['layers']} layer{'s' if d['layers'] > 1 else ''}" for d in depths]]
        for w in depth_rows(names):
            if w == "first_mount":
                continue
            row = [ROWS[w][0], TARGETS.get(w, "")]
            for d in depths:
                r = d["ratio_to_fuse"].get(s, {}).get(w)
                if w == "mount":  # the target is absolute
                    v = d["median"].get(s, {}).get(w)
                    row.append(f"{v['wall'] * 1000:.0f} ms ({ratio(r and r.get('value'))})" if v else "n/a")
                elif not r:
                    row.append("n/a")
                elif r.get("cpu") is None and not r.get("cpu_above"):
                    row.append(ratio(r.get("value")))
                else:
                    row.append(f"{ratio(r.get('value'))} ({cpu_ratio(r)})")
            rows.append(row)
        if "dd" in names and "kernel" in systems:
            rows.append(["small writes / kernel", TARGETS["dd"]]
                        + [ratio(d.get("vs_kernel", {}).get("dd", {}).get(s)) for d in depths])
        print_table(rows)
    if "layerfs-kernel" in systems and "kernel" in systems:
        # Issue 14's targets: within 1.2x of the kernel overlay over extracted layers at
        # 1 layer, ahead of it from 32 layers on.
        print("\nlayerfs-kernel / kernel overlay over the extracted layers: wall, medians")
        rows = [["workload", "target"] + [f"{d['layers']} layer{'s' if d['layers'] > 1 else ''}" for d in depths]]
        for w in depth_rows(names):
            if w == "first_mount":
                continue
            row = [ROWS[w][0], "<=1.2x at 1 layer; <1.0x from 32"]
            for d in depths:
                lk, k = d["median"].get("layerfs-kernel", {}).get(w), d["median"].get("kernel", {}).get(w)
                if not lk or not k or not k["wall"]:
                    row.append("n/a")
                elif ROWS[w][1] == "s":
                    row.append(ratio(lk["wall"] / k["wall"]))
                else:  # MB/s, IOPS: the throughput ratio
                    row.append(ratio(lk["value"] / k["value"]) if k["value"] else "n/a")
            rows.append(row)
        print_table(rows)


# -- the run --------------------------------------------------------------------------


def summarise(runs: dict) -> tuple[dict, dict]:
    """Medians per system and workload, and their ratios to fuse-overlayfs."""
    med = {}
    for s, ws in runs.items():
        med[s] = {}
        for w, xs in ws.items():
            if not xs:
                continue
            cpus = [x["cpu"] for x in xs if x["cpu"] is not None]
            med[s][w] = {"wall": round(median([x["wall"] for x in xs]), 5),
                         "cpu": round(median(cpus), 3) if cpus else None,
                         "value": round(median([x["value"] for x in xs]), 5), "runs": len(xs)}
    base = med.get(RATIO_BASE, {})
    ratios = {}
    for s, ws in med.items():
        ratios[s] = {}
        for w, v in ws.items():
            b = base.get(w)
            if not b:
                continue
            r = {"value": round(v["value"] / b["value"], 3) if b["value"] else None, "cpu": None}
            if v["cpu"] is not None and b["cpu"]:
                r["cpu"] = round(v["cpu"] / b["cpu"], 3)
            elif v["cpu"] and b["cpu"] == 0:  # the base used less than one clock tick
                r["cpu_above"] = round(v["cpu"] / TICK, 1)
            ratios[s][w] = r
    return med, ratios


def import_layers(store_root: str, layer_dirs: list[str], depths: list[int]) -> None:
    """Each layer directory as an image on the previous one, tagged bench:N at each depth N
    (through the Python API: 1,000 CLI start-ups would take minutes; this is untimed setup)."""
    parent = None
    with Store(store_root) as store:
        for k, d in enumerate(layer_dirs):
            tag = f"bench:{k + 1}" if k + 1 in depths else None
            parent = store.import_dir(d, parent=parent, tag=tag).image_id


def interleave(bench: Bench, record: dict, systems: list[str], groups: list[str], repeat: int, label: str,
               mount: Callable[[str], Mount], work: Callable[[str, Mount], dict[str, dict]]) -> None:
    """``repeat`` times, for every group, every system in turn (the order rotates with each
    repetition): a fresh mount, ``work(group, mount)``, unmount; runs go into ``record``."""
    runs = record["runs"]
    for rep in range(repeat):
        order = systems[rep % len(systems):] + systems[:rep % len(systems)]
        for g in groups:
            for s in order:
                if s in record["not_available"]:
                    continue
                try:
                    m = mount(s)
                except NotAvailable as e:
                    record["not_available"][s] = str(e)
                    print(f"[{label}] {s}: n/a: {e}", flush=True)
                    continue
                try:
                    mount_cpu = cpu_seconds(m.pid) if m.pid else None
                    first = not runs[s]["first_mount"]
                    runs[s]["first_mount" if first else "mount"].append(
                        {"wall": round(m.seconds, 6), "cpu": mount_cpu, "value": round(m.seconds, 6)})
                    got = work(g, m)
                except (OSError, Check, subprocess.SubprocessError, ValueError, KeyError, IndexError) as e:
                    record["errors"].append(f"{s} {g} (run {rep + 1}): {e}")
                    print(f"[{label}] {s} {g}: ERROR {e}", flush=True)
                    got = {}
                finally:
                    bench.unmount(m)
                for w, r in got.items():
                    runs[s][w].append(r)
                print(f"[{label}, run {rep + 1}/{repeat}] {g} {s}: mount {m.seconds:.3f}s; " + ", ".join(
                    f"{w} {fmt(r['value'], ROWS[w][1])}{' ' + ROWS[w][1] if ROWS[w][1] != 's' else 's'}"
                    + (f" (cpu {r['cpu']:.2f})" if r["cpu"] is not None else "") for w, r in got.items()),
                    flush=True)
    record["loadavg_end"] = loadavg()
    record["median"], record["ratio_to_fuse"] = summarise(runs)
    kernel = record["median"].get("kernel", {})
    record["vs_kernel"] = {w: {s: round(v[w]["wall"] / kernel[w]["wall"], 2) for s, v in record["median"].items()
                               if s not in ("plain", "kernel") and v.get(w)}
                           for w in VS_KERNEL if kernel.get(w)}


def new_record(systems: list[str], names: list[str], **info) -> dict:
    return {**info, "not_available": {}, "loadavg_start": loadavg(), "errors": [],
            "runs": {s: {w: [] for w in ["mount", "first_mount"] + names} for s in systems}}


def run_depth(bench: Bench, plan: Plan, n: int, systems: list[str], groups: list[str], repeat: int,
              args, results: dict) -> dict:
    """Every group at depth ``n`` (the bottom ``n`` generated layers)."""
    depth = new_record(systems, [w for g in groups for w in GROUPS[g]], layers=n,
                       visible_files=len(plan.visible(n)) + 1)
    if "plain" in systems:
        t0 = time.perf_counter()
        bench.flat = os.path.join(bench.tmp, f"flat-{n}")
        build_flat(plan, bench.layer_dirs, n, bench.flat, os.path.join(bench.tmp, "big-copy.bin"))
        results["setup_s"][f"flat_{n}"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    warm_lower(bench.layer_dirs[:n] + [os.path.join(bench.store, "blobs")])
    results["setup_s"][f"warm_{n}"] = round(time.perf_counter() - t0, 2)
    try:
        interleave(bench, depth, systems, groups, repeat, f"{n} layers", lambda s: bench.mount(s, n),
                   lambda g, m: run_group(bench, g, m, plan, n, args))
    finally:
        if bench.flat:
            shutil.rmtree(bench.flat, ignore_errors=True)
            bench.flat = None
    return depth


# -- apt-get in a chroot on a real image ------------------------------------------------


class Chroot:
    """/proc, /dev and the host's resolv.conf mounted into ``root`` for a with block."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.mounted: list[str] = []

    def __enter__(self) -> "Chroot":
        resolv = os.path.join(self.root, "etc", "resolv.conf")
        if os.path.islink(resolv) or not os.path.isfile(resolv):
            # a symlink would be followed by mount --bind, out of the tree: a plain file instead
            if os.path.lexists(resolv):
                os.unlink(resolv)
            open(resolv, "w").close()
        for args, path in ((["-t", "proc", "proc"], "proc"), (["--bind", "/dev"], "dev"),
                           (["--bind", "/etc/resolv.conf"], "etc/resolv.conf")):
            target = os.path.join(self.root, path)
            subprocess.run(["mount", *args, target], check=True, capture_output=True)
            self.mounted.append(target)
        return self

    def __exit__(self, *exc) -> None:
        for target in reversed(self.mounted):
            if subprocess.run(["umount", target], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", target], capture_output=True)


def run_apt(bench: Bench, m: Mount, packages: list[str]) -> dict[str, dict]:
    """``apt-get update && apt-get install -y PACKAGES`` in a chroot on ``m``, timed; then
    dpkg must list every package as installed."""
    bench.seq += 1
    log = os.path.join(bench.tmp, f"apt-{m.system}-{bench.seq}.log")
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
           "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"}
    script = f"apt-get update -q && apt-get install -y -q --no-install-recommends {' '.join(packages)}"
    with Chroot(m.path):
        os.sync()
        with open(log, "wb") as out, Clock(m.pid) as c:
            # its own process group: an interrupted run must not leave apt's children
            # holding the mount
            p = subprocess.Popen(["chroot", m.path, "/bin/sh", "-c", script], env=env, stdin=subprocess.DEVNULL,
                                 stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                p.wait()
            finally:
                if p.returncode is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
        if p.returncode != 0:
            with open(log, errors="replace") as f:
                tail = " | ".join(f.read().strip().splitlines()[-3:])
            raise Check(f"apt-get failed ({p.returncode}): {tail} (log {log})")
        q = subprocess.run(["chroot", m.path, "dpkg-query", "-W", "-f=${Package} ${Status}\n", *packages],
                           env=env, capture_output=True, text=True)
        installed = {line.split()[0] for line in q.stdout.splitlines() if line.endswith(" installed")}
        if installed != set(packages):
            raise Check(f"apt: dpkg lists {sorted(installed)} installed, expected {sorted(packages)}")
    return {"apt": result(c)}


def run_apt_row(bench: Bench, rootfs: str, systems: list[str], repeat: int, args) -> dict:
    """The apt group on the debootstrap tree (one lower layer; layerfs: its import, apt:1)."""
    record = new_record(systems, ["apt"], layers=1, image=rootfs, packages=args.apt_packages)
    fuse_opts = ("allow_other",)  # apt downloads as the user _apt, as it does on the kernel's overlay

    def mount(s: str) -> Mount:
        if s == "plain":
            bench.seq += 1
            bench.flat = os.path.join(bench.tmp, f"apt-flat-{bench.seq}")
            subprocess.run(["cp", "-a", rootfs, bench.flat], check=True)
        return bench.mount(s, 1, lowers=[rootfs], image="apt:1", options=fuse_opts)

    def work(g: str, m: Mount) -> dict[str, dict]:
        try:
            return run_apt(bench, m, args.apt_packages.split(","))
        finally:
            if m.system == "plain":
                shutil.rmtree(bench.flat, ignore_errors=True)
                bench.flat = None

    interleave(bench, record, systems, ["apt"], repeat, "apt", mount, work)
    return record


def compile_layerfs() -> None:
    """Write layerfs's bytecode before anything is timed, as an installed package has it.
    Where PYTHONDONTWRITEBYTECODE is set (as on the machines here) nothing else writes
    it, and every mount and CLI call would compile every module it imports again."""
    import compileall

    import layerfs.cli
    import layerfs.store
    import layerfs.unionfs

    compileall.compile_file(layerfs.cli.__file__, quiet=1)
    for package in (layerfs.store, layerfs.unionfs):
        compileall.compile_dir(os.path.dirname(package.__file__), quiet=1)


def startup_costs() -> dict:
    """Python's own start-up and the layerfs CLI's, which every layerfs mount pays."""
    out = {}
    for name, cmd in (("python -c pass", [sys.executable, "-c", "pass"]),
                      ("layerfs --help", layerfs_cmd() + ["--help"])):
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            subprocess.run(cmd, capture_output=True)
            times.append(time.perf_counter() - t0)
        out[name] = round(median(times), 4)
    return out


def run_sibling(script: str, argv: list[str], tmp: str) -> dict:
    """Run another benchmark script of this folder as it is; returns its JSON."""
    out = os.path.join(tmp, script.replace(".py", ".json"))
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), script), *argv, "--json", out]
    print(f"running {script} {' '.join(argv)} ...", flush=True)
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{script} failed ({p.returncode}): {' | '.join(p.stderr.strip().splitlines()[-3:])}")
    with open(out) as f:
        return json.load(f)


def store_ops(groups: list[str], args, tmp: str) -> dict:
    """Commit of --commit-files new small files against tar -c, import of --import-files
    small files against tar -x: bench_commit.py and bench_import.py, medians of --repeat."""
    out: dict = {}
    where = ["--tmpdir", args.tmpdir] if args.tmpdir else []
    if "commit" in groups:
        load0 = loadavg()
        try:
            r = run_sibling("bench_commit.py", ["--only", "small", "--files", str(args.commit_files),
                                                "--repeat", str(args.repeat), *where], tmp)
            w = r["workloads"]["small"]
            out["commit"] = {"label": f"commit of {args.commit_files} new small files", "peer": "tar -c",
                             "layerfs_s": median(w["commit_s"]), "peer_s": median(w["tar_s"]),
                             "cp_a_s": median(w["cp_s"]),
                             "runs": {"layerfs": w["commit_s"], "tar": w["tar_s"], "cp -a": w["cp_s"]}}
        except (RuntimeError, OSError, KeyError, ValueError) as e:
            out["commit"] = {"label": f"commit of {args.commit_files} new small files", "error": str(e)}
        out["commit"]["loadavg"] = [load0, loadavg()]
    if "import" in groups:
        load0 = loadavg()
        try:
            r = run_sibling("bench_import.py", ["--only", "small", "--files", str(args.import_files),
                                                "--repeat", str(args.repeat), *where], tmp)
            w = r["workloads"][0]
            out["import"] = {"label": f"import of {args.import_files} small files (tar)", "peer": "tar -x",
                             "layerfs_s": w["layerfs"]["median_s"], "peer_s": w["tar"]["median_s"],
                             "runs": {"layerfs": w["layerfs"]["runs_s"], "tar": w["tar"]["runs_s"]}}
        except (RuntimeError, OSError, KeyError, IndexError, ValueError) as e:
            out["import"] = {"label": f"import of {args.import_files} small files (tar)", "error": str(e)}
        out["import"]["loadavg"] = [load0, loadavg()]
    for r in out.values():
        if "error" not in r:
            r["ratio"] = round(r["layerfs_s"] / r["peer_s"], 3)
    return out


def print_store_ops(ops: dict, repeat: int) -> None:
    print(f"\nstore operations (bench_commit.py, bench_import.py; medians of {repeat}; tar = tar -c / tar -x)")
    rows = [["workload", "layerfs s", "tar s", "layerfs/tar", "target", "load"]]
    for r in ops.values():
        if "error" in r:
            rows.append([r["label"], "error", "", "", "", " -> ".join(r["loadavg"])])
            print(f"  error: {r['label']}: {r['error']}")
        else:
            rows.append([r["label"], fmt(r["layerfs_s"]), fmt(r["peer_s"]), ratio(r["ratio"]),
                         f"<=2x {r['peer']}", " -> ".join(r["loadavg"])])
    print_table(rows)
    commit = ops.get("commit", {})
    if "cp_a_s" in commit:
        # One blob per file: a commit creates as many files as a copy of the upper does.
        print(f"  commit: cp -a of the same upper took {fmt(commit['cp_a_s'])} s "
              f"(layerfs {commit['layerfs_s'] / commit['cp_a_s']:.2f}x cp -a)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="layers 1,32; fewer files; 64 MiB big file; no apt (still --repeat 3)")
    ap.add_argument("--layers", help="comma-separated depths (default 1,8,32,128,1000; --quick 1,32)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of every group (default 3)")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"subset of {','.join(SYSTEMS)}")
    ap.add_argument("--workloads", default=None,
                    help=f"subset of {','.join(ALL_GROUPS)} (default all; --quick: all but apt)")
    ap.add_argument("--files", type=int, help="small files in the bottom layer (10000; --quick 2000)")
    ap.add_argument("--dirs", type=int, help="leaf directories of the bottom layer (400; --quick 100)")
    ap.add_argument("--wide", type=int, default=2000, help="entries of wide/ (default 2000)")
    ap.add_argument("--readdirs", type=int, default=20, help="repeated listdirs of wide/ (default 20)")
    ap.add_argument("--small-reads", type=int, help="small files read (2000; --quick 500)")
    ap.add_argument("--negatives", type=int, help="stats of missing names (20000; --quick 2000)")
    ap.add_argument("--creates", type=int, help="files created (5000; --quick 500)")
    ap.add_argument("--mkdir-chains", type=int, help="mkdir -p chains (50; --quick 20)")
    ap.add_argument("--mkdir-depth", type=int, default=16, help="levels of each chain (default 16)")
    ap.add_argument("--big-mib", type=int, help="size of big.bin in MiB (512; --quick 64)")
    ap.add_argument("--fio-mib", type=int, default=64, help="MiB that fio reads in 4 KiB reads (default 64)")
    ap.add_argument("--dd-mib", type=int, help="MiB that dd writes in 4 KiB writes (40; --quick 16)")
    ap.add_argument("--apt-packages", default="hello,cowsay", help="what apt-get installs (default hello,cowsay)")
    ap.add_argument("--mirror", default="http://deb.debian.org/debian", help="debootstrap's mirror")
    ap.add_argument("--cache-dir", help="where the debootstrap tree is kept between runs "
                                        "(default TMPDIR/layerfs-bench-cache)")
    ap.add_argument("--commit-files", type=int, help="files of the commit row (10000; --quick 1000)")
    ap.add_argument("--import-files", type=int, help="files of the import row (20000; --quick 2000)")
    ap.add_argument("--json", help="write every run, the medians and the ratios as JSON to this path")
    ap.add_argument("--tmpdir", default=None, help="where layers, stores and uppers go (default /tmp)")
    args = ap.parse_args()
    q = args.quick
    depths = [int(x) for x in (args.layers or ("1,32" if q else "1,8,32,128,1000")).split(",")]
    for name, full, quick in (("files", 10000, 2000), ("dirs", 400, 100), ("small_reads", 2000, 500),
                              ("negatives", 20000, 2000), ("creates", 5000, 500), ("big_mib", 512, 64),
                              ("mkdir_chains", 50, 20), ("dd_mib", 40, 16), ("commit_files", 10000, 1000),
                              ("import_files", 20000, 2000)):
        if getattr(args, name) is None:
            setattr(args, name, quick if q else full)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    default = [g for g in ALL_GROUPS if not (q and g == "apt")]
    chosen = [g.strip() for g in args.workloads.split(",") if g.strip()] if args.workloads else default
    if bad := [s for s in systems if s not in SYSTEMS] + [g for g in chosen if g not in ALL_GROUPS]:
        ap.error(f"unknown system or workload: {', '.join(bad)}")
    groups = [g for g in chosen if g in GROUPS]
    if min(depths) < 1 or args.repeat < 1:
        ap.error("depths and --repeat start at 1")
    if os.geteuid() != 0:
        print("bench_perf.py needs root (mount(2), chroot)", file=sys.stderr)
        return 2
    if "read_big" in groups and shutil.which("fio") is None:
        print("bench_perf.py needs fio for the read_big group (apt-get install -y fio)", file=sys.stderr)
        return 2

    catch_signals()
    t_start = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="layerfs-bench-perf-", dir=args.tmpdir)
    short = tempfile.mkdtemp(prefix="lb", dir="/tmp")  # /tmp/lbXXXXXXXX: short lowerdir paths
    bench = None
    try:
        big_bytes = args.big_mib << 20
        names = [w for g in groups for w in GROUPS[g]]
        compile_layerfs()
        results: dict = {
            "benchmark": "perf", "quick": q, "machine": machine(tmp), "repeat": args.repeat, "layers": depths,
            "systems": systems, "workloads": chosen,
            "config": {k: getattr(args, k) for k in ("files", "dirs", "wide", "readdirs", "small_reads",
                                                     "negatives", "creates", "mkdir_chains", "mkdir_depth",
                                                     "big_mib", "fio_mib", "dd_mib", "apt_packages",
                                                     "commit_files", "import_files")},
            "fuse_overlayfs": version([FUSE_OVERLAYFS, "--version"]), "fio": version(["fio", "--version"]),
            "layerfs_cmd": layerfs_cmd(), "layerfs_code": layerfs_code(), "setup_s": {},
            "startup_s": startup_costs(), "depths": []}
        print(f"working in {tmp} (short lowerdir links in {short}); load {results['machine']['loadavg_start']}",
              flush=True)
        rootfs = None
        if "apt" in chosen:
            cache = args.cache_dir or os.path.join(args.tmpdir or tempfile.gettempdir(), "layerfs-bench-cache")
            t0 = time.perf_counter()
            try:
                rootfs, cached = cached_debootstrap(cache, args.mirror)
                results["apt_image"] = {"path": rootfs, "cached": cached}
                if not cached:
                    results["setup_s"]["debootstrap"] = round(time.perf_counter() - t0, 2)
            except (OSError, RuntimeError) as e:
                results["apt"] = {"not_available": f"no debootstrap image: {e}"}
                print(f"apt: n/a: no debootstrap image: {e}", flush=True)
        if not groups:
            depths = []  # only apt, commit or import
        nlayers = max(depths, default=0)
        t0 = time.perf_counter()
        plan = Plan(args.files, args.dirs, nlayers, args.small_reads, args.negatives, wide=args.wide)
        if nlayers:
            print(f"writing {nlayers} layers: {args.files} small files in {len(plan.leaves)} dirs, wide/ of "
                  f"{args.wide} and a {args.big_mib} MiB file at the bottom ...", flush=True)
        layer_dirs = write_layers(plan, os.path.join(tmp, "layers"), big_bytes) if nlayers else []
        if nlayers:
            results["setup_s"]["write_layers"] = round(time.perf_counter() - t0, 2)
        store = os.path.join(tmp, "store")
        bench = Bench(tmp, short, layer_dirs, store, big_bytes)
        if "layerfs" in systems and nlayers:
            print(f"importing {nlayers} layers into a layerfs store ...", flush=True)
            t0 = time.perf_counter()
            import_layers(store, layer_dirs, depths)
            results["setup_s"]["import"] = round(time.perf_counter() - t0, 2)
        if "plain" in systems and nlayers:
            shutil.copyfile(os.path.join(layer_dirs[0], BIG), os.path.join(tmp, "big-copy.bin"))

        for n in depths:
            results["depths"].append(run_depth(bench, plan, n, systems, groups, args.repeat, args, results))
        if rootfs:
            if "layerfs" in systems:
                t0 = time.perf_counter()
                with Store(store) as st:
                    st.import_dir(rootfs, tag="apt:1")
                results["setup_s"]["import_apt_image"] = round(time.perf_counter() - t0, 2)
            results["apt"] = run_apt_row(bench, rootfs, systems, args.repeat, args)
        results["store_ops"] = store_ops(chosen, args, tmp)

        results["total_wall_s"] = round(time.perf_counter() - t_start, 1)
        results["loadavg_end"] = loadavg()
        report(results, plan, args, systems, names)
        write_json(args.json, results)
        return 0
    except (KeyboardInterrupt, Interrupted) as e:
        print(f"\ninterrupted ({str(e) or 'SIGINT'}); unmounting and cleaning up ...", file=sys.stderr, flush=True)
        return 130
    finally:
        finish(bench, tmp, short)


def report(results: dict, plan: Plan, args, systems: list[str], names: list[str]) -> None:
    """Everything on stdout: the setting, a table per depth, the summary per front end."""
    m = results["machine"]
    label = "--quick, " if args.quick else ""
    print(f"\nbench_perf ({label}commit {m['commit']}, {m['date']})" + (
        f": {args.files} small files in {len(plan.leaves)} dirs, wide/ of {args.wide}, big.bin "
        f"{args.big_mib} MiB at the bottom; each layer above: 2 files rewritten, 2 added, 1 whited out"
        if results["depths"] else ""))
    print(f"{m['cpus']} CPUs, kernel {m['kernel']}, {m['tmp_fs']} at {os.path.dirname(m['tmp_dir'])}; "
          f"{results['fuse_overlayfs']}; {results['fio']}; python start-up "
          f"{results['startup_s']['python -c pass']:.3f}s, layerfs --help {results['startup_s']['layerfs --help']:.3f}s "
          f"(layerfs's bytecode compiled before timing)")
    if results["depths"]:
        print(f"negative = {args.negatives} stats, small = {args.small_reads} files, readdir = {args.wide} "
              f"entries ({args.readdirs} repeats), mkdir -p = {args.mkdir_chains} x {args.mkdir_depth} levels, "
              f"create = {args.creates} files, fio = {args.fio_mib} MiB, dd = {args.dd_mib} MiB")
    for depth in results["depths"]:
        print_depth(depth, systems, names, args.repeat)
    if "apt" in results:
        apt = results["apt"]
        if "median" in apt:
            print_depth(apt, systems, ["apt"], args.repeat,
                        title=f"apt-get install {args.apt_packages.replace(',', ' ')} in a chroot on Debian "
                              f"bookworm minbase (debootstrap, 1 layer)")
        else:
            print(f"\napt-get: n/a: {apt['not_available']}")
    print_summary(results, systems, names)
    if results.get("store_ops"):
        print_store_ops(results["store_ops"], args.repeat)
    print("\nsetup (untimed): " + ", ".join(f"{k} {v}s" for k, v in results["setup_s"].items()))
    print(f"total wall time {results['total_wall_s']}s; load average at start {m['loadavg_start']}, "
          f"at end {results['loadavg_end']}")


if __name__ == "__main__":
    sys.exit(main())
