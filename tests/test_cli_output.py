"""What ls and export-layer show, checked against what the kernel and GNU tar show for
the same files."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from helpers import assert_one_line_error, make_tar, sha256_file

LINK_TARGET = "bus\u00efbox"  # 8 bytes in UTF-8: the size is counted in bytes, as lstat does

MEMBERS = [
    ("bin", "d"), ("bin/busybox", "f", b"#!/bin/sh\n", {"mode": 0o755}),
    ("bin/sh", "l", "busybox"), ("bin/utf", "l", LINK_TARGET), ("bin/dangling", "l", "/nowhere"),
    ("etc", "d"), ("etc/hostname", "f", "box\n"), ("etc/sub", "d"), ("etc/sub/f", "f", "f\n"),
    ("lnkdir", "l", "etc"),
    ("dev", "d"), ("dev/null", "c", (1, 3)), ("dev/sda", "b", (8, 0)),
]


@pytest.fixture
def image(tmp_path, layerfs) -> str:
    base = make_tar(str(tmp_path / "base.tar"), MEMBERS)
    top = make_tar(str(tmp_path / "top.tar"), [("etc", "d"), ("etc/motd", "f", "hi\n")])
    first = layerfs("import-layer", base, check=True).stdout.decode().strip()
    layerfs("import-layer", top, "--parent", first, "-t", "box:1", check=True)
    return "box:1"


@pytest.fixture
def extracted(tmp_path) -> str:
    """The base layer as GNU tar extracts it (devices need root)."""
    if os.geteuid() != 0:
        pytest.skip("extracting device nodes needs root")
    d = tmp_path / "extracted"
    d.mkdir()
    subprocess.run(["tar", "-xf", str(tmp_path / "base.tar"), "-C", str(d)], check=True)
    return str(d)


def _line(layerfs, *args: str) -> list[str]:
    out = layerfs("ls", *args, check=True).stdout.decode().splitlines()
    assert len(out) == 1, out
    return out[0].split()


def test_ls_symlink_size_is_its_targets_length_as_ls_l_shows(layerfs, image, extracted):
    listing = layerfs("ls", image, "/bin", check=True).stdout.decode().splitlines()
    sizes = {line.split()[7]: line.split()[4] for line in listing}
    for name in ("busybox", "sh", "utf", "dangling"):
        assert int(sizes[name]) == os.lstat(os.path.join(extracted, "bin", name)).st_size, name
    # GNU ls on the extracted tree says the same
    real = subprocess.run(["ls", "-ln", os.path.join(extracted, "bin")], capture_output=True,
                          check=True, env=dict(os.environ, LC_ALL="C")).stdout.decode().splitlines()[1:]
    assert {line.split()[8]: line.split()[4] for line in real} == sizes
    rows = {r["path"]: r for r in json.loads(layerfs("ls", "--json", image, "/bin", check=True).stdout)}
    assert rows["/bin/utf"]["size"] == len(LINK_TARGET.encode()) == 8
    assert rows["/bin/utf"]["target"] == LINK_TARGET


@pytest.mark.parametrize("given", ["etc/hostname", "/etc/hostname", "/etc/../etc/hostname",
                                   "//etc/./hostname", "/lnkdir/hostname"])
def test_ls_names_a_file_as_given(layerfs, image, given):
    fields = _line(layerfs, image, given)
    assert fields[0] == "-rw-r--r--" and fields[4] == "4"
    assert fields[-1] == given


def test_ls_shows_a_symlink_itself_and_lists_through_a_link_to_a_directory(layerfs, image):
    assert _line(layerfs, image, "/bin/sh")[-3:] == ["/bin/sh", "->", "busybox"]
    assert _line(layerfs, image, "/bin/sh")[0].startswith("l")
    assert _line(layerfs, image, "bin/dangling")[-3:] == ["bin/dangling", "->", "/nowhere"]
    through = layerfs("ls", image, "/lnkdir", check=True).stdout
    assert through == layerfs("ls", image, "/etc", check=True).stdout
    assert [line.split()[-1] for line in through.decode().splitlines()] == ["hostname", "motd", "sub"]


def test_ls_recursive_headers_use_the_name_given(layerfs, image):
    out = layerfs("ls", "-R", image, "lnkdir", check=True).stdout.decode()
    assert [line for line in out.splitlines() if line.endswith(":")] == ["lnkdir:", "lnkdir/sub:"]
    out = layerfs("ls", "-R", image, check=True).stdout.decode()
    headers = [line for line in out.splitlines() if line.endswith(":")]
    assert headers == ["/:", "/bin:", "/dev:", "/etc:", "/etc/sub:"]


def test_ls_json_has_device_numbers(layerfs, image, extracted):
    rows = {r["path"]: r for r in json.loads(layerfs("ls", "-R", "--json", image, check=True).stdout)}
    for path in ("/dev/null", "/dev/sda"):
        st = os.lstat(extracted + path)
        assert rows[path]["device"] == {"major": os.major(st.st_rdev), "minor": os.minor(st.st_rdev)}
    assert rows["/dev/null"]["device"] == {"major": 1, "minor": 3}
    assert rows["/dev/sda"]["type"] == "blk" and rows["/dev/sda"]["device"] == {"major": 8, "minor": 0}
    assert rows["/etc/hostname"]["device"] is None
    single = json.loads(layerfs("ls", "--json", image, "/dev/null", check=True).stdout)
    assert [r["device"] for r in single] == [{"major": 1, "minor": 3}]
    # the text listing shows them as ls -l does: "major, minor"
    line = layerfs("ls", image, "/dev/sda", check=True).stdout.decode()
    assert line.startswith("brw") and " 8, 0 " in line


def test_export_layer_of_an_image_names_its_layers(layerfs, image, tmp_path):
    inspect = json.loads(layerfs("inspect", image, check=True).stdout)
    out = str(tmp_path / "out.tar")
    for ref in (image, inspect["id"], inspect["id"][7:19]):
        line = assert_one_line_error(layerfs("export-layer", ref, "-o", out),
                                     mentions=(f"{ref} is an image, not a layer",))
        shown = line.split("bottom first: ")[1].split(" (")[0].split(", ")
        assert shown == [d[7:19] for d in inspect["layers"]]
    assert not os.path.exists(out)
    # each id it names exports that layer, whose sha256 is the layer id
    for short, full in zip(shown, inspect["layers"]):
        layerfs("export-layer", short, "-o", out, check=True)
        assert sha256_file(out) == full


def test_export_layer_of_nothing_says_no_such_layer(layerfs, image, tmp_path):
    assert_one_line_error(layerfs("export-layer", "nosuch:1", "-o", str(tmp_path / "o.tar")),
                          mentions=("no such layer: nosuch:1",))


# -- what a commit cannot carry ------------------------------------------------------------------


@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse")
def test_sockets_are_marked_by_diff_and_named_by_commit(tmp_path, layerfs, mounts):
    import socket
    import tarfile

    base = make_tar(str(tmp_path / "base.tar"), [("etc", "d"), ("etc/app.sock", "f", "a file below\n"),
                                                  ("run", "d"), ("run/keep", "f", "k\n")])
    layerfs("import-layer", base, "-t", "app:1", check=True)
    mnt = str(tmp_path / "mnt")
    cid = mounts("app:1", mnt)
    os.unlink(os.path.join(mnt, "etc/app.sock"))
    socks = []
    for path in ("run/app.sock", "etc/app.sock"):  # a new one, and one over a lower file
        s = socket.socket(socket.AF_UNIX)
        s.bind(os.path.join(mnt, path))
        socks.append(s)
    with open(os.path.join(mnt, "run/new"), "w") as f:
        f.write("new\n")

    diff = layerfs("diff", cid, check=True).stdout.decode().splitlines()
    assert diff == ["C /etc", "C /etc/app.sock  (a socket: commit leaves it out)", "C /run",
                    "A /run/app.sock  (a socket: commit leaves it out)", "A /run/new"]
    rows = json.loads(layerfs("diff", "--json", cid, check=True).stdout)
    assert {r["path"]: r["left_out"] for r in rows} == {
        "/etc": None, "/etc/app.sock": "a socket", "/run": None, "/run/app.sock": "a socket", "/run/new": None}

    proc = layerfs("commit", cid, "-t", "app:2")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.decode().splitlines() == [
        "layerfs: warning: /etc/app.sock is a socket, which a layer cannot hold: left out of the commit",
        "layerfs: warning: /run/app.sock is a socket, which a layer cannot hold: left out of the commit"]
    for s in socks:
        s.close()
    # The new image shows what the container showed, less the sockets: not the lower file.
    listing = layerfs("ls", "-R", "--json", "app:2", check=True).stdout
    assert sorted(r["path"] for r in json.loads(listing)) == ["/etc", "/run", "/run/keep", "/run/new"]
    top = json.loads(layerfs("inspect", "app:2", check=True).stdout)["layers"][-1]
    out = str(tmp_path / "top.tar")
    layerfs("export-layer", top, "-o", out, check=True)
    with tarfile.open(out) as tf:
        assert sorted(m.name for m in tf.getmembers()) == ["etc", "etc/.wh.app.sock", "run", "run/new"]
