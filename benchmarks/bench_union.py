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
                     layer on the previous image, mounted with ``layerfs mount``.

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
* mount        wall time until the mount serves (layerfs: ``layerfs mount`` returns;
               fuse-overlayfs: the mount appears in /proc/self/mountinfo)

Each group is repeated --repeat times (default 3; the systems take turns within a
repeat) and the median is reported in seconds, with ratios to fuse-overlayfs. Every run
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
import os
import shutil
import stat
import sys
import tempfile
import time

from _common import drop_caches, layerfs_cmd, loadavg, machine, median, print_table, run, write_json
from _stack import (BIG, FUSE_OVERLAYFS, Bench, Check, Interrupted, Mount, NotAvailable, Plan, build_flat,
                    catch_signals, finish, layerfs_code, read_all, version, walk, write_layers)

SYSTEMS = ("plain", "kernel", "fuse-overlayfs", "layerfs")
RATIO_BASE = "fuse-overlayfs"
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


# -- workloads ------------------------------------------------------------------------


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
        rows = [header]
        for w in names:
            med = {s: depth["median_s"].get(s, {}).get(w) for s in systems}
            row = [LABELS[w]] + [fmt(med[s]) for s in systems]
            if RATIO_BASE in systems:
                base = med[RATIO_BASE]
                for s in others:
                    row.append(f"{med[s] / base:.2f}x" if med[s] is not None and base else "n/a")
            rows.append(row)
        print_table(rows)
        for err in depth["errors"]:
            print(f"  error: {err}")
    if "layerfs" in systems and RATIO_BASE in systems and len(results["depths"]) > 1:
        print(f"\nlayerfs / {RATIO_BASE} by depth")
        rows = [["workload"] + [f"{d['layers']} layer{'s' if d['layers'] > 1 else ''}" for d in results["depths"]]]
        for w in names:
            row = [LABELS[w]]
            for d in results["depths"]:
                r = d["ratio_to_fuse"].get("layerfs", {}).get(w)
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

    catch_signals()
    t_start = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="layerfs-bench-union-", dir=args.tmpdir)
    short = tempfile.mkdtemp(prefix="lb", dir="/tmp")  # /tmp/lbXXXXXXXX: short lowerdir paths
    bench = None
    try:
        big_bytes = big_mib << 20
        nlayers = max(depths)
        results: dict = {
            "benchmark": "union", "machine": machine(tmp), "repeat": repeat, "layers": depths,
            "systems": systems, "workloads": workload_names(groups),
            "config": {"files": args.files, "dirs": args.dirs, "big_mib": big_mib,
                       "small_reads": args.small_reads, "negatives": args.negatives,
                       "creates": args.creates},
            "fuse_overlayfs": version([FUSE_OVERLAYFS, "--version"]),
            "layerfs_cmd": layerfs_cmd(), "layerfs_code": layerfs_code(), "setup_s": {}, "depths": []}
        print(f"working in {tmp} (short lowerdir links in {short})", flush=True)

        t0 = time.perf_counter()
        plan = Plan(args.files, args.dirs, nlayers, args.small_reads, args.negatives)
        print(f"writing {nlayers} layers: {args.files} small files in {len(plan.leaves)} dirs and "
              f"a {big_mib} MiB file at the bottom ...", flush=True)
        layer_dirs = write_layers(plan, os.path.join(tmp, "layers"), big_bytes)
        results["setup_s"]["write_layers"] = round(time.perf_counter() - t0, 2)

        store = os.path.join(tmp, "store")
        bench = Bench(tmp, short, layer_dirs, store, big_bytes)
        if "layerfs" in systems:
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
            base = depth["median_s"].get(RATIO_BASE, {})
            depth["ratio_to_fuse"] = {s: {w: round(v / base[w], 3) for w, v in ws.items() if base.get(w)}
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
        print("\nsetup (untimed): " + ", ".join(f"{k} {v}s" for k, v in results["setup_s"].items()))
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
        finish(bench, tmp, short)


if __name__ == "__main__":
    sys.exit(main())
