"""The file system over a store that fails the way networks do (tests/faults.py): nothing
closed and flushed is ever lost, and no read returns wrong bytes — it returns the right ones
or raises (EIO at the FUSE layer)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from cryptfs.cache.staging import StagingArea
from cryptfs.crypto import Secret
from cryptfs.errors import CryptfsError
from cryptfs.format.volume import KeySource
from cryptfs.fs.filesystem import Filesystem
from cryptfs.fs.model import ROOT_INO, Options
from cryptfs.store.memory import MemoryStore
from cryptfs.volume import Volume
from tests.faults import FaultyStore

KEY = KeySource(keyfile=Secret(b"f" * 32))
OPTS = Options(
    writeback_delay=0,
    metadata_ttl=0,
    multipart_threshold=32 << 10,
    part_size=16 << 10,
    memory_cache_bytes=64 << 10,
)


async def _fs(store: MemoryStore, tmp: Path, faulty: FaultyStore | None = None) -> Filesystem:
    vol = await Volume.open(store, KEY)
    if faulty is not None:
        vol.store = faulty
    fs = Filesystem(vol, StagingArea(tmp, vol.keys.cache, vol.chunk), OPTS)
    await fs.ensure_root()
    return fs


@pytest.mark.allow_error_logs
@pytest.mark.parametrize("seed", range(1, 9))
async def test_faults_never_lose_a_flushed_byte_nor_serve_a_wrong_one(
    tmp_path: Path, seed: int
) -> None:
    rng = random.Random(seed)
    inner = MemoryStore()
    await Volume.create(inner, KEY, chunk_log2=12, encrypt_names=True)
    faulty = FaultyStore(inner, rng, rate=0.0)
    fs = await _fs(inner, tmp_path / "a", faulty)
    faulty.rate = 0.25
    ref: dict[bytes, bytearray] = {}
    inos: dict[bytes, int] = {}
    wrong = 0
    for _step in range(150):
        name = rng.choice([b"f1", b"f2", b"f3", b"big"])
        op = rng.choice(["write", "write", "read", "read", "truncate", "sync"])
        try:
            if name not in inos:
                node, h = await fs.create(ROOT_INO, name, 0o644, 0, 0)
                await fs.release(h.fh)
                inos[name], ref[name] = node.ino, bytearray()
            ino = inos[name]
            if op == "write":
                off = rng.randrange(0, 100_000 if name == b"big" else 9000)
                data = rng.randbytes(rng.choice([1, 700, 4096, 20_000]))
                h = await fs.open(ino, os.O_RDWR)
                await fs.write(h.fh, off, data)
                await fs.release(h.fh)
                r = ref[name]
                r.extend(bytes(max(0, off + len(data) - len(r))))
                r[off : off + len(data)] = data
            elif op == "truncate":
                size = rng.randrange(0, len(ref[name]) + 5000)
                await fs.setattr(ino, size=size)
                r = ref[name]
                del r[size:]
                r.extend(bytes(size - len(r)))
            elif op == "read":
                h = await fs.open(ino, os.O_RDONLY)
                try:
                    got = await fs.read(h.fh, 0, 1 << 20)
                finally:
                    await fs.release(h.fh)
                if got != bytes(ref[name]):
                    wrong += 1
            else:
                await fs.sync_node(fs.node(ino))
        except CryptfsError:
            pass  # an injected failure: reported, never wrong bytes
    assert wrong == 0, f"seed {seed}: {wrong} read(s) returned wrong bytes"
    assert sum(faulty.injected.values()) > 20, faulty.injected

    faulty.rate = 0.0  # the network heals: everything staged lands
    assert await fs.flush_all() == []
    fresh = await _fs(inner, tmp_path / "b")
    for name, want in ref.items():
        node = await fresh.lookup(ROOT_INO, name)
        h = await fresh.open(node.ino, os.O_RDONLY)
        assert await fresh.read(h.fh, 0, 1 << 20) == bytes(want), f"seed {seed}: {name!r}"
        await fresh.release(h.fh)
    # multipart uploads whose abort failed are remembered in the staging area, and the next
    # mount on it aborts them; only uploads whose start was never answered can remain
    again = await _fs(inner, tmp_path / "a")
    await again.recover()
    lost_starts = faulty.injected.get("create_multipart: answer lost", 0)
    assert len(await inner.list_uploads("")) <= lost_starts
    assert again.staging.leftover_uploads() == {}
