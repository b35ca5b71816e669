"""The merged view of an image (``store.tree``, ``layerfs ls``, ``layerfs cat``).

The reference is what a container engine sees: the same layer tarballs extracted in
order by GNU tar into one directory, whiteouts applied (helpers.apply_layer_like_an_engine).
The store's merged tree must show exactly that tree: every path, its type, mode, owner,
contents, symlink target and device numbers.
"""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from helpers import (apply_layer_like_an_engine, full_tree_of_dir, full_tree_of_image,
                     make_tar, tree_differences)
from layerfs.store import Store
from layerfs.store.records import Kind

WH = ".wh."
OPQ = ".wh..wh..opq"


def _import_chain(store, tmp_path, layers, reference=None, tag=None):
    """Write each layer (make_tar member lists) as a tarball, import them as a chain of
    images and, when ``reference`` is a directory, apply them there with GNU tar."""
    img = None
    images = []
    for i, members in enumerate(layers, 1):
        tar = make_tar(str(tmp_path / f"layer{i}.tar"), members)
        if reference is not None:
            apply_layer_like_an_engine(tar, str(reference))
        img = store.import_tar(tar, parent=img.image_id if img else None,
                               tag=tag if i == len(layers) else None)
        images.append(img)
    return images


def _check_against_reference(store, tmp_path, layers):
    ref = tmp_path / "reference"
    ref.mkdir()
    images = _import_chain(store, tmp_path, layers, ref)
    expected = full_tree_of_dir(str(ref))
    actual = full_tree_of_image(store, images[-1])
    diff = tree_differences(expected, actual)
    assert not diff, "merged tree differs from GNU tar's:\n" + "\n".join(diff)
    return images[-1], actual


def _content(store, img, path):
    e = store.tree(img).lookup(path)
    assert e is not None, f"{path} is missing from the merged tree"
    assert e.kind == Kind.REG, f"{path} is a {e.kind.name}, not a file"
    with store.blobs.open(e.blob) as f:
        return f.read()


# -- fixed scenarios ----------------------------------------------------------------


SCENARIOS = {
    "file_and_dir_swap_places": [
        [("etc", "d"), ("etc/conf", "f", "v1"), ("etc/dir", "d"), ("etc/dir/a", "f", "a"),
         ("etc/dir/sub", "d"), ("etc/dir/sub/deep", "f", "deep"), ("x", "f", "x is a file"),
         ("y", "d"), ("y/inner", "f", "inner")],
        # a file where a (non-empty) directory was, a directory where a file was
        [("etc", "d"), ("etc/dir", "f", "now a file"), ("x", "d", b"", {"mode": 0o700}),
         ("x/child", "f", "child of x")],
        # and back again; y (a non-empty dir) becomes a file
        [("etc", "d"), ("etc/dir", "d"), ("etc/dir/c", "f", "c"), ("y", "f", "y is a file")],
    ],
    "directory_deleted_then_recreated": [
        [("app", "d"), ("app/old1", "f", "old1"), ("app/sub", "d"), ("app/sub/old2", "f", "old2"),
         ("data", "d"), ("data/old", "f", "old data"), ("keep", "f", "keep")],
        [(WH + "app", "f"),
         # deleted and recreated in the same layer
         (WH + "data", "f"), ("data", "d", b"", {"mode": 0o750}), ("data/new", "f", "new data")],
        [("app", "d", b"", {"mode": 0o700, "uid": 1000, "gid": 1000}), ("app/new", "f", "new app")],
    ],
    "opaque_directory_with_new_content": [
        [("usr", "d"), ("usr/share", "d"), ("usr/share/doc", "d"), ("usr/share/doc/README", "f", "r"),
         ("usr/share/doc/sub", "d"), ("usr/share/doc/sub/x", "f", "x"), ("usr/share/other", "f", "o")],
        [("usr", "d"), ("usr/share", "d"), ("usr/share/doc", "d"), ("usr/share/doc/" + OPQ, "f"),
         ("usr/share/doc/index", "f", "the new docs")],
        # a later plain directory merges with the opaque one
        [("usr", "d"), ("usr/share", "d"), ("usr/share/doc", "d"), ("usr/share/doc/more", "f", "more")],
    ],
    "whiteout_of_a_whole_subtree": [
        [("a", "d"), ("a/b", "d"), ("a/b/c", "d"), ("a/b/c/d", "d"), ("a/b/c/d/file", "f", "1"),
         ("a/b/c2", "d"), ("a/b/c2/f", "f", "2"), ("a/b/link", "l", "c2/f"), ("a/top", "f", "top"),
         ("a/bb", "f", "a sibling whose name starts like b")],
        [("a", "d"), ("a/" + WH + "b", "f")],
        [("a", "d"), ("a/b", "d"), ("a/b/fresh", "f", "fresh")],
    ],
    "symlinks": [
        [("etc", "d"), ("etc/real", "f", "real"), ("etc/abs", "l", "/etc/real"),
         ("usr", "d"), ("usr/lib", "d"), ("usr/lib/libx", "f", "libx"),
         ("lib", "l", "usr/lib"), ("dang", "l", "/nowhere"), ("etc/rel", "l", "../etc/real")],
        # a dir replaces a symlink, a symlink replaces a file and a non-empty dir
        [("lib", "d"), ("lib/own", "f", "own"), ("etc", "d"), ("etc/real", "l", "abs"),
         ("usr", "d"), ("usr/lib", "l", "../lib")],
        [(WH + "dang", "f"), ("newlink", "l", "etc"), ("etc", "d"), ("etc/abs", "f", "abs is a file")],
    ],
    "hard_links": [
        [("bin", "d"), ("bin/hello", "f", "hello", {"mode": 0o755}), ("bin/hi", "h", "bin/hello"),
         ("bin/x", "f", "x"), ("bin/y", "h", "bin/x"), ("bin/z", "h", "bin/x")],
        # one name of a group deleted, one name of the other group replaced
        [("bin", "d"), ("bin/" + WH + "hi", "f"), ("bin/y", "f", "replaced y")],
        [("bin", "d"), ("bin/new", "f", "new"), ("bin/new2", "h", "bin/new")],
    ],
    "devices_and_fifos": [
        [("dev", "d"), ("dev/null", "c", (1, 3), {"mode": 0o666}), ("dev/loop0", "b", (7, 0)),
         ("dev/fifo", "p"), ("dev/gone", "c", (1, 5))],
        [("dev", "d"), ("dev/" + WH + "gone", "f"), ("dev/fifo", "f", "a file now"),
         ("dev/null", "c", (1, 3), {"mode": 0o600, "gid": 5})],
        [("dev", "d", b"", {"mode": 0o700}), ("dev/loop0", "p")],
    ],
    "setuid_setgid_sticky_and_owners": [
        [("tmp", "d", b"", {"mode": 0o1777}), ("srv", "d", b"", {"mode": 0o2775, "gid": 50}),
         ("srv/su", "f", "su", {"mode": 0o4755, "uid": 1000}), ("srv/sg", "f", "sg", {"mode": 0o2711})],
        [("srv", "d", b"", {"mode": 0o2775, "gid": 50}), ("srv/su", "f", "su2", {"mode": 0o755})],
        [("tmp", "d", b"", {"mode": 0o1777}), ("tmp/t", "f", "t", {"uid": 65534, "gid": 65534})],
    ],
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_fixed_scenario_matches_gnu_tar(store, tmp_path, name):
    _check_against_reference(store, tmp_path, SCENARIOS[name])


def test_file_and_dir_swap_places_details(store, tmp_path):
    img, tree = _check_against_reference(store, tmp_path, SCENARIOS["file_and_dir_swap_places"])
    assert tree["etc/dir"][0] == "dir"
    assert [p for p in tree if p.startswith("etc/dir/")] == ["etc/dir/c"]
    assert _content(store, img, "y") == b"y is a file"
    assert _content(store, img, "x/child") == b"child of x"
    assert "y/inner" not in tree


def test_deleted_then_recreated_directory_holds_only_new_content(store, tmp_path):
    img, tree = _check_against_reference(store, tmp_path, SCENARIOS["directory_deleted_then_recreated"])
    assert sorted(p for p in tree if p.startswith("app/")) == ["app/new"]
    assert tree["app"][1:4] == (0o700, 1000, 1000)
    assert sorted(p for p in tree if p.startswith("data/")) == ["data/new"]
    assert _content(store, img, "keep") == b"keep"


def test_opaque_directory_hides_lower_content(store, tmp_path):
    img, tree = _check_against_reference(store, tmp_path, SCENARIOS["opaque_directory_with_new_content"])
    assert sorted(n for n, _ in store.tree(img).listdir("usr/share/doc")) == ["index", "more"]
    assert _content(store, img, "usr/share/other") == b"o"


def test_whiteout_removes_the_whole_subtree(store, tmp_path):
    img, tree = _check_against_reference(store, tmp_path, SCENARIOS["whiteout_of_a_whole_subtree"])
    assert sorted(p for p in tree if p.startswith("a/b/")) == ["a/b/fresh"]
    assert _content(store, img, "a/bb") == b"a sibling whose name starts like b"


def test_hard_links_across_layers(store, tmp_path):
    img, tree = _check_against_reference(store, tmp_path, SCENARIOS["hard_links"])
    t = store.tree(img)
    assert t.lookup("bin/hi") is None
    assert _content(store, img, "bin/hello") == b"hello"
    # the other names of y's group keep the old content
    assert _content(store, img, "bin/x") == _content(store, img, "bin/z") == b"x"
    assert _content(store, img, "bin/y") == b"replaced y"
    new, new2 = t.lookup("bin/new"), t.lookup("bin/new2")
    assert new.blob == new2.blob and new.nlink == new2.nlink == 2


def test_opaque_marker_at_the_root_hides_all_lower_layers(store, tmp_path):
    """``.wh..wh..opq`` at the top of a layer empties the root (as an engine applies it)."""
    layers = [
        [("etc", "d"), ("etc/x", "f", "x"), ("top", "f", "top")],
        [(OPQ, "f"), ("new", "f", "new")],
        [("etc", "d"), ("etc/y", "f", "y")],
    ]
    img, tree = _check_against_reference(store, tmp_path, layers)
    assert sorted(tree) == ["etc", "etc/y", "new"]


def test_layers_shared_by_images_give_each_image_its_own_tree(store, tmp_path):
    """Two images on one base; each shows only its own top layer (chains built once)."""
    base = make_tar(str(tmp_path / "base.tar"), [("d", "d"), ("d/f", "f", "base"), ("g", "f", "g")])
    left = make_tar(str(tmp_path / "left.tar"), [("d", "d"), ("d/f", "f", "left")])
    right = make_tar(str(tmp_path / "right.tar"), [(WH + "d", "f"), ("r", "f", "r")])
    b = store.import_tar(base)
    assert _content(store, b, "d/f") == b"base"  # flatten the base chain first
    li = store.import_tar(left, parent=b.image_id)
    ri = store.import_tar(right, parent=b.image_id)
    assert _content(store, li, "d/f") == b"left"
    assert sorted(full_tree_of_image(store, ri)) == ["g", "r"]
    assert sorted(full_tree_of_image(store, b)) == ["d", "d/f", "g"]
    assert _content(store, b, "d/f") == b"base"


# -- random layers (hypothesis) ------------------------------------------------------

NAMES = ("a", "b", "c")
FILE_MODES = (0o644, 0o755, 0o600, 0o4755, 0o2755)
DIR_MODES = (0o755, 0o700, 0o1777, 0o2775)
CONTENTS = (b"", b"one", b"two", b"three\n" * 200)
TARGETS = ("a", "b/c", "../a", "/a/b", "/nowhere", ".")
OWNERS = ((0, 0), (1000, 100), (0, 5))


def _draw_layer(data, existing: list[str]) -> list[tuple]:
    """One random layer over the names a, b, c (depth <= 3): files, dirs, symlinks, hard
    links, fifos, char devices, whiteouts and opaque markers, often on names the layers
    below already have. Every parent directory gets its own header (as real layers do)."""
    spec: dict[str, tuple] = {}
    opaque: set[str] = set()

    def draw_path() -> str:
        if existing and data.draw(st.booleans(), label="existing?"):
            return data.draw(st.sampled_from(existing), label="existing path")
        depth = data.draw(st.integers(1, 3), label="depth")
        return "/".join(data.draw(st.sampled_from(NAMES)) for _ in range(depth))

    def owner() -> dict:
        uid, gid = data.draw(st.sampled_from(OWNERS), label="owner")
        return {"uid": uid, "gid": gid}

    def parents_ok(path: str) -> bool:
        parts = path.split("/")
        for i in range(1, len(parts)):
            anc = "/".join(parts[:i])
            cur = spec.get(anc)
            if cur is None:
                spec[anc] = (anc, "d", b"", {"mode": data.draw(st.sampled_from(DIR_MODES)), **owner()})
            elif cur[1] != "d":
                return False
        return True

    for _ in range(data.draw(st.integers(1, 8), label="ops")):
        op = data.draw(st.sampled_from(["f", "f", "d", "l", "h", "p", "c", "wh", "wh", "opq", "opq"]),
                       label="op")
        if op == "opq":
            d = "" if data.draw(st.integers(0, 3), label="root?") == 0 else draw_path()
            if d == "":
                opaque.add("")
                continue
            if not parents_ok(d) or (d in spec and spec[d][1] != "d"):
                continue
            spec.setdefault(d, (d, "d", b"", {"mode": data.draw(st.sampled_from(DIR_MODES)), **owner()}))
            opaque.add(d)
            continue
        path = draw_path()
        if path in spec or not parents_ok(path):
            continue
        if op == "wh":
            spec[path] = (path, "wh")
        elif op == "f":
            spec[path] = (path, "f", data.draw(st.sampled_from(CONTENTS), label="content"),
                          {"mode": data.draw(st.sampled_from(FILE_MODES)), **owner()})
        elif op == "d":
            spec[path] = (path, "d", b"", {"mode": data.draw(st.sampled_from(DIR_MODES)), **owner()})
        elif op == "l":
            spec[path] = (path, "l", data.draw(st.sampled_from(TARGETS), label="target"),
                          {"mode": 0o777, **owner()})
        elif op == "p":
            spec[path] = (path, "p", b"", {"mode": 0o644, **owner()})
        elif op == "c":
            spec[path] = (path, "c", (1, data.draw(st.integers(3, 9))), {"mode": 0o666})
        elif op == "h":
            files = sorted(p for p, m in spec.items() if m[1] == "f")
            if files:
                spec[path] = (path, "h", data.draw(st.sampled_from(files), label="link to"))

    members = []
    links = []
    for path in sorted(spec, key=lambda p: p.split("/")):
        m = spec[path]
        if m[1] == "wh":
            parent, _, name = path.rpartition("/")
            members.append(((parent + "/" if parent else "") + WH + name, "f"))
        elif m[1] == "h":
            links.append(m)
        else:
            members.append(m)
            if m[1] == "d" and path in opaque:
                members.append((path + "/" + OPQ, "f"))
    if "" in opaque:
        members.insert(0, (OPQ, "f"))
    return members + links


_example = itertools.count()


# No shrink phase: one example takes ~40 ms, and shrinking a failure runs into
# hypothesis's five-minute limit; the failure message lists the layers instead.
# No example database either: nothing is written outside tmp_path.
@settings(max_examples=40, deadline=None, database=None,
          phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_random_layers_match_gnu_tar(tmp_path, data):
    work = tmp_path / f"example{next(_example)}"
    ref = work / "reference"
    ref.mkdir(parents=True)
    with Store(str(work / "store")) as store:
        images, expected, layers = [], [], []
        for i in range(data.draw(st.integers(3, 5), label="layers")):
            members = _draw_layer(data, sorted(full_tree_of_dir(str(ref))))
            layers.append(members)
            tar = make_tar(str(work / f"layer{i}.tar"), members)
            apply_layer_like_an_engine(tar, str(ref))
            images.append(store.import_tar(tar, parent=images[-1].image_id if images else None))
            expected.append(full_tree_of_dir(str(ref)))
        # the top image first (flattened from nothing), then every lower image in order
        # (each flattened from the one below it)
        for n in [len(images) - 1] + list(range(len(images) - 1)):
            diff = tree_differences(expected[n], full_tree_of_image(store, images[n]))
            assert not diff, (f"image of layers 1..{n + 1} differs from GNU tar's tree:\n"
                              + "\n".join(diff) + "\nlayers:\n"
                              + "\n".join(f"  {i + 1}: {_show(m)}" for i, m in enumerate(layers)))


def _show(members: list[tuple]) -> str:
    """A layer's members, with long contents cut short."""
    def cut(v):
        return v[:12] + b"..." if isinstance(v, bytes) and len(v) > 15 else v
    return "[" + ", ".join(repr(tuple(cut(v) for v in m)) for m in members) + "]"


# -- the CLI: ls and cat -------------------------------------------------------------


CLI_LAYERS = [
    [("etc", "d"), ("etc/real", "f", "real contents\n"), ("etc/motd", "f", "motd\n"),
     ("etc/abs", "l", "/etc/real"), ("usr", "d"), ("usr/bin", "d"),
     ("usr/bin/rel", "l", "../../etc/real"), ("usr/bin/escape", "l", "../../../../../etc/real"),
     ("etc/sibling", "l", "real"), ("usr/etc", "l", "../etc"), ("etc/dot", "l", "./sibling"),
     ("lnk", "l", "/etc"), ("chain", "l", "lnk/abs"), ("loop1", "l", "loop2"), ("loop2", "l", "loop1"),
     ("dangling", "l", "/etc/none"), ("data", "d"), ("data/old", "f", "old")],
    [("etc", "d"), ("etc/" + WH + "motd", "f"), ("etc/real", "f", "real contents v2\n"),
     ("data", "d"), ("data/" + OPQ, "f"), ("data/new", "f", "new")],
    [("usr", "d"), ("usr/bin", "d"), ("usr/bin/tool", "f", "#!/bin/sh\n", {"mode": 0o755}),
     ("usr/bin/tool2", "h", "usr/bin/tool")],
]


def test_ls_recursive_json_lists_the_merged_tree(store, tmp_path, layerfs):
    ref = tmp_path / "reference"
    ref.mkdir()
    _import_chain(store, tmp_path, CLI_LAYERS, ref, tag="cli:v1")
    expected = full_tree_of_dir(str(ref))
    proc = layerfs("ls", "-R", "--json", "cli:v1", "/", check=True)
    rows = json.loads(proc.stdout)
    by_path = {r["path"]: r for r in rows}
    assert len(by_path) == len(rows), "a path is listed twice"
    assert sorted(by_path) == sorted("/" + p for p in expected)
    kinds = {"reg": "reg", "dir": "dir", "symlink": "symlink"}
    for p, (kind, mode, uid, gid, size, _sha, target, _rdev) in expected.items():
        row = by_path["/" + p]
        assert row["type"] == kinds[kind], p
        if mode is not None:
            assert int(row["mode"], 8) == mode, p
        assert (row["uid"], row["gid"]) == (uid, gid), p
        if kind == "reg":
            assert row["size"] == size, p
        if kind == "symlink":
            assert row["target"] == target, p


def test_ls_shows_a_directory_without_whiteouts(store, tmp_path, layerfs):
    _import_chain(store, tmp_path, CLI_LAYERS, tag="cli")
    out = layerfs("ls", "cli", "/etc", check=True).stdout.decode().splitlines()
    names = [line.split(" -> ")[0].split()[-1] for line in out]
    assert names == ["abs", "dot", "real", "sibling"]
    assert out[0].startswith("l") and out[0].endswith("abs -> /etc/real")
    assert out[2].startswith("-rw-r--r--")
    # through a symlink to a directory, as ls in a chroot would
    assert layerfs("ls", "cli", "/lnk", check=True).stdout == out_bytes(out)
    assert [line.split()[-1] for line in
            layerfs("ls", "cli", "/data", check=True).stdout.decode().splitlines()] == ["new"]


def out_bytes(lines: list[str]) -> bytes:
    return "".join(line + "\n" for line in lines).encode()


@pytest.mark.parametrize("path", ["/etc/real", "etc/real", "/etc/abs", "/usr/bin/rel",
                                  "/usr/bin/escape", "/lnk/real", "/lnk/abs", "/chain",
                                  "/etc/sibling", "/usr/etc/sibling", "/usr/etc/dot",
                                  "/usr/bin/../../etc/./real", "/lnk/../etc/real"])
def test_cat_follows_symlinks_inside_the_image(store, tmp_path, layerfs, path):
    _import_chain(store, tmp_path, CLI_LAYERS, tag="cli")
    proc = layerfs("cat", "cli", path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"real contents v2\n"


def test_cat_reads_hard_linked_and_large_files(store, tmp_path, layerfs):
    big = bytes(range(256)) * 9000  # > 2 MiB, more than one read chunk
    layers = CLI_LAYERS + [[("big", "f", big)]]
    _import_chain(store, tmp_path, layers, tag="cli")
    assert layerfs("cat", "cli", "/usr/bin/tool2", check=True).stdout == b"#!/bin/sh\n"
    assert layerfs("cat", "cli", "/big", check=True).stdout == big


@pytest.mark.parametrize("path", ["/etc/motd", "/nope", "/data/old", "/etc/real/x",
                                  "/dangling", "/loop1"])
def test_cat_of_a_missing_path_fails_with_one_line(store, tmp_path, layerfs, path):
    _import_chain(store, tmp_path, CLI_LAYERS, tag="cli")
    proc = layerfs("cat", "cli", path)
    assert proc.returncode != 0
    assert proc.stdout == b""
    err = proc.stderr.decode()
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


def test_cat_of_a_directory_fails_with_one_line(store, tmp_path, layerfs):
    _import_chain(store, tmp_path, CLI_LAYERS, tag="cli")
    proc = layerfs("cat", "cli", "/etc")
    assert proc.returncode != 0 and proc.stdout == b""
    assert len(proc.stderr.decode().strip().splitlines()) == 1


def test_image_can_be_named_by_tag_id_or_unique_prefix(store, tmp_path, layerfs):
    images = _import_chain(store, tmp_path, CLI_LAYERS, tag="cli")
    img = images[-1]
    store.tag(images[0].image_id, "cli:base")
    hexid = img.image_id.removeprefix("sha256:")
    # every other image's id, so that a prefix is known to be unique
    others = [i.image_id.removeprefix("sha256:") for i in images[:-1]]
    n = next(k for k in range(1, 65) if not any(o.startswith(hexid[:k]) for o in others))
    prefix = hexid[:max(n, 4)]
    for ref in ["cli", "cli:latest", img.image_id, hexid, prefix, "sha256:" + prefix]:
        proc = layerfs("cat", ref, "/etc/real")
        assert proc.returncode == 0, (ref, proc.stderr)
        assert proc.stdout == b"real contents v2\n", ref
    # the base image by its own tag shows the first layer only
    assert layerfs("cat", "cli:base", "/etc/motd", check=True).stdout == b"motd\n"
    assert layerfs("cat", "cli:base", "/etc/real", check=True).stdout == b"real contents\n"
    for ref in ["nosuch", "cli:nosuch", "sha256:" + "0" * 64]:
        proc = layerfs("ls", ref)
        assert proc.returncode != 0 and proc.stdout == b"", ref
        assert len(proc.stderr.decode().strip().splitlines()) == 1, ref


def test_ambiguous_id_prefix_is_refused(store, tmp_path, layerfs):
    ids = []
    # 17 different images: two of them share the first hex digit of their id
    for i in range(17):
        tar = make_tar(str(tmp_path / f"l{i}.tar"), [("f", "f", f"f{i}")])
        ids.append(store.import_tar(tar, tag=f"img:v{i}").image_id.removeprefix("sha256:"))
    assert len(set(ids)) == 17
    first = sorted(ids)
    shared = next(a[0] for a, b in zip(first, first[1:]) if a[0] == b[0])
    proc = layerfs("cat", shared, "/f")
    assert proc.returncode != 0 and proc.stdout == b""
    assert len(proc.stderr.decode().strip().splitlines()) == 1
