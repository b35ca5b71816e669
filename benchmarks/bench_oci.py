"""Image load and save against skopeo and umoci, on a real multi-layer Debian image.

The image is built here: ``debootstrap --variant=minbase`` (packages from apt's cache
where it has them), split by umoci into three layers (the rootfs without /usr/share,
then /usr/share, then a small change that deletes the docs and adds a file), stored as
an OCI layout with gzip layers. Then, interleaved, ``--repeat`` times each:

load:  layerfs load LAYOUT (a new store each run)
       skopeo copy oci:LAYOUT:bench dir:NEW   (copies and verifies the gzip blobs)
       umoci unpack --image LAYOUT:bench NEW  (verifies, decompresses, extracts a rootfs)
save:  layerfs save bench -o NEW --format oci-dir                (gzip, recompressed)
       layerfs save bench -o NEW --format oci-dir --compress none
       skopeo copy oci:LAYOUT:bench oci:NEW:bench            (blobs copied as they are)
       skopeo copy oci:LAYOUT:bench docker-archive:NEW.tar   (decompressed to plain tars)

Run as root from the checkout:  .venv/bin/python benchmarks/bench_oci.py [--repeat 3]
[--rootfs DIR (reuse a debootstrap tree)] [--json out.json] [--quick (one run)]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (debootstrap, layerfs_cmd, loadavg, machine, median, print_table, quiesce,  # noqa: E402
                     rmtree, run, timed, write_json)

TAG = "bench"


def build_layout(rootfs: str, work: str) -> str:
    """A three-layer OCI layout of ``rootfs`` made with umoci; returns its path."""
    layout = os.path.join(work, "layout")
    run(["umoci", "init", "--layout", layout])
    run(["umoci", "new", "--image", f"{layout}:empty"])

    def layer(base: str, tag: str, fill) -> None:
        bundle = os.path.join(work, "bundle")
        run(["umoci", "unpack", "--image", f"{layout}:{base}", bundle])
        fill(os.path.join(bundle, "rootfs"))
        run(["umoci", "repack", "--image", f"{layout}:{tag}", bundle])
        rmtree(bundle)

    def copy(exclude: list[str], include: str = "."):
        def fill(dest: str) -> None:
            tar = subprocess.Popen(["tar", "-C", rootfs, *[f"--exclude=./{e}" for e in exclude], "-cf", "-",
                                    include], stdout=subprocess.PIPE)
            run(["tar", "-C", dest, "-xpf", "-"], stdin=tar.stdout)
            if tar.wait() != 0:
                raise RuntimeError("tar of the rootfs failed")
        return fill

    def change(dest: str) -> None:
        shutil.rmtree(os.path.join(dest, "usr/share/doc"))
        os.makedirs(os.path.join(dest, "usr/share/doc"))
        with open(os.path.join(dest, "etc/bench-release"), "w") as f:
            f.write("bench image\n")

    # apt's caches and lists are left out, as Debian's container images leave them out.
    layer("empty", "l1", copy(["usr/share", "var/cache/apt/*", "var/lib/apt/lists/*"]))
    layer("l1", "l2", copy([], "./usr/share"))
    layer("l2", TAG, change)
    run(["umoci", "config", "--image", f"{layout}:{TAG}", "--config.cmd", "/bin/bash"])
    for tag in ("empty", "l1", "l2"):
        run(["umoci", "rm", "--image", f"{layout}:{tag}"])
    run(["umoci", "gc", "--layout", layout])
    return layout


def dir_bytes(path: str) -> int:
    return sum(os.lstat(os.path.join(d, f)).st_size for d, _, fs in os.walk(path) for f in fs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="one run of each (figures labelled --quick)")
    ap.add_argument("--rootfs", help="an existing debootstrap tree to use instead of building one")
    ap.add_argument("--mirror", default="http://deb.debian.org/debian")
    ap.add_argument("--tmpdir", default=None)
    ap.add_argument("--json", help="write every run's figures here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_oci.py needs root (debootstrap, umoci unpack with owners)")
    for tool in ("umoci", "skopeo") + (() if args.rootfs else ("debootstrap",)):
        if shutil.which(tool) is None:
            sys.exit(f"bench_oci.py needs {tool} (apt-get install {tool})")
    repeat = 1 if args.quick else args.repeat
    work = tempfile.mkdtemp(prefix="layerfs-bench-oci-", dir=args.tmpdir)
    info = machine(work)
    layerfs = layerfs_cmd()
    try:
        t0 = time.perf_counter()
        rootfs = args.rootfs
        if not rootfs:
            rootfs = os.path.join(work, "debootstrap")
            debootstrap(rootfs, args.mirror)
        layout = build_layout(rootfs, work)
        run(["umoci", "unpack", "--image", f"{layout}:{TAG}", os.path.join(work, "unpacked-check")])
        build_s = time.perf_counter() - t0
        blobs = os.path.join(layout, "blobs", "sha256")
        compressed = dir_bytes(blobs)
        uncompressed = dir_bytes(os.path.join(work, "unpacked-check", "rootfs"))
        rmtree(os.path.join(work, "unpacked-check"))
        print(f"image: 3 layers, rootfs {uncompressed / 1e6:.0f} MB, layout {compressed / 1e6:.0f} MB "
              f"(gzip); built in {build_s:.0f} s", flush=True)

        saved_store = os.path.join(work, "store-for-save")
        run([*layerfs, "--help"])
        run([*layerfs, "load", "--root", saved_store, layout])  # the store the saves read from
        n = 0

        def out(name: str) -> str:
            nonlocal n
            n += 1
            return os.path.join(work, f"out-{n}-{name}")

        tools = {
            "load: layerfs load": lambda: [*layerfs, "load", "--root", out("store"), layout],
            "load: skopeo copy oci: -> dir:": lambda: ["skopeo", "copy", "-q", f"oci:{layout}:{TAG}",
                                                         f"dir:{out('skopeo-dir')}"],
            "load: umoci unpack": lambda: ["umoci", "unpack", "--image", f"{layout}:{TAG}", out("bundle")],
            "save: layerfs save (gzip)": lambda: [*layerfs, "save", "--root", saved_store, TAG, "-o",
                                                  out("saved-gz"), "--format", "oci-dir"],
            "save: layerfs save --compress none": lambda: [*layerfs, "save", "--root", saved_store, TAG, "-o",
                                                           out("saved-plain"), "--format", "oci-dir",
                                                           "--compress", "none"],
            "save: skopeo copy oci: -> oci:": lambda: ["skopeo", "copy", "-q", f"oci:{layout}:{TAG}",
                                                       f"oci:{out('skopeo-oci')}:{TAG}"],
            "save: skopeo copy oci: -> docker-archive:": lambda: ["skopeo", "copy", "-q", f"oci:{layout}:{TAG}",
                                                                  f"docker-archive:{out('skopeo.tar')}"],
        }
        times: dict[str, list[float]] = {name: [] for name in tools}
        for name, cmd in tools.items():  # one untimed warm-up each
            run(cmd())
        for _ in range(repeat):
            for name, cmd in tools.items():
                quiesce()
                seconds, _ = timed(cmd())
                times[name].append(seconds)
                print(f"  {name}: {seconds:.2f} s", flush=True)
        info["loadavg_end"] = loadavg()
        peers = {"load": "load: umoci unpack", "save": "save: skopeo copy oci: -> docker-archive:"}
        rows = [["operation", "median s", "min s", "MB/s (rootfs)", f"vs {peers['load'][6:]} / {peers['save'][6:]}"]]
        for name, xs in times.items():
            peer = median(times[peers[name.split(":")[0]]])
            rows.append([name, f"{median(xs):.2f}", f"{min(xs):.2f}", f"{uncompressed / 1e6 / median(xs):.0f}",
                         f"{median(xs) / peer:.2f}x"])
        label = " (--quick: one run)" if args.quick else f" (median of {repeat} interleaved runs)"
        print(f"\nbench_oci{label}; load average {info['loadavg_start']} at start, {info['loadavg_end']} at end")
        print_table(rows)
        write_json(args.json, {"machine": info, "rootfs_bytes": uncompressed, "layout_bytes": compressed,
                               "repeat": repeat, "times": times})
    finally:
        rmtree(work)


if __name__ == "__main__":
    main()
