"""The inode table: the nodes this mount knows of the bucket's tree, and their lifecycle.

Owns: inode numbers, the root, the ``ns`` lock (docs/CONCURRENCY.md: node locks before it),
the kernel's references to nodes (lookup counts: ``looked_up`` when a reply names a node,
``forget`` when the kernel drops it) and the kernel notifications when another writer changed
an entry, moving and removing nodes, eviction of what the kernel forgot (memory bounded by
what the kernel caches), and the integrity log (what did not authenticate, for fsck).
Must not import: ``cryptfs.store`` (but its ``ObjectInfo`` type); other parts of
``cryptfs.fs`` but ``model``, ``paths`` and ``locks``.  Other parts learn of a node leaving
through the ``on_evict`` / ``on_detach`` hooks (to drop what they keep pending for it), of a
directory whose times its entries changed through ``on_dir_times``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import trio

from cryptfs.crypto import random_bytes
from cryptfs.errors import CryptfsError, NoEntry, NotDir, ReadOnly
from cryptfs.format.meta import KIND_DIR, Attrs
from cryptfs.fs.locks import RWLock
from cryptfs.fs.model import ROOT_INO, KernelCache, Node, now_ns
from cryptfs.fs.paths import Paths
from cryptfs.store.base import ObjectInfo

log = logging.getLogger(__name__)


def _nothing(node: Node) -> None:
    pass


class Namespace:
    def __init__(self, paths: Paths, uid: int, gid: int) -> None:
        self.paths = paths
        self.uid, self.gid = uid, gid  # owner of directories no marker describes
        now = now_ns()
        root_attrs = Attrs(KIND_DIR, 0o755, uid, gid, now, now, now)
        self.lock = RWLock()  # ``ns``: shared by entry changes, exclusive for directory moves
        self.root = Node(ROOT_INO, None, b"", root_attrs, bytes(16))
        self.root.children = {}
        self.inodes: dict[int, Node] = {ROOT_INO: self.root}
        self.next_ino = ROOT_INO + 1
        self.kernel: KernelCache | None = None  # set by the FUSE layer
        self.integrity_failures = 0
        self.integrity_log: list[tuple[str, str]] = []  # (object key, reason), for fsck
        self.conflicts = 0  # changes of ours another writer's won over (kept as copies, or lost)
        # what other parts keep for a node that left the table: an evicted one (clean), a
        # removed one
        self.on_evict: Callable[[Node], None] = _nothing
        self.on_detach: Callable[[Node], None] = _nothing
        # a directory's times changed with its entries: its marker is due (write-back)
        self.on_dir_times: Callable[[Node], None] = _nothing

    def entries_changed(self, *dirs: Node) -> None:
        """An entry of each of ``dirs`` was created, removed or renamed: its mtime and ctime
        are now (POSIX).  Its marker carries them to S3 when the write-back service gets to
        it, at most one write per directory per write-back delay however many entries
        change (``on_dir_times``), and at unmount.  A directory without a marker (made by
        another tool: implicit) or of S3EC objects keeps its new times in memory only."""
        now = now_ns()
        for d in dict.fromkeys(dirs):  # (one rename within a directory names it twice)
            if d.unlinked:
                continue
            d.attrs = d.attrs.with_(mtime_ns=now, ctime_ns=now)
            d.change += 1
            if d.remote_etag is None or d.raw_prefix is not None:
                continue
            if not d.meta_dirty:
                d.meta_dirty = True
                d.times_only = True  # (an explicit change of its attributes clears it)
            self.on_dir_times(d)

    def new_node(self, parent: Node, name: bytes, attrs: Attrs, file_id: bytes) -> Node:
        node = Node(self.next_ino, parent, name, attrs, file_id)
        self.next_ino += 1
        self.inodes[node.ino] = node
        if attrs.kind == KIND_DIR:
            node.children = None
        return node

    def node(self, ino: int) -> Node:
        try:
            return self.inodes[ino]
        except KeyError:
            raise NoEntry(f"stale inode {ino}") from None

    def forget(self, items: Iterable[tuple[int, int]]) -> None:
        for ino, n in items:
            node = self.inodes.get(ino)
            if node is None or ino == ROOT_INO:
                continue
            node.lookups = max(0, node.lookups - n)
            self.maybe_drop(node)
            if node.lookups == 0 and not node.unlinked:
                self.evict(node)

    def current_entry(self, node: Node) -> Node | None:
        """What a reply about ``node`` (held since before an await: a readdir's listing, a
        lookup in flight) should name now: ``node``; or, if it was evicted meanwhile, the
        node its name has now (None if the name was removed since)."""
        if not node.evicted:
            return None if node.unlinked else node
        parent = node.parent
        assert parent is not None
        cur = parent.children.get(node.name) if parent.children is not None else None
        if cur is not None:
            return None if cur.unlinked else cur
        if parent.forgotten and node.name in parent.forgotten:
            return node  # (evicted, nothing happened to the name since)
        return None

    def looked_up(self, node: Node) -> Node:
        """The kernel takes a reference to ``node`` (a lookup, a readdir entry, a create);
        returns the node to name in the reply.  An evicted node (looked up before its
        eviction) is replaced by the node its name has now, or put back in the inode table
        (and, if nothing happened to its name since, in its directory), so that the kernel's
        inode number keeps working; a removed one is put back as removed."""
        if node.evicted:
            node = self.current_entry(node) or node
        node.lookups += 1
        if node.evicted:
            node.evicted = False
            self.inodes[node.ino] = node
            parent = node.parent
            assert parent is not None
            if parent.forgotten and node.name in parent.forgotten:
                parent.forgotten.discard(node.name)
                if parent.children is not None:
                    parent.children.setdefault(node.name, node)
            else:
                node.unlinked = True  # its name was removed (or taken) since
        return node

    @staticmethod
    def in_rename(node: Node) -> bool:
        """Is ``node``, or a directory above it, being renamed by this mount (what S3 shows
        of its objects meanwhile is the rename's doing)?"""
        n: Node | None = node
        while n is not None:
            if n.renaming:
                return True
            n = n.parent
        return False

    def holds_local(self, d: Node) -> bool:
        """Is anything below directory ``d`` known here only (dirty, or open)?"""
        stack = list((d.children or {}).values())
        while stack:
            n = stack.pop()
            if n.unlinked:
                continue
            if n.dirty or n.open_count:
                return True
            stack.extend((n.children or {}).values())
        return False

    def evictable(self, node: Node) -> bool:
        return (
            node.lookups == 0
            and node.open_count == 0
            and not node.dirty
            and not node.renaming
            and not node.lock.locked()
            and node.parent is not None
            and not node.inflight
            and node.materializing is None
            and node.relisting is None
            and node.keyset_loading is None
            and node.plain is None
        )

    def evict(self, node: Node) -> None:
        """The kernel forgot a clean node: drop it, and the entries below it no one holds,
        so that memory is bounded by what the kernel caches, not by every name ever walked
        (a node each, for the life of the mount, before).  Its directory's listing is then
        incomplete (relisted when next needed); a name looked up again gets a new node."""
        if not self.evictable(node):
            return
        if node.children:
            for child in list(node.children.values()):
                if child.lookups == 0:
                    self.evict(child)  # (entries listed here the kernel never took)
            if node.children:
                return  # something below is still referenced
        node.evicted = True
        self.inodes.pop(node.ino, None)
        parent = node.parent
        assert parent is not None
        if parent.children is not None and parent.children.get(node.name) is node:
            del parent.children[node.name]
            parent.listed_at = -1.0
            parent.sorted_names = None
            if parent.forgotten is None:
                parent.forgotten = set()
            parent.forgotten.add(node.name)
        self.on_evict(node)  # (clean: an upload due is nothing to do)
        if parent.lookups == 0 and not parent.children and parent.parent is not None:
            self.evict(parent)  # (forgotten before the last entry below it was)

    def maybe_drop(self, node: Node) -> None:
        if node.lookups == 0 and node.open_count == 0 and node.unlinked:
            self.inodes.pop(node.ino, None)
            if node.stage is not None:
                node.stage.remove()
                node.stage = None

    def detach(self, node: Node) -> None:
        """Remove from its parent's entries; forget when the kernel has no reference."""
        if node.parent is not None and node.parent.children is not None:
            cur = node.parent.children.get(node.name)
            if cur is node:
                del node.parent.children[node.name]
        node.unlinked = True
        self.on_detach(node)  # (no upload due)
        if node.stage is not None:
            node.stage.drop_journal()  # a crash must not resurrect a removed file
        self.maybe_drop(node)

    def integrity(
        self,
        key: str,
        why: str | CryptfsError,
        node: Node | None = None,
        *,
        path: bytes | None = None,
    ) -> None:
        """Count and log that object ``key`` (of ``node``, or at ``path``) does not
        authenticate; ``integrity_log`` keeps the key and the whole reason, for fsck."""
        self.integrity_failures += 1
        if len(self.integrity_log) < 10_000:
            self.integrity_log.append((key, str(why)))
        who = self.paths.ident(node) if node is not None else self.paths.key_ident(key, path)
        text = why if isinstance(why, str) else self.paths.scrub(why)
        log.error("integrity failure: %s: %s", who, text)

    def attrs_dropped(self, node: Node, how: str) -> None:
        """Another writer ``how`` ("changed", "removed") ``node``'s object while this mount
        had a change of its attributes only to write: theirs stands (counted, warned; a
        directory's times its entries changed, and nothing else: theirs stand, quietly)."""
        if node.only_times_pending:
            log.info("%s was %s by another writer; its times from here are not written",
                     self.paths.ident(node), how)  # fmt: skip
            node.meta_dirty = False
            return
        self.conflicts += 1
        log.warning(
            "conflict: %s was %s by another writer; this host's change of its attributes"
            " (mode, owner, times) is dropped",
            self.paths.ident(node),
            how,
        )
        node.meta_dirty = False

    def tell_kernel_changed(self, node: Node) -> None:
        if self.kernel is not None:
            self.kernel.attrs_changed(node.ino)

    def gone_elsewhere(self, node: Node) -> None:
        """Another writer removed or replaced ``node``: forget it, and tell the kernel."""
        if self.in_rename(node):
            return  # our own rename removed the object it was looked for at
        parent = node.parent
        if self.kernel is not None and parent is not None and not node.unlinked:
            self.kernel.entry_gone(parent.ino, node.name)
        self.detach(node)

    def seen(self, parent: Node, name: bytes, node: Node, info: ObjectInfo) -> Node:
        """``node`` now holds the version ``info`` of ``parent/name`` that S3 just showed."""
        node.remote_etag = info.etag
        node.remote_modified, node.modified_etag = info.modified, info.etag
        node.refreshed_at = trio.current_time()
        if parent.children is not None:
            parent.children[name] = node
        return node

    @staticmethod
    def same_version(node: Node, etag: str, modified: float) -> bool:
        """Is (ETag, Last-Modified) seen in S3 the version ``node`` holds?  The first sight of
        an object we wrote ourselves (Last-Modified not known yet) is taken as ours."""
        if node.remote_etag != etag:
            return False
        if node.modified_etag != etag or not node.remote_modified or not modified:
            node.remote_modified, node.modified_etag = modified, etag
            return True
        return node.remote_modified == modified

    @staticmethod
    def writable(node: Node) -> None:
        if node.foreign is not None or node.raw_prefix is not None:
            raise ReadOnly("objects of the AWS S3 Encryption Client are read-only here")

    def check_parent(self, parent: Node) -> None:
        if not parent.is_dir:
            raise NotDir("not a directory")
        if parent.unlinked:
            raise NoEntry("directory was removed")

    def insert(self, parent: Node, node: Node) -> None:
        if parent.children is None:
            parent.children = {}
        parent.children[node.name] = node
        if parent.forgotten:
            parent.forgotten.discard(node.name)

    def move(self, node: Node, parent: Node, name: bytes) -> None:
        assert node.parent is not None
        if node.parent.children is not None and node.parent.children.get(node.name) is node:
            del node.parent.children[node.name]
        node.parent = parent
        node.name = name
        if node.is_dir:
            self.paths.moved_dir()  # every memoised key below a moved directory is stale
        else:
            node.key_memo = None
        self.insert(parent, node)
        node.attrs = node.attrs.with_(ctime_ns=now_ns())

    def synthetic_dir(self, parent: Node, name: bytes, raw_prefix: str | None = None) -> Node:
        """A directory no marker describes (an implicit one, or a prefix of S3EC objects)."""
        now = now_ns()
        if parent.raw_prefix is not None and raw_prefix is None:
            raw_prefix = parent.raw_prefix + name.decode(errors="surrogateescape") + "/"
        mode = 0o755 if raw_prefix is None else 0o555
        attrs = Attrs(KIND_DIR, mode, self.uid, self.gid, now, now, now)
        node = self.new_node(parent, name, attrs, random_bytes(16))
        node.raw_prefix = raw_prefix
        node.refreshed_at = trio.current_time()
        return node
