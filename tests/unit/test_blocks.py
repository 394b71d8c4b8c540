"""The on-disk block cache: bounded, LRU, survives remounts, never trusted blindly."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import trio

from cryptfs.cache.blocks import BlockCache
from cryptfs.cache.staging import StagingArea
from cryptfs.fs.filesystem import Filesystem
from cryptfs.fs.model import ROOT_INO, Options
from cryptfs.store.memory import MemoryStore
from cryptfs.volume import Volume
from tests.fsutil import read_file, write_file
from tests.unit.test_filesystem import make_fs

CHUNK = 4096


async def _mount(tmp_path: Path, vol: Volume, n: int) -> Filesystem:
    """Mount ``n`` of ``vol``: a staging area of its own, the one block cache (it outlives
    mounts), a memory cache that starts empty."""
    st = StagingArea(tmp_path / f"st{n}", vol.keys.cache, vol.chunk)
    blocks = BlockCache(tmp_path / "blocks", 64 << 20, vol.chunk)
    fs = Filesystem(vol, st, Options(metadata_ttl=0), blocks=blocks)
    await fs.ensure_root()
    return fs


def test_put_get_and_lru_bound(tmp_path: Path) -> None:
    c = BlockCache(tmp_path / "b", 300 << 10, CHUNK)
    a, b, salt = b"a" * 16, b"b" * 16, b"s" * 32
    chunks = {i: os.urandom(CHUNK + 16) for i in range(20)}
    c.put(a, salt, b"H" * 92, chunks)
    header, got = c.get(a, salt, 5, 30)
    assert header == b"H" * 92 and got == {i: chunks[i] for i in range(5, 20)}
    c.put(a, salt, None, {40: b"short last chunk"})
    assert c.get(a, salt, 40, 40)[1] == {40: b"short last chunk"}
    assert c.get(b, salt, 0, 3) == (None, {})
    used_a = c.used
    assert 20 * CHUNK < used_a < 300 << 10
    # another version pushes the least recently used one out once over the bound
    c.put(b, salt, None, {i: os.urandom(CHUNK + 16) for i in range(60)})
    assert not c.has(a, salt) and c.has(b, salt) and c.used <= 300 << 10
    # one version larger than the cache stops growing instead of evicting itself
    c.put(b, salt, None, {i: os.urandom(CHUNK + 16) for i in range(60, 200)})
    assert c.has(b, salt) and c.used <= 300 << 10
    # a new BlockCache (a remount) finds what is on disk
    again = BlockCache(tmp_path / "b", 300 << 10, CHUNK)
    assert again.has(b, salt) and again.used == c.used
    assert again.get(b, salt, 0, 0)[1].keys() == {0}
    assert oct((tmp_path / "b").stat().st_mode & 0o777) == "0o700"
    # a small object takes what its bytes need, not a whole chunk record (no padding)
    small = BlockCache(tmp_path / "s", 300 << 10, 64 << 10)
    small.put(a, salt, b"H" * 92, {0: os.urandom(4096 + 16)})
    assert small.get(a, salt, 0, 0)[1][0] and small.used <= 12 << 10


def test_small_whole_objects_share_packs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Objects of one chunk put whole go into append-only packs (no file each), are found
    again after a remount, leave a pack at a time when over the bound, and a record that
    does not match its index entry is a miss, not wrong bytes."""
    import cryptfs.cache.blocks as blocks_mod

    monkeypatch.setattr(blocks_mod, "PACK_MAX", 16 << 10)
    root = tmp_path / "b"
    c = BlockCache(root, 1 << 20, CHUNK)
    salt = b"s" * 32
    objs = {bytes([i]) * 16: (os.urandom(92), os.urandom(1000 + i)) for i in range(60)}
    for fid, (h, ch) in objs.items():
        c.put(fid, salt, h, {0: ch}, whole=True)
    assert not list(root.glob("*.blk2"))  # no file per object
    assert len(list(root.glob("*.pack"))) == len(list(root.glob("*.pidx"))) > 1
    for fid, (h, ch) in objs.items():
        assert c.has(fid, salt) and c.get(fid, salt, 0, 0) == (h, {0: ch})
    assert c.get(b"\xee" * 16, salt, 0, 0) == (None, {})
    # a remount finds them all, by the index
    again = BlockCache(root, 1 << 20, CHUNK)
    assert again.used == c.used
    for fid, (_h, ch) in objs.items():
        assert again.get(fid, salt, 0, 0, header=False) == (None, {0: ch})
    # over the bound: the oldest packs go, whole, with their index
    small = BlockCache(root, 40 << 10, CHUNK)
    first, last = next(iter(objs)), list(objs)[-1]
    assert small.used <= 40 << 10 and not (root / "1.pack").exists()
    assert not (root / "1.pidx").exists() and not small.has(first, salt)
    kept = [fid for fid in objs if small.has(fid, salt)]
    assert kept and kept == list(objs)[-len(kept) :]  # the newest stay
    # a record that does not match its entry (a crash kept the entry, not the record)
    pack = max(root.glob("*.pack"), key=lambda p: int(p.stem))
    raw = bytearray(pack.read_bytes())
    raw[len(raw) - (60 + 92 + len(objs[last][1])) + 4] ^= 1  # the last record's file id
    pack.write_bytes(bytes(raw))
    assert small.get(last, salt, 0, 0) == (None, {}) and not small.has(last, salt)
    # a pack without its index is removed at the next start
    (root / "99.pack").write_bytes(b"x" * 100)
    BlockCache(root, 40 << 10, CHUNK)
    assert not (root / "99.pack").exists()
    # an object of several chunks, or one without its header, is never packed
    c2 = BlockCache(tmp_path / "c", 1 << 20, CHUNK)
    c2.put(b"m" * 16, salt, b"H" * 92, {0: os.urandom(CHUNK + 16), 1: b"x" * 40}, whole=True)
    c2.put(b"n" * 16, salt, None, {0: b"x" * 40}, whole=True)
    assert len(list((tmp_path / "c").glob("*.blk2"))) == 2
    assert not list((tmp_path / "c").glob("*.pack"))


async def test_small_files_read_again_from_packs_after_a_remount(tmp_path: Path) -> None:
    store = MemoryStore()
    fs = await make_fs(tmp_path, store)
    files = {f"f{i}".encode(): os.urandom(100 + 37 * i) for i in range(20)}
    for name, data in files.items():
        await write_file(fs, ROOT_INO, name, data)
    vol = fs.vol

    fs1 = await _mount(tmp_path, vol, 1)
    for name, data in files.items():
        assert await read_file(fs1, (await fs1.lookup(ROOT_INO, name)).ino) == data
    assert not list((tmp_path / "blocks").glob("*.blk2"))  # one pack, no file per file
    assert len(list((tmp_path / "blocks").glob("*.pack"))) == 1
    fs2 = await _mount(tmp_path, vol, 2)
    nodes = {name: await fs2.lookup(ROOT_INO, name) for name in files}
    store.calls.clear()
    for name, data in files.items():
        assert await read_file(fs2, nodes[name].ino) == data
    assert store.calls.get("get", 0) == 0  # headers and chunks came from the pack
    # a flipped byte in the pack: that file is fetched again, the others are not, no EIO
    (pack,) = (tmp_path / "blocks").glob("*.pack")
    raw = bytearray(pack.read_bytes())
    raw[-5] ^= 1  # in the last file's chunk
    pack.write_bytes(bytes(raw))
    fs3 = await _mount(tmp_path, vol, 3)
    nodes = {name: await fs3.lookup(ROOT_INO, name) for name in files}
    store.calls.clear()
    for name, data in files.items():
        assert await read_file(fs3, nodes[name].ino) == data
    assert fs3.integrity_failures == 0 and store.calls.get("get", 0) == 1


@pytest.mark.parametrize("segment_log2", [None, 14])
async def test_remount_reads_from_disk_and_a_bad_copy_is_fetched_again(
    tmp_path: Path, segment_log2: int | None
) -> None:
    store = MemoryStore()
    fs = await make_fs(tmp_path, store, segment_log2=segment_log2)
    data = os.urandom(200_000)
    await write_file(fs, ROOT_INO, b"f", data)
    vol = fs.vol

    fs1 = await _mount(tmp_path, vol, 1)
    assert await read_file(fs1, (await fs1.lookup(ROOT_INO, b"f")).ino) == data
    fs2 = await _mount(tmp_path, vol, 2)  # a remount: memory empty, disk cache kept
    node = await fs2.lookup(ROOT_INO, b"f")
    store.calls.clear()
    spans: list[int] = []
    real_get = store.get

    async def get(key, start=None, end=None, if_match=None):  # type: ignore[no-untyped-def]
        spans.append(end - start)
        return await real_get(key, start, end, if_match=if_match)

    store.get = get  # type: ignore[method-assign]
    assert await read_file(fs2, node.ino) == data
    store.get = real_get  # type: ignore[method-assign]
    # not one byte of the body downloaded (revision 3: its trailer and segment heads were
    # kept beside its chunks, and are checked again as S3's are)
    assert spans == []
    assert fs2.blocks is not None and fs2.blocks.hits >= len(data) // vol.chunk

    # flip a byte of a cached chunk: the copy is dropped and S3 asked again, no EIO
    (f,) = (tmp_path / "blocks").glob("*.blk2")
    raw = bytearray(f.read_bytes())
    raw[4096 + 200] ^= 1  # in chunk 0 (records start on 4 KiB boundaries)
    f.write_bytes(bytes(raw))
    fs3 = await _mount(tmp_path, vol, 3)
    node = await fs3.lookup(ROOT_INO, b"f")
    assert await read_file(fs3, node.ino) == data
    assert fs3.integrity_failures == 0 and store.calls.get("get", 0) >= 1
    # a changed file is a new version: the old cached one is never served for it
    h = await fs3.open(node.ino, os.O_RDWR)
    await fs3.setattr(node.ino, size=0)
    await fs3.write(h.fh, 0, b"new content")
    await fs3.release(h.fh)
    await fs3.sync_node(node)
    fs4 = await _mount(tmp_path, vol, 4)
    assert await read_file(fs4, (await fs4.lookup(ROOT_INO, b"f")).ino) == b"new content"


def test_large_puts_bypass_the_page_cache_and_mix_with_small_ones(tmp_path: Path) -> None:
    chunk = 64 << 10
    c = BlockCache(tmp_path / "b", 64 << 20, chunk)
    fid, salt = b"f" * 16, b"s" * 32
    n = 40  # 2.6 MiB: more than one aligned buffer, so several direct writes
    chunks = {i: os.urandom(chunk + 16) for i in range(n)}
    chunks[n] = os.urandom(1000)  # the object's short final chunk
    c.put(fid, salt, b"H" * 92, {i: memoryview(v) for i, v in chunks.items()})
    assert c.direct and c.direct_writes == 1
    # a small put (one chunk) goes through the page cache, beside the direct records
    c.put(fid, salt, None, {n + 5: b"x" * 77})
    assert c.direct_writes == 1
    header, got = c.get(fid, salt, 0, n + 5)
    assert header == b"H" * 92 and got == {**chunks, n + 5: b"x" * 77}
    # records start on 4 KiB boundaries (the file is sparse where nothing was cached)
    (f,) = (tmp_path / "b").iterdir()
    assert f.name.endswith(".blk2")
    assert f.stat().st_blocks * 512 == c.used < (n + 3) * (chunk + 4096) + 4096


def test_direct_puts_beyond_the_buffers_kept_close_theirs_after_use(tmp_path: Path) -> None:
    """More writers than pooled buffers: the extra buffer is closed once its put is done,
    which must not fail on a view of it still alive (it did: BufferError, cache not written)."""
    import threading

    chunk = 64 << 10
    c = BlockCache(tmp_path / "b", 256 << 20, chunk)
    salt = b"s" * 32
    data = {i: os.urandom(chunk + 16) for i in range(8)}  # 512 KiB: a direct put
    start = threading.Barrier(6)
    errors: list[BaseException] = []

    def put(k: int) -> None:
        start.wait()
        try:
            for r in range(5):
                c.put(bytes([k, r]) * 8, salt, None, data)
        except BaseException as e:  # pragma: no cover - the failure this test is for
            errors.append(e)

    threads = [threading.Thread(target=put, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and c.errors == 0 and c.direct_writes == 30
    assert c.get(bytes([5, 4]) * 8, salt, 0, 7)[1] == data


def test_a_disk_without_o_direct_is_written_through_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open

    def refuse_direct(path: object, flags: int, *a: object) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", refuse_direct)
    chunk = 64 << 10
    c = BlockCache(tmp_path / "b", 64 << 20, chunk)
    fid, salt = b"f" * 16, b"s" * 32
    chunks = {i: os.urandom(chunk + 16) for i in range(8)}
    c.put(fid, salt, b"H" * 92, chunks)
    assert not c.direct and c.direct_writes == 0 and c.errors == 0
    assert c.get(fid, salt, 0, 7) == (b"H" * 92, chunks)


def test_files_of_the_unaligned_layout_before_are_removed(tmp_path: Path) -> None:
    root = tmp_path / "b"
    root.mkdir()
    old = root / f"{'ab' * 16}-{'cd' * 32}.blk"
    old.write_bytes(b"\0\0\0\x5c" + b"H" * 92)
    c = BlockCache(root, 64 << 20, CHUNK)
    assert not old.exists() and c.used == 0


def _entry(fid: bytes, salt: bytes, off: int, hl: int, cl: int) -> bytes:
    """A pack index entry (docs/FORMAT.md §5)."""
    import struct

    return fid + salt + struct.pack(">QII", off, hl, cl)


def test_a_pack_index_larger_than_its_pack_allows_is_not_read_whole(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A cache disk's index is not trusted: an index far larger than its pack could need
    (corrupted, or planted) costs no huge allocation, and what it adds is never served."""
    import tracemalloc

    root = tmp_path / "b"
    c = BlockCache(root, 1 << 30, CHUNK)
    salt, header, chunk = b"s" * 32, os.urandom(92), os.urandom(1000)
    c.put(b"a" * 16, salt, header, {0: chunk}, whole=True)
    os.truncate(root / "1.pidx", 256 << 20)  # sparse: millions of zero entries
    tracemalloc.start()
    try:
        again = BlockCache(root, 1 << 30, CHUNK)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak
    assert again.get(b"a" * 16, salt, 0, 0) == (header, {0: chunk})  # the real entry stays
    assert not again.has(bytes(16), bytes(32))  # the zero entries are not indexed
    assert "no record can match" in caplog.text


def test_pack_index_entries_out_of_range_are_misses(tmp_path: Path) -> None:
    """Entries whose lengths are not a header's and one chunk's, that point past the end of
    what a pack can hold, or that are cut short, are left out; what remains is served."""
    root = tmp_path / "b"
    c = BlockCache(root, 1 << 30, CHUNK)
    salt, header, chunk = b"s" * 32, os.urandom(92), os.urandom(1000)
    c.put(b"a" * 16, salt, header, {0: chunk}, whole=True)
    good = (root / "1.pidx").read_bytes()
    os.truncate(root / "1.pack", 300 << 20)  # sparse: holes read as zeros, of any length
    bad = {
        b"h" * 16: _entry(b"h" * 16, salt, 0, 200 << 20, 1000),  # a "header" of 200 MiB
        b"c" * 16: _entry(b"c" * 16, salt, 0, 92, 100 << 20),  # a "chunk" of 100 MiB
        b"z" * 16: _entry(b"z" * 16, salt, 0, 0, 0),  # nothing at all
        b"o" * 16: _entry(b"o" * 16, salt, 200 << 20, 92, 1000),  # past any real pack
    }
    (root / "1.pidx").write_bytes(good + b"".join(bad.values()) + good[:30])  # and a cut one
    # names that are not pack numbers are left alone (never taken for another pack's)
    for stray in ("x.pidx", "-1.pidx", "01.pidx", "1_0.pidx"):
        (root / stray).write_bytes(good)
    again = BlockCache(root, 1 << 30, CHUNK)
    assert again.used == sum((root / n).stat().st_size for n in ("1.pack", "1.pidx"))
    assert again.get(b"a" * 16, salt, 0, 0) == (header, {0: chunk})
    for fid in bad:
        assert not again.has(fid, salt), fid
        assert again.get(fid, salt, 0, 0) == (None, {})


def test_the_trio_thread_never_waits_for_a_workers_disk_io(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``has`` (the trio thread's question) took the lock a worker holds across disk I/O
    (appending a packed record, evicting files): a slow cache disk stalled every FUSE
    request (issue 18, lower). Now ``has`` takes no lock, and evicted files are unlinked
    after the lock is released."""
    import threading

    c = BlockCache(tmp_path / "b", 200 << 10, CHUNK)
    salt = b"s" * 32
    c.put(b"a" * 16, salt, b"H" * 92, {i: os.urandom(CHUNK + 16) for i in range(20)})
    answered = threading.Event()
    with c._lock:  # a worker in the middle of a write
        t = threading.Thread(target=lambda: (c.has(b"a" * 16, salt), answered.set()))
        t.start()
        assert answered.wait(2), "has() waited for the lock"
    t.join()
    held: list[bool] = []
    real_unlink = Path.unlink

    def unlink(self: Path, missing_ok: bool = False) -> None:
        held.append(c._lock.locked())
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    for k in range(3):  # each evicts the one before
        c.put(bytes([k]) * 16, salt, b"H" * 92, {i: os.urandom(CHUNK + 16) for i in range(30)})
    assert held and not any(held)


@pytest.mark.parametrize("damage", ["flip", "cut", "swap"])
async def test_a_damaged_copy_of_a_trailer_or_head_is_read_from_s3_unreported(
    tmp_path: Path, damage: str
) -> None:
    """The trailer and segment heads a revision-3 version keeps on the cache disk are what
    S3 gave, checked again when used: a flipped byte, a torn end, or another version's
    records put in their place, and the mount reads them from S3 instead (the cache disk is
    not the bucket: no integrity failure is reported, and the file reads back)."""
    store = MemoryStore()
    fs = await make_fs(tmp_path, store, segment_log2=14)
    data = os.urandom(200_000)
    await write_file(fs, ROOT_INO, b"f", data)
    await write_file(fs, ROOT_INO, b"g", os.urandom(200_000))
    vol = fs.vol
    fs1 = await _mount(tmp_path, vol, 1)
    for name in (b"f", b"g"):
        await read_file(fs1, (await fs1.lookup(ROOT_INO, name)).ino)
    await trio.sleep(0.3)  # (written behind the reads)
    node_f = await fs1.lookup(ROOT_INO, b"f")
    sidecar = next((tmp_path / "blocks").glob(f"{node_f.file_id.hex()}-*.h3"))
    (other,) = [p for p in (tmp_path / "blocks").glob("*.h3") if p != sidecar]
    raw = bytearray(sidecar.read_bytes())
    if damage == "flip":
        for i in range(20, len(raw), 997):
            raw[i] ^= 1
    elif damage == "cut":
        raw = raw[: len(raw) // 2]
    else:
        raw = bytearray(other.read_bytes())
    sidecar.write_bytes(bytes(raw))
    fs2 = await _mount(tmp_path, vol, 2)
    node = await fs2.lookup(ROOT_INO, b"f")
    assert await read_file(fs2, node.ino) == data
    assert fs2.integrity_failures == 0, fs2.tree.integrity_log
