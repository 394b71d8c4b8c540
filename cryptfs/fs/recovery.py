"""Crash recovery: files a run staged and never uploaded (a crash, kill -9, an outage at
unmount) put back into the tree from their journals and uploaded.

Owns: rebuilding a staged file's node from its journal record (path, file id, attributes,
the ETag it was based on: another host's newer version then makes the upload a conflict
copy, never an overwrite; the version by id its chunks not staged are read from), what
stays staged when that fails (``unrecovered``, named by ``cryptfs umount``), and the sweep
of multipart uploads the earlier run left open.
Must not import: other parts of ``cryptfs.fs`` but ``model``, ``paths``, ``namespace``,
``lookup``, ``entries`` and ``writeback``.
"""

from __future__ import annotations

import dataclasses
import logging

from cryptfs import lognames
from cryptfs.cache.staging import JournalRecord, StagedFile, StagingArea
from cryptfs.errors import CryptfsError, IntegrityError
from cryptfs.fs.entries import Entries
from cryptfs.fs.lookup import Lookup
from cryptfs.fs.model import Node, Options
from cryptfs.fs.namespace import Namespace
from cryptfs.fs.paths import Paths
from cryptfs.fs.writeback import Writeback

log = logging.getLogger(__name__)


class Recovery:
    def __init__(
        self,
        options: Options,
        staging: StagingArea,
        paths: Paths,
        tree: Namespace,
        look: Lookup,
        entries: Entries,
        writeback: Writeback,
    ) -> None:
        self.opt = options
        self.staging = staging
        self.paths = paths
        self.tree = tree
        self.look = look
        self.entries = entries
        self.writeback = writeback
        self.upload = writeback.upload
        self.unrecovered: list[bytes] = []  # paths of staged files recovery left staged

    async def recover(self) -> int:
        """Upload files staged by an earlier run that ended before uploading them, and abort
        the multipart uploads it left behind."""
        await self.upload.sweep()  # (what it cannot abort now is retried while mounted)
        count = 0
        for sf, raw in self.staging.recover():
            try:
                rec = JournalRecord.from_dict(raw)
            except IntegrityError as e:  # (sealed by us: only a bug writes such a record)
                log.error("staged file %s not recovered: %s", sf.stage_id.hex()[:16], e)
                sf.close()
                self.unrecovered.append(b"(staged file %s)" % sf.stage_id.hex()[:16].encode())
                continue
            path = rec.path
            try:
                node = await self.recover_node(sf, rec)
            except (CryptfsError, OSError) as e:
                # not in the tree: left staged, as it was, for the next mount
                log.error(
                    "staged file of %s not recovered yet: %s; will retry at next mount",
                    lognames.ident(None, opaque=False, path=path, fid=sf.file_id),
                    self.paths.scrub(e),
                )
                sf.close()
                self.unrecovered.append(path)
                continue
            try:
                await self.writeback.sync_node(node)
            except (CryptfsError, OSError) as e:
                # in the tree with its staged data, readable and writable like any dirty
                # file, and uploaded by write-back once S3 (or KMS) answers again
                log.error(
                    "staged file of %s recovered but not uploaded yet: %s; retrying",
                    self.paths.ident(node),
                    self.paths.scrub(e),
                )
                self.writeback.schedule(node, 1.0)
                continue
            count += 1
            log.info("recovered staged file of %s and uploaded it", self.paths.ident(node))
        return count

    async def recover_node(self, sf: StagedFile, rec: JournalRecord) -> Node:
        parent = self.tree.root
        parts = [p for p in rec.path.split(b"/") if p]
        for comp in parts[:-1]:
            child = await self.look.find(parent, comp)
            if child is None:
                child = await self.entries.mkdir(
                    parent.ino, comp, 0o755, self.opt.uid, self.opt.gid
                )
            parent = child
        existing = await self.look.find(parent, parts[-1])
        if rec.fill is not None:
            # a staged file of only what was written: the rest is the version it was staged
            # from, found by its id and checked again (a failure leaves it staged, as it is)
            here = None
            if existing is not None:
                here = (self.paths.object_key(existing)[0], self.paths.path(existing))
            now = await self.entries.staged.reopen_fill(sf, rec.file_id, rec.fill, here)
            if now is not None:  # (the journaled version, copied by a rotation since)
                rec = dataclasses.replace(rec, etag=now)
        node = self.tree.new_node(parent, parts[-1], rec.attrs, rec.file_id)
        # the upload makes a fresh data key; a data key an older journal may hold is ignored
        node.stage = sf
        # the version the staged data was based on, as journaled (FORMAT.md §5): another
        # host's newer one then makes the upload a conflict copy, not an overwrite; an object
        # removed since is written anew
        node.remote_etag = rec.etag if existing is not None else None
        if existing is not None:
            self.tree.detach(existing)
        self.tree.insert(parent, node)
        node.change += 1
        return node
