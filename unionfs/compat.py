"""``fuse-layerfs``: a mount program with fuse-overlayfs's command line.

    fuse-layerfs [-f] -o lowerdir=L1:L2:...,upperdir=U,workdir=W [SOURCE] MOUNTPOINT

The lower layers are plain directories (top first, as overlayfs takes them) and the
upper is in overlayfs's own format (char-device 0/0 whiteouts, the opaque xattr), so
containers/storage can use it as its ``mount_program`` and ``mount -t fuse.fuse-layerfs``
works through a mount helper (``mount.fuse.fuse-layerfs``, see the README). Without
``-f`` it returns once the mount serves; the server then logs to
``WORKDIR/layerfs/server.log`` (read-only mounts: a ``fuse-layerfs-*.log`` file in the
temporary directory), and a failed mount names that file.

Layer paths may be relative (to the caller's directory) or symlinks (containers/storage
passes ``overlay/l/SHORTID -> ../ID/diff``): both are resolved once, at mount time, as the
kernel's overlayfs resolves them.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field

from .fusecheck import MountError, serve_or_explain
from .mount import can_fork, fork_server, parse_options, reporter, spawn_server, until_ready

# How each option is handled. mount(8) and mount.fuse3 add generic ones (rw, dev, suid,
# atime flags), containers/storage adds ``volatile`` and the ID-mapping ones, users copy
# fuse-overlayfs's; an option in none of these sets is refused with one line, never
# silently ignored.
_LAYER_OPTIONS = {"lowerdir", "upperdir", "workdir"}
# Understood by libfuse's mount code (mount flags, kernel and fusermount options).
_LIBFUSE_OPTIONS = {"allow_other", "allow_root", "default_permissions", "suid", "nosuid", "dev",
                    "nodev", "exec", "noexec", "async", "sync", "dirsync", "atime", "noatime",
                    "context", "fscontext", "defcontext", "rootcontext", "fsname", "subtype"}
# Accepted without effect, each for a reason:
_NO_EFFECT = {
    # atime variants: the server keeps the upper files' own access times
    "relatime", "norelatime", "strictatime", "nostrictatime", "diratime", "nodiratime",
    "lazytime", "nolazytime",
    # read by mount(8) itself, never by a filesystem
    "defaults", "auto", "noauto", "user", "nouser", "users", "owner", "group", "nofail",
    "_netdev", "loud", "silent",
    # fuse-overlayfs's switch to turn POSIX ACL enforcement off: layerfs never turns it on
    # (ACL xattrs are stored and copied, the kernel checks the mode bits only)
    "noacl",
}
_REFUSED = {
    "uidmapping": "ID-mapped layers are not supported (use the kernel's overlayfs with "
                  "idmapped mounts, or fuse-overlayfs)",
    "gidmapping": "ID-mapped layers are not supported (use the kernel's overlayfs with "
                  "idmapped mounts, or fuse-overlayfs)",
    "squash_to_root": "squashing owners is not supported",
    "squash_to_uid": "squashing owners is not supported",
    "squash_to_gid": "squashing owners is not supported",
    "xattr_permissions": "owners and modes kept in xattrs (containers/storage's force_mask) "
                         "are not supported",
    "redirect_dir": "directory renames are always allowed; the option cannot change that",
    "index": "the overlay index is not supported",
    "xino": "inode numbers are always the server's own",
    "timeout": "fuse-overlayfs's tuning options are not supported",
    "threaded": "fuse-overlayfs's tuning options are not supported",
    "fast_ino": "fuse-overlayfs's tuning options are not supported",
    "writeback": "fuse-overlayfs's tuning options are not supported",
    "noxattrs": "fuse-overlayfs's tuning options are not supported",
    "static_nlink": "fuse-overlayfs's tuning options are not supported",
    "plugins": "lower-layer plugins are not supported",
}


class UsageError(Exception):
    """A command line fuse-layerfs refuses (one line, exit 2)."""


@dataclass(frozen=True, slots=True)
class MountConfig:
    """A parsed command line with every path absolute and symlink-free."""

    lowers: list[str]  # top first
    upper: str | None
    work: str | None
    mountpoint: str
    source: str
    read_only: bool
    volatile: bool
    fuse_options: dict[str, str | bool] = field(default_factory=dict)
    metacopy: bool = False  # metadata-only copy-up (-o metacopy=on), written as the kernel does
    userxattr: bool = False  # user.overlay.* markers instead of trusted.overlay.*

    def log_path(self) -> str | None:
        """Where the background server logs (None: choose a temporary file)."""
        return os.path.join(self.work, "layerfs", "server.log") if self.work else None

    def to_argv(self) -> list[str]:
        """The command line that stands for this configuration (for the serving child)."""
        opts = ["lowerdir=" + ":".join(_escape_lower(d) for d in self.lowers)]
        if self.upper:
            opts += [f"upperdir={self.upper}", f"workdir={self.work}"]
        if self.read_only:
            opts.append("ro")
        if self.volatile:
            opts.append("volatile")
        if self.metacopy:
            opts.append("metacopy=on")
        if self.userxattr:
            opts.append("userxattr")
        opts += [k if v is True else f"{k}={v}" for k, v in self.fuse_options.items()]
        return ["-o", ",".join(opts), self.source, self.mountpoint]


def split_lowerdir(value: str) -> list[str]:
    """``a:b\\:c`` -> ["a", "b:c"] (overlayfs escapes colons in paths with a backslash)."""
    out, cur, escaped = [], "", False
    for ch in value:
        if escaped:
            cur, escaped = cur + ch, False
        elif ch == "\\":
            escaped = True
        elif ch == ":":
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return [d for d in out if d]


def _escape_lower(path: str) -> str:
    return path.replace("\\", "\\\\").replace(":", "\\:")


def _real_dir(path: str, what: str) -> str:
    real = os.path.realpath(path)
    if not os.path.isdir(real):
        raise UsageError(f"{what} {path} is not a directory")
    return real


def _check_options(opts: dict[str, str | bool]) -> None:
    for key, value in opts.items():
        if key in _REFUSED:
            raise UsageError(f"option {key} is not supported: {_REFUSED[key]}")
        if key.startswith("x-") or key in _NO_EFFECT or key in _LIBFUSE_OPTIONS or key in _LAYER_OPTIONS:
            continue
        if key in ("ro", "rw", "volatile") and value is True:
            continue
        if key == "fsync" and value in ("0", "1"):
            continue
        if (key == "metacopy" and value in ("on", "off")) or (key == "userxattr" and value is True):
            continue
        raise UsageError(f"unknown option {key if value is True else f'{key}={value}'}")


def parse_command_line(paths: list[str], options: list[str]) -> MountConfig:
    """The configuration that ``-o OPTIONS... [SOURCE] MOUNTPOINT`` asks for."""
    if len(paths) > 2:
        raise UsageError(f"too many arguments: {' '.join(paths)} (want [SOURCE] MOUNTPOINT)")
    opts = parse_options(options)
    _check_options(opts)
    lowers = split_lowerdir(str(opts.get("lowerdir", "")) if opts.get("lowerdir") is not True else "")
    if not lowers:
        raise UsageError("no lowerdir given (-o lowerdir=DIR[:DIR...])")
    upper, work = opts.get("upperdir"), opts.get("workdir")
    if bool(upper) != bool(work) or upper is True or work is True:
        raise UsageError("upperdir and workdir go together (-o upperdir=DIR,workdir=DIR)")
    lowers = [_real_dir(d, "lowerdir") for d in lowers]
    upper = _real_dir(str(upper), "upperdir") if upper else None
    work = _real_dir(str(work), "workdir") if work else None
    mountpoint = _real_dir(paths[-1], "mountpoint")
    for d in lowers + [d for d in (upper, work) if d]:
        if d == mountpoint or d.startswith(mountpoint.rstrip("/") + "/"):
            # The server reads its layers by path: under its own mount it would wait on itself.
            raise UsageError(f"{d} lies under the mountpoint {mountpoint}")
    if opts.get("metacopy") == "on" and opts.get("userxattr") is True:
        # As the kernel: metacopy files are found through redirects, which a kernel
        # mounted with userxattr does not follow.
        raise UsageError("metacopy=on and userxattr do not go together")
    read_only = not upper or opts.get("ro") is True
    volatile = opts.get("volatile") is True or opts.get("fsync") == "0"
    fuse_options = {k: v for k, v in opts.items() if k in _LIBFUSE_OPTIONS}
    fuse_options.setdefault("fsname", paths[0] if len(paths) > 1 else "fuse-layerfs")
    fuse_options.setdefault("subtype", "fuse-layerfs")  # the type is fuse.fuse-layerfs, as mounted
    return MountConfig(lowers, upper, work, mountpoint, paths[0] if len(paths) > 1 else "fuse-layerfs",
                       read_only, volatile, fuse_options, metacopy=opts.get("metacopy") == "on",
                       userxattr=opts.get("userxattr") is True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fuse-layerfs", description=__doc__.split("\n\n")[0])
    p.add_argument("-f", action="store_true", help="stay in the foreground")
    p.add_argument("-d", action="store_true", help="debug output (implies -f)")
    p.add_argument("-o", action="append", default=[], metavar="OPTIONS")
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("paths", nargs="+", metavar="[SOURCE] MOUNTPOINT")
    return p


def main(argv: list[str] | None = None) -> None:
    p = _parser()
    args = p.parse_args(argv)
    try:
        config = parse_command_line(args.paths, args.o)
    except UsageError as e:
        p.exit(2, f"fuse-layerfs: {e}\n")
    if not (args.f or args.d):
        _start_in_background(config)
        return
    sys.exit(_serve(config, reporter(args.ready_fd), args.d))


def _serve(config: MountConfig, report, debug: bool) -> int:
    """Serve ``config`` in this process until unmounted; ``report(message)`` tells the
    waiting parent "ready", or in one line why not. Returns the exit status."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s fuse-layerfs[%(process)d] %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("layerfs.compat")
    scratch = None
    try:
        from layerfs.store.fstree import raise_open_file_limit

        from .fuse_ops import serve
        from .lower import DirLower
        from .markers import OverlayMarkers
        from .view import UnionView

        raise_open_file_limit()  # as fuse-overlayfs does: a container's open files are ours too
        if config.upper:
            upper, work_dir = config.upper, os.path.join(config.work, "layerfs")
            os.makedirs(work_dir, exist_ok=True)
        else:
            # A read-only union still needs an (empty) upper to resolve against.
            upper = work_dir = scratch = tempfile.mkdtemp(prefix="fuse-layerfs-ro-")
        # The upper in the kernel's own format: full data copy-up unless metacopy=on, as
        # the kernel and fuse-overlayfs default to.
        markers = OverlayMarkers("user.overlay." if config.userxattr else "trusted.overlay.",
                                 metacopy=config.metacopy)
        view = UnionView(DirLower(config.lowers), upper, work_dir, volatile=config.volatile,
                         read_only=config.read_only, markers=markers)
        log.info("mounting %s: lowerdir=%s upperdir=%s%s%s", config.mountpoint, ":".join(config.lowers),
                 config.upper or "(none)", " read-only" if config.read_only else "",
                 " volatile" if config.volatile else "")
        serve_or_explain(lambda ready: serve(view, config.mountpoint, foreground=True,
                                             options=dict(config.fuse_options), on_ready=ready, debug=debug),
                         config.mountpoint, lambda: report("ready"))
        log.info("unmounted %s", config.mountpoint)
    except MountError as e:  # why, in one line (libfuse's own lines are in it)
        log.error("the mount of %s failed: %s", config.mountpoint, e)
        report(str(e))
        return 1
    except Exception as e:  # noqa: BLE001 - the waiting parent prints it as one line
        log.exception("the mount of %s failed", config.mountpoint)
        report(str(e) or type(e).__name__)
        return 1
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    report("the mount ended before it served")
    return 0


def _start_in_background(config: MountConfig) -> None:
    """Fork the server (or, with threads running, run ourselves with -f) in a new
    session, logging to a file, and return once the mount serves."""
    log_path = config.log_path()
    if log_path is None:
        fd, log_path = tempfile.mkstemp(prefix="fuse-layerfs-", suffix=".log")
        os.close(fd)
    else:
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "ab") as log:
        if can_fork():
            started = fork_server(lambda report: _serve(config, report, False), log)
        else:
            started = spawn_server([sys.executable, "-m", "layerfs.unionfs.compat", "-f", *config.to_argv()],
                                   log)
        proc, message = until_ready(started)
    if message != "ready":
        if proc.poll() is None:
            proc.kill()  # it may still be starting: it must not mount later
        proc.wait()
        sys.exit(f"fuse-layerfs: cannot mount {config.mountpoint}: "
                 f"{message or 'the server exited'} (log: {log_path})")


def mount_helper(argv: list[str] | None = None) -> None:
    """``mount.fuse.fuse-layerfs SOURCE DIR [-sfnv] [-o OPTS] [-t TYPE]``: what mount(8)
    runs for ``mount -t fuse.fuse-layerfs`` (and ``mount.fuse-layerfs`` for ``-t
    fuse-layerfs``), from /sbin, with a reset PATH; it starts fuse-layerfs itself."""
    p = argparse.ArgumentParser(prog="mount.fuse-layerfs")
    p.add_argument("source")
    p.add_argument("mountpoint")
    p.add_argument("-o", action="append", default=[])
    p.add_argument("-t", default="fuse.fuse-layerfs")
    p.add_argument("-s", action="store_true", help="sloppy: accepted, options are checked anyway")
    p.add_argument("-f", action="store_true", help="fake: check the command line, mount nothing")
    p.add_argument("-n", action="store_true", help="no mtab: there is none to write")
    p.add_argument("-v", action="store_true")
    p.add_argument("-N", metavar="NAMESPACE", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.N:
        p.exit(2, "mount.fuse-layerfs: mounting in another namespace (-N) is not supported\n")
    try:
        config = parse_command_line([args.source, args.mountpoint], args.o)
    except UsageError as e:
        p.exit(2, f"mount.fuse-layerfs: {e}\n")
    if args.f:
        return
    _start_in_background(config)


if __name__ == "__main__":
    main()
