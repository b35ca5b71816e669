"""Hold a cgroup's processes still while something reads what they write.

``docker commit`` pauses the container (a cgroup freezer) so that its root filesystem
stands still while it is read. A kernel-backend mount has no gate of layerfs's own, so
``layerfs commit --freeze CGROUP`` does the same with the cgroup of the container's
processes: cgroup v2's ``cgroup.freeze``, or the v1 freezer's ``freezer.state``.
"""

from __future__ import annotations

import contextlib
import os
import time

from layerfs.store import StoreError


class FreezeError(StoreError):
    pass


@contextlib.contextmanager
def frozen(cgroup: str, timeout: float = 30.0):
    """Freeze every process of a cgroup (v2 ``cgroup.freeze`` or the v1 freezer) while
    the block runs, as docker pause does; thawed afterwards whatever happens."""
    path = os.path.realpath(cgroup)
    if os.path.exists(os.path.join(path, "cgroup.freeze")):
        control, freeze, thaw = os.path.join(path, "cgroup.freeze"), "1", "0"

        def is_frozen() -> bool:
            with open(os.path.join(path, "cgroup.events")) as f:
                return "frozen 1" in f.read().splitlines()
    elif os.path.exists(os.path.join(path, "freezer.state")):
        control, freeze, thaw = os.path.join(path, "freezer.state"), "FROZEN", "THAWED"

        def is_frozen() -> bool:
            with open(control) as f:
                return f.read().strip() == "FROZEN"
    else:
        raise FreezeError(f"{cgroup} is not a cgroup with a freezer (no cgroup.freeze or freezer.state)")

    def write(value: str) -> None:
        with open(control, "w") as f:
            f.write(value)

    try:
        write(freeze)
        deadline = time.monotonic() + timeout
        while not is_frozen():
            if time.monotonic() > deadline:
                raise FreezeError(f"the processes of {cgroup} did not freeze within {timeout:.0f} s")
            time.sleep(0.01)
        yield
    finally:
        write(thaw)
