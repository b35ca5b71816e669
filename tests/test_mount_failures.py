"""A mount that cannot be made says why in one line, in the background and in the
foreground (-f), and leaves nothing behind: no container, no mount, no process.

The user's cases run as uid 65534 (setpriv) on a store of theirs, in a private mount
namespace (unshare) where /dev/fuse and /etc/fuse.conf are replaced by bind mounts of
test files, so that the machine's own are never changed.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import stat
import subprocess
import sys
import time

import pytest

from helpers import NOBODY, as_nobody, assert_one_line_error, make_tar

EXE = os.path.join(os.path.dirname(sys.executable), "layerfs")
SETPRIV = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]

pytestmark = [pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse"),
              pytest.mark.skipif(os.geteuid() != 0, reason="acting as a second user needs root")]

ALLOW_OTHER = ("layerfs: -o {} is refused to users other than root unless /etc/fuse.conf has a line "
               "user_allow_other")
NO_ACCESS = "layerfs: no access to /dev/fuse (crw------- root:root) for uid 65534"


class User:
    """uid 65534 with a store of its own (image app:1) and a mountpoint it owns, and
    device and fuse.conf files to bind over the machine's."""

    def __init__(self, home: str) -> None:
        self.home = home
        self.root = os.path.join(home, "store")
        self.mnt = os.path.join(home, "mnt")
        self.env = dict(os.environ, HOME=home, LAYERFS_ROOT=self.root)

    def run(self, *args: str, binds: dict[str, str] | None = None, script: str | None = None):
        """``layerfs ARGS`` as the user (or a shell ``script`` as root, with $L running
        layerfs as the user), in a mount namespace where ``binds`` (target -> source)
        are bind-mounted."""
        lines = [f"mount --bind {shlex.quote(src)} {shlex.quote(dst)}" for dst, src in (binds or {}).items()]
        user = " ".join(SETPRIV + [EXE])
        lines.append(script if script is not None else f"exec {user} " + " ".join(map(shlex.quote, args)))
        env = dict(self.env, L=user, MNT=self.mnt)
        return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-euc", "\n".join(lines)],
                              capture_output=True, env=env, timeout=120, cwd=self.home)

    def containers(self) -> list[dict]:
        proc = as_nobody(EXE, "ps", "--json", env=self.env)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def device(self, mode: int) -> str:
        path = os.path.join(self.home, f"fuse-{mode:o}")
        if not os.path.exists(path):
            os.mknod(path, stat.S_IFCHR | mode, os.makedev(10, 229))
            os.chmod(path, mode)
        return path

    def fuse_conf(self, text: str, mode: int = 0o644) -> str:
        path = os.path.join(self.home, f"fuse.conf-{len(os.listdir(self.home))}")
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, mode)
        return path


@pytest.fixture
def user(public_dir, tmp_path) -> User:
    home = os.path.join(public_dir, "home")
    os.mkdir(home)
    os.chown(home, NOBODY, NOBODY)
    u = User(home)
    tar = make_tar(os.path.join(home, "app.tar"), [("etc", "d"), ("etc/hostname", "f", "app\n")])
    os.chmod(tar, 0o644)
    proc = as_nobody(EXE, "import-layer", tar, "-t", "app:1", env=u.env)
    assert proc.returncode == 0, proc.stderr
    as_nobody("mkdir", u.mnt)
    return u


def _nobody_spawns_this_python() -> bool:
    """Whether a process of uid 65534 can start this venv's python (the background
    serving process): not where the interpreter lies below a directory only root may
    search (a pyenv under /root), which CI's Debian python never does."""
    probe = "import subprocess, sys; subprocess.run([sys.executable, '-c', ''], check=True)"
    return as_nobody(sys.executable, "-c", probe).returncode == 0


needs_user_spawn = pytest.mark.skipif(not _nobody_spawns_this_python(),
                                      reason="uid 65534 cannot start this venv's python from its own process")


def _nothing_left(user: User) -> None:
    assert user.containers() == []
    assert os.listdir(user.mnt) == []


@pytest.mark.parametrize("fg", [[], ["-f"]], ids=["background", "foreground"])
def test_no_access_to_dev_fuse(user, fg):
    proc = user.run("mount", *fg, "app:1", user.mnt, binds={"/dev/fuse": user.device(0o600)})
    line = assert_one_line_error(proc)
    assert line.startswith(NO_ACCESS), line
    _nothing_left(user)


@pytest.mark.parametrize("fg", [[], ["-f"]], ids=["background", "foreground"])
@pytest.mark.parametrize("option", ["allow_other", "allow_root"])
def test_allow_other_refused_by_fuse_conf(user, fg, option):
    binds = {"/dev/fuse": user.device(0o666), "/etc/fuse.conf": user.fuse_conf("# mount_max = 1000\n")}
    proc = user.run("mount", *fg, "app:1", user.mnt, "-o", option, binds=binds)
    assert assert_one_line_error(proc) == ALLOW_OTHER.format(option)
    _nothing_left(user)


@pytest.mark.parametrize("fg", [pytest.param([], marks=needs_user_spawn), ["-f"]],
                         ids=["background", "foreground"])
def test_allow_other_refused_by_fusermount_itself(user, fg):
    """A fuse.conf the user cannot read is read by fusermount3 (setuid root) alone: its
    refusal, printed by libfuse's helper, becomes the same one line."""
    binds = {"/dev/fuse": user.device(0o666),
             "/etc/fuse.conf": user.fuse_conf("# no user_allow_other\n", mode=0o600)}
    proc = user.run("mount", *fg, "app:1", user.mnt, "-o", "allow_other", binds=binds)
    assert assert_one_line_error(proc) == ALLOW_OTHER.format("allow_other")
    _nothing_left(user)


@pytest.mark.parametrize("fg", [pytest.param([], marks=needs_user_spawn), ["-f"]],
                         ids=["background", "foreground"])
def test_libfuse_own_message(user, fg, public_dir):
    """What layerfs cannot name itself is libfuse's (here fusermount3's) own message."""
    roots = os.path.join(public_dir, "roots")
    os.mkdir(roots, 0o755)
    proc = user.run("mount", *fg, "app:1", roots, binds={"/dev/fuse": user.device(0o666)})
    assert assert_one_line_error(proc) == (
        f"layerfs: the mount failed: fusermount3: user has no write access to mountpoint {roots}")
    _nothing_left(user)


_SERVE_AND_UMOUNT = """
$L mount -f --rm app:1 "$MNT" -o allow_other 2>"$MNT.err" &
pid=$!
for i in $(seq 300); do grep -q " $MNT " /proc/self/mountinfo && break; sleep 0.1; done
grep " $MNT " /proc/self/mountinfo | sed 's/.* - //' | cut -d' ' -f1,3
{setpriv} cat "$MNT/etc/hostname"
$L umount "$MNT"
wait $pid
"""


def test_allow_other_with_user_allow_other_mounts(user):
    """The positive case beside the refusals: fuse.conf allows it, the user's foreground
    mount serves with allow_other, and --rm leaves nothing once unmounted."""
    binds = {"/dev/fuse": user.device(0o666), "/etc/fuse.conf": user.fuse_conf("user_allow_other\n")}
    proc = user.run(script=_SERVE_AND_UMOUNT.format(setpriv=" ".join(SETPRIV)), binds=binds)
    assert proc.returncode == 0, proc.stderr
    fstype, super_opts = proc.stdout.decode().splitlines()[0].split()
    assert fstype == "fuse.layerfs" and "allow_other" in super_opts.split(",")
    assert "user_id=65534" in super_opts.split(",")
    assert proc.stdout.decode().splitlines()[1:] == ["app"]
    with open(user.mnt + ".err") as f:
        err = f.read()
    assert err.startswith("layerfs: made container layerfs-") and err.count("\n") == 1, err
    _nothing_left(user)


# -- the mountpoint, as root ----------------------------------------------------------------------


@pytest.fixture
def image(layerfs, tmp_path) -> str:
    tar = make_tar(str(tmp_path / "app.tar"), [("etc", "d"), ("etc/hostname", "f", "app\n")])
    layerfs("import-layer", tar, "-t", "app:1", check=True)
    return "app:1"


def _ps(layerfs) -> list[str]:
    return [c["id"] for c in json.loads(layerfs("ps", "--json", check=True).stdout)]


@pytest.mark.parametrize("fg", [[], ["-f"]], ids=["background", "foreground"])
def test_missing_mountpoint_or_not_a_directory(layerfs, image, tmp_path, fg):
    missing = str(tmp_path / "missing")
    assert assert_one_line_error(layerfs("mount", *fg, image, missing)) == (
        f"layerfs: mountpoint {missing} does not exist")
    afile = tmp_path / "file"
    afile.write_text("x")
    assert assert_one_line_error(layerfs("mount", *fg, image, str(afile))) == (
        f"layerfs: mountpoint {afile} is not a directory")
    assert _ps(layerfs) == [] and not os.path.exists(missing)


@pytest.mark.parametrize("fg", [[], ["-f"]], ids=["background", "foreground"])
def test_busy_mountpoint(layerfs, mounts, image, tmp_path, fg):
    mnt = str(tmp_path / "mnt")
    cid = mounts(image, mnt)
    assert assert_one_line_error(layerfs("mount", *fg, image, mnt)) == (
        f"layerfs: mountpoint {mnt} is busy: something is mounted there already")
    assert _ps(layerfs) == [cid]


@pytest.mark.parametrize("fg", [[], ["-f"]], ids=["background", "foreground"])
def test_mountpoint_of_a_dead_mount(layerfs, mounts, image, tmp_path, fg):
    mnt = str(tmp_path / "mnt")
    cid = mounts(image, mnt)
    [c] = json.loads(layerfs("ps", "--json", check=True).stdout)
    os.kill(c["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while json.loads(layerfs("ps", "--json", check=True).stdout)[0]["state"] != "dead":
        assert time.monotonic() < deadline, "the killed server's mount did not show as dead"
        time.sleep(0.05)
    assert assert_one_line_error(layerfs("mount", *fg, image, mnt)) == (
        f"layerfs: mountpoint {mnt} is busy: a mount whose server died is still there (layerfs umount {mnt})")
    assert _ps(layerfs) == [cid]
    layerfs("umount", mnt, check=True)
    cid2 = mounts(image, mnt)  # and once unmounted, it mounts again
    assert open(os.path.join(mnt, "etc/hostname")).read() == "app\n" and cid2 != cid


def _in_namespace_with(device: str, *argv: str, env: dict) -> subprocess.CompletedProcess:
    script = 'mount --bind "$DEV" /dev/fuse; exec "$@"'
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-euc", script, "sh", *argv],
                          capture_output=True, env=dict(env, DEV=device), timeout=120)


@pytest.mark.parametrize("fg", [[], ["-f"]], ids=["background", "foreground"])
def test_libfuse_own_message_as_root(layerfs, image, tmp_path, store_root, fg):
    """/dev/fuse that is not the FUSE device (here /dev/null, bound over it in a private
    namespace): the kernel refuses the mount, and libfuse's message is the one line."""
    mnt = str(tmp_path / "mnt")
    os.mkdir(mnt)
    proc = _in_namespace_with("/dev/null", EXE, "mount", *fg, image, mnt,
                              env=dict(os.environ, LAYERFS_ROOT=store_root))
    assert assert_one_line_error(proc) == "layerfs: the mount failed: fuse: mount failed: Invalid argument"
    assert _ps(layerfs) == [] and os.listdir(os.path.join(store_root, "containers")) == []


def test_fuse_layerfs_says_why_too(tmp_path):
    for d in ("lower", "upper", "work", "mnt"):
        (tmp_path / d).mkdir()
    opts = f"lowerdir={tmp_path / 'lower'},upperdir={tmp_path / 'upper'},workdir={tmp_path / 'work'}"
    proc = _in_namespace_with("/dev/null", os.path.join(os.path.dirname(EXE), "fuse-layerfs"), "-o", opts,
                              str(tmp_path / "mnt"), env=dict(os.environ))
    assert proc.returncode != 0
    assert proc.stderr.decode() == (f"fuse-layerfs: cannot mount {tmp_path / 'mnt'}: the mount failed: fuse: "
                                    f"mount failed: Invalid argument (log: {tmp_path / 'work/layerfs/server.log'})\n")
