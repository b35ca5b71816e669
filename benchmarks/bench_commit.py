"""Commit cost: ``layerfs commit`` of a container, next to ``tar -c`` of its upper directory
(and ``cp -a`` of it: a store that keeps a blob per file creates as many files as cp -a).

Workloads (built in a temporary directory, removed at the end):

* ``small``    a change set of --files new small files (1-4 KiB, random bytes) in 100
               directories, written through a layerfs mount of a container
* ``big``      a change set of one new --big-mib MiB file, written through the mount
* ``chmod``    ``chmod 0600`` of a --big-mib MiB file of the image (a metadata-only
               change: the commit reuses the lower blob, but hashing the layer's tar
               still reads the file once); reports the bytes written into blobs/
* ``scale``    the same 10-file change (5 lower files rewritten, 5 new) on an image of
               --scale-small (1,000) files and on one of --scale-large (100,000) files

For ``small``, ``big`` and ``chmod`` every timed commit runs on a fresh copy of a template
store (``cp -a``, untimed, then sync), so no run finds blobs a previous run stored. ``tar
-c -f FILE -C UPPER .`` of the same upper directory (STORE/containers/<id>/upper) runs
right after each commit, into a new file on the same filesystem, then ``cp -a UPPER COPY``
(neither syncs; the commit does, twice). ``scale`` commits the
two containers alternately in one store (a commit of the same upper records nothing new,
but does the same reading and hashing). Times are wall clock of the whole command, including
interpreter start-up for layerfs; each figure is the median of --repeat runs.

    .venv/bin/python benchmarks/bench_commit.py [--repeat 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import subprocess
import sys
import tarfile
import tempfile
import time

from _common import layerfs_cmd, loadavg, machine, median, print_table, quiesce, rmtree, run, timed, write_json

MTIME = 1_700_000_000
BLOCK = 4 << 20


class Layerfs:
    """The real CLI against one store."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.env = dict(os.environ, LAYERFS_ROOT=root)

    def __call__(self, *args: str) -> str:
        return run(layerfs_cmd() + list(args), env=self.env).stdout.decode().strip()

    def timed(self, *args: str) -> tuple[float, str]:
        t, p = timed(layerfs_cmd() + list(args), env=self.env)
        return t, p.stdout.decode().strip()


class Mount:
    """``layerfs mount`` for the duration of a with block; always unmounted."""

    def __init__(self, lf: Layerfs, ref: str, path: str) -> None:
        self.lf, self.ref, self.path = lf, ref, path

    def __enter__(self) -> str:
        os.makedirs(self.path, exist_ok=True)
        return self.lf("mount", self.ref, self.path)

    def __exit__(self, *exc) -> None:
        p = subprocess.run(layerfs_cmd() + ["umount", self.path], env=self.lf.env, capture_output=True)
        if p.returncode != 0:
            subprocess.run(["fusermount3", "-u", self.path], capture_output=True)


def dir_bytes(path: str) -> tuple[int, int]:
    """(files, bytes) under ``path``."""
    n = total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            n += 1
            total += os.lstat(os.path.join(dirpath, f)).st_size
    return n, total


def tar_of(path: str, members: list[tuple[str, bytes | None]]) -> str:
    """A layer tar of directories (data None) and files."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.mtime = MTIME
            if data is None:
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(ti)
            else:
                ti.size, ti.mode = len(data), 0o644
                tf.addfile(ti, io.BytesIO(data))
    return path


def write_big(path: str, size: int) -> None:
    """``size`` bytes: a random 4 MiB block repeated, each copy stamped with its index."""
    base = bytearray(os.urandom(BLOCK))
    with open(path, "wb") as f:
        written, i = 0, 0
        while written < size:
            base[:8] = i.to_bytes(8, "little")
            chunk = bytes(base[: min(BLOCK, size - written)])
            f.write(chunk)
            written += len(chunk)
            i += 1


def base_image(lf: Layerfs, tmp: str) -> str:
    tar = tar_of(os.path.join(tmp, "base.tar"), [("etc", None), ("etc/hostname", b"bench\n"),
                                                   ("etc/passwd", b"root:x:0:0::/root:/bin/sh\n")])
    return lf("import-layer", tar, "-t", "base:1")


# -- templates: a store holding a container with the change set -------------------------


def template_small(tmp: str, nfiles: int) -> dict:
    root = os.path.join(tmp, "tpl-small")
    lf = Layerfs(root)
    base_image(lf, tmp)
    cid = lf("create", "base:1", "--name", "small")
    rng = random.Random(1)
    content = 0
    t0 = time.perf_counter()
    with Mount(lf, cid, os.path.join(tmp, "mnt-small")) as _:
        mnt = os.path.join(tmp, "mnt-small")
        for d in range(100):
            os.makedirs(os.path.join(mnt, f"app/d{d:03d}"))
        for i in range(nfiles):
            size = rng.randint(1024, 4096)
            with open(os.path.join(mnt, f"app/d{i % 100:03d}/file-{i:05d}.dat"), "wb") as f:
                f.write(os.urandom(size))
            content += size
    write_s = time.perf_counter() - t0
    return {"root": root, "cid": cid, "files": nfiles, "content_bytes": content,
            "write_through_mount_s": round(write_s, 2)}


def template_big(tmp: str, size: int) -> dict:
    root = os.path.join(tmp, "tpl-big")
    lf = Layerfs(root)
    base_image(lf, tmp)
    cid = lf("create", "base:1", "--name", "big")
    t0 = time.perf_counter()
    with Mount(lf, cid, os.path.join(tmp, "mnt-big")) as _:
        os.makedirs(os.path.join(tmp, "mnt-big", "data"))
        write_big(os.path.join(tmp, "mnt-big", "data", "blob.bin"), size)
    return {"root": root, "cid": cid, "files": 1, "content_bytes": size,
            "write_through_mount_s": round(time.perf_counter() - t0, 2)}


def template_chmod(tmp: str, size: int) -> dict:
    root = os.path.join(tmp, "tpl-chmod")
    lf = Layerfs(root)
    src = os.path.join(tmp, "chmod-src")
    os.makedirs(os.path.join(src, "data"))
    write_big(os.path.join(src, "data", "blob.bin"), size)
    lf("import-dir", src, "-t", "bigbase:1")
    rmtree(src)
    cid = lf("create", "bigbase:1", "--name", "chmod")
    with Mount(lf, cid, os.path.join(tmp, "mnt-chmod")) as _:
        os.chmod(os.path.join(tmp, "mnt-chmod", "data", "blob.bin"), 0o600)
    upper = os.path.join(root, "containers", cid, "upper")
    return {"root": root, "cid": cid, "files": 1, "content_bytes": size,
            "upper_bytes_on_disk": sum(os.lstat(os.path.join(d, f)).st_blocks * 512
                                       for d, _, fs in os.walk(upper) for f in fs)}


def template_scale(tmp: str, sizes: list[int]) -> dict:
    """One store, an image of each size, and a container of each with the 10-file change."""
    root = os.path.join(tmp, "scale")
    lf = Layerfs(root)
    out = {"root": root, "containers": {}}
    for n in sizes:
        ndirs = max(1, n // 100)
        members: list[tuple[str, bytes | None]] = [("usr", None)]
        members += [(f"usr/d{d:04d}", None) for d in range(ndirs)]
        members += [(f"usr/d{i % ndirs:04d}/f{i:06d}", b"file %d of %d\n" % (i, n)) for i in range(n)]
        tar = tar_of(os.path.join(tmp, f"scale{n}.tar"), members)
        t, _ = lf.timed("import-layer", tar, "-t", f"scale:{n}")
        os.unlink(tar)
        cid = lf("create", f"scale:{n}", "--name", f"scale{n}")
        with Mount(lf, cid, os.path.join(tmp, f"mnt-scale{n}")) as _:
            mnt = os.path.join(tmp, f"mnt-scale{n}")
            for i in range(5):  # 5 lower files rewritten (copied up), 5 new files
                with open(os.path.join(mnt, f"usr/d0000/f{i * ndirs:06d}"), "ab") as f:
                    f.write(b"changed\n")
                with open(os.path.join(mnt, f"usr/d0000/new{i}"), "wb") as f:
                    f.write(b"new file %d\n" % i)
        out["containers"][n] = {"cid": cid, "import_s": round(t, 2)}
    return out


# -- runs ---------------------------------------------------------------------------------


def fresh_copy(template: str, dest: str) -> None:
    rmtree(dest)
    subprocess.run(["cp", "-a", template, dest], check=True)
    quiesce()


def run_vs_tar(tmp: str, tpl: dict, repeat: int) -> dict:
    """Commit on a fresh copy of the template store, then tar -c and cp -a of the same upper."""
    work = os.path.join(tmp, "run")
    commit_s, tar_s, cp_s = [], [], []
    layer = None
    for i in range(repeat + 1):  # one untimed warm-up first
        fresh_copy(tpl["root"], work)
        lf = Layerfs(work)
        t, image = lf.timed("commit", tpl["cid"])
        layer = json.loads(lf("inspect", image))["layers"][-1]
        upper = os.path.join(work, "containers", tpl["cid"], "upper")
        out_tar = os.path.join(tmp, "upper.tar")
        quiesce()
        t_tar, _ = timed(["tar", "-c", "-f", out_tar, "-C", upper, "."])
        tar_bytes = os.path.getsize(out_tar)
        os.unlink(out_tar)
        copy = os.path.join(tmp, "upper-copy")
        quiesce()
        t_cp, _ = timed(["cp", "-a", upper, copy])
        rmtree(copy)
        if i:
            commit_s.append(t)
            tar_s.append(t_tar)
            cp_s.append(t_cp)
    info = json.loads(Layerfs(work)("inspect", layer))
    rmtree(work)
    return {"commit_s": commit_s, "tar_s": tar_s, "cp_s": cp_s, "layer_tar_bytes": info["size"],
            "layer_entries": info["entries"], "tar_c_bytes": tar_bytes}


def run_chmod(tmp: str, tpl: dict, repeat: int) -> dict:
    work = os.path.join(tmp, "run")
    commit_s, blob_bytes, blob_files = [], [], []
    info = {}
    for i in range(repeat):
        fresh_copy(tpl["root"], work)
        lf = Layerfs(work)
        n0, b0 = dir_bytes(os.path.join(work, "blobs"))
        t, image = lf.timed("commit", tpl["cid"])
        n1, b1 = dir_bytes(os.path.join(work, "blobs"))
        commit_s.append(t)
        blob_bytes.append(b1 - b0)
        blob_files.append(n1 - n0)
        info = json.loads(lf("inspect", json.loads(lf("inspect", image))["layers"][-1]))
    rmtree(work)
    return {"commit_s": commit_s, "blob_bytes_written": blob_bytes, "blob_files_written": blob_files,
            "layer_tar_bytes": info.get("size"), "layer_entries": info.get("entries")}


def sha256_rate(size: int) -> float:
    """Seconds for hashlib.sha256 over ``size`` bytes in 4 MiB chunks (the floor of chmod)."""
    block = os.urandom(BLOCK)
    h = hashlib.sha256()
    t0 = time.perf_counter()
    for _ in range(size // BLOCK):
        h.update(block)
    return time.perf_counter() - t0


def run_scale(tpl: dict, repeat: int) -> dict:
    lf = Layerfs(tpl["root"])
    times: dict[int, list[float]] = {n: [] for n in tpl["containers"]}
    for n, c in tpl["containers"].items():  # warm-up: the first commit records the layer
        lf("commit", c["cid"])
    for _ in range(repeat):
        for n, c in tpl["containers"].items():
            quiesce()
            t, _ = lf.timed("commit", c["cid"])
            times[n].append(t)
    return {str(n): {"commit_s": ts, "import_s": tpl["containers"][n]["import_s"]} for n, ts in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--files", type=int, default=10_000)
    p.add_argument("--big-mib", type=int, default=1024)
    p.add_argument("--scale-small", type=int, default=1_000)
    p.add_argument("--scale-large", type=int, default=100_000)
    p.add_argument("--only", action="append", choices=["small", "big", "chmod", "scale"])
    p.add_argument("--tmpdir", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    only = set(args.only or ["small", "big", "chmod", "scale"])
    big = args.big_mib << 20

    tmp = tempfile.mkdtemp(prefix="layerfs-bench-commit-", dir=args.tmpdir)
    result = {"machine": machine(tmp), "args": vars(args), "workloads": {}}
    print(f"temp dir {tmp} ({result['machine']['tmp_fs']}), {result['machine']['cpus']} CPUs, "
          f"load {result['machine']['loadavg_start']}")
    startup = median([timed(layerfs_cmd() + ["--help"])[0] for _ in range(3)])
    result["cli_startup_s"] = startup
    print(f"layerfs start-up (layerfs --help): {startup:.3f} s\n")
    rows = [["workload", "layerfs commit s", "tar -c s", "ratio", "cp -a s", "notes"]]
    try:
        if "small" in only:
            tpl = template_small(tmp, args.files)
            r = run_vs_tar(tmp, tpl, args.repeat)
            r.update(tpl)
            result["workloads"]["small"] = r
            c, t = median(r["commit_s"]), median(r["tar_s"])
            rows.append([f"{args.files} small files (new)", f"{c:.2f}", f"{t:.2f}", f"{c / t:.2f}x",
                         f"{median(r['cp_s']):.2f}",
                         f"{args.files / c:,.0f} files/s, {r['content_bytes'] / c / 1e6:.0f} MB/s"])
            rmtree(tpl["root"])
        if "big" in only:
            tpl = template_big(tmp, big)
            r = run_vs_tar(tmp, tpl, args.repeat)
            r.update(tpl)
            result["workloads"]["big"] = r
            c, t = median(r["commit_s"]), median(r["tar_s"])
            rows.append([f"1 file of {args.big_mib} MiB (new)", f"{c:.2f}", f"{t:.2f}", f"{c / t:.2f}x",
                         f"{median(r['cp_s']):.2f}", f"{big / c / 1e6:.0f} MB/s"])
            rmtree(tpl["root"])
        if "chmod" in only:
            tpl = template_chmod(tmp, big)
            r = run_chmod(tmp, tpl, args.repeat)
            r.update(tpl)
            r["sha256_only_s"] = sha256_rate(big)
            result["workloads"]["chmod"] = r
            c = median(r["commit_s"])
            rows.append([f"chmod of a {args.big_mib} MiB lower file", f"{c:.2f}", "-", "-", "-",
                         f"blobs/ +{max(r['blob_bytes_written'])} B in {max(r['blob_files_written'])} files; "
                         f"layer tar {r['layer_tar_bytes']} B; sha256 alone {r['sha256_only_s']:.2f} s"])
            rmtree(tpl["root"])
        if "scale" in only:
            tpl = template_scale(tmp, [args.scale_small, args.scale_large])
            r = run_scale(tpl, args.repeat)
            result["workloads"]["scale"] = r
            small_c = median(r[str(args.scale_small)]["commit_s"])
            for n in (args.scale_small, args.scale_large):
                c = median(r[str(n)]["commit_s"])
                rows.append([f"10-file change, image of {n:,} files", f"{c:.2f}", "-",
                             f"{c / small_c:.2f}x", "-", f"vs the {args.scale_small:,}-file image"])
    finally:
        for name in os.listdir(tmp):
            if name.startswith("mnt-"):
                subprocess.run(["fusermount3", "-u", os.path.join(tmp, name)], capture_output=True)
        rmtree(tmp)
    result["machine"]["loadavg_end"] = loadavg()
    print()
    print_table(rows)
    print(f"\nload average at start {result['machine']['loadavg_start']}, at end {result['machine']['loadavg_end']}")
    write_json(args.json, result)


if __name__ == "__main__":
    sys.exit(main())
