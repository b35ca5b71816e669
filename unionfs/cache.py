"""A bounded map for the server's caches: memory stays flat however much is walked.

Two generations, as a cheap approximation of LRU: new entries go to the young one; when it
is full it becomes the old one (the previous old one is dropped), and a hit in the old
generation moves the entry back to the young one. At most ``2 * half`` entries are kept;
every operation is O(1).
"""

from __future__ import annotations

from typing import Generic, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
_MISSING = object()


class BoundedCache(Generic[K, V]):
    """A dict-like cache of at most ``size`` entries (a missing key raises KeyError)."""

    def __init__(self, size: int) -> None:
        self._half = max(1, size // 2)
        self._young: dict[K, V] = {}
        self._old: dict[K, V] = {}

    def __getitem__(self, key: K) -> V:
        value = self._young.get(key, _MISSING)
        if value is not _MISSING:
            return value  # type: ignore[return-value]
        value = self._old[key]
        self[key] = value
        return value

    def __setitem__(self, key: K, value: V) -> None:
        if len(self._young) >= self._half:
            self._old, self._young = self._young, {}
        self._young[key] = value

    def __contains__(self, key: K) -> bool:
        return key in self._young or key in self._old

    def __len__(self) -> int:
        return len(self._young) + len(self._old)

    def clear(self) -> None:
        self._young.clear()
        self._old.clear()
