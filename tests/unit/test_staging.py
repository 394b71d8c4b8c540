"""The staging journal: written in place into two slots, and every crash point recovers."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from cryptfs.cache.staging import _JSLOT, _POOL, StagingArea
from cryptfs.crypto import Secret
from cryptfs.errors import IntegrityError
from cryptfs.format.names import b64e

KEY = Secret(b"c" * 32)


def _area(tmp_path: Path) -> StagingArea:
    return StagingArea(tmp_path / "staging", KEY, 4096)


def test_journal_records_alternate_slots_and_the_latest_wins(tmp_path: Path) -> None:
    area = _area(tmp_path)
    sf = area.create(os.urandom(16))
    sf.write(0, b"data")
    sf.save_journal({"path": "first"})
    inode = sf.journal_path.stat().st_ino
    for i in range(5):
        sf.save_journal({"path": f"p{i}"}, durable=i == 2)
    assert sf.journal_path.stat().st_ino == inode  # rewritten in place, never replaced
    assert area.read_journal(sf.journal_path)["path"] == "p4"
    assert sf.journal_path.stat().st_size <= 2 * _JSLOT
    [(found, rec)] = area.recover()
    assert rec["path"] == "p4" and found.read(0, 4) == b"data"


@pytest.mark.allow_error_logs
def test_a_torn_journal_write_leaves_the_record_before_it(tmp_path: Path) -> None:
    area = _area(tmp_path)
    sf = area.create(os.urandom(16))
    sf.save_journal({"path": "old"})  # slot 0
    sf.save_journal({"path": "new"})  # slot 1
    raw = bytearray(sf.journal_path.read_bytes())
    raw[_JSLOT + 40] ^= 1  # the crash tore the write of "new"
    sf.journal_path.write_bytes(bytes(raw))
    assert area.read_journal(sf.journal_path)["path"] == "old"
    # a torn first record: its close never returned; like any unreadable journal it is not
    # recovered, and kept with its data for inspection (logged)
    other = area.create(os.urandom(16))
    other.save_journal({"path": "x"})
    other.journal_path.write_bytes(other.journal_path.read_bytes()[:30])
    assert [rec["path"] for _sf, rec in area.recover()] == ["old"]
    assert other.path.exists() and other.journal_path.exists()


def test_journal_of_an_earlier_version_still_recovers_and_is_replaced(tmp_path: Path) -> None:
    area = _area(tmp_path)
    sf = area.create(os.urandom(16))
    sf.write(0, b"older")
    sf.close()
    # earlier versions wrote one sealed record as the whole file, by write + rename
    legacy = {"path": "legacy", "size": 5, "salt": b64e(sf.salt)}
    sf.journal_path.write_bytes(area.seal_journal(sf.stage_id, legacy))
    [(found, rec)] = area.recover()
    assert rec["path"] == "legacy" and found.read(0, 5) == b"older"
    found.save_journal({"path": "after upgrade"})  # exists: replaced atomically, then in place
    found.save_journal({"path": "in place"})
    assert area.read_journal(found.journal_path)["path"] == "in place"


def test_new_staged_files_and_journals_take_files_made_ahead(tmp_path: Path) -> None:
    area = _area(tmp_path)
    first = area.create(os.urandom(16))  # the pool is empty: created here, refill started
    for t in threading.enumerate():
        if t.name == "cryptfs-staging-pool":
            t.join(10)
    pooled = set(area.root.glob("*.pool"))
    assert len(pooled) == _POOL
    sf = area.create(os.urandom(16))
    sf.write(0, b"x")
    sf.save_journal({"path": "p"})
    left = set(area.root.glob("*.pool"))
    assert len(pooled - left) == 2 and left < pooled  # the data file and the journal
    assert sf.path.stat().st_size > 0 and area.read_journal(sf.journal_path)["path"] == "p"
    assert oct(sf.path.stat().st_mode & 0o777) == "0o600"
    assert first.path.exists()
    for t in threading.enumerate():
        if t.name == "cryptfs-staging-pool":
            t.join(10)
    _area(tmp_path)  # the next run: files made ahead are never part of a staged file
    assert not list(area.root.glob("*.pool"))
    [(found, rec)] = area.recover()
    assert found.stage_id == sf.stage_id and rec["path"] == "p"


def test_a_journal_whose_first_record_never_got_written_is_no_journal(tmp_path: Path) -> None:
    area = _area(tmp_path)
    sf = area.create(os.urandom(16))
    sf.write(0, b"never closed")
    area.claim(sf.journal_path)  # the crash came between the claim and the first record
    assert sf.journal_path.stat().st_size == 0
    assert area.recover() == []  # nothing was promised: both go, quietly (no ERROR log)
    assert not sf.journal_path.exists() and not sf.path.exists()


def test_a_removed_staged_file_becomes_empty_files_of_the_pool(tmp_path: Path) -> None:
    area = _area(tmp_path)
    staged = []
    for _ in range(2):
        sf = area.create(os.urandom(16))
        sf.write(0, os.urandom(3 * 4096))
        sf.save_journal({"path": "p"})
        staged.append(sf)
    for t in threading.enumerate():
        if t.name == "cryptfs-staging-pool":
            t.join(10)
    # the claims raced the refill thread, which may have stopped short of full: top it up
    area._refill()
    assert len(area._pool) == _POOL  # full: a removal deletes
    staged.pop().remove()
    assert len(area._pool) == _POOL and len(list(area.root.glob("*.pool"))) == _POOL
    area._pool.pop()  # (two taken by a staged file)
    area._pool.pop()
    pooled = set(area.root.glob("*.pool"))
    sf = staged.pop()
    sf.remove()
    assert not sf.path.exists() and not sf.journal_path.exists()
    assert area.recover() == []  # nothing left to recover
    recycled = set(area.root.glob("*.pool")) - pooled
    assert len(recycled) == 2 and len(area._pool) == _POOL
    assert {p.name for p in recycled} <= set(area._pool)
    assert all(p.stat().st_size == 0 for p in recycled)
    again = area.create(os.urandom(16))  # takes a recycled file: empty, not the old data
    assert again.path.stat().st_size == 0 and again.read(0, 100) == b""
    again.write(0, b"new")
    assert again.read(0, 3) == b"new"


def test_closing_the_area_removes_the_files_made_ahead(tmp_path: Path) -> None:
    area = _area(tmp_path)
    sf = area.create(os.urandom(16))
    sf.write(0, b"staged")
    sf.save_journal({"path": "p"})
    area.close()  # (the refill may still be running: it stops, its files go too)
    for t in threading.enumerate():
        if t.name == "cryptfs-staging-pool":
            t.join(10)
    assert not list(area.root.glob("*.pool"))
    assert sf.path.exists() and sf.journal_path.exists()  # staged files stay, of course
    [(found, rec)] = _area(tmp_path).recover()
    assert found.read(0, 6) == b"staged" and rec["path"] == "p"


def test_writes_of_whole_chunks_and_pieces_read_back_as_written(tmp_path: Path) -> None:
    """Runs of whole chunks go sealed in one pwrite (more than one run per write here), the
    pieces around them are merged into the chunk: every byte reads back, by both paths."""
    area = _area(tmp_path)
    sf = area.create(os.urandom(16))
    c = area.chunk
    data = os.urandom(c * 150 + 123)
    sf.write(0, data[: c // 2])  # a piece of chunk 0
    sf.write(
        c // 2, data[c // 2 : c * 140 + 7]
    )  # rest of 0, 139 whole chunks (three runs), a piece
    sf.write(c * 140 + 7, data[c * 140 + 7 :])
    assert sf.read(0, len(data)) == data
    sf.write(3 * c + 5, b"xyz")  # inside a chunk already written
    want = data[: 3 * c + 5] + b"xyz" + data[3 * c + 8 :]
    raw, plain = bytearray(151 * sf.slot), bytearray(151 * c)
    sf.read_run(0, 151, memoryview(raw), memoryview(plain))
    assert bytes(plain[: len(want)]) == want and not any(plain[len(want) :])


def test_a_run_read_gives_zeros_for_holes_and_refuses_a_tampered_chunk(tmp_path: Path) -> None:
    area = _area(tmp_path)
    sf = area.create(os.urandom(16))
    c = area.chunk
    sf.write(2 * c, b"\x07" * c)  # chunks 0 and 1 never written: holes
    raw, plain = bytearray(4 * sf.slot), bytearray(b"\xff" * 4 * c)
    sf.read_run(0, 4, memoryview(raw), memoryview(plain))  # chunk 3 lies past the end
    assert plain == bytes(2 * c) + b"\x07" * c + bytes(c)
    with open(sf.path, "r+b") as f:
        f.seek(2 * sf.slot + 40)
        b = f.read(1)
        f.seek(2 * sf.slot + 40)
        f.write(bytes([b[0] ^ 1]))
    plain = bytearray(4 * c)
    with pytest.raises(IntegrityError, match="staged chunk 2"):
        sf.read_run(0, 4, memoryview(raw), memoryview(plain))
    assert not any(plain)  # nothing unauthenticated left in the caller's buffer


def test_a_journal_record_is_a_typed_object_and_a_malformed_one_is_refused() -> None:
    from cryptfs.cache.staging import JournalRecord
    from cryptfs.format.meta import KIND_FILE, Attrs

    attrs = Attrs(KIND_FILE, 0o640, 1, 2, 3, 4, 5, size=6, salt=os.urandom(32))
    rec = JournalRecord(b"/a/b", os.urandom(16), attrs, '"etag"')
    assert JournalRecord.from_dict(rec.to_dict()) == rec
    assert JournalRecord.from_dict({**rec.to_dict(), "etag": None}).etag is None
    for bad in ({}, {**rec.to_dict(), "attrs": "!!"}, {**rec.to_dict(), "fid": 3}):
        with pytest.raises(IntegrityError):
            JournalRecord.from_dict(bad)


@pytest.mark.allow_error_logs
async def test_a_malformed_journal_record_leaves_its_file_staged_and_the_mount_up(
    tmp_path: Path,
) -> None:
    """A record recovery cannot read (only a bug writes one: they are sealed) made the mount
    fail with a KeyError; the file stays staged and is named at unmount."""
    from cryptfs.fs.model import ROOT_INO
    from cryptfs.store.memory import MemoryStore
    from tests.fsutil import write_file
    from tests.unit.test_filesystem import make_fs

    store = MemoryStore()
    fs = await make_fs(tmp_path, store)
    await write_file(fs, ROOT_INO, b"ok", b"fine")
    sf = fs.staging.create(os.urandom(16))
    sf.save_journal({"path": b64e(b"/x")})  # (no file id, no attributes)
    sf.close()
    again = await make_fs(tmp_path, store)
    assert await again.recover() == 0
    assert len(again.unrecovered) == 1
    assert [n for n, _ in await again.readdir(ROOT_INO)] == [b"ok"]
