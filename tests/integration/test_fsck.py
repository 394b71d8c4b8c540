"""``cryptfs fsck`` against a real SeaweedFS: a clean volume, then every kind of damage."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cryptfs.cache.staging import StagingArea
from cryptfs.crypto import Secret
from cryptfs.format.volume import KeySource
from cryptfs.fs.filesystem import Filesystem
from cryptfs.fs.model import ROOT_INO, Options
from cryptfs.fsck import EXIT_CLEAN, EXIT_LEFT, fsck
from cryptfs.session import Remote, open_remote
from cryptfs.store.s3 import S3Location, S3Options
from cryptfs.volume import MARKER, Volume
from tests.conftest import S3Server
from tests.fsutil import write_file

pytestmark = pytest.mark.integration


@pytest.mark.allow_error_logs
async def test_fsck_clean_then_every_kind_of_damage(
    s3server: S3Server, bucket: str, tmp_path: Path
) -> None:
    loc = S3Location.parse(f"s3://{bucket}/vol")
    src = KeySource(keyfile=Secret(os.urandom(32)))
    cache = tmp_path / "cache"
    raw = s3server.client()
    async with open_remote(loc, Remote(S3Options(endpoint_url=s3server.endpoint))) as (store, _):
        vol = await Volume.create(store, src, chunk_log2=12, encrypt_names=True)
        staging = StagingArea(cache / vol.volume_id.hex() / "staging", vol.keys.cache, vol.chunk)
        fs = Filesystem(vol, staging, Options(writeback_delay=3600), key_prefix=loc.prefix)
        await fs.ensure_root()
        d = await fs.mkdir(ROOT_INO, b"docs", 0o755, 0, 0)
        sub = await fs.mkdir(d.ino, b"sub", 0o755, 0, 0)
        for i in range(4):
            await write_file(fs, d.ino, f"f{i}".encode(), os.urandom(10_000 + i))
        await write_file(fs, sub.ino, b"L" * 200, b"long name")
        await write_file(fs, sub.ino, b"x", b"in sub")
        await fs.symlink(ROOT_INO, b"link", b"docs/f0", 0, 0)

        report = await fsck(vol, key_prefix=loc.prefix, full=True, cache_dir=cache)
        assert report.exit_code() == EXIT_CLEAN, report.summary()
        assert (report.files, report.symlinks, report.directories) == (6, 1, 3)
        assert report.objects == 10  # root, 2 markers, 6 files, 1 link

        def key_of(parent: int, name: bytes) -> str:
            return loc.prefix + fs.object_key(fs.node(parent).children[name])[0]  # type: ignore[index]

        # 1. edited metadata: does not authenticate
        k1 = key_of(d.ino, b"f1")
        md = raw.head_object(Bucket=bucket, Key=k1)["Metadata"]
        md["cfs-a"] = md["cfs-a"][:-4] + ("AAAA" if not md["cfs-a"].endswith("AAAA") else "BBBB")
        raw.copy_object(Bucket=bucket, Key=k1, CopySource={"Bucket": bucket, "Key": k1},
                        Metadata=md, MetadataDirective="REPLACE")  # fmt: skip
        # 2. a flipped byte in a body: only --full reads far enough to see it
        k2 = key_of(d.ino, b"f2")
        obj = raw.get_object(Bucket=bucket, Key=k2)
        body = bytearray(obj["Body"].read())
        body[5000] ^= 1
        raw.put_object(Bucket=bucket, Key=k2, Body=bytes(body), Metadata=obj["Metadata"])
        # 3. a cryptfs object under a name that leads nowhere, 4. a foreign object
        k3 = key_of(d.ino, b"f3")
        raw.copy_object(Bucket=bucket, Key=loc.prefix + "nowhere/zzz",
                        CopySource={"Bucket": bucket, "Key": k3})  # fmt: skip
        raw.put_object(Bucket=bucket, Key=loc.prefix + "notes.txt", Body=b"not ours")
        # 5. a directory whose marker is gone (its files are still there)
        raw.delete_object(Bucket=bucket, Key=loc.prefix + fs.dir_prefix(sub) + MARKER)
        # 6. a multipart upload nobody finishes, 7. a file closed but not uploaded yet
        await store.create_multipart("docs-upload", {})
        await write_file(fs, d.ino, b"pending", b"staged only", sync=False)

        vol2 = await Volume.open(store, src)
        quick = await fsck(vol2, key_prefix=loc.prefix, upload_age=0, cache_dir=cache)
        text = quick.summary()
        assert quick.exit_code() == EXIT_LEFT
        assert [k for k, _ in quick.unreadable] == [k1[len(loc.prefix) :]], text
        orphans = dict(quick.orphans)
        assert "no marker" in orphans["nowhere/zzz"] and "not a cryptfs" in orphans["notes.txt"]
        assert quick.implicit_dirs == [fs.dir_prefix(sub)]
        assert [k for k, _, _ in quick.stale_uploads] == ["docs-upload"]
        assert quick.staged == ["/docs/pending"]

        full = await fsck(await Volume.open(store, src), key_prefix=loc.prefix, full=True)
        assert {k for k, _ in full.unreadable} == {k1[len(loc.prefix) :], k2[len(loc.prefix) :]}

        fixed = await fsck(
            await Volume.open(store, src), key_prefix=loc.prefix, repair=True, upload_age=0
        )
        assert len(fixed.repaired) == 2, fixed.summary()  # the upload and the marker
        assert await store.list_uploads("") == []
        after = await fsck(await Volume.open(store, src), key_prefix=loc.prefix, upload_age=0)
        assert not after.implicit_dirs and not after.stale_uploads
        # nothing that holds data was deleted
        assert raw.head_object(Bucket=bucket, Key=k1) and raw.head_object(Bucket=bucket, Key=k2)
        assert len(after.orphans) == 2 and len(after.unreadable) == 1
