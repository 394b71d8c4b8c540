"""Decrypted chunks in memory: an LRU bounded by bytes.

Owns: plaintext chunks of authenticated objects, keyed by (file id, salt, index); the salt
names one version of a file, so a new version never finds an older one's bytes.
Must not import: ``cryptfs.store``, ``cryptfs.fs``, ``cryptfs.fuse``.
"""

from __future__ import annotations

from collections import OrderedDict


class ChunkCache:
    """Decrypted chunks in memory, LRU bounded by bytes, keyed by (file id, salt, index)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._d: OrderedDict[tuple[bytes, bytes, int], bytes] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple[bytes, bytes, int]) -> bytes | None:
        v = self._d.get(key)
        if v is None:
            self.misses += 1
            return None
        self.hits += 1
        self._d.move_to_end(key)
        return v

    def put(self, key: tuple[bytes, bytes, int], value: bytes) -> None:
        self.discard(key)
        self._d[key] = value
        self.used += len(value)
        while self.used > self.limit and self._d:
            _, v = self._d.popitem(last=False)
            self.used -= len(v)

    def peek(self, key: tuple[bytes, bytes, int]) -> bytes | None:
        """Like ``get``, without counting a hit or miss."""
        v = self._d.get(key)
        if v is not None:
            self._d.move_to_end(key)
        return v

    def discard(self, key: tuple[bytes, bytes, int]) -> None:
        v = self._d.pop(key, None)
        if v is not None:
            self.used -= len(v)

    def clear(self) -> None:
        self._d.clear()
        self.used = 0
