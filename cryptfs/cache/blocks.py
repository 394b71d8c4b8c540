"""Encrypted chunks of remote objects kept on local disk, so that reading a file again, even
after a remount, costs no download.

Owns: the ``blocks/`` directory of a volume's cache.  One sparse file per object version,
named by its file id and body salt (a version's chunks never change: an upload always takes a
fresh salt), holding the version's header and chunks exactly as S3 stores them, so what is on
disk is as encrypted as what is in the bucket and is authenticated again on every use.

Record layout of a file: record 0 is the body header, record ``1 + i`` is chunk ``i``; each
record is ``length (4 bytes, big endian) ‖ bytes`` at a fixed offset, and a length of 0 (a hole
of the sparse file) means "not cached".  Records start on 4 KiB boundaries, so that large
writes can bypass the page cache (``O_DIRECT``): copying downloaded chunks into fresh
page-cache pages was a fifth of the daemon's CPU in a cold sequential read, the kernel's
write-back of them came on top, and they kept an encrypted copy of the file in memory beside
the plaintext one the kernel keeps for the mount (a 512 MiB cold read: 4.7-5.3 s of CPU over
the machine before, 4.1-4.2 s with direct writes).  Small writes, reads (the kernel's
read-ahead serves a sequential reader), and file systems without ``O_DIRECT`` go through the
page cache.

An object of one chunk (a small file), when its header and chunk are put together, is
appended to a pack instead (``<n>.pack``, records ``magic ‖ file id ‖ salt ‖ lengths ‖ header
‖ chunk``, with an index ``<n>.pidx`` of fixed entries appended after each record and read
when a mount starts): a file per small object made ext4 allocate an inode per object, and
next to recently deleted ones (a cache that evicts) that cost 0.6-1.3 ms of CPU each, more
than the rest of reading the file.  A pack is evicted whole.  A record that does not match
its index entry (a crash wrote the entry but not the record) is a miss.

Bounded by ``limit`` bytes on disk (allocated blocks): least recently used versions are removed
first; the version being added is never evicted to make room for itself (it stops growing
instead, so one file larger than the cache does not thrash it).  Staged (dirty) files live
elsewhere and are never evicted.  Errors of the cache disk (full, I/O) only disable caching of
what failed: the S3 object stays the source of truth.

Called from worker threads (``get``, ``put``, ``drop``), and from the trio thread only for
``has``, which takes no lock: the trio thread never waits for a worker's disk I/O.  A lock
guards the bookkeeping; files are unlinked after it is released.
Must not import: store, fs, fuse.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

from cryptfs.format.body import HEADER_SIZE, TAG_SIZE
from cryptfs.format.body3 import SMALL_HEAD

log = logging.getLogger(__name__)
_LEN = struct.Struct(">I")
_ALIGN = 4096  # of records, and of direct writes' offsets, lengths and buffers
_SUFFIX = ".blk2"  # ".blk": the unaligned layout before, removed when found
# a revision-3 version's trailer and segment heads (FORMAT.md §8.5), appended as they are
# read: records ``uint32_be(segment, or TRAILER) ‖ uint32_be(length) ‖ bytes``; what they
# say is checked when they are used, as when they come from S3
_HEADS = ".h3"
TRAILER = 0xFFFFFFFF
_HREC = struct.Struct(">II")
# a put of at least this many bytes bypasses the page cache: below it a direct write (a
# synchronous device write) costs more than the copy it saves
DIRECT_MIN = 256 << 10
_DIRECT_SEGMENT = 1 << 20  # bytes per direct write: the size of each aligned buffer
_POOLED = 2  # aligned buffers kept for reuse (more exist only while more threads write)
_PACK, _PIDX = ".pack", ".pidx"  # small whole objects, appended; and their index
_PMAGIC = b"CFK1"
_PREC = struct.Struct(">4s16s32sII")  # magic, file id, salt, header length, chunk length
_PENT = struct.Struct(">16s32sQII")  # file id, salt, record offset, header and chunk length
PACK_MAX = 16 << 20  # a pack past this size is closed; the next record begins a new one
# what a packed record holds before its chunk: a revision-1 body's header, or a revision-3
# body's segment head and trailer (FORMAT.md §8.5)
_PACK_HEADERS = (HEADER_SIZE, SMALL_HEAD)


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class BlockCache:
    def __init__(self, root: Path, limit: int, chunk: int) -> None:
        self.root = root
        self.limit = limit
        self.chunk = chunk
        self._rec = _aligned(_LEN.size + chunk + TAG_SIZE)
        self._base = _aligned(_LEN.size + HEADER_SIZE)  # chunk records follow the header's
        # a packed record: header and one chunk (of at least its tag); a pack is closed past
        # PACK_MAX, so it holds at most that and the record that went over it
        self._min_rec = _PREC.size + HEADER_SIZE + TAG_SIZE
        self._pack_max = PACK_MAX + _PREC.size + max(_PACK_HEADERS) + chunk + TAG_SIZE
        self._lock = threading.Lock()
        self.direct = True  # until the cache disk refuses O_DIRECT
        self.direct_writes = 0  # puts written around the page cache
        self._buffers: list[mmap.mmap] = []  # page-aligned, for direct writes
        self._zeros = memoryview(bytes(self._rec))
        self._files: OrderedDict[str, int] = OrderedDict()  # name -> bytes on disk, LRU first
        # packed versions: name -> (pack number, record offset, header length, chunk length)
        self._packed: dict[str, tuple[int, int, int, int]] = {}
        self._pack_members: dict[int, set[str]] = {}
        self._active: int | None = None  # the pack being appended to (none from a run before)
        self._active_size = 0
        self._next_pack = 1
        self.used = 0
        self.hits = 0  # chunks served from disk
        self.stores = 0  # chunks written to disk
        self.errors = 0
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(root, 0o700)
        found = []
        with os.scandir(root) as it:
            for e in it:
                if e.name.endswith((_SUFFIX, _HEADS)):
                    with contextlib.suppress(OSError):
                        st = e.stat()
                        found.append((st.st_mtime, e.name, st.st_blocks * 512))
                elif e.name.endswith(".blk"):  # the layout before aligned records
                    with contextlib.suppress(OSError):
                        os.unlink(e.path)
                elif e.name.endswith(_PIDX):
                    stem = e.name[: -len(_PIDX)]
                    if stem.isascii() and stem.isdigit() and str(int(stem)) == stem:
                        with contextlib.suppress(OSError):
                            found.append(self._load_pack(int(stem)))
                elif (
                    e.name.endswith(_PACK) and not (root / (e.name[: -len(_PACK)] + _PIDX)).exists()
                ):
                    with contextlib.suppress(OSError):
                        os.unlink(e.path)  # (its index is gone: nothing can find its records)
        for _mtime, name, size in sorted(found):
            self._files[name] = size
            self.used += size
        self._unlink(self._evict(None))

    def _load_pack(self, n: int) -> tuple[float, str, int]:
        """Index the records of pack ``n`` (a run before wrote it); returns its entry.

        The index is not trusted: it is read only as far as its pack could hold records
        (a pack never grows past ``PACK_MAX`` plus one record), and an entry whose lengths
        are not those of a header and one chunk, or whose record lies past the end of the
        pack (torn: never written whole), is left out, a miss."""
        pack, idx = self.root / f"{n}{_PACK}", self.root / f"{n}{_PIDX}"
        try:
            st = pack.stat()
            fd = os.open(idx, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            try:
                ist = os.fstat(fd)
                end = min(st.st_size, self._pack_max)
                raw = os.pread(fd, min(ist.st_size, end // self._min_rec * _PENT.size), 0)
            finally:
                os.close(fd)
        except OSError:
            with contextlib.suppress(OSError):
                idx.unlink()
            raise
        members = self._pack_members.setdefault(n, set())
        # entries the pack has no room for (beyond one a crash may have left torn)
        bad = ist.st_size - len(raw) >= 2 * _PENT.size
        for k in range(len(raw) // _PENT.size):
            fid, salt, off, hl, cl = _PENT.unpack_from(raw, k * _PENT.size)
            if hl not in _PACK_HEADERS or not TAG_SIZE <= cl <= self.chunk + TAG_SIZE:
                bad = True
            elif off + _PREC.size + hl + cl <= end:
                name = self._name(fid, salt)
                self._packed[name] = (n, off, hl, cl)
                members.add(name)
        if bad:
            log.warning("block cache: index %s holds entries no record can match: left out", idx)
        self._next_pack = max(self._next_pack, n + 1)
        return st.st_mtime, f"{n}{_PACK}", st.st_size + ist.st_size

    @staticmethod
    def _name(file_id: bytes, salt: bytes) -> str:
        return f"{file_id.hex()}-{salt.hex()}{_SUFFIX}"

    @classmethod
    def _heads_name(cls, file_id: bytes, salt: bytes) -> str:
        """The record file of a revision-3 version's trailer and heads (``put_heads``)."""
        return cls._name(file_id, salt)[: -len(_SUFFIX)] + _HEADS

    def _offset(self, index: int) -> int:
        return 0 if index < 0 else self._base + index * self._rec

    def has(self, file_id: bytes, salt: bytes) -> bool:
        """Is a version cached?  Without the lock (a dict lookup is atomic in CPython): the
        trio thread asks, and must not wait for a worker writing under the lock.  A stale
        answer is a miss or a hit that ``get`` turns into a miss."""
        name = self._name(file_id, salt)
        return name in self._files or name in self._packed

    def get(
        self, file_id: bytes, salt: bytes, first: int, last: int, *, header: bool = True
    ) -> tuple[bytes | None, dict[int, bytes]]:
        """The cached header (None if not cached or not asked for) and ciphertext chunks
        among [first, last]."""
        name = self._name(file_id, salt)
        with self._lock:
            packed = self._packed.get(name)
            if packed is not None:
                self._files.move_to_end(f"{packed[0]}{_PACK}")
            elif name not in self._files:
                return None, {}
            else:
                self._files.move_to_end(name)
        if packed is not None:
            return self._get_packed(file_id, salt, packed, first, last, header)
        try:
            fd = os.open(self.root / name, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self._forget(name)
            return None, {}
        out: dict[int, bytes] = {}
        try:
            # through the page cache, so that the kernel reads ahead: direct reads of a
            # sequential reader's records, one after another, took 4x as long here
            head = os.pread(fd, _LEN.size + HEADER_SIZE, 0) if header else b""
            raw = os.pread(fd, (last - first + 1) * self._rec, self._offset(first))
            self._parse(memoryview(raw), first, out)
        except OSError as e:
            self._failed(name, e)
            return None, {}
        finally:
            os.close(fd)
        cached = None
        if len(head) == _LEN.size + HEADER_SIZE and _LEN.unpack_from(head)[0] == HEADER_SIZE:
            cached = head[_LEN.size :]
        with self._lock:
            self.hits += len(out)
        return cached, out

    def _get_packed(
        self,
        file_id: bytes,
        salt: bytes,
        at: tuple[int, int, int, int],
        first: int,
        last: int,
        header: bool,
    ) -> tuple[bytes | None, dict[int, bytes]]:
        name = self._name(file_id, salt)
        n, off, hl, cl = at
        try:
            fd = os.open(self.root / f"{n}{_PACK}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                raw = os.pread(fd, _PREC.size + hl + cl, off)
            finally:
                os.close(fd)
        except OSError:  # (evicted meanwhile)
            self._forget_packed(name)
            return None, {}
        if len(raw) != _PREC.size + hl + cl or raw[: _PREC.size] != _PREC.pack(
            _PMAGIC, file_id, salt, hl, cl
        ):
            self._forget_packed(name)  # the index said more than the pack holds
            return None, {}
        with self._lock:
            self.hits += first <= 0 <= last
        body = raw[_PREC.size :]
        return (body[:hl] if header else None), ({0: body[hl:]} if first <= 0 <= last else {})

    def _forget_packed(self, name: str) -> None:
        with self._lock:
            at = self._packed.pop(name, None)
            if at is not None:
                self._pack_members.get(at[0], set()).discard(name)

    def _parse(self, view: memoryview, first: int, out: dict[int, bytes]) -> None:
        """The records read from ``first`` on, into ``out`` (holes and a short end skipped)."""
        for k in range(-(-len(view) // self._rec)):
            rec = view[k * self._rec : (k + 1) * self._rec]
            if len(rec) < _LEN.size:
                break
            n = _LEN.unpack_from(rec)[0]
            if 0 < n <= self._rec - _LEN.size and len(rec) >= _LEN.size + n:
                out[first + k] = bytes(rec[_LEN.size : _LEN.size + n])

    def put(
        self,
        file_id: bytes,
        salt: bytes,
        header: bytes | None,
        chunks: Mapping[int, bytes | memoryview],
        *,
        whole: bool = False,
    ) -> None:
        """Store a version's header and/or ciphertext chunks (what S3 returned for them).

        ``whole``: the header and ``chunks`` are the whole object, of one chunk: it goes
        into a pack."""
        if self.limit <= 0 or (header is None and not chunks):
            return
        if whole and header is not None and chunks.keys() == {0}:
            self._put_packed(file_id, salt, header, chunks[0])
            return
        name = self._name(file_id, salt)
        path = self.root / name
        want = len(chunks) * self._rec + (self._base if header is not None else 0)
        with self._lock:
            gone = self._evict(name, want)
            room = self.limit - self.used - (self._base if header is not None else 0)
        self._unlink(gone)
        if want > room:  # only this version is left: it stops growing
            fit = max(0, room // self._rec)
            chunks = {i: chunks[i] for i in sorted(chunks)[:fit]}
            if not chunks and header is None:
                return
        try:
            after, direct = self._write(path, header, chunks, want >= DIRECT_MIN)
        except OSError as e:
            self._failed(name, e)
            return
        with self._lock:
            before = self._files.get(name, 0)
            self._files[name] = after
            self._files.move_to_end(name)
            self.used += after - before
            self.stores += len(chunks)
            self.direct_writes += direct
            gone = self._evict(name, 0)
        self._unlink(gone)

    def _put_packed(
        self, file_id: bytes, salt: bytes, header: bytes, chunk: bytes | memoryview
    ) -> None:
        name = self._name(file_id, salt)
        rec = b"".join((_PREC.pack(_PMAGIC, file_id, salt, len(header), len(chunk)), header, chunk))
        want = len(rec) + _PENT.size
        gone: list[str] = []
        try:
            with self._lock:  # (a few KiB: written under the lock, so records never interleave)
                if name in self._packed or name in self._files or want > self.limit:
                    return
                if self._active is None or self._active_size + len(rec) > PACK_MAX:
                    self._active, self._active_size = self._next_pack, 0
                    self._next_pack += 1
                n, off = self._active, self._active_size
                key = f"{n}{_PACK}"
                gone = self._evict(key, want)
                try:  # the record first: an index entry never points at nothing (unless a
                    # crash loses the record's pages: then it does not match the entry, a miss)
                    self._write_at(key, rec, off)
                    self._write_at(f"{n}{_PIDX}", _PENT.pack(file_id, salt, off, len(header),
                                                             len(chunk)), None)  # fmt: skip
                except OSError as e:
                    self.errors += 1
                    self._active = None  # (what follows goes to a new pack)
                    log.warning("block cache: %s: %s (not cached)", key, e.strerror or e)
                    return
                self._active_size += len(rec)
                self._packed[name] = (n, off, len(header), len(chunk))
                self._pack_members.setdefault(n, set()).add(name)
                self._files[key] = self._files.get(key, 0) + want
                self._files.move_to_end(key)
                self.used += want
                self.stores += 1
        finally:
            self._unlink(gone)  # (evicted files: removed once the lock is free)

    def _write_at(self, name: str, data: bytes, at: int | None) -> None:
        """``data`` into file ``name`` (made if needed) at ``at``; None: at its end."""
        fd = os.open(self.root / name, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.pwrite(fd, data, os.fstat(fd).st_size if at is None else at) != len(data):
                raise OSError(errno.ENOSPC, "short write to the cache disk")
        finally:
            os.close(fd)

    def _write(
        self,
        path: Path,
        header: bytes | None,
        chunks: Mapping[int, bytes | memoryview],
        direct: bool,
    ) -> tuple[int, bool]:
        """Write the records; returns the bytes the file then takes on disk, and whether
        they went around the page cache."""
        fd, direct = self._open(path, os.O_RDWR | os.O_CREAT, direct)
        try:
            if direct:
                try:
                    self._write_direct(fd, header, chunks)
                    return os.fstat(fd).st_blocks * 512, True
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                    self._no_direct(e)
                os.close(fd)
                fd = -1  # (not closed again if the reopen fails)
                fd, _ = self._open(path, os.O_RDWR, False)
            self._write_buffered(fd, header, chunks)
            return os.fstat(fd).st_blocks * 512, False
        finally:
            if fd >= 0:
                os.close(fd)

    def _open(self, path: Path, flags: int, direct: bool) -> tuple[int, bool]:
        """``path`` opened, with ``O_DIRECT`` if ``direct`` and the disk takes it."""
        flags |= os.O_CLOEXEC
        if direct and self.direct:
            try:
                return os.open(path, flags | os.O_DIRECT, 0o600), True
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self._no_direct(e)
        return os.open(path, flags, 0o600), False

    def _no_direct(self, e: OSError) -> None:
        if self.direct:
            log.info("block cache: %s refuses O_DIRECT (%s): it goes through the page cache",
                     self.root, e.strerror or e)  # fmt: skip
        self.direct = False

    def _write_buffered(
        self, fd: int, header: bytes | None, chunks: Mapping[int, bytes | memoryview]
    ) -> None:
        if header is not None:
            os.pwrite(fd, _LEN.pack(len(header)) + header, 0)
        for i, data in _runs(chunks):
            iov: list[bytes | memoryview] = []
            # no copies: the kernel gathers the pieces, and zeros up to the next record's
            # boundary.  Only an object's final chunk can be short, and nothing follows it:
            # no padding (a small file takes a few KiB of the cache disk, not a whole record)
            for k, d in enumerate(data):
                iov += [_LEN.pack(len(d)), d]
                if k < len(data) - 1:
                    iov.append(self._zeros[: self._rec - _LEN.size - len(d)])
            for k in range(0, len(iov), 510):  # below IOV_MAX
                os.pwritev(fd, iov[k : k + 510], self._offset(i) + sum(map(len, iov[:k])))

    def _write_direct(
        self, fd: int, header: bytes | None, chunks: Mapping[int, bytes | memoryview]
    ) -> None:
        """Each record copied into a page-aligned buffer, zero-padded to the 4 KiB boundary
        where the next one starts, and written around the page cache, ~1 MiB at a time."""
        buf = self._take_buffer()
        try:
            # released before the buffer goes back to the pool: a full pool closes it, which
            # an export still alive would refuse (BufferError)
            with memoryview(buf) as view:
                if header is not None:
                    os.pwrite(fd, view[: self._pack(view, 0, header, self._base)], 0)
                for i, data in _runs(chunks):
                    at, fill = self._offset(i), 0
                    for k, d in enumerate(data):
                        # only an object's final chunk is short, and nothing follows it
                        room = self._rec if k < len(data) - 1 else _aligned(_LEN.size + len(d))
                        if fill + room > len(view):
                            os.pwrite(fd, view[:fill], at)
                            at, fill = at + fill, 0
                        fill += self._pack(view, fill, d, room)
                    os.pwrite(fd, view[:fill], at)
        finally:
            self._give_buffer(buf)

    def _pack(self, view: memoryview, at: int, data: bytes | memoryview, room: int) -> int:
        """``length ‖ data`` at ``at``, zero-padded to ``room`` bytes; returns ``room``."""
        n = len(data)
        _LEN.pack_into(view, at, n)
        view[at + _LEN.size : at + _LEN.size + n] = data
        view[at + _LEN.size + n : at + room] = self._zeros[: room - _LEN.size - n]
        return room

    def _take_buffer(self) -> mmap.mmap:
        with self._lock:
            if self._buffers:
                return self._buffers.pop()
        return mmap.mmap(-1, max(_DIRECT_SEGMENT, self._rec))

    def _give_buffer(self, buf: mmap.mmap) -> None:
        with self._lock:
            if len(self._buffers) < _POOLED:
                self._buffers.append(buf)
                return
        buf.close()

    def put_heads(self, file_id: bytes, salt: bytes, records: list[tuple[int, bytes]]) -> None:
        """Append a revision-3 version's trailer (``TRAILER``) or segment heads, as S3 holds
        them; they go with the LRU like any version."""
        if self.limit <= 0 or not records:
            return
        name = self._heads_name(file_id, salt)
        data = b"".join(_HREC.pack(j, len(b)) + b for j, b in records)
        with self._lock:
            gone = self._evict(name, len(data))
        self._unlink(gone)
        try:
            self._write_at(name, data, None)
        except OSError as e:
            self._failed(name, e)
            return
        with self._lock:
            self._files[name] = self._files.get(name, 0) + len(data)
            self._files.move_to_end(name)
            self.used += len(data)

    def get_heads(self, file_id: bytes, salt: bytes) -> list[tuple[int, bytes]]:
        """The records ``put_heads`` appended for a version (a torn end is left out)."""
        name = self._heads_name(file_id, salt)
        with self._lock:
            if name not in self._files:
                return []
            self._files.move_to_end(name)
        try:
            raw = (self.root / name).read_bytes()
        except OSError:
            self._forget(name)
            return []
        out, at = [], 0
        while at + _HREC.size <= len(raw):
            j, n = _HREC.unpack_from(raw, at)
            if at + _HREC.size + n > len(raw):
                break
            out.append((j, raw[at + _HREC.size : at + _HREC.size + n]))
            at += _HREC.size + n
        return out

    def drop(self, file_id: bytes, salt: bytes) -> None:
        """Forget a version (e.g. one of its chunks failed authentication).  A packed one
        is forgotten by this mount; its record goes with its pack (a remount may find it
        again, and authenticating it fails again)."""
        name = self._name(file_id, salt)
        if name in self._packed:
            self._forget_packed(name)
        else:
            self._remove(name)
        self._remove(self._heads_name(file_id, salt))

    def _evict(self, keep: str | None, want: int = 0) -> list[str]:
        """Forget least recently used versions (other than ``keep``) until ``want`` more
        bytes fit within the limit; returns the files to unlink (under the lock: the caller
        unlinks them, ``_unlink``, after releasing it)."""
        paths: list[str] = []
        while self.used + want > self.limit and self._files:
            victim = next(iter(self._files))
            if victim == keep:
                if len(self._files) == 1:
                    break
                self._files.move_to_end(victim)
                victim = next(iter(self._files))
            size = self._files.pop(victim)
            self.used -= size
            paths.append(victim)
            if victim.endswith(_PACK):
                n = int(victim[: -len(_PACK)])
                for name in self._pack_members.pop(n, ()):
                    self._packed.pop(name, None)
                if self._active == n:
                    self._active = None
                paths.append(f"{n}{_PIDX}")
        return paths

    def _unlink(self, paths: list[str]) -> None:
        for p in paths:
            with contextlib.suppress(OSError):
                (self.root / p).unlink()

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
