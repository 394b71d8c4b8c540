"""The FUSE-independent file system: the parts of ``cryptfs.fs`` put together, and the one
interface the FUSE layer (``cryptfs.fuse``) and the tools (fsck, import, offline) use.

Owns: nothing of its own but the wiring.  Each part has one job and gets what it shares with
others through its constructor (docs/ARCHITECTURE.md has the map):

    paths      path <-> object key, S3's key budget, how log lines name things
    remote     bounded HEAD / LIST requests
    namespace  the inode table, the ``ns`` lock, lookup counts, eviction, the integrity log
    foreign    objects of the AWS S3 Encryption Client, read-only
    lookup     lookups, listings, metadata revalidation, what ``stat`` answers
    fetch      the read path: pinned ranged GETs, caches, read-ahead
    staged     staged copies of dirty files, their journal records
    upload     every conditional write to S3, and what a lost precondition does
    entries    mkdir, symlink, mknod, create, unlink, rmdir
    writeback  uploads due, the service, sync_node, flush_all
    rename     rename, of files and of whole directories
    recovery   staged files of an earlier run, uploaded at mount
    files      handles, open, read, write, setattr, release, fsync

Must not import: pyfuse3 (the ``fuse`` package adapts this class to the kernel).

Lock order (docs/CONCURRENCY.md): ``Node.lock`` (several in inode order) before ``ns``
(shared, or exclusive for directory renames), so that nothing waits for a node while it holds
``ns``.  Every S3 mutation of a node happens under its ``Node.lock``, so an upload never races
a rename or unlink of that node.  Uploads take no ``ns``: a directory rename holds back the
uploads below it and waits for those in flight (``Writeback.moving_dir``) before it takes
``ns``.

Error handling:
    Store and integrity errors propagate as ``cryptfs.errors`` types; integrity failures are
    logged (``Namespace.integrity``) and never retried.  Log lines name a node through
    ``ident`` and an error through ``scrub`` (``cryptfs.lognames``): no name or path unless
    ``--log-names``.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable
from typing import Any

import trio

from cryptfs.cache.blocks import BlockCache
from cryptfs.cache.chunks import ChunkCache
from cryptfs.cache.staging import StagingArea
from cryptfs.errors import NotPermitted, NotSupported
from cryptfs.fs.entries import Entries
from cryptfs.fs.fetch import Fetcher
from cryptfs.fs.files import Files
from cryptfs.fs.foreign import Foreign
from cryptfs.fs.lookup import Lookup
from cryptfs.fs.model import Background, Handle, KernelCache, Node, Options, Stat
from cryptfs.fs.namespace import Namespace
from cryptfs.fs.paths import Paths
from cryptfs.fs.recovery import Recovery
from cryptfs.fs.remote import Remote
from cryptfs.fs.rename import Renamer
from cryptfs.fs.staged import Staged
from cryptfs.fs.upload import Uploader
from cryptfs.fs.writeback import Writeback
from cryptfs.volume import Volume


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
        opt = self.opt = options or Options()
        self.vol = volume
        self.store = volume.store
        self.staging = staging
        self.chunk = volume.chunk
        self.blocks = blocks  # encrypted chunks on local disk (None: not kept)
        self.cache = ChunkCache(opt.memory_cache_bytes)  # decrypted chunks in memory
        self.background = Background()  # serve_writeback's nursery, while it serves

        # the parts, each after those it uses (tests/unit/test_layers.py keeps that order)
        paths = self.paths = Paths(volume, key_prefix)
        remote = self.remote = Remote(self.store, opt.meta_concurrency)
        tree = self.tree = Namespace(paths, opt.uid, opt.gid)
        foreign = self.foreign = Foreign(volume, opt, tree, paths, remote)
        look = self.look = Lookup(volume, opt, paths, tree, remote, foreign, self.background)
        fetch = self.fetch = Fetcher(volume, opt, paths, tree, self.cache, blocks, self.background)
        staged = self.staged = Staged(volume, opt, staging, paths, look, fetch)
        upload = self.upload = Uploader(
            volume, opt, staging, paths, tree, remote, look, fetch, staged
        )
        entries = self.entries = Entries(
            volume, opt, staging, paths, tree, remote, look, fetch, staged, upload
        )
        writeback = self.writeback = Writeback(opt, paths, tree, upload, self.background)
        self.renamer = Renamer(
            volume, opt, paths, tree, remote, look, staged, upload, entries, writeback
        )
        self.recovery = Recovery(opt, staging, paths, tree, look, entries, writeback)
        self.files = Files(volume, opt, staging, tree, look, foreign, fetch, staged, writeback)
        # a node that leaves the table takes what the parts keep pending for it along
        tree.on_evict = self._forget_pending
        tree.on_detach = writeback.not_due
        tree.on_dir_times = writeback.dir_times

        # shared state the FUSE layer and the tools read
        self.root = tree.root
        self.inodes = tree.inodes
        self.ns = tree.lock
        self.handles = self.files.handles

    # ------------------------------------------------------------------ paths

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

    # ------------------------------------------------------------------ inode table

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

    def _forget_pending(self, node: Node) -> None:
        """``node`` was evicted (clean, unreferenced): nothing is pending for it."""
        self.look.relist_queued.discard(node)
        self.writeback.retry.pop(node, None)
        self.writeback.due.pop(node, None)

    # ------------------------------------------------------------------ lookup and listing

    async def lookup(self, parent_ino: int, name: bytes) -> Node:
        return await self.look.lookup(parent_ino, name)

    async def readdir(self, ino: int) -> list[tuple[bytes, Node]]:
        """All entries of a directory with fresh attributes (concurrent HEADs, bounded)."""
        return await self.look.readdir(ino)

    def stat(self, node: Node) -> Stat:
        return self.look.stat(node)

    async def getattr(self, ino: int) -> Stat:
        node = self.tree.node(ino)
        await self.look.refresh(node)
        return self.stat(node)

    # ------------------------------------------------------------------ entries

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

    async def mknod(
        self, parent_ino: int, name: bytes, mode: int, rdev: int, uid: int, gid: int
    ) -> Node:
        """``mknod(2)``: a special file, or an empty regular file (the kernel sends a
        ``mknod`` for ``S_IFREG`` too), uploaded like a closed new file."""
        if stat.S_ISREG(mode):
            node = await self.entries.new_file(parent_ino, name, mode, uid, gid)
            self.staged.journal(node)
            self.writeback.schedule(node)
            return node
        return await self.entries.special(parent_ino, name, mode, rdev, uid, gid)

    async def create(
        self, parent_ino: int, name: bytes, mode: int, uid: int, gid: int, *, append: bool = False
    ) -> tuple[Node, Handle]:
        node = await self.entries.new_file(parent_ino, name, mode, uid, gid)
        h = self.files.open_handle(node, writable=True)
        h.append = append
        return node, h

    async def unlink(self, parent_ino: int, name: bytes) -> None:
        await self.entries.unlink(parent_ino, name)

    async def rmdir(self, parent_ino: int, name: bytes) -> None:
        await self.entries.rmdir(parent_ino, name)

    # ------------------------------------------------------------------ open files

    def handle(self, fh: int) -> Handle:
        return self.files.handle(fh)

    async def open(self, ino: int, flags: int) -> Handle:
        return await self.files.open(ino, flags)

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        return await self.files.read(fh, offset, size)

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        return await self.files.write(fh, offset, data)

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
        return await self.files.setattr(
            ino, size=size, mode=mode, uid=uid, gid=gid, atime_ns=atime_ns, mtime_ns=mtime_ns
        )

    async def flush(self, fh: int) -> None:
        await self.files.flush(fh)

    async def release(self, fh: int) -> None:
        await self.files.release(fh)

    async def fsync(self, fh: int) -> None:
        """Returns once the file is in S3 (``Files.fsync``)."""
        await self.files.fsync(fh)

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

    # ------------------------------------------------------------------ rename

    async def rename(
        self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes, flags: int
    ) -> None:
        await self.renamer.rename(old_parent, old_name, new_parent, new_name, flags)

    # ------------------------------------------------------------------ write-back

    @property
    def uploads(self) -> int:
        return self.upload.uploads

    @property
    def upload_bytes(self) -> int:
        return self.upload.upload_bytes

    @property
    def conflicts(self) -> int:
        return self.tree.conflicts

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
            "upload_copied_bytes": self.upload.copied_bytes,
            "upload_failures": self.writeback.upload_failures,
            "conflicts": self.tree.conflicts,
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

    # ------------------------------------------------------------------ crash recovery

    async def recover(self) -> int:
        """Upload files staged by an earlier run that ended before uploading them, and abort
        the multipart uploads it left behind; returns how many were uploaded."""
        return await self.recovery.recover()

    @property
    def unrecovered(self) -> list[bytes]:
        return self.recovery.unrecovered
