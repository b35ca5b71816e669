"""``git status`` on a 5,000-file clone in a container, side by side.

A repository of --files files (C sources of 100-800 bytes in --dirs directories, one
commit) is made in a temporary directory (removed at the end). One small base layer (a
few files, as a container image has) is served by

* ``plain``          a plain directory (no union: the floor);
* ``kernel``         ``mount -t overlay`` over the base layer with a fresh upper, module
                     defaults;
* ``fuse-overlayfs`` /usr/bin/fuse-overlayfs, the same directories, default options;
* ``layerfs``        the base layer imported with ``layerfs import-dir``, mounted with
                     ``layerfs mount`` (the store-backed mount);
* ``fuse-layerfs``   the venv's fuse-layerfs over the same directories as the kernel.

In each, the repository is cloned into the container (``git clone --no-local``, so git
writes every object and file itself through the mount; timed once, reported as one run),
then ``git status`` runs once untimed (git refreshes its index after a clone). Then, for
--repeat rounds, the systems take turns:

* ``status warm``  ``git status --porcelain`` right after an untimed one (everything
                   cached, whatever the cold runs dropped);
* ``status cold``  the same after ``sync; echo 3 > /proc/sys/vm/drop_caches`` (page
                   cache, dentries and inodes dropped), unless --no-cold.

Every status must print nothing (the clone is clean); a run that prints anything is
reported as WRONG with its first lines (the mount lists or reads wrong names), and its
time is not used. Reported: the median wall time of each workload, its ratio to the
kernel overlay, and for FUSE mounts the serving process's CPU time (user + system, from
/proc/PID/stat) per run, median. The load average is printed at start and end.

Needs root (mounts, drop_caches), /dev/fuse, git, the overlay module; fuse-overlayfs
is skipped (n/a) when it is not installed.

    .venv/bin/python benchmarks/bench_git_status.py [--files 5000] [--dirs 250]
        [--repeat 3] [--no-cold] [--quick] [--json git_status.json]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from _common import (cpu_seconds, drop_caches, layerfs_cmd, layerfs_server_pid, loadavg, machine, median,
                     mountpoints_under, print_table, run, server_pid, write_json)

SYSTEMS = ("plain", "kernel", "fuse-overlayfs", "layerfs", "fuse-layerfs")
FUSE_LAYERFS = os.path.join(os.path.dirname(sys.executable), "fuse-layerfs")
GIT_ENV = dict(os.environ, GIT_CONFIG_NOSYSTEM="1", GIT_AUTHOR_NAME="b", GIT_AUTHOR_EMAIL="b@example.org",
               GIT_COMMITTER_NAME="b", GIT_COMMITTER_EMAIL="b@example.org", LC_ALL="C")


class NotAvailable(Exception):
    pass


def make_repo(path: str, nfiles: int, ndirs: int, home: str) -> None:
    rnd = random.Random(5)
    for i in range(nfiles):
        d = os.path.join(path, f"src/g{i % ndirs // 25:02}/d{i % ndirs:03}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"f{i:05}.c"), "w") as f:
            f.write("".join(f"int v{i}_{k} = {rnd.randrange(10**6)};\n" for k in range(rnd.randrange(4, 30))))
    env = dict(GIT_ENV, HOME=home)
    run(["git", "init", "-q", "-b", "main", path], env=env)
    run(["git", "add", "-A"], cwd=path, env=env)
    run(["git", "commit", "-q", "-m", "files"], cwd=path, env=env)


def make_base(path: str) -> None:
    for d in ("etc", "usr/bin", "home", "tmp"):
        os.makedirs(os.path.join(path, d))
    for name in ("etc/hostname", "etc/passwd", "usr/bin/tool"):
        with open(os.path.join(path, name), "w") as f:
            f.write(name + "\n")


class Container:
    """The base layer mounted one way, with the clone in it."""

    def __init__(self, system: str, tmp: str, base: str, store: str) -> None:
        self.system = system
        self.dir = os.path.join(tmp, system)
        self.mnt = os.path.join(self.dir, "mnt")
        self.store = store
        upper, work = os.path.join(self.dir, "upper"), os.path.join(self.dir, "work")
        for d in (self.mnt, upper, work):
            os.makedirs(d)
        opts = f"lowerdir={base},upperdir={upper},workdir={work}"
        if system == "plain":
            shutil.copytree(base, self.mnt, symlinks=True, dirs_exist_ok=True)
        elif system == "kernel":
            res = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, self.mnt],
                                 capture_output=True, text=True)
            if res.returncode != 0:
                raise NotAvailable(f"mount -t overlay: {res.stderr.strip()}")
        elif system == "fuse-overlayfs":
            if shutil.which("fuse-overlayfs") is None:
                raise NotAvailable("fuse-overlayfs is not installed")
            run(["fuse-overlayfs", "-o", opts, self.mnt])
        elif system == "fuse-layerfs":
            run([FUSE_LAYERFS, "-o", opts, self.mnt])
        else:
            run(layerfs_cmd() + ["mount", "--root", store, "base", self.mnt])
        marker = {"fuse-overlayfs": "fuse-overlayfs", "fuse-layerfs": "fuse-layerfs"}.get(system)
        if system == "layerfs":
            self.pid = layerfs_server_pid(store, self.mnt)
        else:
            self.pid = server_pid(self.mnt, marker) if marker else 0
        self.repo = os.path.join(self.mnt, "home", "repo")

    def unmount(self) -> None:
        if self.system == "layerfs":
            subprocess.run(layerfs_cmd() + ["umount", "--root", self.store, self.mnt], capture_output=True)
        for mnt in mountpoints_under(self.mnt):
            if subprocess.run(["umount", mnt], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", mnt], capture_output=True)


def git_status(c: Container, home: str) -> tuple[float, float, str]:
    """(wall seconds, server CPU seconds, output) of one ``git status --porcelain``."""
    cpu0 = cpu_seconds(c.pid) if c.pid else 0.0
    t0 = time.perf_counter()
    out = run(["git", "status", "--porcelain"], cwd=c.repo, env=dict(GIT_ENV, HOME=home)).stdout.decode()
    wall = time.perf_counter() - t0
    return wall, (cpu_seconds(c.pid) - cpu0) if c.pid else 0.0, out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=5000)
    p.add_argument("--dirs", type=int, default=250)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--no-cold", action="store_true", help="skip the cold-cache runs")
    p.add_argument("--quick", action="store_true", help="500 files, 1 round (figures labelled quick)")
    p.add_argument("--tmpdir", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.quick:
        args.files, args.dirs, args.repeat = 500, 25, 1
    if os.geteuid() != 0:
        print("bench_git_status.py needs root (mounts, drop_caches)", file=sys.stderr)
        return 2
    workloads = ["status warm"] + ([] if args.no_cold else ["status cold"])
    tmp = tempfile.mkdtemp(prefix="bench-git-", dir=args.tmpdir)
    info = machine(tmp)
    print(f"{args.files} files in {args.dirs} dirs, {args.repeat} rounds{' (--quick)' if args.quick else ''}; "
          f"load average at start {info['loadavg_start']}", flush=True)
    containers: dict[str, Container] = {}
    unavailable: dict[str, str] = {}
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(1))
    results = {s: {w: [] for w in workloads} | {"cpu " + w: [] for w in workloads} for s in SYSTEMS}
    wrong: dict[str, str] = {}
    clone_s: dict[str, float] = {}
    try:
        home = os.path.join(tmp, "home")
        os.makedirs(home)
        repo, base, store = (os.path.join(tmp, n) for n in ("repo", "base", "store"))
        make_repo(repo, args.files, args.dirs, home)
        make_base(base)
        run(layerfs_cmd() + ["import-dir", "--root", store, base, "-t", "base"])
        for s in SYSTEMS:
            try:
                containers[s] = c = Container(s, tmp, base, store)
            except (NotAvailable, RuntimeError) as e:
                unavailable[s] = str(e).strip().splitlines()[0]
                continue
            t0 = time.perf_counter()
            run(["git", "clone", "-q", "--no-local", repo, c.repo], env=dict(GIT_ENV, HOME=home))
            clone_s[s] = time.perf_counter() - t0
            out = run(["git", "status", "--porcelain"], cwd=c.repo, env=dict(GIT_ENV, HOME=home)).stdout
            if out:
                wrong[s] = f"status after clone printed {len(out.splitlines())} lines: {out.decode()[:200]!r}"
            print(f"  {s}: clone {clone_s[s]:.2f} s", flush=True)
        for rnd in range(args.repeat):
            for w in workloads:
                for s, c in containers.items():
                    if w == "status cold":
                        drop_caches()
                    else:  # another system's cold run dropped this one's caches too
                        git_status(c, home)
                    wall, cpu, out = git_status(c, home)
                    if out:
                        wrong.setdefault(s, f"{w} printed {len(out.splitlines())} lines: {out[:200]!r}")
                        continue
                    results[s][w].append(wall)
                    results[s]["cpu " + w].append(cpu)
            print(f"  round {rnd + 1}/{args.repeat} done (load {loadavg()})", flush=True)
    finally:
        for c in containers.values():
            c.unmount()
        left = mountpoints_under(tmp)
        if left:
            print(f"warning: still mounted, {tmp} kept: {left}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    info["loadavg_end"] = loadavg()

    def med(s: str, key: str) -> float | None:
        xs = results[s][key]
        return median(xs) if xs else None

    rows = [["system", "clone s (1 run)"] + [f"{w} s" for w in workloads] + [f"{w} / kernel" for w in workloads]
            + [f"server CPU {w} s" for w in workloads]]
    for s in SYSTEMS:
        if s in unavailable:
            rows.append([s, "n/a"] + ["n/a"] * (3 * len(workloads)))
            continue
        row = [s, f"{clone_s.get(s, 0):.2f}"]
        row += [f"{v:.3f}" if (v := med(s, w)) is not None else "WRONG" for w in workloads]
        for w in workloads:
            v, k = med(s, w), med("kernel", w)
            row.append(f"{v / k:.2f}" if v is not None and k else "-")
        row += [f"{med(s, 'cpu ' + w):.3f}" if containers[s].pid and med(s, w) is not None else "-"
                for w in workloads]
        rows.append(row)
    print()
    print_table(rows)
    for s, why in unavailable.items():
        print(f"n/a {s}: {why}")
    for s, why in wrong.items():
        print(f"WRONG {s}: {why}")
    print(f"\nload average: start {info['loadavg_start']}, end {info['loadavg_end']}"
          f"{'; --quick figures' if args.quick else ''}")
    write_json(args.json, {"machine": info, "files": args.files, "dirs": args.dirs, "repeat": args.repeat,
                           "quick": args.quick, "clone_s": clone_s, "runs_s": results,
                           "unavailable": unavailable, "wrong": wrong})
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
