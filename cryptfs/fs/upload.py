"""Object bodies written to S3: sealed under a fresh data key, conditional, multipart when
large, and the multipart uploads an outage or a crash left open swept away.

Owns: every conditional write of a node to S3 and what happens when its precondition is
lost: file bodies (PUT or multipart; If-Match on the version replaced, or If-None-Match for a
new object: another writer's change is never overwritten, ours is kept as a conflict copy),
directory markers, attribute-only changes (a copy in place; theirs stands if they changed it
meanwhile), recognising our own earlier request that landed unseen (``own_generation``,
``holds``), nothing written under a retired master key (``keys_current``), the uploads.json
record of multipart uploads in flight, and the sweep that aborts what was left of them.
Must not import: other parts of ``cryptfs.fs`` but ``model``, ``paths``,
``namespace``, ``remote``, ``lookup``, ``fetch`` and ``staged``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from cryptfs.cache.staging import CREATING, StagedFile, StagingArea
from cryptfs.crypto import GCM_TAG, Secret, random_bytes
from cryptfs.errors import (
    IntegrityError,
    KeyTooLong,
    NameTooLong,
    NotFound,
    PreconditionFailed,
    ReadOnly,
    StoreError,
    UnsupportedFormat,
)
from cryptfs.format import body3
from cryptfs.format.body import SALT_SIZE, BodyCipher, chunk_count
from cryptfs.format.meta import KIND_DIR, KIND_FILE, Attrs, ObjectMeta
from cryptfs.fs.fetch import Fetcher
from cryptfs.fs.lookup import Lookup
from cryptfs.fs.model import Node, Options
from cryptfs.fs.namespace import Namespace
from cryptfs.fs.paths import Paths
from cryptfs.fs.remote import Remote
from cryptfs.fs.staged import Base, Staged
from cryptfs.store.base import ObjectInfo
from cryptfs.tasks import open_tasks
from cryptfs.volume import Volume

log = logging.getLogger(__name__)


class Uploader:
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
    ) -> None:
        self.vol = volume
        self.store = volume.store
        self.opt = options
        self.chunk = volume.chunk
        self.staging = staging
        self.paths = paths
        self.tree = tree
        self.remote = remote
        self.look = look
        self.fetch = fetch
        self.staged = staged
        self.uploads = 0  # file bodies uploaded
        self.upload_bytes = 0  # their plaintext bytes
        self.copied_bytes = 0  # of those, copied on the server from the version replaced
        # multipart uploads (and creations of them) in flight; uploads.json holds more when
        # an outage or a lost answer left some unfinished (``sweep``)
        self.mp_active: set[str] = set()
        # per object key: multipart uploads of it this process has going (creation to end),
        # and how many it ever began (a sweep leaves a key alone that either moved for)
        self.mp_keys: dict[str, int] = {}
        self.mp_began: dict[str, int] = {}
        self.sweep_due = True  # (an earlier run may have left some)
        self.sweep_gen = 0  # bumped whenever something is left for a sweep
        self.sweeping = False

    async def own_generation(self, node: Node, key: str) -> str | None:
        info = await self.remote.head(key)
        if info is None:
            return None
        try:
            meta = self.vol.meta.decode(
                self.paths.path(node), key, dict(info.metadata), info.modified
            )
        except (IntegrityError, UnsupportedFormat):
            return None
        if meta.file_id == node.file_id and meta.attrs.salt in node.own_salts:
            node.wrapped = meta.dek
            return info.etag
        return None

    async def put_body(
        self,
        node: Node,
        source: StagedFile | bytes,
        key: str,
        path: bytes,
        long_name: str | None,
        *,
        expect: str | None,
        edit: _Edit | None = None,
    ) -> tuple[str, Attrs, BodyCipher | None]:
        """Seal ``source`` under a fresh data key and generation and write it to ``key``: a
        regular file as a revision-3 body on a volume with segments (FORMAT.md §8.5), else
        (and symlinks, special files) as revision 1 (§2).

        ``expect`` is the ETag being replaced (If-Match) or None for a new object
        (If-None-Match: *), so another writer's change is never silently overwritten.
        ``edit``: what of the staged file is still the version ``expect`` names, whose
        segments a multipart upload then copies from ``key`` instead of sending them.
        """
        # a fresh data key for every upload (docs/FORMAT.md §7.4): whoever once unwrapped an
        # earlier version's key learns nothing of this one; refused if the keyring is stale
        dek, wrapped = await self.vol.keyring.new_dek(node.file_id)
        seg = self.vol.segment if node.kind == KIND_FILE else None
        cipher = None if seg else BodyCipher.new(dek, node.file_id, self.vol.chunk_log2)
        gen = cipher.gen if cipher else random_bytes(SALT_SIZE)
        node.own_salts[gen] = wrapped
        while len(node.own_salts) > 16:
            del node.own_salts[next(iter(node.own_salts))]
        size = len(source) if isinstance(source, bytes) else source.size
        attrs = node.attrs.with_(size=size, salt=gen, body=1 if cipher else 3, pin=b"")
        meta = ObjectMeta(node.file_id, attrs, wrapped, long_name)
        md = self.vol.meta.encode(path, key, meta)
        cond: dict[str, Any] = {"if_none_match": expect is None, "if_match": expect}
        parts: _Parts
        lazy = isinstance(source, StagedFile) and source.fill is not None
        try:
            if isinstance(source, bytes) or size <= self.opt.multipart_threshold:
                if lazy:  # (its chunks not staged yet, first: FORMAT.md §8.8)
                    assert isinstance(source, StagedFile)
                    await self.staged.fill(source, 0, chunk_count(size, self.chunk) - 1, node)

                def seal() -> bytes:  # (staging read and AES-GCM: in a worker if large)
                    if isinstance(source, bytes):
                        data = source
                    else:
                        buf = bytearray()
                        step = 16 * self.chunk  # (each read holds the staged file's I/O lock,
                        for off in range(0, size, step):  # which its writers wait for)
                            buf += source.read(off, min(step, size - off))
                        if len(buf) < size:  # truncated meanwhile: the next upload has that
                            buf += bytes(size - len(buf))
                        data = bytes(buf)
                    if cipher is not None:
                        return cipher.seal_all(data)
                    assert seg is not None
                    return body3.seal_body(dek, self.vol.volume_id, node.file_id, gen, data,
                                           attrs.mtime_ns, seg, self.chunk)  # fmt: skip

                body = await self.fetch.crypto(seal, size)
                etag = await self.store.put(key, body, md, **cond)
            else:
                if cipher is not None:
                    parts = _ChunkParts(source, cipher, self.opt.part_size)
                else:
                    assert seg is not None
                    # (a base that is not the version this upload replaces is not copied)
                    b = None if edit is None else edit.base
                    same = b is not None and (b.version_id is not None or b.etag == expect)
                    parts = _SegmentParts(source, dek, self.vol.volume_id, node.file_id, gen,
                                          attrs.mtime_ns, seg, self.opt.part_size,
                                          edit if same else None)  # fmt: skip
                fill = None
                if lazy:
                    assert isinstance(source, StagedFile)
                    fill = functools.partial(self.staged.fill, source, node=node)
                etag = await self.multipart(parts, key, md, cond, fill)
                self.copied_bytes += parts.copied
                if edit is not None and isinstance(parts, _SegmentParts):
                    edit.made = Base(etag, gen, parts.size, parts.manifest_entries(), key,
                                     mtime_ns=parts.mtime_ns)  # fmt: skip
        except KeyTooLong:
            raise NameTooLong("the S3 server refused the encrypted path as too long") from None
        return etag, attrs, cipher

    def uploaded(self, node: Node, etag: str, attrs: Attrs, cipher: BodyCipher | None) -> None:
        self.uploads += 1
        self.upload_bytes += attrs.size
        node.wrapped = node.own_salts.get(attrs.salt, node.wrapped)
        node.remote_etag = etag
        node.attrs = node.attrs.with_(size=attrs.size, salt=attrs.salt, body=attrs.body, pin=b"")
        # (a revision-3 body's trailer and heads are read back when it is first read)
        node.cipher, node.cipher_etag = cipher, etag
        node.refreshed_at = trio.current_time()

    async def multipart(
        self,
        parts: _Parts,
        key: str,
        md: dict[str, str],
        cond: dict[str, Any],
        fill: Callable[[int, int], Awaitable[None]] | None = None,
    ) -> str:
        # noted before it exists: a CreateMultipartUpload whose answer is lost (or a crash
        # before it comes) still made an upload, found by its key later (``sweep``)
        intent = self.staging.note_creating(key)
        self.mp_active.add(intent)
        self.mp_keys[key] = self.mp_keys.get(key, 0) + 1
        self.mp_began[key] = self.mp_began.get(key, 0) + 1
        try:
            try:
                upload_id = await self.store.create_multipart(key, md)
            except BaseException:
                self.leave_for_sweep()
                raise
            finally:
                self.mp_active.discard(intent)
            self.mp_active.add(upload_id)
            try:
                return await self.multipart_parts(parts, key, cond, upload_id, intent, fill)
            finally:
                self.mp_active.discard(upload_id)
        finally:
            self.mp_keys[key] -= 1
            if not self.mp_keys[key]:
                del self.mp_keys[key]

    def leave_for_sweep(self) -> None:
        self.sweep_due = True
        self.sweep_gen += 1

    async def multipart_parts(
        self,
        parts: _Parts,
        key: str,
        cond: dict[str, Any],
        upload_id: str,
        intent: str,
        fill: Callable[[int, int], Awaitable[None]] | None = None,
    ) -> str:
        """``fill``: reads chunks [first, last] of a staged file of only what was written
        into it before a part of them is built."""
        self.staging.note_upload(upload_id, key, intent)  # a crash leaves it for the next mount
        count = parts.count
        etags: list[str] = [""] * count
        limit = trio.CapacityLimiter(self.opt.upload_concurrency)
        free: list[bytearray] = []  # part buffers of this upload, reused once a part is up
        # the last part of a revision-3 body ends with the manifest of every segment: it is
        # built once the others are (sealed, not uploaded)
        built = parts.copies  # (a copied part's manifest entries are the version's it copies)
        all_built = trio.Event()
        if count == 1 or not parts.last_waits or built == count - 1:
            all_built.set()

        async def part(p: int) -> None:
            nonlocal built
            if p == count - 1:
                await all_built.wait()
            src = parts.copy_range(p)
            if src is not None:  # the version replaced holds these bytes: a copy, on the server
                async with limit:
                    etags[p] = await self.store.upload_part_copy(
                        key, upload_id, p + 1, parts.source_key or key, src[0], src[1],
                        if_match=parts.source, src_version=parts.source_version,
                    )  # fmt: skip
                return
            chunks = parts.chunks(p)
            async with limit:
                if fill is not None and chunks is not None:
                    await fill(*chunks)  # (within the limit: as many reads as parts going)
                buf = free.pop() if free else bytearray(parts.buffer_size)
                # staging reads, AES-GCM and SHA-256 release the GIL: the trio thread stays free
                body = await trio.to_thread.run_sync(
                    parts.build, p, buf, limiter=self.fetch.crypto_limit
                )
                built += 1
                if built == count - 1:
                    all_built.set()
                etags[p] = await self.store.upload_part(key, upload_id, p + 1, body)
                # reused only after a success (the server has read the whole body): the bytes
                # of a failed request may still sit in a closing connection's send buffer
                free.append(buf)

        try:
            async with open_tasks() as nursery:
                for p in range(count):
                    nursery.start_soon(part, p)
            etag = await self.store.complete_multipart(key, upload_id, etags, **cond)
        except BaseException:
            with trio.CancelScope(shield=True):
                try:
                    await self.store.abort_multipart(key, upload_id)
                    self.staging.forget_upload(upload_id)
                except NotFound:
                    self.staging.forget_upload(upload_id)
                except StoreError:
                    self.leave_for_sweep()  # (S3 down): aborted once it answers again
            raise
        self.staging.forget_upload(upload_id)
        return etag

    async def sweep(self) -> bool:
        """Abort the multipart uploads this cache's mounts began and never ended (an outage
        during the upload and its abort, a lost answer to its creation, a crash); returns
        whether all are gone.  Those in flight now are left alone.  A creation whose answer
        never came is found by its object key: every upload of that key but ours in flight
        is aborted (another host's upload of the same key then fails and is retried: it only
        costs that host the upload, never data)."""
        gen = self.sweep_gen
        left = {u: k for u, k in self.staging.leftover_uploads().items()
                if u not in self.mp_active}  # fmt: skip
        done = True
        for upload_id, key in left.items():
            try:
                if upload_id.startswith(CREATING):
                    if self.mp_keys.get(key):
                        done = False  # an upload of it going now: its upload ids are not
                        continue  # all known to us yet (one being created); a later sweep
                    began = self.mp_began.get(key, 0)
                    found = await self.store.list_uploads(key)
                    if self.mp_keys.get(key) or self.mp_began.get(key, 0) != began:
                        done = False  # one began while we listed: it may be in the list
                        continue
                    ids = [u for k, u, _t in found if k == key]
                else:
                    ids = [upload_id]
                for uid in ids:
                    with contextlib.suppress(NotFound):  # (completed or aborted meanwhile)
                        await self.store.abort_multipart(key, uid)
                    log.info("aborted multipart upload %s of %s, left unfinished",
                             uid[:16], self.paths.key_ident(key))  # fmt: skip
            except StoreError as e:
                log.warning("could not abort multipart uploads of %s yet: %s",
                            self.paths.key_ident(key), self.paths.scrub(e))  # fmt: skip
                done = False
                continue
            self.staging.forget_upload(upload_id)
        # (something left for a sweep while this one ran stays due)
        self.sweep_due = not done or self.sweep_gen != gen
        return done

    async def sweep_in_background(self) -> None:
        if self.sweeping:
            return
        self.sweeping = True
        try:
            await self.sweep()
        finally:
            self.sweeping = False

    def stored_size(self, node: Node) -> int:
        """Size of the node's object in S3 (0 for directory markers)."""
        return 0 if node.is_dir else self.vol.body_length(node.attrs)

    def keys_current(self) -> None:
        """Nothing is written under a master key the volume has moved on from (a rotation
        elsewhere): metadata copies, markers and renames wait like uploads do."""
        if self.vol.keyring.stale is not None:
            raise ReadOnly(self.vol.keyring.stale)

    async def put_marker(self, node: Node, *, create: bool) -> None:
        """Write a directory's marker: ``create``, If-None-Match (a new directory), else
        If-Match the version this mount holds.  PreconditionFailed or NotFound if another
        writer made or removed it meanwhile."""
        self.keys_current()
        key, long_name = self.paths.object_key(node)
        attrs = node.attrs
        meta = ObjectMeta(node.file_id, attrs, None, long_name)
        md = self.vol.meta.encode(self.paths.path(node), key, meta)
        try:
            node.remote_etag = await self.store.put(
                key,
                b"",
                md,
                if_none_match=create and node.remote_etag is None,
                if_match=None if create else node.remote_etag,
            )
        except (PreconditionFailed, NotFound):
            # our own request may have landed, its answer lost (a retry then meets it)
            if not self.holds(node, key, await self.remote.head(key), attrs):
                raise
        node.refreshed_at = trio.current_time()

    def holds(self, node: Node, key: str, info: ObjectInfo | None, attrs: Attrs) -> bool:
        """Is ``info`` (a HEAD of ``key`` just made) ``node`` with ``attrs``, written by this
        mount although it never saw the answer?  Then ``node`` takes its ETag."""
        if info is None:
            return False
        try:
            meta = self.vol.meta.decode(
                self.paths.path(node), key, dict(info.metadata), info.modified
            )
        except (IntegrityError, UnsupportedFormat):
            return False
        if meta.file_id != node.file_id or meta.attrs != attrs:
            return False
        node.remote_etag = info.etag
        node.remote_modified, node.modified_etag = info.modified, info.etag
        node.refreshed_at = trio.current_time()
        return True

    async def sync_attrs(self, node: Node) -> None:
        """Write the changed attributes of a file (chmod, chown, utimes; no new data) onto its
        object: a copy in place, If-Match the version this mount holds."""
        self.keys_current()
        key, long_name = self.paths.object_key(node)
        attrs = node.attrs
        meta = ObjectMeta(node.file_id, attrs, node.wrapped, long_name)
        md = self.vol.meta.encode(self.paths.path(node), key, meta)
        node.attrs_sending += 1  # (a listing meanwhile may see it: ours, not another's)
        try:
            node.remote_etag = await self.store.copy(
                key, key, md, if_match=node.remote_etag, size=self.stored_size(node)
            )
        except (PreconditionFailed, NotFound):
            info = await self.remote.head(key)
            if not self.holds(node, key, info, attrs):
                self.attrs_lost(node, info)
        finally:
            node.attrs_sending -= 1

    async def sync_marker(self, node: Node) -> None:
        """Write a directory's changed attributes onto its marker, If-Match the version this
        mount holds.  Times its entries changed, and nothing else, are merged first with
        the marker S3 holds now (a HEAD): If-Match cannot tell another host's marker from
        ours where S3's ETag is the body's MD5 (every marker has an empty body), and a
        create here must not undo a chmod or chown made there."""
        key, _ = self.paths.object_key(node)
        for _ in range(3):
            times_only = node.only_times_pending
            if times_only and node.remote_etag is not None:
                info = await self.remote.head(key)
                # (a chmod, chown or touch here during the HEAD: an explicit change now,
                # written as one, never replaced by S3's attributes)
                times_only = node.only_times_pending
                if times_only and (info is None or not self.merge_times(node, info)):
                    self.attrs_lost(node, info)  # (quietly: times only, Namespace)
                    return
            try:
                await self.put_marker(node, create=node.remote_etag is None)
                return
            except (PreconditionFailed, NotFound):
                if not times_only:
                    self.attrs_lost(node, await self.remote.head(key))
                    return
        log.info("%s: directory times not written (its marker keeps changing)",
                 self.paths.ident(node))  # fmt: skip
        node.meta_dirty = False

    def merge_times(self, node: Node, info: ObjectInfo) -> bool:
        """``info`` is directory ``node``'s marker in S3 now, and this mount has only times
        its entries changed to write: take that marker's attributes, with the later of each
        time (neither host's change of the directory is lost).  False if it is not this
        directory's marker (removed and made again elsewhere, or not a directory)."""
        try:
            meta = self.look.decode(self.paths.path(node), info)
        except (IntegrityError, UnsupportedFormat):
            return False
        if meta.attrs.kind != KIND_DIR or meta.file_id != node.file_id or node.unlinked:
            return False
        ours = node.attrs
        theirs = meta.attrs.with_(
            mtime_ns=max(ours.mtime_ns, meta.attrs.mtime_ns),
            ctime_ns=max(ours.ctime_ns, meta.attrs.ctime_ns),
        )
        if theirs.mode != ours.mode or theirs.uid != ours.uid or theirs.gid != ours.gid:
            self.tree.tell_kernel_changed(node)
        node.attrs = theirs
        node.remote_etag = info.etag
        node.remote_modified, node.modified_etag = info.modified, info.etag
        return True

    def attrs_lost(self, node: Node, info: ObjectInfo | None) -> None:
        """Another writer changed or removed ``node``'s object while this mount had a change
        of its attributes only to write: theirs stands (no data of ours is lost: an upload of
        data makes a conflict copy instead).  Retrying, as before, looped forever."""
        self.tree.attrs_dropped(node, "removed" if info is None else "changed")
        parent = node.parent
        if info is None:
            if node.is_dir:
                node.remote_etag = None  # known here, its marker gone: implicit from now on
            elif node.open_count == 0 and node.stage is None:
                self.tree.gone_elsewhere(node)
            return
        if parent is None:
            return
        if node.is_dir:
            # the same directory made or changed elsewhere: one directory (entries are
            # found by path), with the attributes of the marker that stands
            with contextlib.suppress(IntegrityError, UnsupportedFormat):
                meta = self.look.decode(self.paths.path(node), info)
                if meta.attrs.kind == KIND_DIR:
                    node.file_id, node.attrs = meta.file_id, meta.attrs
                    self.tree.tell_kernel_changed(node)
                    self.tree.seen(parent, node.name, node, info)
            return
        with contextlib.suppress(IntegrityError, UnsupportedFormat):
            self.look.adopt(parent, node.name, info, node)

    async def upload_stage(self, node: Node) -> None:
        sf = node.stage
        assert sf is not None
        key, long_name = self.paths.object_key(node)
        change = node.change
        edit = _Edit.take(sf, self.vol.segment) if sf.size > self.opt.multipart_threshold else None
        try:
            await self.upload_edit(node, sf, key, long_name, edit)
        except BaseException:
            if edit is not None:
                edit.give_back(sf)
            raise
        if edit is not None:
            # the next upload of this staged file (written meanwhile) copies from this one
            sf.base = edit.made
            if sf.fill is not None and edit.made is not None and node.change != change:
                # (written meanwhile: it stays staged, and reads from this version now)
                await self.staged.refill(node, sf, edit.made)

    async def upload_edit(
        self, node: Node, sf: StagedFile, key: str, long_name: str | None, edit: _Edit | None
    ) -> None:
        for attempt in range(2):
            try:
                etag, attrs, cipher = await self.put_body(
                    node, sf, key, self.paths.path(node), long_name, expect=node.remote_etag,
                    edit=edit if attempt == 0 else None,
                )  # fmt: skip
                break
            except (PreconditionFailed, NotFound) as e:
                # Our own earlier request may have landed although we never saw its
                # answer (timeout, retry, cancellation): then the object holds one of our
                # generations and replacing it is no conflict.
                mine = await self.own_generation(node, key)
                if attempt == 0 and mine is not None:
                    node.remote_etag = mine
                    continue
                if isinstance(e, NotFound) and (
                    node.remote_etag is None or await self.remote.head(key) is not None
                ):
                    # not the object but our multipart upload is gone (aborted by a sweep
                    # of another host, or expired): again later, no conflict
                    raise
                # changed, or removed (If-Match on a missing object), by another writer
                await self.save_conflict(node, sf, edit)
                return
        self.uploaded(node, etag, attrs, cipher)

    async def save_conflict(self, node: Node, sf: StagedFile, edit: _Edit | None = None) -> None:
        """Another writer changed the object: keep both.  The other version keeps the name;
        this node carries on as ``NAME.conflict-HOST-TIME``, with our version uploaded
        there, so that a writer that still has it open goes on writing to the copy (the
        node was detached: its later writes were dropped at close, 18.8)."""
        self.tree.conflicts += 1
        assert node.parent is not None
        parent, name = node.parent, node.name
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = name + f".conflict-{socket.gethostname()}-{stamp}".encode()
        for n in range(1, 100):
            cname = base if n == 1 else base + b"-%d" % n
            ckey, clong = self.paths.key_for(parent, cname, node.kind)
            cpath = self.paths.child_path(parent, cname)
            try:
                etag, attrs, cipher = await self.put_body(
                    node, sf, ckey, cpath, clong, expect=None, edit=edit
                )  # (segments still a version by its id: copied from there)
                break
            except PreconditionFailed:
                continue  # a conflict copy of that name exists (two in a second): the next
        else:
            raise StoreError("no free name for a conflict copy")
        log.warning(
            "conflict: %s was changed by another writer; this host's version was saved as %s",
            self.paths.ident(node),
            self.paths.key_ident(ckey, cpath),
        )
        key, _ = self.paths.object_key(node)
        info = await self.remote.head(key)
        # the name is the other writer's now: the kernel looks it up again, and finds theirs
        if self.tree.kernel is not None:
            self.tree.kernel.entry_gone(parent.ino, name)
        self.tree.move(node, parent, cname)
        node.attrs = node.attrs.with_(ctime_ns=attrs.ctime_ns)  # (as uploaded: clean)
        self.uploaded(node, etag, attrs, cipher)
        node.journaled = -1
        self.staged.journal(node)  # (if it changed meanwhile: its record names the copy now)
        if info is not None and (parent.children or {}).get(name) is None:
            # (an object there that does not authenticate: EIO for the fsync, although our
            # version is safe in the copy; the name is not the user's, they must know)
            self.look.adopt(parent, name, info, None)


S3_LEAST_PART = 5 << 20  # of a multipart upload, but its last part
S3_LARGEST_PART = 5 << 30  # (UploadPartCopy's too)


class _Edit:
    """What of a staged file is still the version it was staged from (or last uploaded
    from it), taken at the start of an upload: the base, the segments written since and how
    far nothing was cut; writes during the upload are the next upload's.  ``made``: the
    version the upload made, when its parts name every segment (the next one's base)."""

    def __init__(self, base: Base | None, touched: set[int], kept: int) -> None:
        self.base, self.touched, self.kept = base, touched, kept
        self.made: Base | None = None

    @classmethod
    def take(cls, sf: StagedFile, segment: int | None) -> _Edit | None:
        if not segment:
            return None
        if sf.unit != segment:
            sf.base = None  # (not tracked by segments until now: nothing known untouched)
        edit = cls(sf.base, sf.touched, sf.kept)
        sf.unit, sf.touched, sf.kept = segment, set(), sf.size
        return edit

    def give_back(self, sf: StagedFile) -> None:
        """The upload failed: what it took is still to be uploaded."""
        sf.touched |= self.touched
        sf.kept = min(sf.kept, self.kept)

    def copyable(self, j: int, seg: int, size: int, sf: StagedFile) -> bool:
        """Is segment ``j`` of a body of ``size`` bytes still the base's, byte for byte (of
        the same length, at the same place)?  Written or cut since the upload began (``sf``'s
        record now, when the parts are planned) counts too: bytes cut before the plan never
        come back in the upload (one cut after it is the next upload's, as a write is)."""
        b = self.base
        if b is None or j in self.touched or j in sf.touched:
            return False
        lo = j * seg
        ln = min(seg, size - lo)
        return 0 < ln == min(seg, b.size - lo) and lo + ln <= min(self.kept, sf.kept)


def plan_parts(
    copy: list[bool], per: int, most: int, *, last_counts: bool = True
) -> list[tuple[bool, int, int]]:
    """The parts of a revision-3 body of ``len(copy)`` segments, as ``(copied, first,
    end)``: runs of segments copied from the version replaced (where ``copy[j]``) or sealed
    here, and last the part that ends with the trailer: the last run sealed here, or, when
    the last segment is copied too, the trailer alone, ``(False, n, n)`` (S3's last part may
    be of any size).  Every part but the last holds at least ``per`` whole segments (S3's
    least part; the last segment counts only if ``last_counts``), a copied one at most
    ``most`` segments (S3's largest); a run too short to be a part is sealed here with its
    neighbours."""
    assert most >= 2 * per + 2
    copy = list(copy)
    n = len(copy)
    out: list[tuple[bool, int, int]] = []
    j = 0
    while j < n:
        e = j
        while e < n and copy[e] == copy[j]:
            e += 1
        if copy[j]:
            if e - j < per + (e == n and not last_counts):
                copy[j:e] = [False] * (e - j)  # too short: sealed with the run before or after
                continue
            k = -(-(e - j) // most)  # pieces as even as can be: each more than most / 2
            for q in range(k):
                out.append((True, j + (e - j) * q // k, j + (e - j) * (q + 1) // k))
            j = e
            continue
        if e < n and e - j < per:
            copy[e : j + per] = [False] * (j + per - e)  # too short: takes what follows
            continue
        k = max(1, (e - j) // per)  # pieces of per segments, the rest with the last piece
        for q in range(k):
            out.append((False, j + q * per, e if q == k - 1 else j + (q + 1) * per))
        j = e
    if not out or out[-1][0]:
        out.append((False, n, n))  # the trailer alone
    return out


class _Parts:
    """The parts of one multipart upload of a staged file: how many, the buffer each is
    built in, and building part ``p`` (in a worker thread)."""

    count: int
    buffer_size: int
    last_waits = False  # the last part needs every other part built first
    copies = 0  # parts copied from the version replaced, not built
    copied = 0  # their plaintext bytes
    source: str | None = None  # the ETag they are copied from (If-Match) ...
    source_key: str | None = None  # ... of that object (None: the one uploaded)
    source_version: str | None = None  # ... by its S3 version id

    def chunks(self, p: int) -> tuple[int, int] | None:
        """The staged file's chunks [first, last] that part ``p`` is built from."""
        return None

    def build(self, p: int, buf: bytearray) -> memoryview:
        raise NotImplementedError

    def copy_range(self, p: int) -> tuple[int, int] | None:
        """The bytes of the version replaced that part ``p`` is, if it is copied."""
        return None


class _ChunkParts(_Parts):
    """A revision-1 body: the header, then runs of chunks (FORMAT.md §2)."""

    def __init__(self, sf: StagedFile, cipher: BodyCipher, part_size: int) -> None:
        self.sf = sf
        self.cipher = cipher
        self.size = sf.size
        c = self.c = cipher.chunk
        self.n = chunk_count(self.size, c)
        self.per_part = max(part_size // c, -(-self.n // 9000))
        self.count = -(-self.n // self.per_part)
        self.buffer_size = len(cipher.header_bytes) + self.per_part * (c + GCM_TAG)
        self.scratch = threading.local()  # per worker thread: the staged slots, their plaintext

    def build(self, p: int, buf: bytearray) -> memoryview:
        c, n, size, scratch = self.c, self.n, self.size, self.scratch
        first = p * self.per_part
        k = min(n, first + self.per_part) - first
        if len(getattr(scratch, "plain", b"")) < k * c:
            scratch.raw, scratch.plain = bytearray(k * self.sf.slot), bytearray(k * c)
        plain = memoryview(scratch.plain)
        self.sf.read_run(first, k, memoryview(scratch.raw), plain)
        out = memoryview(buf)
        o = 0
        if p == 0:
            hdr = self.cipher.header_bytes
            out[: len(hdr)] = hdr
            o = len(hdr)
        for j in range(k):
            i = first + j
            ln = min(c, size - i * c)
            self.cipher.seal_chunk_into(
                i, i == n - 1, plain[j * c : j * c + ln], out[o : o + ln + GCM_TAG]
            )
            o += ln + GCM_TAG
        return out[:o]


class _SegmentParts(_Parts):
    """A revision-3 body (FORMAT.md §8.5): runs of whole segments, each under a key of its
    own; the last part ends with the trailer, whose manifest names every segment."""

    last_waits = True

    def __init__(
        self,
        sf: StagedFile,
        dek: Secret,
        volume_id: bytes,
        file_id: bytes,
        gen: bytes,
        mtime_ns: int,
        seg: int,
        part_size: int,
        edit: _Edit | None = None,
    ) -> None:
        self.sf = sf
        self.dek, self.volume_id, self.file_id, self.gen = dek, volume_id, file_id, gen
        self.mtime_ns = mtime_ns
        self.seg = seg
        c = self.c = sf.chunk
        self.size = sf.size
        n = self.n = body3.segments_of(self.size, seg)
        self.entries: list[body3.Entry | None] = [None] * n
        # (every part but the last at least S3's 5 MiB; at most 10,000 parts; a copy at
        # most S3's 5 GiB)
        per = max(-(-part_size // seg), -(-n // 9000))
        self.full = body3.segment_size(seg, c)
        most = max(2 * per + 2, S3_LARGEST_PART // self.full)
        copy = [edit is not None and edit.copyable(j, seg, self.size, sf) for j in range(n)]
        # (a short last segment counts as a whole one where it is a part by itself for S3)
        last = body3.segment_size(self.size - (n - 1) * seg, c)
        counts = self.size % seg == 0 or (per == 1 and last >= S3_LEAST_PART)
        self.plan = plan_parts(copy, per, most, last_counts=counts) if any(copy) else []
        if not self.plan or len(self.plan) > 10_000:
            self.plan = plan_parts([False] * n, per, most)
        if edit is not None and edit.base is not None:
            # by version id from where it was written (no write changes it); else from the
            # key uploaded to, If-Match: a rename since copied it there, body and ETag kept
            self.source = edit.base.etag
            self.source_version = edit.base.version_id
            self.source_key = edit.base.key if edit.base.version_id else None
            for copied, first, end in self.plan:
                if copied:
                    self.entries[first:end] = edit.base.entries[first:end]
                    self.copies += 1
                    self.copied += min(end * seg, self.size) - first * seg
        self.count = len(self.plan)
        most_built = max(e - f for copied, f, e in self.plan if not copied)  # (0: the trailer)
        self.buffer_size = most_built * self.full + body3.trailer_size(n)
        self.scratch = threading.local()

    def copy_range(self, p: int) -> tuple[int, int] | None:
        copied, first, end = self.plan[p]
        if not copied:
            return None
        last = min(self.seg, self.size - (end - 1) * self.seg)  # (the body's last: shorter)
        return first * self.full, (end - 1) * self.full + body3.segment_size(last, self.c)

    def chunks(self, p: int) -> tuple[int, int] | None:
        copied, first, end = self.plan[p]
        per = self.seg // self.c
        last = chunk_count(self.size, self.c) - 1
        return None if copied or first == end else (first * per, min(last, end * per - 1))

    def manifest_entries(self) -> tuple[body3.Entry, ...]:
        entries = tuple(e for e in self.entries if e is not None)
        assert len(entries) == self.n
        return entries

    def build(self, p: int, buf: bytearray) -> memoryview:
        seg, c, scratch = self.seg, self.c, self.scratch
        per = seg // c
        if len(getattr(scratch, "plain", b"")) < seg:
            scratch.raw, scratch.plain = bytearray(per * self.sf.slot), bytearray(seg)
        plain = memoryview(scratch.plain)
        out = memoryview(buf)
        o = 0
        _copied, first, end = self.plan[p]
        for j in range(first, end):
            b = min(seg, self.size - j * seg)
            k = body3.chunks_in(b, c)
            self.sf.read_run(j * per, k, memoryview(scratch.raw), plain)
            ln = body3.segment_size(b, c)
            self.entries[j] = body3.seal_segment_into(
                self.file_id, j, plain[:b], c, out[o : o + ln]
            )
            o += ln
        if p == self.count - 1:  # (every other part was built first)
            manifest = body3.Manifest(self.size, self.mtime_ns, self.manifest_entries())
            trailer = body3.seal_trailer(self.dek, self.volume_id, self.file_id, self.gen, manifest)
            out[o : o + len(trailer)] = trailer
            o += len(trailer)
        return out[:o]
