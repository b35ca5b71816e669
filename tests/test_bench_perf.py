"""benchmarks/bench_perf.py, the performance table of issue 12, run end to end on tiny
layers: every row gets a figure for every system, the FUSE servers' CPU time is read,
and nothing stays mounted or on disk afterwards."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "benchmarks", "bench_perf.py")
SYSTEMS = ["plain", "kernel", "fuse-overlayfs", "layerfs", "fuse-layerfs"]
FUSE = ["fuse-overlayfs", "layerfs", "fuse-layerfs"]
GROUPS = "walk,negative,small_read,readdir,mkdir,copy_up,read_big,dd"
WORKLOADS = ["mount", "first_mount", "first_walk", "warm_walk", "negative", "small_read", "first_readdir",
             "repeat_readdir", "mkdir_p", "create", "copy_up", "seq_read", "fio", "dd"]
TINY = ["--repeat", "1", "--files", "60", "--dirs", "6", "--wide", "40", "--small-reads", "10",
        "--negatives", "50", "--creates", "20", "--mkdir-chains", "2", "--mkdir-depth", "4", "--big-mib", "4",
        "--fio-mib", "1", "--dd-mib", "1"]


@pytest.fixture(autouse=True)
def _requirements():
    if os.geteuid() != 0:
        pytest.skip("needs root: mounts the kernel overlay and FUSE filesystems")
    missing = [t for t in ("fusermount3", "fuse-overlayfs", "fio") if shutil.which(t) is None]
    if missing or not os.path.exists("/dev/fuse"):
        pytest.skip(f"needs /dev/fuse and {', '.join(missing) or 'fuse'}")


def _run(tmp_path, *args: str) -> tuple[dict, str]:
    out = tmp_path / "perf.json"
    p = subprocess.run([sys.executable, BENCH, *args, "--json", str(out), "--tmpdir", str(tmp_path)],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    short = re.search(r"short lowerdir links in (\S+)\)", p.stdout).group(1)
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split()[4] for line in f]
    assert not [m for m in mounts if m.startswith((str(tmp_path), short))], "left mounted"
    assert not os.path.exists(short)
    assert [p.name for p in tmp_path.iterdir()] == ["perf.json"], "the temporary tree was not removed"
    return json.loads(out.read_text()), p.stdout


def test_every_row_for_every_system_with_server_cpu(tmp_path):
    r, stdout = _run(tmp_path, "--layers", "1,3", "--workloads", GROUPS + ",commit,import",
                     "--commit-files", "20", "--import-files", "20", *TINY)
    assert [d["layers"] for d in r["depths"]] == [1, 3]
    for d in r["depths"]:
        assert d["errors"] == [] and d["not_available"] == {}
        for s in SYSTEMS:
            for w in WORKLOADS:
                med = d["median"][s][w]
                assert med["runs"] >= 1 and (med["value"] > 0 or s == "plain"), (d["layers"], s, w)
                if s in FUSE:  # the serving process's CPU time was read before and after
                    assert med["cpu"] is not None and med["cpu"] >= 0, (s, w)
                else:
                    assert med["cpu"] is None
        for s in ("layerfs", "fuse-layerfs"):
            assert set(d["ratio_to_fuse"][s]) >= set(WORKLOADS) - {"first_mount"}
            assert d["vs_kernel"]["dd"][s] > 0
        assert d["loadavg_start"] and d["loadavg_end"]
    for op in ("commit", "import"):
        assert r["store_ops"][op]["layerfs_s"] > 0 and r["store_ops"][op]["ratio"] > 0
    assert r["store_ops"]["commit"]["cp_a_s"] > 0
    for title in ("\n1 layer:", "\n3 layers:", "layerfs / fuse-overlayfs:", "fuse-layerfs / fuse-overlayfs:",
                  "fio 4k randread, warm, IOPS", "commit of 20 new small files", "cp -a of the same upper",
                  "load average at start"):
        assert title in stdout


def test_kernel_beyond_its_layer_limit_is_not_available_with_the_reason(tmp_path):
    """The kernel's overlay stacks at most 500 lower layers: the row says n/a and why,
    and the other systems are still measured."""
    r, stdout = _run(tmp_path, "--layers", "501", "--systems", "plain,kernel,fuse-overlayfs",
                     "--workloads", "negative", *TINY)
    depth = r["depths"][0]
    assert set(depth["not_available"]) == {"kernel"}
    assert "the kernel did not mount 501 lower layers" in depth["not_available"]["kernel"]
    assert "kernel: n/a: the kernel did not mount 501 lower layers" in stdout
    assert depth["median"]["fuse-overlayfs"]["negative"]["value"] > 0
