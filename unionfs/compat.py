"""``fuse-layerfs``: a mount program with fuse-overlayfs's command line.

    fuse-layerfs [-f] -o lowerdir=L1:L2:...,upperdir=U,workdir=W [SOURCE] MOUNTPOINT

The lower layers are plain directories (top first, as overlayfs takes them) and the
upper is in overlayfs's own format (char-device 0/0 whiteouts, the opaque xattr), so
``mount -t fuse.fuse-layerfs`` works through mount.fuse3 and containers/storage can
use it as its ``mount_program``. Without ``-f`` it returns once the mount serves.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from .mount import parse_options, spawn_until_ready

# Options handed to libfuse as they are; every other unknown option is ignored, as
# mount programs must accept the generic ones (rw, noatime, ...) that mount(8) passes.
_FUSE_PASSTHROUGH = {"allow_other", "allow_root", "default_permissions", "suid", "nosuid", "dev", "nodev"}


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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="fuse-layerfs", description=__doc__.split("\n\n")[0])
    p.add_argument("-f", action="store_true", help="stay in the foreground")
    p.add_argument("-d", action="store_true", help="debug output (implies -f)")
    p.add_argument("-o", action="append", default=[], metavar="OPTIONS")
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("paths", nargs="+", metavar="[SOURCE] MOUNTPOINT")
    args = p.parse_args(argv)
    opts = parse_options(args.o)
    mountpoint = os.path.abspath(args.paths[-1])
    lowers = split_lowerdir(str(opts.get("lowerdir", "")))
    if not lowers:
        p.exit(2, "fuse-layerfs: no lowerdir given (-o lowerdir=DIR[:DIR...])\n")
    upper, work = opts.get("upperdir"), opts.get("workdir")
    if bool(upper) != bool(work):
        p.exit(2, "fuse-layerfs: upperdir and workdir go together\n")
    for d in lowers + [d for d in (upper, work) if d] + [mountpoint]:
        if not os.path.isdir(str(d)):
            p.exit(1, f"fuse-layerfs: {d} is not a directory\n")

    if not (args.f or args.d):
        _start_in_background(argv if argv is not None else sys.argv[1:], mountpoint)
        return

    from store.fstree import raise_open_file_limit

    from .fuse_ops import serve
    from .lower import DirLower
    from .view import UnionView

    raise_open_file_limit()  # as fuse-overlayfs does: a container's open files are ours too

    read_only = not upper or opts.get("ro") is True
    if upper:
        work_dir = os.path.join(str(work), "layerfs")
        os.makedirs(work_dir, exist_ok=True)
    else:
        # A read-only union still needs an (empty) upper to resolve against.
        import tempfile
        upper = tempfile.mkdtemp(prefix="fuse-layerfs-ro-")
        work_dir = upper
    volatile = opts.get("volatile") is True or opts.get("fsync") == "0"
    view = UnionView(DirLower(lowers), str(upper), work_dir, volatile=volatile,
                     read_only=read_only, overlay_format=True)
    fuse_opts = {k: v for k, v in opts.items() if k in _FUSE_PASSTHROUGH}
    fuse_opts["fsname"] = args.paths[0] if len(args.paths) > 1 else "fuse-layerfs"

    def report(message: str) -> None:
        if args.ready_fd is not None:
            os.write(args.ready_fd, message.encode() + b"\n")
            os.close(args.ready_fd)
            args.ready_fd = None

    try:
        serve(view, mountpoint, foreground=True, options=fuse_opts, on_ready=lambda: report("ready"),
              debug=args.d)
    except Exception as e:  # noqa: BLE001 - the waiting parent prints it as one line
        report(str(e) or type(e).__name__)
        raise SystemExit(1) from None
    report("the mount ended before it served")


def _start_in_background(argv: list[str], mountpoint: str) -> None:
    """Run ourselves with -f in a new session and return once the mount serves."""
    _, message = spawn_until_ready([sys.executable, "-m", "unionfs.compat", "-f", *argv],
                                   subprocess.DEVNULL)
    if message != "ready":
        sys.exit(f"fuse-layerfs: cannot mount {mountpoint}: {message or 'the server exited'}")


if __name__ == "__main__":
    main()
