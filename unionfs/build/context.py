"""The build context: the directory COPY and ADD read from, less what .dockerignore names.

Sources are named relative to the context and never leave it: ``..`` that climbs out,
or a symlink on the way that points out, is refused. A source's cache digest covers
every name, type, mode, link target and file content below it (not times or owners:
COPY sets the owner, and a touched file is the same file, as docker's cache has it).
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import posixpath
import re
import stat
from dataclasses import dataclass

from .dockerfile import DockerfileError

IGNORE_FILE = ".dockerignore"


def _pattern_regex(pattern: str, below: bool = True) -> re.Pattern:
    """A .dockerignore pattern (Go's filepath.Match plus ``**``) as a regex on paths;
    with ``below``, it names everything below a matching path too."""
    out, i = [], 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "*":
            if pattern.startswith("**", i):
                i += 2
                if pattern.startswith("/", i):
                    i += 1
                    out.append("(?:.*/)?")
                else:
                    out.append(".*")
                continue
            out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        elif ch == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                out.append(re.escape(ch))
            else:
                body = pattern[i + 1:end]
                if body.startswith("^"):
                    body = "!" + body[1:]
                out.append(fnmatch.translate(f"[{body}]")[4:-3])
                i = end
        elif ch == "\\" and i + 1 < len(pattern):
            i += 1
            out.append(re.escape(pattern[i]))
        else:
            out.append(re.escape(ch))
        i += 1
    return re.compile("^" + "".join(out) + ("(?:/.*)?$" if below else "$"), re.S)


class Ignore:
    """The patterns of a .dockerignore: the last pattern that matches a path decides."""

    def __init__(self, lines: list[str]) -> None:
        self.rules: list[tuple[bool, re.Pattern]] = []
        for line in lines:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            pattern = posixpath.normpath(line[1:].strip() if negate else line).lstrip("/")
            if pattern in ("", "."):
                continue
            self.rules.append((negate, _pattern_regex(pattern)))
        self.negations = any(neg for neg, _ in self.rules)

    @classmethod
    def of(cls, context: str) -> "Ignore":
        try:
            with open(os.path.join(context, IGNORE_FILE), encoding="utf-8", errors="surrogateescape") as f:
                return cls(f.read().splitlines())
        except FileNotFoundError:
            return cls([])

    def excluded(self, rel: str) -> bool:
        result = False
        for negate, rx in self.rules:
            if rx.match(rel):
                result = not negate
        return result


@dataclass(slots=True, frozen=True)
class Item:
    """One file of a source: its path below the source ("" is the source itself), where it
    is on the host, and its lstat."""

    rel: str
    path: str
    st: os.stat_result


@dataclass(slots=True, frozen=True)
class Source:
    """A COPY/ADD source: its name in the context, and its files (parents first)."""

    name: str
    items: tuple[Item, ...]

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.items[0].st.st_mode)


class Context:
    """A build context directory with its .dockerignore."""

    def __init__(self, root: str) -> None:
        if not os.path.isdir(root):
            raise DockerfileError(f"the build context {root} is not a directory")
        self.root = os.path.realpath(root)
        self.ignore = Ignore.of(self.root)

    def _inside(self, rel: str, what: str) -> str:
        """The host path of context-relative ``rel``, refusing one that leaves the context
        (by ``..`` or through a symlink)."""
        clean = posixpath.normpath(rel.lstrip("/") or ".")
        if clean == ".." or clean.startswith("../"):
            raise DockerfileError(f"{what}: {rel} is outside the build context")
        real = os.path.realpath(os.path.join(self.root, clean))
        if real != self.root and not real.startswith(self.root + os.sep):
            raise DockerfileError(f"{what}: {rel} is outside the build context (a symlink leads out of it)")
        return real

    def sources(self, patterns: list[str], what: str) -> list[Source]:
        """The sources COPY/ADD name (wildcards expanded), each with its files."""
        out: list[Source] = []
        for pattern in patterns:
            names = self._expand(pattern, what)
            if not names:
                raise DockerfileError(f"{what}: {pattern}: no such file or directory in the build context")
            for name in names:
                out.append(Source(name, tuple(self._items(name, what))))
        return out

    def _expand(self, pattern: str, what: str) -> list[str]:
        clean = posixpath.normpath(pattern.lstrip("/") or ".")
        if clean == ".." or clean.startswith("../"):
            raise DockerfileError(f"{what}: {pattern} is outside the build context")
        clean = "" if clean == "." else clean
        if not any(c in clean for c in "*?["):
            path = self._inside(clean, what)
            if (clean and self.ignore.excluded(clean)) or not os.path.lexists(path):
                return []
            return [clean]
        rx = _pattern_regex(clean, below=False)
        depth = clean.count("/")
        found = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            rel_dir = os.path.relpath(dirpath, self.root)
            rel_dir = "" if rel_dir == "." else rel_dir
            level = rel_dir.count("/") + 1 if rel_dir else 0
            if level == depth:
                for name in dirnames + filenames:
                    rel = f"{rel_dir}/{name}" if rel_dir else name
                    if rx.match(rel) and not self.ignore.excluded(rel):
                        found.append(rel)
                dirnames[:] = []
        return sorted(found)

    def _items(self, name: str, what: str) -> list[Item]:
        top = self._inside(name, what)
        st = os.stat(top)  # a source named directly is followed (inside the context)
        items = [Item("", top, st)]
        if not stat.S_ISDIR(st.st_mode):
            return items
        prefix = os.path.relpath(top, self.root)
        prefix = "" if prefix == "." else prefix
        for dirpath, dirnames, filenames in os.walk(top):
            rel_dir = os.path.relpath(dirpath, top)
            rel_dir = "" if rel_dir == "." else rel_dir
            dirnames.sort()
            kept_dirs = []
            for name_ in sorted(dirnames + filenames):
                rel = f"{rel_dir}/{name_}" if rel_dir else name_
                ctx_rel = f"{prefix}/{rel}" if prefix else rel
                full = os.path.join(dirpath, name_)
                if self.ignore.excluded(ctx_rel):
                    # A directory is still entered when a later ! pattern may bring back
                    # something below it.
                    if name_ in dirnames and self.ignore.negations and not os.path.islink(full):
                        kept_dirs.append(name_)
                    continue
                lst = os.lstat(full)
                items.append(Item(rel, full, lst))
                if name_ in dirnames and stat.S_ISDIR(lst.st_mode):
                    kept_dirs.append(name_)
            dirnames[:] = kept_dirs
        return items


def digest(sources: list[Source]) -> str:
    """A digest of what the sources hold (names, types, modes, targets, contents)."""
    h = hashlib.sha256()
    for source in sources:
        h.update(b"source\0" + os.fsencode(source.name) + b"\0")
        for item in source.items:
            st = item.st
            h.update(os.fsencode(item.rel) + b"\0" + f"{stat.S_IFMT(st.st_mode)}:{stat.S_IMODE(st.st_mode)}\0".encode())
            if stat.S_ISLNK(st.st_mode):
                h.update(os.fsencode(os.readlink(item.path)) + b"\0")
            elif stat.S_ISREG(st.st_mode):
                fh = hashlib.sha256()
                with open(item.path, "rb") as f:
                    while chunk := f.read(1 << 20):
                        fh.update(chunk)
                h.update(fh.digest())
    return "sha256:" + h.hexdigest()
