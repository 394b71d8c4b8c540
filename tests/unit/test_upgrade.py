"""``cryptfs upgrade`` moves a revision-1 volume to revision 2 in place (docs/FORMAT.md §7.6):
server-side metadata copies only, resumable, every file still reads back, and afterwards a
revision-1 object (one put back from before the upgrade) is refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cryptfs.cache.staging import StagingArea
from cryptfs.crypto import Secret
from cryptfs.errors import IntegrityError, PreconditionFailed, UsageError
from cryptfs.format.names import b64d
from cryptfs.format.volume import CONFIG_NAME, KeySource, VolumeConfig
from cryptfs.fs.filesystem import Filesystem
from cryptfs.fs.model import ROOT_INO
from cryptfs.keyadmin import rotate
from cryptfs.upgrade import upgrade
from cryptfs.volume import Volume
from tests import reference_decryptor as ref
from tests.fsutil import golden_store, read_file, walk

DATA = Path(__file__).resolve().parents[1] / "data"
GOLDEN = ["golden_volume_v1.json", "golden_volume_v1_mk.json"]


@pytest.fixture(autouse=True)
def _own_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test is a machine of its own: the golden volumes' ids repeat across tests."""
    monkeypatch.setenv("CRYPTFS_STATE_DIR", str(tmp_path / "state"))


async def _read_all(vol: Volume, tmp: Path, golden: dict) -> None:  # type: ignore[type-arg]
    fs = Filesystem(vol, StagingArea(tmp, vol.keys.cache, vol.chunk))
    await fs.ensure_root()
    for path, data in golden["files"].items():
        node = await walk(fs, path)
        assert await read_file(fs, node.ino) == bytes.fromhex(data), path
    assert await fs.readlink((await fs.lookup(ROOT_INO, b"link")).ino) == b"docs/report.pdf"
    assert fs.integrity_failures == 0


@pytest.mark.parametrize(
    "name",
    [*GOLDEN, "golden_volume_v2.json", "golden_volume_v2_special.json",
     "golden_volume_v3_bodies.json", "golden_volume_v3_pinned.json"],
)  # fmt: skip
async def test_every_golden_volume_mounts_and_reads(tmp_path: Path, name: str) -> None:
    """Volumes written by every earlier revision keep mounting and reading as they are; the
    one with revision-3 bodies holds files of several segments."""
    store, golden, src = await golden_store(name)
    vol = await Volume.open(store, src)
    await _read_all(vol, tmp_path, golden)
    if "segments" in name:
        assert vol.segment == 8192
        sizes = [len(bytes.fromhex(d)) for d in golden["files"].values()]
        assert max(sizes) > 4 * vol.segment


async def test_upgrade_of_a_revision_2_volume_turns_on_revision_3_bodies(tmp_path: Path) -> None:
    """A revision-2 volume made before revision-3 bodies: ``upgrade`` writes the config only
    (a segment size); its files keep their bodies and read as they are; a file written
    afterwards gets a revision-3 body, which the reference decryptor reads too."""
    import json

    store, golden, src = await golden_store("golden_volume_v2.json")
    before = {k: (b, dict(md)) for k, (b, md, _e) in store.objects.items() if k != CONFIG_NAME}
    report = await upgrade(await Volume.open(store, src), settle=0)
    assert report.finished and report.segments_enabled and report.upgraded == 0
    assert report.bytes_downloaded == 0
    after = {k: (b, dict(md)) for k, (b, md, _e) in store.objects.items() if k != CONFIG_NAME}
    assert after == before
    vol = await Volume.open(store, src)
    assert vol.segment == 8 << 20
    await _read_all(vol, tmp_path / "a", golden)
    fs = Filesystem(vol, StagingArea(tmp_path / "b", vol.keys.cache, vol.chunk))
    await fs.ensure_root()
    data = bytes(range(256)) * 100
    node = await walk(fs, "/hello.txt")
    h = await fs.open(node.ino, os.O_WRONLY | os.O_APPEND)
    await fs.write(h.fh, node.attrs.size, data)
    await fs.release(h.fh)
    await fs.sync_node(node)
    assert node.attrs.body == 3
    want = bytes.fromhex(golden["files"]["/hello.txt"]) + data
    assert await read_file(fs, node.ino) == want
    tree = ref.decrypt_volume(
        {k: (b, dict(md)) for k, (b, md, _e) in store.objects.items()},
        b64d(golden["key_file"]),
    )
    assert tree[b"/hello.txt"]["data"] == want and tree[b"/hello.txt"]["attrs"]["b"] == 3
    assert json.loads(store.objects[CONFIG_NAME][0])["segment_log2"] == 23
    assert (await upgrade(await Volume.open(store, src), settle=0)).segments_enabled is False


@pytest.mark.parametrize("name", GOLDEN)
async def test_upgrade_golden_volume(tmp_path: Path, name: str) -> None:
    store, golden, src = await golden_store(name)
    before = {k: body for k, (body, _md, _e) in store.objects.items() if k != CONFIG_NAME}
    old_meta = {k: dict(md) for k, (_b, md, _e) in store.objects.items()}
    vol = await Volume.open(store, src)
    with pytest.raises(UsageError, match="upgrade"):
        await rotate(vol, to_source=KeySource(keyfile=Secret(b"n" * 32)), settle=0)
    report = await upgrade(vol, settle=0)
    assert report.finished and not report.failed, report.summary()
    assert report.upgraded == len(before) and report.bytes_downloaded == 0
    # bodies untouched (server-side copies of metadata only), every object at revision 2
    after = {k: body for k, (body, _md, _e) in store.objects.items() if k != CONFIG_NAME}
    assert after == before
    assert {md["cfs"] for k, (_b, md, _e) in store.objects.items() if k != CONFIG_NAME} == {"2"}
    cfg = VolumeConfig.from_bytes(store.objects[CONFIG_NAME][0])
    assert (cfg.version, cfg.objects, cfg.epoch, cfg.segment_log2) == (2, [2, 3], 2, 23)
    assert report.segments_enabled
    await _read_all(await Volume.open(store, src), tmp_path / "a", golden)
    # the reference decryptor, from docs/FORMAT.md alone, reads the upgraded volume
    objects = {k: (body, dict(md)) for k, (body, md, _e) in store.objects.items()}
    tree = ref.decrypt_volume(objects, b64d(golden["key_file"]))
    for path, data in golden["files"].items():
        assert tree[path.encode()]["data"] == bytes.fromhex(data)
    # a rerun has nothing to do
    again = await upgrade(await Volume.open(store, src), settle=0)
    assert again.finished and again.upgraded == 0
    # an object put back as it was before the upgrade is refused from now on
    victim = next(k for k in old_meta if k.endswith(".cryptfs.dir") is False and k != CONFIG_NAME)
    body = store.objects[victim][0]
    await store.put(victim, body, old_meta[victim])
    vol2 = await Volume.open(store, src)
    with pytest.raises(IntegrityError, match="revision-1"):
        vol2.meta.decode(b"", victim, old_meta[victim])
    # ... and a machine that saw revision 2 refuses the revision-1 config put back
    await store.put(CONFIG_NAME, bytes.fromhex(golden["objects"][CONFIG_NAME]["body"]), {})
    with pytest.raises(IntegrityError, match="replayed"):
        await Volume.open(store, src)


@pytest.mark.allow_error_logs
async def test_upgrade_is_resumable(tmp_path: Path) -> None:
    store, golden, src = await golden_store("golden_volume_v1_mk.json")
    real_copy = store.copy
    count = 0

    async def flaky_copy(*a, **kw):  # type: ignore[no-untyped-def]
        nonlocal count
        count += 1
        if count % 3 == 0:
            raise PreconditionFailed("changed meanwhile")  # read again, then done
        if count > 5:
            from cryptfs.errors import StoreUnavailable

            raise StoreUnavailable("injected outage")
        return await real_copy(*a, **kw)

    store.copy = flaky_copy  # type: ignore[method-assign]
    first = await upgrade(await Volume.open(store, src), concurrency=1, settle=0)
    assert not first.finished and first.failed and first.upgraded >= 2
    # half-upgraded: every file still reads (revisions 1 and 2 side by side)
    store.copy = real_copy  # type: ignore[method-assign]
    await _read_all(await Volume.open(store, src), tmp_path / "mid", golden)
    second = await upgrade(await Volume.open(store, src), settle=0)
    assert second.finished and not second.config_upgraded
    assert second.upgraded + first.upgraded == len(golden["objects"]) - 1
    await _read_all(await Volume.open(store, src), tmp_path / "done", golden)


async def test_upgrade_then_rotation_revokes_the_old_key(tmp_path: Path) -> None:
    store, golden, src = await golden_store("golden_volume_v1_mk.json")
    old = await Volume.open(store, src)
    await upgrade(old, settle=0)
    stolen = await Volume.open(store, src)  # the pre-rotation key file, kept by a thief
    new = KeySource(keyfile=Secret(b"n" * 32))
    report = await rotate(await Volume.open(store, src), to_source=new, settle=0)
    assert report.finished and not report.failed
    vol = await Volume.open(store, new)
    assert vol.payload.rev == 2 and "vmk" not in vol.payload.mks
    await _read_all(vol, tmp_path / "r", golden)
    for key, (_b, md, _e) in store.objects.items():
        if key == CONFIG_NAME:
            continue
        assert md["cfs-m"] == vol.payload.cur
        with pytest.raises(IntegrityError):
            stolen.meta.decode(b"", key, dict(md))  # sealed under a key the thief lacks


async def test_an_object_written_at_revision_1_during_the_upgrade_is_upgraded_too(
    tmp_path: Path,
) -> None:
    """A mount that has not re-read the config yet writes revision 1 meanwhile: the last
    pass, which waits until every mount has re-read it, upgrades that object too."""
    import trio

    from tests.fsutil import write_file

    store, golden, src = await golden_store("golden_volume_v1_mk.json")
    stale = await Volume.open(store, src)  # a mount that still holds the revision-1 config
    fs = Filesystem(stale, StagingArea(tmp_path / "stale", stale.keys.cache, stale.chunk))
    await fs.ensure_root()
    report = None

    async def run() -> None:
        nonlocal report
        report = await upgrade(await Volume.open(store, src), settle=1.0)

    async with trio.open_nursery() as n:
        n.start_soon(run)
        await trio.sleep(0.3)
        await write_file(fs, ROOT_INO, b"late", b"written at revision 1")
    assert report is not None and report.finished, report
    assert {md["cfs"] for k, (_b, md, _e) in store.objects.items() if k != CONFIG_NAME} == {"2"}
    vol = await Volume.open(store, src)
    await _read_all(vol, tmp_path / "after", golden)
    fs2 = Filesystem(vol, StagingArea(tmp_path / "after2", vol.keys.cache, vol.chunk))
    await fs2.ensure_root()
    from tests.fsutil import read_file as rf

    assert await rf(fs2, (await fs2.lookup(ROOT_INO, b"late")).ino) == b"written at revision 1"
