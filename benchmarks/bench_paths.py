"""Import and lookup with 4,000-byte paths next to short paths.

Two layers of the same shape, generated each run: 2,000 files of 64 bytes in 20
directories of 100, under a common prefix. In "short" the prefix is ``p`` (paths like
``p/d07/f0042``, 11 bytes); in "long" it is 40 levels of 99-byte names, so every path is
4,010 bytes, 42 levels deep (the kernel's PATH_MAX is 4,096 with its NUL). Index keys name a directory by a 16-byte digest of its path, so the long layer's
keys are as short as the short one's: this measures what the length still costs.

For each layer, --repeat runs, the two layers alternating:

* import      wall time of the real CLI ``layerfs import-layer`` into a new store
* lookup      ``tree.lookup(path)`` of every file (in process, chain flattened), per call
* listdir     ``list(tree.listdir(dir))`` of every 100-file directory, per call
* mount stat  ``os.stat`` of every file through a fresh read-only mount (the kernel
              looks each new path component up through FUSE), whole walk; with the
              serving process's CPU time (user + system) over the walk

Medians over the runs, and the long/short ratio. Load average at start and end.

    .venv/bin/python benchmarks/bench_paths.py [--repeat 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time

from _common import layerfs_cmd, loadavg, machine, median, print_table, rmtree, timed, write_json

from layerfs.store import Store

NDIRS, PER_DIR = 20, 100
LONG_PREFIX = "/".join(f"{i:02d}" + "x" * 97 for i in range(40))  # 40 levels, 3,999 bytes


def make_layer(path: str, prefix: str) -> list[str]:
    """Write the layer; return its file paths."""
    files = []
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for d in range(NDIRS):
            for j in range(PER_DIR):
                name = f"{prefix}/d{d:02d}/f{j:04d}"
                ti = tarfile.TarInfo(name)
                data = name[-60:].encode().ljust(64, b".")
                ti.size, ti.mode, ti.mtime = len(data), 0o644, 1_700_000_000
                tf.addfile(ti, io.BytesIO(data))
                files.append(name)
    return files


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_run(tmp: str, name: str, tar: str, files: list[str], run: int) -> dict:
    root = os.path.join(tmp, f"store-{name}-{run}")
    env = dict(os.environ, LAYERFS_ROOT=root)
    os.sync()
    t_import, _ = timed(layerfs_cmd() + ["import-layer", tar, "-t", "p:1"], env=env)
    out = {"import_s": t_import}
    with Store(root) as s:
        tree = s.tree("p:1")
        t0 = time.perf_counter()
        for p in files:
            tree.lookup(p)
        out["lookup_us"] = (time.perf_counter() - t0) / len(files) * 1e6
        dirs = sorted({p.rpartition("/")[0] for p in files})
        t0 = time.perf_counter()
        for d in dirs:
            list(tree.listdir(d))
        out["listdir_us"] = (time.perf_counter() - t0) / len(dirs) * 1e6
    mnt = os.path.join(tmp, "m")  # short, so mountpoint + 4,000-byte path < PATH_MAX
    os.makedirs(mnt, exist_ok=True)
    proc = subprocess.run(layerfs_cmd() + ["mount", "--read-only", "p:1", mnt], env=env,
                          capture_output=True, check=True)
    try:
        cid = proc.stdout.decode().strip()
        pid = next(c["pid"] for c in json.loads(
            subprocess.run(layerfs_cmd() + ["ps", "--json"], env=env, capture_output=True,
                           check=True).stdout) if c["id"] == cid)
        cpu0 = cpu_seconds(pid)
        t0 = time.perf_counter()
        for p in files:
            os.stat(os.path.join(mnt, p))
        out["mount_stat_s"] = time.perf_counter() - t0
        out["server_cpu_s"] = cpu_seconds(pid) - cpu0
    finally:
        subprocess.run(layerfs_cmd() + ["umount", mnt], env=env, capture_output=True)
    rmtree(root)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tmpdir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bp-", dir=args.tmpdir or "/tmp")
    info = machine(tmp)
    try:
        layers = {}
        for name, prefix in (("short", "p"), ("long", LONG_PREFIX)):
            tar = os.path.join(tmp, f"{name}.tar")
            files = make_layer(tar, prefix)
            layers[name] = (tar, files)
        longest = max(len(p.encode()) for p in layers["long"][1])
        print(f"short: {len(layers['short'][1])} files, paths of {len(layers['short'][1][0])} bytes; "
              f"long: paths of {min(len(p.encode()) for p in layers['long'][1])}-{longest} bytes")
        runs: dict[str, list[dict]] = {"short": [], "long": []}
        for run in range(args.repeat):
            for name in ("short", "long") if run % 2 == 0 else ("long", "short"):
                runs[name].append(one_run(tmp, name, *layers[name], run))
        info["loadavg_end"] = loadavg()
        metrics = [("import_s", "import (s)"), ("lookup_us", "lookup (us/call)"),
                   ("listdir_us", "listdir 100 (us/call)"), ("mount_stat_s", "mount stat all (s)"),
                   ("server_cpu_s", "server CPU (s)")]
        rows = [["", "short", "long", "long/short"]]
        result = {}
        for key, label in metrics:
            s, lg = median([r[key] for r in runs["short"]]), median([r[key] for r in runs["long"]])
            result[key] = {"short": s, "long": lg}
            rows.append([label, f"{s:.3f}", f"{lg:.3f}", f"{lg / s:.2f}x" if s else "-"])
        print(f"medians of {args.repeat} interleaved runs; load average {info['loadavg_start']} at start, "
              f"{info['loadavg_end']} at end; commit {info['commit']}")
        print_table(rows)
        write_json(args.json, {"machine": info, "medians": result, "runs": runs})
    finally:
        rmtree(tmp)


if __name__ == "__main__":
    sys.exit(main())
