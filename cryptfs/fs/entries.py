"""Entries made and removed: directories, symbolic links, special files (FIFOs, sockets,
devices), new files, unlink and rmdir.

Owns: creating an entry without replacing one another host made meanwhile (If-None-Match on
its object or marker), the root's marker on a fresh volume, reading a link's target,
removing an entry (an open file keeps its content readable until it is released) and what
makes a directory empty enough to remove (nothing below its prefix but its marker).
Must not import: other parts of ``cryptfs.fs`` but ``model``, ``paths``,
``remote``, ``namespace``, ``lookup``, ``fetch``, ``staged`` and ``upload``.
"""

from __future__ import annotations

import os
import stat

import trio

from cryptfs.cache.staging import StagingArea
from cryptfs.crypto import random_bytes
from cryptfs.errors import (
    Exists,
    Invalid,
    IsDir,
    NameTooLong,
    NoEntry,
    NotDir,
    NotEmpty,
    PreconditionFailed,
    ReadOnly,
)
from cryptfs.format.meta import (
    DEVICE_KINDS,
    KIND_DIR,
    KIND_FILE,
    KIND_LINK,
    KIND_OF_TYPE,
    SPECIAL_KINDS,
    Attrs,
)
from cryptfs.fs.fetch import Fetcher
from cryptfs.fs.lookup import Lookup
from cryptfs.fs.model import SYMLINK_MAX, Node, Options, named, now_ns
from cryptfs.fs.namespace import Namespace
from cryptfs.fs.paths import Paths
from cryptfs.fs.remote import Remote
from cryptfs.fs.staged import Staged
from cryptfs.fs.upload import Uploader
from cryptfs.volume import MARKER, Volume


def _kernel_strips_sgid() -> bool:
    """Linux >= 6.0 clears a new file's set-group-ID bit itself (``mode_strip_sgid``) when
    its maker is not in the directory's group, knowing all of the maker's groups."""
    try:
        major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (6, 0)


_STRIP_SGID = not _kernel_strips_sgid()


class Entries:
    def __init__(
        self,
        volume: Volume,
        options: Options,
        staging: StagingArea,
        paths: Paths,
        tree: Namespace,
        remote: Remote,
        look: Lookup,
        fetch: Fetcher,
        staged: Staged,
        upload: Uploader,
    ) -> None:
        self.vol = volume
        self.store = volume.store
        self.opt = options
        self.staging = staging
        self.paths = paths
        self.tree = tree
        self.remote = remote
        self.look = look
        self.fetch = fetch
        self.staged = staged
        self.upload = upload

    def new_attrs(
        self, parent: Node, kind: str, mode: int, uid: int, gid: int, rdev: int = 0
    ) -> Attrs:
        """A new entry's attributes.  In a set-group-ID directory it takes the directory's
        group, and a new subdirectory the bit too (as Linux does for a local file system; a
        FUSE file system must do it itself: the kernel hands it the caller's group)."""
        now = now_ns()
        mode &= 0o7777
        if parent.attrs.mode & stat.S_ISGID:
            if kind == KIND_DIR:
                mode |= stat.S_ISGID
            elif _STRIP_SGID and gid != parent.attrs.gid and uid != 0 and mode & stat.S_IXGRP:
                # a file that would run as a group its maker is not in: what Linux strips
                # itself before a FUSE file system sees the mode since 6.0; before it, here
                # (the maker's other groups are not known: a member through one loses it)
                mode &= ~stat.S_ISGID
            gid = parent.attrs.gid
        return Attrs(kind, mode, uid, gid, now, now, now, rdev=rdev)

    async def require_absent(self, parent: Node, name: bytes) -> None:
        self.tree.check_parent(parent)
        if await self.look.find(parent, name) is not None:
            raise named(Exists, name)

    async def mkdir(self, parent_ino: int, name: bytes, mode: int, uid: int, gid: int) -> Node:
        parent = self.tree.node(parent_ino)
        self.tree.writable(parent)
        async with self.tree.lock.shared():
            await self.require_absent(parent, name)
            node = self.tree.new_node(
                parent, name, self.new_attrs(parent, KIND_DIR, mode, uid, gid), random_bytes(16)
            )
            try:
                await self.upload.put_marker(node, create=True)
            except PreconditionFailed:
                self.tree.inodes.pop(node.ino, None)
                raise named(Exists, name) from None
            except BaseException:
                self.tree.inodes.pop(node.ino, None)
                raise
            node.children = {}
            node.listed_at = trio.current_time()
            self.tree.insert(parent, node)
            self.tree.entries_changed(parent)
            return node

    async def ensure_root(self) -> None:
        """Load (or create, on a fresh volume) the root directory's marker."""
        info = await self.remote.head(MARKER)
        if info is None:
            try:
                await self.upload.put_marker(self.tree.root, create=True)
                return
            except PreconditionFailed:  # another mount of a new volume made it first
                info = await self.remote.head(MARKER)
                if info is None:
                    raise
        meta = self.look.decode(b"/", info)
        self.tree.root.attrs = meta.attrs
        self.tree.root.file_id = meta.file_id
        self.tree.root.remote_etag = info.etag
        self.tree.root.refreshed_at = trio.current_time()

    async def symlink(
        self, parent_ino: int, name: bytes, target: bytes, uid: int, gid: int
    ) -> Node:
        if len(target) > SYMLINK_MAX:
            raise NameTooLong("symlink target too long")
        parent = self.tree.node(parent_ino)
        self.tree.writable(parent)
        async with self.tree.lock.shared():
            await self.require_absent(parent, name)
            attrs = self.new_attrs(parent, KIND_LINK, 0o777, uid, gid)
            return await self.put_entry(parent, name, attrs, target)

    async def special(
        self, parent_ino: int, name: bytes, mode: int, rdev: int, uid: int, gid: int
    ) -> Node:
        """A FIFO, socket or device node (``mknod``): an object like a symlink's with an
        empty body, its type (and a device's number) in its sealed attributes.  The kernel
        opens such a file itself: no read or write of it ever reaches this file system."""
        kind = KIND_OF_TYPE.get(stat.S_IFMT(mode))
        if kind not in SPECIAL_KINDS:
            raise Invalid("mknod: not a FIFO, socket or device")
        parent = self.tree.node(parent_ino)
        self.tree.writable(parent)
        async with self.tree.lock.shared():
            await self.require_absent(parent, name)
            dev = rdev if kind in DEVICE_KINDS else 0
            attrs = self.new_attrs(parent, kind, mode, uid, gid, dev)
            return await self.put_entry(parent, name, attrs, b"")

    async def put_entry(self, parent: Node, name: bytes, attrs: Attrs, body: bytes) -> Node:
        """A new entry whose whole content is ``body`` (a symlink's target, nothing for a
        special file), uploaded now, If-None-Match: another host's entry is never replaced."""
        node = self.tree.new_node(parent, name, attrs, random_bytes(16))
        if attrs.kind == KIND_LINK:
            node.target = body
        key, long_name = self.paths.object_key(node)
        try:
            async with node.lock:
                try:
                    res = await self.upload.put_body(
                        node, body, key, self.paths.path(node), long_name, expect=None
                    )
                except PreconditionFailed:
                    raise named(Exists, name) from None
                self.upload.uploaded(node, *res)
        except BaseException:
            self.tree.inodes.pop(node.ino, None)
            raise
        self.tree.insert(parent, node)
        self.tree.entries_changed(parent)
        return node

    async def readlink(self, ino: int) -> bytes:
        node = self.tree.node(ino)
        if node.kind != KIND_LINK:
            raise Invalid("not a symlink")
        if node.target is None:
            if node.stage is not None:
                node.target = node.stage.read(0, node.stage.size)
            else:
                node.target = await self.fetch.read_remote(node, 0, node.attrs.size, None)
        return node.target

    async def new_file(self, parent_ino: int, name: bytes, mode: int, uid: int, gid: int) -> Node:
        """A new, empty file ``name`` in ``parent_ino``: staged, its first upload due when
        it is closed (If-None-Match: another host's file of that name is never replaced)."""
        parent = self.tree.node(parent_ino)
        self.tree.check_parent(parent)
        self.tree.writable(parent)
        # the name is validated (and the key too long: ENAMETOOLONG) before anything else;
        # the key is kept for the upload, unless a rename changes the names meanwhile
        gen = self.paths.gen
        key, long_name = self.paths.key_for(parent, name, KIND_FILE)
        await self.require_absent(parent, name)
        fid = random_bytes(16)
        node = self.tree.new_node(
            parent, name, self.new_attrs(parent, KIND_FILE, mode, uid, gid), fid
        )
        if self.vol.keyring.stale is not None:
            raise ReadOnly(self.vol.keyring.stale)
        if gen == self.paths.gen:
            node.key_memo = (gen, KIND_FILE, key, long_name)
        node.stage = self.staging.create(fid)
        node.change += 1
        self.tree.insert(parent, node)
        self.tree.entries_changed(parent)
        return node

    async def keep_for_open_handles(self, node: Node) -> None:
        """An unlinked file that is still open keeps its content readable until released
        (staged whole: the version a staged file of only what was written reads from may be
        removed with its last name by a lifecycle rule)."""
        staged_whole = node.stage is not None and node.stage.fill is None
        if node.open_count and not staged_whole and node.kind == KIND_FILE:
            await self.staged.materialize(node, whole=True)

    async def unlink(self, parent_ino: int, name: bytes) -> None:
        parent = self.tree.node(parent_ino)
        node = await self.look.find(parent, name)
        if node is None:
            raise named(NoEntry, name)
        self.tree.writable(node)
        if node.is_dir:
            raise IsDir("is a directory")
        async with node.lock, self.tree.lock.shared():  # (node locks before ns)
            if node.unlinked or node.parent is not parent or node.name != name:
                raise named(NoEntry, name)  # (removed or moved while we waited)
            await self.keep_for_open_handles(node)
            await self.delete_remote(node)
            self.tree.detach(node)
            self.tree.entries_changed(parent)
            if node.stage is not None and node.open_count == 0:
                node.stage.remove()
                node.stage = None

    async def delete_remote(self, node: Node) -> None:
        if node.remote_etag is not None:
            key, _ = self.paths.object_key(node)
            await self.store.delete(key)
            node.remote_etag = None

    async def rmdir(self, parent_ino: int, name: bytes) -> None:
        parent = self.tree.node(parent_ino)
        node = await self.look.find(parent, name)
        if node is None:
            raise named(NoEntry, name)
        self.tree.writable(node)
        if not node.is_dir:
            raise NotDir("not a directory")
        async with node.lock, self.tree.lock.shared():  # (node locks before ns)
            if node.unlinked or node.parent is not parent or node.name != name:
                raise named(NoEntry, name)  # (removed or moved while we waited)
            await self.check_empty(node)
            await self.delete_remote(node)
            self.tree.detach(node)
            self.tree.entries_changed(parent)

    async def check_empty(self, d: Node) -> None:
        if d.children and any(not c.unlinked for c in d.children.values()):
            raise NotEmpty("directory not empty")
        prefix = self.paths.dir_prefix(d)
        # one page of keys, not the whole subtree (listing it made rmdir of a big tree's root
        # cost a LIST of the tree): any object but the marker is enough
        if await self.remote.has_objects(prefix, but=(prefix + MARKER,)):
            raise NotEmpty("directory not empty")
