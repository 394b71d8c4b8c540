"""One LIST of a directory, merged into what this mount knows of it.

Owns: which listed keys are entries (a folder placeholder ``X/`` is a prefix, the volume's
config and the directory's own marker are none), which need a HEAD (only entries new to this
mount or changed since: by ETag and Last-Modified), S3 Encryption Client objects beside
native ones (a native name always wins), and the merge: entries made, uploaded or moved while
the LIST was in flight are not judged by it (issue 18.2), dirty ones are kept for their
upload to decide, and what is gone from S3 and clean is gone here.
Must not import: other parts of ``cryptfs.fs`` but ``model``, ``paths``,
``remote``, ``namespace`` and ``foreign``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import trio

from cryptfs.errors import IntegrityError, UnsupportedFormat
from cryptfs.format import s3ec
from cryptfs.format.volume import CONFIG_NAME
from cryptfs.fs.foreign import Foreign
from cryptfs.fs.model import Node
from cryptfs.fs.namespace import Namespace
from cryptfs.fs.paths import Paths
from cryptfs.fs.remote import Remote
from cryptfs.store.base import Listing as S3Listing
from cryptfs.store.base import ObjectInfo
from cryptfs.tasks import open_tasks
from cryptfs.volume import MARKER, Volume

log = logging.getLogger(__name__)

# (key component, object key, ETag or None for a prefix, Last-Modified)
Item = tuple[str, str, str | None, float]
Adopt = Callable[[Node, bytes, ObjectInfo, Node | None], Node]


class Listing:
    """Directory ``d`` listed once: made before the LIST is sent (what this mount knew
    then), ``plan``-ned from its answer, ``load``-ed, then ``merge``-d into ``d``."""

    def __init__(
        self,
        d: Node,
        volume: Volume,
        paths: Paths,
        tree: Namespace,
        remote: Remote,
        foreign: Foreign,
        adopt: Adopt,
    ) -> None:
        self.d = d
        self.vol = volume
        self.paths = paths
        self.tree = tree
        self.remote = remote
        self.foreign = foreign
        self.adopt = adopt
        self.prefix = paths.dir_prefix(d)
        # what this mount knew before the LIST: an entry whose version changed while it was
        # in flight (its first upload, say) cannot be judged by it (issue 18.2)
        self.old = dict(d.children or {})
        self.before = {name: node.remote_etag for name, node in self.old.items()}
        self.during: dict[bytes, Node] = {}
        self.new: dict[bytes, Node] = {}
        self.foreign_found: dict[bytes, Node] = {}  # S3EC entries: merged after, a native wins
        # directories found by their prefix: merged after, a file of the same name wins
        self.from_prefix: dict[bytes, Node] = {}
        self.decoded: dict[str, bytes] = {}  # object key -> its name, decrypted once
        self.known: dict[str, Node] = {}
        self.here: set[str] = set()
        self.own_marker: ObjectInfo | None = None
        self.dpath = b""
        self.gen = 0

    async def run(self) -> list[tuple[bytes, Node]]:
        listing = await self.remote.list(self.prefix, delimiter="/")
        todo = [item for item in self.plan(listing) if not self.unchanged(*item)]
        async with open_tasks() as n:
            for item in todo:
                n.start_soon(self.load, *item)
        self.merge_dirs()
        self.merge_foreign()
        await self.own_attributes()
        return self.merge()

    def plan(self, listing: S3Listing) -> list[Item]:
        """The entries of the LIST's answer, as (component, key, ETag, Last-Modified)."""
        d, prefix = self.d, self.prefix
        # entries made or moved here while the LIST was in flight (before the HEADs below,
        # which put what they load into d.children)
        self.during = {n: c for n, c in (d.children or {}).items() if self.old.get(n) is not c}
        self.dpath = self.paths.path(d)
        todo: list[Item] = []
        self.here = {obj.key for obj in listing.objects}
        d.keyset, d.keyset_at = self.here | set(listing.prefixes), trio.current_time()
        prefixes = list(listing.prefixes)
        for obj in listing.objects:
            comp = obj.key[len(prefix) :]
            if comp == MARKER:
                self.own_marker = obj
                continue
            if not comp:  # the directory's own folder placeholder ("X/"): no entry of it
                continue
            if d.parent is None and comp == CONFIG_NAME:
                continue
            if comp.endswith("/"):
                # a folder placeholder ("X/", as consoles make them), or SeaweedFS listing a
                # folder emptied meanwhile (a directory removed elsewhere) as an object: no
                # cryptfs entry, at most a directory, as a prefix is (it logged an integrity
                # failure; found by the two-mount e2e test)
                if obj.key not in listing.prefixes:
                    prefixes.append(obj.key)
                continue
            todo.append((comp, obj.key, obj.etag, obj.modified))
        for p in prefixes:
            comp = p[len(prefix) : -1]
            todo.append((comp, p + MARKER, None, 0.0))
        # names decrypted before, by their object keys (memoised while no rename intervened):
        # relisting a directory decrypts only the names that are new to it
        self.gen = gen = self.paths.gen
        self.known = {
            m[2]: n
            for n in self.old.values()
            if (m := n.key_memo) is not None and m[0] == gen and m[1] == n.kind
        }
        return todo

    def unchanged(self, comp: str, key: str, etag: str | None, modified: float) -> bool:
        """An entry this mount knows in the version listed: kept without a request (and
        without a task: most entries of a relisting are these)."""
        d, decoded = self.d, self.decoded
        if d.raw_prefix is not None or self.vol.names.is_long(comp):
            return False
        cur = self.known.get(key)
        if cur is not None:
            decoded[key] = cur.name
        else:
            try:
                name = decoded[key] = self.vol.names.decode(self.dpath, comp)
            except IntegrityError:
                return False  # (``load`` reports it, or finds a foreign object)
            cur = self.old.get(name)
        if cur is None or cur.unlinked or cur.parent is not d or cur.name != decoded[key]:
            return False  # (removed, or renamed away while the LIST was in flight)
        if etag is not None and self.tree.same_version(cur, etag, modified):
            cur.refreshed_at = trio.current_time()  # the listing revalidated it
        elif not (etag is None and cur.is_dir):
            return False
        # (a known subdirectory: its attributes are revalidated by its own listing, its
        # marker is in there, not by a HEAD per listing here)
        (self.from_prefix if etag is None else self.new)[cur.name] = cur
        self.paths.remember(cur, key, self.gen)
        return True

    async def load(self, comp: str, key: str, etag: str | None, modified: float) -> None:
        """An entry new to this mount, or changed: HEAD it and adopt what it is."""
        d, old, new = self.d, self.old, self.new
        name: bytes | None = None
        try:
            if d.raw_prefix is not None:
                name = comp.encode(errors="surrogateescape")
                problem = s3ec.name_problem(name)
                if problem is not None:  # (a foreign prefix: its keys are the names)
                    log.warning("%s not shown: %s", self.paths.key_ident(key), problem)
                    return
            elif not self.vol.names.is_long(comp):
                name = self.decoded.get(key) or self.vol.names.decode(self.dpath, comp)
            info = await self.remote.head(key)
            if info is None:
                if (
                    etag is None
                    and name is not None
                    and await self.remote.implicit_dir(key[: -len(MARKER)])
                ):
                    cur = old.get(name)
                    if cur is None or not cur.is_dir:
                        cur = self.tree.synthetic_dir(d, name)
                    self.from_prefix[name] = cur
                return
            if (
                "cfs" not in info.metadata
                and self.foreign.allowed(d)
                and await self.foreign.entry(
                    d, comp, key, etag, old, self.foreign_found, self.here, info
                )
            ):
                return
            long = name is None
            if name is None:
                name = self.vol.names.decode(self.dpath, comp, info.metadata.get("cfs-n"))
            existing = old.get(name)
            if existing is not None and existing.is_dir != (etag is None):
                if etag is None and self.kept_here(existing):
                    # a file changed here and not uploaded yet (or being renamed) keeps its
                    # name from a directory made elsewhere, or a marker replayed: its upload
                    # decides, and the file wins the name (merge_dirs) until then
                    new[name] = existing
                    return
                existing = None  # (a file and a directory of one name: merge_dirs decides)
            node = self.adopt(d, name, info, existing)
            (self.from_prefix if etag is None and node.is_dir else new)[name] = node
            if not long and d.raw_prefix is None:
                self.paths.remember(node, key, self.gen)
        except IntegrityError as e:
            if (
                name is None
                and not self.vol.names.is_long(comp)  # a long name is a cryptfs key
                and await self.foreign.entry(d, comp, key, etag, old, self.foreign_found, self.here)
            ):
                return
            self.tree.integrity(
                key,
                IntegrityError(
                    f"entry skipped in listing: {e}", names=e.names, object_keys=e.object_keys
                ),
            )
        except UnsupportedFormat as e:
            log.warning("entry %s of %s skipped: %s", self.paths.key_ident(key),
                        self.paths.ident(d), self.paths.scrub(e))  # fmt: skip

    def kept_here(self, node: Node) -> bool:
        """Is ``node`` a file changed here and not uploaded yet (or being renamed), which
        keeps its name from a directory a LIST shows there (its upload decides)?"""
        return not node.is_dir and not node.unlinked and (node.dirty or self.tree.in_rename(node))

    def merge_dirs(self) -> None:
        """Directories found by their prefix join the entries, unless a file has the same
        name: the authenticated file is shown, never hidden behind a directory a bucket
        writer can make with one empty object (``<file key>/``, no key needed)."""
        new = self.new
        for name, node in self.from_prefix.items():
            cur = new.get(name)
            mine = self.old.get(name)
            if cur is None and mine is not None and self.kept_here(mine):
                # a file changed here and not uploaded yet keeps its name (its upload
                # decides): not in the LIST, it is in no entry yet
                cur = new[name] = mine
            if cur is None or cur is node:
                new[name] = node
                continue
            key = self.paths.dir_prefix(node)
            if node.remote_etag is None:  # no marker: nothing cryptfs wrote
                self.tree.integrity(key, "a prefix without a marker has a file's name")
            else:  # two hosts made a file and a directory of one name at once (or a replay)
                log.warning("directory %s not shown: a file has its name", self.paths.ident(node))
            if node is self.old.get(name):
                self.tree.gone_elsewhere(node)  # (the kernel looks the name up again)
            else:
                node.unlinked = True
                self.tree.maybe_drop(node)

    def merge_foreign(self) -> None:
        new = self.new
        for name, node in self.foreign_found.items():
            if name in new and new[name] is not node:
                # an S3EC object's key that is a native entry's name: it never stands in
                # for the file (docs/FORMAT.md §7.7), whichever answer came first
                log.warning("S3 Encryption Client %s not shown: a file has its name",
                            self.paths.key_ident(node.foreign_key or ""))  # fmt: skip
                node.unlinked = True
                self.tree.maybe_drop(node)
                continue
            new[name] = node

    async def own_attributes(self) -> None:
        """The directory's own attributes changed elsewhere (chmod, chown, utimes)."""
        d, own = self.d, self.own_marker
        if (
            own is not None
            and d.parent is not None
            and d.remote_etag is not None
            and not d.dirty
            and not self.tree.same_version(d, own.etag, own.modified)
        ):
            info = await self.remote.head(own.key)
            if info is not None:
                with contextlib.suppress(IntegrityError, UnsupportedFormat):
                    self.adopt(d.parent, d.name, info, d)

    def merge(self) -> list[tuple[bytes, Node]]:
        d, old, new = self.d, self.old, self.new
        # keep local entries that are not in S3 yet (dirty, never uploaded), and entries that
        # were created while the listing was in flight
        current = d.children or {}
        for name, node in current.items():
            if name not in old and name not in new and not node.unlinked:
                new[name] = node
        for name, node in self.during.items():
            if not node.unlinked and node.parent is d and node.name == name:
                # newer than what the LIST shows of that name, which may be this very node's
                # object (a rename's copy: adopting it made a second node of one file)
                loaded = new.get(name)
                if loaded is not None and loaded is not node and self.tree.evictable(loaded):
                    self.tree.inodes.pop(loaded.ino, None)  # (that second node: nobody has it)
                new[name] = node
        for name, node in old.items():
            if node.parent is not d or node.name != name or self.tree.in_rename(node):
                continue  # renamed by this mount while the LIST was in flight: not gone
            if name in new and new[name] is not node and not node.unlinked and not node.dirty:
                # its name is another entry's now (a directory where this file was, which
                # merge_dirs let in as the file is gone from S3): gone, and the kernel told
                self.tree.gone_elsewhere(node)
            elif name not in new and not node.unlinked:
                if (
                    # changed here and not uploaded: its upload decides (If-Match on a
                    # removed object: our version is kept as a conflict copy)
                    (node.dirty and not node.only_times_pending)
                    # a directory without a marker that holds something not in S3 yet
                    # (implicit ones emptied elsewhere go: they were kept for ever)
                    or (node.is_dir and node.remote_etag is None and self.tree.holds_local(node))
                    or node.remote_etag != self.before.get(name)  # (uploaded during the LIST)
                ):
                    new[name] = node
                else:
                    self.tree.gone_elsewhere(node)
        d.children = {n: c for n, c in new.items() if not c.unlinked and c.parent is d}
        d.listed_at = trio.current_time()
        d.forgotten = None  # (complete again)
        return sorted(d.children.items())
