"""Shared fixtures: a fresh store per test, and the layerfs command run for real."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from store import Store

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def store_root(tmp_path):
    return str(tmp_path / "store")


@pytest.fixture
def store(store_root):
    with Store(store_root) as s:
        yield s


@pytest.fixture
def layerfs(store_root):
    """Run the installed ``layerfs`` command against the test's store."""
    def run(*args: str, input: bytes | None = None, check: bool = False, root: str | None = None):
        env = dict(os.environ, LAYERFS_ROOT=root or store_root)
        exe = os.path.join(os.path.dirname(sys.executable), "layerfs")
        proc = subprocess.run([exe, *args], input=input, capture_output=True, env=env, timeout=600)
        if check and proc.returncode != 0:
            raise AssertionError(f"layerfs {' '.join(args)} failed ({proc.returncode}): "
                                 f"{proc.stderr.decode()}")
        return proc
    return run


def _fuse_mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == os.path.realpath(path) for line in f)


@pytest.fixture
def mounts(layerfs):
    """``mounts(ref, mnt, *args)`` runs ``layerfs mount``; everything it mounted is
    unmounted at the end, also when the test fails. Returns the container id."""
    made: list[str] = []

    def mount(ref: str, mnt: str, *extra: str) -> str:
        os.makedirs(mnt, exist_ok=True)
        proc = layerfs("mount", ref, mnt, *extra)
        if proc.returncode == 0:
            made.append(mnt)
        assert proc.returncode == 0, proc.stderr.decode()
        return proc.stdout.decode().strip()

    yield mount
    for mnt in made:
        if _fuse_mounted(mnt):
            layerfs("umount", mnt)
        if _fuse_mounted(mnt):
            subprocess.run(["fusermount3", "-u", mnt], capture_output=True)
            subprocess.run(["umount", "-l", mnt], capture_output=True)
