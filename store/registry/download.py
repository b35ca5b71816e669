"""Blob downloads as a verified stream: read it like a file; a dropped connection is
resumed with ``Range`` from the byte reached (or the start skipped when the registry
ignores ranges); at the end the size and digest must be the descriptor's, else
DigestMismatch, so nothing unverified is ever taken for the blob."""

from __future__ import annotations

import hashlib
import io
import re
import time
from collections.abc import Callable

from .client import Registry, pull_scope
from .errors import DigestMismatch, RegistryError
from ..oci.descriptor import Descriptor
from .transport import DROPPED, Response

_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class BlobReader(io.RawIOBase):
    """A blob of ``repo`` as a readable binary stream, verified as it is read."""

    def __init__(self, registry: Registry, repo: str, desc: Descriptor,
                 progress: Callable[[int], None] | None = None, offset: int = 0, hasher=None) -> None:
        """Read ``desc``'s blob from ``offset`` on; ``hasher`` must then hold the bytes
        before it (a download picked up where an earlier one stopped)."""
        super().__init__()
        self.registry, self.repo, self.desc = registry, repo, desc
        self.progress = progress
        self.pos = offset  # bytes handed out (and hashed)
        self.hasher = hasher or hashlib.new(desc.digest.split(":", 1)[0])
        self.verified = False
        self.resumes = 0  # how often a dropped download was picked up again
        self._skip = 0  # bytes to drop from the response (a 200 after a drop)
        self._failures = 0  # consecutive drops without progress
        self._resp: Response | None = None
        self._open()

    def readable(self) -> bool:
        return True

    def _what(self) -> str:
        return f"blob {self.desc.digest[:19]} of {self.registry.name}/{self.repo}"

    def _open(self) -> None:
        headers = {"Range": f"bytes={self.pos}-"} if self.pos else {}
        resp = self.registry.request("GET", self.registry.blob_url(self.repo, self.desc.digest),
                                     (pull_scope(self.repo),), f"downloading {self._what()}", headers)
        self._skip = 0
        if resp.status == 206 and self.pos:
            m = _CONTENT_RANGE.match(resp.header("Content-Range") or "")
            if not m or int(m.group(1)) != self.pos:
                resp.close()
                raise RegistryError(f"{self._what()}: the registry resumed at the wrong offset "
                                    f"({resp.header('Content-Range')!r} for byte {self.pos})")
        elif resp.status == 200:
            self._skip = self.pos  # the registry ignored Range: drop what we already have
            length = resp.header("Content-Length")
            if length and length.isdigit() and int(length) != self.desc.size:
                resp.close()
                raise DigestMismatch(f"{self._what()}: the registry sends {length} bytes, "
                                     f"its descriptor says {self.desc.size}")
        elif resp.status == 404:
            resp.discard()
            raise RegistryError(f"{self._what()}: not found on the registry (BLOB_UNKNOWN)")
        else:
            raise self.registry.error(resp, f"downloading {self._what()}")
        self._resp = resp
        self.registry.count("blob_get")

    def _dropped(self, e: BaseException | None) -> None:
        """Pick the download up again after a dropped connection (or a short body)."""
        if self._resp is not None:
            self._resp.close()
            self._resp = None
        self._failures += 1
        policy = self.registry.transport.retry
        if self._failures >= policy.attempts:
            raise self.registry.transport.unreachable(
                e or ConnectionResetError(), f" while downloading {self._what()} "
                f"at byte {self.pos} of {self.desc.size} ({self._failures} attempts)")
        time.sleep(policy.delay(self._failures - 1))
        self.resumes += 1
        self._open()

    def readinto(self, buf) -> int:
        view = memoryview(buf)
        while True:
            if self.verified or self._resp is None:
                return 0
            try:
                data = self._resp.read1(len(view))
            except DROPPED + (OSError,) as e:
                self._dropped(e)
                continue
            n = len(data)
            view[:n] = data
            if n == 0:
                if self.pos < self.desc.size:
                    self._dropped(None)  # the body ended early: a dropped connection
                    continue
                self._finish_check()
                return 0
            if self._skip:
                drop = min(self._skip, n)
                self._skip -= drop
                if drop == n:
                    continue
                view[: n - drop] = bytes(view[drop:n])
                n -= drop
            if self.pos + n > self.desc.size:
                self._resp.close()
                raise DigestMismatch(f"{self._what()}: the registry sent more than the "
                                     f"{self.desc.size} bytes its descriptor says")
            self.hasher.update(view[:n])
            self.pos += n
            self._failures = 0
            if self.progress:
                self.progress(self.pos)
            return n

    def _finish_check(self) -> None:
        if self._resp is not None:
            self._resp.close()
            self._resp = None
        actual = f"{self.desc.digest.split(':', 1)[0]}:{self.hasher.hexdigest()}"
        if actual != self.desc.digest:
            raise DigestMismatch(f"{self._what()}: the bytes received have digest {actual}")
        self.verified = True

    def finish(self) -> str:
        """Read whatever is left, check size and digest; returns the digest."""
        while not self.verified:
            if not self.read(1 << 20) and not self.verified:
                raise RegistryError(f"{self._what()}: download ended early")
        return self.desc.digest

    def close(self) -> None:
        if self._resp is not None:
            self._resp.close()
            self._resp = None
        super().close()

