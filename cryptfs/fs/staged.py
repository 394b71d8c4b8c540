"""Files changed here and not uploaded yet: their staged copy on local disk.

Owns: making a node dirty (``materialize``: its current version copied whole into a staged
file, one version pinned for the whole copy), what a change does to its times and change
count (``touch``), and the journal record that lets recovery upload a staged file after a
crash (path, file id, attributes, and the ETag it replaces: docs/FORMAT.md §5).
Must not import: other parts of ``cryptfs.fs`` but ``model``, ``paths``,
``lookup`` and ``fetch``.
"""

from __future__ import annotations

import dataclasses

import trio

from cryptfs.cache.staging import JournalRecord, StagedFile, StagingArea
from cryptfs.errors import CryptfsError, PreconditionFailed, StoreError
from cryptfs.format.body import chunk_count
from cryptfs.format.body3 import Body3, Entry
from cryptfs.fs.fetch import Fetcher
from cryptfs.fs.lookup import Lookup
from cryptfs.fs.model import Node, Options, now_ns
from cryptfs.fs.paths import Paths
from cryptfs.volume import Volume


@dataclasses.dataclass(frozen=True)
class Base:
    """The version of a file its staged copy was made from, as its upload needs it to copy
    the segments still that version's from S3 (FORMAT.md §8.5, "Edits cost what changed"):
    the ETag a copy names (If-Match), its generation, size and manifest entries (checked
    when the version was read: the new manifest pins the copied bytes by them)."""

    etag: str
    gen: bytes
    size: int
    entries: tuple[Entry, ...]


class Staged:
    def __init__(
        self,
        volume: Volume,
        options: Options,
        staging: StagingArea,
        paths: Paths,
        look: Lookup,
        fetch: Fetcher,
    ) -> None:
        self.vol = volume
        self.opt = options
        self.chunk = volume.chunk
        self.staging = staging
        self.paths = paths
        self.look = look
        self.fetch = fetch

    async def materialize(self, node: Node) -> StagedFile:
        """Make ``node`` dirty: copy its current content into a new staged file.

        One at a time per node: a second, concurrent one (two writers, or the kernel's
        parallel write-back) would make a second staged file, and writes to the first would
        be lost.
        """
        while node.materializing is not None:
            await node.materializing.wait()
        if node.stage is not None:
            return node.stage
        node.materializing = trio.Event()
        try:
            return await self.materialize_one(node)
        finally:
            node.materializing.set()
            node.materializing = None

    async def materialize_one(self, node: Node) -> StagedFile:
        """The node's current version, copied whole into a new staged file.  One version: if
        another arrives between the batches (an adopt), the copy starts again from it, so
        the staged file never mixes two, and the upload's If-Match names the one copied."""
        for _attempt in range(5):
            sf = self.staging.create(node.file_id)
            version = (node.remote_etag, node.attrs.salt)
            try:
                size = node.attrs.size
                if size and node.remote_etag is not None:
                    step = max(1, self.opt.part_size // self.chunk)
                    n = chunk_count(size, self.chunk)
                    for first in range(0, n, step):
                        last = min(n - 1, first + step - 1)
                        got: dict[int, bytes] = {}
                        try:
                            await self.fetch.fetch_chunks(node, first, last, got)
                        except PreconditionFailed:
                            # replaced by another writer, and this mount had not seen it:
                            # learn of the new version, and copy that one instead
                            await self.look.look_again(node)
                            if (node.remote_etag, node.attrs.salt) == version:
                                raise
                            break
                        if (node.remote_etag, node.attrs.salt) != version:
                            break  # another version meanwhile: start again from it
                        for i in range(first, last + 1):
                            data = got[i]
                            sf.write_chunk(i, data + bytes(self.chunk - len(data)))
                    else:
                        sf.size = size
                else:
                    sf.size = size
            except BaseException:
                sf.remove()
                raise
            base = await self.base_of(node, version) if size else None
            if (node.remote_etag, node.attrs.salt) == version and sf.size == size:
                if base is not None:
                    sf.track(base, self.vol.segment_bytes(), size)
                node.stage = sf
                return sf
            sf.remove()
        raise StoreError("the file keeps changing elsewhere while it is opened for writing")

    async def base_of(self, node: Node, version: tuple[str | None, bytes]) -> Base | None:
        """What an upload needs to copy the segments of ``version`` (the one just staged)
        that stay untouched: None unless it is a revision-3 body big enough to go up in
        parts (a copy that cannot be made is a whole upload, never an error)."""
        etag = version[0]
        if etag is None or node.attrs.body != 3 or node.attrs.size <= self.opt.multipart_threshold:
            return None
        try:
            body = await self.fetch.cipher(node)  # (opened by the staging's reads already)
        except CryptfsError:
            return None
        if not isinstance(body, Body3) or (node.remote_etag, body.gen) != version:
            return None
        return Base(etag, body.gen, body.size, body.manifest.entries)

    def touch(self, node: Node, *, data: bool) -> None:
        now = now_ns()
        node.attrs = node.attrs.with_(ctime_ns=now, **({"mtime_ns": now} if data else {}))
        node.change += 1

    def journal(self, node: Node, *, durable: bool = False) -> None:
        if node.stage is None or node.unlinked:
            return
        if node.journaled == node.change and not durable:
            return
        rec = JournalRecord(self.paths.path(node), node.file_id, node.attrs, node.remote_etag)
        node.stage.save_journal(rec.to_dict(), durable=durable)
        node.journaled = node.change
