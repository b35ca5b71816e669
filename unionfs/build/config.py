"""What Dockerfile instructions write into an image's OCI config (``config`` section).

ENV, LABEL, EXPOSE, CMD, ENTRYPOINT, USER, WORKDIR, STOPSIGNAL, VOLUME, SHELL,
HEALTHCHECK, MAINTAINER and ONBUILD change the config only; the builder records each
as an image with the parent's layers and one more history entry (``empty_layer``).
"""

from __future__ import annotations

import posixpath
import re

from .dockerfile import DockerfileError, Instruction, json_form, key_values, word, words

DEFAULT_SHELL = ["/bin/sh", "-c"]
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1, "us": 1_000, "µs": 1_000, "ms": 1_000_000, "s": 1_000_000_000, "m": 60_000_000_000,
          "h": 3_600_000_000_000}


def env_dict(config: dict) -> dict[str, str]:
    """The config's Env as a dict (later entries win)."""
    out: dict[str, str] = {}
    for item in config.get("config", {}).get("Env") or []:
        k, _, v = item.partition("=")
        out[k] = v
    return out


def set_env(cfg: dict, name: str, value: str) -> None:
    env = [e for e in cfg.get("Env") or [] if e.partition("=")[0] != name]
    cfg["Env"] = env + [f"{name}={value}"]


def shell(config: dict) -> list[str]:
    return list(config.get("config", {}).get("Shell") or DEFAULT_SHELL)


def command(inst: Instruction, config: dict) -> list[str]:
    """RUN, CMD or ENTRYPOINT as an argv: the exec form as written, the shell form
    through SHELL (default /bin/sh -c)."""
    form = json_form(inst)
    if form is not None:
        return form
    if not inst.args.strip():
        raise DockerfileError(f"Dockerfile line {inst.line}: {inst.keyword} needs a command")
    return shell(config) + [inst.args]


def _duration(text: str, inst: Instruction) -> int:
    pos, total = 0, 0
    for m in _DURATION.finditer(text):
        if m.start() != pos:
            break
        total += int(float(m.group(1)) * _UNITS[m.group(2)])
        pos = m.end()
    if pos != len(text) or not text:
        raise DockerfileError(f"Dockerfile line {inst.line}: invalid duration {text!r} (like 30s, 1m30s)")
    return total


def _ports(items: list[str], inst: Instruction) -> list[str]:
    out = []
    for item in items:
        number, _, proto = item.partition("/")
        lo, _, hi = number.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()) or proto.lower() not in ("", "tcp", "udp", "sctp"):
            raise DockerfileError(f"Dockerfile line {inst.line}: EXPOSE: invalid port {item!r} "
                                  "(PORT[-PORT][/tcp|udp|sctp])")
        first, last = int(lo), int(hi or lo)
        if not 1 <= first <= last <= 65535:
            raise DockerfileError(f"Dockerfile line {inst.line}: EXPOSE: port {item!r} out of range")
        out += [f"{p}/{proto.lower() or 'tcp'}" for p in range(first, last + 1)]
    return out


def apply(config: dict, inst: Instruction, env: dict[str, str], escape: str = "\\") -> None:
    """Apply a config-only instruction to ``config`` (the whole image config), with
    variables from ``env``."""
    cfg = config.setdefault("config", {})
    kw, line = inst.keyword, inst.line
    if kw == "ENV":
        for name, value in key_values(inst, env, escape):
            set_env(cfg, name, value)
    elif kw == "LABEL":
        labels = cfg.get("Labels") or {}
        labels.update(key_values(inst, env, escape))
        cfg["Labels"] = labels
    elif kw == "MAINTAINER":
        config["author"] = word(inst.args, env, escape, line)
    elif kw == "EXPOSE":
        ports = cfg.get("ExposedPorts") or {}
        ports.update({p: {} for p in _ports(words(inst.args, env, escape, line), inst)})
        cfg["ExposedPorts"] = ports
    elif kw == "CMD":
        cfg["Cmd"] = command(inst, config)
    elif kw == "ENTRYPOINT":
        cfg["Entrypoint"] = command(inst, config)
        cfg.pop("Cmd", None)  # as docker: an ENTRYPOINT resets the base image's CMD
    elif kw == "USER":
        user = word(inst.args, env, escape, line)
        if not user or " " in user:
            raise DockerfileError(f"Dockerfile line {line}: USER takes one USER[:GROUP]")
        cfg["User"] = user
    elif kw == "WORKDIR":
        path = word(inst.args, env, escape, line)
        cfg["WorkingDir"] = posixpath.normpath(posixpath.join(cfg.get("WorkingDir") or "/", path))
    elif kw == "STOPSIGNAL":
        sig = word(inst.args, env, escape, line)
        if not (sig.isdigit() or re.fullmatch(r"(SIG)?[A-Z0-9+-]+", sig)):
            raise DockerfileError(f"Dockerfile line {line}: STOPSIGNAL: invalid signal {sig!r}")
        cfg["StopSignal"] = sig
    elif kw == "VOLUME":
        cfg["Volumes"] = {**(cfg.get("Volumes") or {}), **{p: {} for p in volumes(inst, env, escape)}}
    elif kw == "SHELL":
        form = json_form(inst)
        if not form:
            raise DockerfileError(f"Dockerfile line {line}: SHELL must be a JSON list, like "
                                  '["/bin/bash", "-c"]')
        cfg["Shell"] = form
    elif kw == "HEALTHCHECK":
        cfg["Healthcheck"] = _healthcheck(inst)
    elif kw == "ONBUILD":
        trigger = inst.args.split(None, 1)[0].upper() if inst.args.strip() else ""
        if trigger in ("ONBUILD", "FROM", "MAINTAINER", ""):
            raise DockerfileError(f"Dockerfile line {line}: ONBUILD {trigger or 'needs an instruction'}"
                                  + (" is not allowed" if trigger else ""))
        cfg["OnBuild"] = (cfg.get("OnBuild") or []) + [inst.args]
    else:
        raise AssertionError(kw)


def volumes(inst: Instruction, env: dict[str, str], escape: str = "\\") -> list[str]:
    paths = json_form(inst)
    if paths is None:
        paths = words(inst.args, env, escape, inst.line)
    if not paths or any(not p.startswith("/") for p in paths):
        raise DockerfileError(f"Dockerfile line {inst.line}: VOLUME takes absolute paths")
    return [posixpath.normpath(p) for p in paths]


def _healthcheck(inst: Instruction) -> dict:
    args = inst.args.strip()
    if args.upper() == "NONE":
        return {"Test": ["NONE"]}
    head, _, rest = args.partition(" ")
    if head.upper() != "CMD" or not rest.strip():
        raise DockerfileError(f"Dockerfile line {inst.line}: HEALTHCHECK takes NONE or [OPTIONS] CMD command")
    sub = Instruction("CMD", rest.strip(), inst.line)
    form = json_form(sub)
    check: dict = {"Test": ["CMD", *form] if form is not None else ["CMD-SHELL", rest.strip()]}
    names = {"interval": "Interval", "timeout": "Timeout", "start-period": "StartPeriod",
             "start-interval": "StartInterval"}
    for flag, value in inst.flags:
        if flag == "retries":
            if not value.isdigit():
                raise DockerfileError(f"Dockerfile line {inst.line}: HEALTHCHECK --retries takes a number")
            check["Retries"] = int(value)
        else:
            check[names[flag]] = _duration(value, inst)
    return check
