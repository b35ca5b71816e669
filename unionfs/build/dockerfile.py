"""Dockerfiles: parsed into stages of instructions, and words expanded as docker does.

The parser follows docker's reference: parser directives (``# escape=``), comments,
line continuations with the escape character, ``ARG`` before the first ``FROM``,
``FROM image [AS name]``, ``--flag=value`` options, and the exec (JSON) and shell forms.
Variables (``$V``, ``${V}``, ``${V:-word}``, ``${V:+word}``, ``${V-word}``, ``${V+word}``,
``${V:?msg}``) are expanded by :func:`words` / :func:`word` where docker expands them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from layerfs.store import StoreError

INSTRUCTIONS = ("FROM", "RUN", "CMD", "LABEL", "MAINTAINER", "EXPOSE", "ENV", "ADD", "COPY",
                "ENTRYPOINT", "VOLUME", "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL",
                "HEALTHCHECK", "SHELL")
# Options each instruction takes (others are refused: an option ignored would build
# something else than the user asked for).
FLAGS = {"FROM": ("platform",), "COPY": ("from", "chown", "chmod"), "ADD": ("chown", "chmod"),
         "HEALTHCHECK": ("interval", "timeout", "start-period", "start-interval", "retries")}
_DIRECTIVE = re.compile(r"^#\s*([a-zA-Z][a-zA-Z0-9_-]*)\s*=\s*(.*?)\s*$")
_FLAG = re.compile(r"^--([a-z][a-z-]*)(?:=(\S*))?(?:\s+|$)")


class DockerfileError(StoreError):
    """A Dockerfile that cannot be built as written."""

    exit_code = 2


@dataclass(slots=True, frozen=True)
class Instruction:
    """One instruction: its keyword, options and argument text (continuations joined)."""

    keyword: str
    args: str
    line: int
    flags: tuple[tuple[str, str], ...] = ()

    def flag(self, name: str) -> str | None:
        for k, v in self.flags:
            if k == name:
                return v
        return None

    @property
    def text(self) -> str:
        """The instruction as written (on one line), for messages and the history."""
        flags = "".join(f"--{k}={v} " for k, v in self.flags)
        return f"{self.keyword} {flags}{self.args}".rstrip()


@dataclass(slots=True)
class Stage:
    """``FROM base [AS name]`` and the instructions that follow it."""

    index: int
    base: str
    name: str | None
    line: int
    platform: str | None = None
    instructions: list[Instruction] = field(default_factory=list)


@dataclass(slots=True)
class Dockerfile:
    """A parsed Dockerfile: the global ``ARG`` instructions (before the first FROM) and
    the stages."""

    global_args: list[Instruction]
    stages: list[Stage]
    escape: str = "\\"


def parse(text: str) -> Dockerfile:
    """Parse a Dockerfile's text; a mistake raises DockerfileError naming its line."""
    lines = text.splitlines()
    escape = "\\"
    start = 0
    # Parser directives: leading comments of the form "# key=value", nothing else first.
    for i, raw in enumerate(lines):
        m = _DIRECTIVE.match(raw.strip())
        if not m:
            break
        key, value = m.group(1).lower(), m.group(2)
        if key == "escape":
            if value not in ("\\", "`"):
                raise DockerfileError(f"Dockerfile line {i + 1}: invalid escape character {value!r} "
                                      "(\\ or `)")
            escape = value
        start = i + 1
    global_args: list[Instruction] = []
    stages: list[Stage] = []
    for line_no, logical in _logical_lines(lines, start, escape):
        keyword, _, rest = logical.strip().partition(" ")
        keyword = keyword.upper()
        if keyword not in INSTRUCTIONS:
            raise DockerfileError(f"Dockerfile line {line_no}: unknown instruction: {keyword}")
        flags, args = _flags(keyword, rest.strip(), line_no)
        inst = Instruction(keyword, args, line_no, flags)
        if keyword == "FROM":
            stages.append(_stage(inst, len(stages)))
        elif not stages:
            if keyword != "ARG":
                raise DockerfileError(f"Dockerfile line {line_no}: {keyword} before the first FROM "
                                      "(only ARG may come first)")
            global_args.append(inst)
        else:
            if not args and keyword not in ("RUN", "CMD", "ENTRYPOINT"):
                raise DockerfileError(f"Dockerfile line {line_no}: {keyword} needs an argument")
            stages[-1].instructions.append(inst)
    if not stages:
        raise DockerfileError("the Dockerfile has no FROM instruction")
    names = [s.name for s in stages if s.name]
    for name in names:
        if names.count(name) > 1:
            raise DockerfileError(f"stage name {name!r} is used twice")
    return Dockerfile(global_args, stages, escape)


def _logical_lines(lines: list[str], start: int, escape: str):
    """(first line number, text) of each instruction: a line ending in the escape
    character continues on the next (joined as docker joins them, without the escape);
    comment lines are dropped, also inside a continued instruction, as docker does."""
    buf = ""
    first = 0
    for i in range(start, len(lines)):
        raw = lines[i]
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not buf):
            continue
        if not buf:
            first = i + 1
        body = raw.rstrip()
        if body.endswith(escape):
            buf += body[:-1]
            continue
        buf += raw
        yield first, buf.strip()
        buf = ""
    if buf.strip():
        yield first, buf.strip()


def _flags(keyword: str, rest: str, line: int) -> tuple[tuple[tuple[str, str], ...], str]:
    flags = []
    while rest.startswith("--"):
        m = _FLAG.match(rest)
        if not m:
            break
        name, value = m.group(1), m.group(2)
        if name not in FLAGS.get(keyword, ()):
            raise DockerfileError(f"Dockerfile line {line}: {keyword} does not take --{name}"
                                  + (" (layerfs build has no RUN --mount, --network or --security)"
                                     if keyword == "RUN" else ""))
        if value is None:
            raise DockerfileError(f"Dockerfile line {line}: --{name} needs a value (--{name}=...)")
        flags.append((name, value))
        rest = rest[m.end():]
    return tuple(flags), rest.strip()


def _stage(inst: Instruction, index: int) -> Stage:
    parts = inst.args.split()
    if len(parts) == 3 and parts[1].upper() == "AS":
        name = parts[2].lower()
        if not re.fullmatch(r"[a-z][a-z0-9_.-]*", name):
            raise DockerfileError(f"Dockerfile line {inst.line}: invalid stage name {parts[2]!r}")
    elif len(parts) == 1:
        name = None
    else:
        raise DockerfileError(f"Dockerfile line {inst.line}: FROM takes IMAGE [AS NAME], got {inst.args!r}")
    return Stage(index, parts[0], name, inst.line, inst.flag("platform"))


# -- the exec (JSON) form -------------------------------------------------------------

def json_form(inst: Instruction) -> list[str] | None:
    """The instruction's arguments in exec form (a JSON list of strings), or None for the
    shell form. Text that starts as a JSON list (``["``) but is not one is refused,
    rather than run as a shell command nobody meant."""
    text = inst.args.strip()
    if not text.startswith("["):
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        if re.match(r"^\[\s*[\"']", text) and (text.startswith('["') or text.startswith("['")):
            raise DockerfileError(f"Dockerfile line {inst.line}: {inst.keyword}: malformed JSON list "
                                  f"({e.msg} at column {e.colno}): {text}") from None
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        if text.startswith('["') or text.startswith("['"):
            raise DockerfileError(f"Dockerfile line {inst.line}: {inst.keyword}: the JSON form must be "
                                  f"a list of strings: {text}")
        return None
    return value


# -- variables and words --------------------------------------------------------------

class _Lexer:
    """docker's shell-word lexer: quotes, the escape character and variables."""

    def __init__(self, text: str, env: dict[str, str], escape: str, line: int) -> None:
        self.s, self.i, self.env, self.esc, self.line = text, 0, env, escape, line

    def peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def take(self) -> str:
        ch = self.peek()
        self.i += 1
        return ch

    def words(self, split: bool) -> list[str]:
        out: list[str] = []
        cur: list[str] = []
        started = False
        while self.i < len(self.s):
            ch = self.take()
            if split and ch in " \t\n":
                if started:
                    out.append("".join(cur))
                    cur, started = [], False
                continue
            started = True
            if ch == self.esc:
                nxt = self.take()
                cur.append(nxt if nxt else ch)
            elif ch == "'":
                end = self.s.find("'", self.i)
                if end < 0:
                    raise DockerfileError(f"Dockerfile line {self.line}: unmatched ' in {self.s!r}")
                cur.append(self.s[self.i:end])
                self.i = end + 1
            elif ch == '"':
                cur.append(self._double())
            elif ch == "$":
                cur.append(self._variable())
            else:
                cur.append(ch)
        if started:
            out.append("".join(cur))
        return out

    def _double(self) -> str:
        cur = []
        while True:
            if self.i >= len(self.s):
                raise DockerfileError(f'Dockerfile line {self.line}: unmatched " in {self.s!r}')
            ch = self.take()
            if ch == '"':
                return "".join(cur)
            if ch == self.esc and self.peek() in ('"', "$", self.esc):
                cur.append(self.take())
            elif ch == "$":
                cur.append(self._variable())
            else:
                cur.append(ch)

    def _name(self) -> str:
        start = self.i
        while self.peek() and (self.peek().isalnum() or self.peek() == "_"):
            self.i += 1
        return self.s[start:self.i]

    def _variable(self) -> str:
        if self.peek() == "{":
            self.i += 1
            name = self._name()
            if not name:
                raise DockerfileError(f"Dockerfile line {self.line}: bad substitution in {self.s!r}")
            op = ""
            if self.peek() == ":":
                op = self.take()
            if self.peek() in ("-", "+", "?"):
                op += self.take()
            elif op:
                raise DockerfileError(f"Dockerfile line {self.line}: unsupported modifier in {self.s!r}")
            word = ""
            if op:
                depth, start = 1, self.i
                while self.i < len(self.s) and depth:
                    if self.s[self.i] == "{":
                        depth += 1
                    elif self.s[self.i] == "}":
                        depth -= 1
                    self.i += 1
                if depth:
                    raise DockerfileError(f"Dockerfile line {self.line}: missing }} in {self.s!r}")
                word = _Lexer(self.s[start:self.i - 1], self.env, self.esc, self.line).words(split=False)
                word = word[0] if word else ""
            elif self.take() != "}":
                raise DockerfileError(f"Dockerfile line {self.line}: missing }} in {self.s!r}")
            value = self.env.get(name)
            unset_or_empty = value is None or (op.startswith(":") and value == "")
            if op.endswith("-"):
                return word if unset_or_empty else value
            if op.endswith("+"):
                return "" if unset_or_empty else word
            if op.endswith("?"):
                if unset_or_empty:
                    raise DockerfileError(f"Dockerfile line {self.line}: {name}: {word or 'is not set'}")
                return value
            return value or ""
        name = self._name()
        if not name:
            return "$"
        return self.env.get(name, "")


def words(text: str, env: dict[str, str], escape: str = "\\", line: int = 0) -> list[str]:
    """``text`` split into words, quotes and escapes removed, variables expanded."""
    return _Lexer(text, env, escape, line).words(split=True)


def word(text: str, env: dict[str, str], escape: str = "\\", line: int = 0) -> str:
    """``text`` as one word (spaces kept), quotes and escapes removed, variables expanded."""
    out = _Lexer(text.strip(), env, escape, line).words(split=False)
    return out[0] if out else ""


def key_values(inst: Instruction, env: dict[str, str], escape: str = "\\") -> list[tuple[str, str]]:
    """The ``KEY=VALUE ...`` pairs of ENV, LABEL or ARG (ENV and LABEL also take the old
    ``KEY VALUE`` form: one pair, the value the rest of the line)."""
    first = inst.args.strip().split(None, 1)
    if inst.keyword != "ARG" and first and "=" not in first[0]:
        if len(first) < 2:
            raise DockerfileError(f"Dockerfile line {inst.line}: {inst.keyword} {first[0]} needs a value")
        return [(first[0], word(first[1], env, escape, inst.line))]
    out = []
    for item in words(inst.args, env, escape, inst.line):
        key, sep, value = item.partition("=")
        if not key or (not sep and inst.keyword != "ARG"):
            raise DockerfileError(f"Dockerfile line {inst.line}: {inst.keyword}: expected KEY=VALUE, got {item!r}")
        if inst.keyword in ("ENV", "ARG") and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise DockerfileError(f"Dockerfile line {inst.line}: {inst.keyword}: invalid name {key!r}")
        out.append((key, value) if sep else (key, None))  # type: ignore[arg-type]
    return out
