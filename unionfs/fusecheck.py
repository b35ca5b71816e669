"""Why a FUSE mount cannot be made, said in one line.

Where the cause is certain before anything starts (no /dev/fuse, no access to it,
allow_other refused by /etc/fuse.conf) :func:`problem` names it, so a failed mount
makes nothing. Otherwise libfuse and fusermount3 print their reason on stderr and libfuse
returns only a number: :func:`serve_or_explain` keeps what they print while a mount
starts, and a failure becomes a MountError with the line a user reads (:func:`explain`).
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import stat
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator

from layerfs.store import StoreError

FUSE_DEVICE = "/dev/fuse"
FUSE_CONF = "/etc/fuse.conf"

NO_DEVICE = (f"no {FUSE_DEVICE}: the fuse kernel module is not loaded (modprobe fuse), or this "
             "container was started without the device (docker run --device /dev/fuse)")
ALLOW_OTHER = (f"-o {{option}} is refused to users other than root unless {FUSE_CONF} has a line "
               "user_allow_other")

# libfuse 3.12+ says this on every start through the fuse_main_real entry point mfusepy
# calls (an unset thread limit reads as -1); it keeps its default limit: no news.
_NOISE = ("Ignoring invalid max threads value",)

# What fuse_main returns (libfuse's helper.c), for a failure that printed nothing.
_MAIN_ERRORS = {1: "invalid options", 2: "no mountpoint", 3: "the FUSE session could not be set up",
                4: "the kernel refused the mount", 5: "it could not go to the background",
                6: "signal handlers could not be set", 7: "its event loop failed"}


class MountError(StoreError):
    """A mount that cannot be made (or unmade), and why."""


def _no_access(uid: int) -> str:
    st = os.stat(FUSE_DEVICE)
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return (f"no access to {FUSE_DEVICE} ({stat.filemode(st.st_mode)} {owner}:{group}) for uid {uid}: "
            f"it must be readable and writable by the user who mounts (Debian makes it 0666)")


def _user_allow_other() -> bool | None:
    """Whether /etc/fuse.conf lets users other than root use allow_other; None if it
    cannot be read here (fusermount3 reads it as root: let it decide)."""
    try:
        with open(FUSE_CONF) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return False
    except OSError:
        return None
    return any(line.split("#", 1)[0].strip() == "user_allow_other" for line in lines)


def problem(options: dict) -> str | None:
    """Why this user cannot make a FUSE mount with ``options`` (the -o options asked
    for), if that is certain before trying; else None."""
    if not os.path.exists(FUSE_DEVICE):
        return NO_DEVICE
    if not os.access(FUSE_DEVICE, os.R_OK | os.W_OK):
        return _no_access(os.getuid())
    if os.getuid() != 0:
        for option in ("allow_other", "allow_root"):
            if options.get(option) and _user_allow_other() is False:
                return ALLOW_OTHER.format(option=option)
    return None


def serve_or_explain(serve: Callable[[Callable[[], None]], None], mountpoint: str,
                     on_ready: Callable[[], None] | None = None) -> None:
    """Run ``serve(ready)``, which mounts, calls ``ready`` once the mount serves, and
    serves until unmounted; a mount that fails before it serves raises MountError with
    the reason libfuse printed, and nothing of that goes to stderr."""
    with _libfuse_messages() as messages:
        def ready() -> None:
            messages.release()
            if on_ready is not None:
                on_ready()

        try:
            serve(ready)
        except RuntimeError as e:  # fuse_main's number; what libfuse printed says why
            if messages.released:
                raise
            raise MountError(explain(messages.text(), e.args[0] if e.args else None, mountpoint)) from None


class _Messages:
    """What libfuse and fusermount3 printed while a mount started (see _libfuse_messages)."""

    def __init__(self, saved_fd: int, capture) -> None:
        self._saved = saved_fd
        self._capture = capture
        self._lock = threading.Lock()
        self.released = False

    def release(self) -> None:
        """The mount serves: stderr is stderr again, with what was printed meanwhile."""
        with self._lock:
            if self.released:
                return
            self.released = True
            sys.stderr.flush()
            os.dup2(self._saved, 2)
            text = "".join(line for line in self.text().splitlines(keepends=True)
                           if not line.startswith(_NOISE))
            if text:
                os.write(2, text.encode(errors="replace"))

    def text(self) -> str:
        self._capture.seek(0)
        return self._capture.read().decode(errors="replace")


@contextlib.contextmanager
def _libfuse_messages() -> Iterator[_Messages]:
    """Keep what is written to stderr (fd 2: libfuse's and fusermount3's messages) until
    ``release()``; after a failure, it is the explanation's source instead of a second,
    raw line on the user's terminal."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        messages = _Messages(saved, capture)
        try:
            yield messages
        finally:
            with messages._lock:
                if not messages.released:
                    sys.stderr.flush()
                    os.dup2(saved, 2)
                    messages.released = True
            os.close(saved)


def explain(text: str, code: object, mountpoint: str) -> str:
    """One line on why a mount failed, from what libfuse printed and fuse_main's
    ``code``: the cause named where it is known, else libfuse's own message."""
    said = [line.strip() for line in text.splitlines()
            if re.match(r"(fuse|fusermount3?|mount(\.fuse3?)?):", line.strip())]
    joined = "\n".join(said)
    if "failed to open /dev/fuse: Permission denied" in joined:
        return _no_access(os.getuid())
    if "device not found" in joined:
        return NO_DEVICE
    m = re.search(r"option (\w+) only allowed if 'user_allow_other' is set", joined)
    if m:
        return ALLOW_OTHER.format(option=m.group(1))
    if "Device or resource busy" in joined:
        return f"mountpoint {mountpoint} is busy (something is mounted there, or it is in use)"
    m = re.search(r"bad mount point [`']?[^:]*?'?: (.*)", joined)
    if m:
        return f"mountpoint {mountpoint}: {m.group(1)}"
    if said:
        return f"the mount failed: {said[-1]}"
    return f"the mount failed: {_MAIN_ERRORS.get(code, f'libfuse error {code}')}"  # type: ignore[call-overload]
