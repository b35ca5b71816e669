"""``layerfs build``: a Dockerfile built step by step, each step a container and a commit.

FROM starts from an image of the store (pulled from a registry if the store has no
image of that name), ``scratch``, or an earlier stage. RUN executes in a container
mounted through layerfs (unionfs.mount) inside the sandbox (sandbox.py); COPY and ADD
write into such a mount (copy.py); the container's changes are committed as the next
layer (store.commit). Config-only instructions record an image with the same layers and
one more history entry. Every step's result is remembered in the build cache
(store.buildcache) under a key of its parent image and all it depends on, so an
unchanged step is not run again and an unchanged build gives the same image id.

Whatever happens, a step's container is unmounted and removed before the step ends,
and tags move only after the whole build succeeded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from layerfs.store import Store, StoreError, buildcache
from layerfs.store import images as imagesmod
from layerfs.store.commit import commit
from layerfs.store.errors import ImageNotFound, InvalidReference
from layerfs.store.records import ImageRecord

from .. import inroot
from .. import mount as mountmod
from . import config as configmod
from . import sandbox
from .context import Context, Ignore, digest as sources_digest
from .copy import Owner, copy_sources, resolve_dest
from .dockerfile import (Dockerfile, DockerfileError, Instruction, Stage, json_form, key_values, parse, word,
                         words)

CONFIG_ONLY = ("ENV", "LABEL", "MAINTAINER", "EXPOSE", "CMD", "ENTRYPOINT", "USER", "WORKDIR",
               "STOPSIGNAL", "SHELL", "HEALTHCHECK", "ONBUILD")
# Mountpoints a RUN step needs, made for the step where the image lacks them and
# removed before the commit: (path, is a directory).
PLACEHOLDERS = (("proc", True), ("dev", True), ("etc/resolv.conf", False), ("etc/hosts", False))


class StepFailed(StoreError):
    """A build step that could not be carried out (the message names the step)."""


class Progress(Protocol):
    """What a build reports as it goes."""

    def step(self, label: str, text: str) -> None: ...  # "STEP n/m", the instruction
    def output(self, data: bytes) -> None: ...  # a RUN step's output
    def done(self, image_id: str, cached: bool) -> None: ...  # a step's result
    def note(self, text: str) -> None: ...  # what the build does besides its steps
    def warn(self, text: str) -> None: ...


@dataclass(slots=True, frozen=True)
class BuildResult:
    """The built image, its tags, and how many steps ran or came from the cache."""

    image: ImageRecord
    tags: list[str]
    steps: int
    cached: int


@dataclass(slots=True)
class _State:
    """A stage as it is built: its current image and config, its build arguments."""

    image: ImageRecord
    config: dict
    args: dict[str, str | None] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        """The variables instructions see: ARG values, overridden by ENV."""
        return {**{k: v for k, v in self.args.items() if v is not None}, **configmod.env_dict(self.config)}


def read_dockerfile(context: str, dockerfile: str | None) -> str:
    """The Dockerfile's text: ``dockerfile`` (``-``: stdin), else CONTEXT/Dockerfile."""
    path = dockerfile or os.path.join(context, "Dockerfile")
    try:
        if path == "-":
            return sys.stdin.read()
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise DockerfileError(f"no Dockerfile at {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DockerfileError(f"cannot read the Dockerfile {path}: {getattr(e, 'strerror', None) or e}") from None


def build(store: Store, context: str, dockerfile_text: str, progress: Progress, *,
          tags: tuple[str, ...] = (), build_args: dict[str, str] | None = None,
          no_cache: bool = False, registry_opts: dict | None = None) -> BuildResult:
    """Build the Dockerfile's last stage (and the stages it needs); tag the result."""
    tags_ = [imagesmod.parse_reference(t) for t in tags]  # a bad tag fails before any work
    df = parse(dockerfile_text)
    b = _Builder(store, Context(context), df, progress, build_args or {}, no_cache, registry_opts or {})
    image = b.run()
    for t in tags_:
        store.tag(image.image_id, t)
    unused = sorted(set(b.build_args) - b.declared)
    if unused:
        progress.warn(f"build arguments not consumed by any ARG: {', '.join(unused)}")
    return BuildResult(image, tags_, b.steps, b.cached)


def _key(*parts) -> bytes:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()).digest()


def _fresh_config() -> dict:
    return json.loads(imagesmod.new_config(None, None, 0, {})) | {"history": []}


class _Builder:
    def __init__(self, store: Store, context: Context, df: Dockerfile, progress: Progress,
                 build_args: dict[str, str], no_cache: bool, registry_opts: dict) -> None:
        self.store, self.context, self.df, self.progress = store, context, df, progress
        self.build_args, self.no_cache, self.registry_opts = build_args, no_cache, registry_opts
        self.declared: set[str] = set()
        self.steps = self.cached = 0
        self.results: dict[int, ImageRecord] = {}
        self.global_args: dict[str, str | None] = {}
        for inst in df.global_args:
            self._declare(self.global_args, inst, self.global_args_env())

    def global_args_env(self) -> dict[str, str]:
        return {k: v for k, v in self.global_args.items() if v is not None}

    def _declare(self, args: dict[str, str | None], inst: Instruction, env: dict[str, str],
                 defaults: dict[str, str | None] | None = None) -> None:
        for name, default in key_values(inst, env, self.df.escape):
            self.declared.add(name)
            if name in self.build_args:
                args[name] = self.build_args[name]
            elif default is not None:
                args[name] = default
            else:
                args[name] = (defaults or {}).get(name)

    # -- stages ---------------------------------------------------------------------

    def _needed(self) -> list[Stage]:
        """The last stage and the stages it needs (FROM an earlier stage, COPY --from)."""
        stages = self.df.stages
        need = {len(stages) - 1}
        for stage in reversed(stages):
            if stage.index not in need:
                continue
            base = self._stage_ref(word(stage.base, self.global_args_env(), self.df.escape), stage.index)
            if base is not None:
                need.add(base)
            for inst in stage.instructions:
                ref = inst.flag("from") if inst.keyword == "COPY" else None
                if ref is not None:
                    found = self._stage_ref(ref, stage.index)
                    if found is not None:
                        need.add(found)
        return [s for s in stages if s.index in need]

    def _stage_ref(self, ref: str, before: int) -> int | None:
        """The index of the earlier stage ``ref`` names (by name or number), or None."""
        for s in self.df.stages[:before]:
            if s.name == ref.lower() or ref == str(s.index):
                return s.index
        return None

    def run(self) -> ImageRecord:
        needed = self._needed()
        last = None
        for i, stage in enumerate(needed):
            prefix = f"[{i + 1}/{len(needed)}] " if len(needed) > 1 else ""
            last = self._stage(stage, prefix)
            self.results[stage.index] = last
        assert last is not None
        return last

    def _stage(self, stage: Stage, prefix: str) -> ImageRecord:
        base_ref = word(stage.base, self.global_args_env(), self.df.escape, stage.line)
        self.progress.step(f"{prefix}STEP 1/{len(stage.instructions) + 1}",
                           f"FROM {base_ref}" + (f" AS {stage.name}" if stage.name else ""))
        try:
            base = self._from(base_ref, stage)
        except StoreError as e:
            raise StepFailed(f"{prefix}STEP 1/{len(stage.instructions) + 1} (Dockerfile line {stage.line}) "
                             f"FROM {base_ref}: {_reason(e, stage.line)}") from None
        config = json.loads(base.config)
        triggers = self._triggers(config, stage)
        config.get("config", {}).pop("OnBuild", None)  # a trigger runs once, in the image built FROM it
        st = _State(base, config)
        todo = triggers + stage.instructions
        total = len(todo) + 1
        for n, inst in enumerate(todo, 2):
            label = f"{prefix}STEP {n}/{total}"
            self.progress.step(label, inst.text)
            try:
                self._step(st, inst)
            except StoreError as e:
                raise StepFailed(f"{label} (Dockerfile line {inst.line}) {_short(inst.text)}: "
                                 f"{_reason(e, inst.line)}") from None
        return st.image

    def _from(self, ref: str, stage: Stage) -> ImageRecord:
        if ref.lower() == "scratch":
            return self._empty_image()
        earlier = self._stage_ref(ref, stage.index)
        if earlier is not None:
            return self.results[earlier]
        try:
            return self.store.resolve_image(ref)
        except ImageNotFound:
            pass
        except InvalidReference:
            raise DockerfileError("not an image reference") from None
        return self._pull(ref, stage)

    def _pull(self, ref: str, stage: Stage) -> ImageRecord:
        from layerfs.store.oci.descriptor import Platform
        from layerfs.store.registry import Reference, Registry
        from layerfs.store.registry.pull import pull

        try:
            reference = Reference.parse(ref)
        except StoreError:
            raise DockerfileError("no such image in the store, and not a registry reference") from None
        self.progress.note(f"{ref} is not in the store: pulling it")
        want = Platform.parse(stage.platform) if stage.platform else None
        try:
            with Registry.for_reference(reference, **self.registry_opts) as registry:
                return pull(self.store, reference, registry, None, want).image
        except StoreError as e:
            raise StepFailed(f"no such image in the store, and the pull failed: {e}") from None

    def _triggers(self, config: dict, stage: Stage) -> list[Instruction]:
        out = []
        for text in config.get("config", {}).get("OnBuild") or []:
            try:
                parsed = parse(f"FROM scratch\n{text}\n").stages[0].instructions
            except DockerfileError as e:
                raise DockerfileError(f"an ONBUILD trigger of the base image: {e}") from None
            out += [Instruction(i.keyword, i.args, stage.line, i.flags) for i in parsed]
        return out

    def _empty_image(self) -> ImageRecord:
        """The image ``scratch`` stands for: no layers, a fresh config (the same record
        every time, kept as the cache keeps its images)."""
        raw = imagesmod.canonical_json(_fresh_config())
        rec = ImageRecord(imagesmod.digest(raw), (), raw, 0)
        key = _key("scratch", rec.image_id)
        if buildcache.lookup(self.store.index, key) is None:
            self._record(rec)
            buildcache.remember(self.store.index, key, rec.image_id)
        return rec

    def _record(self, rec: ImageRecord) -> None:
        with self.store.blobs.ingest() as ingest:
            self.store.record_images(ingest, [], [(rec, [])])

    # -- steps ----------------------------------------------------------------------

    def _step(self, st: _State, inst: Instruction) -> None:
        kw = inst.keyword
        env = st.env()
        if kw == "ARG":
            self._declare(st.args, inst, env, self.global_args)
            self._config_step(st, inst, f"ARG {' '.join(n for n, _ in key_values(inst, env, self.df.escape))}",
                              extra=sorted((k, v) for k, v in st.args.items() if v is not None))
        elif kw in CONFIG_ONLY:
            configmod.apply(st.config, inst, env, self.df.escape)
            self._config_step(st, inst, _history_text(inst, env, self.df.escape))
        elif kw == "VOLUME":
            paths = configmod.volumes(inst, env, self.df.escape)
            configmod.apply(st.config, inst, env, self.df.escape)
            missing = [p for p in paths if not self._exists(st.image, p)]
            if missing:
                self._layer_step(st, f"VOLUME {paths}", ["VOLUME", missing, st.config.get("config")],
                                 lambda root, c: _make_dirs(root, missing))
            else:
                self._config_step(st, inst, f"VOLUME {paths}")
        elif kw == "RUN":
            self._run(st, inst, env)
        elif kw in ("COPY", "ADD"):
            self._copy(st, inst, env)
        else:
            raise DockerfileError(f"{kw} is not supported here")

    def _exists(self, image: ImageRecord, path: str) -> bool:
        try:
            self.store.tree(image).resolve(path)
            return True
        except StoreError:
            return False

    def _cache(self, key: bytes) -> ImageRecord | None:
        if self.no_cache:
            return None
        found = buildcache.lookup(self.store.index, key)
        return self.store.resolve_image(found) if found else None

    def _finish(self, st: _State, key: bytes, make: Callable[[], ImageRecord]) -> None:
        """Take the step's image from the cache, or make it and remember it."""
        self.steps += 1
        image = self._cache(key)
        if image is not None:
            self.cached += 1
            self.progress.done(image.image_id, cached=True)
        else:
            image = make()
            buildcache.remember(self.store.index, key, image.image_id)
            self.progress.done(image.image_id, cached=False)
        st.image, st.config = image, json.loads(image.config)

    def _config_step(self, st: _State, inst: Instruction, created_by: str, extra=None) -> None:
        history = {"created_by": created_by, "empty_layer": True}
        key = _key(st.image.image_id, inst.keyword, created_by, st.config.get("config"),
                   st.config.get("author"), extra)

        def make() -> ImageRecord:
            created = imagesmod.now_ns()
            raw = imagesmod.new_config(st.config, None, created, history)
            rec = ImageRecord(imagesmod.digest(raw), st.image.layers, raw, created)
            self._record(rec)
            return rec

        self._finish(st, key, make)

    def _layer_step(self, st: _State, created_by: str, key_parts: list,
                    work: Callable[[str, object], list[str] | None]) -> None:
        """A step that changes files: ``work(root, container)`` on a mounted container
        of the current image; its changes become the next layer."""
        key = _key(st.image.image_id, created_by, key_parts)
        self._finish(st, key, lambda: self._in_container(st, created_by, work))

    def _in_container(self, st: _State, created_by: str,
                      work: Callable[[str, object], list[str] | None]) -> ImageRecord:
        store = self.store
        c = store.create_container(st.image.image_id)
        try:
            root = os.path.join(store.containers.dir, c.id, "rootfs")
            os.mkdir(root, 0o700)
            # nodev: a device node in an image must not open the host's device for a step.
            mountmod.mount(store, c.id, root, options={"nodev": True})
            try:
                placeholders = work(root, c) or []
            finally:
                mountmod.umount(store, c.id)
            _drop_placeholders(store.containers.upper(c), store.tree(st.image), placeholders)
            return commit(store, store.containers.get(c.id), config=st.config, created_by=created_by)
        finally:
            with contextlib.suppress(StoreError):
                mountmod.remove(store, c.id, force=True)

    # -- RUN ------------------------------------------------------------------------

    def _run(self, st: _State, inst: Instruction, env: dict[str, str]) -> None:
        argv = configmod.command(inst, st.config)
        # Build arguments reach RUN as environment variables (not kept in the image);
        # their values are part of the cache key, and shown in the history as docker does.
        cfg_env = configmod.env_dict(st.config)
        args = sorted((k, v) for k, v in st.args.items() if v is not None and k not in cfg_env)
        created_by = (f"|{len(args)} {' '.join(f'{k}={v}' for k, v in args)} " if args else "") + " ".join(argv)
        run_env = [f"{k}={v}" for k, v in args] + list(st.config.get("config", {}).get("Env") or [])
        cfg = st.config.get("config", {})

        def work(root: str, c) -> list[str]:
            placeholders = _make_placeholders(root)
            here = os.path.dirname(root)
            resolv, hosts = os.path.join(here, "resolv.conf"), os.path.join(here, "hosts")
            hostname = c.id[:12]
            _write(resolv, _host_file("/etc/resolv.conf", ""))
            _write(hosts, _host_file("/etc/hosts", "127.0.0.1\tlocalhost\n::1\tlocalhost\n")
                   + f"127.0.1.1\t{hostname}\n")
            spec = sandbox.RunSpec(root, argv, run_env, cfg.get("WorkingDir") or "/", cfg.get("User") or "",
                                   hostname, resolv, hosts)
            code = sandbox.run(spec, self.progress.output)
            if code != 0:
                raise StepFailed(f"the command {_short(json.dumps(argv))} exited with status {code}")
            return placeholders

        self._layer_step(st, created_by, ["RUN", argv, args], work)

    # -- COPY / ADD -----------------------------------------------------------------

    def _copy(self, st: _State, inst: Instruction, env: dict[str, str]) -> None:
        esc = self.df.escape
        parts = json_form(inst)
        parts = parts if parts is not None else words(inst.args, env, esc, inst.line)
        if len(parts) < 2:
            raise DockerfileError(f"{inst.keyword} takes SOURCE... DEST")
        patterns, dest_word = parts[:-1], parts[-1]
        what = inst.keyword
        cfg = st.config.get("config", {})
        dest = resolve_dest(dest_word, cfg.get("WorkingDir") or "/")
        chown = word(inst.flag("chown") or "", env, esc, inst.line)
        chmod_text = inst.flag("chmod")
        chmod = None
        if chmod_text is not None:
            if not re.fullmatch(r"[0-7]{3,4}", chmod_text):
                raise DockerfileError(f"--chmod takes an octal mode, got {chmod_text!r}")
            chmod = int(chmod_text, 8)
        if inst.keyword == "ADD" and any(re.match(r"^[a-z][a-z0-9+.-]*://", p, re.I) or p.startswith("git@")
                                         for p in patterns):
            raise DockerfileError("ADD from a URL is not supported by layerfs build (fetch it with RUN, "
                                  "or put the file in the context)")
        created_by = f"{inst.keyword} {' '.join(f'--{k}={v}' for k, v in inst.flags)} {' '.join(patterns)} {dest}"
        created_by = " ".join(created_by.split())
        from_ref = inst.flag("from")
        if from_ref is not None:
            source_image = self._from_image(word(from_ref, env, esc, inst.line), inst)
            key_parts = ["COPY-from", source_image.image_id, patterns, dest, chown, chmod]

            def work(root: str, c) -> None:
                owner = _owner(root, chown, chmod)
                with _image_sources(self.store, source_image, c, patterns, what) as sources:
                    copy_sources(root, sources, dest, owner, what)
        else:
            sources = self.context.sources(patterns, what)
            key_parts = [inst.keyword, sources_digest(sources), [s.name for s in sources], dest, chown, chmod]

            def work(root: str, c) -> None:
                copy_sources(root, sources, dest, _owner(root, chown, chmod), what,
                             extract=inst.keyword == "ADD")
        self._layer_step(st, created_by, key_parts, work)

    def _from_image(self, ref: str, inst: Instruction) -> ImageRecord:
        """The image COPY --from names: an earlier stage (by name or number) or an image."""
        for s in self.df.stages:
            if s.name == ref.lower() or ref == str(s.index):
                if s.index not in self.results:
                    raise DockerfileError(f"--from={ref} names this stage or a later one")
                return self.results[s.index]
        try:
            return self.store.resolve_image(ref)
        except StoreError:
            raise DockerfileError(f"--from={ref}: no such stage or image") from None


def _reason(e: StoreError, line: int) -> str:
    """An error's message without the line number the step's label already gives."""
    return str(e).removeprefix(f"Dockerfile line {line}: ")


def _short(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[:n - 3] + "..."


def _history_text(inst: Instruction, env: dict[str, str], escape: str) -> str:
    if inst.keyword in ("ENV", "LABEL"):
        return f"{inst.keyword} " + " ".join(f"{k}={v}" for k, v in key_values(inst, env, escape))
    return inst.text


def _host_file(path: str, fallback: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return fallback


def _write(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, 0o644)


def _make_dirs(root: str, paths: list[str]) -> None:
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for p in paths:
            os.close(inroot.make_dirs(root_fd, p))
    finally:
        os.close(root_fd)


def _make_placeholders(root: str) -> list[str]:
    """Make the mountpoints a RUN step needs where the image lacks them; returns what was
    made (paths in the root, symlinks resolved), for :func:`_drop_placeholders`."""
    made: list[str] = []
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for path, is_dir in PLACEHOLDERS:
            try:
                os.close(inroot.openat2_in_root(root_fd, path, os.O_PATH))
                continue  # there already (or not a kind we mount over: sandbox skips it)
            except FileNotFoundError:
                pass
            except OSError:
                continue
            created: list[str] = []
            try:
                fd, name = inroot.parent_and_name(root_fd, path, make=True, created=created)
            except OSError:
                continue
            try:
                if is_dir:
                    os.mkdir(name, 0o755, dir_fd=fd)
                else:
                    os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644,
                                     dir_fd=fd))
                created.append(os.path.join(os.readlink(f"/proc/self/fd/{fd}"), name))
            except OSError:
                pass
            finally:
                os.close(fd)
            made += [os.path.relpath(p, root) for p in created]
    finally:
        os.close(root_fd)
    return made


def _drop_placeholders(upper: str, lower, made: list[str]) -> None:
    """Remove from the upper layer the mountpoints :func:`_make_placeholders` made, and
    the directories copied up only to hold them (unchanged, now empty), so that they
    never reach the layer."""
    if not made:
        return
    parents = {posixpath.dirname(p) for p in made}
    while "" not in parents and parents:
        parents |= {posixpath.dirname(p) for p in parents}
    for rel in sorted(set(made) | parents - {""}, key=lambda p: p.count("/"), reverse=True):
        path = os.path.join(upper, rel)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        parent_st = os.lstat(os.path.dirname(path))
        if rel in made:
            if os.path.isdir(path) and not os.path.islink(path):
                if os.listdir(path):
                    continue  # the step put something there: it stays
                os.rmdir(path)
            elif st.st_size == 0:
                os.unlink(path)
        else:
            below = lower.lookup(rel)
            if (not os.path.isdir(path) or os.path.islink(path) or os.listdir(path) or os.listxattr(path)
                    or below is None or (below.mode, below.uid, below.gid) != (st.st_mode & 0o7777, st.st_uid, st.st_gid)):
                continue
            os.rmdir(path)
        os.utime(os.path.dirname(path), ns=(parent_st.st_atime_ns, parent_st.st_mtime_ns))


def _read_in_root(root: str, path: str) -> list[str]:
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = inroot.openat2_in_root(root_fd, path, os.O_RDONLY)
    except OSError:
        return []
    finally:
        os.close(root_fd)
    with os.fdopen(fd, encoding="utf-8", errors="replace") as f:
        return [line.rstrip("\n").split(":") for line in f if line.count(":") >= 2]


def _owner(root: str, chown: str, chmod: int | None) -> Owner:
    """``--chown=USER[:GROUP]`` as ids, names read from the image's /etc/passwd and
    /etc/group; a user alone gives the group of the same id, as docker does."""
    if not chown:
        return Owner(chmod=chmod)
    user, _, group = chown.partition(":")

    def lookup(name: str, file: str) -> int:
        if name.isdigit():
            return int(name)
        for fields in _read_in_root(root, file):
            if fields[0] == name and fields[2].isdigit():
                return int(fields[2])
        raise DockerfileError(f"--chown: no {'user' if 'passwd' in file else 'group'} {name!r} in the image's {file}")

    uid = lookup(user, "etc/passwd")
    gid = lookup(group, "etc/group") if group else uid
    return Owner(uid, gid, chmod)


@contextlib.contextmanager
def _image_sources(store: Store, image: ImageRecord, c, patterns: list[str], what: str):
    """The sources COPY --from names, read from the image mounted read-only."""
    where = os.path.join(store.containers.dir, c.id, "from")
    os.mkdir(where, 0o700)
    src = mountmod.mount(store, image.image_id, where, read_only=True)
    try:
        ctx = _ImageContext(where)
        try:
            yield ctx.sources(patterns, what)
        finally:
            ctx.close()
    finally:
        mountmod.umount(store, src.id)


class _ImageContext(Context):
    """A mounted image as a COPY source: paths resolved inside it (a symlink to /usr is
    the image's /usr), no .dockerignore."""

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)
        self.ignore = Ignore([])
        self.root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        self.fds: list[int] = []

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        os.close(self.root_fd)

    def _inside(self, rel: str, what: str) -> str:
        try:
            fd = inroot.openat2_in_root(self.root_fd, rel, os.O_PATH)
        except FileNotFoundError:
            raise DockerfileError(f"{what}: {rel}: no such file or directory in the image") from None
        self.fds.append(fd)
        return f"/proc/self/fd/{fd}"
