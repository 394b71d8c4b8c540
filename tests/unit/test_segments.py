"""Revision-3 bodies on a mount (docs/FORMAT.md §8.5): what a bucket writer who mixes, moves,
drops or replays segments of real objects gets from a mount that reads them by ranges, as a
reader does (the trailer, then each segment's head, then chunks).  Every attack reads EIO
where it reaches, and the parts it did not touch still read (each segment is checked on its
own).  docs/SECURITY.md names these tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from cryptfs.errors import IntegrityError
from cryptfs.format import body3
from cryptfs.fs.filesystem import Filesystem
from cryptfs.fs.model import ROOT_INO
from cryptfs.store.memory import MemoryStore
from tests.fsutil import read_file, write_file
from tests.unit.test_filesystem import make_fs

C, S = 4096, 1 << 14  # make_fs: chunks of 4 KiB, segments of 4 chunks
SIZE = 5 * S - 1000  # five segments, the last one short
SEG = body3.segment_size(S, C)  # bytes of a full segment in the object


async def _two_files(tmp_path: Path) -> tuple[MemoryStore, dict[str, bytes], dict[str, bytes]]:
    """``/f`` written twice and ``/g``, all of SIZE bytes; returns the store, the objects'
    keys (``f1``: the bytes /f's first version had, kept by the attacker) and plaintexts."""
    store = MemoryStore()
    fs = await make_fs(tmp_path / "w", store)
    keys: dict[str, str] = {}
    data: dict[str, bytes] = {}
    raw: dict[str, bytes] = {}
    for name in ("f", "g"):
        before = set(store.objects)
        data[name] = os.urandom(SIZE)
        await write_file(fs, ROOT_INO, name.encode(), data[name])
        (keys[name],) = set(store.objects) - before
    raw["f1"] = store.objects[keys["f"]][0]  # (what the attacker kept)
    data["f2"] = os.urandom(SIZE)
    node = await fs.lookup(ROOT_INO, b"f")  # version 2 of /f
    h = await fs.open(node.ino, os.O_WRONLY | os.O_TRUNC)
    await fs.write(h.fh, 0, data["f2"])
    await fs.release(h.fh)
    await fs.sync_node(node)
    raw["f"], raw["g"] = store.objects[keys["f"]][0], store.objects[keys["g"]][0]
    store.f_key = keys["f"]  # type: ignore[attr-defined]
    return store, raw, data


async def _plant(store: MemoryStore, body: bytes) -> None:
    """The bucket writer replaces /f's body, keeping its (authentic) metadata."""
    key = store.f_key  # type: ignore[attr-defined]
    _b, md, _e = store.objects[key]
    await store.put(key, body, md)


async def _reader(tmp_path: Path, store: MemoryStore) -> Filesystem:
    return await make_fs(tmp_path / os.urandom(4).hex(), store)


def _seg(raw: bytes, j: int) -> bytes:
    return raw[j * SEG : (j + 1) * SEG]


def _with_seg(raw: bytes, j: int, seg: bytes) -> bytes:
    return raw[: j * SEG] + seg + raw[(j + 1) * SEG :]


async def _read_at(fs: Filesystem, name: bytes, offset: int, n: int = 100) -> bytes:
    node = await fs.lookup(ROOT_INO, name)
    h = await fs.open(node.ino, os.O_RDONLY)
    try:
        return await fs.read(h.fh, offset, n)
    finally:
        await fs.release(h.fh)


@pytest.mark.allow_error_logs
@pytest.mark.parametrize("source", ["f1", "g"])
async def test_a_segment_of_another_version_or_file_reads_eio(tmp_path: Path, source: str) -> None:
    """Segment 2 of /f's first version (whose data key a revoked reader may hold), or of
    another file /g, spliced into /f's current object at the same place: reads of it are
    EIO; segments 0 and 4, untouched, still read."""
    store, raws, data = await _two_files(tmp_path)
    await _plant(store, _with_seg(raws["f"], 2, _seg(raws[source], 2)))
    fs = await _reader(tmp_path, store)
    assert await _read_at(fs, b"f", 10) == data["f2"][10:110]
    assert await _read_at(fs, b"f", 4 * S + 5) == data["f2"][4 * S + 5 : 4 * S + 105]
    with pytest.raises(IntegrityError):
        await _read_at(fs, b"f", 2 * S + 3 * C)  # (its last chunk: the head is checked first)
    assert fs.integrity_failures >= 1


@pytest.mark.allow_error_logs
async def test_a_chunk_of_another_version_under_a_good_head_reads_eio(tmp_path: Path) -> None:
    """The head (header and hash table) of segment 1 kept, one chunk of it taken from the
    first version at the same offset: the hash table does not name it."""
    store, raws, _data = await _two_files(tmp_path)
    raw, old = raws["f"], raws["f1"]
    lo, ln = SEG + body3.chunk_offset(2, 4, C), C + 16
    await _plant(store, raw[:lo] + old[lo : lo + ln] + raw[lo + ln :])
    fs = await _reader(tmp_path, store)
    with pytest.raises(IntegrityError):
        await _read_at(fs, b"f", S + 2 * C)


@pytest.mark.allow_error_logs
@pytest.mark.parametrize("how", ["swap", "duplicate"])
async def test_segments_moved_or_duplicated_read_eio(tmp_path: Path, how: str) -> None:
    """Segments 1 and 2 swapped, or segment 1 written over segment 2: the index in each
    segment's header, and the manifest's hash of each, are where they belong."""
    store, raws, _data = await _two_files(tmp_path)
    raw = raws["f"]
    moved = _with_seg(raw, 2, _seg(raw, 1))
    if how == "swap":
        moved = _with_seg(moved, 1, _seg(raw, 2))
    await _plant(store, moved)
    fs = await _reader(tmp_path, store)
    with pytest.raises(IntegrityError):
        await _read_at(fs, b"f", 2 * S + 10)
    if how == "swap":
        with pytest.raises(IntegrityError):
            await _read_at(fs, b"f", S + 10)


@pytest.mark.allow_error_logs
@pytest.mark.parametrize("how", ["drop", "extend"])
async def test_a_segment_dropped_or_added_reads_eio(tmp_path: Path, how: str) -> None:
    """A segment cut out of the middle, or one added (the trailer kept at the end): the
    object's length is no longer the one its metadata's size gives (refused at lookup)."""
    store, raws, _data = await _two_files(tmp_path)
    raw = raws["f"]
    changed = raw[: 2 * SEG] + raw[3 * SEG :] if how == "drop" else _seg(raw, 0) + raw
    await _plant(store, changed)
    fs = await _reader(tmp_path, store)
    with pytest.raises(IntegrityError):
        await _read_at(fs, b"f", 0)


@pytest.mark.allow_error_logs
async def test_the_trailer_of_another_version_reads_eio(tmp_path: Path) -> None:
    """Version 2's segments with version 1's trailer (same length): its manifest is sealed
    under version 1's data key and names version 1's generation."""
    store, raws, _data = await _two_files(tmp_path)
    lo, _ln = body3.trailer_span(SIZE, S, C)
    await _plant(store, raws["f"][:lo] + raws["f1"][lo:])
    fs = await _reader(tmp_path, store)
    with pytest.raises(IntegrityError):
        await _read_at(fs, b"f", 0)


async def test_an_untouched_body_reads_by_ranges_and_whole(tmp_path: Path) -> None:
    """(The control: the same reads of the objects as written succeed, whole and by ranges
    from every segment, on a mount that has read nothing of them yet.)"""
    store, _raws, data = await _two_files(tmp_path)
    fs = await _reader(tmp_path, store)
    for j in (3, 0, 4, 1, 2):
        assert await _read_at(fs, b"f", j * S + 7, 5000) == data["f2"][j * S + 7 : j * S + 5007]
    fs2 = await _reader(tmp_path, store)
    node = await fs2.lookup(ROOT_INO, b"g")
    assert await read_file(fs2, node.ino) == data["g"]
    assert fs.integrity_failures == fs2.integrity_failures == 0


@pytest.mark.allow_error_logs
async def test_a_cut_trailer_reads_eio(tmp_path: Path) -> None:
    """100 bytes cut out of the trailer's start (its end, with its length and magic, kept),
    on a mount that trusted an earlier HEAD and reads the trailer by its span: less than a
    trailer comes back, which is an integrity failure (it was a ValueError: a crash)."""
    store, raws, _data = await _two_files(tmp_path)
    fs = await _reader(tmp_path, store)
    fs.fetch.opt.small_file_bytes = 0  # (the trailer by its span, not the object whole)
    node = await fs.lookup(ROOT_INO, b"f")  # (the HEAD saw the whole object)
    lo, _ln = body3.trailer_span(SIZE, S, C)
    await _plant(store, raws["f"][:lo] + raws["f"][lo + 100 :])
    node.remote_etag = store.objects[store.f_key][2]  # type: ignore[attr-defined]
    with pytest.raises(IntegrityError):
        await _read_at(fs, b"f", 3 * S)


# -- found by the attacker's review of this code (each fails before its fix) ----------------


async def test_two_cold_reads_of_one_file_are_no_integrity_failure(tmp_path: Path) -> None:
    """Two reads of a file whose trailer is not known yet, at once (the kernel's read-ahead,
    two threads): each opened the trailer, the second's body replaced the first's on the
    node, and the first then cut a head out of its data at a negative offset: EIO and an
    integrity failure logged, with nothing tampered with.  The first body opened stays."""
    store, _raws, data = await _two_files(tmp_path)
    for _ in range(3):
        fs = await _reader(tmp_path, store)
        fs.fetch.opt.small_file_bytes = 0  # (the trailer by its span: the race's window)
        node = await fs.lookup(ROOT_INO, b"f")
        got: dict[int, bytes] = {}

        async def read(off: int) -> None:
            got[off] = await _read_at(fs, b"f", off)  # noqa: B023

        async with trio.open_nursery() as n:
            for off in (S + 2 * C + 5, 3 * S + C + 5):
                n.start_soon(read, off)
        assert got == {o: data["f2"][o : o + 100] for o in got}
        assert fs.integrity_failures == 0, fs.tree.integrity_log
        assert node.cipher is not None


@pytest.mark.allow_error_logs
@pytest.mark.parametrize("small", [0, 4 << 20])
async def test_a_planted_trailer_length_is_an_integrity_failure(tmp_path: Path, small: int) -> None:
    """The last 8 bytes replaced by a trailer length of 1 GiB (no key needed): a ValueError
    escaped (an "unexpected error" on a mount, not counted; fsck stopped at it).  Now it is
    an integrity failure like any other."""
    import struct

    store, raws, _data = await _two_files(tmp_path)
    await _plant(store, raws["f"][:-8] + struct.pack(">I4s", 1 << 30, b"CFT3"))
    fs = await _reader(tmp_path, store)
    fs.fetch.opt.small_file_bytes = small
    with pytest.raises(IntegrityError):
        await _read_at(fs, b"f", 0)
    assert fs.integrity_failures >= 1


async def test_a_small_body_read_by_range_is_packed_only_whole(tmp_path: Path) -> None:
    """A body of one chunk fetched by a range (its trailer known already): the pack took the
    chunk's last bytes for the trailer, and a remount read an integrity failure from its own
    cache.  Only a body fetched whole is packed with its head and trailer."""
    from cryptfs.cache.blocks import BlockCache
    from cryptfs.cache.staging import StagingArea
    from cryptfs.fs.model import Options

    store = MemoryStore()
    fs = await make_fs(tmp_path / "w", store)
    data = os.urandom(3000)
    await write_file(fs, ROOT_INO, b"f", data)

    async def mount(n: int, **kw: int) -> Filesystem:
        st = StagingArea(tmp_path / f"st{n}", fs.vol.keys.cache, fs.vol.chunk)
        blocks = BlockCache(tmp_path / "blocks", 64 << 20, fs.vol.chunk)
        m = Filesystem(fs.vol, st, Options(metadata_ttl=0, **kw), blocks=blocks)
        await m.ensure_root()
        return m

    fs1 = await mount(1, small_file_bytes=0)
    assert await read_file(fs1, (await fs1.lookup(ROOT_INO, b"f")).ino) == data
    await trio.sleep(0.3)  # (the block cache is written behind the read)
    fs2 = await mount(2)
    assert await read_file(fs2, (await fs2.lookup(ROOT_INO, b"f")).ino) == data
    assert fs2.integrity_failures == 0, fs2.tree.integrity_log


@pytest.mark.allow_error_logs
async def test_a_body_opened_for_one_generation_is_not_used_for_another(tmp_path: Path) -> None:
    """Version A's authentic metadata copied in place over version B's body (CopyObject
    keeps the ETag: it is the body's): a mount that had opened B served B's bytes under A's
    generation, where a cold mount reads EIO.  The body a mount holds is bound to the
    generation its metadata names."""
    store = MemoryStore()
    fs = await make_fs(tmp_path / "w", store)
    before = set(store.objects)
    a, b = os.urandom(50000), os.urandom(50000)
    await write_file(fs, ROOT_INO, b"f", a)
    (key,) = set(store.objects) - before
    md_a = store.objects[key][1]
    node = await fs.lookup(ROOT_INO, b"f")
    h = await fs.open(node.ino, os.O_WRONLY | os.O_TRUNC)
    await fs.write(h.fh, 0, b)
    await fs.release(h.fh)
    await fs.sync_node(node)
    fs2 = await _reader(tmp_path, store)
    assert await _read_at(fs2, b"f", 0) == b[:100]
    fs2.cache.clear()
    etag_b = store.objects[key][2]
    assert await store.copy(key, key, md_a) == etag_b  # (what the bucket writer does)
    got: bytes | IntegrityError
    try:
        got = await _read_at(fs2, b"f", 20000)
    except IntegrityError as e:
        got = e
    assert got != b[20000:20100], "served version B's bytes under version A's metadata"
    assert isinstance(got, IntegrityError)


async def test_revision_3_bodies_have_revision_3_metadata(tmp_path: Path) -> None:
    """A cryptfs from before revision 3 ignored the attribute ``b``: its rename (or chmod)
    of a file with a revision-3 body resealed the metadata without it, and every host then
    refused the file.  Such files' metadata is revision 3 (``cfs: "3"``, labels of its own),
    which a cryptfs before it refuses as a format it does not support; and metadata of
    revision 3 cannot be passed off as revision 2 (the labels differ)."""
    from cryptfs.errors import UnsupportedFormat

    store = MemoryStore()
    fs = await make_fs(tmp_path / "w", store)
    before = set(store.objects)
    await write_file(fs, ROOT_INO, b"f", b"x" * 5000)
    (key,) = set(store.objects) - before
    md = dict(store.objects[key][1])
    assert md["cfs"] == "3"
    path = b"/f"
    assert fs.vol.meta.decode(path, key, md).attrs.body == 3
    with pytest.raises(IntegrityError):
        fs.vol.meta.decode(path, key, md | {"cfs": "2"})
    fs.vol.meta.accept = frozenset({2})  # (a mount whose config predates the upgrade)
    with pytest.raises(UnsupportedFormat):
        fs.vol.meta.decode(path, key, md)
