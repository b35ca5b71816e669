"""The installed distribution: one ``layerfs`` package (no generic top-level names), an
SPDX license, ``pip install .`` from a read-only checkout into a fresh venv, and the
serving processes (forked by ``layerfs mount`` and by ``fuse-layerfs``)
started from the installed, non-editable package."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from helpers import make_tar
from layerfs.store.index import truncation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Not source: never part of what is installed (as .gitignore says; /build/ only at the
# top, where setuptools builds: unionfs/build/ is source).
_NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", ".pytest_cache",
                                     ".hypothesis")


def _not_source(directory: str, names: list[str]) -> set[str]:
    return _NOT_SOURCE(directory, names) | ({"build"} if directory == REPO else set())

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="a read-only bind mount needs root")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> str:
    """A fresh venv with layerfs installed by ``pip install CHECKOUT`` from a copy of this
    checkout that is read-only (bind-mounted so, in a private mount namespace: root
    writes anywhere else). Returns the venv."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("a read-only bind mount needs root and unshare")
    tmp = tmp_path_factory.mktemp("packaging")
    src, venv = str(tmp / "checkout"), str(tmp / "venv")
    shutil.copytree(REPO, src, symlinks=True, ignore=_not_source)
    before = sorted(os.path.relpath(os.path.join(d, n), src) for d, ds, fs in os.walk(src) for n in ds + fs)
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=300)
    script = ('mount --bind "$SRC" "$SRC" && mount -o remount,bind,ro "$SRC" && cd / && '
              '"$VENV/bin/python" -m pip install --quiet "$SRC"')
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, SRC=src, VENV=venv, PIP_DISABLE_PIP_VERSION_CHECK="1"))
    assert proc.returncode == 0, proc.stderr
    after = sorted(os.path.relpath(os.path.join(d, n), src) for d, ds, fs in os.walk(src) for n in ds + fs)
    assert after == before  # nothing was written into the checkout
    return venv


def _venv_python(venv: str, code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([os.path.join(venv, "bin", "python"), "-c", code], capture_output=True, text=True,
                          cwd="/", env=env, timeout=120)


def test_one_package_no_generic_top_level_names(installed):
    code = ("import importlib.metadata as m, json; d = m.distribution('layerfs'); "
            "print(json.dumps({'files': [str(f) for f in d.files], 'license': d.metadata['License-Expression'], "
            "'classic': d.metadata['License']}))")
    proc = _venv_python(installed, code)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["license"] == "Apache-2.0" and info["classic"] is None
    tops = {f.split("/")[0] for f in info["files"]}
    assert {t for t in tops if not t.endswith(".dist-info") and not t.startswith("..")} == {"layerfs"}
    names = {f for f in info["files"] if f.startswith("layerfs/") and f.endswith(".py")}
    assert {"layerfs/cli.py", "layerfs/store/store.py", "layerfs/store/oci/layout.py",
            "layerfs/store/registry/client.py", "layerfs/unionfs/mount.py"} <= names
    assert not any(f.startswith(("layerfs/tests/", "layerfs/benchmarks/", "layerfs/build_backend/"))
                   for f in info["files"])
    for generic in ("store", "unionfs", "cli"):
        proc = _venv_python(installed, f"import {generic}")
        assert f"No module named '{generic}'" in proc.stderr, proc


def _fuse_mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == os.path.realpath(path) for line in f)


@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse")
def test_installed_package_mounts(installed, tmp_path):
    """The installed package's commands start their serving processes from itself."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["LAYERFS_ROOT"] = str(tmp_path / "store")
    exe = os.path.join(installed, "bin", "layerfs")

    def run(*args: str) -> str:
        proc = subprocess.run([exe, *args], capture_output=True, text=True, env=env, cwd="/", timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    tar = make_tar(str(tmp_path / "app.tar"), [("etc", "d"), ("etc/hostname", "f", "installed\n")])
    assert run("--version") == "layerfs 0.1.0\n"
    run("import-layer", tar, "-t", "app:1")
    mnt = str(tmp_path / "mnt")
    os.mkdir(mnt)
    run("mount", "--rm", "app:1", mnt)
    try:
        assert open(os.path.join(mnt, "etc/hostname")).read() == "installed\n"
        [c] = json.loads(run("ps", "--json"))
        with open(f"/proc/{c['pid']}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        # forked from the installed layerfs command: its command line is that command's
        assert os.path.dirname(argv[0]) == os.path.join(installed, "bin").encode()  # its python
        assert argv[1:3] == [exe.encode(), b"mount"]
    finally:
        run("umount", mnt)
    assert not _fuse_mounted(mnt) and json.loads(run("ps", "--json")) == []

    # fuse-layerfs, the same way (it forks its server too)
    for d in ("lower/etc", "upper", "work", "mnt2"):
        os.makedirs(tmp_path / d)
    (tmp_path / "lower/etc/motd").write_text("from a directory\n")
    proc = subprocess.run([os.path.join(installed, "bin", "fuse-layerfs"), "-o",
                           f"lowerdir={tmp_path / 'lower'},upperdir={tmp_path / 'upper'},workdir={tmp_path / 'work'}",
                           str(tmp_path / "mnt2")], capture_output=True, text=True, env=env, cwd="/", timeout=120)
    assert proc.returncode == 0, proc.stderr
    try:
        assert (tmp_path / "mnt2/etc/motd").read_text() == "from a directory\n"
    finally:
        subprocess.run(["fusermount3", "-u", str(tmp_path / "mnt2")], check=True)
    deadline = time.monotonic() + 10
    while _fuse_mounted(str(tmp_path / "mnt2")) and time.monotonic() < deadline:
        time.sleep(0.05)

    # fsck --repair reads a damaged index in a child (python -m layerfs.store.rebuild)
    data = os.path.join(env["LAYERFS_ROOT"], "index.lmdb", "data.mdb")
    size = os.path.getsize(data)
    while truncation(os.path.dirname(data)) is None:  # the last pages may be free ones: cut into a used one
        assert size > 4096, "no page of the index is in use"
        size -= 4096
        os.truncate(data, size)
    proc = subprocess.run([exe, "fsck", "--repair"], capture_output=True, text=True, env=env, cwd="/", timeout=300)
    assert "REPAIRED" in proc.stdout and "could not be read" not in proc.stdout, proc.stdout + proc.stderr
    assert "app:1" in run("images")
