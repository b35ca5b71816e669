"""The ``layerfs`` command: parse arguments, call the store, print results.

Every command takes ``--root`` (default $LAYERFS_ROOT, else the per-user or system
store) and every listing takes ``--json``. Store errors become one line on stderr and
the error's exit code.
"""

from __future__ import annotations

import gc as _gc  # (gc is a command below)

# The collector is off while the CLI's modules load: they make only objects that live as
# long as the process, and the collections would walk them all for nothing (~8 ms).
_collecting = _gc.isenabled()
_gc.disable()
try:
    import contextlib
    import datetime
    import functools
    import json
    import os
    import stat
    import sys
    import threading
    import time

    import click
    import lmdb

    from layerfs.store import Store, StoreError
    from layerfs.store.progress import SILENT, Progress
    from layerfs.store.records import Entry, Kind, LayerRecord
finally:
    if _collecting:
        _gc.enable()


class _Cli(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except StoreError as e:
            click.echo(f"layerfs: {e}", err=True)
            ctx.exit(e.exit_code)
        except lmdb.Error as e:  # a damaged index, caught wherever the store did not
            click.echo(f"layerfs: the index is damaged ({e}); run layerfs fsck", err=True)
            ctx.exit(1)
        except BrokenPipeError:
            sys.stderr.close()  # the reader went away (layerfs cat ... | head): not an error
            ctx.exit(0)
        except OSError as e:  # what the store did not turn into a StoreError itself
            where = f"{e.filename}: " if e.filename else ""
            click.echo(f"layerfs: {where}{e.strerror or e}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("layerfs: interrupted", err=True)
            ctx.exit(130)


ROOT_HELP = ("Store directory [env LAYERFS_ROOT; default /var/lib/layerfs as root, else "
             "~/.local/share/layerfs]; before or after the command.")


def _root_after_command(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--root`` given after the command, merged with one given before it (or by
    $LAYERFS_ROOT): podman and skopeo take store-wide options before the command, most
    people type them after; both work, and two different roots are refused."""
    before = ctx.find_root().params.get("root")
    if value is None:
        return before
    source = ctx.find_root().get_parameter_source("root")
    if before is not None and source == click.core.ParameterSource.COMMANDLINE and \
            Store.root_of(before) != Store.root_of(value):
        raise click.UsageError(f"--root given twice: {before} before the command, {value} after it")
    return value


root_option = click.option("--root", metavar="DIR", callback=_root_after_command, help=ROOT_HELP)


def open_store(root: str | None, create: bool = False) -> Store:
    """Open the store (made only if ``create``), printing its notes (a store found
    readable by others) on stderr."""
    store = Store(root, create=create)
    for note in store.notes:
        click.echo(f"layerfs: note: {note}", err=True)
    return store


def with_store(fn=None, *, create: bool = False):
    """Add ``--root`` and pass an open Store as the first argument. Only commands that
    add to the store (``create``) make one; the others fail with "no store at DIR"."""
    def decorate(fn):
        @root_option
        @functools.wraps(fn)
        def wrapper(root, **kwargs):
            with open_store(root, create) as store:
                return fn(store, **kwargs)
        return wrapper
    return decorate(fn) if fn is not None else decorate


def _complete(kinds: str, dirs: bool = False):
    """Shell completion of names in the store (``kinds``: "i" image tags, "c" container
    names, "l" layer ids), and of directories too if ``dirs``: read from an existing store
    only, never one made for it."""
    def complete(ctx: click.Context, param: click.Parameter, incomplete: str) -> list:
        # (bash drops the names before a "dir" item, so it goes first)
        found: list = [click.shell_completion.CompletionItem(incomplete, type="dir")] if dirs else []
        root = ctx.params.get("root") or ctx.find_root().params.get("root")
        try:
            with Store(root, create=False) as store:
                names = []
                if "i" in kinds:
                    names += [t for _, tags in store.images() for t in tags]
                if "c" in kinds:
                    names += [c.name for c in store.containers.list()]
                if "l" in kinds:
                    names += [layer.diff_id for layer in store.layers()]
        except (StoreError, OSError, lmdb.Error):
            return found
        return found + [n for n in names if n.startswith(incomplete)]
    return complete


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


def short(digest: str) -> str:
    return digest.removeprefix("sha256:")[:12]


def human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1000
    return str(n)


def when(ns: int) -> str:
    return datetime.datetime.fromtimestamp(ns / 1e9).strftime("%Y-%m-%d %H:%M:%S")


def table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("   ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def _on_terminal(quiet: bool) -> bool:
    """Whether to draw progress: on a terminal (stderr), unless --quiet."""
    return not quiet and sys.stderr.isatty()


class _Status(Progress):
    """A long command's progress as one line on stderr ("gc: deleting blobs 120/3000"),
    redrawn in place at most ten times a second and erased at the end, so that what
    remains is the command's result."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.what, self.total, self.unit, self.done = "", 0, "", 0
        self.last = 0.0
        self.drawn = False

    def stage(self, what: str, total: int = 0, unit: str = "") -> None:
        self.what, self.total, self.unit, self.done = what, total, unit, 0
        self._draw(force=True)

    def advance(self, n: int = 1) -> None:
        self.done += n
        self._draw(force=False)

    def _draw(self, force: bool) -> None:
        if not force and time.monotonic() - self.last < 0.1:
            return
        self.last = time.monotonic()
        count = human if self.unit == "B" else str
        amount = ""
        if self.total:
            amount = f" {count(self.done)}/{count(self.total)} {min(100, self.done * 100 // self.total)}%"
        elif self.done:
            amount = f" {count(self.done)}"
        sys.stderr.write(f"\r{self.label}: {self.what}{amount}\x1b[K")
        sys.stderr.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


@contextlib.contextmanager
def progress_line(label: str, quiet: bool):
    """A Progress for a long command: a status line on a terminal, else silent."""
    if not _on_terminal(quiet):
        yield SILENT
        return
    status = _Status(label)
    try:
        yield status
    finally:
        status.close()


quiet_option = click.option("-q", "--quiet", is_flag=True,
                            help="No progress (it is shown only on a terminal anyway).")


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--root", envvar="LAYERFS_ROOT", metavar="DIR", help=ROOT_HELP)
@click.version_option(package_name="layerfs", prog_name="layerfs", message="%(prog)s %(version)s")
def cli(root: str | None) -> None:
    """layerfs: a union filesystem and layer store for container images.

    Shell completion (commands, options, image and container names):
    eval "$(_LAYERFS_COMPLETE=bash_source layerfs)" in ~/.bashrc; zsh_source, fish_source
    for zsh and fish.
    """


def _progress_import(store: Store, tarball: str, parent, tag, created_ns, quiet: bool):
    size = os.path.getsize(tarball) if tarball != "-" and os.path.isfile(tarball) else 0
    with progress_line("import-layer", quiet) as progress:
        progress.stage("reading " + ("stdin" if tarball == "-" else os.path.basename(tarball)), size, "B")
        return store.import_tar(tarball, parent=parent, tag=tag, progress=progress.advance,
                                created_ns=created_ns)


def _created(value: str | None) -> int | None:
    from layerfs.store.images import parse_time

    return parse_time(value) if value else None


created_option = click.option(
    "--created", metavar="TIME",
    help="The image's created time: now, @SECONDS or RFC 3339 [default: SOURCE_DATE_EPOCH, "
         "else 1970-01-01, so the same input gives the same image id].")


@cli.command("import-layer")
@click.argument("tarball")
@click.option("--parent", help="Image to put the layer on.")
@click.option("-t", "--tag", help="Tag the new image NAME[:TAG].")
@created_option
@quiet_option
@with_store(create=True)
def import_layer(store: Store, tarball: str, parent: str | None, tag: str | None,
                 created: str | None, quiet: bool) -> None:
    """Import a layer tarball (plain, gzip, zstd, bzip2, xz; - for stdin); print the image id."""
    click.echo(_progress_import(store, tarball, parent, tag, _created(created), quiet).image_id)


@cli.command("import-dir")
@click.argument("directory")
@click.option("--parent", help="Image to put the layer on.")
@click.option("-t", "--tag", help="Tag the new image NAME[:TAG].")
@created_option
@quiet_option
@with_store(create=True)
def import_dir(store: Store, directory: str, parent: str | None, tag: str | None,
               created: str | None, quiet: bool) -> None:
    """Import a directory tree as a layer; print the image id."""
    with progress_line("import-dir", quiet) as progress:
        image = store.import_dir(directory, parent=parent, tag=tag, created_ns=_created(created),
                                 progress=progress)
    click.echo(image.image_id)


class _LoadBars:
    """A progress bar per layer on a terminal (stderr) unless quiet; silent otherwise."""

    def __init__(self, quiet: bool = False) -> None:
        self.tty = _on_terminal(quiet)

    @contextlib.contextmanager
    def layer(self, number: int, count: int, diff_id: str, size: int, stored: bool):
        label = f"layer {number}/{count} {short(diff_id)}"
        if not self.tty:
            yield lambda n: None
        elif stored:
            click.echo(f"{label}: already stored", err=True)
            yield lambda n: None
        else:
            with click.progressbar(length=max(size, 1), label=label, file=sys.stderr) as bar:
                yield bar.update


def _load(store: Store, path: str, tags: tuple[str, ...], platform: str | None, quiet: bool = False) -> None:
    from layerfs.store.oci.loadsave import load as load_images

    for rec, names in load_images(store, path, tags, platform, _LoadBars(quiet)):
        for name in names:
            click.echo(f"Loaded image: {name}")
        click.echo(f"Loaded image ID: {rec.image_id}")


@cli.command()
@click.argument("path", default="-")
@click.option("-t", "--tag", "tags", multiple=True, help="Also tag the image NAME[:TAG].")
@click.option("--platform", metavar="OS/ARCH[/VARIANT]",
              help="The platform to take from a multi-platform index [default: this machine's].")
@quiet_option
@with_store(create=True)
def load(store: Store, path: str, tags: tuple[str, ...], platform: str | None, quiet: bool) -> None:
    """Load images from an OCI layout (a directory or a tar of one) or a docker archive
    (- or nothing: stdin); every digest is checked, and nothing is stored on an error."""
    _load(store, path, tags, platform, quiet)


@cli.command()
@click.argument("images", nargs=-1, required=True, shell_complete=_complete("i"))
@click.option("-o", "--output", required=True, help="File or directory to write (- for stdout).")
@click.option("--format", "fmt", type=click.Choice(["oci", "oci-dir", "docker"]), default="oci",
              show_default=True, help="A tar of an OCI layout, an OCI layout directory, or a "
                                      "docker archive.")
@click.option("--compress", type=click.Choice(["gzip", "zstd", "none"]),
              help="Layer compression (oci formats) [default: gzip; docker: none].")
@quiet_option
@with_store
def save(store: Store, images: tuple[str, ...], output: str, fmt: str, compress: str | None,
         quiet: bool) -> None:
    """Write IMAGES to an OCI layout or a docker archive; the same images give the same bytes."""
    from layerfs.store.oci.loadsave import save as save_images

    with progress_line("save", quiet) as progress:
        saved = save_images(store, images, output, fmt, compress, progress)
    for image in saved:
        if output != "-":
            click.echo(f"{image.image.image_id} {image.manifest.descriptor.digest}")


class _Lines:
    """One status line per layer on a terminal (stderr), redrawn in place at most ten
    times a second; nothing elsewhere (as load's bars), so that a script sees only the
    result, or one error line."""

    def __init__(self, quiet: bool = False) -> None:
        self.tty = _on_terminal(quiet)
        self.rows: list[str] = []
        self.drawn = 0
        self.last = 0.0
        self.lock = threading.Lock()

    def start(self, labels: list[str]) -> None:
        with self.lock:
            self.rows = [f"{label}: waiting" for label in labels]
            self.labels = labels
            self._draw(force=True)

    def set(self, i: int, status: str, done: bool = False) -> None:
        with self.lock:
            row = f"{self.labels[i]}: {status}"
            # A new stage (downloading -> extracting) is always shown; amounts at most 10/s.
            new_stage = row.split()[:4] != self.rows[i].split()[:4]
            self.rows[i] = row
            self._draw(force=done or new_stage)

    def _draw(self, force: bool) -> None:
        if not self.tty or (not force and time.monotonic() - self.last < 0.1):
            return
        self.last = time.monotonic()
        up = f"\x1b[{self.drawn}F" if self.drawn else ""
        sys.stderr.write(up + "".join(f"{row}\x1b[K\n" for row in self.rows))
        sys.stderr.flush()
        self.drawn = len(self.rows)


def _amount(done: int, total: int) -> str:
    return f"{human(done)}/{human(total)}"


class _PullLines(_Lines):
    """pull's progress: download, then extraction, per layer."""

    def plan(self, layers, states) -> None:
        self.sizes = [d.size for d in layers]
        self.start([f"layer {i}/{len(layers)} {short(d.digest)}" for i, d in enumerate(layers, 1)])
        for i, state in enumerate(states):
            if state == "stored":
                self.set(i, "already in the store", done=True)
            elif state == "here":
                self.set(i, "downloaded by an earlier pull; checking")

    def fetching(self, number: int, done: int) -> None:
        self.set(number - 1, f"downloading {_amount(done, self.sizes[number - 1])}")

    def fetched(self, number: int) -> None:
        self.set(number - 1, "downloaded")

    @contextlib.contextmanager
    def layer(self, number: int, count: int, diff_id: str, size: int, stored: bool):
        if stored:
            yield lambda n: None
            return
        read = 0

        def advance(n: int) -> None:
            nonlocal read
            read += n
            self.set(number - 1, f"extracting {_amount(read, size)}")

        yield advance
        self.set(number - 1, "done", done=True)


class _PushLines(_Lines):
    """push's progress, per blob (the layers, then the config)."""

    def plan(self, blobs) -> None:
        self.sizes = [d.size for d in blobs]
        n = len(blobs) - 1
        self.start([f"layer {i}/{n} {short(d.digest)}" for i, d in enumerate(blobs[:-1], 1)]
                   + [f"config {short(blobs[-1].digest)}"])

    def sending(self, number: int, done: int) -> None:
        self.set(number - 1, f"pushing {_amount(done, self.sizes[number - 1])}")

    def finished(self, number: int, outcome) -> None:
        words = {"exists": "already on the registry", "mounted": "mounted from another repository",
                 "uploaded": "pushed"}
        self.set(number - 1, words[outcome.value], done=True)


def registry_options(fn):
    """--username, --password-stdin and --insecure, passed on as one ``registry_opts``."""
    @click.option("--username", "-u", help="User name for the registry (stored credentials are "
                                           "used otherwise: $REGISTRY_AUTH_FILE, ~/.docker/config.json).")
    @click.option("--password-stdin", is_flag=True, help="Read the password (or token) from stdin.")
    @click.option("--insecure", is_flag=True,
                  help="Allow plain http and unverified TLS (loopback registries always may).")
    @functools.wraps(fn)
    def wrapper(username, password_stdin, insecure, **kwargs):
        if password_stdin and not username:
            raise click.UsageError("--password-stdin needs --username")
        if username and not password_stdin:
            raise click.UsageError("--username needs --password-stdin (the password on stdin)")
        creds = None
        if username:  # the registry client is imported only when used (build rarely pulls)
            from layerfs.store.registry import Credentials

            password = sys.stdin.readline().rstrip("\r\n")
            creds = Credentials(username, password, "--username")
        return fn(registry_opts={"credentials": creds, "insecure": insecure}, **kwargs)
    return wrapper


@cli.command()
@click.argument("image", shell_complete=_complete("i"))
@click.argument("ref")
@registry_options
@quiet_option
@with_store
def push(store: Store, image: str, ref: str, registry_opts: dict, quiet: bool) -> None:
    """Push IMAGE to a registry as REF ([HOST[:PORT]/]NAME:TAG); blobs the registry has
    are not sent again, and layers keep the digests they were loaded or pulled with."""
    from layerfs.store.registry import Reference, Registry
    from layerfs.store.registry.push import push as push_image

    reference = Reference.parse(ref)
    with Registry.for_reference(reference, **registry_opts) as registry:
        result = push_image(store, image, reference, registry, _PushLines(quiet))
    click.echo(f"{reference}: digest: {result.digest}")


@cli.command()
@click.argument("ref")
@click.option("-t", "--tag", help="Tag the image NAME[:TAG] [default: REF's name and tag].")
@click.option("--platform", metavar="OS/ARCH[/VARIANT]",
              help="The platform to take from a multi-platform index [default: this machine's].")
@registry_options
@quiet_option
@with_store(create=True)
def pull(store: Store, ref: str, tag: str | None, platform: str | None, registry_opts: dict,
         quiet: bool) -> None:
    """Pull REF ([HOST[:PORT]/]NAME[:TAG][@DIGEST]) from a registry; layers the store has
    are not fetched, and nothing shows as an image until all of it is here."""
    from layerfs.store.oci.descriptor import Platform
    from layerfs.store.registry import Reference, Registry
    from layerfs.store.registry.pull import pull as pull_image

    reference = Reference.parse(ref)
    want = Platform.parse(platform) if platform else None
    with Registry.for_reference(reference, **registry_opts) as registry:
        result = pull_image(store, reference, registry, tag, want, _PullLines(quiet))
    click.echo(f"Layers: {result.fetched} downloaded, {result.resumed} resumed from an interrupted pull, "
               f"{result.stored} already stored")
    click.echo(f"Digest: {result.manifest_digest}")
    if result.tag:
        click.echo(f"Pulled image: {result.tag}")
    click.echo(f"Image ID: {result.image.image_id}")


@cli.command()
@json_option
@click.option("-q", "--quiet", is_flag=True, help="Only image ids.")
@click.option("-a", "--all", "show_all", is_flag=True,
              help="Also the untagged images of build steps (the build cache).")
@with_store
def images(store: Store, as_json: bool, quiet: bool, show_all: bool) -> None:
    """List images (build steps' untagged images only with --all, as docker)."""
    from layerfs.store.buildcache import cached_images

    rows = store.images()
    if not show_all:
        hidden = cached_images(store.index)
        rows = [(r, tags) for r, tags in rows if tags or r.image_id not in hidden]
    if as_json:
        click.echo(json.dumps([{"id": r.image_id, "tags": tags, "layers": list(r.layers),
                                "created": r.created_ns / 1e9} for r, tags in rows], indent=2))
        return
    if quiet:
        for r, _ in rows:
            click.echo(r.image_id)
        return
    out = [["REPOSITORY:TAG", "IMAGE ID", "CREATED", "LAYERS"]]
    for r, tags in rows:
        for t in tags or ["<none>"]:
            out.append([t, short(r.image_id), when(r.created_ns), str(len(r.layers))])
    table(out)


def _layer_json(layer: LayerRecord) -> dict:
    return {"id": layer.diff_id, "size": layer.size, "entries": layer.entries,
            "file_bytes": layer.file_bytes, "created": layer.created_ns / 1e9,
            "source": layer.source.name.lower(), "comment": layer.comment}


@cli.command()
@json_option
@with_store
def layers(store: Store, as_json: bool) -> None:
    """List layers."""
    rows = store.layers()
    if as_json:
        click.echo(json.dumps([_layer_json(layer) for layer in rows], indent=2))
        return
    out = [["LAYER ID", "SIZE", "ENTRIES", "SOURCE", "CREATED", "FROM"]]
    for layer in rows:
        out.append([short(layer.diff_id), human(layer.size), str(layer.entries),
                    layer.source.name.lower(), when(layer.created_ns), layer.comment])
    table(out)


@cli.command()
@click.argument("ref", metavar="IMAGE|LAYER|CONTAINER", shell_complete=_complete("icl"))
@click.option("--config", "raw_config", is_flag=True,
              help="Print only the image's config, byte for byte (its sha256 is the image id).")
@with_store
def inspect(store: Store, ref: str, raw_config: bool) -> None:
    """Show an image (with its OCI config), a layer or a container as JSON."""
    try:
        rec = store.resolve_image(ref)
    except StoreError as image_error:
        try:
            layer = store.resolve_layer(ref)
        except StoreError:
            c = store.containers.find(ref)
            if c is None:
                raise image_error from None
            if raw_config:
                raise StoreError(f"{ref} is a container; only images have a config")
            click.echo(json.dumps({"type": "container", **_container_json(c)}, indent=2))
            return
        if raw_config:
            raise StoreError(f"{ref} is a layer; only images have a config")
        click.echo(json.dumps({"type": "layer", **_layer_json(layer)}, indent=2))
        return
    if raw_config:
        sys.stdout.buffer.write(rec.config)
        sys.stdout.buffer.flush()
        return
    click.echo(json.dumps({"type": "image", "id": rec.image_id, "tags": store.tags_of(rec.image_id),
                           "layers": list(rec.layers), "created": rec.created_ns / 1e9,
                           "config": json.loads(rec.config)}, indent=2))


@cli.command()
@click.argument("image", shell_complete=_complete("i"))
@click.argument("ref")
@with_store
def tag(store: Store, image: str, ref: str) -> None:
    """Tag IMAGE as NAME[:TAG]."""
    store.tag(image, ref)


@cli.command()
@click.argument("images", nargs=-1, required=True, shell_complete=_complete("i"))
@with_store
def rmi(store: Store, images: tuple[str, ...]) -> None:
    """Remove images (their blobs are freed later, by gc)."""
    for ref in images:
        tags, removed = store.rmi(ref)
        for t in tags:
            click.echo(f"Untagged: {t}")
        if removed:
            click.echo(f"Deleted: {removed}")


@cli.command("export-layer")
@click.argument("layer", shell_complete=_complete("l"))
@click.option("-o", "--output", required=True, help="File to write (- for stdout).")
@with_store
def export_layer(store: Store, layer: str, output: str) -> None:
    """Write a layer's tar; its sha256 is the layer id."""
    if output == "-":
        store.export_layer(layer, sys.stdout.buffer)
    else:
        store.export_layer(layer, output)


_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def shown(text: str) -> str:
    """A name from an image as it may be printed to a terminal: backslash, control and
    other unprintable characters (escape sequences, line breaks, bidi overrides) and
    undecodable bytes escaped, so a name cannot forge lines or drive the terminal."""
    out = []
    for ch in text:
        code = ord(ch)
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ch.isprintable():
            out.append(ch)
        elif 0xDC80 <= code <= 0xDCFF:  # an undecodable byte (surrogateescape)
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code < 0x100:
            out.append(f"\\x{code:02x}")
        else:
            out.append(f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "".join(out)


def _size(e: Entry) -> int:
    """The size ls -l (and the mount) shows: a symlink's is its target's length."""
    return len(os.fsencode(e.target)) if e.kind == Kind.SYMLINK else e.size


def _ls_line(name: str, e: Entry) -> str:
    size = f"{e.rdev_major}, {e.rdev_minor}" if e.kind in (Kind.CHR, Kind.BLK) else str(_size(e))
    line = (f"{stat.filemode(e.st_mode)} {e.nlink:>3} {e.uid:>5} {e.gid:>5} {size:>10} "
            f"{when(e.mtime_ns)[:16]} {shown(name)}")
    return line + (f" -> {shown(e.target)}" if e.kind == Kind.SYMLINK else "")


def _entry_json(path: str, e: Entry) -> dict:
    device = {"major": e.rdev_major, "minor": e.rdev_minor} if e.kind in (Kind.CHR, Kind.BLK) else None
    return {"path": "/" + path, "type": e.kind.name.lower(), "mode": f"{e.mode:04o}",
            "uid": e.uid, "gid": e.gid, "size": _size(e), "mtime_ns": e.mtime_ns, "nlink": e.nlink,
            "target": e.target or None, "device": device, "xattrs": [n for n, _ in e.xattrs]}


@cli.command()
@click.argument("image", shell_complete=_complete("i"))
@click.argument("path", default="/")
@click.option("-R", "--recursive", is_flag=True, help="List subdirectories too.")
@json_option
@with_store
def ls(store: Store, image: str, path: str, recursive: bool, as_json: bool) -> None:
    """List PATH in the IMAGE's merged tree (read from the index, nothing mounted), as
    ls -l shows it: a directory's entries, or PATH itself, named as given."""
    _ls(store, image, path, recursive, as_json)


def _ls(store: Store, image: str, path: str, recursive: bool, as_json: bool) -> None:
    tree = store.tree(image)
    rel, entry = tree.resolve(path, follow_last=False)
    if entry.kind == Kind.SYMLINK:
        # A link to a directory is listed through (as ls lists /bin -> usr/bin in a
        # chroot); any other link is shown itself, as ls -l shows it.
        try:
            rel_dir, target = tree.resolve(path)
        except StoreError:
            target = None  # dangling, or a loop: the link itself
        if target is not None and target.kind == Kind.DIR:
            rel, entry = rel_dir, target
    if entry.kind != Kind.DIR:
        click.echo(json.dumps([_entry_json(rel, entry)], indent=2) if as_json else _ls_line(path, entry))
        return
    rows: list[dict] = []
    todo = [(rel, path)]  # (path in the image, the name it is shown by)
    first = True
    while todo:
        d, name = todo.pop(0)
        children = list(tree.listdir(d))
        if as_json:
            rows += [_entry_json(f"{d}/{n}" if d else n, e) for n, e in children]
        else:
            if recursive:
                click.echo(("" if first else "\n") + f"{shown(name)}:")
            for n, e in children:
                click.echo(_ls_line(n, e))
        first = False
        if recursive:
            todo[:0] = [(f"{d}/{n}" if d else n, f"{name.rstrip('/')}/{n}")
                        for n, e in children if e.kind == Kind.DIR]
    if as_json:
        click.echo(json.dumps(rows, indent=2))


@cli.command()
@click.argument("image", shell_complete=_complete("i"))
@click.argument("path")
@with_store
def cat(store: Store, image: str, path: str) -> None:
    """Write a file of the IMAGE's merged tree to stdout."""
    _cat(store, image, path)


def _cat(store: Store, image: str, path: str) -> None:
    rel, entry = store.tree(image).resolve(path)
    if entry.kind != Kind.REG:
        raise StoreError(f"{path}: not a regular file ({entry.kind.name.lower()})")
    out = sys.stdout.buffer
    with store.blobs.open_verified(entry.blob) as f:
        while chunk := f.read(1 << 20):
            out.write(chunk)
    out.flush()


@cli.command()
@json_option
@with_store
def df(store: Store, as_json: bool) -> None:
    """Show blobs, bytes stored, bytes that dedup saved, and per image unique/shared bytes."""
    u = store.df()
    per_image = store.image_usage()
    if as_json:
        click.echo(json.dumps({"images": u.images, "layers": u.layers, "blobs": u.blobs,
                               "stored_bytes": u.stored_bytes, "logical_bytes": u.logical_bytes,
                               "saved_bytes": u.saved_bytes,
                               "per_image": [{"id": i.image_id, "tags": tags, "unique_bytes": uniq,
                                              "shared_bytes": shared}
                                             for i, tags, uniq, shared in per_image]}, indent=2))
        return
    table([["IMAGES", "LAYERS", "BLOBS", "STORED", "LOGICAL", "SAVED BY DEDUP"],
           [str(u.images), str(u.layers), str(u.blobs), human(u.stored_bytes),
            human(u.logical_bytes), human(u.saved_bytes)]])
    if per_image:
        click.echo()
        rows = [["IMAGE ID", "TAGS", "UNIQUE", "SHARED"]]
        rows += [[short(i.image_id), ",".join(tags) or "<none>", human(uniq), human(shared)]
                 for i, tags, uniq, shared in per_image]
        table(rows)


def _gc_json(report) -> dict:
    return {"dry_run": report.dry_run, "layers": report.layers, "blobs": report.blobs,
            "bytes": report.bytes, "chains": report.chains, "tmp_removed": report.tmp_removed,
            "unrecorded_files": report.unrecorded_files, "meta_images": report.meta_images,
            "txn_seconds": round(report.txn_seconds, 4)}


def _print_gc(report) -> None:
    verb = "would free" if report.dry_run else "freed"
    click.echo(f"{verb} {len(report.layers)} layers, {report.blobs} blobs, {human(report.bytes)}"
               f" ({report.chains} merged views, {report.meta_images} metadata images, "
               f"{report.tmp_removed} leftovers in tmp/, {report.unrecorded_files} unrecorded blob files)")


@cli.command()
@click.option("--dry-run", is_flag=True, help="Say what would be freed; change nothing.")
@json_option
@quiet_option
@with_store
def gc(store: Store, dry_run: bool, as_json: bool, quiet: bool) -> None:
    """Free every layer and blob that no image, tag, container or lease needs."""
    with progress_line("gc", quiet) as progress:
        report = store.gc(dry_run=dry_run, progress=progress)
    if as_json:
        click.echo(json.dumps(_gc_json(report), indent=2))
    else:
        _print_gc(report)


@cli.command()
@click.option("--dry-run", is_flag=True, help="Say what would be removed; change nothing.")
@json_option
@quiet_option
@with_store
def prune(store: Store, dry_run: bool, as_json: bool, quiet: bool) -> None:
    """Remove the containers that mount IMAGE made once unmounted, then untagged images
    that no container uses, then collect garbage."""
    from layerfs.unionfs.mount import prune_containers

    containers = prune_containers(store, dry_run=dry_run)
    with progress_line("prune", quiet) as progress:
        removed, report = store.prune(dry_run=dry_run, ignore_containers=frozenset(c.id for c in containers),
                                      progress=progress)
    if as_json:
        click.echo(json.dumps({"containers": [c.id for c in containers], "images": removed,
                               **_gc_json(report)}, indent=2))
        return
    verb = "Would delete" if dry_run else "Deleted"
    for c in containers:
        click.echo(f"{verb} container: {c.name}")
    for image_id in removed:
        click.echo(f"{verb}: {image_id}")
    _print_gc(report)


@cli.command()
@click.option("--fast", is_flag=True, help="Check blob presence and size only, not contents.")
@click.option("--repair", is_flag=True,
              help="Move damaged blobs aside and drop their records; rebuild a damaged index from "
                   "what can still be read.")
@json_option
@quiet_option
@root_option
def fsck(root: str | None, fast: bool, repair: bool, as_json: bool, quiet: bool) -> None:
    """Check the store; exit 0 if it is clean, 1 if anything is damaged."""
    from layerfs.store.fsck import fsck as check_store

    with progress_line("fsck", quiet) as progress:
        r = check_store(Store.root_of(root), fast=fast, repair=repair, progress=progress)
    for note in r.notes:
        click.echo(f"layerfs: note: {note}", err=True)
    if as_json:
        click.echo(json.dumps({"clean": r.clean, "blobs_checked": r.blobs_checked,
                               "layers_checked": r.layers_checked, "images_checked": r.images_checked,
                               "problems": [{"kind": p.kind, "subject": p.subject, "detail": p.detail}
                                            for p in r.problems],
                               "damaged_layers": r.damaged_layers, "damaged_images": r.damaged_images,
                               "moved_aside": r.repaired, "index_held": r.index_held,
                               "rebuilt": r.rebuilt}, indent=2))
    else:
        for p in r.problems:
            click.echo(f"{p.kind}: {p.subject}: {p.detail}")
        for d in r.damaged_layers:
            click.echo(f"damaged layer: {d}")
        for d in r.damaged_images:
            click.echo(f"damaged image: {d}")
        for b in r.repaired:
            click.echo(f"moved aside: {b}")
        for line in r.rebuilt:
            click.echo(line)
        if r.rebuilt:
            click.echo("REPAIRED: the index was rebuilt from what could be read (see above)")
        elif r.index_held is not None:
            for image, tags in r.index_held["images"].items():
                click.echo(f"the index held image {image} ({', '.join(tags) or 'untagged'})")
            click.echo("DAMAGED: the index cannot be read; layerfs fsck --repair rebuilds what it "
                       "can (the damaged index is kept)")
        else:
            click.echo(f"{'clean' if r.clean else 'DAMAGED'}: {r.blobs_checked} blobs, "
                       f"{r.layers_checked} layers, {r.images_checked} images checked")
    if not r.clean:
        click.get_current_context().exit(1)


def _volumes(specs: tuple[str, ...]):
    from layerfs.store.containers import Volume

    return tuple(Volume.parse(spec) for spec in specs)


volume_option = click.option(
    "-v", "--volume", "volumes", multiple=True, metavar="HOST:CTR[:ro]",
    help="Bind the host directory HOST over CTR in the mount, outside the writable layer "
         "(diff and commit never see it); repeatable.")


@cli.command()
@click.argument("image", shell_complete=_complete("i"))
@click.option("--name", help="Name the container (default layerfs-<id>).")
@volume_option
@with_store
def create(store: Store, image: str, name: str | None, volumes: tuple[str, ...]) -> None:
    """Create a container (a writable layer on IMAGE); print its id."""
    click.echo(store.create_container(image, name, volumes=_volumes(volumes)).id)


@cli.command()
@click.argument("ref", metavar="IMAGE|CONTAINER", shell_complete=_complete("ic"))
@click.argument("mountpoint", type=click.Path())
@click.option("--read-only", is_flag=True, help="Mount without a writable layer.")
@click.option("--foreground", "-f", is_flag=True, help="Serve in this process until unmounted.")
@click.option("--suid", is_flag=True,
              help="Honour setuid bits and device nodes even where other users can reach the mount "
                   "(-o suid,dev).")
@click.option("-o", "options", multiple=True,
              help="FUSE options: allow_other, suid, dev, nosuid, nodev (see SECURITY.md), ...; "
                   "volatile skips syncs.")
@click.option("--backend", type=click.Choice(["fuse", "kernel", "auto"]), default="fuse", show_default=True,
              help="fuse: layerfs serves the mount (any user); kernel: the kernel's overlayfs over "
                   "a metadata image of the image (root, Linux 6.5+); auto: kernel where it can.")
@click.option("--rm", "remove", is_flag=True,
              help="Remove the container made for IMAGE, with its changes, when the mount ends.")
@volume_option
@with_store
def mount(store: Store, ref: str, mountpoint: str, read_only: bool, foreground: bool, suid: bool,
          options: tuple[str, ...], backend: str, remove: bool, volumes: tuple[str, ...]) -> None:
    """Mount an image or container at MOUNTPOINT (returns once the mount serves).

    An image gets a new container, named on stderr: it keeps its changes after umount
    (layerfs commit, rm, or prune, which removes such containers once unmounted) unless
    --rm or --read-only.

    As root, a mount below a directory only root can search (like /var/lib/layerfs) lets
    every uid in and honours setuid bits and device nodes; elsewhere it is root's alone
    unless -o allow_other, and then setuid bits and devices stay off unless --suid. A
    kernel-backend mount is open to every user: setuid bits and devices as with allow_other.
    """
    from layerfs.unionfs import mount as mnt

    def serving(c, made: bool) -> None:
        if made:
            fate = ("removed when the mount ends" if c.remove_at_umount else
                    "it keeps its changes after umount (layerfs rm or layerfs prune removes it)")
            click.echo(f"layerfs: made container {c.name} for {ref}; {fate}", err=True)

    opts = mnt.parse_options(options + (("suid,dev",) if suid else ()))
    volatile = bool(opts.pop("volatile", False))
    vols = _volumes(volumes)
    if foreground:
        if vols or any(c.volumes for c in [store.containers.find(ref)] if c):
            raise StoreError("volumes are bound over a background mount: mount without -f")
        mnt.mount_foreground(store, ref, mountpoint, read_only=read_only, options=opts,
                             volatile=volatile, backend=backend, remove_at_umount=remove,
                             on_serving=serving)
    else:
        c = mnt.mount(store, ref, mountpoint, read_only=read_only, options=opts, volatile=volatile,
                      backend=backend, volumes=vols, remove_at_umount=remove, on_serving=serving)
        click.echo(c.id)
        global _forked_server
        _forked_server = c.pid != 0  # (the kernel backend has no serving process)


@cli.command()
@click.argument("target", metavar="DIR|CONTAINER", shell_complete=_complete("c", dirs=True))
@with_store
def umount(store: Store, target: str) -> None:
    """Unmount a mountpoint or a container (also after its serving process died)."""
    from layerfs.unionfs import mount as mnt

    c = mnt.umount(store, target)
    if c is not None and c.anonymous and store.containers.find(c.id) is not None:
        click.echo(f"layerfs: container {c.name} keeps its changes (layerfs commit, layerfs rm, "
                   "or layerfs prune)", err=True)


@cli.command()
@json_option
@with_store
def ps(store: Store, as_json: bool) -> None:
    """List containers with their image, mountpoint and state."""
    rows = [_container_json(c) for c in store.containers.list()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    out = [["CONTAINER ID", "NAME", "IMAGE", "STATE", "BACKEND", "ACCESS", "MOUNTPOINT"]]
    for r in rows:
        out.append([r["id"][:12], r["name"], short(r["image"]), r["state"], r["backend"] or "-",
                    _access_text(r["access"]), r["mountpoint"] or "-"])
    table(out)


def _access_text(a: dict | None) -> str:
    if a is None:
        return "-"
    return ",".join(["all users" if a["allow_other"] else "owner"]
                    + [k for k in ("suid", "dev") if a[k]])


def _container_json(c) -> dict:
    """A container as ps --json and inspect show it: backend is what serves its mount now,
    access who may use that mount (allow_other, suid, dev, as the kernel has them)."""
    from layerfs.unionfs.mount import backend_of, mount_access, state

    st = state(c)
    return {"id": c.id, "name": c.name, "image": c.image_id, "state": st,
            "backend": backend_of(c) if st == "mounted" else None,
            "upper_format": "kernel" if c.kernel_format else "oci",
            "mountpoint": c.mountpoint or None, "pid": c.pid or None, "created": c.created_ns / 1e9,
            "access": mount_access(c.mountpoint) if st == "mounted" else None,
            "volumes": [str(v) for v in c.volumes],
            "anonymous": c.anonymous, "remove_at_umount": c.remove_at_umount}


@cli.command()
@click.argument("containers", nargs=-1, required=True, shell_complete=_complete("c"))
@click.option("-f", "--force", is_flag=True, help="Unmount first if mounted.")
@with_store
def rm(store: Store, containers: tuple[str, ...], force: bool) -> None:
    """Remove containers and their writable layers."""
    from layerfs.unionfs import mount as mnt

    for ref in containers:
        click.echo(mnt.remove(store, ref, force=force).id)


@cli.command()
@click.argument("container", shell_complete=_complete("c"))
@json_option
@with_store
def diff(store: Store, container: str, as_json: bool) -> None:
    """Show what CONTAINER changed: A added, C changed, D deleted; what a commit cannot
    carry (a socket) is marked."""
    from layerfs.store.commit import diff as container_diff

    rows = container_diff(store, store.containers.get(container))
    if as_json:
        click.echo(json.dumps([{"kind": r.kind, "path": r.path, "left_out": r.left_out or None}
                               for r in rows], indent=2))
        return
    for r in rows:
        click.echo(f"{r.kind} {shown(r.path)}" + (f"  ({r.left_out}: commit leaves it out)" if r.left_out else ""))


@cli.command()
@click.argument("container", shell_complete=_complete("c"))
@click.option("-t", "--tag", help="Tag the new image NAME[:TAG].")
@click.option("-m", "--message", default="", help="Commit message.")
@click.option("-a", "--author", default="", help="Author.")
@click.option("-c", "--change", "changes", multiple=True,
              help="Dockerfile instruction: ENV, CMD, ENTRYPOINT, WORKDIR, USER, LABEL, EXPOSE.")
@click.option("--freeze", metavar="CGROUP",
              help="Freeze this cgroup's processes while the commit runs (as docker pause); "
                   "needed to commit a container mounted with the kernel backend.")
@quiet_option
@with_store
def commit(store: Store, container: str, tag: str | None, message: str, author: str,
           changes: tuple[str, ...], freeze: str | None, quiet: bool) -> None:
    """Commit CONTAINER's changes as a new layer and image; print the image id.

    A mounted container's writes are held while the commit runs: by the fuse backend
    itself, or, for a kernel-backend mount, by freezing the cgroup --freeze names. What a
    layer cannot hold (sockets) is left out, with a warning each.
    """
    from layerfs.unionfs import mount as mnt

    left_out: list[tuple[str, str]] = []  # said once the progress line is gone
    with progress_line("commit", quiet) as progress:
        image = mnt.commit(store, container, freeze=freeze, tag=tag, message=message, author=author,
                           changes=changes, on_left_out=lambda path, why: left_out.append((path, why)),
                           progress=progress)
    for path, why in left_out:
        click.echo(f"layerfs: warning: {shown(path)} is {why}, which a layer cannot hold: "
                   "left out of the commit", err=True)
    click.echo(image.image_id)


class _BuildLines:
    """build's progress, as docker and buildah show it: ``STEP n/m: INSTRUCTION``, a RUN
    step's output, ``--> Using cache ID`` or ``--> ID``. Quiet: nothing but a failing
    step's output (on stderr)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.held = bytearray()

    def step(self, label: str, text: str) -> None:
        self.held.clear()
        if not self.quiet:
            click.echo(f"{label}: {shown(text)}")

    def output(self, data: bytes) -> None:
        if self.quiet:
            self.held += data
        else:
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()

    def done(self, image_id: str, cached: bool) -> None:
        if not self.quiet:
            click.echo(f"--> Using cache {image_id.removeprefix('sha256:')}" if cached else f"--> {short(image_id)}")

    def note(self, text: str) -> None:
        if not self.quiet:
            click.echo(text)

    def warn(self, text: str) -> None:
        click.echo(f"layerfs: warning: {text}", err=True)


def _build_args(items: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not key:
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE", param_hint="--build-arg")
        if not sep:  # as docker: KEY alone takes the value from the environment
            if key not in os.environ:
                continue
            value = os.environ[key]
        out[key] = value
    return out


@cli.command()
@click.argument("context", type=click.Path(file_okay=False))
@click.option("-f", "--file", "dockerfile", metavar="PATH",
              help="The Dockerfile [default: CONTEXT/Dockerfile]; - reads it from stdin.")
@click.option("-t", "--tag", "tags", multiple=True, help="Tag the image NAME[:TAG] (repeatable).")
@click.option("--build-arg", "build_args", multiple=True, metavar="KEY[=VALUE]",
              help="Set a build argument (KEY alone: from the environment).")
@click.option("--no-cache", is_flag=True, help="Run every step again, ignoring the build cache.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the image id (a failing step's output still shows).")
@registry_options
@with_store(create=True)
def build(store: Store, context: str, dockerfile: str | None, tags: tuple[str, ...],
          build_args: tuple[str, ...], no_cache: bool, quiet: bool, registry_opts: dict) -> None:
    """Build an image from a Dockerfile and CONTEXT; print its id last.

    Each RUN runs in a container mounted through layerfs (own mount, pid, uts and ipc
    namespaces, chroot, the host's network; needs root); each step's result is cached.
    """
    import signal

    from layerfs.unionfs.build.builder import build as build_image, read_dockerfile

    def terminate(signum, frame):  # a killed build still removes its step's container
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    lines = _BuildLines(quiet)
    try:
        result = build_image(store, context, read_dockerfile(context, dockerfile), lines, tags=tags,
                             build_args=_build_args(build_args), no_cache=no_cache,
                             registry_opts=registry_opts)
    except StoreError:
        if lines.held:
            sys.stderr.buffer.write(bytes(lines.held))
            sys.stderr.buffer.flush()
        raise
    if not quiet:
        click.echo(f"COMMIT {', '.join(result.tags) or short(result.image.image_id)}: {result.steps} steps, "
                   f"{result.cached} from the cache")
        for t in result.tags:
            click.echo(f"Successfully tagged {t}")
    click.echo(result.image.image_id)


@cli.command()
@with_store(create=True)
def demo(store: Store) -> None:
    """Walk through the main jobs on a real image built from this machine's Debian
    packages: load, inspect, mount, run, diff, commit, save, gc."""
    import hashlib
    import shutil
    import subprocess
    import tempfile

    from layerfs.store.commit import diff as container_diff
    from layerfs.store.oci.loadsave import load as load_images, save as save_images
    from layerfs.store.sample import DEMO_REF, PACKAGES, write_demo_layout
    from layerfs.unionfs import mount as mnt

    def step(text: str) -> None:
        click.echo(click.style(f"\n$ {text}", bold=True))

    def chroot(root: str, *argv: str) -> None:
        if os.geteuid() != 0 or not shutil.which("chroot"):
            click.echo("(skipped: chroot needs root)")
            return
        proc = subprocess.run(["chroot", root, *argv], capture_output=True, text=True, timeout=60)
        click.echo(proc.stdout + proc.stderr, nl=False)

    with tempfile.TemporaryDirectory(prefix="layerfs-demo-") as tmp:
        layout = os.path.join(tmp, "demo-layout")
        step(f"# an OCI layout built just now from this machine's {' and '.join(PACKAGES)} packages")
        write_demo_layout(layout)
        step("layerfs load demo-layout  # every digest checked; the config kept byte for byte")
        [(image, _)] = load_images(store, layout)
        click.echo(f"Loaded image: {DEMO_REF}\nLoaded image ID: {image.image_id}")
        step(f"layerfs inspect --config {DEMO_REF} | sha256sum  # the image id is the config's digest")
        click.echo(f"{hashlib.sha256(image.config).hexdigest()}  -")
        cfg = json.loads(image.config)
        click.echo(f"Cmd {cfg['config']['Cmd']}, {len(image.layers)} layers: "
                   + ", ".join(h["created_by"] for h in cfg["history"]))
        step(f"layerfs ls {DEMO_REF} /usr/local/bin  # read from the index, nothing mounted")
        _ls(store, DEMO_REF, "/usr/local/bin", recursive=False, as_json=False)

        mountpoint = os.path.join(tmp, "mnt")
        os.mkdir(mountpoint)
        step(f"layerfs mount {DEMO_REF} MNT")
        c = mnt.mount(store, DEMO_REF, mountpoint)
        try:
            step("chroot MNT /usr/local/bin/hello  # a program of the image, run from the mount")
            chroot(mountpoint, "/usr/local/bin/hello")
            step("echo changed in a container > MNT/etc/motd; rm MNT/bin/wc")
            with open(os.path.join(mountpoint, "etc/motd"), "w") as f:
                f.write("changed in a container\n")
            os.unlink(os.path.join(mountpoint, "bin/wc"))
            step(f"layerfs diff {c.name}")
            for change in container_diff(store, c):
                click.echo(f"{change.kind} {change.path}")
            step(f"layerfs commit {c.name} -t demo:v2 -c 'CMD [\"/bin/cat\", \"/etc/motd\"]'"
                 "  # while mounted: writes are held")
            new = mnt.commit(store, c.id, tag="demo:v2", message="demo change",
                             changes=('CMD ["/bin/cat", "/etc/motd"]',))
            click.echo(new.image_id)
        finally:
            step("layerfs umount MNT")
            mnt.umount(store, mountpoint)
            store.containers.remove(store.containers.get(c.id))

        archive = os.path.join(tmp, "demo-v2.tar")
        step("layerfs save demo:v2 -o demo-v2.tar  # an OCI archive; the loaded layers keep their diff_ids")
        [saved] = save_images(store, ["demo:v2"], archive)
        for blob in saved.layers:
            origin = "loaded" if blob.diff_id in image.layers else "committed"
            click.echo(f"{origin:>9} layer: diff_id {short(blob.diff_id)}, gzip {short(blob.descriptor.digest)}")
        step("layerfs rmi demo:v2 && layerfs load demo-v2.tar  # the same image comes back")
        store.rmi("demo:v2")
        [(back, _)] = load_images(store, archive)
        click.echo(f"Loaded image ID: {back.image_id} ({'same' if back.image_id == new.image_id else 'DIFFERENT'})")
    step("layerfs rmi demo:v2 && layerfs gc  # what only the removed image used is freed")
    store.rmi("demo:v2")
    _print_gc(store.gc())
    step("layerfs images")
    rows = [["REPOSITORY:TAG", "IMAGE ID", "LAYERS"]]
    for r, tags in store.images():
        rows += [[t, short(r.image_id), str(len(r.layers))] for t in tags or ["<none>"]]
    table(rows)


# Set by a mount whose serving process was forked from this one (see main).
_forked_server = False


def main() -> None:
    try:
        cli(prog_name="layerfs")
    except SystemExit as e:
        if _forked_server and (e.code is None or isinstance(e.code, int)):
            # This process shares its memory pages with the server it forked until either
            # writes to them: tearing the interpreter down would write to, and so copy,
            # nearly every one (~8 ms of each mount). The store is closed; only the output
            # is left to flush.
            for f in (sys.stdout, sys.stderr):
                with contextlib.suppress(OSError, ValueError):
                    f.flush()
            os._exit(e.code or 0)
        raise
    finally:
        # The interpreter's exit would walk every object left for one last collection
        # (~10 ms of each command); the OS frees them all the same.
        _gc.freeze()


if __name__ == "__main__":
    main()
