"""Build time: ``layerfs build`` next to ``buildah bud --isolation chroot`` (Debian's buildah).

Two Dockerfiles, the same text for both tools:

* ``small``  on the demo image (busybox-static, base-files): RUN echo, COPY a file, ENV, CMD
* ``apt``    on a Debian bookworm minbase (``debootstrap``, packages from apt's cache):
             ``RUN apt-get install -y --no-install-recommends hello`` (the package is
             fetched from the mirror debootstrap used; the base has its package lists)

Each is built cold (``--no-cache`` for both) and fully cached (the same build again:
every step a cache hit), the tools alternating run by run; each figure is the median of
--repeat runs, wall clock of the whole command. Both tools get the same base images:
layerfs loads them (the demo image's OCI layout, ``import-dir`` of the debootstrap
tree) and ``layerfs save`` hands them to buildah (``buildah pull oci-archive:``), into
a private storage (overlay driver) under the temporary directory.

    .venv/bin/python benchmarks/bench_build.py [--repeat 3] [--rootfs DIR] [--json out.json] [--quick]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

from _common import (REPO, layerfs_cmd, loadavg, machine, median, mountpoints_under, print_table, rmtree, run, timed,
                     write_json)

sys.path.insert(0, REPO)

SMALL = """\
FROM layerfs-demo
RUN echo built > /built.txt
COPY app.txt /app/app.txt
ENV APP=/app
CMD ["/bin/cat", "/app/app.txt"]
"""
APT = """\
FROM debian-base
RUN apt-get install -y --no-install-recommends hello && rm -rf /var/cache/apt/archives/*.deb
CMD ["hello"]
"""
MIRROR = os.environ.get("LAYERFS_DEBIAN_MIRROR", "http://deb.debian.org/debian")


def debootstrap(dest: str) -> None:
    run(["debootstrap", "--variant=minbase", "--cache-dir=/var/cache/apt/archives", "bookworm", dest, MIRROR])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--rootfs", help="a debootstrap tree to reuse (else one is made)")
    p.add_argument("--tmpdir", default="/tmp")
    p.add_argument("--json")
    p.add_argument("--quick", action="store_true", help="one run each, the small Dockerfile only")
    args = p.parse_args()
    if os.geteuid() != 0 or not shutil.which("buildah"):
        sys.exit("needs root and buildah (apt-get install buildah)")
    repeat = 1 if args.quick else args.repeat
    tmp = tempfile.mkdtemp(prefix="bench-build-", dir=args.tmpdir)
    load_start = loadavg()
    try:
        store = os.path.join(tmp, "store")
        env = dict(os.environ, LAYERFS_ROOT=store)
        lf = layerfs_cmd()
        buildah = ["buildah", "--root", os.path.join(tmp, "bh-root"), "--runroot", os.path.join(tmp, "bh-run"),
                   "--storage-driver", "overlay"]
        from layerfs.store.sample import write_demo_layout

        layout = write_demo_layout(os.path.join(tmp, "demo-layout"))
        run(lf + ["load", layout], env=env)
        bases = ["layerfs-demo"]
        workloads = {"small": SMALL}
        if not args.quick:
            rootfs = args.rootfs or os.path.join(tmp, "rootfs")
            if not args.rootfs:
                debootstrap(rootfs)
            run(lf + ["import-dir", rootfs, "-t", "debian-base"], env=env)
            bases.append("debian-base")
            workloads["apt"] = APT
        for base in bases:
            archive = os.path.join(tmp, f"{base}.tar")
            run(lf + ["save", base, "-o", archive], env=env)
            run(buildah + ["pull", "-q", f"oci-archive:{archive}"])  # named localhost/BASE:latest
        contexts = {}
        for name, text in workloads.items():
            ctx = os.path.join(tmp, f"ctx-{name}")
            os.makedirs(ctx)
            with open(os.path.join(ctx, "Dockerfile"), "w") as f:
                f.write(text)
            with open(os.path.join(ctx, "app.txt"), "w") as f:
                f.write("the app\n")
            contexts[name] = ctx
        tools = {
            "layerfs": lambda ctx, cached: lf + ["build", "-q"] + ([] if cached else ["--no-cache"]) + [ctx],
            "buildah": lambda ctx, cached: buildah + ["bud", "--isolation", "chroot", "--layers", "-q"]
                                           + ([] if cached else ["--no-cache"]) + [ctx],
        }
        times: dict[tuple[str, str, str], list[float]] = {}
        for name, ctx in contexts.items():
            for tool, cmd in tools.items():  # warm up: the cached runs find their cache
                run(cmd(ctx, True), env=env)
            for _ in range(repeat):
                for mode in ("cold", "cached"):
                    for tool, cmd in tools.items():
                        seconds, _ = timed(cmd(ctx, mode == "cached"), env=env)
                        times.setdefault((name, mode, tool), []).append(seconds)
        rows = [["dockerfile", "build", "layerfs s", "buildah s", "layerfs/buildah"]]
        results = []
        for name in contexts:
            for mode in ("cold", "cached"):
                a, b = median(times[(name, mode, "layerfs")]), median(times[(name, mode, "buildah")])
                rows.append([name, mode, f"{a:.2f}", f"{b:.2f}", f"{a / b:.2f}x"])
                results.append({"dockerfile": name, "build": mode, "layerfs": times[(name, mode, "layerfs")],
                                "buildah": times[(name, mode, "buildah")]})
        print(f"medians of {repeat} interleaved runs{' (--quick)' if args.quick else ''}")
        print_table(rows, align_right_from=2)
        load_end = loadavg()
        print(f"load average: start {load_start}, end {load_end}")
        write_json(args.json, {"machine": machine(tmp), "repeat": repeat, "results": results,
                               "loadavg_start": load_start, "loadavg_end": load_end})
    finally:
        run(["buildah", "--root", os.path.join(tmp, "bh-root"), "--runroot", os.path.join(tmp, "bh-run"),
             "--storage-driver", "overlay", "rm", "--all"])
        umount_below(os.path.join(tmp, "bh-root"))
        rmtree(tmp)


def umount_below(root: str) -> None:
    """buildah's overlay storage leaves a mount of its own layer directory behind."""
    for m in mountpoints_under(root):
        subprocess.run(["umount", "-l", m], capture_output=True)


if __name__ == "__main__":
    main()
