"""A small built-in sample image: three layers that exercise whiteouts and opaque dirs.

Used by ``layerfs demo`` so a newcomer sees the store work without downloading an image.
"""

from __future__ import annotations

import io
import os
import tarfile

# (path, kind, content-or-target, mode); kind: d dir, f file, l symlink, h hardlink
_LAYERS: list[list[tuple[str, str, str, int]]] = [
    [  # base
        ("etc", "d", "", 0o755),
        ("etc/os-release", "f", 'NAME="layerfs sample"\nID=sample\nVERSION_ID=1\n', 0o644),
        ("etc/motd", "f", "Welcome to the layerfs sample image.\n", 0o644),
        ("bin", "d", "", 0o755),
        ("bin/hello", "f", "#!/bin/sh\necho hello from layer 1\n", 0o755),
        ("bin/hi", "h", "bin/hello", 0o755),
        ("usr", "d", "", 0o755),
        ("usr/share", "d", "", 0o755),
        ("usr/share/doc", "d", "", 0o755),
        ("usr/share/doc/README", "f", "documentation from the base layer\n", 0o644),
        ("usr/share/doc/CHANGES", "f", "v1: first release\n", 0o644),
        ("tmp", "d", "", 0o1777),
    ],
    [  # an update: changes a file, deletes two, adds a symlink
        ("etc", "d", "", 0o755),
        ("etc/.wh.motd", "f", "", 0o644),
        ("etc/os-release", "f", 'NAME="layerfs sample"\nID=sample\nVERSION_ID=2\n', 0o644),
        ("usr", "d", "", 0o755),
        ("usr/share", "d", "", 0o755),
        ("usr/share/doc", "d", "", 0o755),
        ("usr/share/doc/.wh.CHANGES", "f", "", 0o644),
        ("usr/bin", "d", "", 0o755),
        ("usr/bin/hello", "l", "/bin/hello", 0o777),
    ],
    [  # replaces the docs wholesale (opaque directory)
        ("usr", "d", "", 0o755),
        ("usr/share", "d", "", 0o755),
        ("usr/share/doc", "d", "", 0o755),
        ("usr/share/doc/.wh..wh..opq", "f", "", 0o644),
        ("usr/share/doc/index.txt", "f", "the docs, rewritten in layer 3\n", 0o644),
    ],
]


def write_sample_layers(directory: str) -> list[str]:
    """Write the sample's layer tarballs into ``directory``; return their paths, base first."""
    paths = []
    for i, layer in enumerate(_LAYERS, 1):
        path = os.path.join(directory, f"sample-layer{i}.tar")
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
            for name, kind, data, mode in layer:
                ti = tarfile.TarInfo(name)
                ti.mode, ti.mtime = mode, 1_700_000_000 + i
                if kind == "d":
                    ti.type = tarfile.DIRTYPE
                    tf.addfile(ti)
                elif kind == "l":
                    ti.type, ti.linkname = tarfile.SYMTYPE, data
                    tf.addfile(ti)
                elif kind == "h":
                    ti.type, ti.linkname = tarfile.LNKTYPE, data
                    tf.addfile(ti)
                else:
                    raw = data.encode()
                    ti.size = len(raw)
                    tf.addfile(ti, io.BytesIO(raw))
        paths.append(path)
    return paths
