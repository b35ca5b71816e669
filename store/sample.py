"""The demo image: real software, assembled at run time from the Debian packages this
machine already has, written as an OCI image layout.

Layers: ``base-files`` (Debian's /etc/os-release, the root directories), then
``busybox-static`` (one static binary that runs in a chroot with nothing else), then a
small application layer (busybox's applet links, a user database, a script, and the
deletion of base-files' /etc/motd). A package layer is the package's own data tar
(``dpkg-deb --fsys-tarfile`` of the cached .deb) when apt still has the .deb, else a
tar of the installed files that ``dpkg -L`` lists. Every byte is derived from the
installed packages, so the same machine builds the same image (and image id) each time.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import subprocess
import tarfile

from . import images as imagesmod
from .errors import StoreError
from .oci.descriptor import OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST, REF_NAME, host_platform
from .oci.layout import INDEX_FILE, LAYOUT_FILE, LAYOUT_VERSION, blob_name

PACKAGES = ("base-files", "busybox-static")
APT_CACHE = "/var/cache/apt/archives"
APPLETS = ("sh", "ls", "cat", "echo", "head", "id", "uname", "wc", "sed", "grep", "rm", "mkdir")
DEMO_REF = "layerfs-demo:latest"

HELLO = """#!/bin/sh
. /etc/os-release
echo "hello from a layerfs container: $PRETTY_NAME, $(busybox | head -n 1 | cut -d' ' -f1-2)"
echo "running as $(id -un) in $(pwd), $(ls /bin | wc -l) programs in /bin"
"""


def _dpkg_query(package: str) -> tuple[str, str]:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f", "${Status}|${Version}|${Architecture}", package],
                             capture_output=True, text=True, check=False).stdout
    except FileNotFoundError:
        raise StoreError("the demo builds its image from Debian packages, and this machine has "
                         "no dpkg") from None
    status, _, rest = out.partition("|")
    if not status.endswith(" installed"):
        raise StoreError(f"the demo needs the Debian package {package} "
                         f"(apt-get install {' '.join(PACKAGES)})")
    version, _, arch = rest.partition("|")
    return version, arch


def package_layer(package: str) -> tuple[bytes, str]:
    """The layer tar of an installed package, and how it was made (for the history)."""
    version, arch = _dpkg_query(package)
    deb = os.path.join(APT_CACHE, f"{package}_{version.replace(':', '%3a')}_{arch}.deb")
    if os.path.isfile(deb):
        tar = subprocess.run(["dpkg-deb", "--fsys-tarfile", deb], capture_output=True, check=False)
        if tar.returncode == 0:
            return tar.stdout, f"dpkg-deb --fsys-tarfile {os.path.basename(deb)}"
    return _installed_files_tar(package), f"dpkg -L {package} ({version})"


def _installed_files_tar(package: str) -> bytes:
    """A tar of the files ``dpkg -L`` lists, as installed; every mtime is the package's
    install time, so a directory that other packages add to does not change the layer."""
    listed = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, check=True).stdout
    mtime = int(os.stat(f"/var/lib/dpkg/info/{package}.list").st_mtime)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for path in sorted({p for p in listed.splitlines() if p.startswith("/") and p != "/."}):
            try:
                # A directory is one even where the host has a symlink to it (merged /usr).
                st = os.stat(path) if os.path.isdir(path) else os.lstat(path)
            except OSError:
                continue  # removed by the admin, or a diversion: not in the image
            ti = tarfile.TarInfo("." + path)
            ti.mode, ti.mtime = stat.S_IMODE(st.st_mode), mtime
            if stat.S_ISDIR(st.st_mode):
                ti.type = tarfile.DIRTYPE
                tf.addfile(ti)
            elif stat.S_ISLNK(st.st_mode):
                ti.type, ti.linkname = tarfile.SYMTYPE, os.readlink(path)
                tf.addfile(ti)
            elif stat.S_ISREG(st.st_mode):
                ti.size = st.st_size
                with open(path, "rb") as f:
                    tf.addfile(ti, f)
    return buf.getvalue()


def _app_layer(mtime: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        def add(name: str, kind: str = "f", data: str = "", mode: int = 0o644) -> None:
            ti = tarfile.TarInfo(name)
            ti.mode, ti.mtime = mode, mtime
            if kind == "d":
                ti.type = tarfile.DIRTYPE
                tf.addfile(ti)
            elif kind == "l":
                ti.type, ti.linkname = tarfile.SYMTYPE, data
                tf.addfile(ti)
            else:
                raw = data.encode()
                ti.size = len(raw)
                tf.addfile(ti, io.BytesIO(raw))

        add("bin", "d", mode=0o755)
        for applet in APPLETS:
            add(f"bin/{applet}", "l", "busybox", 0o777)
        add("etc", "d", mode=0o755)
        add("etc/.wh.motd")  # base-files' motd, deleted by this layer
        add("etc/group", data="root:x:0:\nnogroup:x:65534:\n")
        add("etc/passwd", data="root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n")
        for d in ("usr", "usr/local", "usr/local/bin"):
            add(d, "d", mode=0o755)
        add("usr/local/bin/hello", data=HELLO, mode=0o755)
    return buf.getvalue()


def _blob(root: str, data: bytes, media_type: str) -> dict:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with open(os.path.join(root, blob_name(digest)), "wb") as f:
        f.write(data)
    return {"mediaType": media_type, "digest": digest, "size": len(data)}


def write_demo_layout(root: str) -> str:
    """Build the demo image into a new OCI layout at ``root``; returns ``root``."""
    layers, history = [], []
    for package in PACKAGES:
        tar, how = package_layer(package)
        layers.append(tar)
        history.append({"created_by": how})
    layers.append(_app_layer(int(imagesmod.fixed_ns() // 1_000_000_000)))
    history.append({"created_by": "layerfs demo: busybox links, /etc/passwd, /usr/local/bin/hello, "
                                  "rm /etc/motd"})
    plat = host_platform()
    created = imagesmod.rfc3339(imagesmod.fixed_ns())
    config = {"architecture": plat.architecture, "os": plat.os, "created": created,
              "config": {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin"], "Cmd": ["/usr/local/bin/hello"],
                         "WorkingDir": "/root",
                         "Labels": {"org.opencontainers.image.title": "layerfs demo",
                                    "org.opencontainers.image.description":
                                        "Debian's base-files and busybox-static, from this machine"}},
              "rootfs": {"type": "layers",
                         "diff_ids": ["sha256:" + hashlib.sha256(t).hexdigest() for t in layers]},
              "history": [{"created": created, **h} for h in history]}
    os.makedirs(os.path.join(root, "blobs", "sha256"))
    config_desc = _blob(root, json.dumps(config, indent=2).encode(), OCI_CONFIG)
    # mtime 0 and no name in the gzip header: the same tar compresses to the same bytes.
    layer_descs = [_blob(root, gzip.compress(t, 6, mtime=0), OCI_LAYER_GZIP) for t in layers]
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config_desc, "layers": layer_descs}
    manifest_desc = _blob(root, json.dumps(manifest, indent=2).encode(), OCI_MANIFEST)
    with open(os.path.join(root, LAYOUT_FILE), "wb") as f:
        f.write(LAYOUT_VERSION)
    with open(os.path.join(root, INDEX_FILE), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [{**manifest_desc, "annotations": {REF_NAME: DEMO_REF}}]}, f)
    return root
