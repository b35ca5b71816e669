"""Helpers shared by the tests: building tarballs, extracting references, snapshots."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import subprocess
import tarfile

import lmdb


def make_tar(path: str, members: list[tuple], fmt: int = tarfile.PAX_FORMAT) -> str:
    """Write a tar from (name, kind, data, extra) tuples; kind is f, d, l, h, c, b, p.

    ``data`` is the content (f), the link target (l, h) or (major, minor) (c, b);
    ``extra`` is a dict of TarInfo attributes (mode, uid, mtime, pax_headers...).
    """
    with tarfile.open(path, "w", format=fmt) as tf:
        for m in members:
            name, kind, data = m[0], m[1], m[2] if len(m) > 2 else b""
            extra = m[3] if len(m) > 3 else {}
            ti = tarfile.TarInfo(name)
            ti.mode = 0o755 if kind == "d" else 0o644
            ti.mtime = 1_700_000_000
            ti.type = {"f": tarfile.REGTYPE, "d": tarfile.DIRTYPE, "l": tarfile.SYMTYPE,
                       "h": tarfile.LNKTYPE, "c": tarfile.CHRTYPE, "b": tarfile.BLKTYPE,
                       "p": tarfile.FIFOTYPE}[kind]
            for k, v in extra.items():
                setattr(ti, k, v)
            if kind in ("l", "h"):
                ti.linkname = data
                tf.addfile(ti)
            elif kind in ("c", "b"):
                ti.devmajor, ti.devminor = data
                tf.addfile(ti)
            elif kind == "f":
                raw = data if isinstance(data, bytes) else data.encode()
                ti.size = len(raw)
                tf.addfile(ti, io.BytesIO(raw))
            else:
                tf.addfile(ti)
    return path


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def apply_layer_with_gnu_tar(tarball: str, rootfs: str) -> None:
    """Apply an OCI layer onto ``rootfs`` the way a container engine does, using GNU tar.

    Whiteouts are honoured: ``.wh..wh..opq`` empties the directory of what lower layers
    put there, ``.wh.NAME`` removes NAME; then the layer's other members are extracted.
    """
    with tarfile.open(tarball) as tf:
        names = tf.getnames()
    for name in names:
        norm = os.path.normpath(name)
        parent, base = os.path.split(norm)
        if base == ".wh..wh..opq":
            d = os.path.join(rootfs, parent)
            if os.path.isdir(d):
                for child in os.listdir(d):
                    _remove(os.path.join(d, child))
        elif base.startswith(".wh."):
            _remove(os.path.join(rootfs, parent, base[4:]))
    subprocess.run(["tar", "-x", "-f", tarball, "-C", rootfs, "--exclude=.wh.*",
                    "--exclude=*/.wh.*", "--same-owner", "--same-permissions", "--overwrite",
                    "--xattrs", "--xattrs-include=*"], check=True)


def _remove(path: str) -> None:
    if os.path.islink(path) or (os.path.exists(path) and not os.path.isdir(path)):
        os.unlink(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)


def tree_of_dir(root: str) -> dict[str, tuple]:
    """{path: (type, mode, size-or-target, content sha)} of a real directory."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            if stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), None, None)
            elif stat.S_ISLNK(st.st_mode):
                out[rel] = ("symlink", stat.S_IMODE(st.st_mode), os.readlink(full), None)
            elif stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    out[rel] = ("reg", stat.S_IMODE(st.st_mode), st.st_size,
                                hashlib.sha256(f.read()).hexdigest())
            else:
                out[rel] = ("other", stat.S_IMODE(st.st_mode), None, None)
    return out


def store_snapshot(root: str) -> tuple[dict, list[str]]:
    """Everything a store holds outside tmp/: every index record and every blob file."""
    records = {}
    env = lmdb.open(os.path.join(root, "index.lmdb"), readonly=True, lock=False, max_dbs=32)
    with env.begin() as txn:
        for name, _ in txn.cursor():
            db = env.open_db(name, txn=txn, create=False)
            for k, v in txn.cursor(db=db):
                if name == b"meta":
                    continue  # counters may advance; they are not content
                records[(name, bytes(k))] = bytes(v)
    env.close()
    files = []
    for dirpath, _, filenames in os.walk(os.path.join(root, "blobs")):
        files += [os.path.join(dirpath, f) for f in filenames]
    return records, sorted(files)


# --- merged-view and import/export helpers -------------------------------------------


def apply_layer_like_an_engine(tarball: str, rootfs: str) -> None:
    """Like :func:`apply_layer_with_gnu_tar`, but a member replaces what lies at its name.

    A container engine (containerd, docker) removes an existing name before it extracts a
    member there, unless both are directories. GNU tar alone would write a file into the
    existing inode (so a lower hard link would change too) and cannot put a file where a
    non-empty directory is; this does the removal first, then lets GNU tar do the rest.
    """
    with tarfile.open(tarball) as tf:
        members = [(os.path.normpath(m.name), m.isdir(), m.mode) for m in tf.getmembers()]
    for name, is_dir, _ in members:
        if name == "." or os.path.basename(name).startswith(".wh."):
            continue
        full = os.path.join(rootfs, name)
        try:
            st = os.lstat(full)
        except OSError:
            continue
        if not (is_dir and stat.S_ISDIR(st.st_mode)):
            _remove(full)
    apply_layer_with_gnu_tar(tarball, rootfs)
    # GNU tar keeps the set-group-ID bit a new directory inherits from a set-group-ID
    # parent; an engine sets exactly the mode of the header.
    for name, is_dir, mode in members:
        if is_dir:
            os.chmod(os.path.join(rootfs, name), mode & 0o7777)


def _sha_of_stream(f) -> str:
    h = hashlib.sha256()
    while chunk := f.read(1 << 20):
        h.update(chunk)
    return h.hexdigest()


def full_tree_of_dir(root: str) -> dict[str, tuple]:
    """{path: (type, mode, uid, gid, size, content sha, symlink target, rdev)} of a real tree.

    A symlink's mode is None (Linux ignores it); size and sha only for regular files.
    """
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            fmt = stat.S_IFMT(st.st_mode)
            kind = {stat.S_IFREG: "reg", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
                    stat.S_IFCHR: "chr", stat.S_IFBLK: "blk", stat.S_IFIFO: "fifo"}.get(fmt, "other")
            mode = None if kind == "symlink" else stat.S_IMODE(st.st_mode)
            size = sha = target = rdev = None
            if kind == "reg":
                size = st.st_size
                with open(full, "rb") as f:
                    sha = _sha_of_stream(f)
            elif kind == "symlink":
                target = os.readlink(full)
            elif kind in ("chr", "blk"):
                rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
            out[rel] = (kind, mode, st.st_uid, st.st_gid, size, sha, target, rdev)
    return out


def full_tree_of_image(store, image) -> dict[str, tuple]:
    """The same as :func:`full_tree_of_dir`, for an image's merged tree in the store.

    Walks ``store.tree(image).listdir`` from the root and reads every file's blob.
    A whiteout that leaked into the merged view shows up with type "whiteout".
    """
    from layerfs.store.records import Kind

    names = {Kind.REG: "reg", Kind.DIR: "dir", Kind.SYMLINK: "symlink", Kind.CHR: "chr",
             Kind.BLK: "blk", Kind.FIFO: "fifo", Kind.WHITEOUT: "whiteout"}
    tree = store.tree(image)
    out = {}
    todo = [""]
    while todo:
        d = todo.pop()
        for name, e in tree.listdir(d):
            path = f"{d}/{name}" if d else name
            kind = names[e.kind]
            mode = None if kind == "symlink" else e.mode
            size = sha = target = rdev = None
            if kind == "reg":
                size = e.size
                with store.blobs.open(e.blob) as f:
                    sha = _sha_of_stream(f)
            elif kind == "symlink":
                target = e.target
            elif kind in ("chr", "blk"):
                rdev = (e.rdev_major, e.rdev_minor)
            out[path] = (kind, mode, e.uid, e.gid, size, sha, target, rdev)
            if e.kind == Kind.DIR:
                todo.append(path)
    return out


def tree_differences(expected: dict, actual: dict) -> list[str]:
    """Readable lines for every path where two trees disagree (empty when equal)."""
    out = []
    for p in sorted(set(expected) | set(actual)):
        if expected.get(p) != actual.get(p):
            out.append(f"{p}: expected {expected.get(p)}, got {actual.get(p)}")
    return out


def assert_one_line_error(proc, *, mentions: tuple[str, ...] = ()) -> str:
    """A CLI failure as a user wants it: non-zero exit, nothing on stdout, and exactly one
    non-empty line on stderr, starting "layerfs:", with no traceback; returns that line."""
    err = proc.stderr.decode("utf-8", "replace")
    out = proc.stdout.decode("utf-8", "replace")
    assert proc.returncode != 0, f"exit 0 for bad input; stdout={out!r} stderr={err!r}"
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    assert lines[0].startswith("layerfs:"), err
    assert out == "", f"a failed command printed {out!r}"
    for word in mentions:
        assert word in lines[0], f"{word!r} not in the error {lines[0]!r}"
    return lines[0]


def tree_and_links(root: str, *, mtimes: bool = True) -> tuple[dict[str, tuple], list[tuple[str, ...]]]:
    """What a copy of a tree must keep: :func:`full_tree_of_dir`'s fields plus each entry's
    mtime (ns) and user.* xattrs, and the hard-link groups (names sharing an inode)."""
    entries = full_tree_of_dir(root)
    groups: dict[tuple[int, int], list[str]] = {}
    for rel, fields in entries.items():
        full = os.path.join(root, rel)
        st = os.lstat(full)
        xattrs = {n: os.getxattr(full, n, follow_symlinks=False)
                  for n in sorted(os.listxattr(full, follow_symlinks=False)) if n.startswith("user.")}
        entries[rel] = fields + ((st.st_mtime_ns if mtimes else None), xattrs)
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
            groups.setdefault((st.st_dev, st.st_ino), []).append(rel)
    return entries, sorted(tuple(sorted(g)) for g in groups.values() if len(g) > 1)


NOBODY = 65534  # the second local user of the tests that need one


def as_nobody(*cmd: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """Run a command as uid/gid 65534 with no supplementary groups."""
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *cmd],
                          capture_output=True, env=env, timeout=120, **kwargs)


def on_terminal(argv: list[str], env: dict | None = None, stdin=subprocess.DEVNULL,
                timeout: float = 120) -> tuple[int, bytes, str]:
    """Run a command with stderr on a pseudo-terminal, as a user at a terminal would:
    (exit code, stdout, everything the terminal received)."""
    import pty
    import select

    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE, stderr=slave, env=env)
    os.close(slave)
    seen = b""
    while True:
        ready, _, _ = select.select([master], [], [], timeout)
        if not ready:
            break
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the last writer closed it
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    out = proc.stdout.read()
    return proc.wait(60), out, seen.decode(errors="replace")


def listed_names(directory: str, stat_while_listing: bool) -> dict[str, tuple[int, bool, bool, bool]]:
    """name -> (inode number, is a directory, a symlink, a regular file) as a listing of
    ``directory`` gives them; with ``stat_while_listing`` each name is lstat'ed as it
    comes, and those lookups make the kernel ask for the later pieces as readdirplus."""
    seen = {}
    with os.scandir(directory) as it:
        for entry in it:
            if stat_while_listing:
                os.lstat(entry.path)
            seen[entry.name] = (entry.inode(), entry.is_dir(follow_symlinks=False),
                                entry.is_symlink(), entry.is_file(follow_symlinks=False))
    return seen


def assert_listing_agrees_with_lstat(directory: str, seen: dict, expected: dict) -> None:
    """Every name ``listed_names`` gave has the inode number and type lstat then gives,
    and lstat's attributes are ``expected``'s: name -> (file type, permission bits, uid,
    size), a None not checked."""
    assert sorted(seen) == sorted(expected)
    for name, (ino, is_dir, is_link, is_file) in seen.items():
        st = os.lstat(os.path.join(directory, name))
        fmt, perm, uid, size = expected[name]
        assert (stat.S_IFMT(st.st_mode), st.st_uid) == (fmt, uid), name
        assert perm is None or stat.S_IMODE(st.st_mode) == perm, name
        assert size is None or st.st_size == size, name
        assert ino == st.st_ino, f"{name}: the listing gave another inode number"
        assert (is_dir, is_link, is_file) == (fmt == stat.S_IFDIR, fmt == stat.S_IFLNK, fmt == stat.S_IFREG), name
