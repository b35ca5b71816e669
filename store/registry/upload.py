"""Blob uploads: skip what the registry has (HEAD), mount from another repository,
else POST an upload and send the bytes, in one PUT or, for large blobs, in PATCH
chunks. A dropped chunk is resumed from the upload's status (``GET`` of its Location
gives the registry's ``Range``); when the registry has dropped the upload itself, a new
one starts. Each new attempt waits longer (the transport's retry policy).
"""

from __future__ import annotations

import contextlib
import enum
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import BinaryIO

from .client import Registry, pull_scope, push_scope
from .errors import DigestMismatch, RegistryError
from ..oci.descriptor import Descriptor
from .transport import DROPPED

# A fresh stream of the blob's bytes from the given offset on (a context manager).
Source = Callable[[int], AbstractContextManager[BinaryIO]]
_PIECE = 1 << 20
_RANGE = re.compile(r"^(?:bytes=)?0-(\d+)$")


class Outcome(enum.Enum):
    """How a blob got to the registry."""

    EXISTS = "exists"  # the repository had it
    MOUNTED = "mounted"  # linked from another repository of the registry
    UPLOADED = "uploaded"


class _Dropped(Exception):
    """An upload request that got no answer; the upload's status says what arrived."""

    def __init__(self, cause: BaseException | None) -> None:
        super().__init__(str(cause))
        self.cause = cause


class _UploadGone(Exception):
    """The registry no longer knows the upload (cancelled, expired, or its state refused)."""


def stream_source(open_blob: Callable[[], AbstractContextManager[BinaryIO]]) -> Source:
    """A Source over something that opens the blob from its start: seeked to the offset
    when the stream can, else the bytes before it are read and dropped."""
    @contextlib.contextmanager
    def open_at(offset: int) -> Iterator[BinaryIO]:
        with open_blob() as f:
            if offset and f.seekable():
                f.seek(offset)
                offset = 0
            while offset:
                chunk = f.read(min(offset, _PIECE))
                if not chunk:
                    raise RegistryError("the blob's source ended before the upload's offset")
                offset -= len(chunk)
            yield f
    return open_at


class _Upload:
    def __init__(self, registry: Registry, repo: str, desc: Descriptor, source: Source,
                 progress: Callable[[int], None] | None) -> None:
        self.registry, self.repo, self.desc, self.source = registry, repo, desc, source
        self.progress = progress
        self.what = f"blob {desc.digest[:19]} to {registry.name}/{repo}"

    def _pieces(self, offset: int, length: int) -> Iterator[bytes]:
        """The blob's bytes [offset, offset+length), reported to progress as they go."""
        # Only the source's own errors surface in this frame (the socket's are the
        # sender's), and a local read error must not pass for a dropped connection.
        try:
            with self.source(offset) as f:
                sent = 0
                while sent < length:
                    piece = f.read(min(_PIECE, length - sent))
                    if not piece:
                        raise RegistryError(f"{self.what}: the source ended at byte {offset + sent} "
                                            f"of {self.desc.size}")
                    sent += len(piece)
                    self.registry.count("bytes_sent", len(piece))
                    if self.progress:
                        self.progress(offset + sent)
                    yield piece
        except OSError as e:
            raise RegistryError(f"{self.what}: cannot read it: {e.strerror or e}") from None

    def _send(self, method: str, url: str, headers: dict, offset: int, length: int):
        """Send part of the blob; a connection failure becomes _Dropped."""
        hdrs = {**self.registry.auth.headers((push_scope(self.repo),)), **headers}
        try:
            return self.registry.transport.send(method, url, hdrs, self._pieces(offset, length), length)
        except DROPPED + (OSError,) as e:
            raise _Dropped(e) from None

    def try_mount(self, src: str) -> tuple[bool, str | None]:
        """POST ?mount=&from=: (True, None) when mounted; else the Location of the upload
        the registry opened instead (None if it refused, e.g. no pull access to ``src``)."""
        query = f"?mount={self.desc.digest}&from={src}"
        resp = self.registry.request("POST", f"/v2/{self.repo}/blobs/uploads/{query}",
                                     (push_scope(self.repo), pull_scope(src)), f"mounting {self.what} from {src}")
        resp.discard()
        if resp.status == 201:
            self.registry.count("mount")
            return True, None
        if resp.status == 202 and resp.header("Location"):
            self.registry.count("upload_start")
            return False, resp.header("Location")
        return False, None

    def start(self, mount_from: Sequence[str]) -> tuple[str | None, bool]:
        """POST a new upload (trying each mount source first): (Location, mounted)."""
        for src in mount_from:
            if src != self.repo:
                mounted, location = self.try_mount(src)
                if mounted or location:
                    return location, mounted
        resp = self.registry.request("POST", f"/v2/{self.repo}/blobs/uploads/", (push_scope(self.repo),),
                                     f"starting the upload of {self.what}")
        if resp.status != 202 or not resp.header("Location"):
            raise self.registry.error(resp, f"starting the upload of {self.what}")
        resp.discard()
        self.registry.count("upload_start")
        return resp.header("Location"), False

    def status(self, location: str) -> tuple[str, int]:
        """The upload's Location and the bytes the registry holds (GET of the Location)."""
        resp = self.registry.request("GET", location, (push_scope(self.repo),),
                                     f"asking the status of the upload of {self.what}")
        if resp.status != 204:
            resp.discard()
            raise _UploadGone()
        resp.discard()
        m = _RANGE.match(resp.header("Range") or "0-0")
        if not m:
            raise _UploadGone()
        end = int(m.group(1))
        # "0-0" is both "nothing" and "one byte"; chunks are never one byte long, so nothing.
        return resp.header("Location") or location, 0 if end == 0 else end + 1

    def finish(self, location: str, offset: int) -> None:
        """The closing PUT ?digest= (with the rest of the bytes, or none)."""
        url = self.registry.upload_url(location, digest=self.desc.digest)
        resp = self._send("PUT", url, {"Content-Type": "application/octet-stream"},
                          offset, self.desc.size - offset)
        if resp.status == 201:
            resp.discard()
            claimed = resp.header("Docker-Content-Digest")
            if claimed and claimed != self.desc.digest:
                raise DigestMismatch(f"{self.what}: the registry stored it as {claimed}")
            return
        if resp.status == 404:
            resp.discard()
            raise _UploadGone()
        err = self.registry.error(resp, f"completing the upload of {self.what}")
        if "DIGEST_INVALID" in str(err):
            raise DigestMismatch(f"{self.what}: the registry found that the bytes sent do not "
                                 f"have that digest (the local copy is damaged?)")
        if resp.status >= 500:
            raise _Dropped(err)
        raise err

    def patch(self, location: str, offset: int) -> tuple[str, int]:
        """Send one chunk from ``offset``; the new Location and offset."""
        n = min(self.registry.chunk_size, self.desc.size - offset)
        resp = self._send("PATCH", location, {"Content-Type": "application/octet-stream",
                                              "Content-Range": f"{offset}-{offset + n - 1}"}, offset, n)
        if resp.status == 202:
            resp.discard()
            self.registry.count("patch")
            m = _RANGE.match(resp.header("Range") or "")
            end = int(m.group(1)) + 1 if m else offset + n
            return resp.header("Location") or location, end
        if resp.status == 416:  # out of order: the registry holds something else; ask it
            resp.discard()
            raise _Dropped(None)
        if resp.status == 404:
            resp.discard()
            raise _UploadGone()
        err = self.registry.error(resp, f"uploading {self.what}")
        if resp.status >= 500:
            raise _Dropped(err)
        raise err

    def cancel(self, location: str | None) -> None:
        """Tell the registry to drop an upload we give up on (best effort)."""
        if location is None:
            return
        try:
            self.registry.transport.send("DELETE", self.registry.transport.url(location),
                                         self.registry.auth.headers((push_scope(self.repo),))).discard()
        except (RegistryError, OSError) + DROPPED:
            pass

    def run(self, mount_from: Sequence[str]) -> Outcome:
        location, mounted = self.start(mount_from)
        if mounted:
            return Outcome.MOUNTED
        chunked = self.desc.size > self.registry.monolithic_max
        offset = 0
        failures = 0
        policy = self.registry.transport.retry
        while True:
            progress_at = offset
            try:
                if location is None:
                    location, _ = self.start(())
                    offset = 0
                if not chunked:
                    self.finish(location, 0)
                    return Outcome.UPLOADED
                while offset < self.desc.size:
                    location, offset = self.patch(location, offset)
                self.finish(location, offset)
                return Outcome.UPLOADED
            except (_Dropped, _UploadGone) as e:
                failures = 0 if offset > progress_at else failures + 1
                if failures >= policy.attempts:
                    self.cancel(location)
                    cause = e.cause if isinstance(e, _Dropped) else None
                    if isinstance(cause, RegistryError):
                        raise cause from None
                    raise self.registry.transport.unreachable(
                        cause or ConnectionResetError(), f" while uploading {self.what} "
                        f"({failures} attempts)") from None
                time.sleep(policy.delay(failures))
                if isinstance(e, _UploadGone) or not chunked or location is None:
                    location = None
                    continue
                try:
                    location, offset = self.status(location)
                    self.registry.count("resume")
                except _UploadGone:
                    location = None  # start over with a new upload
                    self.registry.count("restart")
            except BaseException:
                self.cancel(location)
                raise


def mount_blob(registry: Registry, repo: str, desc: Descriptor, src: str) -> bool:
    """Only a cross-repository mount from ``src``; True when it worked (an upload the
    registry opened instead is cancelled)."""
    up = _Upload(registry, repo, desc, stream_source(_no_source), None)
    mounted, location = up.try_mount(src)
    up.cancel(location)
    return mounted


def _no_source():
    raise RegistryError("internal error: a mount tried to upload")


def push_blob(registry: Registry, repo: str, desc: Descriptor, source: Source,
              mount_from: Sequence[str] = (), progress: Callable[[int], None] | None = None) -> Outcome:
    """Make sure ``repo`` has the blob: HEAD, else mount from one of ``mount_from``
    (repositories of the same registry), else upload it."""
    size = registry.blob_size(repo, desc.digest)
    if size is not None and (size < 0 or size == desc.size):
        if progress:
            progress(desc.size)
        return Outcome.EXISTS
    return _Upload(registry, repo, desc, source, progress).run(mount_from)
