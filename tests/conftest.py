"""Shared fixtures: a fresh store per test, and the layerfs command run for real."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest

from layerfs.store import Store

sys.path.insert(0, os.path.dirname(__file__))

# pytest removes the temporary directories of earlier sessions with shutil.rmtree, one
# Python frame per directory level, and the long-path tests leave trees over 2,000 levels
# deep: past the default limit of 1,000 the whole session fails at its end. On 3.11+ a
# Python-to-Python call takes no C stack, so a higher limit costs nothing.
sys.setrecursionlimit(max(sys.getrecursionlimit(), 20_000))


@pytest.fixture
def store_root(tmp_path):
    return str(tmp_path / "store")


@pytest.fixture
def store(store_root):
    with Store(store_root) as s:
        yield s


@pytest.fixture
def public_dir():
    """A directory every user may search (pytest's own are root's alone), removed after
    (ask for it before ``mounts``, so that what is mounted in it is unmounted first)."""
    from layerfs.store.fstree import remove_tree

    d = tempfile.mkdtemp(prefix="layerfs-public-", dir="/tmp")
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        remove_tree(d)


@pytest.fixture
def layerfs(store_root):
    """Run the installed ``layerfs`` command against the test's store."""
    def run(*args: str, input: bytes | None = None, check: bool = False, root: str | None = None):
        env = dict(os.environ, LAYERFS_ROOT=root or store_root)
        exe = os.path.join(os.path.dirname(sys.executable), "layerfs")
        proc = subprocess.run([exe, *args], input=input, capture_output=True, env=env, timeout=600)
        if check and proc.returncode != 0:
            raise AssertionError(f"layerfs {' '.join(args)} failed ({proc.returncode}): "
                                 f"{proc.stderr.decode()}")
        return proc
    return run


def _fuse_mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == os.path.realpath(path) for line in f)


@pytest.fixture
def mounts(layerfs):
    """``mounts(ref, mnt, *args)`` runs ``layerfs mount``; everything it mounted is
    unmounted at the end, also when the test fails. Returns the container id."""
    made: list[str] = []

    def mount(ref: str, mnt: str, *extra: str) -> str:
        os.makedirs(mnt, exist_ok=True)
        proc = layerfs("mount", ref, mnt, *extra)
        if proc.returncode == 0:
            made.append(mnt)
        assert proc.returncode == 0, proc.stderr.decode()
        return proc.stdout.decode().strip()

    yield mount
    for mnt in made:
        if _fuse_mounted(mnt):
            layerfs("umount", mnt)
        if _fuse_mounted(mnt):
            subprocess.run(["fusermount3", "-u", mnt], capture_output=True)
            subprocess.run(["umount", "-l", mnt], capture_output=True)


@pytest.fixture
def registry(tmp_path):
    """A real registry (Debian's docker-registry) on a free loopback port, stopped after."""
    from registryserver import REGISTRY, RegistryServer
    if REGISTRY is None:
        pytest.skip("needs docker-registry (apt-get install docker-registry)")
    srv = RegistryServer(str(tmp_path / "registry")).start()
    yield srv
    srv.stop()


@pytest.fixture
def basic_registry(tmp_path):
    """A second registry, with htpasswd basic auth: alice / s3cret."""
    from registryserver import HTPASSWD, REGISTRY, RegistryServer, htpasswd_auth
    if REGISTRY is None or HTPASSWD is None:
        pytest.skip("needs docker-registry and htpasswd (apt-get install docker-registry apache2-utils)")
    d = str(tmp_path / "basic")
    os.makedirs(d)
    srv = RegistryServer(d, auth=htpasswd_auth(d, {"alice": "s3cret"})).start()
    yield srv
    srv.stop()


@pytest.fixture
def token_registry(tmp_path):
    """A registry with token auth and the token service it trusts: alice may pull and
    push, bob only pull, anonymous only pull. Yields (registry, token service)."""
    from registryserver import OPENSSL, REGISTRY, RegistryServer, TokenService
    if REGISTRY is None or OPENSSL is None:
        pytest.skip("needs docker-registry and openssl")
    d = str(tmp_path / "token")
    os.makedirs(d)
    tokens = TokenService(d, users={"alice": "s3cret", "bob": "b0b"},
                          grants={"alice": ("pull", "push"), "bob": ("pull",), "": ("pull",)})
    srv = RegistryServer(d, auth=tokens.registry_auth()).start()
    yield srv, tokens
    srv.stop()
    tokens.close()


@pytest.fixture
def proxy(registry):
    """A TCP proxy in front of ``registry`` that drops or stalls connections on cue."""
    from registryserver import DropProxy
    p = DropProxy(registry.port)
    yield p
    p.close()
