"""The FUSE-independent filesystem: inodes, namespace, attributes, reads, writes, write-back.

Owns: the inode table (a cache of the bucket's tree), open handles, the decrypted-chunk LRU,
the write-back service and crash recovery of staged files.
Must not import: pyfuse3 (the ``fuse`` package adapts this class to the kernel).

Lock order (docs/CONCURRENCY.md): ``Node.lock`` (several in inode order) before ``ns``
(shared, or exclusive for directory renames), so that nothing waits for a node while it holds
``ns``.  Every S3 mutation of a node happens under its ``Node.lock``, so an upload never races
a rename or unlink of that node.  Uploads take no ``ns``: a directory rename holds back the
uploads below it and waits for those in flight (``writeback.moving_dir``) before it takes ``ns``.

Error handling:
    Store and integrity errors propagate as ``cryptfs.errors`` types; integrity failures are
    logged here and never retried.  Log lines name a node through ``ident`` and an error
    through ``scrub`` (``cryptfs.lognames``): no name or path unless ``--log-names``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any, TypeVar

import trio

from cryptfs.cache.blocks import BlockCache
from cryptfs.cache.chunks import ChunkCache
from cryptfs.cache.staging import StagingArea
from cryptfs.errors import (
    Invalid,
    IsDir,
    NotPermitted,
    NotSupported,
    PreconditionFailed,
)
from cryptfs.format.meta import (
    KIND_FILE,
    KIND_LINK,
)
from cryptfs.fs.entries import Entries
from cryptfs.fs.fetch import Fetcher
from cryptfs.fs.foreign import Foreign
from cryptfs.fs.lookup import Lookup
from cryptfs.fs.model import (
    Background,
    Handle,
    KernelCache,
    Node,
    Options,
    Stat,
    now_ns,
)
from cryptfs.fs.namespace import Namespace
from cryptfs.fs.paths import Paths
from cryptfs.fs.recovery import Recovery
from cryptfs.fs.remote import Remote
from cryptfs.fs.rename import Renamer
from cryptfs.fs.staged import Staged
from cryptfs.fs.upload import Uploader
from cryptfs.fs.volume import Volume
from cryptfs.fs.writeback import Writeback

log = logging.getLogger(__name__)
T = TypeVar("T")


class Filesystem:
    def __init__(
        self,
        volume: Volume,
        staging: StagingArea,
        options: Options | None = None,
        *,
        key_prefix: str = "",
        blocks: BlockCache | None = None,
    ) -> None:
        self.vol = volume
        self.blocks = blocks  # encrypted chunks on local disk (None: not kept)
        self.paths = Paths(volume, key_prefix)
        self.store = volume.store
        self.staging = staging
        self.opt = options or Options()
        self.chunk = volume.chunk
        self.remote = Remote(self.store, self.opt.meta_concurrency)
        self.tree = Namespace(self.paths, self.opt.uid, self.opt.gid)
        self.root = self.tree.root
        self.inodes = self.tree.inodes
        self.ns = self.tree.lock
        self.foreign = Foreign(volume, self.opt, self.tree, self.paths, self.remote)
        self.background = Background()  # (serve_writeback's nursery)
        self.look = Lookup(
            volume, self.opt, self.paths, self.tree, self.remote, self.foreign, self.background
        )
        self.cache = ChunkCache(self.opt.memory_cache_bytes)
        self.fetch = Fetcher(
            volume, self.opt, self.paths, self.tree, self.cache, blocks, self.background
        )
        self.staged = Staged(volume, self.opt, staging, self.paths, self.look, self.fetch)
        self.upload = Uploader(
            volume,
            self.opt,
            staging,
            self.paths,
            self.tree,
            self.remote,
            self.look,
            self.fetch,
            self.staged,
        )
        self.entries = Entries(
            volume,
            self.opt,
            staging,
            self.paths,
            self.tree,
            self.remote,
            self.look,
            self.fetch,
            self.staged,
            self.upload,
        )
        self.writeback = Writeback(self.opt, self.paths, self.tree, self.upload, self.background)
        self.renamer = Renamer(
            volume,
            self.opt,
            self.paths,
            self.tree,
            self.remote,
            self.look,
            self.staged,
            self.upload,
            self.entries,
            self.writeback,
        )
        self.recovery = Recovery(
            self.opt, staging, self.paths, self.tree, self.look, self.entries, self.writeback
        )
        self.tree.on_evict = self._forget_pending
        self.tree.on_detach = self.writeback.not_due
        self._next_fh = 1
        self.handles: dict[int, Handle] = {}

    # ------------------------------------------------------------------ paths (facade)

    def path(self, node: Node) -> bytes:
        return self.paths.path(node)

    def dir_prefix(self, node: Node) -> str:
        return self.paths.dir_prefix(node)

    def object_key(self, node: Node) -> tuple[str, str | None]:
        return self.paths.object_key(node)

    def ident(self, node: Node) -> str:
        return self.paths.ident(node)

    def key_ident(self, key: str, path: bytes | None = None) -> str:
        return self.paths.key_ident(key, path)

    def scrub(self, e: BaseException) -> str:
        return self.paths.scrub(e)

    # ------------------------------------------------------------------ inode table (facade)

    def node(self, ino: int) -> Node:
        return self.tree.node(ino)

    def forget(self, items: Iterable[tuple[int, int]]) -> None:
        self.tree.forget(items)

    def current_entry(self, node: Node) -> Node | None:
        return self.tree.current_entry(node)

    def looked_up(self, node: Node) -> Node:
        return self.tree.looked_up(node)

    @property
    def kernel(self) -> KernelCache | None:
        return self.tree.kernel

    @kernel.setter
    def kernel(self, kernel: KernelCache | None) -> None:
        self.tree.kernel = kernel

    @property
    def integrity_failures(self) -> int:
        return self.tree.integrity_failures

    @property
    def integrity_log(self) -> list[tuple[str, str]]:
        return self.tree.integrity_log

    @property
    def uploads(self) -> int:
        return self.upload.uploads

    @property
    def upload_bytes(self) -> int:
        return self.upload.upload_bytes

    @property
    def conflicts(self) -> int:
        return self.upload.conflicts

    async def sweep_uploads(self) -> bool:
        return await self.upload.sweep()

    @property
    def upload_failures(self) -> int:
        return self.writeback.upload_failures

    def pending(self) -> list[Node]:
        return self.writeback.pending()

    async def serve_writeback(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Upload dirty files once their write-back delay has passed. Runs until cancelled."""
        await self.writeback.serve(task_status=task_status)

    def stop_writeback(self) -> None:
        """Let ``serve_writeback`` return once the uploads it started have finished."""
        self.writeback.stop()

    async def sync_node(self, node: Node) -> None:
        await self.writeback.sync_node(node)

    async def flush_all(self) -> list[Node]:
        """Upload everything dirty now; returns the nodes that could not be uploaded."""
        return await self.writeback.flush_all()

    def _forget_pending(self, node: Node) -> None:
        """``node`` was evicted (clean, unreferenced): nothing is pending for it."""
        self.look.relist_queued.discard(node)
        self.writeback.retry.pop(node, None)
        self.writeback.due.pop(node, None)

    def stat(self, node: Node) -> Stat:
        a = node.attrs
        size = node.stage.size if node.stage is not None else a.size
        if node.kind == KIND_LINK and node.target is not None:
            size = len(node.target)
        return Stat(
            ino=node.ino,
            mode=a.st_mode,
            nlink=2 if node.is_dir else 1,
            uid=a.uid,
            gid=a.gid,
            size=size,
            atime_ns=a.atime_ns,
            mtime_ns=a.mtime_ns,
            ctime_ns=a.ctime_ns,
            blksize=self.chunk,
            ttl=self._kernel_ttl(node),
        )

    def _kernel_ttl(self, node: Node) -> float:
        """How long the kernel may answer for ``node`` itself: for as long as this cache
        would, without asking S3 (``look.refresh``), and no longer, so that the kernel's copy is
        never older than the metadata TTL allows.  A walk (rsync, find) that comes back
        within the TTL then costs no round trip into this process per name."""
        ttl = self.opt.metadata_ttl
        parent = node.parent
        if ttl <= 0 or parent is None or node.dirty or node.remote_etag is None:
            return max(ttl, 0.0)
        seen = node.refreshed_at
        if node.is_dir and parent.listed_at > seen:
            seen = parent.listed_at  # a directory's entry is revalidated by its parent's LIST
        return min(ttl, max(0.0, seen + ttl - trio.current_time()))

    # ------------------------------------------------------------------ metadata from S3

    # ------------------------------------------------------------------ lookup and listing

    async def lookup(self, parent_ino: int, name: bytes) -> Node:
        return await self.look.lookup(parent_ino, name)

    async def readdir(self, ino: int) -> list[tuple[bytes, Node]]:
        """All entries of a directory with fresh attributes (concurrent HEADs, bounded)."""
        return await self.look.readdir(ino)

    async def getattr(self, ino: int) -> Stat:
        node = self.tree.node(ino)
        await self.look.refresh(node)
        return self.stat(node)

    # ------------------------------------------------------------------ creating entries

    # ------------------------------------------------------------------ entries (facade)

    async def ensure_root(self) -> None:
        """Load (or create, on a fresh volume) the root directory's marker."""
        await self.entries.ensure_root()

    async def mkdir(self, parent_ino: int, name: bytes, mode: int, uid: int, gid: int) -> Node:
        return await self.entries.mkdir(parent_ino, name, mode, uid, gid)

    async def symlink(
        self, parent_ino: int, name: bytes, target: bytes, uid: int, gid: int
    ) -> Node:
        return await self.entries.symlink(parent_ino, name, target, uid, gid)

    async def readlink(self, ino: int) -> bytes:
        return await self.entries.readlink(ino)

    async def create(
        self, parent_ino: int, name: bytes, mode: int, uid: int, gid: int, *, append: bool = False
    ) -> tuple[Node, Handle]:
        node = await self.entries.new_file(parent_ino, name, mode, uid, gid)
        h = self._open_handle(node, writable=True)
        h.append = append
        return node, h

    async def unlink(self, parent_ino: int, name: bytes) -> None:
        await self.entries.unlink(parent_ino, name)

    async def rmdir(self, parent_ino: int, name: bytes) -> None:
        await self.entries.rmdir(parent_ino, name)

    # ------------------------------------------------------------------ open, read, write

    def _open_handle(self, node: Node, writable: bool) -> Handle:
        h = Handle(self._next_fh, node, writable)
        self._next_fh += 1
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
        h = self._open_handle(node, writable)
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
        if node.stage is not None:
            return node.stage.read(offset, size)
        end = min(offset + size, node.attrs.size)
        if offset >= end:
            return b""
        self.fetch.track(h, offset, end)
        try:
            return await self.fetch.read_remote(node, offset, end - offset, h)
        except PreconditionFailed:
            # the object was replaced by another writer since we looked: reload and retry
            node.refreshed_at = -1e18
            await self.look.refresh(node)
            end = min(offset + size, node.attrs.size)
            return await self.fetch.read_remote(node, offset, max(0, end - offset), h)

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        h = self.handle(fh)
        node = h.node
        sf = node.stage or await self.staged.materialize(node)
        if h.append:
            offset = sf.size
        sf.write(offset, data)
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
        if node.stage is not None and node.open_count == 0:
            self.staged.journal(node)  # an open file is journaled when it is closed
        if node.dirty and node.writers == 0:
            self.writeback.schedule(node)
        return self.stat(node)

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
            await self.sync_node(node)
        except BaseException:
            self.staged.journal(node, durable=True)
            raise

    def statfs(self) -> dict[str, int]:
        blocks = 1 << 40  # S3 has no meaningful capacity; report 4 PiB in 4 KiB blocks
        return {
            "f_bsize": self.chunk,
            "f_frsize": 4096,
            "f_blocks": blocks,
            "f_bfree": blocks,
            "f_bavail": blocks,
            "f_files": 1 << 32,
            "f_ffree": 1 << 32,
            "f_favail": 1 << 32,
            "f_namemax": 255,
        }

    def link(self) -> None:
        raise NotPermitted("hard links are not supported on cryptfs")

    def setxattr(self) -> None:
        raise NotSupported("extended attributes are not supported")

    # ------------------------------------------------------------------ removing entries

    # ------------------------------------------------------------------ rename (facade)

    async def rename(
        self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes, flags: int
    ) -> None:
        await self.renamer.rename(old_parent, old_name, new_parent, new_name, flags)

    # ------------------------------------------------------------------ write-back

    def left_behind(self) -> dict[str, list[bytes]]:
        """What an unmount leaves: ``staged``, files whose data stays staged (with a journal)
        and is uploaded at the next mount; ``lost``, changes of attributes only (chmod,
        touch, a directory's marker), which are not staged and end with this process."""
        staged, lost = list(self.recovery.unrecovered), list[bytes]()
        for n in self.pending():
            (staged if n.stage is not None else lost).append(self.paths.path(n))
        return {"staged": sorted(staged), "lost": sorted(lost)}

    def counters(self) -> dict[str, int]:
        """What ``cryptfs stats`` and the metrics endpoint report of the file system."""
        pending = self.pending()
        return {
            "pending_files": len(pending),
            "pending_bytes": sum(n.stage.size for n in pending if n.stage is not None),
            "uploads": self.uploads,
            "upload_bytes": self.upload_bytes,
            "upload_failures": self.writeback.upload_failures,
            "conflicts": self.upload.conflicts,
            "integrity_failures": self.integrity_failures,
            "cache_bytes": self.cache.used,
            "cache_limit_bytes": self.cache.limit,
            "cache_hits": self.cache.hits,
            "cache_misses": self.cache.misses,
            "disk_cache_bytes": self.blocks.used if self.blocks else 0,
            "disk_cache_limit_bytes": self.blocks.limit if self.blocks else 0,
            "disk_cache_hits": self.blocks.hits if self.blocks else 0,
            "open_files": len(self.handles),
            "inodes": len(self.inodes),
        }

    # ------------------------------------------------------------------ crash recovery (facade)

    async def recover(self) -> int:
        """Upload files staged by an earlier run that ended before uploading them, and abort
        the multipart uploads it left behind; returns how many were uploaded."""
        return await self.recovery.recover()

    @property
    def unrecovered(self) -> list[bytes]:
        return self.recovery.unrecovered
