"""Path resolution in an image's merged tree at 1, 32 and 128 layers.

One chain of layers is imported into a template store (in a temporary directory,
removed at the end): a base layer holding the bulk of a shared tree of ~2,000 paths
(18 directories of 100 files, plus ``wide/`` with 200 files), then layers that each
touch a few paths (2 files rewritten, 2 files added, 1 file whited out; ``wide/`` keeps
exactly 200 entries). Images are tagged at depths 1, 32 and 128.

For each depth, each repeat uses a fresh copy of the template's index, in which no
chain is flattened yet, and measures:

* flatten    ``store.tree(image)`` the first time: resolve the layers and flatten the
             chain into the ``merged`` database (one write transaction)
* tree again ``store.tree(image)`` once the chain is flattened (what every later
             ``ls``/``cat``/mount pays)
* lookup     ``tree.lookup(path)`` per call, for paths that come from the bottom layer,
             for paths that come from the top layer, and for names that do not exist
* listdir    ``list(tree.listdir("wide"))``, a 200-entry directory
* ls -R      wall time of the real CLI ``layerfs ls -R IMAGE`` (a new process, chain
             already flattened, output read through a pipe)

Each figure is the median over --repeat repeats (a lookup figure is the mean of a loop
of --lookups calls in one repeat), in microseconds, with the ratio to the 1-layer image.

    .venv/bin/python benchmarks/bench_resolve.py [--repeat 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import os
import random
import shutil
import sys
import tarfile
import tempfile
import time

from _common import layerfs_cmd, loadavg, machine, median, print_table, timed, write_json

from layerfs.store import Store
from layerfs.store.records import Kind

MTIME = 1_700_000_000
DEPTHS = (1, 32, 128)
NDIRS, PER_DIR, WIDE = 18, 100, 200


def _tar(path: str, dirs: list[str], files: dict[str, bytes], whiteouts: list[str]) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for d in dirs:
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, MTIME
            tf.addfile(ti)
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), 0o644, MTIME
            tf.addfile(ti, io.BytesIO(data))
        for name in whiteouts:
            parent, _, base = name.rpartition("/")
            ti = tarfile.TarInfo(f"{parent}/.wh.{base}")
            ti.mode, ti.mtime = 0o644, MTIME
            tf.addfile(ti)


def plan_layers(nlayers: int, seed: int = 7) -> list[tuple[list[str], dict[str, bytes], list[str]]]:
    """(dirs, files, whiteouts) of every layer, bottom first."""
    rng = random.Random(seed)
    dnames = [f"d{i:02d}" for i in range(NDIRS)]
    base_files = {f"{d}/f{j:03d}.txt": f"{d}/f{j:03d} base\n".encode() for d in dnames for j in range(PER_DIR)}
    base_files.update({f"wide/w{j:03d}": f"wide/w{j:03d} base\n".encode() for j in range(WIDE)})
    layers = [(dnames + ["wide"], base_files, [])]
    alive = set(base_files)
    for k in range(1, nlayers):
        files: dict[str, bytes] = {}
        for p in rng.sample(sorted(alive), 2):  # rewrite two files
            files[p] = f"{p} rewritten by layer {k}\n".encode()
        for j in range(2):  # add two files
            p = f"{rng.choice(dnames)}/l{k:03d}-{j}.txt"
            files[p] = f"{p} added by layer {k}\n".encode()
        gone = rng.choice(sorted(p for p in alive if not p.startswith("wide/") and p not in files))
        alive |= set(files)
        alive.discard(gone)
        dirs = sorted({p.rpartition("/")[0] for p in [*files, gone]})
        layers.append((dirs, files, [gone]))
    return layers


def visible(layers, depth: int) -> dict[str, int]:
    """Simulated merged tree of the first ``depth`` layers: file path -> providing layer."""
    out: dict[str, int] = {}
    for n, (_, files, whiteouts) in enumerate(layers[:depth]):
        for p in whiteouts:
            out.pop(p, None)
        for p in files:
            out[p] = n
    return out


def build_template(tmp: str, layers) -> tuple[str, dict[int, str]]:
    """Import every layer into a store; returns (store root, depth -> image id)."""
    root = os.path.join(tmp, "template")
    images: dict[int, str] = {}
    parent = None
    with Store(root) as store:
        for n, (dirs, files, whiteouts) in enumerate(layers):
            path = os.path.join(tmp, "layer.tar")
            _tar(path, dirs, files, whiteouts)
            depth = n + 1
            tag = f"bench:{depth}" if depth in DEPTHS else None
            parent = store.import_tar(path, parent=parent, tag=tag).image_id
            if tag:
                images[depth] = parent
        os.unlink(path)
    return root, images


def fresh_copy(template: str, dst: str) -> str:
    """A new store whose index is a copy of the template's (no chain flattened yet)."""
    shutil.rmtree(dst, ignore_errors=True)
    os.makedirs(dst)
    shutil.copytree(os.path.join(template, "index.lmdb"), os.path.join(dst, "index.lmdb"))
    return dst


def per_op_us(fn, args: list, n: int) -> float:
    """Mean microseconds per ``fn(arg)`` over ``n`` calls cycling through ``args``."""
    seq = [args[i % len(args)] for i in range(n)]
    t0 = time.perf_counter()
    for a in seq:
        fn(a)
    return (time.perf_counter() - t0) * 1e6 / n


def walk(tree, path: str = "") -> set[str]:
    out: set[str] = set()
    for name, e in tree.listdir(path):
        p = f"{path}/{name}" if path else name
        if e.kind == Kind.DIR:
            out |= walk(tree, p)
        else:
            out.add(p)
    return out


def bench_depth(tmp: str, template: str, layers, depth: int, image: str, repeat: int,
                nlookups: int, cli: list[str], rng: random.Random) -> dict:
    expect = visible(layers, depth)
    deepest = visible(layers, len(layers))
    bottom = sorted(p for p, n in deepest.items() if n == 0)  # from layer 0 at every depth
    bottom = rng.sample(bottom, min(500, len(bottom)))
    top = sorted(p for p, n in expect.items() if n == depth - 1)
    top = top if depth > 1 else bottom
    negative = [f"d{i % NDIRS:02d}/missing-{i}.txt" for i in range(500)]

    m: dict[str, list[float]] = {k: [] for k in (
        "flatten", "tree_again", "lookup_bottom", "lookup_top", "lookup_negative", "listdir_200", "ls_R_cli")}
    for rep in range(repeat):
        root = fresh_copy(template, os.path.join(tmp, f"store-{depth}"))
        with Store(root) as store:
            t0 = time.perf_counter()
            tree = store.tree(image)
            m["flatten"].append((time.perf_counter() - t0) * 1e6)
            t0 = time.perf_counter()
            tree = store.tree(image)
            m["tree_again"].append((time.perf_counter() - t0) * 1e6)
            if rep == 0:  # check that we measure the tree we think we measure
                got = walk(tree)
                if got != set(expect):
                    raise RuntimeError(f"depth {depth}: merged tree differs from the simulation "
                                       f"({len(got ^ set(expect))} paths)")
                for p in top + bottom:
                    e = tree.lookup(p)
                    if e is None or e.kind != Kind.REG:
                        raise RuntimeError(f"depth {depth}: {p} not found")
                if any(tree.lookup(p) is not None for p in negative):
                    raise RuntimeError(f"depth {depth}: a negative lookup found something")
                if len(list(tree.listdir("wide"))) != WIDE:
                    raise RuntimeError(f"depth {depth}: wide/ does not have {WIDE} entries")
            m["lookup_bottom"].append(per_op_us(tree.lookup, bottom, nlookups))
            m["lookup_top"].append(per_op_us(tree.lookup, top, nlookups))
            m["lookup_negative"].append(per_op_us(tree.lookup, negative, nlookups))
            m["listdir_200"].append(per_op_us(lambda d: list(tree.listdir(d)), ["wide"], max(20, nlookups // 50)))
        secs, p = timed(cli + ["ls", "-R", "--root", root, f"bench:{depth}"])
        lines = p.stdout.count(b"\n")
        if lines < len(expect):
            raise RuntimeError(f"depth {depth}: ls -R printed {lines} lines for {len(expect)} files")
        m["ls_R_cli"].append(secs * 1e6)
        shutil.rmtree(root, ignore_errors=True)
    return {"depth": depth, "image": image, "visible_files": len(expect),
            "top_layer_paths": len(top), "ls_R_lines": lines,
            "runs_us": {k: [round(x, 2) for x in v] for k, v in m.items()},
            "median_us": {k: round(median(v), 2) for k, v in m.items()}}


ROWS = [
    ("flatten", "store.tree() first use (flatten)"),
    ("tree_again", "store.tree() again (flattened)"),
    ("lookup_bottom", "lookup, bottom-layer path"),
    ("lookup_top", "lookup, top-layer path"),
    ("lookup_negative", "lookup, missing name"),
    ("listdir_200", "listdir of 200 entries"),
    ("ls_R_cli", "layerfs ls -R (CLI wall)"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5, help="repeats per depth (default 5)")
    ap.add_argument("--lookups", type=int, default=5000, help="lookups per timed loop (default 5000)")
    ap.add_argument("--json", help="write the results as JSON to this path")
    ap.add_argument("--tmpdir", default=None, help="where to work (default: tempfile's, i.e. /tmp)")
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="layerfs-bench-resolve-", dir=args.tmpdir)
    t_start = time.perf_counter()
    try:
        cli = layerfs_cmd()
        results: dict = {"benchmark": "resolve", "machine": machine(tmp), "repeat": args.repeat,
                         "lookups_per_loop": args.lookups, "layerfs_cmd": cli, "depths": []}
        print(f"working in {tmp}", flush=True)
        layers = plan_layers(max(DEPTHS))
        print(f"importing {len(layers)} layers ...", flush=True)
        t0 = time.perf_counter()
        template, images = build_template(tmp, layers)
        results["build_s"] = round(time.perf_counter() - t0, 2)
        results["base_layer_paths"] = len(layers[0][0]) + len(layers[0][1])
        startup = [timed(cli + ["--help"])[0] for _ in range(5)]
        results["layerfs_startup_us"] = round(median(startup) * 1e6, 1)
        rng = random.Random(3)
        for depth in DEPTHS:
            print(f"depth {depth} ...", flush=True)
            results["depths"].append(bench_depth(tmp, template, layers, depth, images[depth],
                                                 args.repeat, args.lookups, cli, rng))
        base = results["depths"][0]["median_us"]
        for d in results["depths"]:
            d["ratio_to_1_layer"] = {k: round(v / base[k], 2) for k, v in d["median_us"].items()}
        results["total_wall_s"] = round(time.perf_counter() - t_start, 1)
        results["loadavg_end"] = loadavg()

        m = results["machine"]
        print(f"\npath resolution, median of {args.repeat} repeats, microseconds per operation; "
              f"{m['cpus']} CPUs, kernel {m['kernel']}, {m['tmp_fs']} at {os.path.dirname(tmp)}"
              + (" (no journal)" if m["tmp_ext4_journal"] == "no" else "") + f", commit {m['commit']}")
        print(f"base layer: {results['base_layer_paths']} paths; every other layer: 2 files rewritten, "
              f"2 added, 1 whited out; built in {results['build_s']}s\n")
        ds = results["depths"]
        header = ["operation (us/op)"] + [f"{d['depth']} layer{'s' if d['depth'] > 1 else ''}" for d in ds]
        header += [f"{d['depth']}/1" for d in ds[1:]]
        rows = [header]
        for key, label in ROWS:
            rows.append([label] + [f"{d['median_us'][key]:,.1f}" for d in ds]
                        + [f"{d['ratio_to_1_layer'][key]:.2f}x" for d in ds[1:]])
        print_table(rows)
        print(f"\nvisible files: " + ", ".join(f"{d['visible_files']} at {d['depth']}" for d in ds)
              + f"; ls -R prints {ds[-1]['ls_R_lines']} lines at {ds[-1]['depth']}")
        print(f"layerfs CLI start-up (layerfs --help, included in ls -R): {results['layerfs_startup_us'] / 1e3:.1f} ms")
        print(f"total wall time {results['total_wall_s']}s; load average at start {m['loadavg_start']}, "
              f"at end {results['loadavg_end']}")
        write_json(args.json, results)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
