"""Encrypted chunks of remote objects kept on local disk, so that reading a file again, even
after a remount, costs no download.

Owns: the ``blocks/`` directory of a volume's cache.  One sparse file per object version,
named by its file id and body salt (a version's chunks never change: an upload always takes a
fresh salt), holding the version's header and chunks exactly as S3 stores them, so what is on
disk is as encrypted as what is in the bucket and is authenticated again on every use.

Record layout of a file: record 0 is the body header, record ``1 + i`` is chunk ``i``; each
record is ``length (4 bytes, big endian) ‖ bytes`` at a fixed offset, and a length of 0 (a hole
of the sparse file) means "not cached".

Bounded by ``limit`` bytes on disk (allocated blocks): least recently used versions are removed
first; the version being added is never evicted to make room for itself (it stops growing
instead, so one file larger than the cache does not thrash it).  Staged (dirty) files live
elsewhere and are never evicted.  Errors of the cache disk (full, I/O) only disable caching of
what failed: the S3 object stays the source of truth.

Called from worker threads and the trio thread alike: a lock guards the bookkeeping.
Must not import: store, fs, fuse.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

from cryptfs.format.body import HEADER_SIZE, TAG_SIZE

log = logging.getLogger(__name__)
_LEN = struct.Struct(">I")


class BlockCache:
    def __init__(self, root: Path, limit: int, chunk: int) -> None:
        self.root = root
        self.limit = limit
        self.chunk = chunk
        self._rec = _LEN.size + chunk + TAG_SIZE
        self._base = _LEN.size + HEADER_SIZE  # chunk records start after the header record
        self._lock = threading.Lock()
        self._files: OrderedDict[str, int] = OrderedDict()  # name -> bytes on disk, LRU first
        self.used = 0
        self.hits = 0  # chunks served from disk
        self.stores = 0  # chunks written to disk
        self.errors = 0
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(root, 0o700)
        found = []
        with os.scandir(root) as it:
            for e in it:
                if e.name.endswith(".blk"):
                    with contextlib.suppress(OSError):
                        st = e.stat()
                        found.append((st.st_mtime, e.name, st.st_blocks * 512))
        for _mtime, name, size in sorted(found):
            self._files[name] = size
            self.used += size
        self._evict(None)

    @staticmethod
    def _name(file_id: bytes, salt: bytes) -> str:
        return f"{file_id.hex()}-{salt.hex()}.blk"

    def _offset(self, index: int) -> int:
        return 0 if index < 0 else self._base + index * self._rec

    def has(self, file_id: bytes, salt: bytes) -> bool:
        with self._lock:
            return self._name(file_id, salt) in self._files

    def get(
        self, file_id: bytes, salt: bytes, first: int, last: int, *, header: bool = True
    ) -> tuple[bytes | None, dict[int, bytes]]:
        """The cached header (None if not cached or not asked for) and ciphertext chunks
        among [first, last]."""
        name = self._name(file_id, salt)
        with self._lock:
            if name not in self._files:
                return None, {}
            self._files.move_to_end(name)
        try:
            fd = os.open(self.root / name, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self._forget(name)
            return None, {}
        try:
            head = os.pread(fd, self._base, 0) if header else b""
            start = self._offset(first)
            raw = os.pread(fd, (last - first + 1) * self._rec, start)
        except OSError as e:
            self._failed(name, e)
            return None, {}
        finally:
            os.close(fd)
        cached = None
        if len(head) == self._base and _LEN.unpack_from(head)[0] == HEADER_SIZE:
            cached = head[_LEN.size :]
        out: dict[int, bytes] = {}
        view = memoryview(raw)
        for k in range(last - first + 1):
            rec = view[k * self._rec : (k + 1) * self._rec]
            if len(rec) < _LEN.size:
                break
            n = _LEN.unpack_from(rec)[0]
            if 0 < n <= self._rec - _LEN.size and len(rec) >= _LEN.size + n:
                out[first + k] = bytes(rec[_LEN.size : _LEN.size + n])
        with self._lock:
            self.hits += len(out)
        return cached, out

    def put(
        self,
        file_id: bytes,
        salt: bytes,
        header: bytes | None,
        chunks: Mapping[int, bytes | memoryview],
    ) -> None:
        """Store a version's header and/or ciphertext chunks (what S3 returned for them)."""
        if self.limit <= 0 or (header is None and not chunks):
            return
        name = self._name(file_id, salt)
        path = self.root / name
        want = len(chunks) * self._rec + (self._base if header is not None else 0)
        with self._lock:
            self._evict(name, want)
            room = self.limit - self.used - (self._base if header is not None else 0)
        if want > room:  # only this version is left: it stops growing
            fit = max(0, room // self._rec)
            chunks = {i: chunks[i] for i in sorted(chunks)[:fit]}
            if not chunks and header is None:
                return
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            self._failed(name, e)
            return
        try:
            if header is not None:
                os.pwrite(fd, _LEN.pack(len(header)) + header, 0)
            for i, data in _runs(chunks):
                iov: list[bytes | memoryview] = []
                # no copies: the kernel gathers the pieces.  Only an object's final chunk
                # can be short, and nothing follows it: no padding (a small file takes a
                # few KiB of the cache disk, not a whole record)
                for d in data:
                    iov += [_LEN.pack(len(d)), d]
                for k in range(0, len(iov), 512):  # below IOV_MAX
                    os.pwritev(fd, iov[k : k + 512], self._offset(i) + sum(map(len, iov[:k])))
            after = os.fstat(fd).st_blocks * 512
        except OSError as e:
            self._failed(name, e)
            return
        finally:
            os.close(fd)
        with self._lock:
            before = self._files.get(name, 0)
            self._files[name] = after
            self._files.move_to_end(name)
            self.used += after - before
            self.stores += len(chunks)
            self._evict(name, 0)

    def drop(self, file_id: bytes, salt: bytes) -> None:
        """Forget a version (e.g. one of its chunks failed authentication)."""
        self._remove(self._name(file_id, salt))

    def _evict(self, keep: str | None, want: int = 0) -> None:
        """Remove least recently used versions (other than ``keep``) until ``want`` more
        bytes fit within the limit."""
        while self.used + want > self.limit and self._files:
            victim = next(iter(self._files))
            if victim == keep:
                if len(self._files) == 1:
                    return
                self._files.move_to_end(victim)
                victim = next(iter(self._files))
            size = self._files.pop(victim)
            self.used -= size
            with contextlib.suppress(OSError):
                (self.root / victim).unlink()

    def _forget(self, name: str) -> None:
        with self._lock:
            self.used -= self._files.pop(name, 0)

    def _remove(self, name: str) -> None:
        self._forget(name)
        with contextlib.suppress(OSError):
            (self.root / name).unlink()

    def _failed(self, name: str, e: OSError) -> None:
        with self._lock:
            self.errors += 1
        log.warning("block cache: %s: %s (not cached)", name, e.strerror or e)
        self._remove(name)


def _runs(
    chunks: Mapping[int, bytes | memoryview],
) -> list[tuple[int, list[bytes | memoryview]]]:
    """Consecutive indexes grouped: (first index, their data)."""
    out: list[tuple[int, list[bytes | memoryview]]] = []
    for i in sorted(chunks):
        if out and out[-1][0] + len(out[-1][1]) == i:
            out[-1][1].append(chunks[i])
        else:
            out.append((i, [chunks[i]]))
    return out
