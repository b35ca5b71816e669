"""``layerfs build``: real Dockerfiles built on the demo image (Debian's busybox-static and
base-files), every RUN in a real sandbox on a real FUSE mount, the results checked as a
user would: the layers' tars, the config, the cache, podman and skopeo reading the
saved image, volumes kept out of commits, and bad input refused cleanly."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile

import pytest

from helpers import assert_one_line_error
from layerfs.store import Store
from layerfs.store.sample import DEMO_REF, write_demo_layout

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="build runs steps in namespaces and a chroot: root only"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse"),
]
EXE = os.path.join(os.path.dirname(os.sys.executable), "layerfs")


@pytest.fixture(scope="module")
def base_root(tmp_path_factory):
    """A store holding the demo image (built once; each test copies nothing, it builds
    under its own tags)."""
    root = str(tmp_path_factory.mktemp("build") / "store")
    layout = str(tmp_path_factory.mktemp("layout") / "demo")
    write_demo_layout(layout)
    subprocess.run([EXE, "load", layout], env=dict(os.environ, LAYERFS_ROOT=root), check=True,
                   capture_output=True)
    yield root
    leftover = [line for line in open("/proc/self/mountinfo") if root in line]
    assert not leftover, f"mounts left behind: {leftover}"


@pytest.fixture
def lf(base_root):
    def run(*args: str, check: bool = True, env: dict | None = None, input: bytes | None = None):
        proc = subprocess.run([EXE, *args], env=dict(os.environ, LAYERFS_ROOT=base_root, **(env or {})),
                              capture_output=True, timeout=600, input=input)
        if check and proc.returncode != 0:
            raise AssertionError(f"layerfs {' '.join(args)} failed ({proc.returncode}):\n"
                                 f"{proc.stdout.decode()}\n{proc.stderr.decode()}")
        return proc
    return run


def context(tmp_path, dockerfile: str, files: dict[str, str | bytes] | None = None) -> str:
    ctx = tmp_path / "ctx"
    ctx.mkdir(exist_ok=True)
    (ctx / "Dockerfile").write_text(dockerfile)
    for name, data in (files or {}).items():
        path = ctx / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(ctx)


def tar_gz(members: dict[str, str], extra=()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.uid = len(data), 0o640, 1234
            tf.addfile(ti, io.BytesIO(data.encode()))
        for ti in extra:
            tf.addfile(ti)
    return buf.getvalue()


def inspect(lf, ref: str) -> dict:
    return json.loads(lf("inspect", ref).stdout)


def layer_members(lf, diff_id: str) -> dict[str, tarfile.TarInfo]:
    data = lf("export-layer", diff_id, "-o", "-").stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return {m.name.rstrip("/"): m for m in tf.getmembers()}


def layer_file(lf, diff_id: str, name: str) -> bytes:
    data = lf("export-layer", diff_id, "-o", "-").stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return tf.extractfile(name).read()


def no_leftovers(root: str) -> None:
    """No container, no lease, no mount of the store after a build, failed or not."""
    with Store(root) as s:
        assert s.containers.list() == []
        from layerfs.store.leases import all_leases
        assert all_leases(s.index) == []
    assert os.listdir(os.path.join(root, "containers")) == []
    assert not [line for line in open("/proc/self/mountinfo") if root in line]


APP = """\
FROM layerfs-demo
ARG GREETING=hello
ENV APP_HOME=/app LEVEL="two words"
WORKDIR $APP_HOME
RUN echo "$GREETING from RUN as $(id -u) in $(pwd)" > /greeting && cat /greeting
RUN ["/bin/sh", "-c", "echo exec form > /exec.txt"]
COPY --chown=nobody:nogroup files/ ./
ADD pkg.tar.gz /opt/pkg/
ADD notes.txt /opt/notes.txt
LABEL org.example.name="the app" version=1
EXPOSE 8080 53/udp
USER nobody
RUN id -un > /tmp/whoami
STOPSIGNAL SIGTERM
ENTRYPOINT ["/bin/sh", "-c"]
CMD ["cat /greeting"]
"""


def app_context(tmp_path) -> str:
    return context(tmp_path, APP, {"files/one.txt": "one\n", "files/sub/two.txt": "two\n",
                                   "files/build.log": "ignored\n", "files/secret.key": "ignored\n",
                                   "pkg.tar.gz": tar_gz({"bin/tool": "#!/bin/sh\necho tool\n"}),
                                   "notes.txt": "just a file\n",
                                   ".dockerignore": "**/*.log\nfiles/secret.key\n"})


def test_build_runs_copies_adds_and_writes_the_config(lf, base_root, tmp_path):
    proc = lf("build", "-t", "app:v1", app_context(tmp_path))
    out = proc.stdout.decode()
    lines = out.splitlines()
    assert lines[0] == "STEP 1/16: FROM layerfs-demo"
    assert "STEP 5/16: RUN echo" in out and "hello from RUN as 0 in /app" in out
    assert lines[-1].startswith("sha256:") and "Successfully tagged app:v1" in out
    image = inspect(lf, "app:v1")
    assert lines[-1] == image["id"]
    cfg = image["config"]["config"]
    assert cfg["Env"] == ["PATH=/usr/local/bin:/usr/bin:/bin", "APP_HOME=/app", "LEVEL=two words"]
    assert cfg["WorkingDir"] == "/app" and cfg["User"] == "nobody" and cfg["StopSignal"] == "SIGTERM"
    assert cfg["Labels"]["org.example.name"] == "the app" and cfg["Labels"]["version"] == "1"
    assert cfg["ExposedPorts"] == {"8080/tcp": {}, "53/udp": {}}
    assert cfg["Entrypoint"] == ["/bin/sh", "-c"] and cfg["Cmd"] == ["cat /greeting"]
    # One history entry per instruction; config-only ones add no layer.
    history = image["config"]["history"][3:]
    assert len(history) == 15
    layered = [h["created_by"] for h in history if not h.get("empty_layer")]
    assert len(layered) == 6 and len(image["layers"]) == 3 + 6
    assert layered[0].startswith("|1 GREETING=hello /bin/sh -c echo")
    assert [h["created_by"] for h in history if h.get("empty_layer")][:3] == [
        "ARG GREETING", "ENV APP_HOME=/app LEVEL=two words", "WORKDIR $APP_HOME"]
    run1, run2, copy, add_tar, add_file, run3 = image["layers"][3:]
    # RUN: the file it wrote and the WORKDIR it made; none of the sandbox's mountpoints.
    assert set(layer_members(lf, run1)) == {"app", "greeting"}
    assert layer_file(lf, run1, "greeting") == b"hello from RUN as 0 in /app\n"
    assert layer_file(lf, run2, "exec.txt") == b"exec form\n"
    copied = layer_members(lf, copy)
    assert set(copied) == {"app", "app/one.txt", "app/sub", "app/sub/two.txt"}
    assert {(m.uid, m.gid) for n, m in copied.items() if n != "app"} == {(65534, 65534)}
    unpacked = layer_members(lf, add_tar)
    assert unpacked["opt/pkg/bin/tool"].uid == 1234 and unpacked["opt/pkg/bin/tool"].mode == 0o640
    assert layer_file(lf, add_file, "opt/notes.txt") == b"just a file\n"  # not a tar: copied
    assert layer_file(lf, run3, "tmp/whoami") == b"nobody\n"
    no_leftovers(base_root)


def test_rebuild_is_all_cache_hits_with_the_same_id(lf, base_root, tmp_path):
    ctx = app_context(tmp_path)
    first = lf("build", "-q", "-t", "cached:v1", ctx).stdout.decode().strip()
    again = lf("build", "-t", "cached:v2", ctx).stdout.decode()
    steps = [line for line in again.splitlines() if line.startswith("STEP ")]
    hits = [line for line in again.splitlines() if line.startswith("--> Using cache ")]
    assert len(hits) == len(steps) - 1 == 15  # every step after FROM
    assert "hello from RUN" not in again  # nothing ran
    assert again.splitlines()[-1] == first
    # The build cache's images stay out of the listing unless asked for.
    listed = lf("images").stdout.decode()
    assert "<none>" not in listed and "<none>" in lf("images", "--all").stdout.decode()
    # A changed source reruns its step and those after it, not those before.
    (tmp_path / "ctx" / "files" / "one.txt").write_text("one, changed\n")
    changed = lf("build", ctx).stdout.decode()
    assert changed.count("--> Using cache") == 5  # ARG ENV WORKDIR RUN RUN; then COPY reruns
    assert changed.splitlines()[-1] != first
    # A build argument's new value reruns the RUN steps that see it.
    other = lf("build", "--build-arg", "GREETING=bonjour", ctx).stdout.decode()
    assert "bonjour from RUN" in other
    # --no-cache runs everything again.
    fresh = lf("build", "--no-cache", ctx).stdout.decode()
    assert "--> Using cache" not in fresh and "hello from RUN" in fresh
    no_leftovers(base_root)


def test_run_sandbox(lf, base_root, tmp_path):
    """RUN has its own pid, uts, mount namespaces, /proc, /dev, the host's resolv.conf;
    what it leaves running is ended; SHELL is honoured; nothing it was given is committed."""
    ctx = context(tmp_path, """\
FROM layerfs-demo
RUN echo "pid=$$ host=$(cat /proc/sys/kernel/hostname)" && ls /proc/1/ >/dev/null && echo ok > /dev/null \
    && head -c 4 /dev/zero | wc -c && cat /etc/resolv.conf > /resolv.seen && (sleep 3017 &) && echo started
SHELL ["/bin/echo", "shell says:"]
RUN hello
""")
    out = lf("build", "-t", "sandbox:v1", ctx).stdout.decode()
    import socket
    hostname = socket.gethostname()
    assert "pid=1 host=" in out and f"host={hostname}\n" not in out
    assert "\n4\n" in out and "started" in out
    assert "shell says: hello" in out
    procs = subprocess.run(["pgrep", "-f", "sleep 3017"], capture_output=True).stdout
    assert procs == b"", "a process the step left behind still runs"
    image = inspect(lf, "sandbox:v1")
    run1 = image["layers"][3]
    members = layer_members(lf, run1)
    # The demo image has no /etc/hosts or /etc/resolv.conf: the step got them, its layer does not.
    assert set(members) == {"resolv.seen"}
    with open("/etc/resolv.conf", "rb") as f:
        assert layer_file(lf, run1, "resolv.seen") == f.read()
    assert image["config"]["config"]["Shell"] == ["/bin/echo", "shell says:"]
    assert image["config"]["history"][-1]["created_by"] == "/bin/echo shell says: hello"
    no_leftovers(base_root)


def test_multistage_copy_from_into_scratch(lf, base_root, tmp_path):
    ctx = context(tmp_path, """\
ARG BASE=layerfs-demo
FROM ${BASE} AS builder
RUN mkdir -p /out && echo built > /out/artifact && ln -s artifact /out/link
FROM layerfs-demo AS unused
RUN echo this stage is not needed && false
FROM scratch
COPY --from=builder /out/ /dist/
COPY --from=builder /bin/busybox /bin/busybox
CMD ["/bin/busybox", "cat", "/dist/artifact"]
""")
    out = lf("build", "-t", "multi:v1", ctx).stdout.decode()
    assert "[1/2] STEP 1/2: FROM layerfs-demo AS builder" in out
    assert "this stage is not needed" not in out
    image = inspect(lf, "multi:v1")
    assert len(image["layers"]) == 2
    tree = json.loads(lf("ls", "multi:v1", "/", "-R", "--json").stdout)
    paths = {e["path"]: e for e in tree}
    assert set(paths) == {"/dist", "/dist/artifact", "/dist/link", "/bin", "/bin/busybox"}
    assert paths["/dist/link"]["target"] == "artifact"
    assert lf("cat", "multi:v1", "/dist/artifact").stdout == b"built\n"
    no_leftovers(base_root)


def test_saved_build_is_read_by_skopeo_and_podman(lf, tmp_path):
    if not (shutil.which("skopeo") and shutil.which("podman")):
        pytest.skip("needs skopeo and podman (apt-get install skopeo podman crun)")
    lf("build", "-q", "-t", "export:v1", app_context(tmp_path))
    image = inspect(lf, "export:v1")
    archive = str(tmp_path / "app.tar")
    lf("save", "export:v1", "-o", archive)
    info = json.loads(subprocess.run(["skopeo", "inspect", "--config", f"oci-archive:{archive}"],
                                     capture_output=True, check=True).stdout)
    assert info == image["config"]
    run_root = tempfile.mkdtemp(prefix="lfpod", dir="/tmp")
    base = ["podman", "--root", str(tmp_path / "podman-root"), "--runroot", run_root, "--storage-driver", "vfs",
            "--events-backend", "none", "--cgroup-manager", "cgroupfs"]
    try:
        subprocess.run([*base, "load", "-q", "-i", archive], check=True, capture_output=True, timeout=300)
        got = subprocess.run([*base, "image", "inspect", "export:v1"], check=True, capture_output=True).stdout
        pod = json.loads(got)[0]
        assert "sha256:" + pod["Id"] == image["id"]
        assert pod["Config"]["Cmd"] == ["cat /greeting"] and pod["Config"]["User"] == "nobody"
        assert pod["Config"]["Labels"]["org.example.name"] == "the app"
    finally:
        subprocess.run([*base, "system", "reset", "--force"], capture_output=True, timeout=120)
        shutil.rmtree(run_root, ignore_errors=True)


def test_volumes_stay_out_of_diff_and_commit(lf, base_root, tmp_path):
    host = tmp_path / "vol"
    host.mkdir()
    (host / "before").write_text("host file\n")
    ro = tmp_path / "ro"
    ro.mkdir()
    cid = lf("create", "layerfs-demo", "--name", "withvol", "-v", f"{host}:/data").stdout.decode().strip()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        lf("mount", "withvol", str(mnt), "--volume", f"{ro}:/srv/ro:ro")
        assert (mnt / "data" / "before").read_text() == "host file\n"
        (mnt / "data" / "written").write_text("into the volume\n")
        (mnt / "etc" / "changed").write_text("into the container\n")
        with pytest.raises(OSError):
            (mnt / "srv" / "ro" / "x").write_text("read-only")
        diff = lf("diff", "withvol").stdout.decode().split("\n")
        assert "A /etc/changed" in diff and not any("written" in d or "before" in d for d in diff)
        new = lf("commit", "withvol").stdout.decode().strip()
    finally:
        lf("umount", str(mnt), check=False)
    assert (host / "written").read_text() == "into the volume\n"
    assert not [line for line in open("/proc/self/mountinfo") if str(mnt) in line]
    layer = inspect(lf, new)["layers"][-1]
    names = set(layer_members(lf, layer))
    assert "etc/changed" in names and not any("written" in n or "before" in n for n in names)
    assert inspect(lf, "withvol")["volumes"] == [f"{host}:/data"]
    lf("rm", cid)
    # VOLUME in a Dockerfile: the config records it, and the mountpoint is made.
    ctx = context(tmp_path, "FROM layerfs-demo\nVOLUME /var/lib/app /etc\n")
    lf("build", "-q", "-t", "vol:v1", ctx)
    image = inspect(lf, "vol:v1")
    assert image["config"]["config"]["Volumes"] == {"/var/lib/app": {}, "/etc": {}}
    assert set(layer_members(lf, image["layers"][-1])) == {"var", "var/lib", "var/lib/app"}
    no_leftovers(base_root)


def test_a_volume_that_cannot_be_bound_undoes_the_mount(lf, base_root, tmp_path):
    host = tmp_path / "gone"
    host.mkdir()
    cid = lf("create", "layerfs-demo", "-v", f"{host}:/data").stdout.decode().strip()
    host.rmdir()  # the volume's host directory went away after create
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = lf("mount", cid, str(mnt), check=False)
    assert proc.returncode != 0
    assert proc.stderr.decode().splitlines() == [proc.stderr.decode().strip()]
    assert "cannot bind the volumes" in proc.stderr.decode()
    assert not [line for line in open("/proc/self/mountinfo") if str(mnt) in line]
    assert inspect(lf, cid)["state"] == "created"  # the container stays, unmounted
    lf("rm", cid)
    no_leftovers(base_root)


def test_paths_stay_inside_the_image(lf, base_root, tmp_path):
    """A destination through a symlink to / or /etc, and a tar whose entries climb
    through a symlink, land in the image, never on the host."""
    link = tarfile.TarInfo("escape")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc"
    payload = tar_gz({}, [link]) 
    ctx = context(tmp_path, """\
FROM layerfs-demo
RUN ln -s / /rootlink && ln -s /etc /etclink
COPY marker.txt /etclink/layerfs-build-marker
ADD escape.tar.gz /unpacked/
ADD through.tar /unpacked/
""", {"marker.txt": "stays in the image\n", "escape.tar.gz": payload})
    through = io.BytesIO()
    with tarfile.open(fileobj=through, mode="w") as tf:
        ti = tarfile.TarInfo("escape/layerfs-build-marker2")
        data = b"also in the image\n"
        ti.size = len(data)
        tf.addfile(ti, io.BytesIO(data))
    (tmp_path / "ctx" / "through.tar").write_bytes(through.getvalue())
    lf("build", "-q", "-t", "inside:v1", ctx)
    assert not os.path.exists("/etc/layerfs-build-marker")
    assert not os.path.exists("/etc/layerfs-build-marker2")
    assert lf("cat", "inside:v1", "/etc/layerfs-build-marker").stdout == b"stays in the image\n"
    assert lf("cat", "inside:v1", "/etc/layerfs-build-marker2").stdout == b"also in the image\n"
    no_leftovers(base_root)


BAD = [
    ("FROM layerfs-demo\nFROBNICATE x\n", "unknown instruction: FROBNICATE"),
    ("FROM localhost:9/no/such-image:v1\n", "no such image"),
    ("FROM layerfs-demo\nCOPY ../outside /x\n", "outside the build context"),
    ("FROM layerfs-demo\nCOPY missing.txt /x\n", "missing.txt: no such file"),
    ("FROM layerfs-demo\nCOPY link-out /x\n", "outside the build context"),
    ('FROM layerfs-demo\nRUN ["echo", \'x\']\n', "malformed JSON"),
    ("FROM layerfs-demo\nCOPY --from=nowhere /a /b\n", "no such stage or image"),
    ("FROM layerfs-demo\nADD bad.tar.gz /x/\n", "climbs out"),
    ("RUN true\n", "before the first FROM"),
    ("FROM layerfs-demo\nUSER ghost\nRUN true\n", "unable to find user ghost"),
]


@pytest.mark.parametrize("dockerfile,reason", BAD, ids=[r for _, r in BAD])
def test_bad_input_is_one_line_and_moves_no_tag(lf, base_root, tmp_path, dockerfile, reason):
    ctx = context(tmp_path, dockerfile, {"bad.tar.gz": tar_gz({"../../evil": "x"})})
    os.symlink("/etc/passwd", tmp_path / "ctx" / "link-out")
    lf("tag", "layerfs-demo", "keep:me")
    before = inspect(lf, "keep:me")["id"]
    proc = lf("build", "-q", "-t", "keep:me", ctx, check=False)
    if "ghost" in reason:  # a RUN that cannot start: its output is shown, then the error
        err = proc.stderr.decode().strip().splitlines()
        assert proc.returncode != 0 and reason in err[-2] and "STEP 3/3" in err[-1], err
    else:
        line = assert_one_line_error(proc, mentions=(reason,))
        if "FROM" in dockerfile.splitlines()[0] and "STEP" in line:
            assert "Dockerfile line" in line
    assert inspect(lf, "keep:me")["id"] == before
    no_leftovers(base_root)


def test_failing_run_shows_output_and_status(lf, base_root, tmp_path):
    ctx = context(tmp_path, "FROM layerfs-demo\nRUN echo about to fail && exit 3\nCMD x\n")
    proc = lf("build", "-t", "fails:v1", ctx, check=False)
    assert proc.returncode != 0
    assert "about to fail" in proc.stdout.decode()
    err = proc.stderr.decode().strip().splitlines()
    assert len(err) == 1 and "STEP 2/3" in err[0] and "exited with status 3" in err[0], err
    assert lf("inspect", "fails:v1", check=False).returncode != 0
    no_leftovers(base_root)


def test_from_a_registry_pulls(lf, registry, tmp_path):
    ref = f"localhost:{registry.port}/demo/base:v1"
    lf("push", DEMO_REF, ref)
    fresh = str(tmp_path / "fresh")
    ctx = context(tmp_path, f"FROM {ref}\nRUN echo pulled > /pulled\n")
    proc = subprocess.run([EXE, "build", "-t", "frompull:v1", ctx], capture_output=True, timeout=600,
                          env=dict(os.environ, LAYERFS_ROOT=fresh))
    assert proc.returncode == 0, proc.stderr.decode()
    assert "pulling" in proc.stdout.decode()
    got = subprocess.run([EXE, "cat", "frompull:v1", "/pulled"], capture_output=True,
                         env=dict(os.environ, LAYERFS_ROOT=fresh)).stdout
    assert got == b"pulled\n"
    no_leftovers(fresh)


def test_onbuild_triggers_and_healthcheck(lf, base_root, tmp_path):
    """ONBUILD is recorded, then run once by the build FROM that image (and not kept in
    its config); HEALTHCHECK goes into the config as docker writes it."""
    parent = tmp_path / "parent"
    parent.mkdir()
    (parent / "Dockerfile").write_text(
        "FROM layerfs-demo\nONBUILD RUN echo triggered > /trigger\n"
        "HEALTHCHECK --interval=30s --retries=2 CMD [\"/bin/true\"]\n")
    lf("build", "-q", "-t", "onbuild:parent", str(parent))
    cfg = inspect(lf, "onbuild:parent")["config"]["config"]
    assert cfg["OnBuild"] == ["RUN echo triggered > /trigger"]
    assert cfg["Healthcheck"] == {"Test": ["CMD", "/bin/true"], "Interval": 30_000_000_000, "Retries": 2}
    child = context(tmp_path, "FROM onbuild:parent\nCMD [\"/bin/cat\", \"/trigger\"]\n")
    out = lf("build", "-t", "onbuild:child", child).stdout.decode()
    assert "STEP 2/3: RUN echo triggered > /trigger" in out
    assert lf("cat", "onbuild:child", "/trigger").stdout == b"triggered\n"
    assert "OnBuild" not in inspect(lf, "onbuild:child")["config"]["config"]
    no_leftovers(base_root)
