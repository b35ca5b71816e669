"""Peak memory of the serving process over a big image, next to fuse-overlayfs.

    python benchmarks/bench_memory.py [--entries 1000000] [--walks 2] [--json F]

Builds one layer of ``--entries`` entries (directories of 1,000 small files) as a
directory, imports it into a fresh store, then for layerfs (the store-backed mount) and
fuse-overlayfs (the same directory as its lower) mounts it, walks the whole tree
``--walks`` times (``find -ls``: a readdir and an lstat of every entry), and reports the
server's peak RSS (VmHWM) and RSS after the walks, its CPU time, and the walk times. The
tree is made once and kept in ``--tmp`` (reused when it is already there).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import cpu_seconds, layerfs_cmd, layerfs_server_pid, loadavg, machine, print_table, run, server_pid, write_json  # noqa: E402

PER_DIR = 1000


def build_tree(root: str, entries: int) -> None:
    """``entries`` names: directories of PER_DIR files (every 10th file has a few bytes)."""
    done = os.path.join(root, ".complete")
    if os.path.exists(done):
        return
    n = 0
    d = 0
    while n < entries:
        dpath = os.path.join(root, "tree", f"d{d:05}")
        os.makedirs(dpath, exist_ok=True)
        n += 1
        for i in range(min(PER_DIR, entries - n)):
            with open(os.path.join(dpath, f"file-with-a-longer-name-{i:04}"), "w") as f:
                if i % 10 == 0:
                    f.write(f"{d}/{i}\n")
            n += 1
        d += 1
    open(done, "w").close()


def status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def walk(mnt: str, walks: int, pid: int) -> dict:
    out = {"walk_s": [], "rss_mb_after_walk": []}
    for _ in range(walks):
        t0 = time.perf_counter()
        subprocess.run(["find", mnt, "-ls"], stdout=subprocess.DEVNULL, check=True)
        out["walk_s"].append(round(time.perf_counter() - t0, 2))
        out["rss_mb_after_walk"].append(round(status_kb(pid, "VmRSS") / 1024, 1))
    out["peak_rss_mb"] = round(status_kb(pid, "VmHWM") / 1024, 1)
    # Private memory, and pages of mapped files (the LMDB index): page cache that other
    # processes share and the kernel can reclaim.
    out["rss_anon_mb"] = round(status_kb(pid, "RssAnon") / 1024, 1)
    out["rss_file_mb"] = round(status_kb(pid, "RssFile") / 1024, 1)
    out["server_cpu_s"] = round(cpu_seconds(pid), 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--entries", type=int, default=1_000_000)
    p.add_argument("--walks", type=int, default=2)
    p.add_argument("--tmp", default=os.path.join(tempfile.gettempdir(), "layerfs-bench-memory"))
    p.add_argument("--json")
    args = p.parse_args()
    tree_root = os.path.join(args.tmp, f"tree-{args.entries}")
    os.makedirs(tree_root, exist_ok=True)
    info = machine(args.tmp)
    t0 = time.perf_counter()
    build_tree(tree_root, args.entries)
    print(f"tree of {args.entries:,} entries ready ({time.perf_counter() - t0:.0f} s)")

    store = os.path.join(tree_root, "store")
    env = dict(os.environ, LAYERFS_ROOT=store)
    lf = layerfs_cmd()
    if not os.path.exists(os.path.join(tree_root, ".imported")):
        t0 = time.perf_counter()
        run(lf + ["import-dir", os.path.join(tree_root, "tree"), "-t", "big:1"], env=env)
        open(os.path.join(tree_root, ".imported"), "w").close()
        print(f"imported ({time.perf_counter() - t0:.0f} s)")

    results = {}
    mnt = os.path.join(args.tmp, "mnt")
    os.makedirs(mnt, exist_ok=True)
    # layerfs: the store-backed mount of the image.
    run(lf + ["mount", "big:1", mnt], env=env)
    try:
        pid = layerfs_server_pid(store, mnt)
        results["layerfs"] = walk(mnt, args.walks, pid)
    finally:
        run(lf + ["umount", mnt], env=env)
    # fuse-overlayfs over the same tree as a plain lower directory.
    scratch = tempfile.mkdtemp(dir=args.tmp)
    up, work = os.path.join(scratch, "u"), os.path.join(scratch, "w")
    os.makedirs(up)
    os.makedirs(work)
    run(["fuse-overlayfs", "-o", f"lowerdir={os.path.join(tree_root, 'tree')},upperdir={up},workdir={work}", mnt])
    try:
        pid = server_pid(mnt, "fuse-overlayfs")
        results["fuse-overlayfs"] = walk(mnt, args.walks, pid)
    finally:
        subprocess.run(["fusermount3", "-u", mnt], check=False)
    info["loadavg_end"] = loadavg()

    rows = [["server", "peak RSS MB", "RSS after each walk MB", "anon / file MB at the end", "walk s",
             "server CPU s"]]
    for name, r in results.items():
        rows.append([name, f"{r['peak_rss_mb']:.0f}", " / ".join(f"{x:.0f}" for x in r["rss_mb_after_walk"]),
                     f"{r['rss_anon_mb']:.0f} / {r['rss_file_mb']:.0f}",
                     " / ".join(f"{x:.1f}" for x in r["walk_s"]), f"{r['server_cpu_s']:.1f}"])
    print(f"\n{args.entries:,} entries, {args.walks} walks (find -ls); load {info['loadavg_start']} -> "
          f"{info['loadavg_end']}")
    print_table(rows)
    write_json(args.json, {"machine": info, "entries": args.entries, "results": results})


if __name__ == "__main__":
    main()
