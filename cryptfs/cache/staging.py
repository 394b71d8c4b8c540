"""Encrypted staging of dirty files in the cache directory (docs/FORMAT.md §5).

A dirty file lives in ``<cache>/staging/<stage-id>.data`` until it is uploaded (a stage id is
random, one per staging: two nodes of one file id, a conflict copy and the version that won
its name, never share a staged file; stagings of earlier versions were named by the file id,
and are read the same way).  The data file is a sequence of fixed slots, one per plaintext
chunk: ``nonce(12) ‖ AES-GCM(chunk) ‖ tag(16)`` with a fresh random nonce on every write of a
slot and AAD = stage id ‖ slot index, under a key derived from the volume's cache key and a
per-staging random salt.  A slot whose nonce is all zero is a hole (reads as zeros).  A stolen
cache disk therefore reveals neither content nor names.  ``<stage-id>.journal`` holds, sealed
under the same key family, what is needed to finish the upload after a crash: path, file id,
attributes, size and the ETag the upload expects to replace.

Owns: the staging directory.  Synchronous local I/O only.
Must not import: store, fs, fuse.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptfs.crypto import GCM_NONCE, GCM_TAG, Aead, Secret, hkdf, random_bytes
from cryptfs.errors import IntegrityError, NoSpace
from cryptfs.format.keys import open_once, seal_once
from cryptfs.format.meta import Attrs
from cryptfs.format.names import b64d, b64e

_J2_LABEL = b"cryptfs/v2/journal\0"
_J2_INFO = b"cryptfs/v2/journal"

log = logging.getLogger(__name__)
_SLOT_OVERHEAD = GCM_NONCE + GCM_TAG
_ZERO_NONCE = bytes(GCM_NONCE)
# the journal: two slots, each ``magic ‖ uint32_be(n) ‖ n bytes of sealed record``; a record
# is written in place into the slot that does not hold the latest one (docs/FORMAT.md §5)
_JMAGIC = b"CFJ2"
# a record whose staged file holds only what was written (``fill``): a cryptfs from before
# such records skips them, and never uploads the chunks they do not hold as holes
_JMAGIC_FILL = b"CFJ3"
_JSLOT = 16 << 10
_POOL = 64  # empty files made ahead for new staged files and journals
_scratch = threading.local()  # per thread: the buffer whole chunks are sealed into
_RUN = 64  # whole chunks sealed into one buffer and written with one pwrite (4 MiB at 64 KiB)


def _io(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NoSpace("cache directory is full") from None
        raise


@dataclass(frozen=True)
class JournalRecord:
    """What a journal says of its staged file (docs/FORMAT.md §5): enough to finish the
    upload after a crash.  No data key: every upload makes a fresh one (§7.4), so nothing
    here outlives a rotation."""

    path: bytes  # where the file was, as of the record
    file_id: bytes
    attrs: Attrs
    etag: str | None  # the version the staged data was based on (None: a new file)
    # a staged file of only what was written: where the rest is (``fs.staged.Fill.record``)
    fill: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "path": b64e(self.path),
            "fid": b64e(self.file_id),
            "attrs": b64e(self.attrs.to_json()),
            "etag": self.etag,
        }
        if self.fill is not None:
            d["fill"] = self.fill
        return d

    @classmethod
    def from_dict(cls, rec: dict[str, Any]) -> JournalRecord:
        """IntegrityError if ``rec`` (authenticated: sealed under the cache key) is not one."""
        try:
            etag = rec.get("etag")
            fill = rec.get("fill")
            if fill is not None and not isinstance(fill, dict):
                raise TypeError("fill")
            return cls(
                b64d(rec["path"]),
                b64d(rec["fid"]),
                Attrs.from_json(b64d(rec["attrs"])),
                str(etag) if etag else None,
                fill,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise IntegrityError(f"journal record is malformed ({type(e).__name__})") from None


class StagedFile:
    """Random-access encrypted scratch file holding one dirty file's plaintext."""

    def __init__(
        self,
        area: StagingArea,
        stage_id: bytes,
        salt: bytes,
        size: int,
        *,
        new: bool = False,
        file_id: bytes | None = None,
    ) -> None:
        self.area = area
        self.stage_id = stage_id  # names its files, keys and binds its slots and journal
        self.file_id = file_id if file_id is not None else stage_id  # (of the node: logs)
        self.salt = salt
        self.size = size
        self.chunk = area.chunk
        self._slot = self.chunk + _SLOT_OVERHEAD
        self._aead = Aead(hkdf(area.key, stage_id + salt, b"cryptfs/v1/staging"))
        self.path = area.root / (stage_id.hex() + ".data")
        self.journal_path = area.root / (stage_id.hex() + ".journal")
        self._journal_left = not new  # may an earlier run have left a journal?
        self._jseq = 0  # sequence number of the last journal record this process wrote
        # slots are read by upload workers while the trio thread writes: each pread/pwrite of
        # a slot is atomic with respect to the others (never a torn, unauthenticatable slot)
        self._io_lock = threading.Lock()
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        self._fd: int = _io(os.open, self.path, flags, 0o600)
        # the version this staged copy was made from (or last uploaded), while its upload
        # may copy what is still that version's from S3 instead of sending it
        # (``fs.staged.Base``; in memory only: a staged file recovered after a crash goes up
        # whole), the units of ``unit`` bytes written since (tracked once ``unit`` is set),
        # and how far from 0 nothing was cut since (a truncate below the base's end, even
        # one extended again, leaves zeros where its bytes were)
        self.base: Any = None
        self.unit = 0
        self.touched: set[int] = set()
        self.kept = 0
        # a staged file of only what was written (a bucket with versioning on): the rest, up
        # to ``fill_limit``, is still the version ``fill`` names (``fs.staged.Fill``), read
        # from S3 into a slot when a read, a partial write or an upload needs it; a slot never
        # written below the limit is that version's, not a hole
        self.fill: Any = None
        self.fill_kept = 0

    def track(self, base: Any, unit: int, size: int) -> None:
        """From now on, the staged bytes are ``base``'s (``size`` of them) except the units of
        ``unit`` bytes written or cut later (``touched``, ``kept``)."""
        self.base, self.unit, self.touched, self.kept = base, unit, set(), size

    @property
    def closed(self) -> bool:
        """Removed (uploaded and done with) or closed: no slot can be read or written."""
        return self._fd < 0

    def _slot_written(self, i: int, nonce: bytearray) -> bool:
        """Was slot ``i`` ever written (not a hole: a zero nonce, or past the end)?  The
        caller holds the I/O lock; ``nonce`` is its scratch."""
        got = os.preadv(self._fd, [nonce], i * self._slot)
        return got == GCM_NONCE and nonce != _ZERO_NONCE

    def written(self, unit: int) -> set[int]:
        """Units of ``unit`` bytes with a slot written in them (a scan of every slot)."""
        per = unit // self.chunk
        s = self._slot
        out: set[int] = set()
        nonce = bytearray(GCM_NONCE)
        with self._io_lock:
            end = os.fstat(self._fd).st_size
            pos = 0
            while pos < end:
                try:  # (the holes of a sparse staged file are skipped whole)
                    pos = os.lseek(self._fd, pos, os.SEEK_DATA)
                except OSError:
                    break  # (no data past pos)
                i = pos // s
                if i // per not in out and self._slot_written(i, nonce):
                    out.add(i // per)
                pos = (i + 1) * s
        return out

    @property
    def fill_limit(self) -> int:
        """Bytes from 0 whose unwritten slots are ``fill``'s (0: none)."""
        return 0 if self.fill is None else min(self.fill_kept, self.fill.size)

    def to_fill(self, first: int, last: int) -> list[int]:
        """Chunks of [first, last] still ``fill``'s, not in a slot yet."""
        lim = self.fill_limit
        last = min(last, (lim - 1) // self.chunk)
        if last < first:
            return []
        nonce = bytearray(GCM_NONCE)
        with self._io_lock:
            return [i for i in range(first, last + 1) if not self._slot_written(i, nonce)]

    def _touch(self, offset: int, end: int) -> None:
        if self.unit and end > offset:
            self.touched.update(range(offset // self.unit, (end - 1) // self.unit + 1))

    def _aad(self, i: int) -> bytes:
        return self.stage_id + i.to_bytes(8, "big")

    def read_chunk(self, i: int) -> bytearray:
        """Plaintext of chunk ``i`` (full chunk size, zero-padded past EOF), a new buffer."""
        out = bytearray(self.chunk)
        self.read_run(i, 1, memoryview(bytearray(self._slot)), memoryview(out))
        return out

    def read_run(self, first: int, n: int, raw: memoryview, out: memoryview) -> None:
        """Plaintext of chunks ``first … first+n-1`` into ``out`` (``n`` chunks long), read
        with one preadv into ``raw`` (scratch of ``n`` slots) and opened in place: the upload
        of a part read, sliced and joined 128 separate 64 KiB copies."""
        c, s = self.chunk, self._slot
        with self._io_lock:
            got = os.preadv(self._fd, [raw[: n * s]], first * s)
        for k in range(n):
            o = k * s
            dst = out[k * c : (k + 1) * c]
            if got < o + s or raw[o : o + GCM_NONCE] == _ZERO_NONCE:
                dst[:] = bytes(c)  # never written: a hole
                continue
            try:
                self._aead.open_into(
                    bytes(raw[o : o + GCM_NONCE]),
                    raw[o + GCM_NONCE : o + s],
                    self._aad(first + k),
                    dst,
                )
            except IntegrityError:
                raise IntegrityError(
                    f"staged chunk {first + k} of {self.path.name} is corrupt"
                ) from None

    @property
    def slot(self) -> int:
        """Bytes one chunk takes in the staged file."""
        return self._slot

    def write_chunk(self, i: int, plaintext: bytes | bytearray | memoryview) -> None:
        assert len(plaintext) == self.chunk
        self._write_run(i, memoryview(plaintext))

    def _write_run(self, first: int, plaintext: memoryview) -> None:
        """Seal whole chunks ``first, first+1, …`` into one buffer, written with one pwrite:
        a 1 MiB write(2) was 16 seals, 16 concatenations and 16 pwrites of 64 KiB."""
        c, s = self.chunk, self._slot
        n = len(plaintext) // c
        assert n * c == len(plaintext)
        buf = getattr(_scratch, "buf", None)
        if buf is None or len(buf) < n * s:
            # one buffer per thread, reused: a fresh 1 MiB bytearray per write(2) was a fresh
            # allocation glibc had given back, so its page faults tripled the system time
            buf = _scratch.buf = bytearray(max(n, 16) * s)
        out = memoryview(buf)[: n * s]
        nonces = random_bytes(GCM_NONCE * n)
        for k in range(n):
            nonce = nonces[k * GCM_NONCE : (k + 1) * GCM_NONCE]
            while nonce == _ZERO_NONCE:  # pragma: no cover - 2^-96
                nonce = random_bytes(GCM_NONCE)
            o = k * s
            out[o : o + GCM_NONCE] = nonce
            self._aead.seal_into(
                nonce,
                plaintext[k * c : (k + 1) * c],
                self._aad(first + k),
                out[o + GCM_NONCE : o + s],
            )
        with self._io_lock:
            written = _io(os.pwrite, self._fd, out, first * s)
        if written != n * s:
            raise NoSpace("short write to the cache directory")

    def read(self, offset: int, length: int) -> bytes:
        end = min(self.size, offset + length)
        if offset >= end:
            return b""
        c = self.chunk
        first = offset // c
        n = (end - 1) // c - first + 1
        plain = bytearray(n * c)
        self.read_run(first, n, memoryview(bytearray(n * self._slot)), memoryview(plain))
        lo = offset - first * c
        return bytes(memoryview(plain)[lo : lo + end - offset])

    def write(self, offset: int, data: bytes | memoryview) -> None:
        c = self.chunk
        view = memoryview(data)
        end = offset + len(view)
        self._touch(offset, end)
        pos = offset
        while pos < end:
            i = pos // c
            lo = pos - i * c
            if lo == 0 and end - pos >= c:  # a run of whole chunks: sealed and written at once
                n = min((end - pos) // c, _RUN)
                self._write_run(i, view[pos - offset : pos - offset + n * c])
                pos += n * c
                continue
            hi = min(c, end - i * c)
            cur = self.read_chunk(i) if i * c < self.size else bytearray(c)
            cur[lo:hi] = view[pos - offset : pos - offset + (hi - lo)]
            self._write_run(i, memoryview(cur))
            pos = i * c + hi
        self.size = max(self.size, end)

    def truncate(self, size: int) -> None:
        c = self.chunk
        self.kept = min(self.kept, size)
        self.fill_kept = min(self.fill_kept, size)  # (the chunk it cuts was filled first)
        self._touch(size, size + 1)
        if size < self.size and size % c:
            i = size // c
            cur = self.read_chunk(i)
            cur[size - i * c :] = bytes(c - (size - i * c))
            self.write_chunk(i, cur)
        _io(os.ftruncate, self._fd, -(-size // c) * self._slot)
        self.size = size

    def fsync(self) -> None:
        _io(os.fsync, self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # -- journal --------------------------------------------------------------------------

    def save_journal(self, record: dict[str, Any], *, durable: bool = False) -> None:
        """Write the journal; a crash at any point leaves the previous record or this one.

        The first record of a staging creates the journal (a torn first write leaves no
        valid record: as if the file had never been closed, and nothing was promised yet),
        or atomically replaces one left by an earlier run.  Later records are written in
        place into the other slot, so no file is created or renamed per record (a rename
        over an existing file makes ext4 flush the new file's data first: that was most of
        the cost of rsync's rename + utimes + chmod per file).
        ``durable`` also fsyncs data, journal and directory (power-loss safe); without it the
        journal survives a crash of the process, which is what ``close`` promises.
        """
        seq = self._jseq + 1
        record = dict(record, size=self.size, salt=b64e(self.salt), seq=seq)
        blob = self.area.seal_journal(self.stage_id, record)
        if 8 + len(blob) > _JSLOT:  # paths are bounded by S3's 1024-byte keys: never here
            raise NoSpace("journal record too large")
        magic = _JMAGIC_FILL if "fill" in record else _JMAGIC
        slot = magic + len(blob).to_bytes(4, "big") + blob
        if durable:
            self.fsync()
        new = seq == 1
        if new:
            if self._journal_left and self.journal_path.exists():  # replaced atomically
                self._replace_journal(slot, durable)
                self._jseq = seq
                return
            self.area.claim(self.journal_path)
        fd = _io(os.open, self.journal_path, os.O_WRONLY)
        try:
            if _io(os.pwrite, fd, slot, ((seq - 1) % 2) * _JSLOT) != len(slot):
                raise NoSpace("short write to the cache directory")
            if durable:
                _io(os.fsync, fd)
        finally:
            os.close(fd)
        if durable and new:
            self.area.fsync_dir()
        self._jseq = seq

    def _replace_journal(self, slot: bytes, durable: bool) -> None:
        tmp = self.journal_path.with_suffix(".tmp")
        fd = _io(os.open, tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _io(os.write, fd, slot)
            if durable:
                _io(os.fsync, fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.journal_path)
        if durable:
            self.area.fsync_dir()

    def drop_journal(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.journal_path.unlink()
        self._jseq = 0

    def remove(self) -> None:
        """The staged file is done with (uploaded, or removed): its journal goes first (a
        crash afterwards finds nothing to recover), then its data.  Both become empty files
        of the pool rather than being deleted (``StagingArea.recycle``)."""
        self.area.recycle(self.journal_path, truncated=False)
        emptied = False
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)  # (only now: the journal no longer points here)
                emptied = True
        self.close()
        self.area.recycle(self.path, truncated=emptied)


CREATING = "creating:"  # a record in uploads.json of a multipart upload being created


class StagingArea:
    def __init__(self, root: Path, cache_key: Secret, chunk: int) -> None:
        self.root = root
        self.key = cache_key
        self.chunk = chunk
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(root, 0o700)
        self._journal_aead = Aead(hkdf(cache_key, b"", b"cryptfs/v1/journal"))
        self._disk_bytes, self._disk_bytes_at = 0, -1e9
        self._pool: list[str] = []  # names of empty files made ahead (``claim``)
        self._pool_lock = threading.Lock()
        self._refilling = False
        self._closed = False
        self._drop_pool()  # an earlier run's: never part of a staged file

    def _drop_pool(self) -> None:
        for p in self.root.glob("*.pool"):
            with contextlib.suppress(OSError):
                p.unlink()

    def close(self) -> None:
        """At unmount: the empty files made ahead are removed (no stray files are left in
        the cache directory) and no more are made."""
        with self._pool_lock:
            self._closed = True
            self._pool.clear()
        self._drop_pool()

    def claim(self, path: Path) -> None:
        """Give ``path`` a new empty file (replacing what is there) by renaming one made
        ahead: creating a file costs ~0.3 ms on the disks here, a rename 0.03 ms, and a
        small file's staging needs two (its data and its journal) on the trio thread.  The
        pool is refilled by a short-lived worker thread; when it is empty, ``path`` is
        created here."""
        with self._pool_lock:
            name = self._pool.pop() if self._pool else None
            refill = len(self._pool) < _POOL // 2 and not self._refilling and not self._closed
            self._refilling = self._refilling or refill
        if refill:
            threading.Thread(target=self._refill, name="cryptfs-staging-pool", daemon=True).start()
        if name is not None:
            try:
                os.rename(self.root / name, path)
                return
            except OSError:
                pass  # (removed meanwhile?) create it here
        fd = _io(os.open, path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        os.close(fd)

    def recycle(self, path: Path, *, truncated: bool) -> None:
        """Remove ``path`` from the staged files by renaming it into the pool, emptied: on
        the disks here a rename and a truncate cost ~0.03 ms, the file the pool would
        otherwise create later ~0.3 ms.  The rename is atomic, as an unlink would be: the
        name is gone whatever happens next; a pool file a crash leaves behind, emptied or
        not, is removed at the next start.  Deleted when the pool is full."""
        with self._pool_lock:
            full = len(self._pool) >= _POOL or self._closed
        try:
            if full:
                path.unlink()
                return
            name = random_bytes(8).hex() + ".pool"
            os.rename(path, self.root / name)
        except FileNotFoundError:
            return
        try:
            if not truncated:
                os.truncate(self.root / name, 0)
        except OSError:  # (an empty pool file is all a claim may get)
            with contextlib.suppress(OSError):
                (self.root / name).unlink()
            return
        with self._pool_lock:
            self._pool.append(name)

    def _refill(self) -> None:
        try:
            while True:
                with self._pool_lock:
                    if len(self._pool) >= _POOL or self._closed:
                        return
                name = random_bytes(8).hex() + ".pool"
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                os.close(os.open(self.root / name, flags, 0o600))
                with self._pool_lock:
                    closed = self._closed
                    if not closed:
                        self._pool.append(name)
                if closed:  # (closed while this one was being made)
                    (self.root / name).unlink()
                    return
        except OSError as e:  # a full or vanished cache disk: claim() creates files itself
            log.debug("staging: cannot make files ahead: %s", e)
        finally:
            with self._pool_lock:
                self._refilling = False

    def disk_bytes(self) -> int:
        """Space the staging files take on the cache disk (allocated blocks), at most 2 s
        old: it stats every staging file, and ``cryptfs umount`` asks for it while thousands
        of small files are being uploaded."""
        now = time.monotonic()
        if now - self._disk_bytes_at < 2.0:
            return self._disk_bytes
        total = 0
        with os.scandir(self.root) as it:
            for e in it:
                with contextlib.suppress(OSError):
                    total += e.stat(follow_symlinks=False).st_blocks * 512
        self._disk_bytes, self._disk_bytes_at = total, time.monotonic()
        return total

    def create(self, file_id: bytes) -> StagedFile:
        """A new, empty staged file for a node of ``file_id``, under a fresh stage id."""
        stage_id = random_bytes(16)
        self.claim(self.root / (stage_id.hex() + ".data"))  # new and empty
        return StagedFile(self, stage_id, random_bytes(16), 0, new=True, file_id=file_id)

    def seal_journal(self, stage_id: bytes, record: dict[str, Any]) -> bytes:
        """A record sealed under a key of its own (``seal_once``: a journal is written at
        every close and fsync, too often for random nonces under one key of the volume's
        lifetime; docs/FORMAT.md §5)."""
        data = json.dumps(record, sort_keys=True).encode()
        return seal_once(self.key, _J2_INFO, data, _J2_LABEL + stage_id)

    def _open_journal_record(self, blob: bytes, stage_id: bytes) -> bytes:
        try:
            return open_once(self.key, _J2_INFO, blob, _J2_LABEL + stage_id)
        except IntegrityError:  # an earlier version's record: a random nonce under one key
            return self._journal_aead.open_random(blob, b"cryptfs/v1/journal\0" + stage_id)

    def fsync_dir(self) -> None:
        fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- multipart uploads in flight (so that a crash's leftovers can be aborted) -------

    def _uploads_path(self) -> Path:
        return self.root / "uploads.json"

    def _read_uploads(self) -> dict[str, str]:
        try:
            data = json.loads(self._uploads_path().read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def _write_uploads(self, uploads: dict[str, str]) -> None:
        tmp = self._uploads_path().with_suffix(".tmp")
        fd = _io(os.open, tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _io(os.write, fd, json.dumps(uploads).encode())
            _io(os.fsync, fd)
        finally:
            os.close(fd)
        os.replace(tmp, self._uploads_path())

    def note_creating(self, key: str) -> str:
        """Remember (durably) that a multipart upload of ``key`` is about to be created; returns
        the record's name (``creating:…``).  Should the answer be lost, or the process end
        before it comes, the upload S3 made meanwhile is found by its key and aborted
        (``Uploader.sweep``)."""
        intent = CREATING + os.urandom(8).hex()
        self._write_uploads(self._read_uploads() | {intent: key})
        return intent

    def note_upload(self, upload_id: str, key: str, intent: str | None = None) -> None:
        """Remember a multipart upload before its first part (durably), in place of the
        record ``intent`` of its creation."""
        uploads = self._read_uploads()
        if intent is not None:
            uploads.pop(intent, None)
        self._write_uploads(uploads | {upload_id: key})

    def forget_upload(self, upload_id: str) -> None:
        uploads = self._read_uploads()
        if uploads.pop(upload_id, None) is not None:
            self._write_uploads(uploads)

    def leftover_uploads(self) -> dict[str, str]:
        """Multipart uploads (id -> object key) started and never ended, and creations of
        them whose answer never came (``creating:…`` -> object key)."""
        return self._read_uploads()

    def read_journal(self, path: Path) -> dict[str, Any]:
        """The latest record of a journal that authenticates (raises if none does).

        A journal of an earlier version is one sealed record, the whole file."""
        raw = path.read_bytes()
        stage_id = bytes.fromhex(path.stem)
        best: dict[str, Any] | None = None
        for off in (0, _JSLOT):
            rec = raw[off : off + _JSLOT]
            if rec[:4] not in (_JMAGIC, _JMAGIC_FILL):
                continue
            n = int.from_bytes(rec[4:8], "big")
            try:
                got = json.loads(self._open_journal_record(rec[8 : 8 + n], stage_id))
            except (ValueError, IntegrityError):
                continue  # a torn write: the other slot holds the record before it
            if best is None or int(got.get("seq", 0)) > int(best.get("seq", 0)):
                best = got
        if best is None:
            best = json.loads(self._open_journal_record(raw, stage_id))
        return best

    def journals(self) -> list[dict[str, Any]]:
        """The journals of staged files, read-only (for fsck); unreadable ones as {}."""
        out: list[dict[str, Any]] = []
        for jp in sorted(self.root.glob("*.journal")):
            try:
                out.append(self.read_journal(jp))
            except (ValueError, IntegrityError, OSError):
                out.append({})
        return out

    def recover(self) -> list[tuple[StagedFile, dict[str, Any]]]:
        """Staged files left by an earlier run, with their journals; strays are removed."""
        found = []
        for jp in sorted(self.root.glob("*.journal")):
            with contextlib.suppress(OSError):
                if jp.stat().st_size == 0:  # its first record never got written: no journal
                    jp.unlink()
                    continue
            try:
                stage_id = bytes.fromhex(jp.stem)  # (the file id, if staged by an earlier version)
                rec = self.read_journal(jp)
                fid = b64d(rec["fid"]) if "fid" in rec else stage_id
                sf = StagedFile(self, stage_id, b64d(rec["salt"]), int(rec["size"]), file_id=fid)
            except (ValueError, KeyError, IntegrityError, OSError) as e:
                log.error("staged file %s cannot be recovered (%s); kept for inspection", jp, e)
                continue
            found.append((sf, rec))
        known = {sf.path for sf, _ in found} | {sf.journal_path for sf, _ in found}
        for p in self.root.glob("*.data"):
            if p not in known and not p.with_suffix(".journal").exists():
                log.info("removing staged data %s that was never closed (no journal)", p.name)
                p.unlink()
        return found
