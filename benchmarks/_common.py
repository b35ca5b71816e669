"""Helpers shared by the benchmark scripts (standard library only)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def layerfs_cmd() -> list[str]:
    """The real ``layerfs`` CLI: the venv's console script, else ``python -m layerfs.cli``."""
    script = os.path.join(os.path.dirname(sys.executable), "layerfs")
    if os.access(script, os.X_OK):
        return [script]
    return [sys.executable, "-m", "layerfs.cli"]


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    """Run a command, raising with its stderr if it fails."""
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.decode(errors='replace')}")
    return p


def timed(cmd: list[str], **kw) -> tuple[float, subprocess.CompletedProcess]:
    """Wall-clock seconds of one command (process start to exit)."""
    t0 = time.perf_counter()
    p = run(cmd, **kw)
    return time.perf_counter() - t0, p


def debootstrap(dest: str, mirror: str) -> None:
    """A Debian bookworm minbase tree at ``dest`` (packages from apt's cache where it has them)."""
    run(["debootstrap", "--variant=minbase", "--cache-dir=/var/cache/apt/archives", "bookworm", dest, mirror])


def cached_debootstrap(cache_dir: str, mirror: str) -> tuple[str, bool]:
    """The debootstrap tree kept in ``cache_dir`` and whether it was already there (it is
    built the first time and renamed into place only once complete, so an interrupted
    build is never reused)."""
    dest = os.path.join(cache_dir, "debootstrap-bookworm-minbase")
    if os.path.isdir(dest):
        return dest, True
    print(f"building {dest} with debootstrap (kept for the next run) ...", flush=True)
    partial = dest + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(cache_dir, exist_ok=True)
    debootstrap(partial, mirror)
    os.rename(partial, dest)
    return dest, False


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def rmtree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def quiesce() -> None:
    """Write back dirty pages (untimed) so a run does not pay for the previous run's writes.

    The page cache is not dropped: inputs stay cached, as they would on a warm machine.
    This matters because layerfs calls syncfs(), which would otherwise flush whatever
    the previous run (e.g. a ``tar -x`` of 1 GiB) left dirty on the same filesystem.
    """
    os.sync()


def drop_caches() -> None:
    """Write back dirty pages, then drop the page cache, dentries and inodes (root only)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def mountpoints_under(*roots: str) -> list[str]:
    """Mount points at or below any of ``roots`` (deepest first)."""
    roots = tuple(os.path.realpath(r) for r in roots)
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mnt = line.split()[4].encode().decode("unicode_escape")
            if any(mnt == r or mnt.startswith(r + "/") for r in roots):
                out.append(mnt)
    return sorted(out, key=len, reverse=True)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def layerfs_server_pid(root: str, mnt: str) -> int:
    """The serving process of the ``layerfs mount`` at ``mnt``, as ``layerfs ps`` has it
    (forked from the CLI, its command line is the CLI's: no marker to find it by)."""
    for c in json.loads(run(layerfs_cmd() + ["ps", "--root", root, "--json"]).stdout):
        if c["mountpoint"] and os.path.realpath(c["mountpoint"]) == os.path.realpath(mnt) and c["pid"]:
            return c["pid"]
    raise RuntimeError(f"no layerfs server found for {mnt}")


def server_pid(mnt: str, marker: str) -> int:
    """The serving process of ``mnt`` (its command line names the mountpoint or ``marker``)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if any(os.fsencode(mnt) == a or a.endswith(os.fsencode(mnt)) for a in args) \
                and any(marker.encode() in a for a in args):
            return int(pid)
    raise RuntimeError(f"no server found for {mnt}")


def fs_type(path: str) -> str:
    try:
        out = subprocess.run(["df", "-T", path], stdout=subprocess.PIPE, text=True, check=True).stdout
        return out.splitlines()[1].split()[1]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return "?"


def loadavg() -> str:
    """The 1/5/15-minute load averages: other work on the machine skews the numbers."""
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def git_commit() -> str:
    """The checkout's commit, with "+dirty" when the code under test has local changes."""
    try:
        head = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--", "store", "unionfs", "cli.py"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "?"


def ext4_journal(path: str) -> str:
    """For ext4: "yes"/"no" (a journal-less ext4 skips recently freed inodes when it
    allocates, so creating many files soon after deleting many is slower); else "n/a"."""
    try:
        src = subprocess.run(["findmnt", "-no", "SOURCE,FSTYPE", "--target", path], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, check=True).stdout.split()
        if len(src) < 2 or src[1] != "ext4":
            return "n/a"
        with open(f"/sys/fs/ext4/{os.path.basename(os.path.realpath(src[0]))}/journal_task") as f:
            return "no" if f.read().strip() == "<none>" else "yes"
    except (OSError, subprocess.CalledProcessError, IndexError):
        return "?"


def machine(tmp: str) -> dict:
    return {
        "commit": git_commit(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "tmp_dir": tmp,
        "tmp_fs": fs_type(tmp),
        "tmp_ext4_journal": ext4_journal(tmp),
        "loadavg_start": loadavg(),
        "tar": subprocess.run(["tar", "--version"], stdout=subprocess.PIPE, text=True).stdout.splitlines()[0],
    }


def print_table(rows: list[list[str]], align_right_from: int = 1) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for n, r in enumerate(rows):
        cells = [c.ljust(w) if i < align_right_from else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
        print("  ".join(cells).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


def write_json(path: str | None, data: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        print(f"\nJSON written to {path}")
