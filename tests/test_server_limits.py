"""The serving process is not held to the caller's soft limit on open files: a
container may keep as many files open as the host's hard limit allows."""

from __future__ import annotations

import json
import os
import resource

import pytest

from helpers import make_tar

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse")


def _limits(pid: int) -> tuple[str, str]:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return soft, hard
    raise AssertionError("no open-file limit in /proc/PID/limits")


def test_container_keeps_thousands_of_files_open(layerfs, mounts, tmp_path, monkeypatch):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 8192:
        pytest.skip(f"the hard limit on open files is only {hard}")
    # The caller's soft limit is what the server used to keep (1,024 here by default).
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        tar = make_tar(str(tmp_path / "l.tar"), [("lower", "d")] + [
            (f"lower/f{i}", "f", b"lower %d\n" % i) for i in range(1500)])
        layerfs("import-layer", tar, "-t", "many:1", check=True)
        mnt = str(tmp_path / "mnt")
        cid = mounts("many:1", mnt)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    ps = {c["id"]: c for c in json.loads(layerfs("ps", "--json", check=True).stdout)}
    server = ps[cid]["pid"]
    assert _limits(server) == (str(hard), str(hard))

    # The test process needs the room too, to hold 3,000 files open at once.
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    fds = []
    try:
        for i in range(1500):  # lower files: the server opens their blobs
            fds.append(os.open(os.path.join(mnt, f"lower/f{i}"), os.O_RDONLY))
        for i in range(1500):  # new files: the server holds their upper files open
            fds.append(os.open(os.path.join(mnt, f"new{i}"), os.O_RDWR | os.O_CREAT, 0o644))
        for fd in fds[1490:1510]:
            os.pread(fd, 10, 0)
        os.write(fds[-1], b"written while 3,000 files are open\n")
    finally:
        for fd in fds:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    with open(os.path.join(mnt, "new1499"), "rb") as f:
        assert f.read() == b"written while 3,000 files are open\n"
