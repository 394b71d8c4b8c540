"""POSIX completeness at the file-system level (issue 20): special files, link counts,
set-group-ID directories.  The same behaviours on a real mount: tests/e2e/test_posix.py."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import trio

from cryptfs.errors import Exists, IntegrityError, Invalid
from cryptfs.format.meta import Attrs
from cryptfs.fs.model import ROOT_INO
from cryptfs.store.memory import MemoryStore
from tests.fsutil import write_file
from tests.unit.test_filesystem import make_fs

DEV = os.makedev(4, 64)


async def test_special_files_are_stored_and_survive_a_remount(tmp_path: Path) -> None:
    store = MemoryStore()
    fs = await make_fs(tmp_path, store)
    made = {
        b"fifo": await fs.mknod(ROOT_INO, b"fifo", stat.S_IFIFO | 0o640, 0, 1000, 1001),
        b"sock": await fs.mknod(ROOT_INO, b"sock", stat.S_IFSOCK | 0o755, 0, 0, 0),
        b"chr": await fs.mknod(ROOT_INO, b"chr", stat.S_IFCHR | 0o620, DEV, 0, 5),
        b"blk": await fs.mknod(ROOT_INO, b"blk", stat.S_IFBLK | 0o660, os.makedev(8, 1), 0, 6),
    }
    assert fs.stat(made[b"chr"]).rdev == DEV
    assert fs.stat(made[b"fifo"]).rdev == 0  # (a FIFO's rdev is not kept, whatever is sent)
    fs2 = await make_fs(tmp_path / "2", store)
    got = {name: fs2.stat(node) for name, node in await fs2.readdir(ROOT_INO)}
    assert stat.S_ISFIFO(got[b"fifo"].mode) and stat.S_IMODE(got[b"fifo"].mode) == 0o640
    assert (got[b"fifo"].uid, got[b"fifo"].gid) == (1000, 1001)
    assert stat.S_ISSOCK(got[b"sock"].mode) and stat.S_IMODE(got[b"sock"].mode) == 0o755
    assert stat.S_ISCHR(got[b"chr"].mode) and got[b"chr"].rdev == DEV
    assert stat.S_ISBLK(got[b"blk"].mode) and got[b"blk"].rdev == os.makedev(8, 1)
    assert all(st.size == 0 and st.nlink == 1 for st in got.values())


async def test_mknod_of_a_regular_file_is_an_empty_file_uploaded_later(tmp_path: Path) -> None:
    store = MemoryStore()
    fs = await make_fs(tmp_path, store)
    node = await fs.mknod(ROOT_INO, b"plain", stat.S_IFREG | 0o600, 0, 0, 0)
    assert fs.stat(node).mode == stat.S_IFREG | 0o600 and node.dirty
    assert node in fs.writeback.due  # uploaded as a closed new file is
    await fs.flush_all()
    fs2 = await make_fs(tmp_path / "2", store)
    st = fs2.stat(await fs2.lookup(ROOT_INO, b"plain"))
    assert st.mode == stat.S_IFREG | 0o600 and st.size == 0


async def test_mknod_refuses_what_it_cannot_make_and_existing_names(tmp_path: Path) -> None:
    fs = await make_fs(tmp_path)
    await fs.mknod(ROOT_INO, b"p", stat.S_IFIFO | 0o600, 0, 0, 0)
    with pytest.raises(Exists):  # (O_CREAT|O_EXCL, mkfifo over an existing special file)
        await fs.mknod(ROOT_INO, b"p", stat.S_IFIFO | 0o600, 0, 0, 0)
    with pytest.raises(Exists):
        await fs.mkdir(ROOT_INO, b"p", 0o755, 0, 0)
    with pytest.raises(Invalid):
        await fs.mknod(ROOT_INO, b"q", 0o170000 | 0o600, 0, 0, 0)  # no such type


def test_device_numbers_are_sealed_only_on_devices() -> None:
    """Other objects' attribute bytes are those of before (old volumes, golden vectors);
    a device without its number, or another kind with one, is malformed."""
    fifo = Attrs("p", 0o600, 0, 0, 1, 2, 3)
    assert b"rd" not in fifo.to_json()
    dev = Attrs("c", 0o600, 0, 0, 1, 2, 3, rdev=DEV)
    assert json.loads(dev.to_json())["rd"] == DEV
    assert Attrs.from_json(dev.to_json()) == dev
    plain = json.loads(Attrs("f", 0o644, 0, 0, 1, 2, 3).to_json())
    assert sorted(plain) == ["at", "ct", "g", "gen", "m", "mt", "sz", "t", "u"]
    for bad in ({**plain, "rd": 5}, {**plain, "t": "c"}, {**plain, "t": "b", "rd": -1}):
        with pytest.raises(IntegrityError):
            Attrs.from_json(json.dumps(bad).encode())


async def test_link_counts(tmp_path: Path) -> None:
    store = MemoryStore()
    fs = await make_fs(tmp_path, store)
    d = await fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    assert fs.stat(d).nlink == 2
    for name in (b"a", b"b", b"c"):
        await fs.mkdir(d.ino, name, 0o755, 0, 0)
    await write_file(fs, d.ino, b"file", b"x")
    assert fs.stat(d).nlink == 5  # 2 + three subdirectories (files do not count)
    await fs.rmdir(d.ino, b"b")
    assert fs.stat(d).nlink == 4
    e = await fs.mkdir(ROOT_INO, b"e", 0o755, 0, 0)
    await fs.rename(d.ino, b"a", e.ino, b"a", 0)
    assert (fs.stat(d).nlink, fs.stat(e).nlink) == (3, 3)
    await fs.sync_node(fs.node(ROOT_INO))
    # a remount counts what it lists
    fs2 = await make_fs(tmp_path / "2", store)
    d2 = await fs2.lookup(ROOT_INO, b"d")
    await fs2.readdir(d2.ino)
    assert fs2.stat(d2).nlink == 3
    assert fs2.stat(fs2.root).nlink == 1  # not listed yet: "not counted"
    await fs2.readdir(ROOT_INO)
    assert fs2.stat(fs2.root).nlink == 4  # d and e, and its own two
    # a file's count is 1, and 0 through a handle once it is unlinked
    f = await fs2.lookup(d2.ino, b"file")
    h = await fs2.open(f.ino, os.O_RDONLY)
    assert fs2.stat(f).nlink == 1
    await fs2.unlink(d2.ino, b"file")
    assert fs2.stat(fs2.handle(h.fh).node).nlink == 0
    await fs2.release(h.fh)


async def test_set_group_id_directories_hand_on_their_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cryptfs.fs import entries

    fs = await make_fs(tmp_path)
    d = await fs.mkdir(ROOT_INO, b"shared", 0o2775, 0, 50)
    sub = await fs.mkdir(d.ino, b"sub", 0o755, 1000, 1000)
    node, h = await fs.create(d.ino, b"f", 0o644, 1000, 1000)
    await fs.release(h.fh)
    fifo = await fs.mknod(d.ino, b"p", stat.S_IFIFO | 0o644, 0, 1000, 1000)
    link = await fs.symlink(d.ino, b"l", b"f", 1000, 1000)
    assert [n.attrs.gid for n in (sub, node, fifo, link)] == [50] * 4
    assert sub.attrs.mode & stat.S_ISGID  # a subdirectory takes the bit too
    assert not node.attrs.mode & stat.S_ISGID
    # a file made there by someone not in that group does not run as it: the kernel (Linux
    # >= 6.0) strips the bit before the mode reaches a FUSE file system; before, cryptfs
    monkeypatch.setattr(entries, "_STRIP_SGID", True)
    mine, h = await fs.create(d.ino, b"sgid", 0o2755, 1000, 1000)
    await fs.release(h.fh)
    theirs, h = await fs.create(d.ino, b"sgid2", 0o2755, 1000, 50)
    await fs.release(h.fh)
    no_exec, h = await fs.create(d.ino, b"sgid3", 0o2644, 1000, 1000)  # (a lock mark)
    await fs.release(h.fh)
    assert not mine.attrs.mode & stat.S_ISGID and theirs.attrs.mode & stat.S_ISGID
    assert no_exec.attrs.mode & stat.S_ISGID
    assert mine.attrs.gid == theirs.attrs.gid == 50
    plain = await fs.mkdir(ROOT_INO, b"plain", 0o755, 0, 50)
    other = await fs.mkdir(plain.ino, b"x", 0o755, 1000, 1000)
    assert other.attrs.gid == 1000


async def test_entries_change_their_directory_times_and_one_marker_write_keeps_them(
    tmp_path: Path,
) -> None:
    store = MemoryStore()
    fs = await make_fs(tmp_path, store)
    d = await fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    e = await fs.mkdir(ROOT_INO, b"e", 0o755, 0, 0)
    await fs.flush_all()
    old = 1_000_000_000_000_000_000
    for x in (d, e):
        await fs.setattr(x.ino, mtime_ns=old, atime_ns=old)
    await fs.flush_all()

    async def changes(what: object) -> None:
        before = (d.attrs.mtime_ns, d.attrs.ctime_ns)
        await what  # type: ignore[misc]
        assert d.attrs.mtime_ns > before[0] and d.attrs.ctime_ns > before[1], what
        assert d.meta_dirty and d.times_only

    store.calls.clear()
    _, h = await fs.create(d.ino, b"f", 0o644, 0, 0)
    await fs.release(h.fh)
    await changes(fs.mkdir(d.ino, b"sub", 0o755, 0, 0))
    await changes(fs.symlink(d.ino, b"l", b"f", 0, 0))
    await changes(fs.mknod(d.ino, b"p", stat.S_IFIFO | 0o600, 0, 0, 0))
    await changes(fs.unlink(d.ino, b"l"))
    await changes(fs.rmdir(d.ino, b"sub"))
    await changes(fs.rename(d.ino, b"p", d.ino, b"q", 0))
    e_before = e.attrs.mtime_ns
    await changes(fs.rename(d.ino, b"q", e.ino, b"q", 0))
    assert e.attrs.mtime_ns > e_before and e.attrs.atime_ns == old  # (atime: never implied)
    assert d in fs.writeback.due and e in fs.writeback.due
    puts = store.calls.get("put", 0)
    await fs.flush_all()
    # one marker write each, however many entries changed (and the file's upload)
    assert store.calls.get("put", 0) - puts == 3
    fs2 = await make_fs(tmp_path / "2", store)
    d2 = await fs2.lookup(ROOT_INO, b"d")
    assert (d2.attrs.mtime_ns, d2.attrs.ctime_ns) == (d.attrs.mtime_ns, d.attrs.ctime_ns)
    assert d2.attrs.atime_ns == old


async def test_a_due_marker_write_is_not_pushed_back_by_more_changes(tmp_path: Path) -> None:
    fs = await make_fs(tmp_path)
    d = await fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    await fs.flush_all()
    await fs.mknod(d.ino, b"a", stat.S_IFIFO | 0o600, 0, 0, 0)
    due = fs.writeback.due[d]
    await trio.sleep(0.05)
    await fs.mknod(d.ino, b"b", stat.S_IFIFO | 0o600, 0, 0, 0)
    assert fs.writeback.due[d] == due


class RandomEtagStore(MemoryStore):
    """PUT answers an ETag of its own each time, as S3 does under SSE-KMS and SSE-C (the MD5
    of the body otherwise: every marker, an empty body, then has the same ETag, and
    If-Match on markers cannot tell one host's write from another's)."""

    async def put(self, key: str, body: bytes, metadata: object, **kw: object) -> str:
        await super().put(key, body, metadata, **kw)  # type: ignore[arg-type]
        data, md, _ = self.objects[key]
        etag = '"' + os.urandom(16).hex() + '"'
        self.objects[key] = (data, md, etag)
        return etag


@pytest.mark.parametrize("store_type", [MemoryStore, RandomEtagStore])
async def test_two_hosts_changing_one_directory_keep_the_later_times(
    tmp_path: Path, store_type: type[MemoryStore]
) -> None:
    """Both hosts created an entry: the marker keeps the later times whichever host writes
    last (a write that meets the other's marker merges them and writes again), and no
    conflict is counted (nothing of a user's is lost)."""
    for a_last in (True, False):
        store = store_type()
        a = await make_fs(tmp_path / f"a{a_last}", store)
        d = await a.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
        await a.flush_all()
        b = await make_fs(tmp_path / f"b{a_last}", store)
        db = await b.lookup(ROOT_INO, b"d")
        await a.mknod(d.ino, b"from-a", stat.S_IFIFO | 0o600, 0, 0, 0)
        await trio.sleep(0.01)
        await b.mknod(db.ino, b"from-b", stat.S_IFIFO | 0o600, 0, 0, 0)
        later = db.attrs.mtime_ns
        first, last = (b, a) if a_last else (a, b)
        await first.flush_all()
        await last.flush_all()
        if store_type is MemoryStore and a_last:
            # (If-Match cannot see b's marker: a's earlier times stand, as any last write's)
            later = d.attrs.mtime_ns
        assert a.tree.conflicts == b.tree.conflicts == 0
        assert not d.meta_dirty and not db.meta_dirty
        c = await make_fs(tmp_path / f"c{a_last}", store)
        dc = await c.lookup(ROOT_INO, b"d")
        assert dc.attrs.mtime_ns == later, a_last
        assert sorted(n for n, _ in await c.readdir(dc.ino)) == [b"from-a", b"from-b"]


async def test_an_explicit_change_of_a_directory_is_not_a_time_update(tmp_path: Path) -> None:
    fs = await make_fs(tmp_path)
    d = await fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    await fs.flush_all()
    await fs.mknod(d.ino, b"a", stat.S_IFIFO | 0o600, 0, 0, 0)
    assert d.only_times_pending
    await fs.setattr(d.ino, mode=0o700)
    assert d.meta_dirty and not d.only_times_pending
    await fs.mknod(d.ino, b"b", stat.S_IFIFO | 0o600, 0, 0, 0)
    assert not d.only_times_pending  # (still the chmod's: conflicts decide as for a chmod)


@pytest.mark.allow_error_logs
async def test_an_object_at_a_key_of_the_other_kind_is_refused(tmp_path: Path) -> None:
    """Revision 1 binds the path, which a file and a directory of one name share: a file's
    (here a device's) object copied to a directory's marker key must not stand in for the
    directory (found by the review of the special files).  Revision 2 binds the key."""
    from cryptfs.cache.staging import StagingArea
    from cryptfs.errors import IntegrityError as Integrity
    from cryptfs.fs.filesystem import Filesystem
    from cryptfs.volume import Volume
    from tests.fsutil import golden_store

    store, _, src = await golden_store("golden_volume_v1_mk.json")  # (a revision-1 volume)
    vol = await Volume.open(store, src)
    fs = Filesystem(vol, StagingArea(tmp_path, vol.keys.cache, vol.chunk))
    await fs.ensure_root()
    dev = await fs.mknod(ROOT_INO, b"x", stat.S_IFBLK | 0o666, os.makedev(8, 1), 0, 0)
    assert store.objects[fs.paths.object_key(dev)[0]][1]["cfs"] == "1"
    planted = store.objects[fs.paths.object_key(dev)[0]]
    await fs.unlink(ROOT_INO, b"x")
    d = await fs.mkdir(ROOT_INO, b"x", 0o700, 0, 0)
    marker, _ = fs.paths.object_key(d)
    store.objects[marker] = planted
    info = await store.head(marker)
    with pytest.raises(Integrity, match="kind does not match"):
        fs.look.adopt(fs.root, b"x", info, None)


@pytest.mark.allow_error_logs
async def test_a_rotation_does_not_finish_over_kinds_it_does_not_know(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A release that does not know an object's kind (here: FIFOs forgotten, as a later
    release's kinds are to this one) must not finish a rotation over it: the retired key
    would strand it.  The rotation stops; the object stays readable under the current key."""
    from cryptfs.crypto import Secret
    from cryptfs.format import meta
    from cryptfs.format.volume import KeySource
    from cryptfs.keyadmin import rotate
    from cryptfs.volume import Volume

    store = MemoryStore()
    fs = await make_fs(tmp_path, store)
    fifo = await fs.mknod(ROOT_INO, b"fifo", stat.S_IFIFO | 0o600, 0, 0, 0)
    key, _ = fs.paths.object_key(fifo)
    kinds = {k: v for k, v in meta._KIND_BITS.items() if k != meta.KIND_FIFO}
    monkeypatch.setattr(meta, "_KIND_BITS", kinds)
    report = await rotate(
        await Volume.open(store, KeySource(keyfile=Secret(b"k" * 32))),
        to_source=KeySource(keyfile=Secret(b"n" * 32)),
        settle=0,
    )
    assert not report.finished and key in report.failed
    monkeypatch.undo()
    from cryptfs.cache.staging import StagingArea
    from cryptfs.fs.filesystem import Filesystem

    # (mid-rotation: the new key opens the volume, and the retiring one still vouches)
    vol = await Volume.open(store, KeySource(keyfile=Secret(b"n" * 32)))
    fs2 = Filesystem(vol, StagingArea(tmp_path / "2", vol.keys.cache, vol.chunk))
    await fs2.ensure_root()
    assert stat.S_ISFIFO(fs2.stat(await fs2.lookup(ROOT_INO, b"fifo")).mode)


async def test_a_create_here_does_not_undo_a_chmod_made_elsewhere(tmp_path: Path) -> None:
    """Every marker has an empty body, so where S3's ETag is the body's MD5 If-Match cannot
    see another host's marker write: the times a create changed are merged into the marker
    S3 holds (found by the second review: B's chmod and chgrp of d were reverted)."""
    store = MemoryStore()
    a = await make_fs(tmp_path / "a", store)
    d = await a.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    await a.flush_all()
    b = await make_fs(tmp_path / "b", store)
    db = await b.lookup(ROOT_INO, b"d")
    await b.setattr(db.ino, mode=0o700, gid=42)
    await b.flush_all()
    await a.mknod(d.ino, b"fifo", stat.S_IFIFO | 0o600, 0, 0, 0)
    later = d.attrs.mtime_ns
    await a.flush_all()
    c = await make_fs(tmp_path / "c", store)
    dc = await c.lookup(ROOT_INO, b"d")
    assert (dc.attrs.mode, dc.attrs.gid, dc.attrs.mtime_ns) == (0o700, 42, later)
    assert (d.attrs.mode, d.attrs.gid) == (0o700, 42)  # (A took them too)
    assert a.tree.conflicts == 0


async def test_a_busy_directory_gets_one_marker_write_per_delay(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """Entries changing while its marker is written do not make the service write it again
    at once, and again (the second review measured 122 writes in 2.5 s for a 1 s delay)."""
    store = MemoryStore()
    fs = await make_fs(tmp_path, store)
    fs.opt.writeback_delay = 1.0
    d = await fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    await fs.flush_all()
    marker, _ = fs.paths.object_key(d)
    writes = 0
    put = store.put

    async def slow_put(key: str, *args: object, **kw: object) -> str:
        nonlocal writes
        if key == marker:
            writes += 1
            await trio.sleep(0.02)
        return await put(key, *args, **kw)  # type: ignore[arg-type]

    store.put = slow_put  # type: ignore[method-assign]
    async with trio.open_nursery() as n:
        await n.start(fs.serve_writeback)
        for i in range(500):  # 5 s of creates, one each 10 ms
            await fs.mknod(d.ino, b"p%d" % i, stat.S_IFIFO | 0o600, 0, 0, 0)
            await trio.sleep(0.01)
        await trio.sleep(1.5)
        n.cancel_scope.cancel()
    assert 4 <= writes <= 7, writes
    assert not d.meta_dirty


async def test_decrypt_never_writes_through_what_is_at_the_destination(tmp_path: Path) -> None:
    """A symlink, FIFO or device already at a path that decrypt restores is replaced, never
    written or followed (found by the second review)."""
    from cryptfs.offline import decrypt_tree

    fs = await make_fs(tmp_path)
    await write_file(fs, ROOT_INO, b"f", b"secret\n")
    await write_file(fs, ROOT_INO, b"g", b"other\n")
    d = await fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    await fs.mknod(d.ino, b"p", stat.S_IFIFO | 0o600, 0, 0, 0)
    dest = tmp_path / "dest"
    dest.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    os.symlink(victim, dest / "f")
    os.mkfifo(dest / "g")  # (writing through it would hang)
    os.symlink(tmp_path / "elsewhere", dest / "d")  # (a directory through a symlink)
    (tmp_path / "elsewhere").mkdir()
    with trio.fail_after(10):
        await decrypt_tree(fs, fs.root, dest)
    assert victim.read_bytes() == b"untouched" and os.listdir(tmp_path / "elsewhere") == []
    assert (dest / "f").read_bytes() == b"secret\n" and not (dest / "f").is_symlink()
    assert stat.S_ISREG((dest / "g").lstat().st_mode)
    assert stat.S_ISDIR((dest / "d").lstat().st_mode)
    assert stat.S_ISFIFO((dest / "d" / "p").lstat().st_mode)


@pytest.mark.allow_error_logs
async def test_upgrade_does_not_seal_an_object_at_a_key_of_the_other_kind(
    tmp_path: Path,
) -> None:
    """A revision-1 device object copied to a directory's marker key must not become an
    authentic revision-2 object there (the second review: upgrade resealed it)."""
    from cryptfs.cache.staging import StagingArea
    from cryptfs.fs.filesystem import Filesystem
    from cryptfs.upgrade import upgrade
    from cryptfs.volume import Volume
    from tests.fsutil import golden_store

    store, _, src = await golden_store("golden_volume_v1_mk.json")
    vol = await Volume.open(store, src)
    fs = Filesystem(vol, StagingArea(tmp_path, vol.keys.cache, vol.chunk))
    await fs.ensure_root()
    dev = await fs.mknod(ROOT_INO, b"x", stat.S_IFBLK | 0o666, os.makedev(8, 1), 0, 0)
    planted = store.objects[fs.paths.object_key(dev)[0]]
    await fs.unlink(ROOT_INO, b"x")
    d = await fs.mkdir(ROOT_INO, b"x", 0o700, 0, 0)
    marker, _ = fs.paths.object_key(d)
    store.objects[marker] = planted
    report = await upgrade(await Volume.open(store, src), settle=0)
    assert not report.finished
    assert store.objects[marker][1]["cfs"] == "1"  # left as it was, not resealed


async def test_a_chmod_here_during_a_time_write_is_not_replaced(tmp_path: Path) -> None:
    """A chmod that lands while the write of a directory's times waits for its HEAD is an
    explicit change from then on: written as it is, not merged away (the third review)."""
    store = MemoryStore()
    fs = await make_fs(tmp_path, store)
    d = await fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    await fs.flush_all()
    await fs.mknod(d.ino, b"p", stat.S_IFIFO | 0o600, 0, 0, 0)
    marker, _ = fs.paths.object_key(d)
    head = store.head

    async def head_then_chmod(key: str) -> object:
        info = await head(key)
        if key == marker:
            await fs.setattr(d.ino, mode=0o700)
        return info

    store.head = head_then_chmod  # type: ignore[method-assign,assignment]
    await fs.flush_all()
    store.head = head  # type: ignore[method-assign]
    fs2 = await make_fs(tmp_path / "2", store)
    assert (await fs2.lookup(ROOT_INO, b"d")).attrs.mode == 0o700


async def test_decrypt_is_not_led_outside_its_destination_by_a_swapped_directory(
    tmp_path: Path,
) -> None:
    """Someone who can write into the destination swaps a directory being restored for a
    symlink to elsewhere (as root, decrypt would then write and chmod there): every step
    after is relative to the directory decrypt opened, so nothing lands elsewhere (the
    third review)."""
    from cryptfs.offline import decrypt_tree

    fs = await make_fs(tmp_path)
    d = await fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    for name in (b"a", b"b"):
        await write_file(fs, d.ino, name, b"data " + name)
    dest, elsewhere = tmp_path / "dest", tmp_path / "elsewhere"
    dest.mkdir()
    elsewhere.mkdir()
    (elsewhere / "b").write_bytes(b"theirs")
    os.chmod(elsewhere / "b", 0o600)
    read = fs.read
    swapped = False

    async def swap_then_read(fh: int, off: int, size: int) -> bytes:
        nonlocal swapped
        if not swapped:  # (during the first file of d)
            swapped = True
            os.rename(dest / "d", tmp_path / "moved")
            os.symlink(elsewhere, dest / "d")
        return await read(fh, off, size)

    fs.read = swap_then_read  # type: ignore[method-assign]
    await decrypt_tree(fs, fs.root, dest)
    assert swapped
    assert (elsewhere / "b").read_bytes() == b"theirs"
    assert stat.S_IMODE((elsewhere / "b").stat().st_mode) == 0o600
    assert sorted(os.listdir(elsewhere)) == ["b"]
    assert (tmp_path / "moved" / "b").read_bytes() == b"data b"


async def test_decrypt_into_the_current_directory_and_over_a_kept_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``decrypt … .`` restores into the directory itself (the dir_fd rewrite refused it:
    the fourth review); a directory kept from before is root's and 0700 while its entries
    are made, then gets the volume's owner and mode."""
    from cryptfs.offline import decrypt_tree

    fs = await make_fs(tmp_path)
    d = await fs.mkdir(ROOT_INO, b"d", 0o755, 1000, 1000)
    await write_file(fs, d.ino, b"f", b"data")
    out = tmp_path / "out"
    (out / "d").mkdir(parents=True)
    os.chown(out / "d", 4242, 4242)  # (someone else's, from an earlier run)
    modes = []
    read = fs.read

    async def look_then_read(fh: int, off: int, size: int) -> bytes:
        st = (out / "d").stat()
        modes.append((st.st_uid, stat.S_IMODE(st.st_mode)))
        return await read(fh, off, size)

    fs.read = look_then_read  # type: ignore[method-assign]
    monkeypatch.chdir(out)
    files, _ = await decrypt_tree(fs, fs.root, Path("."))
    assert files == 1 and (out / "d" / "f").read_bytes() == b"data"
    if os.geteuid() == 0:
        assert modes and all(m == (0, 0o700) for m in modes)
        st = (out / "d").stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (1000, 0o755)
