"""The read path: chunks of a file's object fetched, authenticated and cached.

Owns: ranged GETs pinned to the version a node holds (If-Match), opening the body header and
data key, the memory cache of plaintext chunks and the block cache of sealed ones (what goes
in, under which version), read-ahead of sequential streams and of the next small files of a
directory, fetching small files at open, and where AES-GCM runs (here or a worker thread).
Must not import: other parts of ``cryptfs.fs`` but ``model``, ``paths`` and
``namespace``.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import logging
from collections.abc import Callable, Iterable
from typing import TypeVar

import trio

from cryptfs.cache.blocks import TRAILER, BlockCache
from cryptfs.cache.chunks import ChunkCache
from cryptfs.crypto import Secret, constant_time_eq
from cryptfs.errors import IntegrityError, PreconditionFailed, UnsupportedFormat
from cryptfs.format import body3
from cryptfs.format.body import (
    HEADER_SIZE,
    BodyCipher,
    body_pin,
    chunk_count,
    chunks_for_range,
)
from cryptfs.format.body import chunk_span as chunk_span_v1
from cryptfs.format.body3 import Body3
from cryptfs.format.keys import SCHEME_KMS
from cryptfs.format.meta import KIND_FILE
from cryptfs.fs.model import Background, Handle, Node, Options
from cryptfs.fs.namespace import Namespace
from cryptfs.fs.paths import Paths
from cryptfs.tasks import open_tasks
from cryptfs.volume import Volume

log = logging.getLogger(__name__)
T = TypeVar("T")

_SEQ_SLACK = 1 << 20  # reads this close to where the last one ended count as sequential


def _unit_end(i: int, unit: int) -> int:
    """Last chunk of the fetch unit holding chunk ``i``: units are aligned to multiples of
    ``unit`` chunks, as the parts of a multipart upload are (``Options.part_size``)."""
    return (i // unit + 1) * unit - 1


def _still(node: Node, etag: str | None) -> None:
    """``node`` still holds version ``etag`` after an await.  Else another version was
    adopted meanwhile (a listing, our own upload): bytes fetched are the version asked for,
    not the one the node holds, whose header and data key must not judge them (that told a
    false integrity failure); the caller's read goes again, from the new version."""
    if node.remote_etag != etag:
        raise PreconditionFailed("another version of the file arrived during the read")


class Fetcher:
    def __init__(
        self,
        volume: Volume,
        options: Options,
        paths: Paths,
        tree: Namespace,
        cache: ChunkCache,
        blocks: BlockCache | None,
        background: Background,
    ) -> None:
        self.vol = volume
        self.store = volume.store
        self.opt = options
        self.chunk = volume.chunk
        self.paths = paths
        self.tree = tree
        self.cache = cache
        self.blocks = blocks  # encrypted chunks on local disk (None: not kept)
        self.background = background
        self.crypto_limit = trio.CapacityLimiter(2)
        self.prefetch_limit = trio.CapacityLimiter(self.opt.prefetch_concurrency)
        # block-cache writes behind the reads that fetched them: one thread, bounded backlog
        self.disk_limit = trio.CapacityLimiter(1)
        self.disk_backlog = 0  # bytes of downloads waiting to be written to the block cache

    def track(self, h: Handle, offset: int, end: int) -> None:
        """A read of [offset, end) through ``h``: sequential access grows its read-ahead
        window; a seek resets it.  The kernel has several reads of one stream in flight, so
        they may arrive slightly out of order."""
        if abs(offset - h.next_offset) <= _SEQ_SLACK:
            h.window = min(max(h.window * 2, 2 * self.chunk), self.opt.max_readahead)
            h.next_offset = max(h.next_offset, end)
        else:
            h.window = 0
            h.ra_next = 0
            h.next_offset = end

    async def dek(self, node: Node) -> Secret:
        """The node's data key, from the keyring's bounded, expiring cache."""
        if node.wrapped is None:
            raise IntegrityError("object has no data key")
        return await self.vol.keyring.unwrap(node.wrapped, node.file_id)

    def known_cipher(self, node: Node) -> BodyCipher | Body3 | None:
        """The body this mount opened of the version the node holds: the same ETag, and the
        generation and revision its metadata names (a copy in place of another version's
        metadata over this body keeps the ETag: S3's ETag is the body's)."""
        c = node.cipher
        if c is None or node.cipher_etag != node.remote_etag or c.gen != node.attrs.salt:
            return None
        if isinstance(c, Body3) != (node.attrs.body == 3):
            return None
        return c

    async def cipher(
        self, node: Node, header: bytes | memoryview | None = None
    ) -> BodyCipher | Body3:
        """The node's body as its version's header (revision 1) or trailer (revision 3, its
        manifest) says; ``header``: those bytes, when a GET brought them along (a revision-3
        trailer: any bytes ending the object)."""
        known = self.known_cipher(node)
        if known is not None:
            return known
        key, _ = self.paths.object_key(node)
        etag = node.remote_etag
        three = node.attrs.body == 3
        if header is None:
            if three:
                lo, ln = body3.trailer_span(node.attrs.size, self.vol.segment_bytes(), self.chunk)
            else:
                lo, ln = 0, HEADER_SIZE
            _info, header = await self.store.get(key, lo, lo + ln, if_match=etag)
        _still(node, etag)  # (another version adopted during the GET: as fetch_run)
        dek = await self.dek(node)
        _still(node, etag)  # (... or during the unwrap, a KMS round trip)
        cipher: BodyCipher | Body3
        try:
            if three:
                cipher = self.open3(node, dek, header)
            else:
                cipher = BodyCipher.open(dek, bytes(header))
                if cipher.header.file_id != node.file_id or cipher.gen != node.attrs.salt:
                    raise IntegrityError("body header does not belong to this file's metadata")
                if cipher.header.chunk_log2 != self.vol.chunk_log2:
                    raise IntegrityError("body chunk size differs from the volume's")
        except (IntegrityError, UnsupportedFormat) as e:
            self.tree.integrity(key, e, node)
            raise
        known = self.install(node, cipher, etag)
        if known is not cipher:
            return known
        if isinstance(cipher, Body3) and self.unpacked(node):
            t = body3.trailer_span(node.attrs.size, cipher.seg, self.chunk)[1]
            self.keep_heads(node, cipher.gen, [(TRAILER, bytes(header[len(header) - t :]))])
        return cipher

    async def cached_body(self, node: Node, trailers: list[bytes]) -> Body3 | None:
        """A revision-3 version opened from the trailer the block cache kept (checked as
        one from S3; one that does not open is the cache's fault, not the bucket's: S3's
        is read instead, nothing reported)."""
        if not trailers:
            return None
        etag = node.remote_etag
        dek = await self.dek(node)
        _still(node, etag)
        try:
            body = self.open3(node, dek, trailers[-1])
        except IntegrityError as e:
            log.warning("block cache: %s: %s; reading it from S3", self.paths.ident(node), e)
            return None
        known = self.install(node, body, etag)
        return known if isinstance(known, Body3) else None

    def open3(self, node: Node, dek: Secret, tail: bytes | memoryview) -> Body3:
        """The revision-3 body of the version ``node`` holds, from bytes ending with its
        trailer (S3's, or the block cache's)."""
        a, seg = node.attrs, self.vol.segment_bytes()
        body = Body3.open(dek, self.vol.volume_id, node.file_id, a.salt, a.size, seg, self.chunk,
                          tail)  # fmt: skip
        if a.pin and not constant_time_eq(body3.trailer_pin(tail, a.size, seg, self.chunk), a.pin):
            # the data key and generation the metadata names, other bytes: sealed by whoever
            # held that data key before the rotation that pinned this body
            raise IntegrityError("the body is not the one its metadata pins")
        return body

    def install(
        self, node: Node, cipher: BodyCipher | Body3, etag: str | None
    ) -> BodyCipher | Body3:
        """``cipher`` (opened for version ``etag``) becomes the node's, unless another read
        opened this version during the caller's awaits: that one stays (its segment heads
        are filled in by the reads that hold it), and is returned."""
        known = self.known_cipher(node)
        if known is not None:
            return known
        node.cipher, node.cipher_etag = cipher, etag
        return cipher

    def unpacked(self, node: Node) -> bool:
        """Is a revision-3 body's trailer kept beside its chunks, not packed with its one
        chunk and head (a small body of one chunk, fetched whole)?"""
        size = node.attrs.size
        return size > self.opt.small_file_bytes or chunk_count(size, self.chunk) > 1

    def keep_heads(self, node: Node, gen: bytes, records: list[tuple[int, bytes]]) -> None:
        """A revision-3 version's trailer and segment heads, read from S3 and checked, kept
        with its chunks in the block cache (behind the read): a remount reads its chunks
        from disk without a GET of each segment's head."""
        blocks, nursery = self.blocks, self.background.nursery
        if blocks is None or not records:
            return
        put = functools.partial(blocks.put_heads, node.file_id, gen, records)
        if nursery is None:
            put()
            return

        async def write() -> None:
            try:
                await trio.to_thread.run_sync(put, limiter=self.disk_limit)
            except Exception as e:  # (best effort, as every block-cache write)
                log.warning("block cache write failed: %s", e)

        nursery.start_soon(write)

    async def heads(self, node: Node, body: Body3, segments: Iterable[int]) -> None:
        """Read and check the header and hash table of each of ``segments`` not known yet
        (one ranged GET each, concurrently)."""
        key, _ = self.paths.object_key(node)
        etag = node.remote_etag

        async def one(j: int) -> None:
            lo, ln = body.head_span(j)
            _info, data = await self.store.get(key, lo, lo + ln, if_match=etag)
            _still(node, etag)
            try:
                body.add_head(j, data)
            except IntegrityError as e:
                self.tree.integrity(key, e, node)
                raise
            self.keep_heads(node, body.gen, [(j, data)])

        todo = [j for j in segments if j not in body.readers]
        if len(todo) == 1:
            await one(todo[0])
        elif todo:
            async with open_tasks() as nursery:
                for j in todo:
                    nursery.start_soon(one, j)

    async def read_remote(
        self, node: Node, offset: int, length: int, h: Handle | None = None
    ) -> bytes:
        if length <= 0:
            return b""
        size = node.attrs.size
        c = self.chunk
        need = chunks_for_range(offset, length, c)
        got: dict[int, bytes] = {}
        version = (node.remote_etag, node.attrs.salt)
        missing = self.from_memory(node, need, got, count=True)
        if missing and node.inflight:
            # read-ahead is already fetching them: wait for it rather than fetch twice
            for i in missing:
                ev = node.inflight.get(i)
                if ev is not None:
                    await ev.wait()
            missing = self.from_memory(node, missing, got, count=False)
        if h is not None and h.window:
            last = chunk_count(size, c) - 1
            self.read_ahead(node, h, need.stop, min(last, (offset + h.window - 1) // c))
        if missing:
            await self.fetch_chunks(node, missing[0], missing[-1], got)
        if (node.remote_etag, node.attrs.salt) != version:
            # another version adopted while this read waited: what it has may be of both
            # (chunks from memory before, fetched after); the caller reads again, whole
            raise PreconditionFailed("another version of the file arrived during the read")
        if h is not None and h.window:
            # a sequential reader does not come back for what it has read (the kernel keeps
            # those pages while the object is unchanged): the memory cache keeps only what
            # is still ahead of it, so a long read holds its read-ahead window, not the LRU
            end = offset + length
            fid, salt = node.file_id, node.attrs.salt
            for i in need:
                if min((i + 1) * c, size) <= end:
                    self.cache.discard((fid, salt, i))
        if len(need) == 1:
            lo = offset - need.start * c
            return got[need.start][lo : lo + length]
        out = b"".join(got[i] for i in need)
        lo = offset - need.start * c
        return out[lo : lo + length]

    def from_memory(
        self, node: Node, indexes: Iterable[int], got: dict[int, bytes], *, count: bool
    ) -> list[int]:
        """Chunks of ``indexes`` in the memory cache go to ``got``; returns the others
        (``count``: as hits and misses in the statistics)."""
        lookup = self.cache.get if count else self.cache.peek
        missing = []
        for i in indexes:
            v = lookup((node.file_id, node.attrs.salt, i))
            if v is None:
                missing.append(i)
            else:
                got[i] = v
        return missing

    def read_ahead(self, node: Node, h: Handle, first: int, last: int) -> None:
        """Fetch chunks [first, last] in the background, one aligned ``fetch_unit`` per GET
        (``_unit_end``), so that the next reads of a sequential stream find them cached (or
        in flight).  A unit that reaches past ``last`` waits for the window to cover it."""
        nursery = self.background.nursery
        if nursery is None:
            return
        unit = max(1, self.opt.fetch_unit // self.chunk)
        final = chunk_count(node.attrs.size, self.chunk) - 1
        key = (node.file_id, node.attrs.salt)
        i = max(first, h.ra_next)
        while i <= last:
            j = min(final, _unit_end(i, unit))
            if j > last:
                break  # wait until the whole unit is inside the window
            if all(self.cache.peek((*key, k)) is not None or k in node.inflight
                   for k in range(i, j + 1)):  # fmt: skip
                i = j + 1
                continue
            ev = trio.Event()
            for k in range(i, j + 1):
                node.inflight.setdefault(k, ev)
            nursery.start_soon(self.prefetch, node, i, j, node.remote_etag, ev)
            i = j + 1
        h.ra_next = max(h.ra_next, i)

    async def prefetch(
        self, node: Node, first: int, last: int, etag: str | None, ev: trio.Event
    ) -> None:
        try:
            async with self.prefetch_limit:
                if node.remote_etag == etag and not node.unlinked and node.stage is None:
                    await self.fetch_chunks(node, first, last, {})
        except Exception as e:  # the reader fetches again and reports it
            log.debug("read-ahead of %s failed: %s", self.paths.ident(node), self.paths.scrub(e))
        finally:
            for k in range(first, last + 1):
                if node.inflight.get(k) is ev:
                    del node.inflight[k]
            ev.set()

    async def fetch_chunks(self, node: Node, first: int, last: int, got: dict[int, bytes]) -> None:
        """Fetch, authenticate and cache chunks [first, last].

        A long run is split at multiples of ``fetch_unit`` (the parts of a multipart upload)
        into pieces fetched concurrently (S3 serves parallel ranged GETs faster than one long
        one).  When the body's header is not known yet, the first piece (from chunk 0) brings
        it along.
        """
        unit = max(1, self.opt.fetch_unit // self.chunk)
        todo = list(range(first, last + 1))
        pinned1 = bool(node.attrs.pin) and node.attrs.body != 3  # (checked whole, from S3)
        if (
            self.blocks is not None
            and not pinned1
            and self.blocks.has(node.file_id, node.attrs.salt)
        ):
            todo = await self.from_disk(node, first, last, got)
        runs: list[tuple[int, int]] = []
        for i in todo:  # consecutive missing chunks, within one aligned unit per GET
            if runs and runs[-1][1] == i - 1 and i % unit:
                runs[-1] = (runs[-1][0], i)
            else:
                runs.append((i, i))
        if not runs:
            return
        if self.known_cipher(node) is None:
            await self.fetch_run(node, *runs.pop(0), got)
        if len(runs) == 1:
            await self.fetch_run(node, *runs[0], got)
        elif runs:
            async with open_tasks() as nursery:
                for f, la in runs:
                    nursery.start_soon(self.fetch_run, node, f, la, got)

    async def fetch_run(self, node: Node, first: int, last: int, got: dict[int, bytes]) -> None:
        """One ranged GET for chunks [first, last] (a revision-3 body: with the heads of the
        segments it crosses, and its trailer first if not known yet)."""
        size = node.attrs.size
        c = self.chunk
        n = chunk_count(size, c)
        key, _ = self.paths.object_key(node)
        etag = node.remote_etag
        cipher = self.known_cipher(node)
        header: bytes | None = None
        three = node.attrs.body == 3
        pinned = bool(node.attrs.pin) and not three
        if pinned:  # (a pinned §2 body is fetched whole and checked before any of it is used)
            first, last = 0, max(0, n - 1)
        whole_length = self.vol.body_length(node.attrs)  # (the object's)
        if three:
            length = whole_length
            if cipher is None and length <= self.opt.small_file_bytes:
                # a small object, whole: its trailer and segment heads ride along
                data = await self.get_unwrapping(node, key, length, etag)
                _still(node, etag)
                cipher = await self.cipher(node, data)
                start = 0
            else:
                cipher = cipher or await self.cipher(node)
                start = cipher.span(first, size)[0]
                assert isinstance(cipher, Body3)
                if first % cipher.per == 0 and first // cipher.per not in cipher.readers:
                    start = cipher.head_span(first // cipher.per)[0]  # (right before it)
                else:
                    await self.heads(node, cipher, [first // cipher.per])
                lo, ln = cipher.span(last, size)
                _info, data = await self.store.get(key, start, lo + ln, if_match=etag)
                length = lo + ln
        else:
            start, _ = chunk_span_v1(first, size, c)
            lo, ln = chunk_span_v1(last, size, c)
            length = lo + ln
            if (cipher is None or pinned) and first == 0:
                data = await self.get_unwrapping(node, key, length, etag)
                if pinned and not constant_time_eq(body_pin(data), node.attrs.pin):
                    self.tree.integrity(key, "the body is not the one its metadata pins", node)
                    raise IntegrityError(
                        "the body is not the one its metadata pins", object_keys=(key,)
                    )
                header, data = data[:HEADER_SIZE], data[HEADER_SIZE:]
                start = HEADER_SIZE
            else:
                _info, data = await self.store.get(key, start, length, if_match=etag)
        _still(node, etag)
        if cipher is None:  # (revision 1: its header came with the data, or a GET of its own)
            cipher = await self.cipher(node, header)
        if len(data) != length - start:
            self.tree.integrity(key, "short read", node)
            raise IntegrityError(
                f"{key}: object shorter than its metadata says", object_keys=(key,)
            )
        view = memoryview(data)
        if isinstance(cipher, Body3):
            body = cipher
            kept: list[tuple[int, bytes]] = []
            try:
                for j in body.heads_missing(first, last):
                    h_lo, h_ln = body.head_span(j)
                    if h_lo >= start:  # (inside the range: it came with the data)
                        head = bytes(view[h_lo - start : h_lo - start + h_ln])
                        body.add_head(j, head)
                        kept.append((j, head))
            except IntegrityError as e:
                self.tree.integrity(key, e, node)
                raise
            if self.unpacked(node):
                self.keep_heads(node, body.gen, kept)
            await self.heads(node, body, body.heads_missing(first, last))  # (none, or the first)

        sealed: dict[int, memoryview] = {}

        def open_all() -> list[bytes]:
            out = []
            for i in range(first, last + 1):
                off, ln_i = cipher.span(i, size)
                sealed[i] = view[off - start : off - start + ln_i]
                out.append(cipher.open_at(i, n, sealed[i]))
            return out

        try:
            plain = await self.crypto(open_all, len(data))
        except IntegrityError as e:
            self.tree.integrity(key, e, node)
            raise
        # cached under the generation these bytes authenticated as (the node may hold another
        # by now: an adopt or our own upload may have landed during the awaits above)
        salt = cipher.gen
        if self.blocks is not None and not pinned:  # authenticated: worth keeping on disk
            whole = n == 1  # a small object, whole: into a pack, with its header
            if whole and isinstance(cipher, BodyCipher):
                header = header or cipher.header_bytes
            elif whole:  # (revision 3: the segment's head and the trailer, from the object)
                whole = start == 0 and len(data) == whole_length
                header = body3.small_head(view) if whole else None
            await self.keep_on_disk(node.file_id, salt, header, sealed, len(data), whole=whole)
        for i, pt in zip(range(first, last + 1), plain, strict=True):
            self.cache.put((node.file_id, salt, i), pt)
            got[i] = pt

    async def version_chunks(
        self, key: str, version_id: str | None, etag: str, body: Body3, chunks: list[int]
    ) -> dict[int, bytes]:
        """Chunks of one version of a revision-3 body (``body``: its manifest, opened), by
        its S3 version id (which no later write changes) or If-Match ``etag``: one ranged GET
        per segment they are in, with the segment's head if not checked yet; each chunk
        checked and opened (an integrity failure is logged and raised)."""
        size = body.size
        by_seg: dict[int, list[int]] = {}
        for i in chunks:
            by_seg.setdefault(i // body.per, []).append(i)
        out: dict[int, bytes] = {}

        async def get(lo: int, end: int) -> memoryview:
            _info, data = await self.store.get(key, lo, end, if_match=etag, version_id=version_id)
            if len(data) != end - lo:
                raise IntegrityError("object shorter than its manifest says", object_keys=(key,))
            return memoryview(data)

        async def one(j: int, todo: list[int]) -> None:
            lo = body.span(todo[0], size)[0]
            end = sum(body.span(todo[-1], size))
            h_lo, h_ln = body.head_span(j)
            along = j not in body.readers and lo - (h_lo + h_ln) <= self.chunk  # (one GET)
            try:
                if j not in body.readers and not along:
                    body.add_head(j, await get(h_lo, h_lo + h_ln))
                if along:
                    lo = h_lo
                view = await get(lo, end)
                if along:
                    body.add_head(j, view[:h_ln])

                def open_all() -> None:
                    for i in todo:
                        off, ln = body.span(i, size)
                        out[i] = body.open_at(i, 0, view[off - lo : off - lo + ln])

                await self.crypto(open_all, len(view))
            except IntegrityError as e:
                self.tree.integrity(key, e, None)
                raise

        async with open_tasks() as nursery:
            for j, todo in by_seg.items():
                nursery.start_soon(one, j, sorted(todo))
        return out

    async def get_unwrapping(self, node: Node, key: str, end: int, etag: str | None) -> bytes:
        """GET ``[0, end)`` of ``key`` while the data key is unwrapped at the same time (it
        is cached by the keyring for ``cipher``) when that is a KMS round trip of its own.
        (A local unwrap is a few microseconds of CPU: not worth two tasks.)"""
        got: list[bytes] = []

        async def get() -> None:
            got.append((await self.store.get(key, 0, end, if_match=etag))[1])

        wk = node.wrapped
        if (
            wk is None
            or wk.scheme != SCHEME_KMS
            or self.vol.keyring.cache.get(node.file_id, wk.blob) is not None
        ):
            await get()
        else:
            async with open_tasks() as n:
                n.start_soon(get)
                await self.dek(node)
        return got[0]

    def fetch_at_open(self, node: Node) -> None:
        """A file opened for reading, with nothing of it cached: a small file (up to
        ``small_file_bytes``) is fetched whole now, not when the first read arrives, so that
        the GET overlaps the kernel's turn from open to read.  The read finds the chunks in
        flight (``node.inflight``) and waits for them."""
        nursery = self.background.nursery
        size = node.attrs.size
        if nursery is None or size <= 0 or size > self.opt.small_file_bytes or node.inflight:
            return  # (a larger file: a random reader would not want its first 4 MiB)
        if node.stage is not None or node.foreign is not None or node.remote_etag is None:
            return
        key = (node.file_id, node.attrs.salt)
        if self.cache.peek((*key, 0)) is not None:
            return
        if self.blocks is not None and self.blocks.has(*key):
            return
        last = chunk_count(size, self.chunk) - 1
        ev = trio.Event()
        for k in range(last + 1):
            node.inflight[k] = ev
        nursery.start_soon(self.prefetch, node, 0, last, node.remote_etag, ev)

    async def keep_on_disk(
        self,
        fid: bytes,
        salt: bytes,
        header: bytes | None,
        sealed: dict[int, memoryview],
        nbytes: int,
        *,
        whole: bool = False,
    ) -> None:
        """Write downloaded (authenticated) chunks to the block cache behind the read (a
        cache file, when it has to be made, costs up to a few tenths of a ms here).  While
        more than ``disk_backlog`` bytes wait, the reader writes its own chunks (memory
        stays bounded when the cache disk is slow).  ``whole``: the object of one chunk,
        with its header (``BlockCache`` packs it with other small ones)."""
        blocks = self.blocks
        assert blocks is not None
        put = functools.partial(blocks.put, fid, salt, header, sealed, whole=whole)
        nursery = self.background.nursery
        if nursery is None or self.disk_backlog + nbytes > self.opt.disk_backlog:
            await trio.to_thread.run_sync(put)
            return

        async def write() -> None:
            try:
                await trio.to_thread.run_sync(put, limiter=self.disk_limit)
            except Exception as e:  # the cache is best effort: never stop the service for it
                log.warning("block cache write failed: %s", e)
            finally:
                self.disk_backlog -= nbytes

        self.disk_backlog += nbytes
        nursery.start_soon(write)

    async def crypto(self, fn: Callable[[], T], nbytes: int) -> T:
        """Run ``fn`` (AES-GCM over ``nbytes``) here if small, else in a worker thread:
        AES-GCM releases the GIL, and the trio thread stays free for FUSE requests."""
        if nbytes >= self.opt.offload_bytes:
            return await trio.to_thread.run_sync(fn, limiter=self.crypto_limit)
        return fn()

    async def from_disk(
        self, node: Node, first: int, last: int, got: dict[int, bytes]
    ) -> list[int]:
        """Chunks [first, last] found in the block cache go to ``got`` (authenticated like
        any download); returns the indexes still to fetch.  A cached chunk that fails
        authentication drops the cached version: S3 is asked again, nothing is reported."""
        blocks = self.blocks
        assert blocks is not None
        fid, salt, etag = node.file_id, node.attrs.salt, node.remote_etag
        known = self.known_cipher(node)
        three = node.attrs.body == 3
        # (the kept trailer and heads are read only while some this run needs are unknown)
        want = three and (not isinstance(known, Body3) or bool(known.heads_missing(first, last)))

        def load() -> tuple[bytes | None, dict[int, bytes], list[tuple[int, bytes]]]:
            header, sealed = blocks.get(fid, salt, first, last, header=known is None)
            heads = blocks.get_heads(fid, salt) if want and sealed else []
            return header, sealed, heads

        header, sealed, heads = await trio.to_thread.run_sync(load)
        if not sealed or node.remote_etag != etag or node.attrs.salt != salt:
            # (another version adopted during the load: these chunks are not the one the
            # node holds, whose header must not judge them; S3 is asked for that one)
            return list(range(first, last + 1))
        if known is None and three:  # (a trailer kept on disk, else the pack's, else S3's)
            known = await self.cached_body(node, [b for j, b in heads if j == TRAILER])
        try:
            cipher = known or await self.cipher(node, header)
        except IntegrityError:
            await trio.to_thread.run_sync(blocks.drop, fid, salt)  # (its lock, its I/O)
            return list(range(first, last + 1))
        if isinstance(cipher, Body3):
            if header is not None and 0 not in cipher.readers:  # (a packed small object)
                heads.append((0, header[: cipher.head_span(0)[1]]))
            for j, b in heads:
                if j != TRAILER and j < len(cipher.manifest.entries) and j not in cipher.readers:
                    with contextlib.suppress(IntegrityError):  # (else S3's, as below)
                        cipher.add_head(j, b)
            await self.heads(node, cipher, sorted({i // cipher.per for i in sealed}))
        size = node.attrs.size
        n = chunk_count(size, self.chunk)

        def open_all() -> dict[int, bytes]:
            return {i: cipher.open_at(i, n, ct) for i, ct in sealed.items()}

        try:
            plain = await self.crypto(open_all, len(sealed) * self.chunk)
        except IntegrityError as e:
            log.warning(
                "block cache: %s: %s; fetching it again",
                self.paths.ident(node),
                self.paths.scrub(e),
            )
            await trio.to_thread.run_sync(blocks.drop, fid, salt)
            return list(range(first, last + 1))
        for i, pt in plain.items():
            self.cache.put((fid, salt, i), pt)
            got[i] = pt
        return [i for i in range(first, last + 1) if i not in plain]

    def siblings_ahead(self, node: Node) -> None:
        """A reader that opens the small files of a directory one after another in name
        order (``cat *``, ``cp -r``, ``tar``: readdir answers in that order) finds the next
        ones fetched (or being fetched) when it opens them: one GET per file stays, its wait
        goes.  From the second open in a row, the next ``sibling_readahead`` files of up to
        ``small_file_bytes`` are fetched as at open; a wrong guess costs their GETs, no more.
        """
        d = node.parent
        n_ahead = self.opt.sibling_readahead
        if (
            d is None
            or d.children is None
            or n_ahead <= 0
            or node.attrs.size > self.opt.small_file_bytes
        ):
            return
        last, d.read_last = d.read_last, node.name
        if last is None or last >= node.name:  # not the second of a run in name order
            return
        children = d.children
        memo = d.sorted_names
        if memo is None or memo[0] != id(children) or memo[1] != len(children):
            memo = d.sorted_names = (id(children), len(children), sorted(children))
        names = memo[2]
        i = bisect.bisect_right(names, node.name)
        for name in names[i : i + n_ahead]:
            sib = children.get(name)
            if (
                sib is not None
                and sib.kind == KIND_FILE
                and sib.open_count == 0
                and sib.kernel_etag != sib.remote_etag  # else the kernel may have its pages
            ):
                self.fetch_at_open(sib)
