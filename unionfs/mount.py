"""Mount lifecycle: start a serving process, wait until the mount serves, unmount.

``mount`` forks its serving process (it has everything imported already: no second Python
start-up), in its own session, and returns only once the kernel has sent FUSE INIT (the
child reports through a pipe); a caller with threads running cannot fork safely, and starts
``python -m layerfs.unionfs.mount`` instead. ``umount`` works also when the serving process was killed: the kernel
keeps a dead FUSE mount ("Transport endpoint is not connected") until it is unmounted.
With ``backend="kernel"`` there is no serving process: the kernel's overlayfs serves the
container (unionfs/kernel.py), and the same calls mount, list, unmount and commit it.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import select
import shutil
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace

from layerfs.store import Store, StoreError
from layerfs.store.containers import ANONYMOUS, KERNEL_FORMAT, READ_ONLY, REMOVE_AT_UMOUNT, Container, Volume
from layerfs.store.fstree import raise_open_file_limit
from layerfs.store.records import ImageRecord
from layerfs.store.leases import process_start

from . import fusecheck, kernel
from .freeze import frozen
from .fusecheck import MountError
from .volumes import attach as attach_volumes, detach as detach_volumes

READY_TIMEOUT = 30.0


def mounted_fuse(mountpoint: str) -> bool:
    """True if ``mountpoint`` is a mount point of a FUSE filesystem (live or dead)."""
    target = os.path.realpath(mountpoint)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            mnt = fields[4].encode().decode("unicode_escape")
            fstype = fields[fields.index("-") + 1]
            if mnt == target and fstype.startswith("fuse"):
                return True
    return False


def is_mount_point(path: str) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4].encode().decode("unicode_escape") == target for line in f)


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def server_alive(c: Container) -> bool:
    """The container's serving process still runs (the same process, not a reused pid)."""
    return pid_alive(c.pid) and process_start(c.pid) == c.pid_start


def mount_alive(c: Container) -> bool:
    """Its serving process still runs, or the kernel backend's overlay is still there."""
    return server_alive(c) or kernel.mounted(c)


def state(c: Container) -> str:
    """created, mounted, or dead (mounted, but the serving process is gone)."""
    if not c.mountpoint:
        return "created"
    if mount_alive(c):
        return "mounted"
    return "dead" if mounted_fuse(c.mountpoint) else "created"


# Options that decide who a mount exposes its files to, and how (see SECURITY.md).
EXPOSURE_OPTIONS = ("allow_other", "suid", "nosuid", "dev", "nodev")


def only_owner_reaches(path: str, uid: int) -> bool:
    """True if a directory above ``path`` is owned by ``uid`` and no other user may
    search it (group search allowed only for group 0): nobody else can walk to ``path``,
    as nobody else can walk into /var/lib/docker or /var/lib/containers/storage."""
    p = os.path.realpath(path)
    while p != "/":
        p = os.path.dirname(p)
        st = os.stat(p)
        if st.st_uid == uid and not st.st_mode & 0o001 and (not st.st_mode & 0o010 or st.st_gid == 0):
            return True
    return False


def exposure(mountpoint: str, requested: dict) -> dict[str, bool]:
    """The FUSE options for who may use a mount (allow_other) and whether setuid bits and
    device nodes work in it, from what the caller asked for (``requested`` loses these
    keys).

    Root's mount honours setuid bits and device nodes, and lets every uid in (the
    processes of a container run as any uid), only where no other host user can reach
    it: at a mountpoint below a directory only root may search, as docker and podman
    mount their containers. Elsewhere it is root's alone, unless asked: ``allow_other``
    opens it to everyone, and then setuid bits and devices stay off unless ``suid`` or
    ``dev`` is asked for too. A user's mount never has them (fusermount forbids it).
    """
    asked = {k: requested.pop(k) for k in EXPOSURE_OPTIONS if k in requested}
    for k, v in asked.items():
        if v is not True:
            raise MountError(f"option {k} takes no value (got {k}={v})")
    if os.geteuid() != 0:
        if asked.get("suid") or asked.get("dev"):
            raise MountError("only root can mount with setuid bits or device nodes honoured")
        return {"allow_other": asked.get("allow_other", False), "nosuid": True, "nodev": True}
    private = only_owner_reaches(mountpoint, 0)
    allow_other = asked.get("allow_other", private)
    exposed = allow_other and not private
    out = {"allow_other": allow_other}
    for on, off in (("suid", "nosuid"), ("dev", "nodev")):
        enabled = asked[on] if on in asked else (not asked[off] if off in asked else not exposed)
        out[on if enabled else off] = True
    return out


def mount_access(mountpoint: str) -> dict[str, bool] | None:
    """How a live mount is exposed, as the kernel has it: allow_other, suid, dev."""
    target = os.path.realpath(mountpoint)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4].encode().decode("unicode_escape") != target:
                continue
            per_mount = fields[5].split(",")
            sep = fields.index("-")
            super_opts = fields[sep + 3].split(",")
            # Only FUSE keeps other users out of a mount (allow_other); the kernel's
            # overlay lets every user in, as far as file permissions allow.
            everyone = "allow_other" in super_opts or not fields[sep + 1].startswith("fuse")
            return {"allow_other": everyone, "suid": "nosuid" not in per_mount,
                    "dev": "nodev" not in per_mount}
    return None


def backend_of(c: Container) -> str | None:
    """Which backend serves the container's mount now: "fuse", "kernel", or None."""
    if not c.mountpoint:
        return None
    if kernel.mounted(c):
        return "kernel"
    return "fuse" if server_alive(c) or mounted_fuse(c.mountpoint) else None


def parse_options(items: list[str] | tuple[str, ...]) -> dict[str, str | bool]:
    """``-o a,b=c`` options (given once or repeated) as {"a": True, "b": "c"}."""
    opts: dict[str, str | bool] = {}
    for item in items:
        for opt in item.split(","):
            if opt:
                k, sep, v = opt.partition("=")
                opts[k] = v if sep else True
    return opts


def spawn_server(cmd: list[str], log) -> tuple[subprocess.Popen, int]:
    """Start a serving process (``cmd --ready-fd N``) in its own session; returns it and
    the pipe on which it reports (see wait_ready)."""
    r, w = os.pipe()
    try:
        proc = subprocess.Popen(cmd + ["--ready-fd", str(w)], pass_fds=(w,), stdin=subprocess.DEVNULL,
                                stdout=log, stderr=log, start_new_session=True, cwd="/")
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
    return proc, r


class ForkedServer:
    """A forked serving process, with the calls of subprocess.Popen that its starters make."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        if self.returncode is None:
            self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        return self.returncode

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)


Server = subprocess.Popen | ForkedServer  # a serving process, spawned or forked


def can_fork() -> bool:
    """Whether this process may fork a serving process: not with other threads running
    (a lock one of them holds would stay held in the child forever)."""
    return threading.active_count() == 1


def fork_server(serve: Callable[[Callable[[str], None]], int], log) -> tuple[ForkedServer, int]:
    """Fork a serving process that runs ``serve(report)`` in its own session, its output
    going to ``log``; returns it and the pipe on which it reports (see wait_ready).

    The child leaves with os._exit: it never returns into the caller, never runs its
    exit handlers, and never touches the caller's objects (an LMDB environment must not
    be used across fork: ``serve`` opens its own store)."""
    r, w = os.pipe()
    _flush_output()  # or the child would write the parent's buffered output again
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            _become_server(log.fileno(), w)
            code = serve(reporter(w))
        except BaseException:  # noqa: BLE001 - the log says why; the parent heard one line
            with contextlib.suppress(BaseException):
                import traceback

                traceback.print_exc()
        finally:
            _flush_output()
            os._exit(code)
    os.close(w)
    return ForkedServer(pid), r


def _flush_output() -> None:
    for f in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            f.flush()


def _become_server(log_fd: int, ready_fd: int) -> None:
    """In a forked child: what exec'ing ``python -m layerfs.unionfs.mount`` from
    subprocess would give it. Its own session, "/" as cwd, stdin from /dev/null, output
    to the log, only the ready pipe open besides, Python's default signal handlers."""
    os.setsid()
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    # The parent's files stay open in Python objects of its frames, which the child never
    # unwinds; gc.freeze keeps the collector from ever closing one (its number may be
    # another file's by then).
    gc.freeze()
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd != ready_fd:
            with contextlib.suppress(OSError):
                os.close(fd)
    for sig in signal.valid_signals():  # a caller's handler (build's SIGTERM) is not the server's
        handler = signal.getsignal(sig)
        if callable(handler) and handler is not signal.default_int_handler:
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
    signal.set_wakeup_fd(-1)


def reporter(fd: int | None) -> Callable[[str], None]:
    """``report(message)``: write the serving process's one line to its parent, once."""
    def report(message: str) -> None:
        nonlocal fd
        if fd is not None:
            try:
                os.write(fd, (message + "\n").encode())
                os.close(fd)
            except OSError:
                pass
            fd = None
    return report


def _check_mountpoint(mountpoint: str) -> str:
    """The mountpoint's absolute path, if a mount there can be tried at all."""
    path = os.path.abspath(mountpoint)
    dead = MountError(f"mountpoint {mountpoint} is busy: a mount whose server died is still there "
                      f"(layerfs umount {mountpoint})")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise MountError(f"mountpoint {mountpoint} does not exist") from None
    except OSError as e:
        raise (dead if e.errno == errno.ENOTCONN else MountError(f"mountpoint {mountpoint}: {e.strerror}")) from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(f"mountpoint {mountpoint} is not a directory")
    if is_mount_point(path):
        try:
            os.statvfs(path)  # a dead FUSE mount may still stat from the kernel's cache; not this
        except OSError as e:
            if e.errno == errno.ENOTCONN:
                raise dead from None
        raise MountError(f"mountpoint {mountpoint} is busy: something is mounted there already")
    return path


def mount(store: Store, ref: str, mountpoint: str, *, read_only: bool = False,
          options: dict | None = None, volatile: bool = False, backend: str = "fuse",
          volumes: tuple[Volume, ...] = (), remove_at_umount: bool = False,
          on_serving: Callable[[Container, bool], None] | None = None) -> Container:
    """Mount a container (or a new one of an image, removed at umount if
    ``remove_at_umount``) at ``mountpoint`` in the background, served by ``backend``
    (fuse, kernel, or auto: kernel where it can), with the container's volumes and
    ``volumes`` bound over it (unionfs.volumes). ``on_serving(container, made here)``
    hears of it once the mount serves. A failed mount leaves nothing."""
    path = _check_mountpoint(mountpoint)
    c, made, backend = _container_and_backend(store, ref, read_only, backend, options, False,
                                              remove_at_umount)
    if backend == "kernel":
        c = _mount_kernel(store, c, made, path, read_only=read_only, options=options or {},
                          volatile=volatile)
        return _serving(store, c, made, path, volumes, on_serving)
    c = _claim(store, c, made, path)
    read_only = read_only or c.read_only
    cmd = [sys.executable, "-m", "layerfs.unionfs.mount", "--root", store.root, "--container", c.id,
           "--mountpoint", path]
    if read_only:
        cmd.append("--read-only")
    if volatile:
        cmd.append("--volatile")
    for k, v in (options or {}).items():
        cmd += ["-o", k if v is True else f"{k}={v}"]
    log_path = os.path.join(store.containers.dir, c.id, "mount.log")
    try:
        with open(log_path, "ab") as log:
            if can_fork():
                root, cid = store.root, c.id
                with store.index.closed():
                    proc, ready = fork_server(
                        lambda report: _serve(root, cid, path, read_only=read_only, volatile=volatile,
                                              options=dict(options or {}), report=report), log)
            else:
                proc, ready = spawn_server(cmd, log)
        try:
            # The server is the container's from now on (the claim named this process): the
            # record is written while it starts, not after.
            c = store.containers.set_mount(c, path, proc.pid)
            message = wait_ready(ready, proc)
        finally:
            os.close(ready)
        if message != "ready":
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # it may still be starting: it must not mount later
            except ProcessLookupError:
                pass
            proc.wait()
            raise MountError(message or f"the serving process exited ({proc.returncode}): "
                                        f"{_last_line(log_path)}")
    except OSError as e:
        _mount_ended(store, c, remove=made)
        raise MountError(f"cannot start the serving process {cmd[0]}: {e.strerror}") from None
    except BaseException:
        _mount_ended(store, c, remove=made)
        raise
    return _serving(store, c, made, path, volumes, on_serving)


def _serving(store: Store, c: Container, made: bool, path: str, volumes: tuple[Volume, ...],
             on_serving: Callable[[Container, bool], None] | None) -> Container:
    """Bind the container's volumes and ``volumes`` over its new mount at ``path``, then
    tell ``on_serving``; a mount whose volumes cannot be bound is undone."""
    if c.volumes or volumes:
        try:
            attach_volumes(path, c.volumes + tuple(volumes))
        except OSError as e:
            umount(store, c.id)
            left = store.containers.find(c.id) if made else None  # --rm may have removed it
            if left is not None:
                store.containers.remove(left)
            raise MountError(f"cannot bind the volumes: {e.strerror or e}") from None
    if on_serving is not None:
        on_serving(c, made)
    return c


def _last_line(path: str) -> str:
    """The last line of a serving process's log (it goes with its container)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
            lines = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    return lines[-1] if lines else "it said nothing"


def _container_and_backend(store: Store, ref: str, read_only: bool, backend: str, options: dict | None,
                           foreground: bool, remove_at_umount: bool) -> tuple[Container, bool, str]:
    """The container to mount (made here or not) and the backend that will serve it; a
    container made here is removed again if no backend can."""
    c, made = container_for(store, ref, read_only, remove_at_umount)
    try:
        chosen = kernel.choose_backend(store, c, backend, options or {}, foreground)
        why = fusecheck.problem(options or {}) if chosen == "fuse" else None
        if why:
            raise MountError(why)
        return c, made, chosen
    except StoreError:
        if made:
            store.containers.remove(c)
        raise


def _mount_kernel(store: Store, c: Container, made: bool, path: str, *, read_only: bool,
                  options: dict, volatile: bool) -> Container:
    # A kernel mount is open to every user (there is no allow_other to withhold): setuid
    # bits and devices follow the policy of an allow_other FUSE mount (see exposure).
    requested = {**options, "allow_other": True}
    flags = exposure(path, requested)
    flags.pop("allow_other")
    c = _claim(store, c, made, path, flags=KERNEL_FORMAT)
    try:
        kernel.mount_container(store, c, path, read_only=read_only or c.read_only,
                               options={**requested, **flags}, volatile=volatile)
    except BaseException:
        _mount_ended(store, c, remove=made)
        raise
    return store.containers.set_mount(c, path, 0)


def mount_foreground(store: Store, ref: str, mountpoint: str, *, read_only: bool = False,
                     options: dict | None = None, volatile: bool = False, backend: str = "fuse",
                     remove_at_umount: bool = False,
                     on_serving: Callable[[Container, bool], None] | None = None) -> None:
    """Mount and serve in this process until unmounted (the fuse backend only; the rest
    as :func:`mount`)."""
    path = _check_mountpoint(mountpoint)
    c, made, _ = _container_and_backend(store, ref, read_only, backend, options, True, remove_at_umount)
    c = _claim(store, c, made, path)
    served = threading.Event()

    def ready() -> None:
        served.set()
        if on_serving is not None:
            on_serving(c, made)

    try:
        serve_container(store, c, path, read_only=read_only or c.read_only, volatile=volatile,
                        options=options or {}, on_ready=ready)
    finally:
        # A container made here for a mount that never served holds nothing: it goes.
        _mount_ended(store, c, made and not served.is_set())


def _claim(store: Store, c: Container, made: bool, path: str, flags: int = 0) -> Container:
    """Claim ``c`` for a mount at ``path``; a container made for it goes if it cannot be."""
    try:
        return store.containers.claim(c, path, mount_alive, flags=flags)
    except BaseException:
        if made:
            store.containers.remove(c)
        raise


def _mount_ended(store: Store, c: Container, remove: bool = False) -> None:
    """Record that the container's mount ended; remove the container if ``remove``, or if
    it was mounted with --rm or is an image's read-only view (nothing to keep; those are
    made only by mount --read-only IMAGE, and older ones lack the flag)."""
    if remove or c.remove_at_umount or c.read_only:
        store.containers.remove(c)
    else:
        store.containers.set_mount(c, "", 0)


def until_ready(started: tuple[Server, int]) -> tuple[Server, str]:
    """A server that fork_server or spawn_server ``started``, and its first report (see
    wait_ready); the report pipe is closed."""
    proc, fd = started
    try:
        return proc, wait_ready(fd, proc)
    finally:
        os.close(fd)


def wait_ready(fd: int, proc: Server) -> str:
    """The serving process's first report on ``fd``: ``ready``, or why it failed ("" if it
    exited or timed out saying nothing)."""
    deadline = time.monotonic() + READY_TIMEOUT
    buf = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buf += chunk
            if b"\n" in buf:
                break
        elif proc.poll() is not None:
            break
    return buf.decode(errors="replace").strip()


def container_for(store: Store, ref: str, read_only: bool,
                  remove_at_umount: bool = False) -> tuple[Container, bool]:
    """The container ``ref`` names, or a new anonymous one of the image ``ref`` names
    (removed when its mount ends if ``remove_at_umount`` or ``read_only``); and whether
    it was made here."""
    c = store.containers.find(ref)
    if c is not None:
        if remove_at_umount:
            raise MountError(f"--rm removes a container that mount makes from an image; {ref} is "
                             f"the container {c.name} (layerfs rm it after umount)")
        return c, False
    flags = ANONYMOUS | (READ_ONLY if read_only else 0) | (REMOVE_AT_UMOUNT if remove_at_umount or read_only else 0)
    return store.create_container(ref, flags=flags), True


def prune_containers(store: Store, dry_run: bool = False) -> list[Container]:
    """Remove the anonymous containers (made by mount IMAGE) whose mount has ended; one
    that a mount claims meanwhile is kept. Returns those removed (or, dry, to remove)."""
    out = []
    for c in store.containers.list():
        if c.anonymous and state(c) == "created" and (dry_run or store.containers.remove(c, if_unchanged=True)):
            out.append(c)
    return out


def umount(store: Store, target: str) -> Container | None:
    """Unmount a mountpoint or a container's mount; works after the server died."""
    c = store.containers.find(target) if not os.path.isdir(target) else None
    if c is None:
        c = store.containers.by_mountpoint(target)
    mountpoint = c.mountpoint if c is not None and c.mountpoint else os.path.abspath(target)
    if c is not None and kernel.mounted(c):
        detach_volumes(mountpoint)  # an overlay with mounts on it is busy
        kernel.umount(store, c)
    elif not mounted_fuse(mountpoint):
        if c is None or not c.mountpoint:
            raise MountError(f"{target} is not mounted")
    else:
        detach_volumes(mountpoint)  # fusermount refuses a mount with mounts on it
        res = subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True, text=True)
        if res.returncode != 0:
            lazy = subprocess.run(["umount", "-l", mountpoint], capture_output=True, text=True)
            if lazy.returncode != 0:
                raise MountError(f"cannot unmount {mountpoint}: {res.stderr.strip() or lazy.stderr.strip()}")
    if c is not None:
        if c.pid and process_start(c.pid) == c.pid_start:  # running, or a zombie of this process's
            _reap(c.pid)  # it removes a --rm container itself as its mount ends
        _mount_ended(store, c)
        c = replace(c, mountpoint="", pid=0, pid_start=0)
    return c


def remove(store: Store, ref: str, force: bool = False) -> Container:
    """Remove a container and its upper layer; a mounted one only with ``force``
    (it is unmounted first)."""
    c = store.containers.get(ref)
    if state(c) != "created":
        if not force:
            raise MountError(f"container {c.name} is mounted at {c.mountpoint}; umount it or use -f")
        c = umount(store, c.id) or c
    store.containers.remove(c)
    return c


def commit(store: Store, ref: str, freeze: str | None = None, **kwargs) -> ImageRecord:
    """Commit a container (see store.commit), holding its writes while it runs if it is
    mounted, as docker commit pauses the container: the fuse backend holds every change
    itself; a kernel-backend mount has no such gate, so the processes of the cgroup
    ``freeze`` are frozen instead (and the upper synced), and without one it is refused."""
    from layerfs.store.commit import commit as commit_container

    c = store.containers.get(ref)
    with frozen(freeze) if freeze else contextlib.nullcontext():
        if kernel.mounted(c):
            if not freeze:
                raise MountError(
                    f"container {c.name} is mounted with the kernel backend, whose writes layerfs "
                    f"cannot hold: give --freeze CGROUP (the cgroup of the processes that write to "
                    f"it, as docker pause freezes a container's), or unmount it first")
            kernel.sync(c.mountpoint)
            return commit_container(store, c, **kwargs)
        with paused(c):
            return commit_container(store, c, **kwargs)


def _reap(pid: int, timeout: float = 10.0) -> None:
    """Wait for the serving process to exit after its mount went away."""
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    if pid_alive(pid):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):  # forked by this process: no zombie left
        os.waitpid(pid, 0)


def serve_container(store: Store, c: Container, mountpoint: str, *, read_only: bool,
                    volatile: bool, options: dict, on_ready=None) -> None:
    """Serve a container's union view at ``mountpoint`` until unmounted (blocks)."""
    from .fuse_ops import serve
    from .lower import StoreLower
    from .markers import OverlayMarkers
    from .view import UnionView

    # A container may hold as many files open as the host allows (fuse-overlayfs does
    # the same): the serving process holds one fd per open file, plus its own.
    raise_open_file_limit()
    work = store.containers.work(c)
    for leftover in os.listdir(work):  # half-built copy-ups of a process that died
        path = os.path.join(work, leftover)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    image = store.resolve_image(c.image_id)
    lower = StoreLower(store.tree(image), store.blobs)
    # An upper the kernel backend wrote stays in the kernel's format (with metacopy, as
    # the kernel mounts it), so either backend can mount the container next.
    markers = OverlayMarkers(metacopy=True) if c.kernel_format else None
    view = UnionView(lower, store.containers.upper(c), store.containers.work(c),
                     volatile=volatile, read_only=read_only, markers=markers)

    def serving() -> None:
        if on_ready is not None:
            on_ready()
        # The pause server starts once the mount serves, off the path to it (its socket
        # import is ~2 ms of every mount); paused() waits for it meanwhile.
        threading.Thread(target=_control_server, args=(c.id, view), daemon=True).start()

    fusecheck.serve_or_explain(
        lambda ready: serve(view, mountpoint, foreground=True, options=options, on_ready=ready),
        mountpoint, serving)


def _control_address(container_id: str) -> str:
    # Abstract socket namespace: no path-length limit from deep store roots, nothing to clean up.
    return "\0layerfs-" + container_id


def _control_server(container_id: str, view) -> None:
    """Serve pause requests: "pause" holds every change until "resume" or a hang-up."""
    import socket
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(_control_address(container_id))
    srv.listen(4)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=_control_session, args=(conn, view), daemon=True).start()


def _control_session(conn, view) -> None:
    import socket

    with conn:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _, uid, _ = struct.unpack("3i", creds)
        if uid not in (0, os.geteuid()):
            return
        f = conn.makefile("rwb", buffering=0)
        if f.readline().strip() != b"pause":
            return
        view.gate.pause()
        try:
            f.write(b"paused\n")
            f.readline()  # "resume", or EOF when the committing process went away
        finally:
            view.gate.resume()


@contextlib.contextmanager
def paused(c: Container):
    """Hold a mounted container's changes while the block runs (a no-op if unmounted)."""
    if state(c) != "mounted":
        yield
        return
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            try:
                sock.connect(_control_address(c.id))
                break
            except ConnectionRefusedError:
                # Nothing listens yet: a server starts its pause server just after its
                # mount serves (serve_container).
                if time.monotonic() < deadline and server_alive(c):
                    time.sleep(0.005)
                    continue
                raise MountError(f"cannot reach the mount of {c.name} to pause it: nothing listens") from None
            except OSError as e:
                raise MountError(f"cannot reach the mount of {c.name} to pause it: {e.strerror}") from None
        sock.sendall(b"pause\n")
        sock.settimeout(60)
        reply = sock.makefile("rb").readline()
        if reply.strip() != b"paused":
            raise MountError(f"the mount of {c.name} did not pause")
        try:
            yield
        finally:
            sock.sendall(b"resume\n")


def _serve(root: str, container_id: str, mountpoint: str, *, read_only: bool, volatile: bool,
           options: dict, report: Callable[[str], None]) -> int:
    """The serving process: open the store, serve the container until unmounted, tell the
    parent through ``report`` that the mount serves, or in one line why not; returns the
    exit status."""
    try:
        with Store(root, create=False) as store:
            c = store.containers.get(container_id)
            served = threading.Event()

            def ready() -> None:
                served.set()
                report("ready")

            serve_container(store, c, mountpoint, read_only=read_only, volatile=volatile,
                            options=options, on_ready=ready)
            if served.is_set() and c.remove_at_umount:  # unmounted, by layerfs or not
                _mount_ended(store, c)
    except StoreError as e:
        report(f"{e}")
        return 1
    except Exception as e:  # noqa: BLE001 - the parent must hear why, in one line
        report(f"the mount failed: {e}")
        raise
    report("the mount ended before it served")
    return 0


def _main() -> None:
    import argparse

    p = argparse.ArgumentParser(description="layerfs serving process (started by layerfs mount)")
    p.add_argument("--root", required=True)
    p.add_argument("--container", required=True)
    p.add_argument("--mountpoint", required=True)
    p.add_argument("--ready-fd", type=int)
    p.add_argument("--read-only", action="store_true")
    p.add_argument("--volatile", action="store_true")
    p.add_argument("-o", action="append", default=[])
    args = p.parse_args()
    sys.exit(_serve(args.root, args.container, args.mountpoint, read_only=args.read_only,
                    volatile=args.volatile, options=parse_options(args.o), report=reporter(args.ready_fd)))


if __name__ == "__main__":
    _main()
