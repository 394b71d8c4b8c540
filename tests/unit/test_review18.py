"""Issue 18, from the attacker's and concurrency reviewer's reads of the fix (helper reviews
of 57edf90..539d62f, of 6a494a3 (the fix of the first) and of 2305cf2 (the fix of the
second)): each test failed on the code before its fix.  Memory store, driven
deterministically; no test here needs S3 or a mount."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from cryptfs.crypto import Secret
from cryptfs.errors import CryptfsError, NotEmpty, StoreError
from cryptfs.format.body import HEADER_SIZE
from cryptfs.format.volume import KeySource
from cryptfs.fs.model import ROOT_INO
from cryptfs.store.memory import MemoryStore
from tests.fsutil import read_file, write_file
from tests.unit.test_filesystem import make_fs

KEY = KeySource(keyfile=Secret(b"k" * 32))  # make_fs's volume key


async def _replace(other_store_fs, name: bytes, data: bytes) -> None:  # type: ignore[no-untyped-def]
    """Another host writes ``data`` over ``name``."""
    other = other_store_fs
    theirs = await other.lookup(ROOT_INO, name)
    h = await other.open(theirs.ino, os.O_RDWR)
    await other.write(h.fh, 0, data)
    await other.release(h.fh)
    await other.sync_node(theirs)


@pytest.mark.allow_error_logs
async def test_a_rename_onto_an_open_file_replaced_elsewhere_keeps_the_new_file(
    tmp_path: Path,
) -> None:
    """``echo data > tmp; mv tmp g`` while ``tail -f g`` runs and another host replaced g:
    keeping g's content for its reader lost the If-Match race of *g*, the rename took it for
    a race of its source, and its look again at ``tmp`` (never uploaded: 404) removed it with
    its staged data and journal.  mv said ENOENT and the acknowledged data was gone."""
    store = MemoryStore()
    fs = await make_fs(tmp_path / "a", store, metadata_ttl=3600)
    await write_file(fs, ROOT_INO, b"g", b"old g " * 100)
    g = await fs.lookup(ROOT_INO, b"g")
    reader = await fs.open(g.ino, os.O_RDONLY)
    tmp, h = await fs.create(ROOT_INO, b"tmp", 0o644, 0, 0)
    fs.looked_up(tmp)
    await fs.write(h.fh, 0, b"acknowledged data")
    await fs.release(h.fh)  # close() returned 0: staged and journaled
    await _replace(await make_fs(tmp_path / "b", store), b"g", b"G")

    await fs.rename(ROOT_INO, b"tmp", ROOT_INO, b"g", 0)
    assert not tmp.unlinked and tmp.name == b"g"
    assert await fs.flush_all() == []
    check = await make_fs(tmp_path / "c", store)
    assert [n for n, _ in await check.readdir(ROOT_INO)] == [b"g"]
    assert await read_file(check, (await check.lookup(ROOT_INO, b"g")).ino) == b"acknowledged data"
    got = await fs.read(reader.fh, 0, 10)  # the reader keeps a whole version of the old g
    assert got in (b"old g old ", b"Gld g old ")
    await fs.release(reader.fh)


@pytest.mark.allow_error_logs
async def test_looking_again_never_drops_a_file_changed_here(tmp_path: Path) -> None:
    """A file written here and not uploaded yet, whose object another host removed: looking
    at S3 again (after a lost If-Match) removed the node, its staged data and its journal;
    its upload decides instead (a new object: nothing of theirs to keep)."""
    store = MemoryStore()
    fs = await make_fs(tmp_path / "a", store, metadata_ttl=3600)
    await write_file(fs, ROOT_INO, b"f", b"version 1")
    node = await fs.lookup(ROOT_INO, b"f")
    h = await fs.open(node.ino, os.O_RDWR)
    await fs.write(h.fh, 0, b"VERSION 2")
    await fs.release(h.fh)
    other = await make_fs(tmp_path / "b", store)
    await other.unlink(ROOT_INO, b"f")
    await fs.look.look_again(node)
    assert not node.unlinked and node.stage is not None and fs.staging.journals()
    assert await fs.flush_all() == []
    check = await make_fs(tmp_path / "c", store)
    names = [n for n, _ in await check.readdir(ROOT_INO)]
    assert len(names) == 1
    assert await read_file(check, (await check.lookup(ROOT_INO, names[0])).ino) == b"VERSION 2"


@pytest.mark.allow_error_logs
async def test_a_rename_that_landed_is_not_reported_failed(tmp_path: Path) -> None:
    """A reader opens the target while the rename's copy is in flight: copy and delete
    land, keeping the target's old content for that reader then fails (its version is gone)
    and the rename answered ENOENT although S3 had the new name.  Now the rename succeeds;
    that reader gets EIO, not bytes of another version, and no integrity failure is told."""
    store = MemoryStore()
    fs = await make_fs(tmp_path / "a", store, metadata_ttl=3600)
    await write_file(fs, ROOT_INO, b"f", b"new content")
    await write_file(fs, ROOT_INO, b"g", b"old content")
    g = await fs.lookup(ROOT_INO, b"g")
    real = store.copy
    held: list[int] = []

    async def copy(*a, **kw):  # type: ignore[no-untyped-def]
        etag = await real(*a, **kw)
        if not held:
            held.append((await fs.open(g.ino, os.O_RDONLY)).fh)  # cat g, meanwhile
        return etag

    store.copy = copy  # type: ignore[method-assign]
    await fs.rename(ROOT_INO, b"f", ROOT_INO, b"g", 0)
    store.copy = real  # type: ignore[method-assign]
    fs.cache.clear()
    with pytest.raises(StoreError):
        await fs.read(held[0], 0, 100)
    assert fs.integrity_failures == 0
    check = await make_fs(tmp_path / "c", store)
    assert [n for n, _ in await check.readdir(ROOT_INO)] == [b"g"]
    assert await read_file(check, (await check.lookup(ROOT_INO, b"g")).ino) == b"new content"


@pytest.mark.allow_error_logs
async def test_a_folder_placeholder_never_hides_a_file(tmp_path: Path) -> None:
    """Attack: one empty object ``<file key>/`` (a console's folder placeholder), written
    with bucket access only, made readdir show the file as a directory (without a marker,
    unauthenticated), no integrity failure told; lookup disagreed.  The authenticated file
    is shown now: a lone placeholder is no object (no directory at all), and a prefix of
    objects with a file's name and no marker is an integrity failure."""
    store = MemoryStore()
    fs = await make_fs(tmp_path / "a", store)
    await write_file(fs, ROOT_INO, b"secret", b"precious data")
    fkey, _ = fs.object_key(await fs.lookup(ROOT_INO, b"secret"))
    for planted, told in ((fkey + "/", False), (fkey + "/anything", True)):
        await store.put(planted, b"", {})
        fresh = await make_fs(tmp_path / f"b{len(planted)}", store)
        node = dict(await fresh.readdir(ROOT_INO))[b"secret"]
        assert not node.is_dir
        assert await read_file(fresh, node.ino) == b"precious data"
        assert (fresh.integrity_failures > 0) == told  # (told at each listing)
        other = await make_fs(tmp_path / f"c{int(told)}", store, metadata_ttl=3600)
        assert not (await other.lookup(ROOT_INO, b"secret")).is_dir  # lookup agrees
        await store.delete(planted)


@pytest.mark.allow_error_logs
async def test_fsck_repair_never_turns_a_placeholder_into_a_directory(tmp_path: Path) -> None:
    """``fsck --repair`` wrote an authenticated marker for the attacker's placeholder: the
    file behind it was an orphan for good.  It reports the name as both, repairs nothing."""
    from cryptfs.fsck import fsck
    from cryptfs.volume import Volume

    store = MemoryStore()
    fs = await make_fs(tmp_path / "a", store)
    await write_file(fs, ROOT_INO, b"secret", b"precious data")
    fkey, _ = fs.object_key(await fs.lookup(ROOT_INO, b"secret"))
    await store.put(fkey + "/", b"", {})
    vol = await Volume.open(store, KEY)
    rep = await fsck(vol, key_prefix="", repair=True)
    assert fkey + "/.cryptfs.dir" not in store.objects
    assert rep.files == 1 and rep.problems() and not rep.repaired
    for i in range(5):
        fresh = await make_fs(tmp_path / f"m{i}", store)
        assert not dict(await fresh.readdir(ROOT_INO))[b"secret"].is_dir


async def _read_while_another_version_arrives(tmp_path: Path, parks, segment_log2=14):  # type: ignore[no-untyped-def]
    """A reader of version 1 (its chunks not cached, its header not known) whose first GET
    that ``parks(start, end)`` is held until another host has written version 2 and this
    mount has adopted it (a listing); returns the mount and what the read gave."""
    store = MemoryStore()
    fs = await make_fs(tmp_path / "a", store, metadata_ttl=0, segment_log2=segment_log2)
    await write_file(fs, ROOT_INO, b"f", b"version 1 " * 2000)
    node = await fs.lookup(ROOT_INO, b"f")
    fs.cache.clear()
    node.cipher = None  # (as after a remount: the header comes with a GET)
    other = await make_fs(tmp_path / "b", store)
    real = store.get
    gate, parked = trio.Event(), trio.Event()

    async def get(key, start=None, end=None, if_match=None):  # type: ignore[no-untyped-def]
        got = await real(key, start, end, if_match=if_match)
        if not parked.is_set() and parks(start, end):
            parked.set()
            await gate.wait()
        return got

    store.get = get  # type: ignore[method-assign]
    h = await fs.open(node.ino, os.O_RDONLY)
    result: list[object] = []

    async def reader() -> None:
        try:
            result.append(await fs.read(h.fh, 3 * 4096, 10))
        except CryptfsError as e:
            result.append(e)

    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            n.start_soon(reader)
            await parked.wait()
            await _replace(other, b"f", b"VERSION 2 ")
            await fs.readdir(ROOT_INO)  # adopts version 2
            gate.set()
    store.get = real  # type: ignore[method-assign]
    return fs, result


@pytest.mark.allow_error_logs
async def test_a_version_adopted_during_a_read_is_no_integrity_failure(tmp_path: Path) -> None:
    """A GET of version 1 (If-Match) in flight when a listing adopts version 2: the bytes of
    version 1 were opened with version 2's header and key, an integrity failure was logged
    and the read got EIO, for a race in which nothing was tampered with.  The read now goes
    again, from the version the node holds."""
    fs, result = await _read_while_another_version_arrives(tmp_path, lambda start, end: True)
    assert fs.integrity_failures == 0, fs.integrity_log
    assert result == [(b"VERSION 2 " + b"version 1 " * 2000)[3 * 4096 : 3 * 4096 + 10]]


@pytest.mark.allow_error_logs
async def test_a_placeholder_inside_its_own_directory_is_not_an_entry(tmp_path: Path) -> None:
    """The ``<dir>/`` placeholder (S3 console "Create folder", SeaweedFS) in the directory's
    own listing was an entry of an empty name: an integrity failure at every listing, and
    rmdir answered ENOTEMPTY for ever."""
    store = MemoryStore()
    fs = await make_fs(tmp_path / "a", store)
    d = await fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    await store.put(fs.dir_prefix(d), b"", {})
    assert await fs.readdir(d.ino) == []
    assert fs.integrity_failures == 0
    await fs.rmdir(ROOT_INO, b"d")
    fresh = await make_fs(tmp_path / "b", store)
    assert await fresh.readdir(ROOT_INO) == []


@pytest.mark.allow_error_logs
async def test_plaintext_names_that_are_no_entry_names_are_not_listed(tmp_path: Path) -> None:
    """A volume of plaintext names: keys ``//x`` and ``../x`` gave readdir entries ``b""``
    and ``b".."`` (the kernel refuses a listing with an empty name: EIO for all of it)."""
    from cryptfs.cache.staging import StagingArea
    from cryptfs.fs.filesystem import Filesystem
    from cryptfs.fs.model import Options
    from cryptfs.volume import Volume

    store = MemoryStore()
    vol = await Volume.create(store, KEY, chunk_log2=12, encrypt_names=False)
    fs = Filesystem(vol, StagingArea(tmp_path / "s", vol.keys.cache, vol.chunk), Options())
    await fs.ensure_root()
    await write_file(fs, ROOT_INO, b"ok", b"fine")
    for key in ("//x", "../x", "./x"):
        await store.put(key, b"junk", {})
    assert [n for n, _ in await fs.readdir(ROOT_INO)] == [b"ok"]


@pytest.mark.allow_error_logs
async def test_a_pending_chmod_does_not_stop_writes_to_a_file_replaced_elsewhere(
    tmp_path: Path,
) -> None:
    """``chmod 600 f; echo x >> f`` on a file another host replaced: the pending chmod made
    the node dirty, looking again kept this mount's version, and every write failed with EIO
    (the copy before it used the replaced version's If-Match) while the file was open.  The
    change of attributes loses to their version (as when it is written), the write goes on."""
    from tests.unit.test_races import _replaced_elsewhere

    store, fs = await _replaced_elsewhere(tmp_path)
    node = await fs.lookup(ROOT_INO, b"f")
    await fs.setattr(node.ino, mode=0o600)
    h = await fs.open(node.ino, os.O_WRONLY | os.O_APPEND)
    await fs.write(h.fh, 10_000, b"appended\n")
    await fs.release(h.fh)
    assert await fs.flush_all() == [] and fs.conflicts == 1
    check = await make_fs(tmp_path / "c", store)
    f = await check.lookup(ROOT_INO, b"f")
    assert await read_file(check, f.ino) == b"version 2\nappended\n"
    assert f.attrs.mode & 0o777 != 0o600


# ---------------------------------------------------------------- the second review (of 6a494a3)
@pytest.mark.allow_error_logs
async def test_a_target_replaced_while_read_never_takes_its_name_back(
    tmp_path: Path,
) -> None:
    """displace()'s early return keeps dst.remote_etag; a later getattr (fstat by the
    reader, after the TTL) revalidates the detached node by HEAD of *its name's* key, which
    is now the renamed file's object: adopt makes a second node and puts it into
    parent.children in place of the node the rename moved there."""
    store = MemoryStore()
    fs = await make_fs(tmp_path / "a", store, metadata_ttl=3600)
    await write_file(fs, ROOT_INO, b"f", b"new content")
    await write_file(fs, ROOT_INO, b"g", b"old content")
    f = await fs.lookup(ROOT_INO, b"f")
    g = await fs.lookup(ROOT_INO, b"g")
    real = store.copy
    held: list[int] = []

    async def copy(*a, **kw):  # type: ignore[no-untyped-def]
        etag = await real(*a, **kw)
        if not held:
            held.append((await fs.open(g.ino, os.O_RDONLY)).fh)  # cat g, meanwhile
        return etag

    store.copy = copy  # type: ignore[method-assign]
    await fs.rename(ROOT_INO, b"f", ROOT_INO, b"g", 0)
    store.copy = real  # type: ignore[method-assign]
    assert fs.tree.root.children[b"g"] is f
    g.refreshed_at = -1e18  # (the metadata TTL has passed)
    fs.tree.root.listed_at = -1.0  # (the root's listing incomplete: an entry was evicted)
    try:  # an fstat of the reader's fd (ENOENT or EIO would be fine)
        st = await fs.getattr(g.ino)
        assert st.size >= 0
    except CryptfsError:
        pass
    # ... but the name must still be the renamed node's
    now = fs.tree.root.children[b"g"]
    assert now is f, (
        f"a second node (ino {now.ino}, f is {f.ino}) took the rename's name; "
        f"looked up: {(await fs.lookup(ROOT_INO, b'g')).ino}"
    )
    await fs.release(held[0])


@pytest.mark.allow_error_logs
async def test_a_marker_beside_a_known_file_hides_neither(tmp_path: Path) -> None:
    """Two hosts: A creates file x (uploaded at close), B mkdir x before it saw A's file
    (or an attacker replays an old marker of a directory x).  A's next listing: the marker's
    load adopts it with existing=the known file node, and adopt gone_elsewhere()s the file
    (kernel told it is gone, an open writer's later writes dropped at close) before
    merge_dirs() decides 'the file wins'; the listing then shows neither."""
    store = MemoryStore()
    a = await make_fs(tmp_path / "a", store, metadata_ttl=0)
    b = await make_fs(tmp_path / "b", store, metadata_ttl=0)
    xb = await b.mkdir(ROOT_INO, b"x", 0o755, 0, 0)  # B's directory
    marker_key = b.object_key(xb)[0]
    saved = store.objects[marker_key]
    await b.rmdir(ROOT_INO, b"x")
    await write_file(a, ROOT_INO, b"x", b"A's file")
    assert [n for n, _ in await a.readdir(ROOT_INO)] == [b"x"]
    x = await a.lookup(ROOT_INO, b"x")
    w = await a.open(x.ino, os.O_RDWR)  # a writer holds it open, nothing written yet
    store.objects[marker_key] = saved  # (B's mkdir racing A's create, or a replay)
    listed = dict(await a.readdir(ROOT_INO))
    assert b"x" in listed and not listed[b"x"].is_dir, listed  # the file wins ...
    assert not x.unlinked, "the authenticated file node was detached"  # ... and stays
    await a.write(w.fh, 0, b"A's new data")
    await a.release(w.fh)
    assert await a.flush_all() == []
    check = await make_fs(tmp_path / "c", store)
    got = dict(await check.readdir(ROOT_INO))[b"x"]
    assert await read_file(check, got.ino) == b"A's new data"


@pytest.mark.allow_error_logs
async def test_a_directory_with_its_own_placeholder_can_be_renamed(tmp_path: Path) -> None:
    """I11: 'a directory's own placeholder is no entry of it'.  rename_dir lists the prefix
    without a delimiter and plans every key: the placeholder ``X/`` (and ``X/sub/``) is
    decoded as an entry name "" and the rename fails (EIO) before anything moves."""
    store = MemoryStore()
    fs = await make_fs(tmp_path / "a", store)
    d = await fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    await write_file(fs, d.ino, b"f", b"inside")
    await store.put(fs.dir_prefix(d), b"", {})  # console "Create folder" / SeaweedFS
    await fs.rename(ROOT_INO, b"d", ROOT_INO, b"e", 0)
    check = await make_fs(tmp_path / "c", store)
    e = await check.lookup(ROOT_INO, b"e")
    assert await read_file(check, (await check.lookup(e.ino, b"f")).ino) == b"inside"


@pytest.mark.allow_error_logs
async def test_a_subfolder_placeholder_is_no_entry_for_rmdir_either(tmp_path: Path) -> None:
    """``X/sub/`` (an empty object): readdir of X shows nothing (implicit_dir ignores
    placeholders now), but check_empty counts it: rmdir is ENOTEMPTY for an empty listing."""
    store = MemoryStore()
    fs = await make_fs(tmp_path / "a", store)
    d = await fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    sub = await fs.mkdir(d.ino, b"sub", 0o755, 0, 0)
    placeholder = fs.dir_prefix(sub)
    await fs.rmdir(d.ino, b"sub")
    await store.put(placeholder, b"", {})  # (console "Create folder", or a bucket writer)
    assert await fs.readdir(d.ino) == []
    assert fs.integrity_failures == 0
    await fs.rmdir(ROOT_INO, b"d")


async def test_a_second_chmod_during_an_attribute_upload_is_not_lost(
    tmp_path: Path,
) -> None:
    """attrs_only_lost cannot tell this mount's own in-flight copy-in-place from another
    writer's version.  When the copy changes the ETag (S3 CopyObject of a multipart object
    or an SSE-KMS one; SeaweedFS), a listing that HEADs it while the copy's answer is in
    flight drops the pending *second* chmod: node.attrs are reset to the first, meta_dirty
    cleared, nothing uploads it; a conflict is counted though no other writer exists."""
    store = MemoryStore()
    fs = await make_fs(tmp_path / "a", store, metadata_ttl=0)
    await write_file(fs, ROOT_INO, b"f", b"data")
    node = await fs.lookup(ROOT_INO, b"f")
    await fs.readdir(ROOT_INO)
    real = store.copy
    gate, parked = trio.Event(), trio.Event()

    async def copy(src, dst, metadata, *, if_match=None, size=None):  # type: ignore[no-untyped-def]
        await real(src, dst, metadata, if_match=if_match, size=size)
        data, md, _ = store.objects[dst]
        store.objects[dst] = (data, md, '"new-etag-of-the-copy"')  # as a multipart source
        if not parked.is_set():
            parked.set()
            await gate.wait()
        return '"new-etag-of-the-copy"'

    store.copy = copy  # type: ignore[method-assign]
    await fs.setattr(node.ino, mode=0o600)
    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            n.start_soon(fs.sync_node, node)
            await parked.wait()
            await fs.setattr(node.ino, mode=0o640)  # chmod again, meanwhile
            await fs.readdir(ROOT_INO)  # any ls meanwhile
            gate.set()
    store.copy = real  # type: ignore[method-assign]
    assert await fs.flush_all() == []
    assert node.attrs.mode & 0o777 == 0o640
    assert fs.conflicts == 0
    check = await make_fs(tmp_path / "c", store)
    assert (await check.lookup(ROOT_INO, b"f")).attrs.mode & 0o777 == 0o640


@pytest.mark.allow_error_logs
async def test_a_version_adopted_during_the_header_get_is_no_integrity_failure(
    tmp_path: Path,
) -> None:
    """Finding 4's fix checks node.remote_etag after the body's GET only; Fetcher.cipher()
    does a GET of its own (the header, for a first read past chunk 0) and then opens it with
    the data key the node holds *then*: a version adopted during that GET still reads as an
    integrity failure.  (A revision-1 body: a small revision-3 one's trailer comes with its
    whole GET, the case above.)"""
    fs, _result = await _read_while_another_version_arrives(
        tmp_path, lambda start, end: start == 0 and end == HEADER_SIZE, segment_log2=None
    )
    assert fs.integrity_failures == 0, fs.integrity_log


@pytest.mark.allow_error_logs
async def test_a_rename_onto_an_open_target_removed_elsewhere_succeeds(
    tmp_path: Path,
) -> None:
    """``tail -f g`` here, another host ``rm g``, then ``mv tmp g`` here: keeping g's
    content fails (NotFound), _Raced(g), look_again(g) sees no object but g is open so it
    stays, and the loop meets the same NotFound ten times: EIO ("the target of a rename
    kept changing") for as long as the reader keeps g open within the metadata TTL."""
    store = MemoryStore()
    fs = await make_fs(tmp_path / "a", store, metadata_ttl=3600)
    await write_file(fs, ROOT_INO, b"g", b"old g")
    await write_file(fs, ROOT_INO, b"tmp", b"new g")
    g = await fs.lookup(ROOT_INO, b"g")
    await fs.lookup(ROOT_INO, b"tmp")
    reader = await fs.open(g.ino, os.O_RDONLY)
    other = await make_fs(tmp_path / "b", store)
    await other.unlink(ROOT_INO, b"g")
    await fs.rename(ROOT_INO, b"tmp", ROOT_INO, b"g", 0)
    check = await make_fs(tmp_path / "c", store)
    assert await read_file(check, (await check.lookup(ROOT_INO, b"g")).ino) == b"new g"
    await fs.release(reader.fh)


@pytest.mark.allow_error_logs
async def test_a_rename_of_a_chmodded_file_removed_elsewhere_is_enoent(
    tmp_path: Path,
) -> None:
    """``chmod 600 f`` here (pending), another host ``rm f``, ``mv f g`` here: the copy
    404s, _Raced(f), look_again(f) no longer removes a dirty node (revalidate: 'its upload
    decides'), so the rename retries the same copy ten times and says EIO, where ENOENT
    (as before, and as for a clean file) is the answer: the chmod alone is lost anyway
    (Uploader.attrs_lost)."""
    from cryptfs.errors import NoEntry

    store = MemoryStore()
    fs = await make_fs(tmp_path / "a", store, metadata_ttl=3600)
    await write_file(fs, ROOT_INO, b"f", b"data")
    node = await fs.lookup(ROOT_INO, b"f")
    await fs.setattr(node.ino, mode=0o600)
    other = await make_fs(tmp_path / "b", store)
    await other.unlink(ROOT_INO, b"f")
    n0 = store.objects.copy()
    with pytest.raises(NoEntry):
        await fs.rename(ROOT_INO, b"f", ROOT_INO, b"g", 0)
    assert store.objects.keys() == n0.keys()


@pytest.mark.allow_error_logs
async def test_folder_placeholders_do_not_hide_an_implicit_directory(tmp_path: Path) -> None:
    """Remote.implicit_dir looks at 8 keys and ignores those ending in '/': 8 folder
    placeholders sorted before the first object hide a marker-less directory that holds
    files (a directory whose marker was lost, or another tool's, with empty folders)."""
    store = MemoryStore()
    fs = await make_fs(tmp_path / "a", store)
    d = await fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    await write_file(fs, d.ino, b"f", b"kept")
    prefix = fs.dir_prefix(d)
    del store.objects[fs.object_key(d)[0]]  # (its marker gone: implicit from now on)
    for i in range(8):
        await store.put(prefix + "-" * 5 + str(i) + "/", b"", {})  # (sorts before any name)
    fresh = await make_fs(tmp_path / "b", store)
    assert [n for n, _ in await fresh.readdir(ROOT_INO)] == [b"d"]


# ---------------------------------------------------------------- the third review (of 2305cf2)
@pytest.mark.allow_error_logs
async def test_a_marker_never_hides_a_file_not_uploaded_yet(tmp_path: Path) -> None:
    """A creates x and is still writing it (staged, not uploaded); B mkdir x (it cannot see
    A's file), or a bucket writer replays an old marker of a directory x.  A's ls showed the
    directory, and dropped the file from the listing without a word."""
    store = MemoryStore()
    a = await make_fs(tmp_path / "a", store, metadata_ttl=0)
    b = await make_fs(tmp_path / "b", store, metadata_ttl=0)
    x, h = await a.create(ROOT_INO, b"x", 0o644, 0, 0)
    a.looked_up(x)
    await a.write(h.fh, 0, b"A's acknowledged data")
    await b.mkdir(ROOT_INO, b"x", 0o755, 0, 0)
    listed = dict(await a.readdir(ROOT_INO))
    # the file A is writing is shown (it was, before 2305cf2: adopt kept a dirty existing)
    assert listed[b"x"] is x, (listed[b"x"].ino, listed[b"x"].is_dir, x.ino, x.unlinked)


@pytest.mark.allow_error_logs
async def test_a_page_of_placeholders_never_lets_rmdir_remove_a_directory(
    tmp_path: Path,
) -> None:
    """Folder placeholders are no entries; one LIST page of nothing else (a bucket writer
    needs no key to PUT a thousand) made a non-empty directory look empty to rmdir."""
    store = MemoryStore()
    fs = await make_fs(tmp_path / "a", store)
    d = await fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    await write_file(fs, d.ino, b"f", b"kept")
    prefix = fs.dir_prefix(d)
    for i in range(1000):  # a bucket writer: 1000 empty PUTs, no key needed
        await store.put(prefix + f"-----{i:04d}/", b"", {})
    fresh = await make_fs(tmp_path / "b", store)  # d never listed there
    with pytest.raises(NotEmpty):
        await fresh.rmdir(ROOT_INO, b"d")


@pytest.mark.allow_error_logs
async def test_a_page_of_placeholders_does_not_hide_an_implicit_directory(tmp_path: Path) -> None:
    store = MemoryStore()
    fs = await make_fs(tmp_path / "a", store)
    d = await fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    await write_file(fs, d.ino, b"f", b"kept")
    prefix = fs.dir_prefix(d)
    del store.objects[fs.object_key(d)[0]]
    for i in range(1000):
        await store.put(prefix + f"-----{i:04d}/", b"", {})
    fresh = await make_fs(tmp_path / "b", store)
    assert [n for n, _ in await fresh.readdir(ROOT_INO)] == [b"d"]


@pytest.mark.allow_error_logs
async def test_fstat_of_an_open_file_removed_elsewhere_answers(tmp_path: Path) -> None:
    """tail -f g here; another host rm g; a rename here over g (content not kept: 404):
    the reader's fstat after the TTL."""
    store = MemoryStore()
    fs = await make_fs(tmp_path / "a", store, metadata_ttl=3600)
    await write_file(fs, ROOT_INO, b"g", b"old g")
    await write_file(fs, ROOT_INO, b"tmp", b"new g")
    g = await fs.lookup(ROOT_INO, b"g")
    await fs.lookup(ROOT_INO, b"tmp")
    reader = await fs.open(g.ino, os.O_RDONLY)
    other = await make_fs(tmp_path / "b", store)
    await other.unlink(ROOT_INO, b"g")
    await fs.rename(ROOT_INO, b"tmp", ROOT_INO, b"g", 0)
    g.refreshed_at = -1e18
    st = await fs.getattr(g.ino)  # (was ENOENT)
    assert st.ino == g.ino
    await fs.release(reader.fh)


@pytest.mark.allow_error_logs
async def test_mv_after_a_directory_was_made_of_its_name_moves_the_file(tmp_path: Path) -> None:
    store = MemoryStore()
    a = await make_fs(tmp_path / "a", store, metadata_ttl=0)
    b = await make_fs(tmp_path / "b", store, metadata_ttl=0)
    x, h = await a.create(ROOT_INO, b"x", 0o644, 0, 0)
    a.looked_up(x)
    await a.write(h.fh, 0, b"A's acknowledged data")
    await b.mkdir(ROOT_INO, b"x", 0o755, 0, 0)
    await a.readdir(ROOT_INO)
    got = await a.lookup(ROOT_INO, b"x")
    assert got is x  # the file being written, not the directory made of its name elsewhere
    await a.release(h.fh)
    await a.rename(ROOT_INO, b"x", ROOT_INO, b"y", 0)  # the writer's "mv x y"
    assert await a.flush_all() == []
    check = await make_fs(tmp_path / "c", store)
    listed = {n: c.is_dir for n, c in await check.readdir(ROOT_INO)}
    # before 2305cf2: {x: dir (B's), y: file (A's)}; now A's mv moved B's directory
    assert listed == {b"x": True, b"y": False}, listed


@pytest.mark.allow_error_logs
async def test_a_rename_of_an_open_source_removed_elsewhere_is_enoent(tmp_path: Path) -> None:
    """less f here (open, clean); another host rm f; mv f g here: ENOENT expected."""
    from cryptfs.errors import NoEntry

    store = MemoryStore()
    fs = await make_fs(tmp_path / "a", store, metadata_ttl=3600)
    await write_file(fs, ROOT_INO, b"f", b"data")
    f = await fs.lookup(ROOT_INO, b"f")
    reader = await fs.open(f.ino, os.O_RDONLY)
    other = await make_fs(tmp_path / "b", store)
    await other.unlink(ROOT_INO, b"f")
    with pytest.raises(NoEntry):
        await fs.rename(ROOT_INO, b"f", ROOT_INO, b"g", 0)
    await fs.release(reader.fh)


@pytest.mark.allow_error_logs
async def test_a_prefix_without_a_marker_never_hides_a_file_not_uploaded_yet(
    tmp_path: Path,
) -> None:
    """The same as a marker, for a marker-less prefix a bucket writer makes at the name of a
    file this mount is writing (``<file key>/x``, one empty object): the listing showed the
    directory and the file, staged, left its directory's entries without a word."""
    store = MemoryStore()
    a = await make_fs(tmp_path / "a", store, metadata_ttl=0)
    x, h = await a.create(ROOT_INO, b"x", 0o644, 0, 0)
    a.looked_up(x)
    await a.write(h.fh, 0, b"A's acknowledged data")
    fkey, _ = a.object_key(x)
    await store.put(fkey + "/x", b"", {})
    listed = dict(await a.readdir(ROOT_INO))
    assert listed[b"x"] is x
    await a.release(h.fh)
    assert await a.flush_all() == []
    check = await make_fs(tmp_path / "c", store)
    got = dict(await check.readdir(ROOT_INO))[b"x"]
    assert not got.is_dir and await read_file(check, got.ino) == b"A's acknowledged data"


async def test_a_read_that_waits_for_read_ahead_never_mixes_two_versions(tmp_path: Path) -> None:
    """A read found chunk 0 in memory (version 1) and waited for read-ahead of chunks 1-2;
    meanwhile a listing adopted version 2 and the read-ahead gave up, so the read fetched
    chunks 1-2 of version 2 and returned version 1's chunk 0 beside them: one read, two
    versions (found by the review of revision-3 bodies).  Such a read goes again, whole."""
    store = MemoryStore()
    fs = await make_fs(tmp_path / "a", store, metadata_ttl=0)
    await write_file(fs, ROOT_INO, b"f", b"1" * 3 * 4096)
    node = await fs.lookup(ROOT_INO, b"f")
    fs.cache.clear()
    h = await fs.open(node.ino, os.O_RDONLY)
    assert await fs.read(h.fh, 0, 100) == b"1" * 100  # (chunk 0 of version 1 in memory)
    other = await make_fs(tmp_path / "b", store)
    ev = trio.Event()
    for k in (1, 2):
        node.inflight[k] = ev  # (read-ahead of chunks 1-2 in flight)
    got: list[bytes] = []

    async def reader() -> None:
        got.append(await fs.read(h.fh, 0, 3 * 4096))

    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            n.start_soon(reader)
            await trio.sleep(0.05)
            await _replace(other, b"f", b"2" * 3 * 4096)
            await fs.readdir(ROOT_INO)  # adopts version 2
            for k in (1, 2):
                del node.inflight[k]
            ev.set()
    assert got == [b"2" * 3 * 4096], {bytes(set(g)) for g in got}
