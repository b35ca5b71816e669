"""Real programs as clients: git, tar, cp -a, rsync, find, dd, and Python's scandir, on
the store-backed mount (``layerfs mount``, on the fuse backend and on the kernel backend),
on ``fuse-layerfs`` over plain directories, and on the kernel's overlayfs over the same
directories (the oracle: every test must pass there, which shows the test itself is right).

The three are mounted once for the module over one base layer (``BASE``); each test
works in its own directory below the mount, or reads the base layer. What is checked is
what a user checks: ``git status`` is clean and ``git fsck`` finds nothing, a copied
tree equals its source (names, types, modes, owners, sizes, contents, link targets,
times, xattrs, hard-link groups), a listing holds the directory's own names.

Runs as root (the mounts need it); skipped with the reason when FUSE, the overlay module
or a program is missing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import subprocess

import pytest

from helpers import tree_and_links, tree_differences
from layerfs.unionfs import kernel as kernel_backend
from unionrunner import (KERNEL_BACKEND_OPTIONS, KERNEL_OPTIONS, C, D, F, FuseLayerfs, H, KernelOverlay, L,
                         LayerfsMount, OverlayUnavailable, P, build_layer, force_umount)

BACKENDS = ("store", "store-kernel", "fuse-layerfs", "kernel")
UNION = ("store", "store-kernel", "fuse-layerfs")  # the ones under test; "kernel" is the oracle

BASE = {
    "etc/hostname": F("box\n"),
    "etc/secret": F("s3cret\n", mode=0o600, uid=1000, gid=1000),
    "usr/bin/tool": F("#!/bin/sh\necho tool\n", mode=0o755),
    "usr/bin/tool-again": H("usr/bin/tool"),
    "usr/lib/liba.so.1": F(bytes(range(256)) * 64),
    "usr/lib/liba.so": L("liba.so.1"),
    "usr/share/doc/hard": H("usr/share/doc/n00.txt"),
    "usr/share/other/hard2": H("usr/share/doc/n00.txt"),
    "srv/existing": F("kept\n"),
    "tmp": D(mode=0o1777),
    "home/user": D(mode=0o700, uid=1000, gid=1000),
    "home/user/.profile": F("PS1='$ '\n", uid=1000, gid=1000),
    "dev/null": C(1, 3),
    "run/fifo": P(),
    "p/a/one": F("1"),
    "p/a/two": F("2"),
    "p/x": F("x"),
    "direct/data": F(bytes(range(256)) * 256),  # 64 KiB, for O_DIRECT reads
    # rsync --delete and find work on these two (other tests leave them alone)
    "opt/app/bin/run": F("#!/bin/sh\n", mode=0o755),
    "opt/app/conf/a.conf": F("a=1\n"),
    "opt/app/b": F("replaced by a directory\n"),
    "opt/app/one-byte": F("replaced by the source's file\n"),
    "var/lib/pkg/info/list": F("pkg\n", mode=0o640, uid=0, gid=50),
    "var/lib/pkg/info/hard": H("var/lib/pkg/info/list"),
    "var/lib/pkg/gone/x": F("x\n"),
    "var/lib/pkg/chmod-me": F("0644 below\n"),
    "var/lib/pkg/link": L("info/list"),
    "var/cache/empty": D(mode=0o750),
}
BASE.update({f"usr/share/doc/n{i:02}.txt": F(f"doc {i}\n" * (i + 1)) for i in range(40)})
BASE.update({f"p/b/f{i:02}": F(f"b{i}") for i in range(1, 31)})


def _require(*programs: str) -> None:
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (apt-get install {' '.join(missing)})")


@pytest.fixture(scope="module")
def base_layer(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root: mounts the kernel overlay and FUSE")
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        pytest.skip("needs /dev/fuse and fusermount3")
    root = tmp_path_factory.mktemp("real")
    return str(root), build_layer(str(root / "base"), BASE)


@pytest.fixture(scope="module")
def mounts(base_layer):
    """{backend: mountpoint}: the base layer under a fresh upper, three ways at once."""
    root, layer = base_layer
    from layerfs.store import Store

    with Store(os.path.join(root, "store")) as store:
        image = store.import_dir(layer)
    # "kernel" is a backend of its own; "kernel/X" is the oracle that tests comparing
    # with the kernel change alongside backend X (for the kernel backend: with its options).
    kernels = {name: KernelOverlay([layer], os.path.join(root, name.replace("/", "-")),
                                   KERNEL_BACKEND_OPTIONS if name == "kernel/store-kernel" else KERNEL_OPTIONS)
               for name in ("kernel", "kernel/store", "kernel/store-kernel", "kernel/fuse-layerfs")}
    fuse = FuseLayerfs([layer], os.path.join(root, "fuse-layerfs"))
    lfs = {"store": LayerfsMount(os.path.join(root, "store"), image.image_id, os.path.join(root, "store-mnt"))}
    if kernel_backend.unsupported() is None:
        lfs["store-kernel"] = LayerfsMount(os.path.join(root, "store"), image.image_id,
                                           os.path.join(root, "store-kernel-mnt"), "kernel")
    try:
        try:
            for k in kernels.values():
                k.mount()
        except OverlayUnavailable as e:
            pytest.skip(str(e))
        fuse.mount()
        for lf in lfs.values():
            lf.mount()
        yield {"fuse-layerfs": fuse.mnt, **{n: lf.mnt for n, lf in lfs.items()},
               **{n: k.mnt for n, k in kernels.items()}}
    finally:
        for lf in lfs.values():
            with contextlib.suppress(Exception):
                lf.umount()
            with contextlib.suppress(Exception):
                lf.remove()
        fuse.umount()
        for k in kernels.values():
            k.umount()
        for mnt in [lf.mnt for lf in lfs.values()] + [fuse.mnt] + [k.mnt for k in kernels.values()]:
            force_umount(mnt)


def _backend(mounts, name: str) -> str:
    if name not in mounts:
        pytest.skip(f"the kernel backend cannot run here: {kernel_backend.unsupported()}")
    return mounts[name]


@pytest.fixture(params=BACKENDS)
def mnt(request, mounts):
    return _backend(mounts, request.param)


@pytest.fixture(params=UNION)
def union(request, mounts):
    """(layerfs mountpoint, kernel mountpoint): one under test and its own oracle."""
    return _backend(mounts, request.param), mounts["kernel/" + request.param]


def _workdir(mnt: str, request) -> str:
    """A directory of the test's own below the mount (new in the upper)."""
    d = os.path.join(mnt, "t-" + request.node.name.replace("[", "-").replace("]", ""))
    os.mkdir(d)
    return d


def sh(*cmd: str, cwd: str | None = None, env: dict | None = None, check: bool = True) -> str:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()[-2000:]}")
    return res.stdout


# -- git ----------------------------------------------------------------------------------


def _git_env(home: str) -> dict:
    return dict(os.environ, HOME=home, GIT_CONFIG_NOSYSTEM="1", GIT_AUTHOR_NAME="T",
                GIT_AUTHOR_EMAIL="t@example.org", GIT_COMMITTER_NAME="T",
                GIT_COMMITTER_EMAIL="t@example.org", GIT_AUTHOR_DATE="2024-01-01T00:00:00Z",
                GIT_COMMITTER_DATE="2024-01-01T00:00:00Z", LC_ALL="C")


@pytest.fixture(scope="module")
def git_repo(base_layer):
    """A repository made here: 600 files in nested directories over 3 commits, an
    executable, symlinks, a binary file, a branch and a tag."""
    _require("git")
    root, _ = base_layer
    repo = os.path.join(root, "repo")
    env = _git_env(root)
    sh("git", "init", "-q", "-b", "main", repo, env=env)
    for i in range(600):
        d = os.path.join(repo, f"src/m{i % 12:02}/s{i % 5}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"file{i:03}.c"), "w") as f:
            f.write(f"int f{i}(void) {{ return {i}; }}\n" * (1 + i % 7))
    with open(os.path.join(repo, "build.sh"), "w") as f:
        f.write("#!/bin/sh\nexit 0\n")
    os.chmod(os.path.join(repo, "build.sh"), 0o755)
    os.symlink("src/m00", os.path.join(repo, "link-to-dir"))
    os.symlink("nowhere", os.path.join(repo, "dangling"))
    with open(os.path.join(repo, "blob.bin"), "wb") as f:
        f.write(os.urandom(300_000))
    sh("git", "add", "-A", cwd=repo, env=env)
    sh("git", "commit", "-q", "-m", "one", cwd=repo, env=env)
    for n in ("two", "three"):
        for i in range(0, 600, 7):
            with open(os.path.join(repo, f"src/m{i % 12:02}/s{i % 5}/file{i:03}.c"), "a") as f:
                f.write(f"/* {n} */\n")
        sh("git", "commit", "-q", "-am", n, cwd=repo, env=env)
    sh("git", "branch", "side", "HEAD~1", cwd=repo, env=env)
    sh("git", "tag", "v1", "HEAD~2", cwd=repo, env=env)
    return repo


@pytest.mark.parametrize("into", ["new", "lower"])
def test_git_clone_status_fsck(mnt, git_repo, request, into):
    """Clone (through git's pack protocol, so git writes every object itself), then the
    checks a user runs: status clean, fsck clean; also after a checkout and a gc."""
    work = _workdir(mnt, request)
    env = _git_env(work)
    # "lower": into a directory of the base layer (merged with the lower); "new": into
    # one made through the mount.
    dest = os.path.join(mnt, "srv", f"clone-{os.path.basename(work)}") if into == "lower" \
        else os.path.join(work, "clone")
    sh("git", "clone", "-q", "--no-local", git_repo, dest, env=env)
    assert sh("git", "status", "--porcelain", "--untracked-files=all", cwd=dest, env=env) == ""
    sh("git", "fsck", "--full", "--strict", "--no-dangling", cwd=dest, env=env)
    assert sh("git", "rev-parse", "HEAD", cwd=dest, env=env) == \
        sh("git", "rev-parse", "HEAD", cwd=git_repo, env=env)
    assert sh("git", "ls-files", "-s", cwd=dest, env=env) == sh("git", "ls-files", "-s", cwd=git_repo, env=env)
    sh("git", "checkout", "-q", "v1", cwd=dest, env=env)
    sh("git", "checkout", "-q", "main", cwd=dest, env=env)
    sh("git", "gc", "-q", "--prune=now", cwd=dest, env=env)
    assert sh("git", "status", "--porcelain", "--untracked-files=all", cwd=dest, env=env) == ""
    sh("git", "fsck", "--full", "--strict", "--no-dangling", cwd=dest, env=env)
    assert os.readlink(os.path.join(dest, "link-to-dir")) == "src/m00"
    assert os.stat(os.path.join(dest, "build.sh")).st_mode & 0o777 == 0o755


# -- tree copies ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def source_tree(base_layer):
    """A tree with what copies get wrong: every file type, odd modes and owners, hard-link
    groups within and across directories, sparse and empty files, xattrs, odd names."""
    root, _ = base_layer
    src = os.path.join(root, "source")
    dirs = ["a/b/c", "a/empty", "sticky", "setgid", "sp ace", "ü-dir", "deep/" + "/".join(["d"] * 12)]
    for d in dirs:
        os.makedirs(os.path.join(src, d))
    files = {
        "a/empty-file": b"",
        "a/one-byte": b"1",
        "a/b/random": os.urandom(100_000),
        "a/b/c/aligned": os.urandom(1 << 20),
        "a/b/c/unaligned": os.urandom((1 << 20) + 1),
        "sp ace/with space.txt": b"space\n",
        "ü-dir/ünïcödé.txt": "ü\n".encode(),
        "deep/" + "/".join(["d"] * 12) + "/leaf": b"deep\n",
        "a/hl-1": b"hard-linked three ways\n",
        "a/pair-1": b"pair\n",
    }
    for rel, data in files.items():
        with open(os.path.join(src, rel), "wb") as f:
            f.write(data)
    with open(os.path.join(src, "a/sparse"), "wb") as f:
        f.truncate(8 << 20)
        f.seek(4 << 20)
        f.write(b"in the middle of a hole")
    os.link(os.path.join(src, "a/hl-1"), os.path.join(src, "a/b/hl-2"))
    os.link(os.path.join(src, "a/hl-1"), os.path.join(src, "sticky/hl-3"))
    os.link(os.path.join(src, "a/pair-1"), os.path.join(src, "a/pair-2"))
    os.symlink("../one-byte", os.path.join(src, "a/b/rel-link"))
    os.symlink("/etc/hostname", os.path.join(src, "abs-link"))
    os.symlink("nowhere/at/all", os.path.join(src, "dangling"))
    os.symlink("a/b", os.path.join(src, "dir-link"))
    os.mkfifo(os.path.join(src, "fifo"), 0o640)
    os.mknod(os.path.join(src, "null"), stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.setxattr(os.path.join(src, "a/one-byte"), "user.comment", b"an xattr")
    os.setxattr(os.path.join(src, "a/b"), "user.dir", b"on a directory")
    modes = {"a/b/random": 0o600, "a/one-byte": 0o4755, "a/empty-file": 0o000, "a/sparse": 0o444,
             "sticky": 0o1777, "setgid": 0o2775, "a/empty": 0o700}
    for rel, mode in modes.items():
        os.chmod(os.path.join(src, rel), mode)
    owners = {"a/b/random": (1000, 1000), "sticky/hl-3": (1234, 5678), "setgid": (0, 50),
              "a/empty": (65534, 65534), "abs-link": (1000, 1001), "fifo": (7, 8)}
    for rel, (uid, gid) in owners.items():
        os.chown(os.path.join(src, rel), uid, gid, follow_symlinks=False)
    t = 1_600_000_000
    for dirpath, dirnames, filenames in os.walk(src, topdown=False):
        for name in filenames + dirnames:
            t += 1
            os.utime(os.path.join(dirpath, name), ns=(t * 10**9 + 123, t * 10**9 + 456_789),
                     follow_symlinks=False)
    return src


COPIES = {
    "tar": "tar -C {src} --xattrs --xattrs-include='user.*' -cf - . | "
           "tar -C {dst} --xattrs --xattrs-include='user.*' --numeric-owner -xpf -",
    "cp -a": "cp -a {src}/. {dst}/",
    "rsync": "rsync -aHAX --numeric-ids {src}/ {dst}/",
}


def _copy(tool: str, src: str, dst: str) -> None:
    _require(tool.split()[0])
    os.makedirs(dst, exist_ok=True)
    sh("sh", "-c", COPIES[tool].format(src=f"'{src}'", dst=f"'{dst}'"))


def _assert_same_copy(src: str, dst: str, *, what: str) -> None:
    expected, expected_links = tree_and_links(src)
    got, got_links = tree_and_links(dst)
    diff = tree_differences(expected, got)
    assert not diff, f"{what}: the copy differs from its source:\n" + "\n".join(diff[:40])
    assert got_links == expected_links, f"{what}: hard-link groups {got_links} != {expected_links}"


@pytest.mark.parametrize("tool", COPIES)
def test_tree_copied_in(mnt, source_tree, request, tool):
    """A tree copied into the mount equals its source, read back through the mount."""
    dst = os.path.join(_workdir(mnt, request), "copy")
    _copy(tool, source_tree, dst)
    _assert_same_copy(source_tree, dst, what=f"{tool} into the mount")


@pytest.mark.parametrize("tool", COPIES)
def test_tree_copied_out(mnt, base_layer, tmp_path, tool):
    """The base layer copied out of the mount equals the layer itself (lower hard links,
    devices, fifos, modes and owners included)."""
    _, layer = base_layer
    dst = str(tmp_path / "out")
    _copy(tool, os.path.join(mnt, "usr"), os.path.join(dst, "usr"))
    _copy(tool, os.path.join(mnt, "etc"), os.path.join(dst, "etc"))
    for part in ("usr", "etc"):
        _assert_same_copy(os.path.join(layer, part), os.path.join(dst, part), what=f"{tool} out of /{part}")


@pytest.mark.parametrize("tool", COPIES)
def test_tree_copied_within_the_mount(mnt, source_tree, request, tool):
    """Copied in, then copied again inside the mount (reading and writing the union at
    once), then the second copy compared with the source."""
    work = _workdir(mnt, request)
    _copy(tool, source_tree, os.path.join(work, "first"))
    _copy(tool, os.path.join(work, "first"), os.path.join(work, "second"))
    _assert_same_copy(source_tree, os.path.join(work, "second"), what=f"{tool} within the mount")


def test_rsync_delete_over_lower_files(union, source_tree):
    """rsync --delete over a directory of the base layer (files replaced, removed, a file
    replaced by a directory): the same tree as on the kernel, and as the source."""
    _require("rsync")
    results = []
    for root in union:
        target = os.path.join(root, "opt", "app")
        sh("rsync", "-aHAX", "--numeric-ids", "--delete", source_tree + "/a/", target + "/")
        results.append(tree_and_links(target))
    (lf, lf_links), (k, k_links) = results
    assert not tree_differences(k, lf), "\n".join(tree_differences(k, lf)[:40])
    assert lf_links == k_links
    src, src_links = tree_and_links(os.path.join(source_tree, "a"))
    assert not tree_differences(src, lf), "\n".join(tree_differences(src, lf)[:40])


# -- directory listings ------------------------------------------------------------------


def _interleaved_listing(p: str) -> dict[str, list[str]]:
    """The issue's case: iterate os.scandir(p) and list each subdirectory as it is met,
    while p's own listing is still open."""
    seen: dict[str, list[str]] = {"": []}
    with os.scandir(p) as it:
        for entry in it:
            seen[""].append(entry.name)
            if entry.is_dir(follow_symlinks=False):
                seen[entry.name] = sorted(os.listdir(entry.path))
    seen[""].sort()
    return seen


@pytest.mark.parametrize("where", ["lower", "upper"])
def test_interleaved_scandir(mnt, request, where):
    """p/ holds a/, b/ (30 files) and x; each directory must list its own names."""
    p = os.path.join(mnt, "p")
    if where == "upper":
        p = os.path.join(_workdir(mnt, request), "p")
        for d, names in (("a", ["one", "two"]), ("b", [f"f{i:02}" for i in range(1, 31)])):
            os.makedirs(os.path.join(p, d))
            for n in names:
                open(os.path.join(p, d, n), "w").close()
        open(os.path.join(p, "x"), "w").close()
    expected = {"": ["a", "b", "x"], "a": ["one", "two"], "b": [f"f{i:02}" for i in range(1, 31)]}
    assert _interleaved_listing(p) == expected
    for name in expected["b"]:  # every name listed can be opened
        open(os.path.join(p, "b", name)).close()


def test_nested_open_directories(mnt, base_layer):
    """Depth-first walk with every ancestor's listing open (what os.walk(topdown=False),
    find -depth and git do): each directory lists the names the base layer has there."""
    def walk(d: str) -> dict[str, list[str]]:
        out = {d: []}
        with os.scandir(d) as it:
            for e in it:
                out[d].append(e.name)
                if e.is_dir(follow_symlinks=False):
                    out.update(walk(e.path))
        out[d].sort()
        return out
    got = walk(os.path.join(mnt, "usr"))
    _, layer = base_layer
    assert len(got) == 6
    for d, names in got.items():
        assert names == sorted(os.listdir(os.path.join(layer, os.path.relpath(d, mnt)))), d


def test_listing_open_while_the_directory_changes(mnt, request):
    """Names created and removed while a listing is open do not corrupt it: every name
    present throughout is returned exactly once."""
    d = _workdir(mnt, request)
    for i in range(60):
        open(os.path.join(d, f"old{i:02}"), "w").close()
    names = []
    with os.scandir(d) as it:
        for n, entry in enumerate(it):
            names.append(entry.name)
            if n == 10:
                for i in range(20):
                    open(os.path.join(d, f"new{i:02}"), "w").close()
                os.unlink(os.path.join(d, "old59" if "old59" not in names else "old58"))
    kept = [n for n in names if n.startswith("old") and n not in ("old58", "old59")]
    assert sorted(kept) == [f"old{i:02}" for i in range(58)]
    assert len(names) == len(set(names)), "a name was listed twice"


# -- find ----------------------------------------------------------------------------------


FIND_FORMAT = "%P|%y|%m|%U|%G|%s|%l|%n\\n"


def _find(root: str, *args: str) -> list[str]:
    """find's lines; a directory's size and link count are left out (they depend on the
    backing filesystem, and overlayfs does not define them)."""
    lines = []
    for line in sh("find", root, *args, "-printf", FIND_FORMAT).splitlines():
        f = line.split("|")
        if f[1] == "d":
            f[5] = f[7] = "-"
        lines.append("|".join(f))
    return sorted(lines)


def test_find_over_lower_and_upper(union, source_tree, request):
    """find over a copied-in tree and a directory of the base layer after changes to its
    lower files: the same lines as on the kernel (names, types, modes, owners, sizes,
    targets, link counts); then find -depth -delete empties both."""
    _require("find")
    outs = []
    for root in union:
        name = "find-" + request.node.callspec.id
        _copy("cp -a", source_tree, os.path.join(root, name))
        os.unlink(os.path.join(root, "var/lib/pkg/info/hard"))
        shutil.rmtree(os.path.join(root, "var/lib/pkg/gone"))
        os.chmod(os.path.join(root, "var/lib/pkg/chmod-me"), 0o600)
        os.mkdir(os.path.join(root, "var/lib/pkg/new"))
        outs.append((_find(os.path.join(root, name)), _find(os.path.join(root, "var"))))
        for d in (name, "var"):
            sh("find", os.path.join(root, d), "-mindepth", "1", "-depth", "-delete")
            assert os.listdir(os.path.join(root, d)) == []
    lf, k = outs
    assert lf == k


# -- long paths ------------------------------------------------------------------------------


def _long_dir(total: int) -> str:
    """A relative directory path of exactly ``total`` bytes, in 250-byte components."""
    parts, remaining = [], total
    while remaining > 255:
        parts.append(f"{len(parts):03}".ljust(250, "d"))
        remaining -= 251
    return "/".join(parts + ["e" * remaining])


@pytest.mark.parametrize("length", [4000, 4095])
def test_long_paths(mnt, request, length):
    """Every kind of call on a path of 4,000 bytes below the mount, and of 4,095 (PATH_MAX
    - 1, the longest the kernel takes), relative to the mount as a program in it uses them."""
    work = _workdir(mnt, request)
    name = os.path.basename(work)
    deep = os.path.join(name, _long_dir(length - len(name) - 1 - len("/file-00001")))
    old_cwd = os.getcwd()
    os.chdir(mnt)
    try:
        os.makedirs(deep)
        f = deep + "/file-00001"
        assert len(f.encode()) == length
        with open(f, "w") as fh:
            fh.write("deep\n")
        assert open(f).read() == "deep\n"
        os.chmod(f, 0o640)
        os.chown(f, 1000, 1000)
        os.utime(f, (1_600_000_000, 1_600_000_000))
        st = os.stat(f)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_mtime) == (0o640, 1000, 1_600_000_000)
        os.truncate(f, 2)
        os.link(f, deep + "/file-00002")
        assert os.stat(deep + "/file-00002").st_nlink == 2
        os.symlink("file-00001", deep + "/link-00003")
        assert os.readlink(deep + "/link-00003") == "file-00001"
        os.rename(deep + "/file-00002", deep + "/file-00004")
        os.mkfifo(deep + "/fifo-00005")
        os.mknod(deep + "/null-00006", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        os.mkdir(deep + "/dir-000007")
        os.setxattr(f, "user.deep", b"1")
        assert os.getxattr(f, "user.deep") == b"1"
        assert sorted(os.listdir(deep)) == ["dir-000007", "fifo-00005", "file-00001", "file-00004",
                                            "link-00003", "null-00006"]
        found = sh("find", name, "-name", "file-0000*", cwd=mnt).split()
        assert sorted(os.path.basename(p) for p in found) == ["file-00001", "file-00004"]
        os.unlink(deep + "/file-00004")
        os.rmdir(deep + "/dir-000007")
        sh("rm", "-rf", name, cwd=mnt)
        assert not os.path.exists(name)
    finally:
        os.chdir(old_cwd)


def test_a_name_over_255_bytes_is_enametoolong(mnt):
    for call in (os.stat, os.mkdir, lambda p: open(p, "w")):
        with pytest.raises(OSError) as e:
            call(os.path.join(mnt, "n" * 256))
        assert e.value.errno == errno.ENAMETOOLONG


# -- O_DIRECT ---------------------------------------------------------------------------------


def test_o_direct_with_dd(mnt, request):
    """dd with oflag=direct into a new file and iflag=direct from a lower file and from a
    copied-up one."""
    work = _workdir(mnt, request)
    out = os.path.join(work, "direct-out")
    sh("dd", "if=/dev/zero", f"of={out}", "bs=4096", "count=4", "oflag=direct", "status=none")
    assert os.path.getsize(out) == 16384 and open(out, "rb").read() == bytes(16384)
    sh("dd", f"if={out}", "of=/dev/null", "bs=4096", "iflag=direct", "status=none")
    lower = os.path.join(mnt, "direct/data")
    copy = sh("sh", "-c", f"dd if='{lower}' bs=4096 iflag=direct status=none | sha256sum").split()[0]
    assert copy == sh("sh", "-c", f"sha256sum < '{lower}'").split()[0]
    # write in place into a lower file (copy-up), then read it back with O_DIRECT
    sh("dd", "if=/dev/zero", f"of={lower}", "bs=4096", "count=1", "seek=2", "conv=notrunc",
       "oflag=direct", "status=none")
    data = sh("sh", "-c", f"dd if='{lower}' bs=4096 iflag=direct status=none | od -An -tx1 -v | tr -d ' \\n'")
    expected = bytearray(bytes(range(256)) * 256)
    expected[8192:12288] = bytes(4096)
    assert data == expected.hex()
