"""Push and pull through a loopback registry (Debian's docker-registry), next to skopeo.

The image is bench_oci's: debootstrap minbase split by umoci into three gzip layers
(about 113 MB unpacked, 51 MB compressed), loaded into a store once. A fourth layer
(one small file) on top makes ``bench:v2``, an image that shares its base layers with
``bench:v1``. Then, interleaved, ``--repeat`` times each (a new registry, on a free
loopback port with its own storage, for every row that must not find blobs there):

push:        layerfs push bench REG/bench:v1             (a new registry)
             skopeo copy oci:LAYOUT:bench docker://REG/bench:v1   (a new registry)
push again:  layerfs push bench REG/bench:v1             (the registry has every blob)
             skopeo copy oci:LAYOUT:bench docker://REG/bench:v1   (the same)
pull:        layerfs pull REG/bench:v1                   (a new store: fetch, verify,
                                                          decompress, index every file)
             skopeo copy docker://REG/bench:v1 oci:NEW:v1 (fetch and verify, no file tree)
             the same skopeo copy, then umoci unpack      (a rootfs too, as a pull for a
                                                          container engine ends)
pull shared: layerfs pull REG/bench:v2                   (a store that has bench:v1)
             skopeo copy docker://REG/bench:v2 oci:LAYOUT_WITH_V1:v2

Run as root from the checkout:  .venv/bin/python benchmarks/bench_registry.py
[--repeat 3] [--rootfs DIR (reuse a debootstrap tree)] [--json out.json] [--quick]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from _common import layerfs_cmd, loadavg, machine, median, print_table, quiesce, rmtree, run, timed, write_json  # noqa: E402
from bench_oci import TAG, build_layout, debootstrap, dir_bytes  # noqa: E402
from registryserver import RegistryServer  # noqa: E402  (the tests' registry starter)


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
        sys.exit("bench_registry.py needs root (debootstrap, umoci)")
    for tool in ("umoci", "skopeo", "docker-registry") + (() if args.rootfs else ("debootstrap",)):
        if shutil.which(tool) is None:
            sys.exit(f"bench_registry.py needs {tool} (apt-get install {tool})")
    repeat = 1 if args.quick else args.repeat
    work = tempfile.mkdtemp(prefix="layerfs-bench-registry-", dir=args.tmpdir)
    info = machine(work)
    layerfs = layerfs_cmd()
    servers: list[RegistryServer] = []
    temporary: list[RegistryServer] = []  # a row's fresh registry, stopped after its run
    n = 0

    def fresh(name: str) -> str:
        nonlocal n
        n += 1
        return os.path.join(work, f"{n}-{name}")

    def registry(keep: bool = False) -> str:
        srv = RegistryServer(fresh("registry")).start()
        (servers if keep else temporary).append(srv)
        return srv.host

    try:
        rootfs = args.rootfs
        if not rootfs:
            rootfs = os.path.join(work, "debootstrap")
            debootstrap(rootfs, args.mirror)
        layout = build_layout(rootfs, work)
        compressed = dir_bytes(os.path.join(layout, "blobs", "sha256"))
        store = os.path.join(work, "store")
        run([*layerfs, "load", "--root", store, layout])
        extra = os.path.join(work, "extra")
        os.makedirs(os.path.join(extra, "etc"))
        with open(os.path.join(extra, "etc", "bench-v2"), "w") as f:
            f.write("v2\n")
        run([*layerfs, "import-dir", "--root", store, "--parent", TAG, "-t", "bench:v2", extra])
        shared = registry(keep=True)  # holds v1 and v2 for the pull rows
        run([*layerfs, "push", "--root", store, TAG, f"{shared}/bench:v1"])
        run([*layerfs, "push", "--root", store, "bench:v2", f"{shared}/bench:v2"])
        again = registry(keep=True)  # every blob already there, for the "push again" rows
        run([*layerfs, "push", "--root", store, TAG, f"{again}/bench:v1"])
        with_v1 = fresh("store-with-v1")
        layout_v1 = fresh("layout-with-v1")
        print(f"image: 3 layers, {compressed / 1e6:.0f} MB compressed; registry storage "
              f"{dir_bytes(os.path.join(servers[0].dir, 'data')) / 1e6:.0f} MB", flush=True)

        def pull_store_with_v1() -> str:
            path = fresh("store-shared")
            shutil.copytree(with_v1, path, symlinks=True)
            return path

        def skopeo_layout_with_v1() -> str:
            path = fresh("layout-shared")
            shutil.copytree(layout_v1, path, symlinks=True)
            return path

        run([*layerfs, "pull", "--root", with_v1, f"{shared}/bench:v1"])
        run(["skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{shared}/bench:v1", f"oci:{layout_v1}:v1"])

        # name -> function returning (command, setup done before timing)
        tools = {
            "push: layerfs push": lambda: [*layerfs, "push", "--root", store, TAG, f"{registry()}/bench:v1"],
            "push: skopeo copy oci: -> docker://": lambda: [
                "skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{layout}:{TAG}", f"docker://{registry()}/bench:v1"],
            "push again: layerfs push": lambda: [*layerfs, "push", "--root", store, TAG, f"{again}/bench:v1"],
            "push again: skopeo copy": lambda: [
                "skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{layout}:{TAG}", f"docker://{again}/bench:v1"],
            "pull: layerfs pull": lambda: [*layerfs, "pull", "--root", fresh("store"), f"{shared}/bench:v1"],
            "pull: skopeo copy docker:// -> oci:": lambda: [
                "skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{shared}/bench:v1", f"oci:{fresh('oci')}:v1"],
            "pull: skopeo copy + umoci unpack": lambda: [
                "sh", "-c", 'skopeo copy -q --src-tls-verify=false "$1" "oci:$2:v1" && umoci unpack --image "$2:v1" "$3"',
                "sh", f"docker://{shared}/bench:v1", fresh("oci"), fresh("bundle")],
            "pull shared base: layerfs pull": lambda: [
                *layerfs, "pull", "--root", pull_store_with_v1(), f"{shared}/bench:v2"],
            "pull shared base: skopeo copy": lambda: [
                "skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{shared}/bench:v2",
                f"oci:{skopeo_layout_with_v1()}:v2"],
        }
        times: dict[str, list[float]] = {name: [] for name in tools}
        def stop_temporary() -> None:
            while temporary:
                srv = temporary.pop()
                srv.stop()
                rmtree(srv.dir)

        for cmd in tools.values():  # one untimed warm-up each
            run(cmd())
            stop_temporary()
        for _ in range(repeat):
            for name, make in tools.items():
                cmd = make()  # registries started and stores copied here, untimed
                quiesce()
                seconds, _ = timed(cmd)
                stop_temporary()
                times[name].append(seconds)
                print(f"  {name}: {seconds:.2f} s", flush=True)
        info["loadavg_end"] = loadavg()
        rows = [["operation", "median s", "min s", "vs skopeo (copy only)"]]
        peers = {"push": "push: skopeo copy oci: -> docker://", "push again": "push again: skopeo copy",
                 "pull": "pull: skopeo copy docker:// -> oci:", "pull shared base": "pull shared base: skopeo copy"}
        for name in tools:
            peer = peers[name.split(":")[0]]
            rows.append([name, f"{median(times[name]):.2f}", f"{min(times[name]):.2f}",
                         f"{median(times[name]) / median(times[peer]):.2f}x"])
        label = " (--quick: one run)" if args.quick else f" (median of {repeat} interleaved runs)"
        print(f"\nbench_registry{label}; load average {info['loadavg_start']} at start, "
              f"{info['loadavg_end']} at end")
        print_table(rows)
        write_json(args.json, {"machine": info, "layout_bytes": compressed, "repeat": repeat, "times": times,
                               "when": time.time()})
    finally:
        for srv in servers + temporary:
            srv.stop()
        rmtree(work)


if __name__ == "__main__":
    main()
