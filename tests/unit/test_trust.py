"""Issue 17's claims that are about this process rather than the bucket (docs/SECURITY.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cryptfs.fs.model import ROOT_INO
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


# -- rotation: what the holder of a retired key can still do (review of issue 17) ----------


async def _plant_under(store, payload, cfg, name: bytes, data: bytes, kind: str = "f") -> str:  # type: ignore[no-untyped-def]
    """The holder of ``payload`` (e.g. an old key file) writes a file of its own, sealed and
    wrapped under that payload's current master key, as FORMAT.md says."""
    import os
    import time

    from cryptfs.format.body import BodyCipher
    from cryptfs.format.keys import VolumeKeys
    from cryptfs.format.meta import KIND_FILE, Attrs, MetaCodec, ObjectMeta
    from cryptfs.format.names import NameCodec
    from cryptfs.keys.keyring import Keyring, Target

    keys = VolumeKeys.derive(payload.vmk, cfg.volume_id)
    codec = MetaCodec(keys, payload, cfg)
    ring = Keyring(keys, payload, Target("gcm", payload.cur), None, codec=codec)
    comp, _ = NameCodec(keys.names, cfg.volume_id).encode(b"/", name)
    fid = os.urandom(16)
    dek, wk = await ring.new_dek(fid)
    body = BodyCipher.new(dek, fid, cfg.chunk_log2)
    now = time.time_ns()
    attrs = Attrs(kind or KIND_FILE, 0o644, 0, 0, now, now, now, len(data), body.header.salt)
    await store.put(comp, body.seal_all(data), codec.encode(b"", comp, ObjectMeta(fid, attrs, wk)))
    return comp


async def _rotated_elsewhere(store: MemoryStore):  # type: ignore[no-untyped-def]
    """A rotation from key file k to n, run to completion by another host; returns the
    volume as the old key opened it before (what a thief of that key file holds)."""
    from cryptfs.crypto import Secret
    from cryptfs.format.volume import KeySource
    from cryptfs.keyadmin import rotate
    from cryptfs.volume import Volume

    old = await Volume.open(store, KeySource(keyfile=Secret(b"k" * 32)))
    await rotate(
        await Volume.open(store, KeySource(keyfile=Secret(b"k" * 32))),
        to_source=KeySource(keyfile=Secret(b"n" * 32)),
        settle=0,
    )
    return old


@pytest.mark.allow_error_logs
async def test_what_a_retired_key_plants_during_or_after_a_rotation_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An old key holder plants a file under the retiring master key while a rotation runs,
    and later puts back the config the rotation wrote midway (whose payload still holds the
    old key, and which the new key opens). Neither makes a mount serve the planted file, and
    the rotation neither reseals it nor is held back by it."""
    from cryptfs.cache.staging import StagingArea
    from cryptfs.crypto import Secret
    from cryptfs.errors import IntegrityError, NoEntry, StoreUnavailable
    from cryptfs.format.volume import CONFIG_NAME, KeySource, VolumeConfig
    from cryptfs.fs.filesystem import Filesystem
    from cryptfs.keyadmin import rotate
    from cryptfs.volume import Volume
    from tests.fsutil import read_file, write_file

    old, new = KeySource(keyfile=Secret(b"k" * 32)), KeySource(keyfile=Secret(b"n" * 32))
    store = MemoryStore()
    fs = await make_fs(tmp_path / "a", store)
    await write_file(fs, ROOT_INO, b"real.txt", b"the owner's\n")
    stolen = await Volume.open(store, old)  # what the old key file opens, kept
    # a rotation that stops after its first config writes (an outage on the first copy)
    real_copy = store.copy

    async def down(*a, **kw):  # type: ignore[no-untyped-def]
        raise StoreUnavailable("injected outage")

    store.copy = down  # type: ignore[method-assign]
    first = await rotate(await Volume.open(store, old), to_source=new, settle=0)
    assert not first.finished
    store.copy = real_copy  # type: ignore[method-assign]
    mid = store.objects[CONFIG_NAME][0]
    assert VolumeConfig.from_bytes(mid).retiring is not None
    planted = await _plant_under(store, stolen.payload, stolen.config, b"evil.txt", b"EVIL\n")

    vol = await Volume.open(store, new)  # mid-rotation: the old key is still in the payload
    info = await store.head(planted)
    with pytest.raises(IntegrityError, match="retiring"):
        vol.meta.decode(b"", planted, dict(info.metadata), info.modified)
    held = await rotate(vol, to_source=new, resume=True, settle=0)
    assert not held.finished and held.late == [planted]  # not resealed, and named
    done = await rotate(vol, to_source=new, resume=True, settle=0, discard_late=True)
    assert done.finished and done.late == [planted]
    assert store.objects[planted][1]["cfs-m"] == stolen.payload.cur  # left as it was

    for state in ("seen", "fresh"):  # the mid-rotation config put back
        if state == "fresh":
            monkeypatch.setenv("CRYPTFS_STATE_DIR", str(tmp_path / "fresh"))
        await store.put(CONFIG_NAME, mid, {})
        if state == "seen":
            with pytest.raises(IntegrityError, match="replayed"):
                await Volume.open(store, new)
            continue
        v = await Volume.open(store, new)
        f = Filesystem(v, StagingArea(tmp_path / state, v.keys.cache, v.chunk))
        await f.ensure_root()
        assert await read_file(f, (await f.lookup(ROOT_INO, b"real.txt")).ino) == b"the owner's\n"
        with pytest.raises((IntegrityError, NoEntry)):
            await read_file(f, (await f.lookup(ROOT_INO, b"evil.txt")).ino)


@pytest.mark.allow_error_logs
async def test_a_mount_whose_key_was_retired_follows_no_config_and_writes_nothing(
    tmp_path: Path,
) -> None:
    """A mount left running through a rotation elsewhere: once it has seen a config it cannot
    authenticate, it never follows another (whoever holds its retired key could write one),
    and it writes no metadata, marker or rename under that key."""
    from cryptfs.errors import IntegrityError, ReadOnly
    from cryptfs.format.volume import CONFIG_NAME
    from tests.fsutil import write_file

    store = MemoryStore()
    fs = await make_fs(tmp_path, store)
    await write_file(fs, ROOT_INO, b"f", b"data")
    d = await fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    node = await fs.lookup(ROOT_INO, b"f")
    old = await _rotated_elsewhere(store)
    assert not await fs.vol.reload_config()
    # the old key holder writes the next epoch, MAC'd under the retired master key
    old.config.epoch = 99
    await store.put(CONFIG_NAME, old.config.to_bytes(old.payload), {})
    assert not await fs.vol.reload_config()
    assert fs.vol.keyring.stale is not None and fs.vol.config.epoch < 99
    before = {k: e for k, (_b, _md, e) in store.objects.items()}
    await fs.setattr(node.ino, mode=0o600)
    with pytest.raises(ReadOnly):
        await fs.sync_node(node)  # a metadata copy
    for attempt in (
        fs.rename(ROOT_INO, b"f", ROOT_INO, b"g", 0),
        fs.rename(ROOT_INO, b"d", ROOT_INO, b"e", 0),
        fs.mkdir(d.ino, b"sub", 0o755, 0, 0),
        fs.symlink(ROOT_INO, b"l", b"f", 0, 0),
    ):
        with pytest.raises((ReadOnly, IntegrityError)):
            await attempt
    assert {k: e for k, (_b, _md, e) in store.objects.items()} == before  # nothing written


@pytest.mark.allow_error_logs
async def test_a_config_that_does_not_authenticate_holds_writes_until_restart(
    tmp_path: Path,
) -> None:
    """Any changed config that does not authenticate (junk, or a rotation elsewhere) makes a
    running mount hold its writes until it is restarted, even if the config it knew comes
    back: the holder of a retired key could put that one back to make it write again."""
    from cryptfs.errors import ReadOnly
    from cryptfs.format.volume import CONFIG_NAME
    from tests.fsutil import write_file

    store = MemoryStore()
    fs = await make_fs(tmp_path, store)
    await write_file(fs, ROOT_INO, b"f", b"data")
    known = store.objects[CONFIG_NAME][0]
    await store.put(CONFIG_NAME, known.replace(b'"epoch": 1', b'"epoch": 7'), {})
    assert not await fs.vol.reload_config()
    with pytest.raises(ReadOnly):
        await fs.create(ROOT_INO, b"g", 0o644, 0, 0)
    await store.put(CONFIG_NAME, known, {})
    assert not await fs.vol.reload_config()
    with pytest.raises(ReadOnly):
        await fs.create(ROOT_INO, b"g", 0o644, 0, 0)
    again = await make_fs(tmp_path / "restarted", store)  # a restart follows it again
    await write_file(again, ROOT_INO, b"g", b"written after the restart")


def test_a_revision_1_volume_believes_only_its_own_kms_key() -> None:
    """Revision-1 keyslots are outside the MAC: a KMS slot a bucket writer adds names no key
    that data keys may be under."""
    import os

    from cryptfs.crypto import Secret
    from cryptfs.format.keys import VolumeKeys, WrappedKey
    from cryptfs.format.meta import MetaCodec
    from cryptfs.format.volume import SlotPayload, VolumeConfig

    vmk = Secret(os.urandom(32))
    cfg = VolumeConfig(os.urandom(16), 16, True, version=1)
    cfg.dek = {"scheme": "kms", "kid": "arn:aws:kms:us-east-1:1:key/volume"}
    cfg.keyslots = [{"type": "kms", "id": "kms-x", "key_id": "arn:aws:kms:us-east-1:1:key/x",
                     "blob": "AA"}]  # fmt: skip
    codec = MetaCodec(VolumeKeys.derive(vmk, cfg.volume_id), SlotPayload(vmk), cfg)
    codec.check_wrapping(WrappedKey("kms", cfg.dek["kid"], b"b"))
    with pytest.raises(Exception, match="does not use"):
        codec.check_wrapping(WrappedKey("kms", "arn:aws:kms:us-east-1:1:key/x", b"b"))


def test_two_keyslots_of_one_id_are_refused() -> None:
    import json

    from cryptfs.crypto import Secret
    from cryptfs.errors import IntegrityError
    from cryptfs.format.volume import KeySource, VolumeConfig
    from tests.unit.test_names_meta_volume import new_config

    cfg, _vmk, payload = new_config()
    cfg.add_slot(payload, KeySource(keyfile=Secret(b"k" * 32)))
    d = json.loads(cfg.to_bytes(payload))
    d["keyslots"].append(dict(d["keyslots"][0]))
    with pytest.raises(IntegrityError, match="two keyslots"):
        VolumeConfig.from_bytes(json.dumps(d).encode())


async def test_a_native_file_wins_a_name_clash_with_an_s3ec_object(tmp_path: Path) -> None:
    """With S3EC objects shown, one at the plaintext key equal to a native file's name never
    stands in for that file, in listings or lookups, whichever answer comes first."""
    from cryptfs.cache.staging import StagingArea
    from cryptfs.fs.filesystem import Filesystem
    from cryptfs.fs.model import Options
    from tests.fsutil import read_file, write_file
    from tests.unit.test_foreign_names import WRAPPING, _s3ec_v2

    store = MemoryStore()
    fs = await make_fs(tmp_path / "a", store)
    await write_file(fs, ROOT_INO, b"report.txt", b"the user's real report\n")
    body, md = _s3ec_v2(b"the attacker's report\n")
    await store.put("report.txt", body, md)
    for run in range(4):
        shown = Filesystem(
            fs.vol,
            StagingArea(tmp_path / f"s{run}", fs.vol.keys.cache, fs.vol.chunk),
            Options(show_foreign=True, metadata_ttl=0),
        )
        shown.vol.keyring.s3ec_keys = [WRAPPING]
        await shown.ensure_root()
        listing = dict(await shown.readdir(ROOT_INO))
        node = listing[b"report.txt"]
        assert node.foreign is None
        assert await read_file(shown, node.ino) == b"the user's real report\n"
        looked = await shown.lookup(ROOT_INO, b"report.txt")
        assert await read_file(shown, looked.ino) == b"the user's real report\n"


# -- second review: rotations in progress --------------------------------------------------


async def _rotating(store: MemoryStore, during, discard_late: bool = False):  # type: ignore[no-untyped-def]
    """Rotate from key file k to n, running ``during(old_volume)`` once the rotation's bound
    is set and before its passes (a slow rotation, with users and the old key's holder busy
    meanwhile); returns the report."""
    import cryptfs.keyadmin as ka
    from cryptfs.crypto import Secret
    from cryptfs.format.volume import KeySource
    from cryptfs.volume import Volume

    old = await Volume.open(store, KeySource(keyfile=Secret(b"k" * 32)))  # kept: the thief's
    real = ka._rewrap_all

    async def slow(*a, **kw):  # type: ignore[no-untyped-def]
        for _ in range(5):  # time passes on S3's clock: past the bound
            await store.put("noise", b"", {})
        del store.objects["noise"]
        await during(old)
        return await real(*a, **kw)

    ka._rewrap_all = slow  # type: ignore[assignment]
    try:
        return await ka.rotate(
            await Volume.open(store, KeySource(keyfile=Secret(b"k" * 32))),
            to_source=KeySource(keyfile=Secret(b"n" * 32)),
            settle=0,
            discard_late=discard_late,
        )
    finally:
        ka._rewrap_all = real  # type: ignore[assignment]


async def _new_key_fs(store: MemoryStore, tmp: Path):  # type: ignore[no-untyped-def]
    from cryptfs.cache.staging import StagingArea
    from cryptfs.crypto import Secret
    from cryptfs.format.volume import KeySource
    from cryptfs.fs.filesystem import Filesystem
    from cryptfs.fs.model import Options
    from cryptfs.volume import Volume

    v = await Volume.open(store, KeySource(keyfile=Secret(b"n" * 32)))
    f = Filesystem(v, StagingArea(tmp, v.keys.cache, v.chunk), Options(metadata_ttl=0))
    await f.ensure_root()
    return f


async def test_renames_and_chmods_during_a_rotation_lose_nothing(tmp_path: Path) -> None:
    """A mount with the new key renames and chmods files mid-rotation: server-side copies
    that reseal the metadata under the new key but keep a data key under the retiring one,
    with a fresh Last-Modified. They stay readable, during and after."""
    from tests.fsutil import read_file, write_file

    store = MemoryStore()
    fs = await make_fs(tmp_path / "a", store)
    await write_file(fs, ROOT_INO, b"a.txt", b"file a\n")
    await write_file(fs, ROOT_INO, b"b.txt", b"file b\n")
    d = await fs.mkdir(ROOT_INO, b"dir", 0o755, 0, 0)
    await write_file(fs, d.ino, b"c.txt", b"file c\n")

    async def users(_old) -> None:  # type: ignore[no-untyped-def]
        m = await _new_key_fs(store, tmp_path / "m")
        await m.rename(ROOT_INO, b"a.txt", ROOT_INO, b"a2.txt", 0)
        b = await m.lookup(ROOT_INO, b"b.txt")
        await m.setattr(b.ino, mode=0o600)
        await m.sync_node(b)
        await m.rename(ROOT_INO, b"dir", ROOT_INO, b"dir2", 0)
        again = await _new_key_fs(store, tmp_path / "m2")
        assert await read_file(again, (await again.lookup(ROOT_INO, b"a2.txt")).ino) == b"file a\n"

    report = await _rotating(store, users)
    assert report.finished and not report.unreadable and not report.late, report.summary()
    after = await _new_key_fs(store, tmp_path / "after")
    for parent, name, data in (
        (ROOT_INO, b"a2.txt", b"file a\n"),
        (ROOT_INO, b"b.txt", b"file b\n"),
    ):
        assert await read_file(after, (await after.lookup(parent, name)).ino) == data
    d2 = await after.lookup(ROOT_INO, b"dir2")
    assert await read_file(after, (await after.lookup(d2.ino, b"c.txt")).ino) == b"file c\n"


@pytest.mark.allow_error_logs
async def test_a_late_write_under_a_retiring_key_holds_the_rotation_back(tmp_path: Path) -> None:
    """A mount with the old key that missed the rotation flushes a file after the bound: the
    rotation does not reseal it (it cannot tell it from a plant), names it, and finishes only
    when told to let it go."""
    from tests.fsutil import write_file

    store = MemoryStore()
    fs = await make_fs(tmp_path / "a", store)
    await write_file(fs, ROOT_INO, b"early.txt", b"before\n")

    async def late(old) -> None:  # type: ignore[no-untyped-def]
        await _plant_under(store, old.payload, old.config, b"late.txt", b"flushed late\n")

    report = await _rotating(store, late)
    assert not report.finished and len(report.late) == 1, report.summary()
    assert "written late" in report.summary() and report.late[0] in report.summary()
    from cryptfs.crypto import Secret
    from cryptfs.format.volume import KeySource
    from cryptfs.keyadmin import rotate
    from cryptfs.volume import Volume

    done = await rotate(
        await Volume.open(store, KeySource(keyfile=Secret(b"n" * 32))),
        to_source=KeySource(keyfile=Secret(b"n" * 32)),
        resume=True,
        settle=0,
        discard_late=True,
    )
    assert done.finished and done.late == report.late


async def test_a_multipart_upload_begun_before_the_bound_cannot_be_completed_after(
    tmp_path: Path,
) -> None:
    """On AWS a multipart object's Last-Modified is the start of its upload: the holder of
    the retiring key begins one in time (metadata sealed under the old key), to complete it
    later with any content. The rotation aborts every upload begun before its bound, at its
    start and again before its last pass."""
    from tests.fsutil import write_file

    store = MemoryStore()
    fs = await make_fs(tmp_path / "a", store)
    await write_file(fs, ROOT_INO, b"payroll.csv", b"alice,100\n")
    early = await store.create_multipart("planted-key", {"cfs": "2"})
    seen: list[list[str]] = []

    async def during(_old) -> None:  # type: ignore[no-untyped-def]
        seen.append([u for _k, u, _t in await store.list_uploads("")])

    report = await _rotating(store, during)
    assert report.finished
    assert seen == [[]]  # aborted at the start, before the passes
    assert early not in [u for _k, u, _t in await store.list_uploads("")]


@pytest.mark.allow_error_logs
async def test_a_mount_that_refused_a_config_believes_nothing_written_after_it(
    tmp_path: Path,
) -> None:
    """A mount left running with the old key refuses the rotated config; what the old key's
    holder plants afterwards is not served by it either (its decoder is frozen at that
    config's Last-Modified), while what it read before stays readable."""
    from cryptfs.errors import IntegrityError, NoEntry
    from tests.fsutil import read_file, write_file

    store = MemoryStore()
    fs = await make_fs(tmp_path / "a", store)
    await write_file(fs, ROOT_INO, b"report.txt", b"the owner's\n")
    old = await _rotated_elsewhere(store)
    assert not await fs.vol.reload_config()
    await _plant_under(store, old.payload, old.config, b"planted.txt", b"EVIL\n")
    with pytest.raises((IntegrityError, NoEntry)):
        await read_file(fs, (await fs.lookup(ROOT_INO, b"planted.txt")).ino)


async def test_settle_must_be_a_sane_number(tmp_path: Path) -> None:
    from cryptfs.crypto import Secret
    from cryptfs.errors import UsageError
    from cryptfs.format.volume import KeySource
    from cryptfs.keyadmin import rotate
    from cryptfs.volume import Volume

    store = MemoryStore()
    await make_fs(tmp_path, store)
    vol = await Volume.open(store, KeySource(keyfile=Secret(b"k" * 32)))
    for bad in (-100.0, float("inf"), float("nan")):
        with pytest.raises(UsageError):
            await rotate(vol, to_source=KeySource(keyfile=Secret(b"n" * 32)), settle=bad)


@pytest.mark.allow_error_logs
async def test_an_unknown_kind_planted_under_a_retiring_key_does_not_stop_a_rotation(
    tmp_path: Path,
) -> None:
    """The holder of a retiring key plants an object of a kind this release does not know,
    after the rotation's bound: it is late (named, not resealed), not a rotation-stopper
    (the second review: it sat in ``failed`` for good, so a leaked key could never be
    revoked)."""
    from cryptfs.crypto import Secret
    from cryptfs.errors import StoreUnavailable
    from cryptfs.format.volume import KeySource
    from cryptfs.keyadmin import rotate
    from cryptfs.volume import Volume
    from tests.fsutil import write_file

    old, new = KeySource(keyfile=Secret(b"k" * 32)), KeySource(keyfile=Secret(b"n" * 32))
    store = MemoryStore()
    fs = await make_fs(tmp_path / "a", store)
    await write_file(fs, ROOT_INO, b"real.txt", b"the owner's\n")
    stolen = await Volume.open(store, old)
    real_copy = store.copy

    async def down(*a, **kw):  # type: ignore[no-untyped-def]
        raise StoreUnavailable("injected outage")

    store.copy = down  # type: ignore[method-assign]
    assert not (await rotate(await Volume.open(store, old), to_source=new, settle=0)).finished
    store.copy = real_copy  # type: ignore[method-assign]
    planted = await _plant_under(store, stolen.payload, stolen.config, b"x", b"", kind="z")
    vol = await Volume.open(store, new)
    held = await rotate(vol, to_source=new, resume=True, settle=0)
    assert not held.finished and held.late == [planted] and planted not in held.failed
    done = await rotate(vol, to_source=new, resume=True, settle=0, discard_late=True)
    assert done.finished and done.late == [planted]
