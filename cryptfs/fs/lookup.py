"""What S3 holds, as this mount's tree: lookups, listings and revalidation of metadata.

Owns: the metadata TTL (``fresh``), turning a HEAD into a node (``adopt``: authenticated
metadata, the object's length checked against it, another writer's version replacing ours
or taking the name), looking a name up with as few requests as a directory's key set allows,
listing a directory (only new or changed entries cost a HEAD; entries made, uploaded or
moved while the LIST was in flight are not judged by it) and relisting ahead of a walk.
Must not import: other parts of ``cryptfs.fs`` but ``model``, ``paths``,
``remote``, ``namespace`` and ``foreign``.
"""

from __future__ import annotations

import contextlib
import logging

import trio

from cryptfs import lognames
from cryptfs.errors import IntegrityError, NameTooLong, NoEntry, StoreUnavailable, UnsupportedFormat
from cryptfs.format import s3ec
from cryptfs.format.meta import KIND_DIR, KIND_FILE, KIND_LINK, Attrs, ObjectMeta
from cryptfs.fs.foreign import Foreign, s3ec_envelope
from cryptfs.fs.listing import Listing
from cryptfs.fs.model import Background, Node, Options, Stat, named
from cryptfs.fs.namespace import Namespace
from cryptfs.fs.paths import Paths
from cryptfs.fs.remote import Remote
from cryptfs.store.base import ObjectInfo
from cryptfs.tasks import open_tasks
from cryptfs.volume import MARKER, Volume

log = logging.getLogger(__name__)


class Lookup:
    def __init__(
        self,
        volume: Volume,
        options: Options,
        paths: Paths,
        tree: Namespace,
        remote: Remote,
        foreign: Foreign,
        background: Background,
    ) -> None:
        self.vol = volume
        self.store = volume.store
        self.opt = options
        self.chunk = volume.chunk
        self.paths = paths
        self.tree = tree
        self.remote = remote
        self.foreign = foreign
        self.background = background
        self.relist_limit = trio.CapacityLimiter(self.opt.relist_ahead)
        self.relist_queued: set[Node] = set()

    def fresh(self, t: float) -> bool:
        return trio.current_time() - t < self.opt.metadata_ttl

    def decode(self, path: bytes, info: ObjectInfo) -> ObjectMeta:
        try:
            return self.vol.meta.decode(path, info.key, dict(info.metadata), info.modified)
        except (IntegrityError, UnsupportedFormat) as e:
            self.tree.integrity(info.key, e, path=path)
            raise

    def adopt(self, parent: Node, name: bytes, info: ObjectInfo, existing: Node | None) -> Node:
        """Create or refresh the node for ``parent/name`` from a HEAD result."""
        md = info.metadata
        if self.foreign.allowed(parent) and s3ec.is_s3ec(md) and not s3ec.needs_instruction(md):
            return self.foreign.adopt(parent, name, info, existing, s3ec.parse(md))
        if existing is not None and self.tree.in_rename(existing):
            return existing  # (the rename's copy, or the object it is moving away)
        if existing is not None and (
            existing.unlinked or existing.parent is not parent or existing.name != name
        ):
            existing = None  # removed or moved meanwhile: not the entry of this name any more
        path = self.paths.child_path(parent, name)
        meta = self.decode(path, info)
        if meta.attrs.kind != KIND_DIR:
            self.check_size(info, meta.attrs)
        if existing is not None and existing.file_id == meta.file_id and existing.dirty:
            self.attrs_only_lost(existing, info)  # (then clean: it takes their version)
        if existing is not None and existing.file_id == meta.file_id and not existing.dirty:
            node = existing
            if node.remote_etag != info.etag:
                node.cipher = None
                node.target = None
            if node.attrs != meta.attrs and node.remote_etag is not None:
                self.tree.tell_kernel_changed(node)
            node.attrs = meta.attrs
        elif existing is not None and existing.dirty:
            return existing
        else:
            if existing is not None:
                self.tree.gone_elsewhere(existing)
            node = self.tree.new_node(parent, name, meta.attrs, meta.file_id)
        node.wrapped = meta.dek
        return self.tree.seen(parent, name, node, info)

    def attrs_only_lost(self, node: Node, info: ObjectInfo) -> bool:
        """``node`` has a change of its attributes only to write (chmod, touch), and another
        writer's version of the object is here: theirs stands, as ``Uploader.attrs_lost``
        decides when the change is written; decided now, the next write starts from their
        version (each write failed with EIO while the file was open: its copy's If-Match
        named the version replaced, and the node kept it)."""
        if node.stage is not None or not node.meta_dirty or node.remote_etag == info.etag:
            return False
        if node.attrs_sending:  # our own copy in flight: its answer decides (attrs_lost)
            return False
        self.tree.attrs_dropped(node, "changed")  # (quietly for a directory's times)
        return True

    def check_size(self, info: ObjectInfo, attrs: Attrs) -> None:
        """The object's length is the one its metadata's size gives (each revision's
        lengths are one to one with sizes: FORMAT.md §2, §8.5)."""
        if info.size != self.vol.body_length(attrs):
            self.tree.integrity(info.key, f"length {info.size} does not match recorded size")
            raise IntegrityError(
                f"{info.key}: object length does not match its metadata", object_keys=(info.key,)
            )

    async def keyset(self, d: Node) -> set[str]:
        """The keys and prefixes directly below ``d`` in S3, from one LIST per metadata TTL:
        lookups in a directory never listed ask S3 only about names that exist."""
        while True:
            if d.keyset is not None and self.fresh(d.keyset_at):
                return d.keyset
            if d.keyset_loading is None:
                break
            await d.keyset_loading.wait()
            if d.keyset is not None and not self.fresh(d.keyset_at):
                return d.keyset  # just loaded (metadata TTL 0): use it once
        d.keyset_loading = trio.Event()
        try:
            listing = await self.remote.list(self.paths.dir_prefix(d), delimiter="/")
            d.keyset = {o.key for o in listing.objects} | set(listing.prefixes)
            d.keyset_at = trio.current_time()
            return d.keyset
        finally:
            d.keyset_loading.set()
            d.keyset_loading = None

    async def fetch_entry(self, parent: Node, name: bytes) -> Node | None:
        """Look ``name`` up in S3 (file object, directory marker, or implicit directory)."""
        node = await self.fetch_entry_uncached(parent, name)
        if node is not None:
            # into ``children`` even if partial (listed_at < 0): a later lookup finds it here
            self.tree.insert(parent, node)
        return node

    async def fetch_entry_uncached(self, parent: Node, name: bytes) -> Node | None:
        fkey, _ = self.paths.key_for(parent, name, KIND_FILE)
        dkey, _ = self.paths.key_for(parent, name, KIND_DIR)
        dprefix = dkey[: -len(MARKER)]
        results: dict[str, ObjectInfo | None] = {}
        keys = await self.keyset(parent)
        if parent.forgotten and name in parent.forgotten:
            keys = keys | {fkey, dprefix}  # (evicted, so it exists, whatever a LIST said)

        async def one(k: str) -> None:
            results[k] = await self.remote.head(k)

        # an object of the AWS S3 Encryption Client keeps its own (plaintext) key name
        raw = None
        if (
            self.opt.show_foreign
            and parent.raw_prefix is None
            and self.vol.config.encrypt_names
            and b"/" not in name
        ):
            raw = self.paths.dir_prefix(parent) + name.decode(errors="surrogateescape")

        # only what the directory's listing (as of the metadata TTL) says exists is asked for
        heads = [k for k in (fkey, raw) if k is not None and k in keys]
        if dprefix in keys:
            heads.append(dkey)
        if not heads and not (raw is not None and raw + "/" in keys):
            return None
        async with open_tasks() as n:
            for k in heads:
                n.start_soon(one, k)
        existing = parent.children.get(name) if parent.children is not None else None
        info = results.get(fkey) or results.get(dkey)
        if info is not None:
            if "cfs" not in info.metadata and self.foreign.allowed(parent) and info.key == fkey:
                env = await s3ec_envelope(self.store, fkey, info.metadata, None)
                if env is not None:
                    return self.foreign.adopt(parent, name, info, existing, env)
                if s3ec.is_instruction_key(fkey):
                    return None  # part of its object, as in listings
            return self.adopt(parent, name, info, existing)
        found = results.get(raw) if raw is not None else None
        if found is not None and raw is not None and "cfs" not in found.metadata:
            env = await s3ec_envelope(self.store, raw, found.metadata, None)
            if env is not None:
                return self.foreign.adopt(parent, name, found, existing, env)
        if dprefix in keys and await self.remote.implicit_dir(dprefix):
            node = existing if existing is not None and existing.is_dir else None
            return node or self.tree.synthetic_dir(parent, name)
        if raw is not None and raw + "/" in keys and await self.foreign.prefix(raw + "/"):
            return self.tree.synthetic_dir(parent, name, raw_prefix=raw + "/")
        return None

    async def refresh(self, node: Node) -> None:
        """Revalidate a clean node's attributes after the metadata TTL (other writers).

        When S3 cannot be reached the cached attributes are served (stale, as an NFS client
        would): a ``stat`` or the path walk of a writer must not fail during an outage that
        its writes, staged locally, do not even notice.  Reads of data still fail with EIO.
        """
        if node.parent is None or node.dirty or self.fresh(node.refreshed_at):
            return
        if node.remote_etag is None:
            return
        try:
            await self.revalidate(node)
        except StoreUnavailable as e:
            log.info("S3 unreachable, serving cached attributes of %s: %s",
                     self.paths.ident(node), self.paths.scrub(e))  # fmt: skip

    async def revalidate(self, node: Node) -> None:
        parent = node.parent
        assert parent is not None
        if self.tree.in_rename(node):
            return  # its objects are being moved by this mount: what S3 shows is ours
        if node.unlinked:
            # its name is another node's now, or nobody's: nothing to ask S3, and an open
            # file's fstat gets the attributes it had (as a file removed here keeps them)
            return
        if parent.children is not None and parent.listed_at >= 0:
            # one LIST revalidates every unchanged entry of the directory (by ETag): an
            # rsync or find over many files costs a LIST per directory, not a HEAD per file
            if not self.fresh(parent.listed_at):
                await self.readdir(parent.ino)
            if node.unlinked:
                raise NoEntry("file was removed by another writer")
            if self.fresh(node.refreshed_at) or node.is_dir:
                return
        key, _ = self.paths.object_key(node)
        info = await self.remote.head(key)
        if info is None:
            if node.open_count == 0 and node.stage is None and not node.is_dir:
                if node.meta_dirty:  # (theirs stands, as Uploader.attrs_lost decides)
                    self.tree.attrs_dropped(node, "removed")
                self.tree.gone_elsewhere(node)
                raise NoEntry("file was removed by another writer")
            return
        if not self.tree.same_version(node, info.etag, info.modified):
            if node.foreign is not None:
                env = await s3ec_envelope(self.store, key, info.metadata, None)
                if env is None:
                    raise NoEntry("no longer an S3 Encryption Client object")
                self.foreign.adopt(parent, node.name, info, node, env)
            else:
                self.adopt(parent, node.name, info, node)
        node.refreshed_at = trio.current_time()

    async def lookup(self, parent_ino: int, name: bytes) -> Node:
        parent = self.tree.node(parent_ino)
        self.tree.check_parent(parent)
        if name == b".":
            return parent
        if name == b"..":
            return parent.parent or parent
        if len(name) > 255:
            raise NameTooLong("name longer than 255 bytes")
        node = await self.find(parent, name)
        if node is None:
            raise named(NoEntry, name)
        return node

    async def find(self, parent: Node, name: bytes) -> Node | None:
        if parent.ahead:
            self.walked_into(parent)
        if (
            parent.listed_at < 0
            and parent.keyset is not None
            and 0 < len(parent.keyset) <= self.opt.list_ahead_max
            and (parent.children is None or name not in parent.children)
        ):
            # a second name looked up in a directory never listed (rsync, find, ls -l,
            # cat *): list it whole, its entries' HEADs in parallel, instead of one HEAD
            # after the other for each name the program asks for
            with contextlib.suppress(StoreUnavailable):
                await self.readdir(parent.ino)
        children = parent.children
        if children is not None:
            node = children.get(name)
            if node is not None:
                await self.refresh(node)
                return node if not node.unlinked else None
            if self.fresh(parent.listed_at):
                return None
            try:
                if parent.listed_at >= 0:
                    # we knew the whole directory once: one LIST refreshes it (HEADs only
                    # for entries that changed) instead of requests per missing name
                    await self.readdir(parent.ino)
                    node = (parent.children or {}).get(name)
                    return node if node is not None and not node.unlinked else None
                return await self.fetch_entry(parent, name)
            except StoreUnavailable as e:
                if parent.forgotten and name in parent.forgotten:
                    raise  # (known to exist, evicted: EIO, as for any entry S3 must give)
                # S3 is down: a name this mount does not know is taken as absent, so that
                # writers carry on (staged); should another host have created it meanwhile,
                # the upload's If-None-Match keeps both versions (a conflict copy)
                log.info("S3 unreachable, entry %s of %s taken as absent: %s", lognames.name(name),
                         self.paths.ident(parent), self.paths.scrub(e))  # fmt: skip
                return None
        return await self.fetch_entry(parent, name)

    async def readdir(self, ino: int) -> list[tuple[bytes, Node]]:
        """All entries of a directory with fresh attributes (concurrent HEADs, bounded)."""
        return await self.listed(self.tree.node(ino))

    async def listed(self, d: Node, walker: bool = True) -> list[tuple[bytes, Node]]:
        """``readdir`` of ``d``: by a ``walker`` (a program), or relisting ahead of one.

        One LIST per directory at a time: a walker that arrives while the directory is being
        relisted (ahead of it) waits for that LIST instead of sending its own."""
        self.tree.check_parent(d)
        while d.relisting is not None:
            await d.relisting.wait()
        if d.children is not None and self.fresh(d.listed_at):
            if walker:
                self.walked_into(d)
            return sorted(d.children.items())
        d.relisting = trio.Event()
        try:
            entries = await self.list_dir(d)
        finally:
            d.relisting.set()
            d.relisting = None
        if walker:
            self.relist_ahead(d)
        else:
            d.ahead = True
        return entries

    def walked_into(self, d: Node) -> None:
        """A walker uses ``d``, which was relisted ahead of it: move the horizon on."""
        if d.ahead:
            d.ahead = False
            self.relist_ahead(d)

    def relist_ahead(self, d: Node) -> None:
        """After the metadata TTL, a directory relisted is likely being walked again (rsync,
        find, du): relist the directories below it that were listed before, in parallel and
        in the background, so the walk finds them fresh instead of waiting for one LIST
        each in turn.

        ``relist_ahead_depth`` levels below ``d``, in the order a walk meets them (sorted,
        depth first).  Each directory relisted ahead is marked; when the walk enters it,
        the horizon moves on below it, so a walk of any depth stays ahead of its LISTs
        while a look at one directory relists only the few levels under it."""
        nursery = self.background.nursery
        if nursery is None or not d.children or self.opt.metadata_ttl <= 0:
            return  # (a TTL of 0: nothing relisted ahead would still be fresh for the walk)
        budget = [self.opt.relist_ahead_max]

        def visit(node: Node, level: int) -> None:
            for _, child in sorted((node.children or {}).items()):
                if budget[0] <= 0:
                    return
                if (
                    not child.is_dir
                    or child.children is None
                    or child.listed_at < 0
                    or child.raw_prefix is not None
                    or child.unlinked
                ):
                    continue
                budget[0] -= 1
                if child.relisting is not None:
                    pass  # being listed: that sets its horizon
                elif self.fresh(child.listed_at):
                    child.ahead = True
                elif child not in self.relist_queued:
                    self.relist_queued.add(child)
                    nursery.start_soon(self.relist_in_background, child)
                if level + 1 < self.opt.relist_ahead_depth:
                    visit(child, level + 1)  # (its children as known so far)

        visit(d, 0)

    async def relist_in_background(self, d: Node) -> None:
        try:
            async with self.relist_limit:
                if not d.unlinked and not d.evicted and not self.fresh(d.listed_at):
                    await self.listed(d, walker=False)
        except Exception as e:  # the walker lists it itself and reports what fails
            log.debug("relisting %s ahead failed: %s", self.paths.ident(d), self.paths.scrub(e))
        finally:
            self.relist_queued.discard(d)

    async def list_dir(self, d: Node) -> list[tuple[bytes, Node]]:
        """One LIST of ``d``, merged into what this mount knows of it (``Listing``)."""
        listing = Listing(d, self.vol, self.paths, self.tree, self.remote, self.foreign, self.adopt)
        return await listing.run()

    async def look_again(self, node: Node) -> None:
        """Ask S3 about ``node`` now, whatever its freshness: another writer replaced its
        object since this mount looked (a request's If-Match failed).  Removed meanwhile:
        ``node`` is unlinked, no error."""
        node.refreshed_at = -1e18
        with contextlib.suppress(NoEntry):
            await self.revalidate(node)

    def stat(self, node: Node) -> Stat:
        a = node.attrs
        size = node.stage.size if node.stage is not None else a.size
        if node.kind == KIND_LINK and node.target is not None:
            size = len(node.target)
        return Stat(
            ino=node.ino,
            mode=a.st_mode,
            nlink=node.nlink,
            uid=a.uid,
            gid=a.gid,
            size=size,
            atime_ns=a.atime_ns,
            mtime_ns=a.mtime_ns,
            ctime_ns=a.ctime_ns,
            blksize=self.chunk,
            ttl=self.kernel_ttl(node),
            rdev=a.rdev,
        )

    def kernel_ttl(self, node: Node) -> float:
        """How long the kernel may answer for ``node`` itself: for as long as this cache
        would, without asking S3 (``refresh``), and no longer, so that the kernel's copy is
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
