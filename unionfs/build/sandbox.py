"""RUN's sandbox: a command in its own mount, pid, uts and ipc namespaces, chrooted into
a container's mount, on the host's network.

``run`` starts ``python -m layerfs.unionfs.build.sandbox SPEC``. That process unshares the
namespaces, makes every mount private (nothing it mounts reaches the host), and forks
the step's first process, pid 1 of the new pid namespace: it mounts a fresh /proc, a
minimal /dev (a nodev tmpfs with the host's null, zero, full, random, urandom and tty
bound in, devpts and shm), /sys read-only, and binds
the build's resolv.conf and hosts over the image's, each at its path as resolved
inside the root (unionfs.inroot), then chroots, keeps only docker's default
capabilities (no CAP_SYS_ADMIN: no mount, no way back out of the chroot), takes the
step's user and execs the command. Those mounts live in the namespace only: they never reach the container's
upper layer, and they vanish with the namespace when the step ends. When pid 1 exits,
the kernel ends every process the step left behind.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass

from ..inroot import openat2_in_root
from ..syscalls import (CLONE_NEWIPC, CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWUTS, MS_BIND, MS_NODEV, MS_NOEXEC,
                        MNT_DETACH, MS_NOSUID, MS_PRIVATE, MS_RDONLY, MS_REC, check, libc, mount, umount,
                        unshare)

_PR_SET_PDEATHSIG = 1
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Exit statuses of the sandbox itself, as docker/runc use them.
CANNOT_START = 125
NOT_FOUND = 127


@dataclass(slots=True, frozen=True)
class RunSpec:
    """What one RUN executes, and where."""

    root: str  # the container's mount
    argv: list[str]
    env: list[str]  # KEY=VALUE
    workdir: str
    user: str  # USER: name or uid, optionally :group
    hostname: str
    resolv_conf: str  # host files bound over the image's
    hosts: str


def run(spec: RunSpec, output: Callable[[bytes], None]) -> int:
    """Run the step; its output (stdout and stderr, merged) goes to ``output`` as it
    comes; returns its exit status (128 + N if killed by signal N)."""
    env = {"PATH": os.environ.get("PATH", DEFAULT_PATH)}  # the interpreter finds layerfs itself
    proc = subprocess.Popen([sys.executable, "-m", "layerfs.unionfs.build.sandbox", json.dumps(asdict(spec))],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env, cwd="/")
    try:
        assert proc.stdout is not None
        while chunk := proc.stdout.read1(65536):
            output(chunk)
        return proc.wait()
    except BaseException:
        proc.terminate()  # the sandbox kills the step's processes on SIGTERM
        proc.wait()
        raise


# -- inside the sandbox process -------------------------------------------------------

def _target(root_fd: int, path: str, want_dir: bool) -> str | None:
    """A /proc/self/fd path naming ``path`` inside the root (resolved as the container
    would), if it is there and of the wanted type; mounting on it mounts on exactly that."""
    try:
        fd = openat2_in_root(root_fd, path, os.O_PATH)
    except OSError:
        return None
    mode = os.fstat(fd).st_mode
    if stat.S_ISDIR(mode) != want_dir or (not want_dir and not stat.S_ISREG(mode)):
        os.close(fd)
        return None
    return f"/proc/self/fd/{fd}"


_DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
# The capabilities a step keeps (docker's default set): no CAP_SYS_ADMIN (mount, and so
# no way out of the chroot), no module loading, no raw I/O, no ptrace of the host.
_KEEP_CAPS = frozenset({0, 1, 3, 4, 5, 6, 7, 8, 10, 13, 18, 27, 29, 31})
_PR_CAPBSET_DROP = 24


def _setup(spec: RunSpec) -> None:
    """Mount /proc, /dev, /sys, resolv.conf and hosts inside the root (as pid 1 of the
    new pid namespace, so /proc is this namespace's)."""
    root_fd = os.open(spec.root, os.O_RDONLY | os.O_DIRECTORY)
    target = _target(root_fd, "proc", True)
    if target:
        mount("proc", target, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    target = _target(root_fd, "dev", True)
    if target:
        # nodev: a node the step makes here opens nothing; the usual ones are the host's,
        # bound one by one (a bind keeps its source's mount flags).
        mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=755,size=65536k")
        # Resolved again: the old fd names the directory under the new tmpfs.
        dev = openat2_in_root(root_fd, "dev", os.O_RDONLY | os.O_DIRECTORY)
        for name in _DEVICES:
            os.close(os.open(name, os.O_WRONLY | os.O_CREAT, 0o666, dir_fd=dev))
            mount(f"/dev/{name}", f"/proc/self/fd/{dev}/{name}", None, MS_BIND)
        for name, to in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2"), ("ptmx", "pts/ptmx")):
            os.symlink(to, name, dir_fd=dev)
        os.mkdir("pts", 0o755, dir_fd=dev)
        os.mkdir("shm", 0o1777, dir_fd=dev)
        os.chmod("shm", 0o1777, dir_fd=dev)
        mount("devpts", f"/proc/self/fd/{dev}/pts", "devpts", MS_NOSUID | MS_NOEXEC,
               "newinstance,ptmxmode=0666,mode=0620")
        mount("shm", f"/proc/self/fd/{dev}/shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=1777,size=65536k")
        os.close(dev)
    target = _target(root_fd, "sys", True)
    if target:
        try:
            mount("sysfs", target, "sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
        except OSError:
            pass  # not every sandbox may mount sysfs; a build step rarely needs it
    for host, path in ((spec.resolv_conf, "etc/resolv.conf"), (spec.hosts, "etc/hosts")):
        target = _target(root_fd, path, False)
        if target:
            mount(host, target, None, MS_BIND)


def _passwd(path: str) -> list[list[str]]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return [line.rstrip("\n").split(":") for line in f if line.count(":") >= 3]
    except OSError:
        return []


def user_ids(user: str) -> tuple[int, int, list[int], str]:
    """(uid, gid, supplementary groups, home) of USER ``name|uid[:group|gid]``, read from
    the image's /etc/passwd and /etc/group (after the chroot), as docker does."""
    name, _, group = (user or "0").partition(":")
    users = _passwd("/etc/passwd")
    groups = _passwd("/etc/group")
    entry = next((u for u in users if u[0] == name or (name.isdigit() and u[2] == name)), None)
    if entry is None and not name.isdigit():
        raise LookupError(f"unable to find user {name}: no matching entries in /etc/passwd")
    uid = int(name) if name.isdigit() else int(entry[2])
    gid = int(entry[3]) if entry is not None and entry[3].isdigit() else 0
    home = entry[5] if entry is not None and len(entry) > 5 else "/"
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            g = next((g for g in groups if g[0] == group), None)
            if g is None:
                raise LookupError(f"unable to find group {group}: no matching entries in /etc/group")
            gid = int(g[2])
        return uid, gid, [gid], home
    login = entry[0] if entry is not None else None
    extra = [int(g[2]) for g in groups if login and len(g) > 3 and login in g[3].split(",") and g[2].isdigit()]
    return uid, gid, sorted({gid, *extra}), home


# pivot_root(2) has no libc wrapper everywhere; its number per architecture.
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}


def _pivot(root: str) -> None:
    """Make ``root`` the namespace's root and drop the host's tree from it (as runc
    does), then chroot there: a chroot alone can be left by a root process, a namespace
    whose only tree is the container's cannot."""
    number = _SYS_PIVOT_ROOT.get(platform.machine())
    old = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.chdir(root)
        if number is not None:
            check(libc.syscall(number, b".", b"."), "pivot_root")
            os.fchdir(old)  # the old root is stacked on the new one: detach it
            mount("none", ".", None, MS_REC | MS_PRIVATE)
            umount(".", MNT_DETACH)
            os.chdir("/")
        os.chroot(".")
    finally:
        os.close(old)


def _child(spec: RunSpec) -> None:
    """pid 1 of the step: set up, chroot, drop to the user, exec (never returns)."""
    try:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        _setup(spec)
        hostname = spec.hostname.encode()
        check(libc.sethostname(hostname, len(hostname)), "sethostname")
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last_cap = int(f.read())
        _pivot(spec.root)
        for cap in range(last_cap + 1):
            if cap not in _KEEP_CAPS:
                check(libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0), f"dropping capability {cap}")
        uid, gid, groups, home = user_ids(spec.user)
        os.makedirs(spec.workdir or "/", exist_ok=True)
        os.chdir(spec.workdir or "/")
        env = dict(e.split("=", 1) if "=" in e else (e, "") for e in spec.env)
        env.setdefault("PATH", DEFAULT_PATH)
        env.setdefault("HOSTNAME", spec.hostname)
        env.setdefault("HOME", home)
        os.setgroups(groups)
        os.setgid(gid)
        os.setuid(uid)
    except (OSError, LookupError) as e:
        sys.stderr.write(f"layerfs build: cannot start the step: {e}\n")
        sys.stderr.flush()
        os._exit(CANNOT_START)
    try:
        os.execvpe(spec.argv[0], spec.argv, env)
    except OSError as e:
        sys.stderr.write(f"layerfs build: {spec.argv[0]}: {e.strerror}\n")
        sys.stderr.flush()
        os._exit(NOT_FOUND if e.errno == 2 else 126)


def _main() -> None:
    spec = RunSpec(**json.loads(sys.argv[1]))
    try:
        unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWUTS | CLONE_NEWIPC)
        mount("none", "/", None, MS_REC | MS_PRIVATE)
    except OSError as e:
        sys.stderr.write(f"layerfs build: cannot make the step's namespaces (root is needed): {e}\n")
        sys.exit(CANNOT_START)
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        _child(spec)

    def stop(signum, frame):  # pid 1 going takes every process of the step with it
        os.kill(pid, signal.SIGKILL)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    code = os.waitstatus_to_exitcode(status)
    sys.exit(code if code >= 0 else 128 - code)


if __name__ == "__main__":
    _main()
