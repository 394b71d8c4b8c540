"""The pyfuse3 adapter: the only importer of pyfuse3.

Owns: converting kernel requests into ``Filesystem`` calls and domain errors into errno.
Only ``FUSEError`` may leave a handler: anything else would end ``pyfuse3.main()`` and strand
the mount, so unexpected exceptions are logged and answered with EIO.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import pyfuse3

from cryptfs import errors as E
from cryptfs import lognames
from cryptfs.fs.filesystem import Filesystem
from cryptfs.fs.model import Node, Stat
from cryptfs.metrics import FUSE_SECONDS

log = logging.getLogger(__name__)
T = TypeVar("T")

#: errno of every leaf of the exception tree (a test checks that none is missing)
ERRNO_OF: dict[type[E.CryptfsError], int] = {
    E.UsageError: errno.EINVAL,
    E.VolumeNotFound: errno.EIO,
    E.VolumeExists: errno.EEXIST,
    E.WrongKey: errno.EACCES,
    E.UnsupportedFormat: errno.EIO,
    E.NewerFormat: errno.EIO,
    E.IntegrityError: errno.EIO,
    E.NotFound: errno.ENOENT,
    E.PreconditionFailed: errno.EIO,
    E.BucketNotFound: errno.EIO,
    E.AccessDenied: errno.EACCES,
    E.KeyTooLong: errno.ENAMETOOLONG,
    E.StoreUnavailable: errno.EIO,
    E.SseMismatch: errno.EIO,
    E.KeyAccessDenied: errno.EIO,
    E.KeyServiceUnavailable: errno.EIO,
    E.NoEntry: errno.ENOENT,
    E.Exists: errno.EEXIST,
    E.NotEmpty: errno.ENOTEMPTY,
    E.NotDir: errno.ENOTDIR,
    E.IsDir: errno.EISDIR,
    E.NameTooLong: errno.ENAMETOOLONG,
    E.NotSupported: errno.EOPNOTSUPP,
    E.Invalid: errno.EINVAL,
    E.NoSpace: errno.ENOSPC,
    E.CrossDevice: errno.EXDEV,
    E.Busy: errno.EBUSY,
    E.NotPermitted: errno.EPERM,
    E.NoAttr: errno.ENODATA,
    E.ReadOnly: errno.EROFS,
    E.FileTooBig: errno.EFBIG,
}
_QUIET = (E.NoEntry, E.Exists, E.NotEmpty, E.NoAttr, E.NotFound, E.NotSupported)


def errno_of(exc: E.CryptfsError) -> int:
    for cls in type(exc).__mro__:
        if cls in ERRNO_OF:
            return ERRNO_OF[cls]
    return errno.EIO


class Operations(pyfuse3.Operations):
    enable_writeback_cache = False

    def __init__(self, fs: Filesystem, *, writeback_cache: bool = False) -> None:
        super().__init__()
        # The kernel's write-back cache batches small writes into large ones, but then it
        # keeps its own size and mtime of every regular file and never takes them from us
        # (fuse_get_cache_mask): another host's change of a file would go unseen.  Opt-in.
        self.enable_writeback_cache = writeback_cache
        self.fs = fs
        self._dirs: dict[int, list[tuple[bytes, Node]]] = {}
        self._next_dh = 1

    async def _guard(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        """``fn()``, timed as FUSE operation ``what`` (``cryptfs.metrics``), its errors
        answered as errno (and logged: without names, see ``cryptfs.lognames``).  One
        frame: every FUSE request passes here."""
        start = time.monotonic()
        try:
            try:
                return await fn()
            except pyfuse3.FUSEError:
                raise
            except E.CryptfsError as e:
                code = errno_of(e)
                if isinstance(e, _QUIET):  # (ENOENT is frequent: no scrub unless logged)
                    if log.isEnabledFor(logging.DEBUG):
                        log.debug("%s: %s", what, self.fs.scrub(e))
                elif isinstance(e, E.PreconditionFailed):
                    # another host replaced the object while this operation used it (and again
                    # when it looked again): a race lost, nothing lost; EIO, a warning
                    log.warning(
                        "%s: changed by another writer meanwhile: %s", what, self.fs.scrub(e)
                    )
                elif code == errno.EIO:
                    log.error("%s failed: %s", what, self.fs.scrub(e))
                else:
                    log.info("%s: %s", what, self.fs.scrub(e))
                raise pyfuse3.FUSEError(code) from None
            except OSError as e:
                log.error("%s failed: %s", what, self.fs.scrub(e))
                raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
            except Exception as e:
                log.error(
                    "unexpected error in %s\n%s",
                    what,
                    lognames.traceback_text(e, self.fs.vol.names.opaque),
                )
                raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            FUSE_SECONDS.labels(what).observe(time.monotonic() - start)

    # KernelCache: another writer's change found, the kernel's copy (Stat.ttl) is stale

    def attrs_changed(self, ino: int) -> None:
        # attributes only, which takes no lock in the kernel: safe inside a request handler
        # (the pages are dropped at the next open, as the object's ETag changed)
        try:
            pyfuse3.invalidate_inode(ino, attr_only=True)
        except OSError as e:
            if e.errno != errno.ENOENT:  # (the kernel does not hold that inode)
                log.debug("invalidating inode %d: %s", ino, e)

    def entry_gone(self, parent_ino: int, name: bytes) -> None:
        # this one waits for requests on the directory in flight (the one being served may
        # be one): pyfuse3 sends it from a thread of its own
        pyfuse3.invalidate_entry_async(parent_ino, name, ignore_enoent=True)

    def _entry(self, st: Stat) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = st.ino
        a.generation = 0
        a.entry_timeout = st.ttl
        a.attr_timeout = st.ttl
        a.st_mode = st.mode
        a.st_nlink = st.nlink
        a.st_uid = st.uid
        a.st_gid = st.gid
        a.st_rdev = st.rdev
        a.st_size = st.size
        a.st_blksize = st.blksize
        a.st_blocks = -(-st.size // 512)
        a.st_atime_ns = st.atime_ns
        a.st_mtime_ns = st.mtime_ns
        a.st_ctime_ns = st.ctime_ns
        return a

    def _looked_up(self, node: Node) -> pyfuse3.EntryAttributes:
        return self._entry(self.fs.stat(self.fs.looked_up(node)))

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any) -> Any:
        async def op() -> Any:
            return self._looked_up(await self.fs.lookup(parent_inode, name))

        return await self._guard("lookup", op)

    async def getattr(self, inode: int, ctx: Any) -> Any:
        async def op() -> Any:
            return self._entry(await self.fs.getattr(inode))

        return await self._guard("getattr", op)

    async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> Any:
        async def op() -> Any:
            kw: dict[str, int] = {}
            if fields.update_size:
                kw["size"] = attr.st_size
            if fields.update_mode:
                kw["mode"] = attr.st_mode
            if fields.update_uid:
                kw["uid"] = attr.st_uid
            if fields.update_gid:
                kw["gid"] = attr.st_gid
            if fields.update_atime:
                kw["atime_ns"] = attr.st_atime_ns
            if fields.update_mtime:
                kw["mtime_ns"] = attr.st_mtime_ns
            return self._entry(await self.fs.setattr(inode, **kw))

        return await self._guard("setattr", op)

    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return await self._guard("readlink", lambda: self.fs.readlink(inode))

    async def opendir(self, inode: int, ctx: Any) -> int:
        async def op() -> int:
            entries = await self.fs.readdir(inode)
            dh = self._next_dh
            self._next_dh += 1
            self._dirs[dh] = entries
            return dh

        return await self._guard("opendir", op)

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        async def op() -> None:
            entries = self._dirs.get(fh, [])
            for i in range(start_id, len(entries)):
                name, listed = entries[i]
                node = self.fs.current_entry(listed)  # (evicted or removed since opendir?)
                if node is None:
                    continue
                if not pyfuse3.readdir_reply(token, name, self._entry(self.fs.stat(node)), i + 1):
                    return
                self.fs.looked_up(node)

        await self._guard("readdir", op)

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> Any:
        async def op() -> Any:
            node = await self.fs.mkdir(parent_inode, name, mode, ctx.uid, ctx.gid)
            return self._looked_up(node)

        return await self._guard("mkdir", op)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self._guard("rmdir", lambda: self.fs.rmdir(parent_inode, name))

    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self._guard("unlink", lambda: self.fs.unlink(parent_inode, name))

    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> Any:
        async def op() -> Any:
            node = await self.fs.symlink(parent_inode, name, target, ctx.uid, ctx.gid)
            return self._looked_up(node)

        return await self._guard("symlink", op)

    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: Any,
    ) -> None:
        await self._guard(
            "rename",
            lambda: self.fs.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags),
        )

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any) -> Any:
        async def op() -> Any:
            self.fs.link()

        return await self._guard("link", op)

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any) -> Any:
        async def op() -> Any:
            node = await self.fs.mknod(parent_inode, name, mode, rdev, ctx.uid, ctx.gid)
            return self._looked_up(node)

        return await self._guard("mknod", op)

    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        async def op() -> Any:
            # O_APPEND is the file system's to honour unless the kernel caches writes
            # (libfuse: with write-back caching the kernel handles it)
            mine = flags & ~os.O_APPEND if self.enable_writeback_cache else flags
            h = await self.fs.open(inode, mine)
            return pyfuse3.FileInfo(fh=h.fh, keep_cache=h.keep_cache)

        return await self._guard("open", op)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any) -> Any:
        async def op() -> Any:
            append = bool(flags & os.O_APPEND) and not self.enable_writeback_cache
            node, h = await self.fs.create(
                parent_inode, name, mode, ctx.uid, ctx.gid, append=append
            )
            return pyfuse3.FileInfo(fh=h.fh), self._looked_up(node)

        return await self._guard("create", op)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self._guard("read", lambda: self.fs.read(fh, off, size))

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self._guard("write", lambda: self.fs.write(fh, off, buf))

    async def flush(self, fh: int) -> None:
        await self._guard("flush", lambda: self.fs.flush(fh))

    async def release(self, fh: int) -> None:
        await self._guard("release", lambda: self.fs.release(fh))

    async def fsync(self, fh: int, datasync: bool) -> None:
        await self._guard("fsync", lambda: self.fs.fsync(fh))

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        return None

    async def statfs(self, ctx: Any) -> Any:
        st = pyfuse3.StatvfsData()
        for k, v in self.fs.statfs().items():
            setattr(st, k, v)
        return st

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        self.fs.forget(inode_list)

    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        # ENOSYS, not ENODATA: the kernel then answers every later getxattr itself
        # (EOPNOTSUPP) instead of asking for security.capability before every write(2),
        # a round trip per write (measured: 256 GETXATTR for 256 writes of 1 MiB)
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        async def op() -> None:
            self.fs.setxattr()

        await self._guard("setxattr", op)

    async def listxattr(self, inode: int, ctx: Any) -> Sequence[bytes]:
        return []

    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)


def mount_options(fsname: str, extra: Sequence[str]) -> set[str]:
    opts = set(pyfuse3.default_options)
    opts |= {f"fsname={fsname}", "subtype=cryptfs"}
    for o in extra:
        if o and o not in ("rw", "defaults", "_netdev", "auto", "noauto", "nofail", "user"):
            opts.add(o)
    return opts


@contextmanager
def mounted(ops: Operations, mountpoint: str, options: set[str]) -> Iterator[None]:
    """Mount ``ops`` at ``mountpoint``; unmount on exit (a no-op if already unmounted)."""
    pyfuse3.init(ops, mountpoint, options)
    ops.fs.kernel = ops  # there is a session to notify now
    try:
        yield
    finally:
        ops.fs.kernel = None
        pyfuse3.close(unmount=True)


async def serve() -> None:
    """Answer kernel requests until the file system is unmounted or ``request_unmount``."""
    await pyfuse3.main()


def request_unmount() -> None:
    pyfuse3.terminate()
