"""Files changed here and not uploaded yet: their staged copy on local disk.

Owns: making a node dirty (``materialize``: its current version copied whole into a staged
file, one version pinned for the whole copy; or, on a bucket with versioning on, a staged
file of only what is written, whose other chunks ``fill`` reads from that version by its id
when a read, a partial write or an upload needs them), what a change does to its times and
change count (``touch``), and the journal record that lets recovery upload a staged file
after a crash (path, file id, attributes, the ETag it replaces, and where the chunks not
staged are: docs/FORMAT.md §5).
Must not import: other parts of ``cryptfs.fs`` but ``model``, ``paths``,
``lookup`` and ``fetch``.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import trio

from cryptfs.cache.staging import JournalRecord, StagedFile, StagingArea
from cryptfs.errors import (
    CryptfsError,
    IntegrityError,
    PreconditionFailed,
    StoreError,
    UnsupportedFormat,
)
from cryptfs.format.body import chunk_count
from cryptfs.format.body3 import Body3, Entry, Manifest, trailer_span
from cryptfs.format.names import b64d, b64e
from cryptfs.fs.fetch import Fetcher
from cryptfs.fs.lookup import Lookup
from cryptfs.fs.model import Node, Options, now_ns
from cryptfs.fs.paths import Paths
from cryptfs.volume import Volume

log = logging.getLogger(__name__)


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
    key: str = ""  # where it is (copies come from there) ...
    version_id: str | None = None  # ... and its S3 version id (then whatever is there now)
    mtime_ns: int = 0  # its manifest's

    @classmethod
    def of(cls, body: Body3, etag: str, key: str, version_id: str | None = None) -> Base:
        """The version ``body`` (opened and checked), at ``key`` with ``etag``."""
        m = body.manifest
        return cls(etag, body.gen, body.size, m.entries, key, version_id, m.mtime_ns)


@dataclasses.dataclass(frozen=True)
class Fill:
    """The version of a file whose chunks a staged file of only what was written reads when
    it needs them: by its S3 version id, which no later write, rename or delete changes (a
    bucket with versioning on), checked against its manifest (``body``)."""

    key: str
    path: bytes  # the file's path when it was written there (its metadata is bound to it)
    version_id: str
    etag: str
    body: Body3

    @property
    def size(self) -> int:
        return self.body.size

    def record(self, kept: int) -> dict[str, Any]:
        """For the journal: enough to find and check this version again after a crash (its
        manifest's pin included: no key, only what pins its bytes)."""
        return {"key": self.key, "path": b64e(self.path), "v": self.version_id,
                "e": self.etag, "g": b64e(self.body.gen), "m": b64e(self.body.manifest.pin()),
                "kept": kept}  # fmt: skip


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
        self.store = volume.store
        self.opt = options
        self.chunk = volume.chunk
        self.staging = staging
        self.paths = paths
        self.look = look
        self.fetch = fetch

    async def materialize(self, node: Node, *, whole: bool = False) -> StagedFile:
        """Make ``node`` dirty: copy its current content into a new staged file (or, on a
        bucket with versioning on, unless ``whole``, stage only what will be written).

        One at a time per node: a second, concurrent one (two writers, or the kernel's
        parallel write-back) would make a second staged file, and writes to the first would
        be lost.
        """
        while node.materializing is not None:
            await node.materializing.wait()
        if node.stage is not None:
            if whole:
                await self.fill_all(node, node.stage)
            return node.stage
        node.materializing = trio.Event()
        try:
            sf = None if whole else await self.stage_lazily(node)
            return sf or await self.materialize_one(node)
        finally:
            node.materializing.set()
            node.materializing = None

    async def stage_lazily(self, node: Node) -> StagedFile | None:
        """A staged file of none of ``node``'s chunks yet, where its version has an S3
        version id (a HEAD says): every chunk it does not hold is that version's, read when
        needed (docs/FORMAT.md §8.8).  None where it cannot be (versioning off, a small or
        revision-1 body, another version there now): the caller copies the file whole."""
        a = node.attrs
        etag = node.remote_etag
        if etag is None or a.body != 3 or a.size <= self.opt.multipart_threshold:
            return None
        key, _ = self.paths.object_key(node)
        path = self.paths.path(node)
        try:
            info = await self.store.head(key)
            if info.etag != etag or info.version_id is None:
                return None
            body = await self.fetch.cipher(node)
        except CryptfsError:
            return None
        if not isinstance(body, Body3) or node.remote_etag != etag or body.gen != a.salt:
            return None
        sf = self.staging.create(node.file_id)
        sf.size = a.size
        sf.fill, sf.fill_kept = Fill(key, path, info.version_id, etag, body), a.size
        base = Base.of(body, etag, key, info.version_id)
        sf.track(base, self.vol.segment_bytes(), a.size)
        node.stage = sf
        return sf

    async def fill(self, sf: StagedFile, first: int, last: int, node: Node | None = None) -> None:
        """Chunks [first, last] of ``sf`` that are still its version's (not staged yet) read
        from that version into their slots (none where ``sf`` was staged whole).  Returns
        early only if ``sf`` was removed meanwhile (uploaded and done with): the caller
        looks at the node's staged file again."""
        while True:
            fill = sf.fill
            if fill is None or sf.closed:
                return
            todo = sf.to_fill(first, last)
            if not todo:
                return
            got = await self.fill_from(node, fill, todo)
            if sf.closed:
                return
            if sf.fill is not fill:
                continue  # (another version holds them now, or they are all staged)
            c = self.chunk
            for i in set(todo) & set(sf.to_fill(first, last)):  # (not those written meanwhile)
                data = got[i]
                sf.write_chunk(i, data + bytes(c - len(data)))
            return

    async def fill_from(self, node: Node | None, fill: Fill, todo: list[int]) -> dict[int, bytes]:
        """Chunks ``todo`` of version ``fill``: through ``node``'s own read path where that
        is the version the node holds (not uploaded since: its block cache, whose chunks are
        checked against the version's segment heads, and its pinned GETs; a file ``rsync
        --inplace`` rewrites was just read through the mount), else, or if the node moved to
        another version meanwhile, by the version id.  (Not the memory cache: it keeps
        plaintext by file id and generation, unchecked on use, and what is staged here is
        uploaded under a fresh data key, out of reach of a pin.)"""

        def holds() -> bool:
            a = node.attrs if node is not None else None
            return (
                node is not None
                and a is not None
                and node.remote_etag == fill.etag
                and node.wrapped is not None  # (a node recovery made holds no data key)
                and (a.salt, a.body, a.size) == (fill.body.gen, 3, fill.size)
            )

        if node is not None and holds():
            got: dict[int, bytes] = {}
            runs: list[list[int]] = []
            for i in todo:
                if runs and runs[-1][-1] == i - 1:
                    runs[-1].append(i)
                else:
                    runs.append([i])
            try:
                for run in runs:
                    if not holds():
                        break  # (another version arrived: a run of it would mix two)
                    await self.fetch.fetch_chunks(node, run[0], run[-1], got)
                else:
                    if holds():
                        return got
            except PreconditionFailed:
                pass  # (replaced meanwhile, within a run: by the version id, which stays)
        return await self.fetch.version_chunks(fill.key, fill.version_id, fill.etag, fill.body,
                                               todo)  # fmt: skip

    async def refill(self, node: Node, sf: StagedFile, made: Base) -> None:
        """``sf`` (staged as only what was written) was just uploaded as ``made`` and stays
        staged (written meanwhile): its chunks not staged are that version's too, so they are
        read from it from now on (a HEAD for its version id), not from the version the edit
        began from, which a lifecycle rule may expire once it is noncurrent."""
        try:
            info = await self.store.head(made.key)
        except CryptfsError:
            return
        if info.etag != made.etag or info.version_id is None or sf.fill is None:
            return  # (replaced already: the version before stays the source)
        seg = self.vol.segment_bytes()
        body = Body3(node.file_id, made.gen, made.size, seg, self.chunk,
                     Manifest(made.size, made.mtime_ns, made.entries))  # fmt: skip
        sf.fill = Fill(made.key, self.paths.path(node), info.version_id, made.etag, body)
        sf.base = dataclasses.replace(made, version_id=info.version_id)
        node.journaled = -1
        try:
            self.journal(node)
        except OSError as e:  # (the record before names a version that still exists)
            log.warning("staging journal of %s not updated: %s", self.paths.ident(node), e)

    async def fill_all(self, node: Node, sf: StagedFile) -> None:
        """Every chunk of ``sf`` staged: it no longer needs the version it was staged from
        (an unlinked file kept for its open handles)."""
        if sf.fill is None:
            return
        step = max(1, self.opt.part_size // self.chunk)
        for first in range(0, chunk_count(sf.fill_limit, self.chunk), step):
            await self.fill(sf, first, first + step - 1, node)
        sf.fill = None
        self.journal(node)

    async def reopen_fill(
        self,
        sf: StagedFile,
        file_id: bytes,
        rec: dict[str, Any],
        current: tuple[str, bytes] | None = None,
    ) -> str | None:
        """A journal's record of where ``sf``'s chunks not staged are, after a crash: that
        version's metadata (by its id) and trailer read and checked again.  Where its
        metadata no longer authenticates (a rotation retired the master key it was sealed
        under, and resealed only the current version), the object now at ``current`` (key,
        path) is the source if it is the same body (file id and generation: a body is
        written once per generation; the rotation copied it, keeping it byte for byte; and
        its manifest must be the one journaled).  Returns that object's ETag when it is the
        source (the version the upload replaces: a rotation's copy may change the ETag)."""
        try:
            key, path, vid = str(rec["key"]), b64d(rec["path"]), str(rec["v"])
            etag, kept = str(rec["e"]), int(rec["kept"])
            gen = b64d(rec["g"]) if "g" in rec else None
            pin = b64d(rec["m"]) if "m" in rec else None
        except (KeyError, TypeError, ValueError) as e:
            raise IntegrityError(f"journal record is malformed ({type(e).__name__})") from None
        info = await self.store.head(key, version_id=vid)
        fell_back = False
        try:
            meta = self.vol.meta.decode(path, key, dict(info.metadata), info.modified)
        except (IntegrityError, UnsupportedFormat):
            fell_back = True
            if current is None or gen is None or pin is None:
                raise
            key, path = current
            info = await self.store.head(key)
            meta = self.look.decode(path, info)
            if meta.attrs.salt != gen or info.version_id is None:
                raise IntegrityError(
                    "the version a staged file was staged from no longer opens, and the file "
                    "now holds another"
                ) from None
            vid, etag = info.version_id, info.etag
        a = meta.attrs
        if meta.file_id != file_id or info.etag != etag or a.body != 3 or meta.dek is None:
            raise IntegrityError("the version a staged file was staged from is not its own")
        if gen is not None and a.salt != gen:
            raise IntegrityError("the version a staged file was staged from is not its own")
        dek = await self.vol.keyring.unwrap(meta.dek, file_id)
        seg = self.vol.segment_bytes()
        lo, ln = trailer_span(a.size, seg, self.chunk)
        _info, tail = await self.store.get(key, lo, lo + ln, if_match=etag, version_id=vid)
        body = Body3.open(dek, self.vol.volume_id, file_id, a.salt, a.size, seg, self.chunk,
                          tail)  # fmt: skip
        if pin is not None and body.manifest.pin() != pin:
            # (the same data key and generation, other bytes: sealed by whoever held that key
            # before a rotation; the journaled version's are pinned)
            self.look.tree.integrity(key, "not the version a staged file was staged from")
            raise IntegrityError("the version a staged file was staged from is not its own")
        sf.fill, sf.fill_kept = Fill(key, path, vid, etag, body), kept
        # its upload copies the segments no staged slot is in, by the version's id
        base = Base.of(body, etag, key, vid)
        sf.track(base, seg, a.size)
        sf.touched, sf.kept = sf.written(seg), kept
        return etag if fell_back else None

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
        return Base.of(body, etag, self.paths.object_key(node)[0])

    def touch(self, node: Node, *, data: bool) -> None:
        now = now_ns()
        node.attrs = node.attrs.with_(ctime_ns=now, **({"mtime_ns": now} if data else {}))
        node.change += 1

    def journal(self, node: Node, *, durable: bool = False) -> None:
        if node.stage is None or node.unlinked:
            return
        if node.journaled == node.change and not durable:
            return
        sf = node.stage
        fill = None if sf.fill is None else sf.fill.record(sf.fill_kept)
        rec = JournalRecord(self.paths.path(node), node.file_id, node.attrs, node.remote_etag,
                            fill)  # fmt: skip
        node.stage.save_journal(rec.to_dict(), durable=durable)
        node.journaled = node.change
