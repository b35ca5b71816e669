"""Import throughput: ``layerfs import-layer`` against ``tar -x`` of the same tarball.

Workloads (generated in a temporary directory, removed at the end):

* ``small``    a layer of --files small files (1-4 KiB, random bytes) in --dirs directories
* ``small.gz`` the same tar, gzip-compressed (``layerfs import-layer`` vs ``tar -xz``)
* ``big``      one tar holding a single --big-mib MiB file of random-ish bytes

Every run starts from scratch: a new store (layerfs) or a new, empty directory (tar).
Each workload gets one untimed warm-up of each tool, then --repeat timed runs of each,
alternating layerfs and tar. Before every run dirty pages are written back with sync(2)
(untimed); the page cache is never dropped, so the input tarball is read from memory.
Outputs of the small-file workloads are kept until the end (about 1.5 GB at the
defaults), see Runner; the 1 GiB outputs are deleted after each run. Times are wall
clock of the whole command, including interpreter start-up for layerfs.

    .venv/bin/python benchmarks/bench_import.py [--repeat 3] [--json out.json] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import gzip
import io
import json
import os
import pstats
import random
import shutil
import sys
import tarfile
import tempfile
import time

from _common import (layerfs_cmd, loadavg, machine, median, print_table, quiesce, rmtree, run,
                     timed, write_json)

MTIME = 1_700_000_000
BLOCK = 4 << 20


def write_small_tar(path: str, nfiles: int, ndirs: int, seed: int = 1) -> dict:
    """A layer of ``nfiles`` files of 1-4 KiB random bytes, spread over ``ndirs`` leaf
    directories (grouped 20 to a parent directory), directory entries included."""
    rng = random.Random(seed)
    groups = max(1, ndirs // 20)
    leaves = [f"usr/g{g:02d}/d{d:03d}" for d in range(ndirs) for g in [d % groups]]
    leaves.sort()
    content_bytes = 0
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        def add_dir(name: str) -> None:
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, MTIME
            tf.addfile(ti)

        add_dir("usr")
        for g in range(groups):
            add_dir(f"usr/g{g:02d}")
        for d in leaves:
            add_dir(d)
        for i in range(nfiles):
            size = rng.randint(1024, 4096)
            ti = tarfile.TarInfo(f"{leaves[i % len(leaves)]}/file-{i:05d}.dat")
            ti.size, ti.mode, ti.mtime = size, 0o644, MTIME
            tf.addfile(ti, io.BytesIO(os.urandom(size)))
            content_bytes += size
    return {"files": nfiles, "dirs": 1 + groups + len(leaves), "content_bytes": content_bytes,
            "tar_bytes": os.path.getsize(path)}


def write_big_tar(path: str, size: int) -> dict:
    """One directory and one ``size``-byte file: a random 4 MiB block repeated, each copy
    stamped with its index so that no two blocks are equal."""
    base = bytearray(os.urandom(BLOCK))
    d = tarfile.TarInfo("data")
    d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, MTIME
    f_info = tarfile.TarInfo("data/blob.bin")
    f_info.size, f_info.mode, f_info.mtime = size, 0o644, MTIME
    with open(path, "wb") as f:
        f.write(d.tobuf(tarfile.PAX_FORMAT))
        f.write(f_info.tobuf(tarfile.PAX_FORMAT))
        written, i = 0, 0
        mv = memoryview(base)
        while written < size:
            base[0:8] = i.to_bytes(8, "little")
            n = min(BLOCK, size - written)
            f.write(mv[:n])
            written += n
            i += 1
        f.write(b"\0" * (-size % 512))
        f.write(b"\0" * 1024)  # end-of-archive blocks
        f.write(b"\0" * (-f.tell() % tarfile.RECORDSIZE))
    return {"files": 1, "dirs": 1, "content_bytes": size, "tar_bytes": os.path.getsize(path)}


def gzip_file(src: str, dst: str) -> int:
    with open(src, "rb") as fi, gzip.open(dst, "wb", compresslevel=6) as fo:
        shutil.copyfileobj(fi, fo, 1 << 20)
    return os.path.getsize(dst)


class Runner:
    """Runs each tool into a new output directory.

    Outputs of many-file workloads are kept until the end of the script (``keep``):
    deleting 20,000 files just before the next run makes that run slower on a
    filesystem that avoids reusing recently freed inodes (ext4 without a journal skips
    inodes freed in the last 60 s, or 360 s while their inode-table block is dirty,
    and walks over each of them on every allocation). Few-file outputs (the 1 GiB
    file) are deleted at once to save space.
    """

    def __init__(self, tmp: str) -> None:
        self.tmp = tmp
        self.layerfs = layerfs_cmd()
        self.n = 0

    def _fresh(self, name: str) -> str:
        self.n += 1
        return os.path.join(self.tmp, f"{name}-{self.n}")

    def layerfs_import(self, tarball: str, keep: bool, check: bool = False) -> float:
        root = self._fresh("store")
        quiesce()
        secs, p = timed(self.layerfs + ["import-layer", "--root", root, tarball])
        if not p.stdout.startswith(b"sha256:"):
            raise RuntimeError(f"unexpected import-layer output: {p.stdout!r}")
        if check:
            self.last_layers = run(self.layerfs + ["layers", "--root", root, "--json"]).stdout
        if not keep:
            rmtree(root)
        return secs

    def tar_extract(self, tarball: str, flags: str, keep: bool, check: bool = False) -> float:
        out = self._fresh("untar")
        os.mkdir(out)
        quiesce()
        secs, _ = timed(["tar", flags, "-f", tarball, "-C", out])
        if check:
            self.last_count = sum(len(fs) for _, _, fs in os.walk(out))
        if not keep:
            rmtree(out)
        return secs


def bench_workload(r: Runner, name: str, tarball: str, tar_flags: str, info: dict,
                   repeat: int) -> dict:
    keep = info["files"] > 100
    print(f"  {name}: warm-up", flush=True)
    r.layerfs_import(tarball, keep, check=True)
    layers = json.loads(r.last_layers)
    if len(layers) != 1 or layers[0]["entries"] < info["files"]:
        raise RuntimeError(f"{name}: layerfs recorded {layers}")
    r.tar_extract(tarball, tar_flags, keep, check=True)
    if r.last_count != info["files"]:
        raise RuntimeError(f"{name}: tar extracted {r.last_count} files, expected {info['files']}")
    lf, tr = [], []
    for i in range(repeat):
        lf.append(r.layerfs_import(tarball, keep))
        tr.append(r.tar_extract(tarball, tar_flags, keep))
        print(f"  {name}: run {i + 1}/{repeat}: layerfs {lf[-1]:.3f}s, tar {tr[-1]:.3f}s", flush=True)

    def summary(times: list[float]) -> dict:
        m = median(times)
        return {"runs_s": [round(t, 4) for t in times], "median_s": round(m, 4),
                "min_s": round(min(times), 4),
                "mb_per_s": round(info["tar_bytes"] / 1e6 / m, 1), "files_per_s": round(info["files"] / m, 1)}

    res = {"workload": name, "tarball_bytes": os.path.getsize(tarball), **info,
           "layerfs": summary(lf), "tar": {"command": f"tar {tar_flags}", **summary(tr)}}
    res["ratio_layerfs_over_tar"] = round(res["layerfs"]["median_s"] / res["tar"]["median_s"], 2)
    return res


def profile_import(tmp: str, tarball: str, top: int = 15) -> dict:
    """One in-process Store.import_tar of ``tarball`` under cProfile (a fresh store)."""
    from layerfs.store import Store

    root = os.path.join(tmp, "store-profile")
    quiesce()
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    with Store(root) as s:
        prof.enable()
        s.import_tar(tarball)
        prof.disable()
    wall = time.perf_counter() - t0
    rmtree(root)
    out = {"wall_s_with_profiler": round(wall, 3)}
    for key in ("cumulative", "tottime"):
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).strip_dirs().sort_stats(key).print_stats(top)
        text = buf.getvalue()
        # keep from the column header on
        out[key] = text[text.index("   ncalls"):].rstrip() if "   ncalls" in text else text
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per tool and workload (default 3)")
    ap.add_argument("--json", help="write the results as JSON to this path")
    ap.add_argument("--files", type=int, default=20000, help="files in the small-file layer (default 20000)")
    ap.add_argument("--dirs", type=int, default=200, help="leaf directories of the small-file layer (default 200)")
    ap.add_argument("--big-mib", type=int, default=1024, help="size of the single big file in MiB (default 1024)")
    ap.add_argument("--only", choices=["small", "small.gz", "big"], action="append",
                    help="run only these workloads (repeatable)")
    ap.add_argument("--profile", action="store_true",
                    help="also cProfile one in-process import of the small-file tar; print the top 15")
    ap.add_argument("--tmpdir", default=None, help="where to work (default: tempfile's, i.e. /tmp)")
    args = ap.parse_args()
    only = set(args.only or ["small", "small.gz", "big"])

    tmp = tempfile.mkdtemp(prefix="layerfs-bench-import-", dir=args.tmpdir)
    t_start = time.perf_counter()
    try:
        results: dict = {"benchmark": "import", "machine": machine(tmp), "repeat": args.repeat,
                         "layerfs_cmd": layerfs_cmd(), "workloads": []}
        print(f"working in {tmp}", flush=True)
        r = Runner(tmp)
        startup = [timed(r.layerfs + ["--help"])[0] for _ in range(5)]
        results["layerfs_startup_s"] = round(median(startup), 4)

        small = os.path.join(tmp, "small.tar")
        if only & {"small", "small.gz"} or args.profile:
            print(f"generating {args.files} small files ...", flush=True)
            small_info = write_small_tar(small, args.files, args.dirs)
        if "small" in only:
            results["workloads"].append(bench_workload(
                r, f"{args.files} small files (tar)", small, "-x", small_info, args.repeat))
        if "small.gz" in only:
            gz = small + ".gz"
            gzip_file(small, gz)
            results["workloads"].append(bench_workload(
                r, f"{args.files} small files (tar.gz)", gz, "-xz", small_info, args.repeat))
            os.unlink(gz)
        if "big" in only:
            print(f"generating a {args.big_mib} MiB file ...", flush=True)
            big = os.path.join(tmp, "big.tar")
            big_info = write_big_tar(big, args.big_mib << 20)
            results["workloads"].append(bench_workload(
                r, f"1 file of {args.big_mib} MiB (tar)", big, "-x", big_info, args.repeat))
            os.unlink(big)
        if args.profile:
            print("profiling one in-process import of the small-file tar ...", flush=True)
            results["profile"] = profile_import(tmp, small)
        results["total_wall_s"] = round(time.perf_counter() - t_start, 1)
        results["loadavg_end"] = loadavg()

        m = results["machine"]
        print(f"\nimport throughput, median of {args.repeat} runs (after 1 warm-up each); "
              f"{m['cpus']} CPUs, kernel {m['kernel']}, {m['tmp_fs']} at {os.path.dirname(tmp)}"
              + (" (no journal)" if m["tmp_ext4_journal"] == "no" else "") + f", commit {m['commit']}")
        print("MB/s and files/s from the median; MB = 1e6 uncompressed tar bytes; "
              "ratio = layerfs median / tar median\n")
        rows = [["workload", "tar MB", "tool", "median s", "min s", "MB/s", "files/s", "ratio"]]
        for w in results["workloads"]:
            for tool, label in (("layerfs", "layerfs import-layer"), ("tar", w["tar"]["command"])):
                s = w[tool]
                rows.append([w["workload"] if tool == "layerfs" else "",
                             f"{w['tar_bytes'] / 1e6:.1f}" if tool == "layerfs" else "",
                             label, f"{s['median_s']:.3f}", f"{s['min_s']:.3f}", f"{s['mb_per_s']:.1f}",
                             f"{s['files_per_s']:.0f}" if s["files_per_s"] >= 10 else f"{s['files_per_s']:.2f}",
                             f"{w['ratio_layerfs_over_tar']:.2f}x" if tool == "layerfs" else ""])
        print_table(rows, align_right_from=3)
        print(f"\nlayerfs CLI start-up (layerfs --help, included in every layerfs time): "
              f"{results['layerfs_startup_s']:.3f}s")
        if m["tmp_ext4_journal"] == "no":
            print("note: ext4 without a journal skips inodes freed in the last 60-360 s when it creates "
                  "files;\n      runs within ~6 minutes of a mass delete (such as the end of a previous "
                  "run of this\n      script) create files much more slowly")
        if "profile" in results:
            p = results["profile"]
            print(f"\ncProfile of one Store.import_tar of the small-file tar "
                  f"({p['wall_s_with_profiler']:.2f}s with the profiler on)")
            print("\ntop 15 by cumulative time:\n" + p["cumulative"])
            print("\ntop 15 by total (own) time:\n" + p["tottime"])
        print(f"\ntotal wall time {results['total_wall_s']}s; load average at start {m['loadavg_start']}, "
              f"at end {results['loadavg_end']}")
        write_json(args.json, results)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
