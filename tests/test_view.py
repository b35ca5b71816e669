"""The union view driven directly, without a mount (the fast tier): the rules of
DESIGN.md's union section, and what the upper layer holds after each."""

from __future__ import annotations

import errno
import os
import stat
import struct
import subprocess

import pytest

from helpers import make_tar
from layerfs.unionfs.lower import StoreLower
from layerfs.unionfs.view import METACOPY, REDIRECT, UnionView


@pytest.fixture
def view(tmp_path, store):
    base = make_tar(str(tmp_path / "l1.tar"), [
        ("etc", "d"), ("etc/conf", "f", "conf v1\n", {"mode": 0o644, "uid": 7, "gid": 8}),
        ("etc/big", "f", b"B" * 200_000), ("lib", "d"), ("lib/sub", "d"),
        ("lib/sub/mod", "f", "module\n"), ("lib/other", "f", "other\n"),
        ("bin", "d"), ("bin/a", "f", "linked\n"), ("bin/b", "h", "bin/a"),
        ("bin/sh", "l", "busybox"),
    ])
    img = store.import_tar(base)
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    v = UnionView(StoreLower(store.tree(img), store.blobs), str(upper), str(work))
    yield v
    v.close()


def read(view: UnionView, path: str) -> bytes:
    fd = view.open(path, os.O_RDONLY)[0]
    try:
        return b"".join(iter(lambda: os.read(fd, 1 << 20), b""))
    finally:
        os.close(fd)


def names(view: UnionView, path: str) -> list[str]:
    return [e.name for e in view.readdir(path)][2:]


def test_chmod_copies_metadata_only_and_first_write_copies_data(view):
    ino = view.getattr("etc/big")["st_ino"]
    view.chmod("etc/big", 0o600)
    up = os.path.join(view.upper, "etc/big")
    assert os.getxattr(up, METACOPY) == b"etc/big"
    assert os.stat(up).st_blocks == 0  # sparse: no data copied
    assert view.getattr("etc/big")["st_mode"] & 0o777 == 0o600
    assert read(view, "etc/big") == b"B" * 200_000
    fd = view.open("etc/big", os.O_WRONLY)[0]
    os.pwrite(fd, b"x", 0)
    os.close(fd)
    assert METACOPY not in os.listxattr(up)
    assert read(view, "etc/big") == b"x" + b"B" * 199_999
    assert view.getattr("etc/big")["st_ino"] == ino  # copy-up keeps the inode number
    assert view.getattr("etc/big")["st_mode"] & 0o777 == 0o600


def test_o_trunc_copies_no_data(view):
    fd = view.open("etc/big", os.O_WRONLY | os.O_TRUNC)[0]
    os.close(fd)
    up = os.path.join(view.upper, "etc/big")
    assert os.path.getsize(up) == 0 and METACOPY not in os.listxattr(up)
    assert read(view, "etc/big") == b""
    view.truncate("etc/conf", 0)
    assert read(view, "etc/conf") == b""
    assert view.getattr("etc/conf")["st_uid"] == 7  # metadata came along


def test_unlink_and_rmdir_leave_whiteouts_and_mkdir_makes_opaque(view):
    view.unlink("etc/conf")
    assert os.path.exists(os.path.join(view.upper, "etc/.wh.conf"))
    assert names(view, "etc") == ["big"]
    with pytest.raises(OSError) as e:
        view.rmdir("lib")
    assert e.value.errno == errno.ENOTEMPTY
    view.unlink("lib/sub/mod")
    view.rmdir("lib/sub")
    view.mkdir("lib/sub", 0o755, 0, 0)
    assert os.path.exists(os.path.join(view.upper, "lib/sub/.wh..wh..opq"))
    assert names(view, "lib/sub") == []
    with pytest.raises(OSError) as e:
        view.mkdir(".wh.x", 0o755, 0, 0)
    assert e.value.errno == errno.EINVAL


def test_a_removed_empty_lower_directory_is_gone_once_it_was_walked_through(tmp_path, store):
    # Resolving "empty/x" remembers "empty" as a directory node; removing the directory
    # (a whiteout, nothing copied up) must not leave that node answering for it.
    img = store.import_tar(make_tar(str(tmp_path / "l.tar"), [("empty", "d"), ("keep", "d")]))
    (tmp_path / "upper").mkdir()
    (tmp_path / "work").mkdir()
    v = UnionView(StoreLower(store.tree(img), store.blobs), str(tmp_path / "upper"), str(tmp_path / "work"))
    try:
        with pytest.raises(FileNotFoundError):
            v.getattr("empty/x")
        assert stat.S_ISDIR(v.getattr("empty")["st_mode"])
        v.rmdir("empty")
        for attempt in (lambda: v.getattr("empty"), lambda: v.mkdir("empty/y", 0o755, 0, 0),
                        lambda: v.getattr("empty/x")):
            with pytest.raises(OSError) as e:
                attempt()
            assert e.value.errno == errno.ENOENT
        assert names(v, "") == ["keep"]
    finally:
        v.close()


def test_rename_of_a_lower_directory_copies_no_data(view):
    view.rename("lib", "lib2")
    up = os.path.join(view.upper, "lib2")
    assert os.getxattr(up, REDIRECT) == b"lib"
    assert os.listdir(up) == []  # nothing copied
    assert names(view, "lib2") == ["other", "sub"]
    assert read(view, "lib2/sub/mod") == b"module\n"
    with pytest.raises(OSError):
        view.getattr("lib")
    # A second rename keeps pointing at the original lower directory.
    view.rename("lib2", "lib3")
    assert read(view, "lib3/other") == b"other\n"


def test_hard_links_stay_linked_after_copy_up(view):
    a, b = view.getattr("bin/a"), view.getattr("bin/b")
    assert a["st_ino"] == b["st_ino"] and a["st_nlink"] == 2
    fd = view.open("bin/a", os.O_WRONLY | os.O_APPEND)[0]
    os.write(fd, b"more\n")
    os.close(fd)
    assert read(view, "bin/b") == b"linked\nmore\n"
    ua, ub = (os.stat(os.path.join(view.upper, p)) for p in ("bin/a", "bin/b"))
    assert ua.st_ino == ub.st_ino and ua.st_nlink == 2
    assert view.getattr("bin/b")["st_ino"] == a["st_ino"]


def test_rename_flags(view):
    with pytest.raises(OSError) as e:
        view.rename("etc/conf", "etc/big", 1)  # RENAME_NOREPLACE
    assert e.value.errno == errno.EEXIST
    view.rename("etc/conf", "etc/big", 2)  # RENAME_EXCHANGE
    assert read(view, "etc/big") == b"conf v1\n"
    assert read(view, "etc/conf") == b"B" * 200_000


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_upper_full_gives_enospc_and_stays_consistent(tmp_path, store):
    base = make_tar(str(tmp_path / "l.tar"), [("f", "f", os.urandom(3 << 20))])
    img = store.import_tar(base)
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        (small / "upper").mkdir()
        (small / "work").mkdir()
        v = UnionView(StoreLower(store.tree(img), store.blobs), str(small / "upper"), str(small / "work"))
        try:
            with pytest.raises(OSError) as e:
                v.open("f", os.O_WRONLY)  # copy-up of 3 MiB into 1 MiB
            assert e.value.errno == errno.ENOSPC
            assert os.listdir(small / "upper") == [] and os.listdir(small / "work") == []
            assert read(v, "f") == open(store.blobs.path(store.tree(img).lookup("f").blob), "rb").read()
        finally:
            v.close()
    finally:
        subprocess.run(["umount", str(small)], check=True)


# -- what a request costs: the shortcuts give the answers a full resolve gives ---------


def _counting(monkeypatch, obj, name: str) -> list:
    """Count the calls of ``obj.name`` (still made)."""
    calls: list = []
    real = getattr(obj, name)

    def counted(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(obj, name, counted)
    return calls


def test_a_listing_reads_each_lower_entry_from_the_index_once(view, monkeypatch):
    view.mkdir("lib/made", 0o755, 0, 0)  # an upper name beside the lower ones
    lookups = _counting(monkeypatch, view.lower.tree, "lookup_in_layer")
    listing = {e.name: view.listed_attrs("lib", e) for e in view.readdir("lib")[2:]}
    assert lookups == [], "lower-only names were looked up again after the lower listing"
    monkeypatch.undo()
    assert listing == {n: view.getattr(f"lib/{n}") for n in ("sub", "other", "made")}


def test_a_created_file_answers_getattr_from_its_descriptor(view, monkeypatch):
    from types import SimpleNamespace

    from layerfs.unionfs.fuse_ops import UnionOperations

    ops = UnionOperations(view)
    monkeypatch.setattr(ops, "_ctx", lambda: (1000, 1000))  # no FUSE request to ask
    fi = SimpleNamespace(flags=os.O_WRONLY, fh=0, keep_cache=0)
    ops.create("/etc/new", 0o640, fi)
    resolves = _counting(monkeypatch, view, "resolve")
    attrs = ops.getattr("/etc/new", fi)  # what libfuse asks for the CREATE reply
    assert resolves == []
    assert attrs == view.getattr("etc/new")
    assert (stat.S_IMODE(attrs["st_mode"]), attrs["st_uid"]) == (0o640, 1000)
    ops.release("/etc/new", fi)
    assert fi.fh not in ops._created  # a later open of the same fd number resolves again


def test_a_known_directory_and_a_new_one_answer_getattr_with_one_lstat(view, monkeypatch):
    with pytest.raises(FileNotFoundError):
        view.getattr("etc/missing")  # etc is now a cached directory node (lower only)
    view.mkdir("made", 0o750, 0, 0)  # and so is a directory made here
    view.unlink("etc/conf")  # etc copied up: its cached node is dropped, then resolved again
    with pytest.raises(FileNotFoundError):
        view.getattr("etc/conf")
    walks = _counting(monkeypatch, view, "_child_at")
    got = {p: view.getattr(p) for p in ("etc", "made")}
    assert walks == []
    monkeypatch.undo()
    fresh = {p: view.attrs(view.resolve(p)) for p in ("etc", "made")}
    assert got == fresh
    assert stat.S_IMODE(got["made"]["st_mode"]) == 0o750


def test_file_capabilities_are_remembered_until_a_change(view):
    """The kernel asks for security.capability before every write: the answer is kept,
    and every change made through the view (not a data write) forgets it."""
    caps = "security.capability"
    cap = struct.pack("<5I", 0x02000000 | 1, 1 << 10, 0, 0, 0)  # cap_net_bind_service=ep
    fd = view.open("etc/conf", os.O_WRONLY)[0]
    os.close(fd)
    with pytest.raises(OSError) as e:
        view.getxattr("etc/conf", caps)
    assert e.value.errno == errno.ENODATA
    # Behind the view's back (nothing does this to a mounted upper): the remembered answer
    # shows that a write's getxattr reads nothing.
    upper = os.path.join(view.upper, "etc/conf")
    os.setxattr(upper, caps, cap)
    with pytest.raises(OSError):
        view.getxattr("etc/conf", caps)
    os.removexattr(upper, caps)
    view.setxattr("etc/conf", caps, cap)
    assert view.getxattr("etc/conf", caps) == cap
    view.removexattr("etc/conf", caps)
    with pytest.raises(OSError):
        view.getxattr("etc/conf", caps)
    view.setxattr("lib/other", caps, cap)
    view.rename("lib/other", "etc/conf")
    assert view.getxattr("etc/conf", caps) == cap


def test_changes_through_a_descriptor_reach_the_open_file_without_a_path(view, monkeypatch):
    """fchmod, fchown, futimens and ftruncate come with the file handle: an upper file open
    here takes them through its descriptor (even after a rename); an open lower file's
    descriptor is the store's blob, which a change never touches."""
    from types import SimpleNamespace

    import ctypes

    import mfusepy

    from layerfs.unionfs.fuse_ops import UnionFUSE, UnionOperations

    ops = UnionOperations(view)
    monkeypatch.setattr(ops, "_ctx", lambda: (0, 0))
    fi = SimpleNamespace(flags=os.O_RDWR, fh=0, keep_cache=0)
    ops.create("/etc/made", 0o600, fi)
    os.write(fi.fh, b"0123456789")
    view.rename("etc/made", "etc/moved")
    resolves = _counting(monkeypatch, view, "resolve")
    ops.chmod("/etc/made", 0o640, fi)  # libfuse's path may be stale; the handle is not
    ops.chown("/etc/made", 5, -1, fi)
    ops.truncate("/etc/made", 4, fi)
    ops.utimens("/etc/made", (1_000_000_000, 2_000_000_000), fi)
    # libfuse's callbacks pass the handle on (mfusepy's own drop it): chown as libfuse
    # calls it, with a struct fuse_file_info, and (uid_t)-1 for "keep"
    fuse = object.__new__(UnionFUSE)
    fuse.operations, fuse.encoding, fuse.errors = ops, "utf-8", "surrogateescape"
    llfi = mfusepy.fuse_file_info()
    llfi.fh = fi.fh
    fuse.chown_fuse_3(b"/etc/made", 5, (1 << 32) - 1, ctypes.pointer(llfi))
    assert resolves == []
    monkeypatch.undo()
    ops.release("/etc/made", fi)
    st = os.lstat(os.path.join(view.upper, "etc/moved"))
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 5, 0)
    assert (st.st_atime_ns, st.st_mtime_ns, st.st_size) == (1_000_000_000, 2_000_000_000, 4)

    low = SimpleNamespace(flags=os.O_RDONLY, fh=0, keep_cache=0, noflush=0)
    ops.open("/etc/conf", low)
    blob_mode = stat.S_IMODE(os.fstat(low.fh).st_mode)
    ops.chmod("/etc/conf", 0o600, low)  # fchmod of a read-only descriptor: by path
    assert stat.S_IMODE(os.fstat(low.fh).st_mode) == blob_mode
    assert stat.S_IMODE(view.getattr("etc/conf")["st_mode"]) == 0o600
    ops.release("/etc/conf", low)
