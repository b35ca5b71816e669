"""Progress of long commands: a status line on a terminal (stderr a pty), gone once the
command is done; nothing when stderr is not a terminal, or with --quiet."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from helpers import make_tar, on_terminal as run_on_terminal

EXE = os.path.join(os.path.dirname(sys.executable), "layerfs")


def on_terminal(store_root: str, *args: str, stdin=subprocess.DEVNULL) -> tuple[int, bytes, str]:
    """Run layerfs with stderr on a pseudo-terminal: (exit code, stdout, what the
    terminal received)."""
    return run_on_terminal([EXE, *args], dict(os.environ, LAYERFS_ROOT=store_root), stdin)


def status_lines(tty: str, label: str) -> list[str]:
    """Every state the status line of ``label`` was drawn in."""
    parts = (re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", part) for part in tty.split("\r"))
    return [part for part in parts if part.startswith((label + ": ", label + " "))]


def assert_erased(tty: str) -> None:
    """The last thing drawn erases the status line: the screen keeps only the result."""
    assert tty.endswith("\r\x1b[K"), repr(tty[-80:])


@pytest.fixture
def big_tar(tmp_path) -> str:
    return make_tar(str(tmp_path / "big.tar"), [("data", "d"), ("data/big", "f", os.urandom(6_000_000)),
                                                 ("data/small", "f", b"small\n")])


def _each_way(layerfs, store_root: str, *args: str, label: str, setup=None, erased: bool = True) -> list[str]:
    """Run a command on a terminal, on a terminal with --quiet, and into a pipe (with
    ``setup()`` before each, to give it work); return the terminal's status lines."""
    shown = []
    for how in ("tty", "quiet", "pipe"):
        if setup:
            setup()
        if how == "pipe":
            proc = layerfs(*args)
            assert proc.returncode == 0, proc.stderr
            assert proc.stderr == b"", proc.stderr
            continue
        rc, _, tty = on_terminal(store_root, *args, *(["--quiet"] if how == "quiet" else []))
        assert rc == 0, tty
        if how == "quiet":
            assert tty == "", repr(tty)
        else:
            shown = status_lines(tty, label)
            assert shown, repr(tty)
            if erased:
                assert_erased(tty)
    return shown


def test_import_layer(layerfs, store_root, big_tar, tmp_path):
    shown = _each_way(layerfs, store_root, "import-layer", big_tar, label="import-layer")
    assert shown[0] == "import-layer: reading big.tar 0B/6.0MB 0%"
    # stdin: the size is not known, the bytes read are counted
    with open(big_tar, "rb") as f:
        rc, out, tty = on_terminal(store_root, "import-layer", "-", stdin=f)
    assert rc == 0 and out.startswith(b"sha256:")
    assert status_lines(tty, "import-layer")[0] == "import-layer: reading stdin"


def test_import_dir(layerfs, store_root, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(3_000_000))
    (src / "small").write_bytes(b"s" * 1000)
    shown = _each_way(layerfs, store_root, "import-dir", str(src), label="import-dir")
    assert shown[0] == "import-dir: scanning"
    assert "import-dir: reading files 0B/3.0MB 0%" in shown


def test_gc_and_prune(layerfs, store_root, big_tar):
    def garbage():
        image = layerfs("import-layer", big_tar, check=True).stdout.decode().strip()
        layerfs("rmi", image, check=True)

    shown = _each_way(layerfs, store_root, "gc", label="gc", setup=garbage)
    assert [s.split(" 0/")[0] for s in shown if "blobs" in s][0] == "gc: deleting blobs"
    assert "gc: deleting blobs 0/2 0%" in shown
    assert "gc: marking what images reach" in shown
    image = layerfs("import-layer", big_tar, check=True).stdout.decode().strip()
    assert image and "prune: deleting blobs 0/2 0%" in _each_way(layerfs, store_root, "prune", label="prune")


@pytest.mark.parametrize("fast", [False, True])
def test_fsck(layerfs, store_root, big_tar, fast):
    layerfs("import-layer", big_tar, "-t", "big:1", check=True)
    args = ["fsck", "--fast"] if fast else ["fsck"]
    shown = _each_way(layerfs, store_root, *args, label="fsck")
    assert shown[0] == "fsck: checking the index"
    assert ("fsck: checking blob sizes 0/2 0%" if fast else "fsck: checking blob contents 0B/6.0MB 0%") in shown


@pytest.mark.parametrize("fmt", ["oci", "docker"])
def test_save(layerfs, store_root, big_tar, tmp_path, fmt):
    layerfs("import-layer", big_tar, "-t", "big:1", check=True)
    out = str(tmp_path / "out.tar")

    def no_output():
        if os.path.exists(out):
            os.unlink(out)

    shown = _each_way(layerfs, store_root, "save", "big:1", "-o", out, "--format", fmt, label="save",
                      setup=no_output)
    if fmt == "oci":
        assert shown[0] == "save: compressing layer 1/1 (gzip) 0B/6.0MB 0%"
    assert any(re.fullmatch(rf"save: writing {re.escape(out)} \S+/6.0MB \d+%", s) for s in shown), shown
    assert layerfs("load", out, check=True).stdout  # what it wrote loads


def test_load(layerfs, store_root, big_tar, tmp_path):
    layerfs("import-layer", big_tar, "-t", "big:1", check=True)
    out = str(tmp_path / "out.tar")
    layerfs("save", "big:1", "-o", out, check=True)

    def fresh():
        layerfs("rmi", "big:1")
        layerfs("gc", check=True)

    _each_way(layerfs, store_root, "load", out, label="layer 1/1", setup=fresh, erased=False)


@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse")
def test_commit(layerfs, store_root, big_tar, tmp_path, mounts):
    layerfs("import-layer", big_tar, "-t", "big:1", check=True)
    layerfs("create", "big:1", "--name", "c1", check=True)
    mnt = str(tmp_path / "mnt")
    mounts("c1", mnt)
    with open(os.path.join(mnt, "data/new"), "wb") as f:
        f.write(os.urandom(2_000_000))
    shown = _each_way(layerfs, store_root, "commit", "c1", label="commit")
    assert shown[0] == "commit: scanning the changes"
    assert "commit: reading files 0B/2.0MB 0%" in shown


@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse")
def test_commit_warning_after_the_status_line(layerfs, store_root, tmp_path, mounts):
    """A warning is a line of its own, not drawn over the status line."""
    import socket

    layerfs("import-layer", make_tar(str(tmp_path / "l.tar"), [("run", "d")]), "-t", "s:1", check=True)
    layerfs("create", "s:1", "--name", "c2", check=True)
    mnt = str(tmp_path / "mnt")
    mounts("c2", mnt)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(os.path.join(mnt, "run/app.sock"))
    rc, _, tty = on_terminal(store_root, "commit", "c2")
    sock.close()
    assert rc == 0
    assert tty.endswith("\r\x1b[Klayerfs: warning: /run/app.sock is a socket, which a layer cannot hold: "
                        "left out of the commit\r\n"), repr(tty)


def test_pull_quiet(layerfs, store_root, tmp_path, registry):
    """pull and push draw their per-layer lines on a terminal (test_registry_pushpull);
    --quiet turns them off."""
    layerfs("import-layer", make_tar(str(tmp_path / "l.tar"), [("f", "f", "f\n")]), "-t", "app:1", check=True)
    ref = f"{registry.host}/team/app:1"
    rc, out, tty = on_terminal(store_root, "push", "app:1", ref, "--quiet")
    assert rc == 0 and tty == "" and out.decode().startswith(f"{ref}: digest: sha256:")
    layerfs("rmi", "app:1", check=True)
    rc, out, tty = on_terminal(store_root, "pull", ref, "-q")
    assert rc == 0 and tty == "" and b"Image ID: sha256:" in out
    layerfs("rmi", ref, check=True)
    rc, out, tty = on_terminal(store_root, "pull", ref)
    assert rc == 0 and "layer 1/1" in tty
