"""The on-disk block cache: bounded, LRU, survives remounts, never trusted blindly."""

from __future__ import annotations

import os
from pathlib import Path

from cryptfs.cache.blocks import BlockCache
from cryptfs.cache.staging import StagingArea
from cryptfs.fs.filesystem import ROOT_INO, Filesystem, Options
from cryptfs.store.memory import MemoryStore
from tests.fsutil import read_file, write_file
from tests.unit.test_filesystem import make_fs

CHUNK = 4096


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


async def test_remount_reads_from_disk_and_a_bad_copy_is_fetched_again(tmp_path: Path) -> None:
    store = MemoryStore()
    fs = await make_fs(tmp_path, store)
    data = os.urandom(200_000)
    await write_file(fs, ROOT_INO, b"f", data)
    vol = fs.vol

    def mount(n: int) -> Filesystem:
        st = StagingArea(tmp_path / f"st{n}", vol.keys.cache, vol.chunk)
        blocks = BlockCache(tmp_path / "blocks", 64 << 20, vol.chunk)
        return Filesystem(vol, st, Options(metadata_ttl=0), blocks=blocks)

    fs1 = mount(1)
    await fs1.ensure_root()
    assert await read_file(fs1, (await fs1.lookup(ROOT_INO, b"f")).ino) == data
    fs2 = mount(2)  # a remount: memory empty, disk cache kept
    await fs2.ensure_root()
    node = await fs2.lookup(ROOT_INO, b"f")
    store.calls.clear()
    assert await read_file(fs2, node.ino) == data
    assert store.calls.get("get", 0) == 0  # not one byte of the body downloaded
    assert fs2.blocks is not None and fs2.blocks.hits >= len(data) // vol.chunk

    # flip a byte of a cached chunk: the copy is dropped and S3 asked again, no EIO
    (f,) = (tmp_path / "blocks").iterdir()
    raw = bytearray(f.read_bytes())
    raw[200] ^= 1
    f.write_bytes(bytes(raw))
    fs3 = mount(3)
    await fs3.ensure_root()
    node = await fs3.lookup(ROOT_INO, b"f")
    assert await read_file(fs3, node.ino) == data
    assert fs3.integrity_failures == 0 and store.calls.get("get", 0) >= 1
    # a changed file is a new version: the old cached one is never served for it
    h = await fs3.open(node.ino, os.O_RDWR)
    await fs3.setattr(node.ino, size=0)
    await fs3.write(h.fh, 0, b"new content")
    await fs3.release(h.fh)
    await fs3.sync_node(node)
    fs4 = mount(4)
    await fs4.ensure_root()
    assert await read_file(fs4, (await fs4.lookup(ROOT_INO, b"f")).ino) == b"new content"
