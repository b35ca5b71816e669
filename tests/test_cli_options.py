"""The command line as people expect it: store-wide options before or after the command,
--version, shell completion, and read-only commands that never make a store."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys

import pytest

from helpers import NOBODY, as_nobody, make_tar

EXE = os.path.join(os.path.dirname(sys.executable), "layerfs")


def lf(*args: str, env_root: str | None = None, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``layerfs`` with $LAYERFS_ROOT set only if ``env_root`` is given."""
    env = dict(os.environ)
    env.pop("LAYERFS_ROOT", None)
    if env_root is not None:
        env["LAYERFS_ROOT"] = env_root
    env.update(extra_env or {})
    return subprocess.run([EXE, *args], capture_output=True, env=env, timeout=300)


@pytest.fixture
def tagged(tmp_path) -> str:
    """A store with one image, app:1; returns the store root."""
    root = str(tmp_path / "store")
    tar = make_tar(str(tmp_path / "l.tar"), [("etc", "d"), ("etc/hostname", "f", "app\n")])
    proc = lf("--root", root, "import-layer", tar, "-t", "app:1")
    assert proc.returncode == 0, proc.stderr
    return root


def _tags(proc: subprocess.CompletedProcess) -> list[str]:
    assert proc.returncode == 0, proc.stderr
    return [line.split()[0] for line in proc.stdout.decode().splitlines()[1:]]


# -- --root before and after the command -------------------------------------------------------


def test_root_before_and_after_the_command(tagged):
    assert _tags(lf("--root", tagged, "images")) == ["app:1"]
    assert _tags(lf("images", "--root", tagged)) == ["app:1"]
    assert _tags(lf("--root", tagged, "images", "--root", tagged)) == ["app:1"]  # the same twice
    assert _tags(lf("--root=" + tagged, "ls", "app:1", "/etc")) == []  # one line, no header
    assert lf("--root", tagged, "cat", "app:1", "/etc/hostname").stdout == b"app\n"


def test_root_on_the_command_line_wins_over_the_environment(tagged, tmp_path):
    elsewhere = str(tmp_path / "elsewhere")
    assert _tags(lf("--root", tagged, "images", env_root=elsewhere)) == ["app:1"]
    assert _tags(lf("images", "--root", tagged, env_root=elsewhere)) == ["app:1"]
    assert _tags(lf("images", env_root=tagged)) == ["app:1"]
    assert not os.path.exists(elsewhere)


def test_two_different_roots_are_refused(tagged, tmp_path):
    other = str(tmp_path / "other")
    proc = lf("--root", tagged, "images", "--root", other)
    assert proc.returncode == 2
    assert f"--root given twice: {tagged} before the command, {other} after it" in proc.stderr.decode()
    assert not os.path.exists(other)


def test_fsck_takes_root_before_the_command(tagged):
    proc = lf("--root", tagged, "fsck")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().startswith("clean: 1 blobs, 1 layers, 1 images checked")


def test_version():
    proc = lf("--version")
    assert proc.returncode == 0
    assert proc.stdout.decode() == f"layerfs {importlib.metadata.version('layerfs')}\n"


def test_help_names_root_before_the_command():
    out = lf("--help").stdout.decode()
    assert "--root DIR" in out and "--version" in out and "_LAYERFS_COMPLETE=bash_source" in out


# -- shell completion (click's), as bash runs it ------------------------------------------------


def _bash_complete(words: list[str], env_root: str | None = None) -> list[str]:
    """Complete the last of ``words`` the way the README tells bash to."""
    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    script = ('eval "$(_LAYERFS_COMPLETE=bash_source layerfs)"; COMP_WORDS=("$@"); '
              'COMP_CWORD=$(($# - 1)); _layerfs_completion layerfs; printf "%s\\n" "${COMPREPLY[@]}"')
    env = dict(os.environ, PATH=os.path.dirname(EXE) + os.pathsep + os.environ["PATH"])
    env.pop("LAYERFS_ROOT", None)
    if env_root:
        env["LAYERFS_ROOT"] = env_root
    proc = subprocess.run(["bash", "-c", script, "bash", *words], capture_output=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [w for w in proc.stdout.decode().splitlines() if w]


def test_bash_completes_commands_options_and_names(tagged):
    assert _bash_complete(["layerfs", "im"]) == ["images", "import-dir", "import-layer"]
    assert "--root" in _bash_complete(["layerfs", "--r"])
    assert _bash_complete(["layerfs", "--root", tagged, "ls", ""]) == ["app:1"]
    assert _bash_complete(["layerfs", "cat", "a"], env_root=tagged) == ["app:1"]
    assert lf("--root", tagged, "create", "app:1", "--name", "web").returncode == 0
    assert _bash_complete(["layerfs", "--root", tagged, "mount", ""]) == ["app:1", "web"]
    assert _bash_complete(["layerfs", "--root", tagged, "diff", "w"]) == ["web"]


def test_completion_does_not_make_a_store(tmp_path):
    missing = str(tmp_path / "missing")
    assert _bash_complete(["layerfs", "--root", missing, "ls", ""]) == []
    assert not os.path.exists(missing)


# -- read-only commands never make a store ----------------------------------------------------

# Every command that needs what a store holds; only load, pull, import-layer,
# import-dir and demo add to a store, and only they may make one.
NEEDS_A_STORE = [
    ("images",), ("layers",), ("inspect", "app:1"), ("ls", "app:1", "/"), ("cat", "app:1", "/etc/x"),
    ("export-layer", "sha256:00", "-o", "{tmp}/out.tar"), ("save", "app:1", "-o", "{tmp}/out.tar"),
    ("df",), ("ps",), ("diff", "c1"), ("gc",), ("gc", "--dry-run"), ("prune",), ("fsck",),
    ("fsck", "--repair"), ("rmi", "app:1"), ("tag", "app:1", "app:2"), ("create", "app:1"),
    ("mount", "app:1", "{tmp}"), ("umount", "{tmp}"), ("rm", "c1"), ("commit", "c1"),
    ("push", "app:1", "localhost:1/app:1"),
]


@pytest.mark.parametrize("args", NEEDS_A_STORE, ids=lambda a: " ".join(a))
@pytest.mark.parametrize("where", ["missing", "empty"])
def test_a_command_that_needs_a_store_does_not_make_one(tmp_path, args, where):
    root = str(tmp_path / "no" / "such" / "root")
    if where == "empty":
        os.makedirs(root)
    args = tuple(a.replace("{tmp}", str(tmp_path)) for a in args)
    for argv in ((*args, "--root", root), ("--root", root, *args)):
        proc = lf(*argv)
        assert proc.returncode == 3, proc
        assert proc.stderr.decode() == f"layerfs: no store at {root}\n"
        assert proc.stdout == b""
    # Nothing made, nor written beside it.
    assert os.listdir(tmp_path) == ([] if where == "missing" else ["no"])
    if where == "empty":
        assert os.listdir(root) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="acting as a second user needs root")
def test_the_default_root_is_not_made_by_a_read_only_command(public_dir):
    """A user's first `layerfs images` says there is no store rather than making one in
    their home; their first import makes it."""
    home = os.path.join(public_dir, "home")
    os.mkdir(home)
    os.chown(home, NOBODY, NOBODY)
    env = dict(os.environ, HOME=home)
    env.pop("LAYERFS_ROOT", None)
    default = os.path.join(home, ".local", "share", "layerfs")
    proc = as_nobody(EXE, "images", env=env)
    assert proc.returncode == 3 and proc.stderr.decode() == f"layerfs: no store at {default}\n"
    assert os.listdir(home) == []
    tar = make_tar(os.path.join(home, "l.tar"), [("f", "f", "f\n")])
    os.chown(tar, NOBODY, NOBODY)
    assert as_nobody(EXE, "import-layer", tar, env=env).returncode == 0
    assert os.stat(default).st_uid == NOBODY


@pytest.mark.parametrize("command", ["import-layer", "import-dir", "load"])
def test_commands_that_add_make_the_store(tmp_path, command):
    root = str(tmp_path / "new" / "store")
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("f\n")
    arg = {"import-layer": make_tar(str(tmp_path / "l.tar"), [("f", "f", "f\n")]),
           "import-dir": str(src), "load": str(tmp_path / "not-an-image")}[command]
    proc = lf(command, arg, "--root", root)
    if command == "load":  # refused input: the store is made, and nothing is stored in it
        assert proc.returncode != 0 and os.path.exists(os.path.join(root, "index.lmdb"))
        assert _tags(lf("images", "--root", root)) == []
        return
    assert proc.returncode == 0, proc.stderr
    assert len(lf("images", "-q", "--root", root).stdout.split()) == 1


def test_a_directory_that_is_not_a_store_is_named(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "notes.txt").write_text("mine\n")
    for args in (("images",), ("import-dir", str(d))):
        proc = lf(*args, "--root", str(d))
        assert proc.returncode != 0
        assert proc.stderr.decode() == f"layerfs: {d} is not a layerfs store (it has no index.lmdb)\n"
    assert os.listdir(d) == ["notes.txt"]
