"""Filesystem logic over the in-memory store: no sockets, no FUSE."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import trio

from cryptfs.cache.staging import StagingArea
from cryptfs.crypto import Secret
from cryptfs.errors import Exists, IntegrityError, Invalid, NoEntry, NotEmpty, NotPermitted
from cryptfs.format.volume import KeySource
from cryptfs.fs.filesystem import Filesystem
from cryptfs.fs.model import ROOT_INO, Node, Options
from cryptfs.store.memory import MemoryStore
from cryptfs.volume import Volume
from tests.fsutil import read_file, write_file


async def make_fs(
    tmp_path: Path,
    store: MemoryStore | None = None,
    chunk_log2: int = 12,
    *,
    metadata_ttl: float = 0,
    segment_log2: int | None = 14,
) -> Filesystem:
    """A file system over ``store``, made (a new volume) if it has none: its files' bodies
    are revision 3 with segments of 4 chunks (every read and write crosses segments), or
    revision 1 with ``segment_log2=None``."""
    store = store or MemoryStore()
    src = KeySource(keyfile=Secret(b"k" * 32))
    try:
        vol = await Volume.open(store, src)
    except Exception:
        vol = await Volume.create(
            store, src, chunk_log2=chunk_log2, encrypt_names=True, segment_log2=segment_log2
        )
    staging = StagingArea(tmp_path / vol.volume_id.hex(), vol.keys.cache, vol.chunk)
    fs = Filesystem(vol, staging, Options(writeback_delay=0.1, metadata_ttl=metadata_ttl))
    await fs.ensure_root()
    return fs


async def test_write_read_across_remount(tmp_path: Path) -> None:
    store = MemoryStore()
    fs = await make_fs(tmp_path, store)
    data = os.urandom(3 * 4096 + 100)
    await write_file(fs, ROOT_INO, b"f", data)
    fs2 = await make_fs(tmp_path / "2", store)
    node = await fs2.lookup(ROOT_INO, b"f")
    assert await read_file(fs2, node.ino) == data
    h = await fs2.open(node.ino, os.O_RDONLY)
    assert await fs2.read(h.fh, 4000, 200) == data[4000:4200]
    store.calls.clear()
    assert await fs2.read(h.fh, 4100, 10) == data[4100:4110]  # cached chunk, no GET
    assert store.calls.get("get", 0) == 0


async def test_random_write_truncate_append(tmp_path: Path) -> None:
    store = MemoryStore()
    fs = await make_fs(tmp_path, store)
    ref = bytearray(os.urandom(10000))
    ino = await write_file(fs, ROOT_INO, b"f", bytes(ref))
    h = await fs.open(ino, os.O_RDWR)
    await fs.write(h.fh, 5000, b"X" * 3000)
    ref[5000:8000] = b"X" * 3000
    await fs.write(h.fh, 20000, b"tail")  # sparse extension
    ref += bytes(20000 - len(ref)) + b"tail"
    await fs.release(h.fh)
    await fs.setattr(ino, size=15000)
    del ref[15000:]
    await fs.sync_node(fs.node(ino))
    fs2 = await make_fs(tmp_path / "2", store)
    node = await fs2.lookup(ROOT_INO, b"f")
    assert await read_file(fs2, node.ino) == bytes(ref)


async def test_namespace_operations(tmp_path: Path) -> None:
    store = MemoryStore()
    fs = await make_fs(tmp_path, store)
    d = await fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    sub = await fs.mkdir(d.ino, b"sub", 0o700, 0, 0)
    await write_file(fs, sub.ino, b"x", b"xx")
    await write_file(fs, d.ino, b"y", b"yy")
    with pytest.raises(Exists):
        await fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    with pytest.raises(NotEmpty):
        await fs.rmdir(ROOT_INO, b"d")
    await fs.rename(ROOT_INO, b"d", ROOT_INO, b"e", 0)
    with pytest.raises(Exists):
        await fs.rename(d.ino, b"y", d.ino, b"sub", 1)  # RENAME_NOREPLACE
    fs2 = await make_fs(tmp_path / "2", store)
    e = await fs2.lookup(ROOT_INO, b"e")
    names = [n for n, _ in await fs2.readdir(e.ino)]
    assert names == [b"sub", b"y"]
    sub2 = await fs2.lookup(e.ino, b"sub")
    assert (await fs2.getattr(sub2.ino)).mode & 0o777 == 0o700
    x = await fs2.lookup(sub2.ino, b"x")
    assert await read_file(fs2, x.ino) == b"xx"
    with pytest.raises(NoEntry):
        await fs2.lookup(ROOT_INO, b"d")
    await fs2.unlink(sub2.ino, b"x")
    await fs2.rmdir(e.ino, b"sub")
    with pytest.raises(NotPermitted):
        fs2.link()


async def test_rename_before_upload_is_one_upload(tmp_path: Path) -> None:
    store = MemoryStore()
    fs = await make_fs(tmp_path, store)
    node, h = await fs.create(ROOT_INO, b".tmp123", 0o600, 0, 0)
    await fs.write(h.fh, 0, b"data")
    await fs.release(h.fh)
    await fs.rename(ROOT_INO, b".tmp123", ROOT_INO, b"final", 0)
    await fs.setattr(node.ino, mtime_ns=123_000_000_007)
    store.calls.clear()
    await fs.sync_node(node)
    assert store.calls == {"put": 1}
    fs2 = await make_fs(tmp_path / "2", store)
    st = await fs2.getattr((await fs2.lookup(ROOT_INO, b"final")).ino)
    assert st.mtime_ns == 123_000_000_007 and st.mode & 0o777 == 0o600


@pytest.mark.allow_error_logs
async def test_swapped_object_reads_as_integrity_error(tmp_path: Path) -> None:
    store = MemoryStore()
    fs = await make_fs(tmp_path, store)
    a = await write_file(fs, ROOT_INO, b"a", b"AAAA")
    b = await write_file(fs, ROOT_INO, b"b", b"BBBB")
    ka, _ = fs.object_key(fs.node(a))
    kb, _ = fs.object_key(fs.node(b))
    store.objects[kb] = store.objects[ka]
    fs2 = await make_fs(tmp_path / "2", store)
    with pytest.raises(IntegrityError):
        await fs2.lookup(ROOT_INO, b"b")
    node = await fs2.lookup(ROOT_INO, b"a")
    assert await read_file(fs2, node.ino) == b"AAAA"


async def test_writeback_service_uploads_after_delay(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    store = MemoryStore()
    fs = await make_fs(tmp_path, store)
    async with trio.open_nursery() as n:
        await n.start(fs.serve_writeback)
        node, h = await fs.create(ROOT_INO, b"f", 0o644, 0, 0)
        await fs.write(h.fh, 0, b"hello")
        await fs.release(h.fh)
        assert node.dirty
        await trio.sleep(1)
        assert not node.dirty and node.remote_etag is not None
        n.cancel_scope.cancel()


async def test_crash_recovery_uploads_staged_files(tmp_path: Path) -> None:
    store = MemoryStore()
    fs = await make_fs(tmp_path, store)
    d = await fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    _node, h = await fs.create(d.ino, b"f", 0o644, 0, 0)
    await fs.write(h.fh, 0, b"survives")
    await fs.release(h.fh)  # closed, not uploaded: the process "dies" here
    staging_root = fs.staging.root
    fs2 = await make_fs(tmp_path, store)  # same cache dir
    assert fs2.staging.root == staging_root
    assert await fs2.recover() == 1
    fs3 = await make_fs(tmp_path / "3", store)
    d3 = await fs3.lookup(ROOT_INO, b"d")
    f3 = await fs3.lookup(d3.ino, b"f")
    assert await read_file(fs3, f3.ino) == b"survives"
    assert not list(staging_root.glob("*.data"))


async def test_staging_is_encrypted_at_rest(tmp_path: Path) -> None:
    fs = await make_fs(tmp_path)
    _node, h = await fs.create(ROOT_INO, b"plainname", 0o644, 0, 0)
    await fs.write(h.fh, 0, b"PLAINTEXTMARKER" * 100)
    await fs.release(h.fh)
    for p in fs.staging.root.iterdir():
        raw = p.read_bytes()
        assert b"PLAINTEXTMARKER" not in raw and b"plainname" not in raw


async def test_unlinked_file_is_not_resurrected_by_recovery(tmp_path: Path) -> None:
    store = MemoryStore()
    fs = await make_fs(tmp_path, store)
    node, h = await fs.create(ROOT_INO, b"gone", 0o644, 0, 0)
    await fs.write(h.fh, 0, b"data")
    await fs.flush(h.fh)  # journal written
    await fs.unlink(ROOT_INO, b"gone")  # still open
    assert await fs.read(h.fh, 0, 10) == b"data"  # open handle keeps reading
    fs2 = await make_fs(tmp_path, store)  # the daemon "crashed" with the file open
    assert await fs2.recover() == 0
    with pytest.raises(NoEntry):
        await fs2.lookup(ROOT_INO, b"gone")
    assert node.unlinked


async def test_entries_created_during_listing_survive(tmp_path: Path) -> None:
    store = MemoryStore()
    fs = await make_fs(tmp_path, store)
    for i in range(20):
        await write_file(fs, ROOT_INO, f"f{i}".encode(), b"x")
    fs2 = await make_fs(tmp_path / "2", store)
    async with trio.open_nursery() as n:
        n.start_soon(fs2.readdir, ROOT_INO)
        await trio.sleep(0)
        await fs2.create(ROOT_INO, b"new", 0o644, 0, 0)
    assert b"new" in [name for name, _ in await fs2.readdir(ROOT_INO)]


async def test_reader_follows_a_replaced_object(tmp_path: Path) -> None:
    store = MemoryStore()
    writer = await make_fs(tmp_path, store)
    ino = await write_file(writer, ROOT_INO, b"f", b"version one")
    reader = await make_fs(tmp_path / "r", store)
    rnode = await reader.lookup(ROOT_INO, b"f")
    h = await reader.open(rnode.ino, os.O_RDONLY)
    assert await reader.read(h.fh, 0, 100) == b"version one"
    wh = await writer.open(ino, os.O_WRONLY)
    await writer.setattr(ino, size=0)
    await writer.write(wh.fh, 0, b"version two!")
    await writer.release(wh.fh)
    await writer.sync_node(writer.node(ino))
    reader.cache.clear()
    assert await reader.read(h.fh, 0, 100) == b"version two!"


async def test_directory_rename_with_long_names_and_nesting(tmp_path: Path) -> None:
    store = MemoryStore()
    fs = await make_fs(tmp_path, store)
    long_dir = b"D" * 200
    d = await fs.mkdir(ROOT_INO, long_dir, 0o755, 0, 0)
    inner = await fs.mkdir(d.ino, b"I" * 240, 0o711, 0, 0)
    await write_file(fs, inner.ino, b"F" * 255, b"deep")
    await write_file(fs, d.ino, b"short", b"s")
    empty = await fs.mkdir(d.ino, b"empty", 0o700, 0, 0)
    assert empty.remote_etag
    await fs.rename(ROOT_INO, long_dir, ROOT_INO, b"N" * 190, 0)
    fs2 = await make_fs(tmp_path / "2", store)
    n = await fs2.lookup(ROOT_INO, b"N" * 190)
    assert sorted(x for x, _ in await fs2.readdir(n.ino)) == [b"I" * 240, b"empty", b"short"]
    i2 = await fs2.lookup(n.ino, b"I" * 240)
    assert (await fs2.getattr(i2.ino)).mode & 0o777 == 0o711
    f = await fs2.lookup(i2.ino, b"F" * 255)
    assert await read_file(fs2, f.ino) == b"deep"
    with pytest.raises(NoEntry):
        await fs2.lookup(ROOT_INO, long_dir)
    # nothing is left under the old name
    assert len(store.objects) == 7  # config, root, dir, inner, empty, 2 files


@pytest.mark.parametrize(
    "name",
    [
        "golden_volume_v1.json",  # cryptfs 0.1: DEKs wrapped under a VMK-derived key ("vmk")
        "golden_volume_v1_mk.json",  # local master key in the slot payload ("mk-…")
        "golden_volume_v2.json",  # format revision 2 (docs/FORMAT.md §7)
        "golden_volume_v2_special.json",  # with special files (§7.9)
    ],
)
async def test_golden_volume_v1_stays_readable(tmp_path: Path, name: str) -> None:
    """Whole volumes written by earlier cryptfs versions must stay mountable."""
    from tests.fsutil import golden_store, walk

    store, golden, src = await golden_store(name)
    vol = await Volume.open(store, src)
    fs = Filesystem(vol, StagingArea(tmp_path, vol.keys.cache, vol.chunk))
    await fs.ensure_root()
    for path, data in golden["files"].items():
        node = await walk(fs, path)
        assert await read_file(fs, node.ino) == bytes.fromhex(data)
        st = fs.stat(node)
        assert (st.mode & 0o777, st.uid, st.mtime_ns) == (0o640, 1000, 1_700_000_000_123_456_789)
    link = await fs.lookup(ROOT_INO, b"link")
    assert await fs.readlink(link.ino) == b"docs/report.pdf"
    docs = await fs.lookup(ROOT_INO, b"docs")
    assert fs.stat(docs).mode & 0o777 == 0o750


async def test_plaintext_names_volume(tmp_path: Path) -> None:
    store = MemoryStore()
    src = KeySource(keyfile=Secret(b"p" * 32))
    vol = await Volume.create(store, src, chunk_log2=12, encrypt_names=False)
    fs = Filesystem(vol, StagingArea(tmp_path, vol.keys.cache, vol.chunk))
    await fs.ensure_root()
    d = await fs.mkdir(ROOT_INO, b"photos", 0o755, 0, 0)
    await write_file(fs, d.ino, b"cat.jpg", b"meow")
    assert "photos/cat.jpg" in store.objects
    assert b"meow" not in store.objects["photos/cat.jpg"][0]  # content still encrypted
    with pytest.raises(Invalid):
        await fs.create(ROOT_INO, b".cryptfs.json", 0o644, 0, 0)
    fs2 = Filesystem(
        await Volume.open(store, src), StagingArea(tmp_path / "2", vol.keys.cache, vol.chunk)
    )
    d2 = await fs2.lookup(ROOT_INO, b"photos")
    assert await read_file(fs2, (await fs2.lookup(d2.ino, b"cat.jpg")).ino) == b"meow"


async def test_kernel_page_cache_kept_only_while_object_unchanged(tmp_path: Path) -> None:
    store = MemoryStore()
    writer = await make_fs(tmp_path, store)
    ino = await write_file(writer, ROOT_INO, b"f", b"one")
    reader = await make_fs(tmp_path / "r", store)
    rino = (await reader.lookup(ROOT_INO, b"f")).ino
    h1 = await reader.open(rino, os.O_RDONLY)
    h2 = await reader.open(rino, os.O_RDONLY)
    assert (h1.keep_cache, h2.keep_cache) == (False, True)
    wh = await writer.open(ino, os.O_WRONLY)
    await writer.write(wh.fh, 0, b"two")
    await writer.release(wh.fh)
    await writer.sync_node(writer.node(ino))
    h3 = await reader.open(rino, os.O_RDONLY)  # metadata TTL is 0 here: revalidated
    assert not h3.keep_cache
    assert await reader.read(h3.fh, 0, 10) == b"two"


@pytest.mark.allow_error_logs
async def test_rotation_elsewhere_seen_by_running_mount_and_staged_data_kept(
    tmp_path: Path,
) -> None:
    from cryptfs.errors import ReadOnly
    from cryptfs.keyadmin import rotate

    store = MemoryStore()
    fs_a = await make_fs(tmp_path / "a", store)
    await write_file(fs_a, ROOT_INO, b"f", b"uploaded")
    # a file closed but not uploaded yet (the daemon then dies): only its journal remains
    node, h = await fs_a.create(ROOT_INO, b"staged", 0o644, 0, 0)
    await fs_a.write(h.fh, 0, b"pending bytes")
    await fs_a.release(h.fh)

    other = await Volume.open(store, KeySource(keyfile=Secret(b"k" * 32)))
    report = await rotate(other, to_source=KeySource(keyfile=Secret(b"n" * 32)), settle=0)
    assert report.finished and report.rewrapped == 1

    # the running mount notices (the new config does not authenticate under its retired
    # key): no new file gets a data key, nor metadata, under the retired master key
    assert not await fs_a.vol.reload_config()
    assert fs_a.vol.keyring.stale is not None
    with pytest.raises(ReadOnly, match="rotated"):
        await fs_a.create(ROOT_INO, b"new", 0o644, 0, 0)
    # nor does a file staged before the rotation get uploaded under it: it stays staged
    with pytest.raises(ReadOnly):
        await fs_a.sync_node(node)
    assert node.stage is not None

    # the next mount (new key, same cache dir) uploads the staged file under a fresh data
    # key wrapped by the new master key (the journal holds no data key)
    vol = await Volume.open(store, KeySource(keyfile=Secret(b"n" * 32)))
    staging = StagingArea(tmp_path / "a" / vol.volume_id.hex(), vol.keys.cache, vol.chunk)
    fs_n = Filesystem(vol, staging, Options(writeback_delay=0.1, metadata_ttl=0))
    await fs_n.ensure_root()
    assert await fs_n.recover() == 1
    for name, data in ((b"f", b"uploaded"), (b"staged", b"pending bytes")):
        assert await read_file(fs_n, (await fs_n.lookup(ROOT_INO, name)).ino) == data
    kids = {md.get("cfs-kid") for _b, md, _e in store.objects.values() if "cfs-k" in md}
    assert kids == {vol.config.dek["kid"]}


async def _written_elsewhere(
    tmp_path: Path,
    store: MemoryStore,
    data: bytes,
    *,
    fetch_unit: int | None = None,
    readahead: int | None = None,
    segment_log2: int | None = 14,
) -> Filesystem:
    """``/f`` holding ``data``, written by one mount; returns a second mount that has not
    read it yet (with the read-ahead bounds given)."""
    first = await make_fs(tmp_path, store, segment_log2=segment_log2)
    await write_file(first, ROOT_INO, b"f", data)
    fs2 = await make_fs(tmp_path / "2", store)
    if fetch_unit is not None:  # (and files up to it are fetched whole at open)
        fs2.opt.fetch_unit = fs2.opt.small_file_bytes = fetch_unit
    if readahead is not None:
        fs2.opt.max_readahead = readahead
    return fs2


async def test_sequential_reads_are_served_by_read_ahead(tmp_path: Path) -> None:
    """A sequential reader finds later chunks fetched in the background (few, large GETs,
    never one chunk twice); a seek far away fetches only what it needs."""
    store = MemoryStore()
    data = os.urandom(3 << 20)
    fs2 = await _written_elsewhere(tmp_path, store, data, fetch_unit=256 << 10, readahead=1 << 20)
    async with trio.open_nursery() as n:
        await n.start(fs2.serve_writeback)
        node = await fs2.lookup(ROOT_INO, b"f")
        h = await fs2.open(node.ino, os.O_RDONLY)
        store.calls.clear()
        got = bytearray()
        for off in range(0, len(data), 64 << 10):
            got += await fs2.read(h.fh, off, 64 << 10)
            await trio.sleep(0)  # let read-ahead run, as the kernel's pauses would
        assert got == data
        gets = store.calls.get("get", 0)
        assert gets < len(data) // (64 << 10) // 2, gets  # mostly served by read-ahead
        assert fs2.cache.misses < len(data) // fs2.chunk // 3 and not node.inflight
        # a far seek: no read-ahead of its neighbourhood yet (random access)
        fs2.cache.clear()
        store.calls.clear()
        assert await fs2.read(h.fh, 2 << 20, 4096) == data[2 << 20 : (2 << 20) + 4096]
        await trio.sleep(0.1)
        assert store.calls.get("get", 0) == 1 and not node.inflight
        await fs2.release(h.fh)
        fs2.stop_writeback()


async def test_read_ahead_fetches_aligned_units_and_keeps_only_what_is_ahead(
    tmp_path: Path,
) -> None:
    """Read-ahead GETs cover whole fetch units aligned to multiples of the unit (the parts of
    a multipart upload), whatever offset the stream started from; a sequential reader's
    chunks leave the memory cache once read (the kernel keeps those pages), so a long read
    holds its window, not the whole LRU."""
    from cryptfs.format.body import HEADER_SIZE, chunk_span

    store = MemoryStore()
    data = os.urandom(5 << 20)
    unit = 256 << 10
    fs2 = await _written_elsewhere(
        tmp_path, store, data, fetch_unit=unit, readahead=1 << 20, segment_log2=None
    )
    ranges: list[tuple[int, int]] = []
    real_get = store.get

    async def get(key: str, start: int | None = None, end: int | None = None, **kw: Any) -> Any:
        ranges.append((start or 0, end or 0))
        return await real_get(key, start, end, **kw)

    store.get = get  # type: ignore[method-assign]
    c = fs2.chunk
    per_unit = unit // c
    starts = {chunk_span(i, len(data), c)[0] for i in range(0, len(data) // c, per_unit)}
    async with trio.open_nursery() as n:
        await n.start(fs2.serve_writeback)
        node = await fs2.lookup(ROOT_INO, b"f")
        h = await fs2.open(node.ino, os.O_RDONLY)
        first = 3 * c + 100  # a stream that starts inside a unit
        got = bytearray()
        for off in range(first, len(data), 96 << 10):
            got += await fs2.read(h.fh, off, 96 << 10)
            await trio.testing.wait_all_tasks_blocked()  # read-ahead runs, as between reads
            assert fs2.cache.used <= (1 << 20) + 2 * unit  # the window, not the 5 MiB read
        assert got == data[first:]
        await fs2.release(h.fh)
        fs2.stop_writeback()
    data_gets = [r for r in ranges if r != (0, HEADER_SIZE)]  # (the header, alone)
    assert data_gets[0][0] == HEADER_SIZE + 3 * (c + 16)  # the reader's own first fetch
    # until its window covers whole units the reader fetches for itself; once the window
    # has grown (here: from 2 MiB into the file on), every GET is read-ahead of one unit
    ahead = [r for r in data_gets if r[0] >= 2 << 20]
    assert len(ahead) == (len(data) - (2 << 20)) // unit, data_gets
    for start, end in ahead:
        assert start in starts, (start, end)
        assert end - start <= per_unit * (c + 16) + HEADER_SIZE


async def test_reads_wait_for_read_ahead_in_flight(tmp_path: Path) -> None:
    """A read of a chunk being read ahead waits for that fetch instead of a second GET;
    a failed read-ahead leaves the reader to fetch (and report) it itself."""
    from cryptfs.errors import StoreUnavailable

    store = MemoryStore()
    data = os.urandom(1 << 20)
    fs2 = await _written_elsewhere(tmp_path, store, data, fetch_unit=128 << 10, readahead=512 << 10)
    real_get = store.get
    failing = {"on": False}

    async def get(key: str, *a: object, **kw: object) -> object:
        if failing["on"]:
            raise StoreUnavailable("injected")
        return await real_get(key, *a, **kw)  # type: ignore[arg-type]

    store.get = get  # type: ignore[method-assign]

    async def grow(fh: int) -> None:  # grow the window, with no pause for read-ahead
        for off in range(0, 256 << 10, 32 << 10):
            assert await fs2.read(fh, off, 32 << 10) == data[off : off + (32 << 10)]

    async with trio.open_nursery() as n:
        await n.start(fs2.serve_writeback)
        node = await fs2.lookup(ROOT_INO, b"f")
        h = await fs2.open(node.ino, os.O_RDONLY)
        await grow(h.fh)
        assert node.inflight  # read-ahead scheduled, not run yet
        t = min(node.inflight)
        ev = node.inflight[t]
        off = t * fs2.chunk
        misses = fs2.cache.misses
        assert await fs2.read(h.fh, off, 4096) == data[off : off + 4096]
        assert ev.is_set() and node.inflight.get(t) is not ev  # it waited for that fetch
        assert await fs2.read(h.fh, off + 4096, 4096) == data[off + 4096 : off + 8192]
        assert fs2.cache.misses == misses + 1  # and the next chunk came with it

        # read-ahead fails: the reader fetches itself, and reports the error if it persists
        fs2.cache.clear()
        h2 = await fs2.open(node.ino, os.O_RDONLY)
        await grow(h2.fh)
        assert node.inflight
        off = max(node.inflight) * fs2.chunk
        failing["on"] = True
        await trio.sleep(0.1)  # every read-ahead in flight fails
        assert not node.inflight
        with pytest.raises(StoreUnavailable):
            await fs2.read(h2.fh, off, 4096)
        failing["on"] = False
        assert await fs2.read(h2.fh, off, 4096) == data[off : off + 4096]
        await fs2.release(h.fh)
        await fs2.release(h2.fh)
        fs2.stop_writeback()


async def test_concurrent_first_writes_share_one_staged_file(tmp_path: Path) -> None:
    """Two writes racing to make a clean file dirty (two writers, or the kernel's parallel
    write-back) must end in one staged file holding both, not two fighting over its path."""
    store = MemoryStore()
    data = bytearray(os.urandom(64 << 10))
    fs2 = await _written_elsewhere(tmp_path, store, bytes(data))
    node = await fs2.lookup(ROOT_INO, b"f")
    h1 = await fs2.open(node.ino, os.O_RDWR)
    h2 = await fs2.open(node.ino, os.O_RDWR)
    async with trio.open_nursery() as n:
        n.start_soon(fs2.write, h1.fh, 0, b"A" * 5000)
        n.start_soon(fs2.write, h2.fh, 40000, b"B" * 5000)
        n.start_soon(fs2.setattr, node.ino)  # a metadata-only change in between
    data[0:5000] = b"A" * 5000
    data[40000:45000] = b"B" * 5000
    assert await fs2.read(h1.fh, 0, len(data)) == bytes(data)
    await fs2.release(h1.fh)
    await fs2.release(h2.fh)
    await fs2.sync_node(node)
    fs3 = await make_fs(tmp_path / "3", store)
    assert await read_file(fs3, (await fs3.lookup(ROOT_INO, b"f")).ino) == bytes(data)


async def test_metadata_only_change_elsewhere_is_seen(tmp_path: Path) -> None:
    """chmod/touch by another mount rewrite only the metadata (CopyObject onto itself): the
    ETag stays, Last-Modified moves; both lookups and listings must notice."""
    store = MemoryStore()
    a = await make_fs(tmp_path / "a", store)
    ino = await write_file(a, ROOT_INO, b"f", b"data")
    b = await make_fs(tmp_path / "b", store)
    assert [n for n, _ in await b.readdir(ROOT_INO)] == [b"f"]
    fb = await b.lookup(ROOT_INO, b"f")
    assert fb.attrs.mode & 0o777 == 0o644
    etag = fb.remote_etag
    await a.setattr(ino, mode=0o600, mtime_ns=123_000_000_000)
    await a.sync_node(a.node(ino))
    assert a.node(ino).remote_etag == etag  # same body, same ETag
    assert (await b.getattr(fb.ino)).mode & 0o777 == 0o600  # by HEAD
    c = await make_fs(tmp_path / "c", store)
    await c.readdir(ROOT_INO)
    fc = await c.lookup(ROOT_INO, b"f")
    await a.setattr(ino, mode=0o640)
    await a.sync_node(a.node(ino))
    listed = dict(await c.readdir(ROOT_INO))  # by listing (metadata TTL 0)
    assert listed[b"f"] is fc and fc.attrs.mode & 0o777 == 0o640
    assert fc.attrs.mtime_ns == 123_000_000_000


async def test_directory_attributes_revalidated_by_its_own_listing(tmp_path: Path) -> None:
    """Relisting a parent does not HEAD every known subdirectory; a subdirectory's attributes
    changed elsewhere are picked up when it is listed itself (its marker is in its listing)."""
    store = MemoryStore()
    a = await make_fs(tmp_path / "a", store)
    d = await a.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    for i in range(5):
        await a.mkdir(d.ino, f"s{i}".encode(), 0o755, 0, 0)
    for n in list(a.inodes.values()):
        await a.sync_node(n)
    b = await make_fs(tmp_path / "b", store)
    bd = await b.lookup(ROOT_INO, b"d")
    await b.readdir(bd.ino)
    store.calls.clear()
    await b.readdir(bd.ino)  # metadata TTL 0: a new LIST, but no HEAD of s0..s4
    assert store.calls.get("head", 0) == 0 and store.calls["list"] == 1
    await a.setattr(d.ino, mode=0o700)
    await a.sync_node(d)
    await b.readdir(bd.ino)
    assert bd.attrs.mode & 0o777 == 0o700


async def test_lookups_in_an_unlisted_directory_ask_only_about_names_that_exist(
    tmp_path: Path,
) -> None:
    """A directory never listed: one LIST per metadata TTL tells which names exist, so a
    missing name costs no request and an existing one one HEAD (not three); from the second
    name on, the directory is listed whole (HEADs in parallel) instead of one by one."""
    store = MemoryStore()
    a = await make_fs(tmp_path / "a", store)
    d = await a.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    await a.sync_node(d)
    for i in range(20):
        await write_file(a, d.ino, f"f{i}".encode(), b"x" * i)
    b = await make_fs(tmp_path / "b", store, metadata_ttl=60)
    bd = await b.lookup(ROOT_INO, b"d")
    store.calls.clear()
    for i in range(20):
        node = await b.lookup(bd.ino, f"f{i}".encode())
        assert node.attrs.size == i
    with pytest.raises(NoEntry):
        await b.lookup(bd.ino, b"missing")
    assert store.calls == {"list": 2, "head": 20}, store.calls
    store.calls.clear()
    assert (await b.lookup(bd.ino, b"f3")).attrs.size == 3  # remembered: no request
    assert store.calls == {}
    c = await make_fs(tmp_path / "c", store)
    c.opt.metadata_ttl, c.opt.list_ahead_max = 60, 0  # as if huge: one HEAD per name
    cd = await c.lookup(ROOT_INO, b"d")
    store.calls.clear()
    for i in range(5):
        assert (await c.lookup(cd.ino, f"f{i}".encode())).attrs.size == i
    with pytest.raises(NoEntry):
        await c.lookup(cd.ino, b"missing")
    assert store.calls == {"list": 1, "head": 5}, store.calls


async def test_fsync_uploads_and_syncs_the_cache_disk_only_when_the_upload_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cryptfs.cache.staging import StagedFile
    from cryptfs.errors import StoreUnavailable

    synced: list[bool] = []  # the ``durable`` flag of every journal write
    save = StagedFile.save_journal

    def recording(self: StagedFile, record: dict[str, object], *, durable: bool = False) -> None:
        synced.append(durable)
        save(self, record, durable=durable)

    monkeypatch.setattr(StagedFile, "save_journal", recording)
    store = MemoryStore()
    fs = await make_fs(tmp_path, store)
    node, h = await fs.create(ROOT_INO, b"ok", 0o644, 0, 0)
    await fs.write(h.fh, 0, b"in S3 when fsync returns")
    await fs.fsync(h.fh)
    assert node.remote_etag is not None and True not in synced  # no local sync on success
    await fs.release(h.fh)

    node, h = await fs.create(ROOT_INO, b"down", 0o644, 0, 0)
    await fs.write(h.fh, 0, b"kept for the next mount")

    async def unreachable(*a: object, **kw: object) -> str:
        raise StoreUnavailable("injected: S3 down")

    monkeypatch.setattr(store, "put", unreachable)
    synced.clear()
    with pytest.raises(StoreUnavailable):
        await fs.fsync(h.fh)
    assert synced[-1] is True  # the failed upload left it synced to the cache disk
    await fs.release(h.fh)
    monkeypatch.undo()
    fs2 = await make_fs(tmp_path, store)
    assert await fs2.recover() == 1
    fs3 = await make_fs(tmp_path / "3", store)
    assert await read_file(fs3, (await fs3.lookup(ROOT_INO, b"down")).ino) == (
        b"kept for the next mount"
    )


async def test_memoised_object_keys_follow_renames(tmp_path: Path) -> None:
    store = MemoryStore()
    fs = await make_fs(tmp_path, store)
    d = await fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    sub = await fs.mkdir(d.ino, b"sub", 0o755, 0, 0)
    f = fs.node(await write_file(fs, sub.ino, b"f", b"content"))
    g = fs.node(await write_file(fs, sub.ino, b"g", b"other"))
    before = {n.ino: fs.object_key(n)[0] for n in (sub, f, g)}  # memoised now
    await fs.rename(ROOT_INO, b"d", ROOT_INO, b"e", 0)  # a directory: all below move
    await fs.rename(sub.ino, b"g", sub.ino, b"h", 0)  # a file: only its own key

    def fresh(n: Node) -> str:
        for m in (d, sub, f, g):
            m.key_memo = m.prefix_memo = None
        return fs.object_key(n)[0]

    memos = {n.ino: fs.object_key(n)[0] for n in (sub, f, g)}
    for n in (sub, f, g):
        assert memos[n.ino] != before[n.ino] and memos[n.ino] == fresh(n)
    assert set(store.objects) >= {fs.object_key(f)[0], fs.object_key(g)[0]}
    fs2 = await make_fs(tmp_path / "2", store)
    e = await fs2.lookup(ROOT_INO, b"e")
    s2 = await fs2.lookup(e.ino, b"sub")
    assert await read_file(fs2, (await fs2.lookup(s2.ino, b"h")).ino) == b"other"
    assert await read_file(fs2, (await fs2.lookup(s2.ino, b"f")).ino) == b"content"


async def test_a_walk_after_the_ttl_finds_subdirectories_relisted_ahead(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    store = MemoryStore()
    fs = await make_fs(tmp_path, store, metadata_ttl=10.0)
    a = await fs.mkdir(ROOT_INO, b"a", 0o755, 0, 0)
    subs = [await fs.mkdir(a.ino, f"b{i}".encode(), 0o755, 0, 0) for i in range(3)]
    deep = await fs.mkdir(subs[0].ino, b"c", 0o755, 0, 0)
    deeper = await fs.mkdir(deep.ino, b"d", 0o755, 0, 0)
    for n in (a, *subs, deep, deeper):
        await write_file(fs, n.ino, b"f", b"x")
    async with trio.open_nursery() as nursery:
        await nursery.start(fs.serve_writeback)
        for n in (ROOT_INO, a.ino, *(s.ino for s in subs), deep.ino, deeper.ino):
            await fs.readdir(n)  # the first walk: every directory listed once
        await trio.sleep(11)  # past the TTL
        lists = store.calls.get("list", 0)
        await fs.readdir(ROOT_INO)  # the walk again, from the top
        await trio.testing.wait_all_tasks_blocked()
        # root asked; a (1 below) and b0..b2 (2 below) relisted ahead, in the background
        assert store.calls["list"] - lists == 1 + 1 + 3
        await fs.readdir(a.ino)  # fresh: no LIST of its own
        assert store.calls["list"] - lists == 5
        await fs.readdir(subs[0].ino)  # the walk enters b0: c and d (2 below it) go ahead
        await trio.testing.wait_all_tasks_blocked()
        assert store.calls["list"] - lists == 7
        for n in (*subs, deep, deeper):
            await fs.readdir(n.ino)  # all fresh when the walk gets there
        assert await fs.lookup(deeper.ino, b"f")
        assert store.calls["list"] - lists == 7
        assert all(fs.look.fresh(n.listed_at) for n in (a, *subs, deep, deeper))
        nursery.cancel_scope.cancel()


class RecordingKernel:
    def __init__(self) -> None:
        self.changed: list[int] = []
        self.gone: list[tuple[int, bytes]] = []

    def attrs_changed(self, ino: int) -> None:
        self.changed.append(ino)

    def entry_gone(self, parent_ino: int, name: bytes) -> None:
        self.gone.append((parent_ino, name))


async def test_the_kernel_keeps_entries_no_longer_than_this_cache_trusts_them(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    store = MemoryStore()
    fs = await make_fs(tmp_path, store, metadata_ttl=10.0)
    d = await fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    f, h = await fs.create(d.ino, b"f", 0o644, 0, 0)
    await fs.write(h.fh, 0, b"staged")
    assert fs.stat(f).ttl == 10.0  # dirty: this mount's own data
    await fs.release(h.fh)
    await fs.sync_node(f)
    await fs.sync_node(d)  # (its times, which its new entry changed)
    assert fs.stat(f).ttl == pytest.approx(10.0)  # just uploaded: as fresh as it gets
    await trio.sleep(4)
    assert fs.stat(f).ttl == pytest.approx(6.0)  # the kernel's copy ends with this one's
    assert fs.stat(d).ttl == pytest.approx(6.0)  # a directory's: its parent's listing
    await trio.sleep(7)
    assert fs.stat(f).ttl == 0.0  # past the TTL: the kernel must ask, this asks S3
    await fs.lookup(d.ino, b"f")  # revalidated by a LIST of d
    assert fs.stat(f).ttl == pytest.approx(10.0)
    fs.opt.metadata_ttl = 0
    assert fs.stat(f).ttl == 0.0 and fs.stat(fs.root).ttl == 0.0


async def test_changes_found_elsewhere_are_told_to_the_kernel(tmp_path: Path) -> None:
    store = MemoryStore()
    a = await make_fs(tmp_path / "a", store)
    ino_f = await write_file(a, ROOT_INO, b"f", b"one")
    await write_file(a, ROOT_INO, b"g", b"gone soon")
    await write_file(a, ROOT_INO, b"r", b"replaced soon")
    b = await make_fs(tmp_path / "b", store)
    kernel = RecordingKernel()
    b.kernel = kernel
    seen = dict(await b.readdir(ROOT_INO))
    assert kernel.changed == kernel.gone == []  # first sight: nothing the kernel holds
    h = await a.open(ino_f, os.O_WRONLY)
    await a.write(h.fh, 0, b"one, longer now")
    await a.release(h.fh)
    await a.sync_node(a.node(ino_f))
    await a.unlink(ROOT_INO, b"g")
    await a.unlink(ROOT_INO, b"r")
    await write_file(a, ROOT_INO, b"r", b"a new file of that name")
    again = dict(await b.readdir(ROOT_INO))  # metadata TTL 0: relisted
    assert kernel.changed == [seen[b"f"].ino] and again[b"f"] is seen[b"f"]
    assert again[b"f"].attrs.size == len(b"one, longer now")
    assert sorted(kernel.gone) == [(ROOT_INO, b"g"), (ROOT_INO, b"r")]
    assert again[b"r"] is not seen[b"r"] and b"g" not in again
    await b.readdir(ROOT_INO)  # nothing new: nothing told
    assert len(kernel.changed) == 1 and len(kernel.gone) == 2


async def test_a_small_file_opened_for_reading_is_fetched_before_the_first_read(
    tmp_path: Path,
) -> None:
    store = MemoryStore()
    a = await make_fs(tmp_path / "a", store)
    data = os.urandom(3 * 4096 + 10)
    await write_file(a, ROOT_INO, b"small", data)
    await write_file(a, ROOT_INO, b"big", os.urandom(a.opt.small_file_bytes + 1))
    b = await make_fs(tmp_path / "b", store)
    async with trio.open_nursery() as nursery:
        await nursery.start(b.serve_writeback)
        small = await b.lookup(ROOT_INO, b"small")
        store.calls.clear()
        h = await b.open(small.ino, os.O_RDONLY)
        await trio.testing.wait_all_tasks_blocked()
        assert store.calls.get("get", 0) == 1  # at open, not at the first read
        assert await b.read(h.fh, 0, 1 << 20) == data
        assert store.calls.get("get", 0) == 1  # the read waited for it, no GET of its own
        await b.release(h.fh)
        big = await b.lookup(ROOT_INO, b"big")
        store.calls.clear()
        h = await b.open(big.ino, os.O_RDONLY)
        await trio.testing.wait_all_tasks_blocked()
        assert store.calls.get("get", 0) == 0  # a larger file waits for a read (random?)
        await b.release(h.fh)
        nursery.cancel_scope.cancel()


async def test_small_files_read_in_name_order_are_fetched_ahead_of_the_reader(
    tmp_path: Path,
) -> None:
    store = MemoryStore()
    a = await make_fs(tmp_path / "a", store)
    d = await a.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    files = {f"f{i:02d}".encode(): os.urandom(100 + i) for i in range(20)}
    for name, data in files.items():
        await write_file(a, d.ino, name, data)
    await a.mkdir(d.ino, b"f05x", 0o755, 0, 0)  # a directory among them: skipped
    b = await make_fs(tmp_path / "b", store)
    ahead = b.opt.sibling_readahead

    async def cat(name: bytes) -> bytes:
        node = await b.lookup(dd.ino, name)
        h = await b.open(node.ino, os.O_RDONLY)
        try:
            return await b.read(h.fh, 0, 1 << 20)
        finally:
            await b.release(h.fh)

    async with trio.open_nursery() as nursery:
        await nursery.start(b.serve_writeback)
        dd = await b.lookup(ROOT_INO, b"d")
        await b.readdir(dd.ino)
        # out of order: only the file opened is fetched
        store.calls.clear()
        assert await cat(b"f12") == files[b"f12"]
        assert await cat(b"f03") == files[b"f03"]
        await trio.testing.wait_all_tasks_blocked()
        assert store.calls.get("get", 0) == 2
        # the second open in name order fetches the next files, which then cost no GET
        store.calls.clear()
        assert await cat(b"f04") == files[b"f04"]
        await trio.testing.wait_all_tasks_blocked()
        assert store.calls.get("get", 0) == 1 + ahead - 1  # f04 itself; f05x is a directory
        for i in range(5, 4 + ahead):
            assert await cat(f"f{i:02d}".encode()) == files[f"f{i:02d}".encode()]
        await trio.testing.wait_all_tasks_blocked()
        # each open moved the window on: f04 to f19 were fetched once, but for f12 (cached)
        assert ahead == 8 and store.calls.get("get", 0) == 16 - 1
        # a file changed elsewhere after it was fetched ahead is read as it is now
        name = f"f{4 + ahead:02d}".encode()
        an = await a.lookup(d.ino, name)
        h = await a.open(an.ino, os.O_WRONLY | os.O_TRUNC)
        await a.setattr(an.ino, size=0)
        await a.write(h.fh, 0, b"rewritten")
        await a.release(h.fh)
        await a.sync_node(an)
        node = await b.lookup(dd.ino, name)
        node.refreshed_at = -1e18  # past the metadata TTL
        assert await cat(name) == b"rewritten"
        # with it off, nothing is fetched ahead
        b.opt.sibling_readahead = 0
        store.calls.clear()
        for i in range(0, 3):
            await cat(f"f{i:02d}".encode())
        await trio.testing.wait_all_tasks_blocked()
        assert store.calls.get("get", 0) == 3
        nursery.cancel_scope.cancel()


async def test_a_listing_remembers_object_keys_and_a_relisting_decrypts_only_new_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = MemoryStore()
    a = await make_fs(tmp_path / "a", store)
    d = await a.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    for i in range(5):
        await write_file(a, d.ino, f"f{i}".encode(), b"x" * i)
    b = await make_fs(tmp_path / "b", store)
    names = b.vol.names
    calls = {"encode": 0, "decode": 0}
    for what in calls:

        def count(*args: object, _f: object = getattr(names, what), _w: str = what) -> object:
            calls[_w] += 1
            return _f(*args)  # type: ignore[operator]

        monkeypatch.setattr(names, what, count)
    bd = await b.lookup(ROOT_INO, b"d")
    entries = dict(await b.readdir(bd.ino))
    assert calls["decode"] == 5
    before = calls["encode"]
    for n in entries.values():
        assert b.object_key(n)[0] in store.objects  # the listed key, not encrypted again
    assert calls["encode"] == before
    await write_file(a, d.ino, b"new", b"y")
    again = dict(await b.readdir(bd.ino))  # metadata TTL 0: relisted
    assert set(again) == {*entries, b"new"} and calls["decode"] == 6
    assert await read_file(b, again[b"f3"].ino) == b"xxx"


@pytest.mark.parametrize("segment_log2", [None, 14])
async def test_a_sparse_multipart_file_uploads_parts_that_read_back(
    tmp_path: Path, segment_log2: int | None
) -> None:
    """Parts are sealed into reused buffers from runs of staged chunks (revision 1) or of
    segments (revision 3, the trailer in the last part): holes, a short last part and a
    short last chunk all come back as written, through a fresh mount."""
    store = MemoryStore()
    src = KeySource(keyfile=Secret(b"k" * 32))
    vol = await Volume.create(
        store, src, chunk_log2=12, encrypt_names=True, segment_log2=segment_log2
    )
    opts = Options(writeback_delay=0.1, multipart_threshold=32 << 10, part_size=16 << 10)
    fs = Filesystem(vol, StagingArea(tmp_path / "a", vol.keys.cache, vol.chunk), opts)
    await fs.ensure_root()
    # 49 chunks of 4 KiB: 13 parts, the last one of 1 chunk; or 13 segments of 4 chunks
    ref = bytearray(200_000 + 77)
    node, h = await fs.create(ROOT_INO, b"sparse", 0o644, 0, 0)
    for off, n in ((5000, 9000), (70_000, 3), (131_072, 8192), (200_000, 77)):
        piece = os.urandom(n)
        ref[off : off + n] = piece
        await fs.write(h.fh, off, piece)
    await fs.release(h.fh)
    store.calls.clear()
    await fs.sync_node(node)
    assert store.calls.get("upload_part") == 13
    fs2 = await make_fs(tmp_path / "b", store)
    assert await read_file(fs2, (await fs2.lookup(ROOT_INO, b"sparse")).ino) == bytes(ref)
