"""Edits of big files upload only what changed (docs/FORMAT.md §8.5 "Edits cost what
changed", §8.8): the segments still the version replaced are copied on the server
(UploadPartCopy, If-Match that version), the touched ones and the last are sealed and sent.
What is read back is what was written, whatever was copied; another writer's change meanwhile
still makes a conflict copy that holds this host's whole version."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path
from typing import Any

import pytest

from cryptfs import keyadmin
from cryptfs.cache.blocks import BlockCache
from cryptfs.cache.staging import StagingArea
from cryptfs.crypto import Secret
from cryptfs.errors import IntegrityError
from cryptfs.format import body3
from cryptfs.format.meta import ObjectMeta
from cryptfs.format.volume import KeySource
from cryptfs.fs.filesystem import Filesystem
from cryptfs.fs.model import ROOT_INO, Node, Options
from cryptfs.fs.upload import plan_parts
from cryptfs.fsck import fsck
from cryptfs.keyadmin import rotate
from cryptfs.store.memory import MemoryStore
from cryptfs.volume import Volume
from tests import attacker
from tests import reference_decryptor as ref
from tests.fsutil import read_file, write_file
from tests.unit.test_filesystem import make_fs

C, S = 4096, 1 << 14  # chunks of 4 KiB, segments of 16 KiB
SEG = body3.segment_size(S, C)


async def _fs(tmp_path: Path, store: MemoryStore, cache: str | None = None) -> Filesystem:
    """A mount whose files above 2 segments go up in parts of at least one segment (S3's
    least part, scaled down: the store refuses a smaller part but the last); ``cache``: the
    name of its cache directory (another mount's: a remount after a crash)."""
    src = KeySource(keyfile=Secret(b"k" * 32))
    try:
        vol = await Volume.open(store, src)
    except Exception:
        vol = await Volume.create(store, src, chunk_log2=12, encrypt_names=True, segment_log2=14)
    store.min_part = SEG
    staging = StagingArea(tmp_path / (cache or os.urandom(4).hex()), vol.keys.cache, vol.chunk)
    opt = Options(writeback_delay=0.1, metadata_ttl=0, multipart_threshold=2 * S, part_size=S)
    fs = Filesystem(vol, staging, opt)
    await fs.ensure_root()
    return fs


async def _edit(fs: Filesystem, name: bytes, offset: int | None, data: bytes) -> None:
    """Write ``data`` at ``offset`` (None: append) into an existing file, and sync it."""
    node = await fs.lookup(ROOT_INO, name)
    h = await fs.open(node.ino, os.O_WRONLY | (os.O_APPEND if offset is None else 0))
    await fs.write(h.fh, offset or 0, data)
    await fs.release(h.fh)
    await fs.sync_node(node)


async def _read_elsewhere(
    tmp_path: Path, size: int
) -> tuple[MemoryStore, Filesystem, Node, bytearray]:
    """A bucket with versioning on holding /f (``size`` random bytes, written by one mount),
    and another mount that has looked it up: its store, that mount, its node, the bytes."""
    store = MemoryStore()
    store.versioned = True
    fs = await _fs(tmp_path, store)
    data = bytearray(os.urandom(size))
    await write_file(fs, ROOT_INO, b"f", bytes(data))
    fs2 = await _fs(tmp_path, store)
    return store, fs2, await fs2.lookup(ROOT_INO, b"f"), data


async def _check(tmp_path: Path, store: MemoryStore, name: bytes, want: bytes) -> None:
    """A fresh mount reads ``want``, by ranges and whole."""
    fs = await _fs(tmp_path, store)
    node = await fs.lookup(ROOT_INO, name)
    assert node.attrs.size == len(want)
    assert await read_file(fs, node.ino) == want
    h = await fs.open(node.ino, os.O_RDONLY)
    for off in (0, S - 7, 3 * S + 100, len(want) - 10):
        assert await fs.read(h.fh, off, 300) == want[off : off + 300]
    await fs.release(h.fh)


def test_plan_parts_keeps_s3s_part_rules() -> None:
    rnd = random.Random(7)
    for _ in range(5000):
        n = rnd.randint(1, 40)
        per = rnd.randint(1, 4)
        most = rnd.randint(2 * per + 2, 14)
        full = rnd.random() < 0.5
        copy = [rnd.random() < 0.8 for _ in range(n)]
        plan = plan_parts(copy, per, most, last_counts=full)
        assert plan[0][1] == 0 and plan[-1][2] == n and not plan[-1][0]  # (the trailer's)
        for (c, f, e), nxt in zip(plan, [*plan[1:], None], strict=True):
            assert f < e or (f == e == n and nxt is None)
            if nxt is not None:
                assert nxt[1] == e  # contiguous, in order
                whole = e - f - (e == n and not full)
                assert whole >= per  # every part but the last: S3's least part
            if c:
                assert e - f <= most and all(copy[f:e])
    # an append: every segment but the last copied, in parts of at most `most`
    assert plan_parts([True] * 9 + [False], 1, 4) == [
        (True, 0, 3), (True, 3, 6), (True, 6, 9), (False, 9, 10)
    ]  # fmt: skip
    # a write in the middle: the last segment copied too, and the trailer alone last
    assert plan_parts([True, True, False, True, True], 1, 4, last_counts=False) == [
        (True, 0, 2), (False, 2, 3), (True, 3, 5), (False, 5, 5)
    ]  # fmt: skip
    # ... unless the run it ends is too short without it
    assert plan_parts([True, True, False, True], 1, 4, last_counts=False) == [
        (True, 0, 2), (False, 2, 3), (False, 3, 4)
    ]  # fmt: skip
    # a copy run too short to be a part is sealed with its neighbours
    assert plan_parts([False, True, False, False], 2, 6) == [(False, 0, 2), (False, 2, 4)]


@pytest.mark.trio
@pytest.mark.parametrize(
    "where", ["append", "middle", "first", "across", "into-last", "extend-hole"]
)
async def test_an_edit_sends_only_the_segments_it_touches(tmp_path: Path, where: str) -> None:
    store = MemoryStore()
    fs = await _fs(tmp_path, store)
    data = bytearray(os.urandom(10 * S + 1234))
    await write_file(fs, ROOT_INO, b"f", bytes(data))
    fs2 = await _fs(tmp_path, store)  # (another mount: nothing of the file staged or cached)
    offset, new = {
        "append": (None, os.urandom(3000)),
        "middle": (5 * S + 100, os.urandom(4096)),
        "first": (0, os.urandom(10)),
        "across": (3 * S - 50, os.urandom(100)),
        "into-last": (10 * S + 1000, os.urandom(5000)),
        "extend-hole": (13 * S + 5, os.urandom(100)),
    }[where]
    at = len(data) if offset is None else offset
    if at > len(data):
        data += bytes(at - len(data))
    data[at : at + len(new)] = new
    sent = store.part_bytes
    await _edit(fs2, b"f", offset, new)
    sent = store.part_bytes - sent
    touched = {j for j in range(at // S, (at + len(new) - 1) // S + 1)}
    n = body3.segments_of(len(data), S)
    old_len = 10 * S + 1234
    if len(data) > old_len:
        touched |= set(range(10, n))  # the old last segment, grown, and those after it
    # the others are copied, the last one too when untouched (the trailer is a part alone)
    copied = sum(min(S, old_len - j * S) for j in range(11) if j not in touched)
    assert fs2.counters()["upload_copied_bytes"] == copied
    assert store.calls.get("upload_part_copy", 0) >= 1
    assert sent <= len(touched) * SEG + body3.trailer_size(n)
    await _check(tmp_path, store, b"f", bytes(data))


@pytest.mark.trio
async def test_a_cut_and_extended_file_copies_nothing_that_was_cut(tmp_path: Path) -> None:
    """Truncated into segment 4, then extended back past the old end: segments 4 to 10
    are zeros now (sealed and sent), not the old bytes (not copied)."""
    store = MemoryStore()
    fs = await _fs(tmp_path, store)
    data = os.urandom(10 * S + 1234)
    await write_file(fs, ROOT_INO, b"f", data)
    node = await fs.lookup(ROOT_INO, b"f")
    await fs.setattr(node.ino, size=4 * S + 10)
    await fs.setattr(node.ino, size=len(data))
    await fs.sync_node(node)
    assert fs.counters()["upload_copied_bytes"] == 4 * S
    await _check(tmp_path, store, b"f", data[: 4 * S + 10] + bytes(len(data) - 4 * S - 10))


@pytest.mark.trio
async def test_repeated_edits_each_copy_from_the_version_before(tmp_path: Path) -> None:
    """An append loop with a sync each time, on a file kept open: every upload copies all but
    the segments the appends since the last one touched (its base is the version it made)."""
    store = MemoryStore()
    fs = await _fs(tmp_path, store)
    data = os.urandom(8 * S)
    await write_file(fs, ROOT_INO, b"f", data)
    node = await fs.lookup(ROOT_INO, b"f")
    h = await fs.open(node.ino, os.O_WRONLY | os.O_APPEND)
    for _ in range(6):
        line = os.urandom(S // 3)
        await fs.write(h.fh, 0, line)
        data += line
        before, copied = store.part_bytes, fs.counters()["upload_copied_bytes"]
        await fs.fsync(h.fh)
        assert store.part_bytes - before <= 2 * SEG + body3.trailer_size(12)
        assert fs.counters()["upload_copied_bytes"] - copied >= (len(data) // S - 2) * S
    await fs.release(h.fh)
    await _check(tmp_path, store, b"f", data)


@pytest.mark.trio
async def test_a_write_during_the_upload_is_in_the_next_one(tmp_path: Path) -> None:
    """A write into a segment the upload is copying lands after the copy's plan: that upload
    has the old bytes there, and the next one (the node stays dirty) sends the new ones."""
    store = MemoryStore()
    fs = await _fs(tmp_path, store)
    data = bytearray(os.urandom(10 * S))
    await write_file(fs, ROOT_INO, b"f", bytes(data))
    node = await fs.lookup(ROOT_INO, b"f")
    h = await fs.open(node.ino, os.O_WRONLY)
    await fs.write(h.fh, 9 * S + 5, b"tail")
    data[9 * S + 5 : 9 * S + 9] = b"tail"
    copy = store.upload_part_copy
    wrote = False

    async def copy_and_write(*a: object, **kw: object) -> str:
        nonlocal wrote
        if not wrote:
            wrote = True
            await fs.write(h.fh, 2 * S + 7, b"during")  # (a segment being copied)
            data[2 * S + 7 : 2 * S + 13] = b"during"
        return await copy(*a, **kw)  # type: ignore[arg-type]

    store.upload_part_copy = copy_and_write  # type: ignore[method-assign]
    await fs.sync_node(node)
    assert wrote
    store.upload_part_copy = copy  # type: ignore[method-assign]
    await fs.fsync(h.fh)
    await fs.release(h.fh)
    assert not node.dirty
    await _check(tmp_path, store, b"f", bytes(data))


@pytest.mark.trio
@pytest.mark.parametrize("versioned", [False, True])
async def test_another_writer_meanwhile_makes_a_whole_conflict_copy(
    tmp_path: Path, versioned: bool
) -> None:
    """Host B replaces the file between host A's write and its upload: A's copy from the
    version it edited fails (If-Match), and A's whole version (the bytes it did not write
    included) is saved as the conflict copy; B's stays under the name.  On a bucket with
    versioning on, A staged only its write, and the conflict copy's untouched segments are
    copied from the version A edited, by id (B's write did not change that version)."""
    store = MemoryStore()
    store.versioned = versioned
    a = await _fs(tmp_path, store)
    data = bytearray(os.urandom(10 * S + 99))
    await write_file(a, ROOT_INO, b"f", bytes(data))
    b = await _fs(tmp_path, store)
    node = await a.lookup(ROOT_INO, b"f")
    h = await a.open(node.ino, os.O_WRONLY)
    await a.write(h.fh, 4 * S, b"A's edit")
    data[4 * S : 4 * S + 8] = b"A's edit"
    assert node.stage is not None and (node.stage.fill is not None) == versioned
    theirs = os.urandom(11 * S)
    await _edit(b, b"f", 0, theirs)
    await a.release(h.fh)
    got = store.get_bytes
    await a.sync_node(node)
    assert a.counters()["conflicts"] == 1
    assert store.calls["upload_part_copy"] >= 1  # (tried, refused: If-Match; or by id)
    if versioned:
        assert store.get_bytes - got < 3 * SEG  # (copied from the version by id, not fetched)
    (cname,) = [n for n in await _names(a) if n.startswith(b"f.conflict-")]
    await _check(tmp_path, store, cname, bytes(data))
    await _check(tmp_path, store, b"f", theirs)


async def _names(fs: Filesystem) -> list[bytes]:
    return [name for name, _node in await fs.readdir(ROOT_INO)]


@pytest.mark.trio
async def test_a_failed_upload_keeps_what_it_took(tmp_path: Path) -> None:
    """An upload that fails (S3 down) gives back the segments it took as touched: the
    retry sends them, it does not copy the old bytes."""
    store = MemoryStore()
    fs = await _fs(tmp_path, store)
    data = bytearray(os.urandom(10 * S))
    await write_file(fs, ROOT_INO, b"f", bytes(data))
    node = await fs.lookup(ROOT_INO, b"f")
    h = await fs.open(node.ino, os.O_WRONLY)
    await fs.write(h.fh, 3 * S, b"x" * 10)
    data[3 * S : 3 * S + 10] = b"x" * 10
    complete = store.complete_multipart

    async def down(*a: object, **kw: object) -> str:
        from cryptfs.errors import StoreError

        raise StoreError("S3 is down")

    store.complete_multipart = down  # type: ignore[method-assign]
    with pytest.raises(Exception, match="down"):
        await fs.sync_node(node)
    store.complete_multipart = complete  # type: ignore[method-assign]
    await fs.fsync(h.fh)
    await fs.release(h.fh)
    await _check(tmp_path, store, b"f", bytes(data))


# -- a bucket with versioning on: only what is written is staged (FORMAT.md §8.8, point 2) --


@pytest.mark.trio
@pytest.mark.parametrize("where", ["append", "middle", "across", "into-last", "truncate"])
async def test_on_a_versioned_bucket_an_edit_fetches_only_what_it_partly_overwrites(
    tmp_path: Path, where: str
) -> None:
    """A 10-segment file edited on another mount: the first write returns after fetching at
    most the chunks it partly overwrites (none of the file staged whole); the upload fetches
    the rest of the segments it rebuilds and copies the others by the version's id; reads
    meanwhile see the edit over the old bytes."""
    store, fs2, node, data = await _read_elsewhere(tmp_path, 10 * S + 1234)
    h = await fs2.open(node.ino, os.O_RDWR)
    got = store.get_bytes
    at = 0
    if where == "truncate":
        await fs2.setattr(node.ino, size=6 * S + 77)
        del data[6 * S + 77 :]
    else:
        at, new = {
            "append": (len(data), os.urandom(3000)),
            "middle": (5 * S + 100, os.urandom(4096)),
            "across": (3 * S - 50, os.urandom(100)),
            "into-last": (10 * S + 1000, os.urandom(5000)),
        }[where]
        await fs2.write(h.fh, at, new)
        data[at : at + len(new)] = new
    first = store.get_bytes - got
    assert first <= 3 * (C + 16) + SEG // 2, first  # a trailer, a head, two chunks at most
    assert node.stage is not None and node.stage.fill is not None  # (staged lazily)
    lo = max(0, (at if where != "truncate" else len(data)) - C - 10)
    assert await fs2.read(h.fh, lo, 3 * C) == bytes(data[lo : lo + 3 * C])  # (fills in)
    await fs2.release(h.fh)
    await fs2.sync_node(node)
    assert store.get_bytes - got < 4 * SEG  # never the whole file (10 segments)
    assert fs2.counters()["upload_copied_bytes"] >= 5 * S
    await _check(tmp_path, store, b"f", bytes(data))


@pytest.mark.trio
@pytest.mark.parametrize("replaced", [False, True])
async def test_a_staged_file_of_only_what_was_written_survives_a_crash(
    tmp_path: Path, replaced: bool
) -> None:
    """Closed, not uploaded, and the process dies: the next mount finds the version the rest
    is in from the journal (by id, checked again) and uploads the whole file; if another
    host replaced the file meanwhile, as a conflict copy."""
    store = MemoryStore()
    store.versioned = True
    _fs1, data = await _lazy_edit_closed(tmp_path, store, cut=9 * S + 1)
    theirs = os.urandom(3 * S)
    if replaced:
        await _edit(await _fs(tmp_path, store), b"f", 0, theirs)
    fs2 = await _fs(tmp_path, store, "crash")
    assert await fs2.recover() == 1
    if replaced:
        (cname,) = [n for n in await _names(fs2) if n.startswith(b"f.conflict-")]
        await _check(tmp_path, store, cname, bytes(data))
    else:
        await _check(tmp_path, store, b"f", bytes(data))


@pytest.mark.trio
@pytest.mark.allow_error_logs
async def test_a_tampered_version_is_never_served(tmp_path: Path) -> None:
    """The version a staged file reads its other chunks from is checked as any read: a
    bucket writer who changes that version's bytes (here: the store's copy of it) makes the
    read EIO, nothing of theirs is staged; the upload copies that segment as it is (on the
    server: unread) under the hash the version's manifest pins, so it reads EIO there too,
    and the rest of the file reads."""
    store = MemoryStore()
    store.versioned = True
    fs = await _fs(tmp_path, store)
    data = os.urandom(10 * S)
    await write_file(fs, ROOT_INO, b"f", data)
    fs2 = await _fs(tmp_path, store)
    node = await fs2.lookup(ROOT_INO, b"f")
    h = await fs2.open(node.ino, os.O_RDWR)
    await fs2.write(h.fh, 0, b"x" * C)  # (a whole chunk: nothing fetched)
    sf = node.stage
    assert sf is not None and sf.fill is not None
    vid = sf.fill.version_id
    body, md, etag = store.versions[vid]
    bad = bytearray(body)
    bad[2 * SEG + 500] ^= 1  # (a chunk of segment 2)
    store.versions[vid] = (bytes(bad), md, etag)  # (a bit flipped in the server's copy:
    store.objects[sf.fill.key] = (bytes(bad), md, etag)  # the current version is that one)
    with pytest.raises(IntegrityError):
        await fs2.read(h.fh, 2 * S, 100)
    assert await fs2.read(h.fh, 5 * S, 100) == data[5 * S : 5 * S + 100]
    await fs2.release(h.fh)
    await fs2.sync_node(node)
    assert fs2.integrity_failures >= 1
    fs3 = await _fs(tmp_path, store)
    n3 = await fs3.lookup(ROOT_INO, b"f")
    h3 = await fs3.open(n3.ino, os.O_RDONLY)
    assert await fs3.read(h3.fh, 0, C + 10) == b"x" * C + data[C : C + 10]
    assert await fs3.read(h3.fh, 5 * S, 100) == data[5 * S : 5 * S + 100]
    with pytest.raises(IntegrityError):
        await fs3.read(h3.fh, 2 * S, 100)


# -- the independent review's findings (each failed before its fix) --


@pytest.mark.trio
async def test_a_read_whose_fill_outlives_the_upload_reads_again(tmp_path: Path) -> None:
    """A reader's fill is in flight when the upload ends and drops the staged file: the read
    goes again from the file as uploaded (it raised EBADF: the fill read a closed file)."""
    store, fs2, node, data = await _read_elsewhere(tmp_path, 10 * S)
    h = await fs2.open(node.ino, os.O_RDWR)
    await fs2.write(h.fh, 0, b"x" * C)
    data[0:C] = b"x" * C
    await fs2.release(h.fh)
    r = await fs2.open(node.ino, os.O_RDONLY)
    get, armed = store.get, True

    async def get_during_upload(*a: Any, **kw: Any) -> Any:
        nonlocal armed
        if armed:
            armed = False
            await fs2.sync_node(node)  # the upload ends while this GET is in flight
            assert node.stage is None
        return await get(*a, **kw)

    store.get = get_during_upload  # type: ignore[method-assign]
    assert await fs2.read(r.fh, 5 * S, 100) == bytes(data[5 * S : 5 * S + 100])
    assert not armed


@pytest.mark.trio
async def test_an_edit_renamed_with_its_directory_copies_from_the_new_key(
    tmp_path: Path,
) -> None:
    """Unversioned: ``mv d e`` between an edit of ``d/f`` and its upload. The upload copies
    the untouched segments from ``e/f`` (the rename's copy: same body, same ETag), not from
    ``d/f``, which is gone (every upload failed with NotFound, retried for ever)."""
    store = MemoryStore()
    fs = await _fs(tmp_path, store)
    d = await fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    data = bytearray(os.urandom(10 * S))
    await write_file(fs, d.ino, b"f", bytes(data))
    fs2 = await _fs(tmp_path, store)
    node = await fs2.lookup((await fs2.lookup(ROOT_INO, b"d")).ino, b"f")
    h = await fs2.open(node.ino, os.O_WRONLY)
    await fs2.write(h.fh, 5 * S + 3, b"edit")
    data[5 * S + 3 : 5 * S + 7] = b"edit"
    await fs2.release(h.fh)
    fs2.writeback.due.clear()
    await fs2.rename(ROOT_INO, b"d", ROOT_INO, b"e", 0)
    await fs2.sync_node(node)
    assert fs2.counters()["upload_copied_bytes"] > 0 and fs2.counters()["conflicts"] == 0
    fs3 = await _fs(tmp_path, store)
    n3 = await fs3.lookup((await fs3.lookup(ROOT_INO, b"e")).ino, b"f")
    assert await read_file(fs3, n3.ino) == bytes(data)


@pytest.mark.trio
async def test_a_busy_edit_reads_from_the_version_it_last_uploaded(tmp_path: Path) -> None:
    """A file written during each upload stays staged; its chunks not staged are read from
    the version last uploaded (by its id), not the one the edit began from, which is
    noncurrent and which a lifecycle rule then expires (reads failed with ENOENT)."""
    store, fs2, node, data = await _read_elsewhere(tmp_path, 10 * S)
    h = await fs2.open(node.ino, os.O_RDWR)
    await fs2.write(h.fh, 0, b"x" * C)
    data[0:C] = b"x" * C
    sf = node.stage
    assert sf is not None and sf.fill is not None
    first = sf.fill.version_id
    copy, wrote = store.upload_part_copy, False

    async def copy_and_write(*a: Any, **kw: Any) -> str:
        nonlocal wrote
        if not wrote:
            wrote = True
            await fs2.write(h.fh, C, b"y" * C)  # (during the upload: the file stays dirty)
            data[C : 2 * C] = b"y" * C
        return await copy(*a, **kw)  # type: ignore[arg-type]

    store.upload_part_copy = copy_and_write  # type: ignore[method-assign]
    async with node.lock:
        await fs2.writeback.sync_locked(node)  # (one upload: sync_node would go on)
    store.upload_part_copy = copy  # type: ignore[method-assign]
    assert node.stage is sf and sf.fill is not None and sf.fill.version_id != first
    del store.versions[first]  # (expired by a lifecycle rule)
    assert await fs2.read(h.fh, 6 * S, 100) == bytes(data[6 * S : 6 * S + 100])
    await fs2.release(h.fh)
    await fs2.sync_node(node)
    await _check(tmp_path, store, b"f", bytes(data))


@pytest.mark.trio
async def test_an_edit_staged_lazily_survives_a_rotation_before_its_upload(
    tmp_path: Path,
) -> None:
    """Closed, not uploaded (a crash, or S3 down), then the master key is rotated: the
    version the edit began from has metadata under the retired key now, but the rotation
    resealed the current object, the same body (file id and generation), which recovery
    reads the rest from (it was left staged for ever: the edit was lost)."""
    store = MemoryStore()
    store.versioned = True
    _fs1, data = await _lazy_edit_closed(tmp_path, store)
    await _rotate(store)
    fs2 = await _new_key_fs(tmp_path, store, "crash")
    assert await fs2.recover() == 1
    assert await read_file(fs2, (await fs2.lookup(ROOT_INO, b"f")).ino) == bytes(data)
    assert fs2.integrity_failures == 0


@pytest.mark.trio
async def test_a_journal_of_a_lazy_edit_is_one_an_older_cryptfs_refuses(tmp_path: Path) -> None:
    """Its records have a magic of their own: a cryptfs from before them skips them (and
    keeps the file staged) instead of uploading the chunks not staged as zeros."""
    store = MemoryStore()
    store.versioned = True
    fs = await _fs(tmp_path, store)
    await write_file(fs, ROOT_INO, b"f", os.urandom(10 * S))
    fs2 = await _fs(tmp_path, store)
    node = await fs2.lookup(ROOT_INO, b"f")
    h = await fs2.open(node.ino, os.O_WRONLY)
    await fs2.write(h.fh, 3, b"x")
    await fs2.release(h.fh)
    assert node.stage is not None and node.stage.fill is not None
    raw = node.stage.journal_path.read_bytes()
    assert raw[:4] == b"CFJ3" and b"CFJ2" not in raw[:4]


@pytest.mark.trio
async def test_bytes_cut_before_an_upload_plans_its_parts_never_come_back_in_it(
    tmp_path: Path,
) -> None:
    """A truncate (and extend) while an upload's data key is being made, before its parts are
    planned: the upload does not copy the old bytes of the segments cut (it copied them: an
    intermediate version showed bytes the user had cut). A cut after the plan is like a write
    after a part was built: in the next upload, which the node's change makes at once."""
    store = MemoryStore()
    fs = await _fs(tmp_path, store)
    data = bytearray(os.urandom(10 * S))
    await write_file(fs, ROOT_INO, b"f", bytes(data))
    node = await fs.lookup(ROOT_INO, b"f")
    h = await fs.open(node.ino, os.O_WRONLY)
    await fs.write(h.fh, 9 * S, b"z")
    keyring = fs.vol.keyring
    new_dek = keyring.new_dek

    async def cut_meanwhile(*a: Any, **kw: Any) -> Any:
        keyring.new_dek = new_dek  # type: ignore[method-assign]
        await fs.setattr(node.ino, size=2 * S)
        await fs.setattr(node.ino, size=10 * S)
        return await new_dek(*a, **kw)

    keyring.new_dek = cut_meanwhile  # type: ignore[method-assign]
    uploaded = []
    put = store.complete_multipart

    async def keep(key: str, upload_id: str, etags: list[str], **kw: Any) -> str:
        out = await put(key, upload_id, etags, **kw)
        uploaded.append(store.objects[key][0])
        return out

    store.complete_multipart = keep  # type: ignore[method-assign]
    await fs.sync_node(node)
    await fs.release(h.fh)
    await fs.sync_node(node)
    want = bytes(data[: 2 * S]) + bytes(8 * S)
    await _check(tmp_path, store, b"f", want)
    # every version uploaded: the bytes cut appear in none (segment 5 of the original)
    assert all(bytes(data[5 * S : 5 * S + 64]) not in body for body in uploaded)
    assert fs.counters()["upload_copied_bytes"] <= 2 * S + 2 * S


# -- the second review's findings --


async def _new_key_fs(tmp_path: Path, store: MemoryStore, cache: str) -> Filesystem:
    """A mount with the key a rotation moved the volume to (b"n" * 32), on ``cache``."""
    vol = await Volume.open(store, KeySource(keyfile=Secret(b"n" * 32)))
    staging = StagingArea(tmp_path / cache, vol.keys.cache, vol.chunk)
    opt = Options(writeback_delay=0.1, metadata_ttl=0, multipart_threshold=2 * S, part_size=S)
    fs = Filesystem(vol, staging, opt)
    await fs.ensure_root()
    return fs


async def _rotate(store: MemoryStore) -> None:
    await rotate(await Volume.open(store, KeySource(keyfile=Secret(b"k" * 32))),
                 to_source=KeySource(keyfile=Secret(b"n" * 32)), settle=0)  # fmt: skip


async def _lazy_edit_closed(
    tmp_path: Path, store: MemoryStore, cut: int | None = None
) -> tuple[Filesystem, bytearray]:
    """/f, 10 segments, edited on a mount whose cache is "crash" (staged lazily, and cut to
    ``cut`` bytes if given) and closed: journaled, not uploaded; returns it and the bytes."""
    fs = await _fs(tmp_path, store, "crash")
    data = bytearray(os.urandom(10 * S + 5))
    await write_file(fs, ROOT_INO, b"f", bytes(data))
    node = await fs.lookup(ROOT_INO, b"f")
    h = await fs.open(node.ino, os.O_WRONLY)
    await fs.write(h.fh, 7 * S + 3, b"before the crash")
    data[7 * S + 3 : 7 * S + 19] = b"before the crash"
    if cut is not None:
        await fs.setattr(node.ino, size=cut)  # (a cut: journaled too)
        del data[cut:]
    assert node.stage is not None and node.stage.fill is not None
    await fs.release(h.fh)  # journaled; the process dies here (or S3 is down until it ends)
    return fs, data


@pytest.mark.trio
@pytest.mark.allow_error_logs
async def test_recovery_after_a_rotation_refuses_a_body_forged_under_the_old_data_key(
    tmp_path: Path,
) -> None:
    """Whoever unwrapped the file's data key before the rotation seals a body of their own
    under it (same generation) and puts the rotated, authentic metadata on it: recovery's
    fallback to the current object must not read the edit's other chunks from it (it did:
    their bytes went up as the user's). The journal pins the version's manifest; the edit
    stays staged, nothing of theirs is uploaded."""
    store = MemoryStore()
    store.versioned = True
    fs, _data = await _lazy_edit_closed(tmp_path, store)
    node = await fs.lookup(ROOT_INO, b"f")
    dek = await fs.vol.keyring.unwrap(node.wrapped, node.file_id)  # (the attacker's, before)
    key = fs.paths.object_key(node)[0]
    await _rotate(store)
    _body, md, _etag = store.objects[key]
    forged = body3.seal_body(dek, fs.vol.volume_id, node.file_id, node.attrs.salt,
                             b"E" * (10 * S + 5), 0, S, C)  # fmt: skip
    await store.put(key, forged, md)
    fs2 = await _new_key_fs(tmp_path, store, "crash")
    assert await fs2.recover() == 0
    assert fs2.unrecovered == [b"/f"] and fs2.integrity_failures >= 1
    assert all(b"EEEE" not in body for body, _md, _e in store.versions.values() if body != forged)


class _CopyChangesETag(MemoryStore):
    """As AWS may for a copy of a multipart object: the copy's ETag is its body's MD5."""

    async def copy(self, src: str, dst: str, metadata: Any, **kw: Any) -> str:
        await super().copy(src, dst, metadata, **kw)
        data, md, _etag = self.objects[dst]
        etag = f'"{hashlib.md5(data).hexdigest()}"'
        self._set(dst, (data, md, etag))
        return etag


@pytest.mark.trio
async def test_recovery_after_a_rotation_whose_copies_changed_the_etag(tmp_path: Path) -> None:
    """The rotation's copy gave the object another ETag: recovery replaces that version (the
    same body), no conflict copy (the edit went into one, and the name kept the old bytes)."""
    store = _CopyChangesETag()
    store.versioned = True
    _fs1, data = await _lazy_edit_closed(tmp_path, store)
    await _rotate(store)
    fs2 = await _new_key_fs(tmp_path, store, "crash")
    assert await fs2.recover() == 1
    assert fs2.counters()["conflicts"] == 0
    assert await read_file(fs2, (await fs2.lookup(ROOT_INO, b"f")).ino) == bytes(data)


@pytest.mark.trio
async def test_a_lazy_edit_renamed_before_a_crash_and_a_rotation_is_kept(tmp_path: Path) -> None:
    """``mv f g`` of a file holding a lazy edit deletes f's object: what the edit would read
    its other chunks from is then a noncurrent version no rotation vouches for. The rename
    stages the rest first, and recovery after a rotation uploads the whole edit as g (it
    stayed staged for ever: the edit was lost)."""
    store = MemoryStore()
    store.versioned = True
    fs, data = await _lazy_edit_closed(tmp_path, store)
    fs.writeback.due.clear()
    await fs.rename(ROOT_INO, b"f", ROOT_INO, b"g", 0)
    node = await fs.lookup(ROOT_INO, b"g")
    assert node.stage is not None and node.stage.fill is None
    await _rotate(store)
    fs2 = await _new_key_fs(tmp_path, store, "crash")
    assert await fs2.recover() == 1
    assert await read_file(fs2, (await fs2.lookup(ROOT_INO, b"g")).ino) == bytes(data)


# -- pinned bodies (FORMAT.md §8.5): a rotation pins what the old data key could reseal --


@pytest.mark.trio
@pytest.mark.allow_error_logs
async def test_a_rotation_pins_bodies_whose_data_key_predates_it(tmp_path: Path) -> None:
    """After a rotation, a body sealed under a file's old data key with its generation, put
    under its rotated (authentic) metadata, reads EIO (it was served: found by the second
    review); the pin survives a chmod and a rename, a new upload (a fresh data key) drops
    it, and a second rotation leaves pinned objects alone."""
    store = MemoryStore()
    fs = await _fs(tmp_path, store)
    big, small = os.urandom(10 * S + 5), os.urandom(100)
    await write_file(fs, ROOT_INO, b"f", big)
    await write_file(fs, ROOT_INO, b"g", small)
    node = await fs.lookup(ROOT_INO, b"f")
    dek = await fs.vol.keyring.unwrap(node.wrapped, node.file_id)  # (the thief's, before)
    key = fs.paths.object_key(node)[0]
    await _rotate(store)
    fs2 = await _new_key_fs(tmp_path, store, "after")
    for name, want in ((b"f", big), (b"g", small)):
        n = await fs2.lookup(ROOT_INO, name)
        assert len(n.attrs.pin) == 32 and await read_file(fs2, n.ino) == want
    await fs2.setattr((await fs2.lookup(ROOT_INO, b"g")).ino, mode=0o600)
    await fs2.rename(ROOT_INO, b"g", ROOT_INO, b"h", 0)
    await fs2.flush_all()
    fs3 = await _new_key_fs(tmp_path, store, "later")
    h = await fs3.lookup(ROOT_INO, b"h")
    assert len(h.attrs.pin) == 32 and await read_file(fs3, h.ino) == small
    objects = {k: (b, md) for k, (b, md, _e) in store.objects.items()}
    assert ref.decrypt_volume(objects, b"n" * 32)[b"/f"]["data"] == big  # (from the document)
    _body, md, _etag = store.objects[key]
    forged = body3.seal_body(dek, fs.vol.volume_id, node.file_id, node.attrs.salt,
                             b"E" * len(big), 0, S, C)  # fmt: skip
    await store.put(key, forged, md)
    with pytest.raises(ref.Invalid, match="pins"):
        ref.decrypt_volume({k: (b, md) for k, (b, md, _e) in store.objects.items()}, b"n" * 32)
    fs4 = await _new_key_fs(tmp_path, store, "forged")
    with pytest.raises(IntegrityError):
        await read_file(fs4, (await fs4.lookup(ROOT_INO, b"f")).ino)
    assert fs4.integrity_failures >= 1
    # a new version has a data key of its own, and no pin
    await _edit(fs3, b"h", 0, b"new bytes")
    fs5 = await _new_key_fs(tmp_path, store, "new")
    h5 = await fs5.lookup(ROOT_INO, b"h")
    assert h5.attrs.pin == b"" and (await read_file(fs5, h5.ino))[:9] == b"new bytes"


@pytest.mark.trio
@pytest.mark.allow_error_logs
async def test_a_rotation_pins_small_revision_1_bodies_a_symlink_s_target_included(
    tmp_path: Path,
) -> None:
    """Symlinks (and, on volumes without segments, files) have §2 bodies: a rotation pins
    those it can have a reader check whole (up to 4 MiB), so the holder of a symlink's old
    data key cannot point it elsewhere afterwards (it could: the target was served); a
    bigger one is counted as not pinned."""
    store = MemoryStore()
    fs = await _fs(tmp_path, store)
    await fs.symlink(ROOT_INO, b"l", b"/home/owner/ledger", 0, 0)
    await fs.flush_all()
    link = await fs.lookup(ROOT_INO, b"l")
    dek = await fs.vol.keyring.unwrap(link.wrapped, link.file_id)  # (the thief's, before)
    key = fs.paths.object_key(link)[0]
    report = await rotate(await Volume.open(store, KeySource(keyfile=Secret(b"k" * 32))),
                          to_source=KeySource(keyfile=Secret(b"n" * 32)), settle=0)  # fmt: skip
    assert report.pinned >= 1 and report.unpinned == 0
    fs2 = await _new_key_fs(tmp_path, store, "after")
    n2 = await fs2.lookup(ROOT_INO, b"l")
    assert len(n2.attrs.pin) == 32 and await fs2.readlink(n2.ino) == b"/home/owner/ledger"
    _body, md, _etag = store.objects[key]
    forged = attacker.seal_body(
        dek.reveal(), link.file_id, link.attrs.salt, 12, b"/tmp/evil/ledger12"
    )
    await store.put(key, forged, md)
    fs3 = await _new_key_fs(tmp_path, store, "forged")
    with pytest.raises(IntegrityError):
        await fs3.readlink((await fs3.lookup(ROOT_INO, b"l")).ino)
    assert fs3.integrity_failures >= 1


@pytest.mark.trio
@pytest.mark.allow_error_logs
async def test_a_pin_sealed_under_the_old_key_is_made_again_by_the_rotation(
    tmp_path: Path,
) -> None:
    """Before the rotation, the holder of the old key writes, under it, the pin of a body of
    their own into the file's metadata (the genuine body stays); the rotation must not carry
    that pin over (it did: their body, put after the rotation, was served; found by the
    third review). It pins the body it reads."""
    store = MemoryStore()
    fs = await _fs(tmp_path, store)
    data = os.urandom(10 * S + 5)
    await write_file(fs, ROOT_INO, b"f", data)
    node = await fs.lookup(ROOT_INO, b"f")
    dek = await fs.vol.keyring.unwrap(node.wrapped, node.file_id)
    key = fs.paths.object_key(node)[0]
    vid, fid, gen = fs.vol.volume_id, node.file_id, node.attrs.salt
    forged = body3.seal_body(dek, vid, fid, gen, b"E" * len(data), 0, S, C)
    lo = body3.trailer_span(len(data), S, C)[0]
    body3.Body3.open(dek, vid, fid, gen, len(data), S, C, forged[lo:])  # (it opens)
    their_pin = body3.trailer_pin(forged, len(data), S, C)
    genuine, _md, _etag = store.objects[key]
    meta = ObjectMeta(fid, node.attrs.with_(pin=their_pin), node.wrapped, None)
    await store.put(key, genuine, fs.vol.meta.encode(b"", key, meta))
    report = await rotate(await Volume.open(store, KeySource(keyfile=Secret(b"k" * 32))),
                          to_source=KeySource(keyfile=Secret(b"n" * 32)), settle=0)  # fmt: skip
    assert report.pinned >= 1
    _body, md, _etag = store.objects[key]
    await store.put(key, forged, md)
    fs2 = await _new_key_fs(tmp_path, store, "after")
    with pytest.raises(IntegrityError):
        await read_file(fs2, (await fs2.lookup(ROOT_INO, b"f")).ino)


@pytest.mark.trio
@pytest.mark.allow_error_logs
@pytest.mark.parametrize("put_after", [False, True])
async def test_a_pinned_revision_1_body_is_never_read_from_the_block_cache(
    tmp_path: Path, put_after: bool
) -> None:
    """A symlink's forged body was read (and kept in the block cache) before the rotation
    pinned the genuine one: a mount restarted on that cache with the new key reads the
    body from S3 and checks it (the cache served the forged target; found by the third
    review); its chunks are keyed by file id and generation, which a forgery shares."""
    store = MemoryStore()
    fs = await _fs(tmp_path, store)
    await fs.symlink(ROOT_INO, b"l", b"/home/owner/ledger", 0, 0)
    await fs.flush_all()
    link = await fs.lookup(ROOT_INO, b"l")
    dek = await fs.vol.keyring.unwrap(link.wrapped, link.file_id)
    key = fs.paths.object_key(link)[0]
    genuine, md_old, _etag = store.objects[key]
    forged = attacker.seal_body(
        dek.reveal(), link.file_id, link.attrs.salt, 12, b"/tmp/evil/ledger12"
    )

    async def mount(name: str, key_byte: bytes) -> Filesystem:
        vol = await Volume.open(store, KeySource(keyfile=Secret(key_byte * 32)))
        staging = StagingArea(tmp_path / name, vol.keys.cache, vol.chunk)
        blocks = BlockCache(tmp_path / "blocks", 64 << 20, vol.chunk)
        m = Filesystem(vol, staging, Options(metadata_ttl=0), blocks=blocks)
        await m.ensure_root()
        return m

    await store.put(key, forged, md_old)  # (before the rotation: read, and kept on disk)
    a = await mount("a", b"k")
    assert await a.readlink((await a.lookup(ROOT_INO, b"l")).ino) == b"/tmp/evil/ledger12"
    await store.put(key, genuine, md_old)  # (put back: the rotation pins the genuine body)
    await _rotate(store)
    if put_after:
        await store.put(key, forged, store.objects[key][1])
    b = await mount("b", b"n")
    n = await b.lookup(ROOT_INO, b"l")
    assert len(n.attrs.pin) == 32
    if put_after:
        with pytest.raises(IntegrityError):
            await b.readlink(n.ino)
    else:
        assert await b.readlink(n.ino) == b"/home/owner/ledger"


@pytest.mark.trio
@pytest.mark.allow_error_logs
@pytest.mark.parametrize("name", [b"f", b"g"])
async def test_a_chmod_from_a_mount_that_read_before_the_rotation_is_rotated_again(
    tmp_path: Path, name: bytes
) -> None:
    """A mount with the new key read a file's metadata before the rotation's pass over it,
    and chmods it after that pass: its copy in place keeps the ETag, with the data key still
    under the retiring key and no pin. The rotation's last pass looks at every object again
    (it was skipped: the file was unreadable once the rotation finished; found by the third
    review)."""
    store = MemoryStore()
    fs = await _fs(tmp_path, store)
    want = {b"f": os.urandom(10 * S + 5), b"g": os.urandom(100)}
    for n, data in want.items():
        await write_file(fs, ROOT_INO, n, data)
    state: dict[str, Any] = {}
    real_all, real_pass = keyadmin._rewrap_all, keyadmin._pass_over

    async def mount_first(*a: Any, **kw: Any) -> Any:
        m = state["m"] = await _new_key_fs(tmp_path, store, "m")
        m.opt.metadata_ttl = 10.0
        state["node"] = await m.lookup(ROOT_INO, name)
        return await real_all(*a, **kw)

    async def pass_then_chmod(*a: Any, **kw: Any) -> Any:
        out = await real_pass(*a, **kw)
        if "done" not in state:
            state["done"] = True
            await state["m"].setattr(state["node"].ino, mode=0o600)
            await state["m"].sync_node(state["node"])
        return out

    keyadmin._rewrap_all, keyadmin._pass_over = mount_first, pass_then_chmod  # type: ignore[assignment]
    try:
        await _rotate(store)
    finally:
        keyadmin._rewrap_all, keyadmin._pass_over = real_all, real_pass  # type: ignore[assignment]
    after = await _new_key_fs(tmp_path, store, "after")
    n2 = await after.lookup(ROOT_INO, name)
    assert oct(n2.attrs.mode) == "0o600" and len(n2.attrs.pin) == 32
    assert await read_file(after, n2.ino) == want[name]


@pytest.mark.trio
@pytest.mark.allow_error_logs
async def test_fsck_checks_the_pin_of_a_small_revision_1_file(tmp_path: Path) -> None:
    """On a volume without segments (revision-1 file bodies), a rotation pins a small file;
    a body forged afterwards under its old data key is reported by ``fsck`` (without
    ``--full``, which checked only the header; found by the third review)."""
    store = MemoryStore()
    fs = await make_fs(tmp_path / "w", store, segment_log2=None)
    data = os.urandom(5000)
    await write_file(fs, ROOT_INO, b"f", data)
    node = await fs.lookup(ROOT_INO, b"f")
    dek = await fs.vol.keyring.unwrap(node.wrapped, node.file_id)
    key = fs.paths.object_key(node)[0]
    await _rotate(store)
    vol = await Volume.open(store, KeySource(keyfile=Secret(b"n" * 32)))
    assert not (await fsck(vol, key_prefix="")).unreadable
    forged = attacker.seal_body(dek.reveal(), node.file_id, node.attrs.salt, 12, b"E" * 5000)
    await store.put(key, forged, store.objects[key][1])
    report = await fsck(await Volume.open(store, KeySource(keyfile=Secret(b"n" * 32))),
                        key_prefix="")  # fmt: skip
    assert [k for k, _why in report.unreadable] == [key]


@pytest.mark.trio
async def test_a_lazy_edit_of_a_file_just_read_fetches_nothing_again(tmp_path: Path) -> None:
    """``rsync --inplace``'s pattern on a versioned bucket: the file is read through the
    mount, then written in place and read again while written: the chunks not staged come
    from the mount's caches of the version it holds, not by a second download (the bench's
    rsync --inplace row fetched 770 MiB of its 1 GiB file again)."""
    store = MemoryStore()
    store.versioned = True
    fs = await _fs(tmp_path, store)
    data = bytearray(os.urandom(10 * S + 7))
    await write_file(fs, ROOT_INO, b"f", bytes(data))
    vol = await Volume.open(store, KeySource(keyfile=Secret(b"k" * 32)))
    staging = StagingArea(tmp_path / "b", vol.keys.cache, vol.chunk)
    opt = Options(writeback_delay=0.1, metadata_ttl=0, multipart_threshold=2 * S, part_size=S)
    blocks = BlockCache(tmp_path / "blocks", 64 << 20, vol.chunk)
    fs2 = Filesystem(vol, staging, opt, blocks=blocks)
    await fs2.ensure_root()
    node = await fs2.lookup(ROOT_INO, b"f")
    assert await read_file(fs2, node.ino) == bytes(data)  # (rsync reads the basis file)
    got = store.get_bytes
    h = await fs2.open(node.ino, os.O_RDWR)
    await fs2.write(h.fh, 5 * S + 100, b"delta")
    data[5 * S + 100 : 5 * S + 105] = b"delta"
    assert node.stage is not None and node.stage.fill is not None
    assert await fs2.read(h.fh, 0, len(data)) == bytes(data)
    await fs2.fsync(h.fh)
    await fs2.release(h.fh)
    assert store.get_bytes == got  # (nothing downloaded twice)
    await _check(tmp_path, store, b"f", bytes(data))


@pytest.mark.trio
async def test_a_fill_whose_node_moves_to_another_version_reads_by_the_id(
    tmp_path: Path,
) -> None:
    """A fill reading through the node's own path, run by run, while the node takes
    another version's ETag (here: after its first run): the later runs are not read from
    that version (they were: a false integrity failure, or two versions mixed), the fill
    reads by the version id instead (found by the fourth review)."""
    _store, fs2, node, data = await _read_elsewhere(tmp_path, 10 * S)
    h = await fs2.open(node.ino, os.O_RDWR)
    for i in (0, 5):  # (whole chunks: the fill of 2-10 is two runs, 2-4 and 6-10)
        await fs2.write(h.fh, i * C, b"x" * C)
        data[i * C : (i + 1) * C] = b"x" * C
    sf = node.stage
    assert sf is not None and sf.fill is not None
    real, etag = fs2.fetch.fetch_chunks, node.remote_etag
    calls = 0

    async def then_moved(*a: Any, **kw: Any) -> None:
        nonlocal calls
        calls += 1
        await real(*a, **kw)
        node.remote_etag = '"another"'  # (as a displace or our own landed request would)

    fs2.fetch.fetch_chunks = then_moved  # type: ignore[method-assign]
    await fs2.staged.fill(sf, 2, 10, node)
    fs2.fetch.fetch_chunks = real  # type: ignore[method-assign]
    node.remote_etag = etag
    assert calls == 1 and fs2.integrity_failures == 0
    assert sf.read(2 * C, 9 * C) == bytes(data[2 * C : 11 * C])
