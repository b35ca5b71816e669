"""The kernel backend's metadata image: how long it takes to build, how big it is, and
what its two forms cost a mount.

One image of --files files (default 100,000) in --dirs directories, each file 0 to
--max-kib KiB (uniform), is imported once from a tar streamed into ``layerfs
import-layer -`` (a file's bytes are a prefix of one random buffer, so the store stays
small; the sizes are what a metadata image cares about). Then, --repeat times, the
forms taking turns:

* build erofs   ``metaimage.ensure(as_erofs=True)``: the EROFS image layerfs writes
                (store/erofs.py); the image is deleted before each build
* build dir     ``metaimage.ensure(as_erofs=False)``: the same tree as a directory of
                sparse files with overlayfs's xattrs (for kernels that cannot mount
                EROFS from a file)
* mount         ``layerfs mount --backend kernel`` with the image built (CLI wall time,
                Python's start-up included), and the same through the API in-process
* cold walk     os.walk + lstat of the kernel-backend mount, caches dropped, once with
                each form of the image underneath

and once, for the record: Debian's ``mkfs.erofs`` (erofs-utils) over the directory form,
which is what building the image with erofs-utils would take (it reads every byte of
the sparse files; see store/erofs.py).

Needs root. Medians of --repeat runs (default 3); --quick: 20,000 files, one run.

    .venv/bin/python benchmarks/bench_metaimage.py [--quick] [--files N] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import layerfs_cmd, loadavg, machine, median, print_table, write_json  # noqa: E402

from layerfs.store import Store, metaimage  # noqa: E402
from layerfs.unionfs import kernel, mount as mnt_api  # noqa: E402


def stream_layer(out, files: int, dirs: int, max_kib: int, seed: int = 7) -> int:
    """Write the layer's tar to ``out``; returns the sum of the file sizes."""
    rng = random.Random(seed)
    data = os.urandom(max_kib << 10)
    total = 0
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tf:
        for d in range(dirs):
            ti = tarfile.TarInfo(f"d{d // 100:03d}/d{d:05d}")
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
            tf.addfile(ti)
        for i in range(files):
            size = rng.randint(0, max_kib << 10)
            total += size
            ti = tarfile.TarInfo(f"d{(i % dirs) // 100:03d}/d{i % dirs:05d}/f{i:06d}")
            ti.size, ti.mode, ti.mtime = size, 0o644, 1_700_000_000 + i
            tf.addfile(ti, _Prefix(data, size))
    return total


class _Prefix:
    def __init__(self, data: bytes, size: int) -> None:
        self.data, self.pos, self.size = data, 0, size

    def read(self, n: int = -1) -> bytes:
        n = self.size - self.pos if n < 0 else min(n, self.size - self.pos)
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def walk(root: str) -> int:
    n = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            os.lstat(os.path.join(dirpath, name))
            n += 1
    return n


def du_bytes(path: str) -> int:
    return int(subprocess.run(["du", "-s", "-B1", path], capture_output=True, text=True, check=True).stdout.split()[0])


def fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}" if v < 100 else f"{v:.1f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=None, help="files in the image (default 100000)")
    ap.add_argument("--dirs", type=int, default=None, help="directories (default files / 50)")
    ap.add_argument("--max-kib", type=int, default=16, help="largest file in KiB (default 16)")
    ap.add_argument("--repeat", type=int, default=None, help="runs (default 3)")
    ap.add_argument("--quick", action="store_true", help="20,000 files, one run")
    ap.add_argument("--no-mkfs", action="store_true", help="skip the mkfs.erofs comparison")
    ap.add_argument("--json", help="write the runs and medians as JSON here")
    ap.add_argument("--tmpdir", default=None)
    args = ap.parse_args()
    files = args.files or (20_000 if args.quick else 100_000)
    dirs = args.dirs or max(1, files // 50)
    repeat = args.repeat or (1 if args.quick else 3)
    if os.geteuid() != 0 or kernel.unsupported():
        print(f"bench_metaimage.py needs root and the kernel backend: {kernel.unsupported()}", file=sys.stderr)
        return 2
    tmp = tempfile.mkdtemp(prefix="layerfs-bench-meta-", dir=args.tmpdir)
    root = os.path.join(tmp, "store")
    mnt = os.path.join(tmp, "mnt")
    os.makedirs(mnt)
    cli = layerfs_cmd()
    results: dict = {"benchmark": "metaimage", "machine": machine(tmp), "files": files, "dirs": dirs,
                     "max_kib": args.max_kib, "repeat": repeat, "runs_s": {}, "sizes": {}}
    runs: dict[str, list[float]] = {k: [] for k in ("build_erofs", "build_dir", "mount_cli", "mount_api",
                                                    "cold_walk_erofs", "cold_walk_dir")}
    try:
        print(f"importing {files} files in {dirs} directories ...", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.Popen(cli + ["import-layer", "--root", root, "-", "-t", "meta:bench"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        total = stream_layer(proc.stdin, files, dirs, args.max_kib)
        proc.stdin.close()
        if proc.wait() != 0:
            raise RuntimeError("layerfs import-layer failed")
        results["import_s"] = round(time.perf_counter() - t0, 1)
        results["file_bytes"] = total
        with Store(root) as store:
            image = store.resolve_image("meta:bench")
            store.tree(image)  # the merged view, flattened untimed
            for rep in range(repeat):
                for form in ("erofs", "dir"):
                    as_erofs = form == "erofs"
                    for meta in metaimage.stored(root):
                        metaimage.remove(meta)
                    os.sync()
                    t0 = time.perf_counter()
                    meta = metaimage.ensure(store, image, as_erofs=as_erofs)
                    runs[f"build_{form}"].append(time.perf_counter() - t0)
                    results["sizes"][form] = os.path.getsize(meta.path) if as_erofs else du_bytes(meta.path)
                    # a cold walk of a kernel-backend mount over this form
                    saved = kernel.FILE_EROFS_KERNEL
                    kernel.FILE_EROFS_KERNEL = saved if as_erofs else (999, 0)
                    try:
                        t0 = time.perf_counter()
                        c = mnt_api.mount(store, "meta:bench", mnt, backend="kernel", read_only=True)
                        if as_erofs:
                            runs["mount_api"].append(time.perf_counter() - t0)
                        try:
                            drop_caches()
                            t0 = time.perf_counter()
                            seen = walk(mnt)
                            runs[f"cold_walk_{form}"].append(time.perf_counter() - t0)
                            if seen != files:
                                raise RuntimeError(f"the walk saw {seen} files, not {files}")
                        finally:
                            mnt_api.umount(store, c.id)
                    finally:
                        kernel.FILE_EROFS_KERNEL = saved
                    print(f"[run {rep + 1}/{repeat}] {form}: build {fmt(runs[f'build_{form}'][-1])} s, "
                          f"cold walk {fmt(runs[f'cold_walk_{form}'][-1])} s", flush=True)
                metaimage.ensure(store, image, as_erofs=True)
                t0 = time.perf_counter()
                out = subprocess.run(cli + ["mount", "--root", root, "--backend", "kernel", "--read-only",
                                            "meta:bench", mnt], capture_output=True, text=True)
                runs["mount_cli"].append(time.perf_counter() - t0)
                if out.returncode != 0:
                    raise RuntimeError(out.stderr)
                subprocess.run(cli + ["umount", "--root", root, mnt], check=True, capture_output=True)
            if not args.no_mkfs and shutil.which("mkfs.erofs"):
                src = metaimage.ensure(store, image, as_erofs=False).path
                out = os.path.join(tmp, "mkfs.erofs")
                os.sync()
                t0 = time.perf_counter()
                subprocess.run(["mkfs.erofs", "--quiet", "-x1", "--chunksize=4096", out, src], check=True)
                results["mkfs_erofs_s"] = round(time.perf_counter() - t0, 2)
                results["sizes"]["mkfs.erofs"] = os.path.getsize(out)
                results["mkfs_erofs_version"] = subprocess.run(["mkfs.erofs", "--help"], capture_output=True,
                                                               text=True).stdout.splitlines()[0:1]
        results["runs_s"] = {k: [round(x, 4) for x in v] for k, v in runs.items()}
        results["median_s"] = {k: round(median(v), 4) for k, v in runs.items() if v}
        results["loadavg_end"] = loadavg()
        m = results["machine"]
        print(f"\nmetadata image of {files} files in {dirs} dirs, {total / 1e9:.2f} GB of file sizes; "
              f"import {results['import_s']} s (untimed setup)")
        print(f"{m['cpus']} CPUs, kernel {m['kernel']}, {m['tmp_fs']}; medians of {repeat} run(s)")
        med = results["median_s"]
        rows = [["", "EROFS (layerfs)", "directory", "mkfs.erofs over the directory"],
                ["build (s)", fmt(med.get("build_erofs")), fmt(med.get("build_dir")),
                 fmt(results.get("mkfs_erofs_s")) + " (+ the directory's build)" if "mkfs_erofs_s" in results else "n/a"],
                ["size (bytes on disk)", f"{results['sizes'].get('erofs', 0):,}", f"{results['sizes'].get('dir', 0):,}",
                 f"{results['sizes']['mkfs.erofs']:,}" if "mkfs.erofs" in results["sizes"] else "n/a"],
                ["cold walk + lstat of the mount (s)", fmt(med.get("cold_walk_erofs")), fmt(med.get("cold_walk_dir")), ""]]
        print_table(rows)
        print(f"mount --backend kernel, image built: CLI {fmt(med.get('mount_cli'))} s, "
              f"in-process {fmt(med.get('mount_api'))} s")
        print(f"load average at start {m['loadavg_start']}, at end {results['loadavg_end']}")
        write_json(args.json, results)
        return 0
    finally:
        if os.path.ismount(mnt):
            subprocess.run(["umount", "-l", mnt])
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
