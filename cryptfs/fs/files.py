"""Open files: handles, and what reads, writes, truncates and closes do to a node.

Owns: file handles (one per open; a node counts its handles and writers), open (O_TRUNC is
the open's own: libfuse's atomic_o_trunc; whether the kernel may keep its cached pages),
reads (the staged copy of a dirty file, else the read path, again from the newer version
when another writer replaced the object meanwhile), writes (O_APPEND at the end as this mount
knows it), setattr (size, mode, owner, times), and when a change is journaled and its upload
scheduled (at close, when the last writer is gone; ``fsync`` now).
Must not import: other parts of ``cryptfs.fs`` but ``model``, ``namespace``,
``lookup``, ``foreign``, ``fetch``, ``staged`` and ``writeback``.
"""

from __future__ import annotations

import os
from typing import Any

from cryptfs.cache.staging import StagingArea
from cryptfs.errors import Invalid, IsDir, PreconditionFailed
from cryptfs.format.meta import KIND_FILE, KIND_LINK
from cryptfs.fs.fetch import Fetcher
from cryptfs.fs.foreign import Foreign
from cryptfs.fs.lookup import Lookup
from cryptfs.fs.model import Handle, Node, Options, Stat, now_ns
from cryptfs.fs.namespace import Namespace
from cryptfs.fs.staged import Staged
from cryptfs.fs.writeback import Writeback
from cryptfs.volume import Volume


class Files:
    def __init__(
        self,
        volume: Volume,
        options: Options,
        staging: StagingArea,
        tree: Namespace,
        look: Lookup,
        foreign: Foreign,
        fetch: Fetcher,
        staged: Staged,
        writeback: Writeback,
    ) -> None:
        self.opt = options
        self.chunk = volume.chunk
        self.staging = staging
        self.tree = tree
        self.look = look
        self.foreign = foreign
        self.fetch = fetch
        self.staged = staged
        self.writeback = writeback
        self.next_fh = 1
        self.handles: dict[int, Handle] = {}

    def open_handle(self, node: Node, writable: bool) -> Handle:
        h = Handle(self.next_fh, node, writable)
        self.next_fh += 1
        self.handles[h.fh] = h
        node.open_count += 1
        if writable:
            node.writers += 1
            self.writeback.due.pop(node, None)
        return h

    def handle(self, fh: int) -> Handle:
        try:
            return self.handles[fh]
        except KeyError:
            raise Invalid(f"bad file handle {fh}") from None

    async def open(self, ino: int, flags: int) -> Handle:
        node = self.tree.node(ino)
        if node.is_dir:
            raise IsDir("is a directory")
        await self.look.refresh(node)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        if writable or flags & os.O_TRUNC:
            self.tree.writable(node)
        h = self.open_handle(node, writable)
        h.append = writable and bool(flags & os.O_APPEND)
        if flags & os.O_TRUNC and node.kind == KIND_FILE and (node.attrs.size or node.stage):
            # libfuse enables atomic_o_trunc: the kernel sends O_TRUNC with the open and no
            # truncate of its own, so the open truncates (``printf x > f`` over a longer f
            # kept the old bytes after x, and its size)
            try:
                await self.setattr(node.ino, size=0)
            except BaseException:
                await self.release(h.fh)
                raise
        # pages cached by the kernel stay valid only while the object is the one they came
        # from (another writer, a conflict or a remount changes the ETag)
        h.keep_cache = not node.dirty and node.kernel_etag == node.remote_etag
        node.kernel_etag = None if node.dirty else node.remote_etag
        if not writable and not flags & os.O_TRUNC:
            if not h.keep_cache:
                self.fetch.fetch_at_open(node)
            self.fetch.siblings_ahead(node)
        return h

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        h = self.handle(fh)
        node = h.node
        if node.foreign is not None:
            return await self.foreign.read(node, offset, size)
        while (sf := node.stage) is not None:
            if sf.fill is not None:  # (chunks not staged yet: from the version staged from)
                c = self.chunk
                end = min(offset + size, sf.size)
                if end > offset:
                    await self.staged.fill(sf, offset // c, (end - 1) // c, node)
                if node.stage is not sf:
                    continue  # (uploaded and dropped meanwhile)
            return sf.read(offset, size)
        end = min(offset + size, node.attrs.size)
        if offset >= end:
            return b""
        self.fetch.track(h, offset, end)
        try:
            return await self.fetch.read_remote(node, offset, end - offset, h)
        except PreconditionFailed:
            if node.unlinked:  # (replaced while open, before its content was kept: EIO, warned)
                raise PreconditionFailed(
                    "the file was replaced while open, and its version is gone from S3"
                ) from None
            # the object was replaced by another writer since we looked: reload and retry
            node.refreshed_at = -1e18
            await self.look.refresh(node)
            end = min(offset + size, node.attrs.size)
            return await self.fetch.read_remote(node, offset, max(0, end - offset), h)

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        h = self.handle(fh)
        node = h.node
        sf = node.stage or await self.staged.materialize(node)
        while True:  # (a partly written chunk not staged yet is read first: FORMAT.md §8.8)
            at = sf.size if h.append else offset
            end, c = at + len(data), self.chunk
            if sf.fill is not None and (at % c or end % c):
                await self.staged.fill(sf, at // c, at // c, node)
                await self.staged.fill(sf, (end - 1) // c, (end - 1) // c, node)
                if node.stage is not sf:
                    sf = node.stage or await self.staged.materialize(node)
                    continue
                if h.append and sf.size != at:
                    continue  # (another append moved the end meanwhile)
            break
        sf.write(at, data)
        node.target = None
        self.staged.touch(node, data=True)
        return len(data)

    async def setattr(
        self,
        ino: int,
        *,
        size: int | None = None,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
    ) -> Stat:
        node = self.tree.node(ino)
        self.tree.writable(node)
        if size is not None:
            if node.is_dir:
                raise IsDir("is a directory")
            if node.kind == KIND_LINK:
                raise Invalid("cannot truncate a symlink")
            if size < 0:
                raise Invalid("negative size")
            if node.stage is None and size == 0 and node.materializing is None:
                node.stage = self.staging.create(node.file_id)  # nothing to download
            sf = node.stage or await self.staged.materialize(node)
            while size % self.chunk and sf.fill is not None:  # (the chunk it cuts, first)
                await self.staged.fill(sf, size // self.chunk, size // self.chunk, node)
                if node.stage is sf:
                    break
                sf = node.stage or await self.staged.materialize(node)  # (uploaded meanwhile)
            sf.truncate(size)
            self.staged.touch(node, data=True)
        changes: dict[str, Any] = {}
        if mode is not None:
            changes["mode"] = mode & 0o7777
        if uid is not None:
            changes["uid"] = uid
        if gid is not None:
            changes["gid"] = gid
        if atime_ns is not None:
            changes["atime_ns"] = atime_ns
        if mtime_ns is not None:
            changes["mtime_ns"] = mtime_ns
        if changes:
            changes["ctime_ns"] = now_ns()
            node.attrs = node.attrs.with_(**changes)
            node.change += 1
            if node.stage is None:
                node.meta_dirty = True
            node.times_only = False
        if node.stage is not None and node.open_count == 0:
            self.staged.journal(node)  # an open file is journaled when it is closed
        if node.dirty and node.writers == 0:
            self.writeback.schedule(node)
        return self.look.stat(node)

    async def flush(self, fh: int) -> None:
        h = self.handle(fh)
        if h.node.stage is not None and not h.node.unlinked:
            self.staged.journal(h.node)

    async def release(self, fh: int) -> None:
        h = self.handles.pop(fh, None)
        if h is None:
            return
        node = h.node
        node.open_count -= 1
        if node.open_count == 0 and node.plain is not None:
            node.plain = None  # a foreign file's plaintext lives only while it is open
            self.foreign.held.pop(node, None)
        if h.writable:
            node.writers -= 1
        if node.unlinked:
            self.tree.maybe_drop(node)
        elif node.dirty and node.writers == 0 and (h.writable or node not in self.writeback.due):
            # (a reader's close does not push a due upload back: a program polling a dirty
            # file deferred it for as long as it polled)
            self.staged.journal(node)
            self.writeback.schedule(node)

    async def fsync(self, fh: int) -> None:
        """Returns once the file is in S3.  Its staged copy is synced to the cache disk only
        if the upload fails (it is then kept, power-loss safe, for a later upload): syncing
        first would write every byte to the local disk on the way to S3 (5-10 s for 1 GiB
        here), and until ``fsync`` returns nothing was promised."""
        node = self.handle(fh).node
        self.staged.journal(node)  # a crash of the daemon during the upload loses nothing
        try:
            await self.writeback.sync_node(node)
        except BaseException:
            self.staged.journal(node, durable=True)
            raise
