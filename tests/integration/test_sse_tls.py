"""Server-side encryption on top of client-side (SSE-S3, SSE-C, SSE-KMS) and TLS.

SSE-S3 and SSE-C run against SeaweedFS (SSE-C over HTTPS with a self-signed certificate);
SSE-KMS header plumbing against moto's S3.  A raw botocore client checks what the server
actually stored.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from cryptfs.cache.staging import StagingArea
from cryptfs.crypto import Secret
from cryptfs.errors import AccessDenied, SseMismatch, StoreUnavailable, UsageError
from cryptfs.format.volume import CONFIG_NAME, KeySource
from cryptfs.fs.filesystem import Filesystem
from cryptfs.fs.model import ROOT_INO, Options
from cryptfs.session import Remote, open_remote, open_volume, sse_from_config
from cryptfs.store.kms import KmsOptions
from cryptfs.store.s3 import S3Location, S3Options, open_s3_store
from cryptfs.store.sse import Sse
from cryptfs.volume import Volume
from tests.conftest import KmsServer, S3Server, botocore_client, make_self_signed
from tests.fsutil import read_file, write_file

pytestmark = pytest.mark.integration

BIG = os.urandom(11 << 20)


async def _exercise(vol: Volume, tmp: Path, prefix: str) -> None:
    """Small and multipart files, a directory rename (server-side copies) and read-back."""
    fs = Filesystem(
        vol,
        StagingArea(tmp / os.urandom(4).hex(), vol.keys.cache, vol.chunk),
        Options(writeback_delay=0.05, multipart_threshold=5 << 20, part_size=5 << 20),
        key_prefix=prefix,
    )
    await fs.ensure_root()
    d = await fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    for name, data in ((b"small", b"hello"), (b"big", BIG)):
        await write_file(fs, d.ino, name, data)
    await fs.rename(ROOT_INO, b"d", ROOT_INO, b"e", 0)
    await fs.flush_all()
    e = await fs.lookup(ROOT_INO, b"e")
    big = await fs.lookup(e.ino, b"big")
    assert await read_file(fs, big.ino) == BIG


def _all_keys(client, bucket: str, prefix: str) -> list[str]:  # type: ignore[no-untyped-def]
    return [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]]


@pytest.mark.allow_error_logs
async def test_sse_s3_every_object_and_mismatch_is_eio(
    s3server: S3Server, bucket: str, tmp_path: Path
) -> None:
    loc = S3Location.parse(f"s3://{bucket}/sse3")
    src = KeySource(keyfile=Secret(os.urandom(32)))
    async with open_remote(loc, Remote(S3Options(endpoint_url=s3server.endpoint))) as (store, _):
        store.set_sse(Sse("s3"))
        vol = await Volume.create(store, src, chunk_log2=16, encrypt_names=True, sse={"mode": "s3"})
        await _exercise(vol, tmp_path, loc.prefix)
    c = s3server.client()
    keys = _all_keys(c, bucket, "sse3/")
    assert len(keys) >= 5 and any(k.endswith(CONFIG_NAME) for k in keys)
    for k in keys:
        assert c.head_object(Bucket=bucket, Key=k).get("ServerSideEncryption") == "AES256", k

    # the mount takes the setting from the (authenticated) config, not from a flag
    async with open_remote(loc, Remote(S3Options(endpoint_url=s3server.endpoint))) as (store, kms):
        vol = await open_volume(store, kms, src)
        assert store.sse is not None and store.sse.mode == "s3"
        # an object rewritten without SSE (e.g. by a careless tool) is refused, not served
        victim = max(keys, key=lambda k: c.head_object(Bucket=bucket, Key=k)["ContentLength"])
        c.copy_object(
            Bucket=bucket,
            Key=victim,
            CopySource={"Bucket": bucket, "Key": victim},
            Metadata=c.head_object(Bucket=bucket, Key=victim)["Metadata"],
            MetadataDirective="REPLACE",
        )
        assert c.head_object(Bucket=bucket, Key=victim).get("ServerSideEncryption") is None
        with pytest.raises(SseMismatch, match="SSE-S3"):
            await store.head(victim[len(loc.prefix) :])
        with pytest.raises(SseMismatch):
            await store.get(victim[len(loc.prefix) :], 0, 10)


async def test_sse_c_over_https_end_to_end(
    tls_s3server: S3Server, tls_ca: Path, tmp_path: Path
) -> None:
    assert tls_s3server.https_endpoint is not None
    raw = botocore_client("s3", tls_s3server.https_endpoint, str(tls_ca))
    raw.create_bucket(Bucket="ssec")
    loc = S3Location.parse("s3://ssec/vol")
    customer = Secret(os.urandom(32))
    src = KeySource(keyfile=Secret(os.urandom(32)))
    s3opts = S3Options(endpoint_url=tls_s3server.https_endpoint, verify=str(tls_ca))
    async with open_remote(loc, Remote(s3opts, sse_c_key=customer)) as (store, _):
        vol = await Volume.create(store, src, chunk_log2=16, encrypt_names=True, sse={"mode": "c"})
        await _exercise(vol, tmp_path, loc.prefix)

    keys = _all_keys(raw, "ssec", "vol/")
    assert len(keys) >= 5
    for k in keys:
        # without the customer key not even HEAD works: the server really used SSE-C
        with pytest.raises(ClientError):
            raw.head_object(Bucket="ssec", Key=k)
        h = raw.head_object(
            Bucket="ssec", Key=k, SSECustomerAlgorithm="AES256", SSECustomerKey=customer.reveal()
        )
        assert h["SSECustomerAlgorithm"] == "AES256"

    # reopening: with the key it works; without it or with another key, a clear error
    async with open_remote(loc, Remote(s3opts, sse_c_key=customer)) as (store, kms):
        vol = await open_volume(store, kms, src)
        assert vol.config.sse == {"mode": "c"}
    async with open_remote(loc, Remote(s3opts)) as (store, kms):
        with pytest.raises(UsageError, match="give --sse-c-key-file"):
            await open_volume(store, kms, src)
    async with open_remote(loc, Remote(s3opts, sse_c_key=Secret(os.urandom(32)))) as (store, kms):
        with pytest.raises(AccessDenied, match="wrong SSE-C key"):
            await open_volume(store, kms, src)


async def test_sse_c_refused_over_plain_http(s3server: S3Server, bucket: str) -> None:
    loc = S3Location.parse(f"s3://{bucket}/x")
    remote = Remote(S3Options(endpoint_url=s3server.endpoint), sse_c_key=Secret(os.urandom(32)))
    with pytest.raises(UsageError, match="https"):
        async with open_remote(loc, remote):
            pass


@pytest.mark.parametrize("source", ["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "profile"])
async def test_sse_c_refused_over_plain_http_resolved_from_the_environment(
    s3server: S3Server, bucket: str, source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check is of the endpoint the requests go to, not only of --endpoint-url."""
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    if source == "profile":
        cfg = tmp_path / "aws-config"
        cfg.write_text(f"[profile p]\nendpoint_url = {s3server.endpoint}\n")
        monkeypatch.setenv("AWS_CONFIG_FILE", str(cfg))
        monkeypatch.setenv("AWS_PROFILE", "p")
    else:
        monkeypatch.setenv(source, s3server.endpoint)
    loc = S3Location.parse(f"s3://{bucket}/x")
    async with open_remote(loc, Remote(S3Options())) as (store, _):
        assert not store.secure  # (the bucket answered there: that is the endpoint in use)
    with pytest.raises(UsageError, match="https"):
        async with open_remote(loc, Remote(S3Options(), sse_c_key=Secret(os.urandom(32)))):
            pass


async def test_tls_wrong_ca_refused(tls_s3server: S3Server, tmp_path: Path) -> None:
    assert tls_s3server.https_endpoint is not None
    other_ca, _ = make_self_signed(tmp_path / "other", "not-the-server")
    for verify in (str(other_ca), True):  # another CA, and the system store
        opts = S3Options(endpoint_url=tls_s3server.https_endpoint, verify=verify, max_attempts=1)
        with pytest.raises(StoreUnavailable, match=r"SSL|certificate"):
            async with open_s3_store(S3Location.parse("s3://any-bucket"), opts):
                pass


async def test_sse_kms_headers_against_moto_s3(kms_server: KmsServer) -> None:
    key = kms_server.new_key()
    raw = botocore_client("s3", kms_server.endpoint)
    raw.create_bucket(Bucket="ssekms")
    loc = S3Location.parse("s3://ssekms/v")
    remote = Remote(
        S3Options(endpoint_url=kms_server.endpoint), KmsOptions(endpoint_url=kms_server.endpoint)
    )
    async with open_remote(loc, remote) as (store, _):
        store.set_sse(sse_from_config({"mode": "kms", "key_id": key}, None))
        await store.put("a", b"x" * 100, {"cfs": "1"})
        upload = await store.create_multipart("m", {"cfs": "1"})
        etag = await store.upload_part("m", upload, 1, b"y" * 100)
        await store.complete_multipart("m", upload, [etag])
        await store.copy("a", "c", {"cfs": "2"})
        for k in ("a", "m", "c"):
            h = raw.head_object(Bucket="ssekms", Key=f"v/{k}")
            assert h["ServerSideEncryption"] == "aws:kms", k
            assert h["SSEKMSKeyId"] == key, k
            await store.head(k)  # our own check accepts it
        raw.put_object(Bucket="ssekms", Key="v/plain", Body=b"z")
        with pytest.raises(SseMismatch, match="SSE-KMS"):
            await store.head("plain")
