"""``layerfs mount`` forks its serving process from the CLI (no second Python start-up):
the forked server serves, outlives the command, holds none of the caller's files,
reports a failure as one line, and leaves no process, zombie or mount behind; a caller
with threads running starts ``python -m layerfs.unionfs.mount`` instead."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading

import pytest

from helpers import assert_one_line_error, make_tar
from layerfs.store import Store
from layerfs.unionfs import mount as mountmod

pytestmark = [pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse"),
              pytest.mark.skipif(os.geteuid() != 0, reason="FUSE mounts from a test need root")]

EXE = os.path.join(os.path.dirname(sys.executable), "layerfs")


@pytest.fixture
def image(tmp_path, layerfs):
    tar = make_tar(str(tmp_path / "app.tar"), [("etc", "d"), ("etc/hostname", "f", "forked\n")])
    layerfs("import-layer", tar, "-t", "app:1", check=True)
    return "app:1"


def _mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == os.path.realpath(path) for line in f)


def _argv(pid: int) -> list[bytes]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().rstrip(b"\0").split(b"\0")


def _processes_naming(path: str) -> list[int]:
    """Processes whose command line names ``path`` (a server left behind would)."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if any(a == os.fsencode(path) for a in _argv(int(pid))):
                out.append(int(pid))
        except OSError:
            pass
    return out


@pytest.fixture
def cleanup():
    """Mountpoints to unmount at the end, also when the test fails."""
    mnts: list[str] = []
    yield mnts
    for mnt in mnts:
        if _mounted(mnt):
            subprocess.run(["fusermount3", "-u", mnt], capture_output=True)
        if _mounted(mnt):
            subprocess.run(["umount", "-l", mnt], capture_output=True)


def test_forked_server_serves_outlives_the_cli_and_holds_none_of_its_files(
        tmp_path, layerfs, image, store_root, cleanup):
    mnt = str(tmp_path / "mnt")
    os.mkdir(mnt)
    cleanup.append(mnt)
    # A pipe the caller gives the command besides its output: the server must not keep
    # it (nor stdout and stderr, which run() reads to their end), as an exec'd one would not.
    r, w = os.pipe()
    try:
        proc = subprocess.run([EXE, "mount", image, mnt], capture_output=True, pass_fds=(w,), timeout=60,
                              env=dict(os.environ, LAYERFS_ROOT=store_root))
        os.close(w)
        assert proc.returncode == 0, proc.stderr
        # every writer gone (the command exited, the server holds none): EOF, not a wait
        assert select.select([r], [], [], 10)[0] == [r] and os.read(r, 1) == b""
    finally:
        os.close(r)
    cid = proc.stdout.decode().strip()
    assert open(os.path.join(mnt, "etc/hostname")).read() == "forked\n"
    [c] = json.loads(layerfs("ps", "--json", check=True).stdout)
    pid = c["pid"]
    assert (c["id"], c["state"], c["mountpoint"]) == (cid, "mounted", mnt)
    argv = _argv(pid)
    assert argv[1:3] == [EXE.encode(), b"mount"]  # the CLI itself, forked: no new interpreter
    assert os.getsid(pid) == pid  # its own session: a Ctrl-C at the terminal spares it
    assert os.readlink(f"/proc/{pid}/cwd") == "/"
    log = os.path.join(store_root, "containers", cid, "mount.log")
    assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
    assert os.readlink(f"/proc/{pid}/fd/1") == os.readlink(f"/proc/{pid}/fd/2") == log

    layerfs("umount", mnt, check=True)
    assert not _mounted(mnt)
    assert not mountmod.pid_alive(pid)  # umount waited for it
    [c] = json.loads(layerfs("ps", "--json", check=True).stdout)
    assert (c["state"], c["pid"]) == ("created", None)


def test_forked_server_failure_is_one_line_and_leaves_nothing(tmp_path, layerfs, image, cleanup):
    mnt = str(tmp_path / "mnt")
    os.mkdir(mnt)
    cleanup.append(mnt)
    proc = layerfs("mount", "-o", "no_such_fuse_option", image, mnt)  # libfuse refuses it in the server
    assert_one_line_error(proc, mentions=("no_such_fuse_option",))
    assert not _mounted(mnt)
    assert json.loads(layerfs("ps", "--json", check=True).stdout) == []
    assert _processes_naming(mnt) == []


def test_in_process_mount_forks_with_a_clean_slate_and_keeps_the_callers_store(
        tmp_path, layerfs, image, store_root, cleanup):
    """mount() called in a program (as build does): the server is this process forked,
    without this process's signal handlers; this process's store still works after, and
    umount reaps the server (no zombie)."""
    mnt = str(tmp_path / "mnt")
    os.mkdir(mnt)
    cleanup.append(mnt)
    heard = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: heard.append(1))
    try:
        with Store(store_root, create=False) as store:
            c = mountmod.mount(store, image, mnt)
            assert _argv(c.pid) == _argv(os.getpid())  # forked from this process
            assert open(os.path.join(mnt, "etc/hostname")).read() == "forked\n"
            with open(f"/proc/{c.pid}/status") as f:
                caught = int(next(line for line in f if line.startswith("SigCgt:")).split()[1], 16)
            assert not caught & (1 << (signal.SIGUSR1 - 1))  # the caller's handler stayed here
            # The caller's store (its index closed across the fork) still reads and writes.
            assert [x.id for x in store.containers.list()] == [c.id]
            mountmod.umount(store, c.id)
            assert not _mounted(mnt)
            with pytest.raises(ChildProcessError):  # reaped by umount
                os.waitpid(c.pid, os.WNOHANG)
            assert store.containers.find(c.id) is None or not store.containers.get(c.id).mountpoint
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert heard == []


def test_mount_with_threads_running_starts_a_new_interpreter(tmp_path, image, store_root, cleanup):
    """Forking a process with other threads is unsafe (a lock held by one stays held in
    the child): such a caller gets a server started as ``python -m layerfs.unionfs.mount``."""
    mnt = str(tmp_path / "mnt")
    os.mkdir(mnt)
    cleanup.append(mnt)
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        with Store(store_root, create=False) as store:
            c = mountmod.mount(store, image, mnt)
            try:
                assert _argv(c.pid)[1:3] == [b"-m", b"layerfs.unionfs.mount"]
                assert open(os.path.join(mnt, "etc/hostname")).read() == "forked\n"
            finally:
                mountmod.umount(store, c.id)
    finally:
        stop.set()
        t.join()
    assert not _mounted(mnt)
    assert _processes_naming(mnt) == []


def test_commit_right_after_the_mount_returns_holds_the_mount(tmp_path, image, store_root, cleanup):
    """The server starts its pause server just after its mount serves: a commit made the
    moment mount() returns waits for it, holds the mount's writes and commits."""
    mnt = str(tmp_path / "mnt")
    os.mkdir(mnt)
    cleanup.append(mnt)
    with Store(store_root, create=False) as store:
        c = mountmod.mount(store, image, mnt)
        try:
            rec = mountmod.commit(store, c.id)
            assert len(rec.layers) == 2  # the image's layer and the container's
            with open(os.path.join(mnt, "etc/new"), "w") as f:  # the mount serves on
                f.write("after\n")
        finally:
            mountmod.umount(store, c.id)


def test_a_pause_waits_for_a_pause_server_that_is_not_up_yet(tmp_path, image, store_root):
    """paused() of a mounted container whose live server does not listen yet retries
    until it does (this process plays the server, its pause server 0.3 s late)."""
    import socket
    import time

    mnt = str(tmp_path / "mnt")
    os.mkdir(mnt)
    heard: list[bytes] = []
    with Store(store_root, create=False) as store:
        c, _ = mountmod.container_for(store, image, False)
        c = store.containers.set_mount(c, mnt, os.getpid())
        assert mountmod.state(c) == "mounted"

        def late_pause_server() -> None:
            time.sleep(0.3)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
                srv.bind(mountmod._control_address(c.id))
                srv.listen(1)
                srv.settimeout(10)  # (if paused() gave up, nobody comes)
                conn, _ = srv.accept()
                with conn:
                    f = conn.makefile("rwb", buffering=0)
                    heard.append(f.readline())
                    f.write(b"paused\n")
                    heard.append(f.readline())

        server = threading.Thread(target=late_pause_server, daemon=True)
        server.start()
        try:
            with mountmod.paused(c):
                heard.append(b"held\n")
        finally:
            server.join(10)
            store.containers.remove(c)
    assert heard == [b"pause\n", b"held\n", b"resume\n"]
