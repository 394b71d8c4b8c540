"""The mount's listing never shows a foreign name that cannot be a directory entry."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from cryptfs.cache.staging import StagingArea
from cryptfs.crypto import Secret
from cryptfs.format.volume import KeySource
from cryptfs.fs.filesystem import Filesystem
from cryptfs.fs.model import ROOT_INO, Options
from cryptfs.store.memory import MemoryStore
from cryptfs.volume import Volume
from tests.unit.test_foreign_names import _s3ec_v2


async def test_readdir_skips_foreign_names_that_cannot_be_entries(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = MemoryStore()
    vol = await Volume.create(
        store, KeySource(keyfile=Secret(b"k" * 32)), chunk_log2=12, encrypt_names=True
    )
    fs = Filesystem(
        vol, StagingArea(tmp_path / "st", vol.keys.cache, vol.chunk), Options(show_foreign=True)
    )
    await fs.ensure_root()
    for key in ("ok.txt", "../evil", "nul\0.txt", "x" * 300, "d/../e", "d//f", "d/g"):
        body, md = _s3ec_v2(b"x")
        await store.put(key, body, md)
    caplog.set_level(logging.WARNING)
    names = [n for n, _ in await fs.readdir(ROOT_INO)]
    assert names == [b"d", b"ok.txt"], names
    d = await fs.lookup(ROOT_INO, b"d")
    assert [n for n, _ in await fs.readdir(d.ino)] == [b"g"]
    assert "not shown" in caplog.text and "the name '..'" in caplog.text
