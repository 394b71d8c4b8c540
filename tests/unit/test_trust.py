"""Issue 17's claims that are about this process rather than the bucket (docs/SECURITY.md)."""

from __future__ import annotations

from pathlib import Path

from cryptfs.fs.filesystem import ROOT_INO
from cryptfs.store.memory import MemoryStore
from tests.unit.test_filesystem import make_fs


async def test_the_journal_holds_no_data_key(tmp_path: Path) -> None:
    """R4: a staged file's journal (sealed on the cache disk) carries no data key and no
    wrapped one: the upload makes a fresh data key, so nothing here outlives a rotation."""
    store = MemoryStore()
    fs = await make_fs(tmp_path, store)
    node, h = await fs.create(ROOT_INO, b"staged", 0o644, 0, 0)
    await fs.write(h.fh, 0, b"pending bytes")
    await fs.release(h.fh)
    records = fs.staging.journals()
    assert records, "a closed, not yet uploaded file has a journal"
    for rec in records:
        assert not {"dek", "wrapped", "kid", "scheme"} & set(rec), sorted(rec)
    # and the upload that follows wraps a fresh data key, under the volume's target
    await fs.sync_node(node)
    kids = {md["cfs-kid"] for _b, md, _e in store.objects.values() if "cfs-k" in md}
    assert kids == {fs.vol.config.dek["kid"]}


def test_journal_records_have_a_key_each_and_old_ones_still_read(tmp_path: Path) -> None:
    """A journal record is sealed under a key of its own (no random nonce under one key of
    the volume's lifetime); a record an earlier version wrote still reads."""
    import json
    import os

    from cryptfs.cache.staging import StagingArea
    from cryptfs.crypto import Secret

    area = StagingArea(tmp_path, Secret(os.urandom(32)), 4096)
    fid = os.urandom(16)
    a, b = (area.seal_journal(fid, {"seq": 1}) for _ in range(2))
    assert a[:32] != b[:32]
    path = tmp_path / (fid.hex() + ".journal")
    path.write_bytes(b"CFJ2" + len(a).to_bytes(4, "big") + a)
    assert area.read_journal(path)["seq"] == 1
    old = area._journal_aead.seal_random(
        json.dumps({"seq": 7}).encode(), b"cryptfs/v1/journal\0" + fid
    )
    path.write_bytes(b"CFJ2" + len(old).to_bytes(4, "big") + old)
    assert area.read_journal(path)["seq"] == 7
