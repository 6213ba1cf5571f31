"""A small thread-safe least-recently-used cache: the one cache every library of loaded things
(checkpoints, ControlNets, upscalers, LoRA files, embeddings, IP-Adapters) keeps.

What it holds are immutable inputs (weights read from files), never request state. Keys that
include a file's size and mtime (``file_key``) make an edited file a new entry.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Callable, Generic, Hashable, TypeVar

V = TypeVar("V")
_MISSING = object()


def file_key(path: str | os.PathLike) -> tuple[str, int, int]:
    """(path, size, mtime in ns): a cache key that changes when the file is replaced or edited."""
    st = os.stat(path)
    return str(path), st.st_size, st.st_mtime_ns


def folder_key(path: str | os.PathLike) -> tuple[tuple[str, int, int], ...]:
    """``file_key`` of every file in a model folder (sorted, subfolders included): it changes
    when any file of the folder is added, replaced or edited."""
    root = os.fspath(path)
    files = sorted(os.path.join(d, f) for d, _, names in os.walk(root) for f in names)
    return tuple(file_key(f) for f in files)


class LRUCache(Generic[V]):
    """At most ``capacity`` values; a hit makes its entry the most recently used, a new entry
    past the capacity evicts the least recently used.

    Args:
        capacity: how many entries stay (at least 1).
        on_evict: called as ``on_evict(key, value)`` after an entry leaves (eviction, ``pop``,
            ``clear``), e.g. to release device memory.
    """

    def __init__(self, capacity: int, *, on_evict: Callable[[Hashable, V], None] | None = None):
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._on_evict = on_evict
        self._items: OrderedDict[Hashable, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, default=None):
        """The value of ``key`` (now the most recently used), or ``default``."""
        with self._lock:
            if key not in self._items:
                return default
            self._items.move_to_end(key)
            return self._items[key]

    def put(self, key: Hashable, value: V) -> V:
        """Store ``value`` as the most recently used; evict the oldest past the capacity."""
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            evicted = []
            while len(self._items) > self.capacity:
                evicted.append(self._items.popitem(last=False))
        self._evicted(evicted)
        return value

    def get_or_load(self, key: Hashable, load: Callable[[], V]) -> V:
        """The cached value of ``key``, or ``load()`` stored under it. ``load`` runs outside the
        cache's lock (two threads may both load a missing key; the second result is kept); a
        caller that must load once holds its own lock around this call."""
        value = self.get(key, _MISSING)
        if value is not _MISSING:
            return value
        return self.put(key, load())

    def pop(self, key: Hashable, default=None):
        with self._lock:
            value = self._items.pop(key, _MISSING)
        if value is _MISSING:
            return default
        self._evicted([(key, value)])
        return value

    def clear(self) -> None:
        with self._lock:
            evicted = list(self._items.items())
            self._items.clear()
        self._evicted(evicted)

    def _evicted(self, items: list) -> None:
        if self._on_evict is not None:
            for key, value in items:
                self._on_evict(key, value)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def keys(self) -> list:
        """Keys from the least to the most recently used."""
        with self._lock:
            return list(self._items)
