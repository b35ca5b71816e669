"""Garbage collection and fsck on a big store: time, peak memory, write-transaction time.

Builds a store of --layers single-layer images (default 1,000), each layer a tar of
--files-per-layer small files (default 200) whose contents are all unique, so the store
holds layers x files blobs (default 200,000). The layers are imported with the Store
API from tar streams generated in memory (--jobs processes at once), each image tagged
bench:N. Then every odd-numbered image is removed (rmi), which leaves half the layers
and half the blobs unreferenced, and the real ``layerfs`` command is timed on that store:

* ``fsck --fast`` and ``fsck`` (200,000 blobs recorded),
* ``gc --dry-run`` (reads everything, changes nothing),
* ``gc`` (frees 500 layers and 100,000 blobs; its --json gives ``txn_seconds``, how long
  it held the index write transaction),
* ``gc`` again (nothing to free: the cost of marking and of scanning blobs/),
* ``fsck --fast`` and ``fsck`` once more on the collected store (100,000 blobs).

Each command runs once (gc can free the garbage only once), as a child process reaped
with os.wait4 so that its peak RSS (ru_maxrss) is the command's own. Dirty pages are
written back (sync, untimed) before each; the page cache is not dropped unless --cold
is given (as root), so by default blob files are read from memory.

    .venv/bin/python benchmarks/bench_gc.py [--layers 1000] [--files-per-layer 200]
                                            [--jobs 2] [--cold] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

from _common import REPO, drop_caches, layerfs_cmd, loadavg, machine, print_table, quiesce, write_json

sys.path.insert(0, REPO)

MTIME = 1_700_000_000


def layer_tar(layer: int, nfiles: int) -> bytes:
    """A layer of ``nfiles`` small files (40-500 bytes) whose contents no other file has."""
    rng = random.Random(layer)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        top = f"l{layer:05d}"
        for d in (top, f"{top}/a", f"{top}/b"):
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, MTIME
            tf.addfile(ti)
        for i in range(nfiles):
            data = f"layer {layer} file {i}\n".encode() + rng.randbytes(rng.randint(20, 480))
            ti = tarfile.TarInfo(f"{top}/{'ab'[i % 2]}/f{i:05d}")
            ti.size, ti.mode, ti.mtime = len(data), 0o644, MTIME
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def _build_part(root: str, layers: list[int], nfiles: int) -> None:
    from layerfs.store import Store
    from layerfs.store.tarimport import read_tar

    with Store(root) as store:
        for n in layers:
            data = layer_tar(n, nfiles)
            with store.blobs.ingest() as ingest:
                pending = read_tar(ingest, io.BytesIO(data), f"bench-{n}.tar")
                store.record(ingest, pending, None, {"created_by": "bench_gc"}, f"bench:{n}")


def build_store(root: str, nlayers: int, nfiles: int, jobs: int) -> float:
    """Import the layers (in ``jobs`` processes); return the seconds it took."""
    from layerfs.store import Store

    Store(root).close()  # create it once, before the workers open it
    t0 = time.perf_counter()
    parts = [list(range(j, nlayers, jobs)) for j in range(jobs)]
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_build_part, args=(root, part, nfiles)) for part in parts]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"a build worker failed ({p.exitcode})")
    return time.perf_counter() - t0


def remove_odd_images(root: str, nlayers: int) -> float:
    from layerfs.store import Store

    t0 = time.perf_counter()
    with Store(root) as store:
        for n in range(1, nlayers, 2):
            store.rmi(f"bench:{n}")
    return time.perf_counter() - t0


def measure(root: str, args: list[str], cold: bool, ok_codes=(0,)) -> dict:
    """Run ``layerfs ARGS`` once; wall seconds, peak RSS (MiB) and its output."""
    quiesce()
    if cold:
        drop_caches()
    env = dict(os.environ, LAYERFS_ROOT=root)
    env.pop("LAYERFS_CRASH_AT", None)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(layerfs_cmd() + args, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode(errors="replace")
    if code not in ok_codes:
        raise RuntimeError(f"layerfs {' '.join(args)} failed ({code}): {stderr}")
    return {"command": "layerfs " + " ".join(args), "wall_s": round(wall, 3),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "exit": code,
            "user_s": round(usage.ru_utime, 2), "sys_s": round(usage.ru_stime, 2), "stdout": stdout}


def count_blob_files(root: str) -> int:
    return sum(len(os.listdir(os.path.join(root, "blobs", d))) for d in os.listdir(os.path.join(root, "blobs")))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=1000, help="layers (= images) to build (default 1000)")
    ap.add_argument("--files-per-layer", type=int, default=200, help="unique small files per layer (default 200)")
    ap.add_argument("--jobs", type=int, default=2, help="processes importing the layers (default 2)")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each command (root only)")
    ap.add_argument("--json", help="write the results as JSON to this path")
    ap.add_argument("--tmpdir", default=None, help="where to work (default: tempfile's, i.e. /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the store afterwards (its path is printed)")
    args = ap.parse_args()
    n, f = args.layers, args.files_per_layer
    if n < 2 or f < 1:
        ap.error("need at least 2 layers and 1 file per layer")

    tmp = tempfile.mkdtemp(prefix="layerfs-bench-gc-", dir=args.tmpdir)
    root = os.path.join(tmp, "store")
    t_start = time.perf_counter()
    try:
        results: dict = {"benchmark": "gc", "machine": machine(tmp), "layers": n, "files_per_layer": f,
                         "blobs": n * f, "cold_cache": args.cold, "layerfs_cmd": layerfs_cmd()}
        print(f"working in {tmp}", flush=True)
        print(f"building {n} layers x {f} files ({n * f} blobs) with {args.jobs} processes ...", flush=True)
        results["build_s"] = round(build_store(root, n, f, args.jobs), 1)
        results["rmi_s"] = round(remove_odd_images(root, n), 2)
        dead_layers, dead_blobs = n // 2, (n // 2) * f
        print(f"built in {results['build_s']}s; removed {dead_layers} images in {results['rmi_s']}s", flush=True)
        assert count_blob_files(root) == n * f, "the store does not hold one blob per file"
        results["index_mib"] = round(os.path.getsize(os.path.join(root, "index.lmdb", "data.mdb")) / 2**20, 1)

        runs: list[tuple[str, dict]] = []

        def step(label: str, cmd: list[str], **kw) -> dict:
            print(f"  {label} ...", flush=True)
            r = measure(root, cmd, args.cold, **kw)
            runs.append((label, r))
            return r

        step(f"fsck --fast ({n * f} blobs)", ["fsck", "--fast"])
        step(f"fsck ({n * f} blobs)", ["fsck"])
        dry = step("gc --dry-run", ["gc", "--dry-run", "--json"])
        gc = step("gc", ["gc", "--json"])
        again = step("gc again (nothing to free)", ["gc", "--json"])
        left = n * f - dead_blobs
        step(f"fsck --fast ({left} blobs)", ["fsck", "--fast"])
        step(f"fsck ({left} blobs)", ["fsck"])

        dry_r, gc_r, again_r = (json.loads(r["stdout"]) for r in (dry, gc, again))
        for r in (dry_r, gc_r):
            assert len(r["layers"]) == dead_layers and r["blobs"] == dead_blobs, r
        assert again_r["blobs"] == 0 and not again_r["layers"]
        assert count_blob_files(root) == left, "gc left blob files behind"
        for label, r in runs:
            if label.startswith("gc"):
                r["txn_seconds"] = json.loads(r["stdout"])["txn_seconds"]
            r.pop("stdout")
        results["runs"] = [{"label": label, **r} for label, r in runs]
        results["gc_freed"] = {"layers": len(gc_r["layers"]), "blobs": gc_r["blobs"], "bytes": gc_r["bytes"]}
        results["total_wall_s"] = round(time.perf_counter() - t_start, 1)
        results["loadavg_end"] = loadavg()

        m = results["machine"]
        print(f"\ngc and fsck on a store of {n} layers / {n * f} blobs, half of them unreferenced; "
              f"{m['cpus']} CPUs, kernel {m['kernel']}, {m['tmp_fs']} at {os.path.dirname(tmp)}, "
              f"{'cold' if args.cold else 'warm'} page cache; one run each\n")
        rows = [["command", "wall s", "user s", "sys s", "peak RSS MiB", "write txn s"]]
        for label, r in runs:
            rows.append([label, f"{r['wall_s']:.2f}", f"{r['user_s']:.2f}", f"{r['sys_s']:.2f}",
                         f"{r['peak_rss_mib']:.0f}",
                         f"{r['txn_seconds']:.3f}" if "txn_seconds" in r else ""])
        print_table(rows, align_right_from=1)
        print(f"\ngc freed {len(gc_r['layers'])} layers, {gc_r['blobs']} blobs, {gc_r['bytes'] / 1e6:.1f} MB; "
              f"index {results['index_mib']} MiB before gc; store built in {results['build_s']}s")
        print(f"total wall time {results['total_wall_s']}s; load average at start {m['loadavg_start']}, "
              f"at end {results['loadavg_end']}")
        write_json(args.json, results)
    finally:
        if args.keep:
            print(f"store kept at {root}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
