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
