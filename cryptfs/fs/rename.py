"""Rename: a file's object copied to its new key (If-Match the version this mount holds)
and the old one deleted; a directory's objects copied below the new prefix, all of them.

Owns: what may replace what (POSIX: a file a file, a directory an empty directory; no
RENAME_EXCHANGE), the lock order of a rename (node locks, then ``ns``: exclusive for a
directory, whose uploads below are held back meanwhile), retrying when another writer
replaced the source or the target while it waited, a replaced file that is still open
keeping its content, and undoing a directory rename's copies when it fails half way.
Must not import: other parts of ``cryptfs.fs`` but ``model``, ``paths``,
``remote``, ``namespace``, ``lookup``, ``staged``, ``upload``, ``entries`` and ``writeback``.
"""

from __future__ import annotations

import contextlib
import logging

import trio

from cryptfs.errors import (
    Exists,
    Invalid,
    IsDir,
    NoEntry,
    NotDir,
    NotFound,
    PreconditionFailed,
    StoreError,
)
from cryptfs.format.meta import ObjectMeta
from cryptfs.fs.entries import Entries
from cryptfs.fs.lookup import Lookup
from cryptfs.fs.model import Node, Options, join, named, now_ns
from cryptfs.fs.namespace import Namespace
from cryptfs.fs.paths import Paths
from cryptfs.fs.remote import Remote
from cryptfs.fs.staged import Staged
from cryptfs.fs.upload import Uploader
from cryptfs.fs.writeback import Writeback
from cryptfs.store.base import ObjectInfo
from cryptfs.tasks import open_tasks
from cryptfs.volume import MARKER, Volume

log = logging.getLogger(__name__)


class Renamer:
    def __init__(
        self,
        volume: Volume,
        options: Options,
        paths: Paths,
        tree: Namespace,
        remote: Remote,
        look: Lookup,
        staged: Staged,
        upload: Uploader,
        entries: Entries,
        writeback: Writeback,
    ) -> None:
        self.vol = volume
        self.store = volume.store
        self.opt = options
        self.paths = paths
        self.tree = tree
        self.remote = remote
        self.look = look
        self.staged = staged
        self.upload = upload
        self.entries = entries
        self.writeback = writeback

    async def rename(
        self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes, flags: int
    ) -> None:
        noreplace, exchange = 1, 2  # RENAME_NOREPLACE, RENAME_EXCHANGE
        if flags & exchange:
            raise Invalid("RENAME_EXCHANGE is not supported")
        p1, p2 = self.tree.node(old_parent), self.tree.node(new_parent)
        self.tree.check_parent(p1)
        self.tree.check_parent(p2)
        self.tree.writable(p1)
        self.tree.writable(p2)
        self.upload.keys_current()
        self.vol.names.encode(self.paths.path(p2), new_name)
        src = await self.look.find(p1, old_name)
        if src is None:
            raise named(NoEntry, old_name)
        self.tree.writable(src)
        if src.is_dir:
            a: Node | None = p2
            while a is not None:
                if a is src:
                    raise Invalid("cannot move a directory into itself")
                a = a.parent
        for _ in range(10):
            dst = await self.look.find(p2, new_name)
            if dst is src:
                return
            if dst is not None:
                _may_replace(src, dst, new_name, noreplace=bool(flags & noreplace))
            self.paths.key_for(p2, new_name, src.kind)  # ENAMETOOLONG before anything moves
            # node locks before ns (docs/CONCURRENCY.md): nothing waits for a node (an
            # upload of it, say) while it holds ns, which a directory rename would queue on
            locked = sorted([n for n in (src, dst) if n is not None], key=lambda n: n.ino)
            async with contextlib.AsyncExitStack() as stack:
                for n in locked:
                    await stack.enter_async_context(n.lock)
                if src.is_dir:
                    # uploads below it finish first, and no new one starts until it is done
                    # (they hold no ns lock: a rename waiting for one blocks nobody else)
                    prefix = self.paths.dir_prefix(src)
                    await stack.enter_async_context(self.writeback.moving_dir(prefix))
                    await stack.enter_async_context(self.tree.lock.exclusive())
                    if self.paths.dir_prefix(src) != prefix:
                        continue  # a directory above it was renamed meanwhile
                else:
                    await stack.enter_async_context(self.tree.lock.shared())
                if src.unlinked or src.parent is not p1 or src.name != old_name:
                    raise named(NoEntry, old_name)  # (removed or moved while we waited)
                if (p2.children or {}).get(new_name, None if dst is None else dst) is not dst:
                    continue  # the target was created, replaced or removed while we waited
                if dst is not None and (dst.unlinked or dst.parent is not p2):
                    continue
                if dst is not None and dst.is_dir:
                    await self.entries.check_empty(dst)
                for n in locked:
                    n.renaming += 1
                raced: Node | None = None
                try:
                    if src.is_dir:
                        await self.rename_dir(src, p2, new_name, dst)
                    else:
                        await self.rename_file(src, p2, new_name, dst)
                except _Raced as e:
                    raced = e.node
                finally:
                    for n in locked:
                        n.renaming -= 1
                if raced is None:
                    self.tree.entries_changed(p1, p2)
                    return
                # the object of the source (its copy's If-Match failed) or of the target (its
                # content, kept for a reader, could not be read) was replaced or removed by
                # another writer since this mount looked, and nothing has moved yet: look
                # again at that one, now that it is not being renamed, and retry (the source
                # removed: ENOENT), rather than EIO for a race in which nothing was lost
                await self.look.look_again(raced)
                if src.unlinked:
                    raise named(NoEntry, old_name)
        raise StoreError("the target of a rename kept changing")

    async def displace(self, dst: Node) -> None:
        """``dst`` was replaced (the rename has happened in S3): it leaves the tree; a reader
        that still has it open keeps reading its content, kept here before."""
        try:
            await self.entries.keep_for_open_handles(dst)
        except (PreconditionFailed, NotFound) as e:
            # opened while the copy over it was in flight (it was kept before the copy, for
            # the readers then): that version is gone from S3, the rename stands.  Its ETag
            # stays, so that those readers get EIO (If-Match), never bytes of another version
            log.warning(
                "%s was replaced while a reader opened it: its reads fail (%s)",
                self.paths.ident(dst),
                self.paths.scrub(e),
            )
            self.tree.detach(dst)
            return
        dst.remote_etag = None
        self.tree.detach(dst)
        if dst.stage is not None and dst.open_count == 0:
            dst.stage.remove()
            dst.stage = None

    async def rename_file(self, src: Node, p2: Node, name: bytes, dst: Node | None) -> None:
        self.upload.keys_current()
        dst_etag = dst.remote_etag if dst is not None else None
        if dst is not None and dst.is_dir:
            await self.entries.delete_remote(dst)
            dst_etag = None
        elif dst is not None:
            # a replaced file still open keeps its content: read it before the copy replaces
            # the object it is read from (after, its old ETag is gone: 412, 18.6)
            try:
                await self.entries.keep_for_open_handles(dst)
            except NotFound:
                dst_etag = None  # removed elsewhere: nothing to keep (its reads fail)
            except PreconditionFailed:
                raise _Raced(dst) from None  # (replaced elsewhere: nothing has moved yet)
        old_key, _ = self.paths.object_key(src)
        new_key, long_name = self.paths.key_for(p2, name, src.kind)
        if src.stage is None and src.remote_etag is not None:
            new_attrs = src.attrs.with_(ctime_ns=now_ns())
            meta = ObjectMeta(src.file_id, new_attrs, src.wrapped, long_name)
            md = self.vol.meta.encode(self.paths.child_path(p2, name), new_key, meta)
            try:
                etag = await self.store.copy(
                    old_key,
                    new_key,
                    md,
                    if_match=src.remote_etag,
                    size=self.upload.stored_size(src),
                )
            except (PreconditionFailed, NotFound):
                raise _Raced(src) from None  # (replaced or removed elsewhere: nothing moved)
            await self.store.delete(old_key)
            if dst is not None:
                await self.displace(dst)
            self.tree.move(src, p2, name)
            src.attrs = new_attrs
            src.remote_etag = etag
            src.meta_dirty = False
        else:
            # dirty: the pending upload will write the new key; drop the old object now (a
            # staged file of only what was written first reads the rest: what it reads from
            # would be a noncurrent version of a key no file has, which no later rotation
            # could vouch for)
            if src.stage is not None and src.stage.fill is not None:
                await self.staged.fill_all(src, src.stage)
            await self.entries.delete_remote(src)
            if dst is not None:
                await self.displace(dst)
            self.tree.move(src, p2, name)
            src.remote_etag = dst_etag
            src.change += 1
            if src.stage is not None:
                self.staged.journal(src)

    async def rename_dir(self, src: Node, p2: Node, name: bytes, dst: Node | None) -> None:
        self.upload.keys_current()
        mv = _DirMove(self, src, p2, name)
        # uploads below are excluded (``writeback.moving_dir``); dirty nodes are not in S3
        listing = await self.remote.list(mv.old_prefix, delimiter=None)
        keys = sorted((o.key for o in listing.objects), key=lambda k: k.count("/"))
        async with open_tasks() as n:
            for k in keys:
                n.start_soon(mv.target, k)
        for _, nkey, *_rest in mv.plan:
            self.paths.check_budget(nkey, "a path below the directory would be")
        try:
            async with open_tasks() as n:
                for item in mv.plan:
                    n.start_soon(mv.copy, *item)
        except BaseException:
            # undo: the copies made so far go, in DeleteObjects of 1000 (one at a time, a
            # failed rename of a big tree took as long to undo as to make)
            with trio.CancelScope(shield=True), contextlib.suppress(StoreError):
                await self.store.delete_many(list(mv.copied))
            raise
        await self.moved_dir(mv, src, p2, name, dst)

    async def moved_dir(
        self, mv: _DirMove, src: Node, p2: Node, name: bytes, dst: Node | None
    ) -> None:
        """Every object of ``src`` is copied to its new key: the replaced directory and the
        old keys go, and the nodes below ``src`` take their new keys and ETags."""
        copied = mv.copied
        if dst is not None:
            # (an empty directory replaced: its marker's key is the one the moved directory's
            # marker was just copied to, so that key must not be deleted now)
            if dst.remote_etag is not None and self.paths.object_key(dst)[0] not in copied:
                await self.entries.delete_remote(dst)
            dst.remote_etag = None
            self.tree.detach(dst)

        # the old keys of what was copied (one that vanished since the listing may be back
        # by now, another host's): DeleteObjects, at most 1000 keys each (a DeleteObject
        # each made a third of the requests of a directory rename)
        async with self.remote.limit:
            await self.store.delete_many([item[0] for item in mv.plan if item[1] in copied])
        self.tree.move(src, p2, name)
        # loaded descendants now live under new keys
        stack = [src]
        while stack:
            nd = stack.pop()
            if nd.remote_etag is not None:
                nd.remote_etag = copied.get(self.paths.object_key(nd)[0], nd.remote_etag)
            if nd.stage is not None:
                self.staged.journal(nd)
            stack.extend((nd.children or {}).values())
        if src.remote_etag is not None:
            src.meta_dirty = True  # marker carries the new ctime
            src.times_only = False
            self.writeback.schedule(src)


def _may_replace(src: Node, dst: Node, name: bytes, *, noreplace: bool) -> None:
    """POSIX: a file replaces a file, a directory an (empty) directory."""
    if noreplace:
        raise named(Exists, name)
    if dst.is_dir and not src.is_dir:
        raise IsDir("target is a directory")
    if src.is_dir and not dst.is_dir:
        raise NotDir("target is not a directory")


class _Raced(Exception):
    """A rename lost an If-Match race on ``node`` (the source or the target) before anything
    moved: another writer replaced or removed it since this mount looked."""

    def __init__(self, node: Node) -> None:
        super().__init__("lost a race with another writer")
        self.node = node


class _DirMove:
    """The objects below one directory being renamed: where each goes, and what was copied.

    Every new key is known (and checked against S3's key budget) before anything is copied;
    the metadata of each object is bound to its path, so it is sealed again for the new one.
    """

    def __init__(self, r: Renamer, src: Node, p2: Node, name: bytes) -> None:
        self.r = r
        self.names = r.vol.names
        self.p2, self.name = p2, name
        self.old_prefix = r.paths.dir_prefix(src)
        new_prefix = r.paths.prefix_for(p2, name)
        # per directory prefix below (and of) ``src``: (old path, new path, new prefix)
        self.dirs: dict[str, tuple[bytes, bytes, str]] = {
            self.old_prefix: (r.paths.path(src), r.paths.child_path(p2, name), new_prefix)
        }
        # (old key, new key, old path, new path, new long name, HEAD result if made yet)
        self.plan: list[tuple[str, str, bytes, bytes, str | None, ObjectInfo | None]] = []
        self.copied: dict[str, str] = {}  # new key -> its ETag

    async def resolve(self, prefix: str) -> tuple[bytes, bytes, str]:
        dirs = self.dirs
        if prefix in dirs:
            return dirs[prefix]
        parent_prefix = prefix[: prefix.rstrip("/").rfind("/") + 1]
        op, np, npre = await self.resolve(parent_prefix)
        comp = prefix[len(parent_prefix) : -1]
        long_name = None
        if self.names.is_long(comp):
            info = await self.r.remote.head(prefix + MARKER)
            long_name = info.metadata.get("cfs-n") if info else None
        plain = self.names.decode(op, comp, long_name)
        ncomp, _ = self.names.encode(np, plain)
        dirs[prefix] = (join(op, plain), join(np, plain), npre + ncomp + "/")
        return dirs[prefix]

    async def target(self, key: str) -> None:
        """Where ``key`` goes: a request only for a long name (its plaintext is in the
        object's metadata), so that every new key is checked before anything is copied."""
        if key.endswith("/"):
            return  # a folder placeholder: no object (left behind, as any placeholder is)
        parent_prefix = key[: key.rfind("/") + 1]
        op, np, npre = await self.resolve(parent_prefix)
        comp = key[len(parent_prefix) :]
        info = None
        if comp == MARKER:
            opath, npath, nkey, long_name = op, np, npre + MARKER, None
            if parent_prefix != self.old_prefix:
                # a subdirectory's marker: its own (maybe long) name comes with it
                pp = parent_prefix[: parent_prefix.rstrip("/").rfind("/") + 1]
                _o, npp, _n = await self.resolve(pp)
                plain = npath.rsplit(b"/", 1)[1]
                long_name = self.names.encode(npp, plain)[1]
            else:
                long_name = self.names.encode(self.r.paths.path(self.p2), self.name)[1]
        else:
            stored_long = None
            if self.names.is_long(comp):
                info = await self.r.remote.head(key)
                if info is None:
                    return
                stored_long = info.metadata.get("cfs-n")
            plain = self.names.decode(op, comp, stored_long)
            opath, npath = join(op, plain), join(np, plain)
            ncomp, long_name = self.names.encode(np, plain)
            nkey = npre + ncomp
        self.plan.append((key, nkey, opath, npath, long_name, info))

    async def copy(
        self,
        key: str,
        nkey: str,
        opath: bytes,
        npath: bytes,
        long_name: str | None,
        info: ObjectInfo | None,
    ) -> None:
        """HEAD (the metadata is bound to the path: it is sealed again for the new one)
        and copy, one object after the other, so that HEADs and copies overlap."""
        r = self.r
        info = info or await r.remote.head(key)
        if info is None:
            return  # removed by another host since the listing
        meta = r.look.decode(opath, info)
        md = r.vol.meta.encode(npath, nkey, ObjectMeta(meta.file_id, meta.attrs, meta.dek,
                                                       long_name))  # fmt: skip
        async with r.remote.limit:
            self.copied[nkey] = await r.store.copy(key, nkey, md, if_match=info.etag,
                                                   size=info.size)  # fmt: skip
