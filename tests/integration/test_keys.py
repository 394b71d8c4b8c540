"""KMS volumes, keyslots and master-key rotation against SeaweedFS (S3) and moto (KMS).

Everything goes through the production code path: ``session.open_remote`` builds the S3 and
KMS clients (aiobotocore on one loop thread), ``open_volume`` unlocks.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import trio

from cryptfs.cache.staging import StagingArea
from cryptfs.crypto import Secret
from cryptfs.errors import (
    IntegrityError,
    KeyAccessDenied,
    StoreUnavailable,
    UsageError,
    WrongKey,
)
from cryptfs.format.keys import kms_file_context
from cryptfs.format.names import b64d
from cryptfs.format.volume import CONFIG_NAME, KeySource
from cryptfs.fs.filesystem import Filesystem
from cryptfs.fs.model import ROOT_INO, Options
from cryptfs.keyadmin import add_slot, describe_slots, remove_slot, rotate
from cryptfs.session import Remote, open_remote, open_volume
from cryptfs.store.kms import KmsOptions
from cryptfs.store.s3 import S3Location, S3Options
from cryptfs.volume import Volume
from tests.conftest import KmsServer, S3Server
from tests.fsutil import write_file

pytestmark = pytest.mark.integration

FILES = {
    b"a.txt": b"alpha " * 1000,
    b"b.bin": os.urandom(70_000),
    b"empty": b"",
}


def remote(s3: S3Server, kms: KmsServer) -> Remote:
    return Remote(
        S3Options(endpoint_url=s3.endpoint), KmsOptions(endpoint_url=kms.endpoint, max_attempts=3)
    )


def _fs(vol: Volume, tmp: Path, prefix: str) -> Filesystem:
    staging = StagingArea(tmp / os.urandom(4).hex(), vol.keys.cache, vol.chunk)
    return Filesystem(vol, staging, Options(writeback_delay=0.05), key_prefix=prefix)


async def write_files(vol: Volume, tmp: Path, prefix: str, files: dict[bytes, bytes]) -> None:
    fs = _fs(vol, tmp, prefix)
    await fs.ensure_root()
    d = await fs.mkdir(ROOT_INO, b"dir", 0o755, 0, 0)
    for name, data in files.items():
        await write_file(fs, d.ino, name, data)


async def read_files(vol: Volume, tmp: Path, prefix: str) -> dict[bytes, bytes]:
    fs = _fs(vol, tmp, prefix)
    await fs.ensure_root()
    d = await fs.lookup(ROOT_INO, b"dir")
    out = {}
    for name, node in await fs.readdir(d.ino):
        if name in (b".", b".."):
            continue
        h = await fs.open(node.ino, os.O_RDONLY)
        out[name] = await fs.read(h.fh, 0, 1 << 24)
        await fs.release(h.fh)
    return out


def raw_metadata(s3: S3Server, bucket: str, prefix: str) -> dict[str, dict[str, str]]:
    c = s3.client()
    out = {}
    for o in c.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", []):
        if not o["Key"].endswith(CONFIG_NAME):
            out[o["Key"]] = c.head_object(Bucket=bucket, Key=o["Key"])["Metadata"]
    return out


async def test_kms_volume_context_and_cache(
    s3server: S3Server, kms_server: KmsServer, bucket: str, tmp_path: Path
) -> None:
    key = kms_server.new_key()
    loc = S3Location.parse(f"s3://{bucket}/kmsvol")
    async with open_remote(loc, remote(s3server, kms_server)) as (store, kms):
        vol = await Volume.create(
            store, KeySource(), chunk_log2=16, encrypt_names=True, kms=kms, kms_key_id=key
        )
        await write_files(vol, tmp_path, loc.prefix, FILES)
        files = {k: md for k, md in raw_metadata(s3server, bucket, "kmsvol/").items()}
        wrapped = [md for md in files.values() if md["cfs-w"] == "kms"]
        assert len(wrapped) == len(FILES)
        assert all(md["cfs-kid"] == key for md in wrapped)

        # the volume opens through its KMS keyslot alone; every byte reads back
        vol2 = await open_volume(store, kms, KeySource(kms=True))
        assert await read_files(vol2, tmp_path, loc.prefix) == FILES
        # within the TTL, opening the same files again makes no KMS request
        before = kms.calls
        assert await read_files(vol2, tmp_path, loc.prefix) == FILES
        assert kms.calls == before
        vol2.keyring.close()  # what unmount does: the keys are gone, KMS is asked again
        assert await read_files(vol2, tmp_path, loc.prefix) == FILES
        # one Decrypt per file with content (an empty file's body is never opened)
        assert kms.calls == before + sum(1 for v in FILES.values() if v)

        # the encryption context binds the data key to volume and file id
        md = wrapped[0]
        blob, fid = b64d(md["cfs-k"]), b64d(md["cfs-f"])
        await kms.decrypt(blob, kms_file_context(vol.volume_id, fid), key)
        with pytest.raises(IntegrityError):
            await kms.decrypt(blob, kms_file_context(vol.volume_id, b"X" * 16), key)
        with pytest.raises(IntegrityError):
            await kms.decrypt(blob, kms_file_context(b"V" * 16, fid), key)
        # a key file offered to a KMS-only volume is refused clearly
        with pytest.raises(WrongKey, match="no keyslot of the given kind"):
            await open_volume(store, kms, KeySource(keyfile=Secret(os.urandom(32))))


@pytest.mark.allow_error_logs
async def test_kms_denied_file_reads_eio_others_fine(
    s3server: S3Server, kms_server: KmsServer, bucket: str, tmp_path: Path
) -> None:
    key, other = kms_server.new_key(), kms_server.new_key()
    loc = S3Location.parse(f"s3://{bucket}/deny")
    async with open_remote(loc, remote(s3server, kms_server)) as (store, kms):
        vol = await Volume.create(
            store, KeySource(), chunk_log2=16, encrypt_names=True, kms=kms, kms_key_id=key
        )
        last = b"b.bin"
        await write_files(vol, tmp_path, loc.prefix, {n: d for n, d in FILES.items() if n != last})
        # the last file's data key comes from another KMS key the volume names (as during a
        # rotation), on which this principal then loses kms:Decrypt: that one file reads
        # EIO, with KMS's reason (moto enforces no IAM: the denial is played in front of it)
        vol.config.dek = {"scheme": "kms", "kid": other}
        vol.config.kms_keys = sorted([key, other])
        await vol.save_config()
        fs = _fs(vol, tmp_path, loc.prefix)
        await fs.ensure_root()
        await write_file(fs, (await fs.lookup(ROOT_INO, b"dir")).ino, last, FILES[last])
        c = s3server.client()
        vol2 = await open_volume(store, kms, KeySource(kms=True))
        vol2.keyring.kms = _DenyDecrypt(kms, other)  # type: ignore[assignment]
        fs = _fs(vol2, tmp_path, loc.prefix)
        await fs.ensure_root()
        d = await fs.lookup(ROOT_INO, b"dir")
        ok, denied = 0, []
        for name, node in await fs.readdir(d.ino):
            if name in (b".", b".."):
                continue
            h = await fs.open(node.ino, os.O_RDONLY)
            try:
                assert await fs.read(h.fh, 0, 1 << 24) == FILES[name]
                ok += 1
            except KeyAccessDenied as e:
                denied.append(str(e))
            finally:
                await fs.release(h.fh)
        assert ok == len(FILES) - 1
        assert len(denied) == 1 and "AccessDenied" in denied[0]

        # a KMS slot whose key KMS refuses: the volume does not open, with KMS's reason
        import json

        cfg_key = f"deny/{CONFIG_NAME}"
        cfg = json.loads(c.get_object(Bucket=bucket, Key=cfg_key)["Body"].read())
        cfg["keyslots"][0]["key_id"] = other
        c.put_object(Bucket=bucket, Key=cfg_key, Body=json.dumps(cfg).encode())
        # ... named by the user (a slot under a key this machine has not seen is not tried)
        with pytest.raises(KeyAccessDenied, match=r"refused keyslot .*AccessDenied"):
            await open_volume(store, kms, KeySource(kms=True, kms_keys=(other,)))
        with pytest.raises(KeyAccessDenied, match="has not seen"):
            await open_volume(store, kms, KeySource(kms=True))


class _DenyDecrypt:
    """A KMS client whose principal may not Decrypt under ``key`` (as an IAM policy says)."""

    def __init__(self, inner: Any, key: str) -> None:
        self.inner, self.key = inner, key

    async def decrypt(self, blob: bytes, context: Any, key_id: str | None = None, what: str = ""):  # type: ignore[no-untyped-def]
        if key_id == self.key:
            raise KeyAccessDenied(f"AWS KMS refused {what or 'a data key'}: AccessDeniedException")
        return await self.inner.decrypt(blob, context, key_id, what)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_kms_unknown_key_refused_at_init(
    s3server: S3Server, kms_server: KmsServer, bucket: str
) -> None:
    loc = S3Location.parse(f"s3://{bucket}/nokey")
    async with open_remote(loc, remote(s3server, kms_server)) as (store, kms):
        with pytest.raises(KeyAccessDenied, match="NotFoundException"):
            await Volume.create(
                store,
                KeySource(),
                chunk_log2=16,
                encrypt_names=True,
                kms=kms,
                kms_key_id="alias/does-not-exist",
            )
        arn = kms_server.new_key()
        kms_server.client().disable_key(KeyId=arn.rsplit("/", 1)[1])
        with pytest.raises(KeyAccessDenied, match="Disabled"):
            await Volume.create(
                store, KeySource(), chunk_log2=16, encrypt_names=True, kms=kms, kms_key_id=arn
            )


async def test_keyslots_add_list_remove(
    s3server: S3Server, kms_server: KmsServer, bucket: str, tmp_path: Path
) -> None:
    loc = S3Location.parse(f"s3://{bucket}/slots")
    k1, k2 = Secret(os.urandom(32)), Secret(os.urandom(32))
    pw = Secret(b"correct horse battery staple")
    kms_key = kms_server.new_key()
    async with open_remote(loc, remote(s3server, kms_server)) as (store, kms):
        vol = await Volume.create(
            store, KeySource(keyfile=k1), chunk_log2=16, encrypt_names=True, kms=kms
        )
        await write_files(vol, tmp_path, loc.prefix, FILES)
        first = vol.slot_id
        s_pw = await add_slot(vol, KeySource(passphrase=pw), None)
        s_k2 = await add_slot(vol, KeySource(keyfile=k2), None)
        s_kms = await add_slot(vol, None, kms_key)
        listing = "\n".join(describe_slots(vol))
        for sid in (first, s_pw, s_k2, s_kms):
            assert sid in listing
        assert kms_key in listing and "argon2id" in listing
        # every slot opens the same volume and reads the same files
        for src in (KeySource(passphrase=pw), KeySource(keyfile=k2), KeySource(kms=True)):
            v = await open_volume(store, kms, src)
            assert await read_files(v, tmp_path, loc.prefix) == FILES
        await remove_slot(vol, first)
        with pytest.raises(WrongKey):
            await open_volume(store, kms, KeySource(keyfile=k1))
        for sid in (s_pw, s_k2):
            v = await open_volume(store, kms, KeySource(keyfile=k2))
            await remove_slot(v, sid)
        v = await open_volume(store, kms, KeySource(kms=True))
        with pytest.raises(UsageError, match="last keyslot"):
            await remove_slot(v, s_kms)
        # a config changed behind our back is not overwritten
        stale = await open_volume(store, kms, KeySource(kms=True))
        await add_slot(v, KeySource(keyfile=k1), None)
        with pytest.raises(UsageError, match="changed by someone else"):
            await add_slot(stale, KeySource(keyfile=k2), None)


async def _old_payload_opens_nothing(s3: S3Server, bucket: str, prefix: str, vol: Volume) -> None:
    """With the pre-rotation keys (kept here as if stolen) no data key unwraps any more."""
    from cryptfs.format.keys import WrappedKey

    vol.keyring.kms = None  # the thief has the old key file, not the KMS permissions

    n = 0
    for key, md in raw_metadata(s3, bucket, prefix).items():
        if key.endswith(CONFIG_NAME):
            continue
        # nor does any object's metadata authenticate under the retired master key
        with pytest.raises(IntegrityError):
            vol.meta.decode(b"", key[len(prefix) :], md)
        if "cfs-k" not in md:
            continue
        wk = WrappedKey(md["cfs-w"], md["cfs-kid"], b64d(md["cfs-k"]), int(md["cfs"]))
        vol.keyring.cache.clear()
        with pytest.raises((IntegrityError, KeyAccessDenied)):
            await vol.keyring.unwrap(wk, b64d(md["cfs-f"]))
        n += 1
    assert n >= len(FILES)


@pytest.mark.allow_error_logs
async def test_rotate_keyfile_interrupted_then_resumed(
    s3server: S3Server, kms_server: KmsServer, bucket: str, tmp_path: Path
) -> None:
    loc = S3Location.parse(f"s3://{bucket}/rot")
    old, new = Secret(os.urandom(32)), Secret(os.urandom(32))
    many = {f"f{i:03d}".encode(): os.urandom(100 + i) for i in range(40)} | FILES
    async with open_remote(loc, remote(s3server, kms_server)) as (store, kms):
        vol = await Volume.create(
            store, KeySource(keyfile=old), chunk_log2=16, encrypt_names=True, kms=kms
        )
        await write_files(vol, tmp_path, loc.prefix, many)
        stolen = await open_volume(store, kms, KeySource(keyfile=old))

        # interrupt: the server fails every copy after the 10th
        real_copy = store.copy
        count = 0

        async def flaky_copy(*a, **kw):  # type: ignore[no-untyped-def]
            nonlocal count
            count += 1
            if count > 10:
                raise StoreUnavailable("injected outage")
            return await real_copy(*a, **kw)

        store.copy = flaky_copy  # type: ignore[method-assign]
        vol1 = await open_volume(store, kms, KeySource(keyfile=old))
        with trio.fail_after(60):
            report = await rotate(vol1, to_source=KeySource(keyfile=new), concurrency=4, settle=0)
        # (directory markers are resealed under the new master key too)
        assert not report.finished and report.failed
        assert report.rewrapped + report.directories == 10
        first = report.rewrapped
        store.copy = real_copy  # type: ignore[method-assign]

        # the old key is already out; the new one reads everything, half-rotated or not
        with pytest.raises(WrongKey):
            await open_volume(store, kms, KeySource(keyfile=old))
        mid = await open_volume(store, kms, KeySource(keyfile=new))
        assert await read_files(mid, tmp_path, loc.prefix) == many

        report = await rotate(mid, to_source=KeySource(keyfile=new), resume=True, settle=0)
        assert report.finished and not report.failed
        assert report.rewrapped == len(many) - first
        assert report.already == first
        assert report.bytes_downloaded <= report.pinned * 4096  # (trailers: never a body)

        done = await open_volume(store, kms, KeySource(keyfile=new))
        assert await read_files(done, tmp_path, loc.prefix) == many
        assert list(done.payload.mks) == [done.config.dek["kid"]]
        assert len(done.config.keyslots) == 1
        await _old_payload_opens_nothing(s3server, bucket, "rot/", stolen)


async def test_rotate_local_to_kms_then_kms_to_kms_multipart_copy(
    s3server: S3Server, kms_server: KmsServer, bucket: str, tmp_path: Path
) -> None:
    loc = S3Location.parse(f"s3://{bucket}/rotkms")
    k1, k2 = kms_server.new_key(), kms_server.new_key()
    old = Secret(os.urandom(32))
    files = FILES | {b"big": os.urandom(12 << 20)}
    async with open_remote(loc, remote(s3server, kms_server)) as (store, kms):
        vol = await Volume.create(
            store, KeySource(keyfile=old), chunk_log2=16, encrypt_names=True, kms=kms
        )
        await write_files(vol, tmp_path, loc.prefix, files)
        stolen = await open_volume(store, kms, KeySource(keyfile=old))
        # objects over copy_max go through UploadPartCopy (5 GiB in production)
        store.copy_max, store.copy_part = 6 << 20, 5 << 20
        report = await rotate(vol, to_kms_key_id=k1, settle=0)
        assert report.finished and report.rewrapped == len(files)
        assert report.bytes_downloaded <= report.pinned * 4096  # (trailers: never a body)
        with pytest.raises(WrongKey):
            await open_volume(store, kms, KeySource(keyfile=old))
        v1 = await open_volume(store, kms, KeySource(kms=True))
        assert await read_files(v1, tmp_path, loc.prefix) == files
        # the old local master key is retired; a new one (which only authenticates) is current
        assert list(v1.payload.mks) == [v1.payload.cur] != [stolen.payload.cur]
        await _old_payload_opens_nothing(s3server, bucket, "rotkms/", stolen)

        calls = kms.calls
        report = await rotate(v1, to_kms_key_id=k2, settle=0)
        assert report.finished and report.rewrapped == len(files)
        # KMS to KMS: one ReEncrypt per file (the data key never leaves KMS), a lookup, and
        # two slots sealed (the new master key with the old one, then without it)
        assert kms.calls - calls <= len(files) + 5
        metas = [md for md in raw_metadata(s3server, bucket, "rotkms/").values() if "cfs-k" in md]
        assert {md["cfs-kid"] for md in metas} == {k2}
        v2 = await open_volume(store, kms, KeySource(kms=True))
        assert [s["key_id"] for s in v2.config.keyslots] == [k2]
        assert await read_files(v2, tmp_path, loc.prefix) == files


THROTTLED = (
    b'{"__type":"ThrottlingException","message":"Rate exceeded"}',
    {"Content-Type": "application/x-amz-json-1.1", "x-amzn-ErrorType": "ThrottlingException"},
)


async def test_kms_throttling_is_retried_then_reported(kms_server: KmsServer) -> None:
    from cryptfs.errors import KeyServiceUnavailable
    from cryptfs.store.bridge import open_bridge
    from cryptfs.store.kms import open_kms
    from tests.faults import FaultProxy

    key = kms_server.new_key()
    ctx = {"cryptfs:volume": "v", "cryptfs:file": "f"}
    with FaultProxy(kms_server.endpoint).running() as proxy:
        opts = KmsOptions(endpoint_url=proxy.endpoint, max_attempts=3)
        async with open_bridge() as bridge, open_kms(bridge, opts) as kms:
            proxy.fail_next(2, 400, *THROTTLED)
            dek, blob, arn = await kms.generate_data_key(key, ctx)
            assert proxy.requests == 3 and arn == key and len(dek) == 32  # two retries
            # all three attempts throttled: a clear error, after exactly three requests
            proxy.fail_next(3, 400, *THROTTLED)
            with pytest.raises(KeyServiceUnavailable, match="ThrottlingException"):
                await kms.decrypt(blob, ctx, key)
            assert proxy.requests == 6
            proxy.fail_next(1, 503, b"")
            got, _ = await kms.decrypt(blob, ctx, key)  # a 5xx is retried too
            assert got == dek


async def test_planted_kms_keyslot_is_not_tried(
    s3server: S3Server,
    kms_server: KmsServer,
    bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bucket writer replaces the config by one of their own (same volume id, a high
    epoch, a MAC under their own master key) whose only keyslot is under their own KMS key,
    which the mount's principal may use (``kms:Decrypt`` on ``*``): a machine that has seen
    the volume open through its real keyslot does not try it; a fresh machine does unless
    the user names the key (the residual risk docs/SECURITY.md states)."""
    import json

    from cryptfs.format.keys import kms_slot_context, new_master_key
    from cryptfs.format.volume import SlotPayload, VolumeConfig

    key, theirs = kms_server.new_key(), kms_server.new_key()
    loc = S3Location.parse(f"s3://{bucket}/planted")
    async with open_remote(loc, remote(s3server, kms_server)) as (store, kms):
        vol = await Volume.create(
            store, KeySource(), chunk_log2=16, encrypt_names=True, kms=kms, kms_key_id=key
        )
        await write_files(vol, tmp_path, loc.prefix, FILES)
        # the attacker's config: their VMK, their master key, their KMS slot
        c = s3server.client()
        real = c.get_object(Bucket=bucket, Key=f"planted/{CONFIG_NAME}")["Body"].read()
        cfg = VolumeConfig.from_bytes(real)
        kid, mk = new_master_key()
        payload = SlotPayload(Secret(os.urandom(32)), {kid: mk}, kid)
        cfg.dek, cfg.kms_keys, cfg.epoch = {"scheme": "kms", "kid": theirs}, [theirs], 99
        blob = kms_server.client().encrypt(
            KeyId=theirs,
            Plaintext=payload.to_bytes(),
            EncryptionContext=kms_slot_context(cfg.volume_id, "kms-a77ack"),
        )["CiphertextBlob"]
        cfg.keyslots = []
        cfg.add_kms_slot("kms-a77ack", theirs, blob)
        c.put_object(Bucket=bucket, Key=f"planted/{CONFIG_NAME}", Body=cfg.to_bytes(payload))

        with pytest.raises(KeyAccessDenied, match="has not seen"):
            await open_volume(store, kms, KeySource(kms=True))
        # a fresh machine that is told which key opens the volume refuses it too
        monkeypatch.setenv("CRYPTFS_STATE_DIR", str(tmp_path / "fresh"))
        with pytest.raises(KeyAccessDenied, match="has not seen"):
            await open_volume(store, kms, KeySource(kms=True, kms_keys=(key,)))
        # a fresh machine told nothing trusts the first keyslot it can open (stated)
        planted = await open_volume(store, kms, KeySource(kms=True))
        assert planted.config.dek["kid"] == theirs
        assert json.loads(real)["epoch"] == 1
