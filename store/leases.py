"""Leases: records of work in progress (an import or a commit) whose staged blobs gc
must leave alone. A lease names its owner process; it dies with that process, and
expires after 24 hours in any case, so a crashed import never pins its blobs for long.
"""

from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass

from .index import Index

DEFAULT_TTL_NS = 24 * 3600 * 1_000_000_000
_LEASE = struct.Struct("<qiQ")  # expires ns, pid, process start time (clock ticks)


def process_start(pid: int) -> int:
    """The start time of a process in clock ticks since boot (0 if it does not exist)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return 0


@dataclass(slots=True, frozen=True)
class Lease:
    id: str
    expires_ns: int
    pid: int
    start: int

    def alive(self, now_ns: int | None = None) -> bool:
        """Not expired, and its owner process still runs (the same process, not a reuse)."""
        if (now_ns or time.time_ns()) >= self.expires_ns:
            return False
        return process_start(self.pid) == self.start


def take(index: Index, lease_id: str, ttl_ns: int = DEFAULT_TTL_NS) -> Lease:
    pid = os.getpid()
    lease = Lease(lease_id, time.time_ns() + ttl_ns, pid, process_start(pid))
    index.write(lambda txn: txn.put(lease_id.encode(), _LEASE.pack(lease.expires_ns, pid, lease.start),
                                    db=index.db("leases")))
    return lease


def release(index: Index, lease_id: str) -> None:
    index.write(lambda txn: txn.delete(lease_id.encode(), db=index.db("leases")))


def all_leases(index: Index) -> list[Lease]:
    with index.read() as txn:
        return [Lease(k.decode(), *_LEASE.unpack(v)) for k, v in txn.cursor(db=index.db("leases"))]
