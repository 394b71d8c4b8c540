"""The key and server-side-encryption commands end to end: real CLI, real mounts, real tools.

KMS is moto's server mode on loopback; S3 is SeaweedFS (HTTPS with a self-signed CA for SSE-C).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import KmsServer, S3Server
from tests.e2e.conftest import Volume, cryptfs

pytestmark = pytest.mark.e2e


def _tree(root: Path) -> None:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.txt").write_text("alpha\n" * 1000)
    (root / "sub" / "b.bin").write_bytes(os.urandom(300_000))
    (root / "sub" / "deeper" / "c").write_bytes(b"")
    os.symlink("a.txt", root / "link")


def _diff(a: Path, b: Path) -> None:
    r = subprocess.run(["diff", "-r", "--no-dereference", str(a), str(b)], capture_output=True)
    assert r.returncode == 0, r.stdout.decode()[-2000:]


def test_kms_volume_keyslots_and_rotation(
    s3server: S3Server, kms_server: KmsServer, bucket: str, tmp_path: Path
) -> None:
    k1, k2 = kms_server.new_key(), kms_server.new_key()
    url = f"s3://{bucket}/kms"
    common = ["--endpoint-url", s3server.endpoint, "--kms-endpoint-url", kms_server.endpoint]
    r = cryptfs("init", url, "--kms-key-id", k1, *common)
    assert "created" in r.stdout
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    vol = Volume(
        url, s3server.endpoint, tmp_path / "none", mnt, tmp_path / "cache", bucket, s3server
    )
    src = tmp_path / "src"
    src.mkdir()
    _tree(src)

    # no key file at all: the volume opens through its KMS keyslot
    vol.try_mount("--kms-endpoint-url", kms_server.endpoint, check=True)
    try:
        subprocess.run(["cp", "-a", f"{src}/.", str(mnt)], check=True)
    finally:
        vol.umount()

    backup = tmp_path / "backup.key"
    r = cryptfs("key", "add", url, "--new-key-file", str(backup), *common)
    assert "added keyslot keyfile-" in r.stdout
    listing = cryptfs("key", "list", url, *common).stdout
    assert k1 in listing and "key file" in listing and "(used now)" in listing

    r = cryptfs("rotate", url, "--to-kms-key-id", k2, "--settle", "0", *common)
    assert "rotation to " + k2 + ": complete" in r.stdout, r.stdout
    assert _downloaded(r.stdout) < 64 << 10  # (trailers of the bodies pinned: no body)
    assert "keyslots removed" in r.stdout
    listing = cryptfs("key", "list", url, *common).stdout
    assert k2 in listing and k1 not in listing and "key file" not in listing
    # the backup key file belonged to the old generation: it no longer opens the volume
    r = vol.try_mount("--key-file", str(backup), "--kms-endpoint-url", kms_server.endpoint)
    assert r.returncode == 1 and "no keyslot of the given kind" in r.stderr

    vol.try_mount("--kms-endpoint-url", kms_server.endpoint, check=True)
    try:
        _diff(src, mnt)
    finally:
        vol.umount()
    # every file's data key is now under the new KMS key
    c = s3server.client()
    kids = set()
    for k in vol.raw_keys():
        md = c.head_object(Bucket=bucket, Key=k)["Metadata"]
        if "cfs-k" in md:
            kids.add(md["cfs-kid"])
    assert kids == {k2}


def test_keyfile_rotation_and_cli_errors(volume: Volume, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _tree(src)
    volume.mount()
    try:
        subprocess.run(["cp", "-a", f"{src}/.", str(volume.mnt)], check=True)
    finally:
        volume.umount()
    new = tmp_path / "new.key"
    common = ["--endpoint-url", volume.endpoint]
    r = cryptfs(
        "rotate",
        volume.url,
        "--key-file",
        str(volume.key),
        "--to-key-file",
        str(new),
        "--settle",
        "0",
        *common,
    )
    assert ": complete" in r.stdout and _downloaded(r.stdout) < 64 << 10
    assert oct(new.stat().st_mode & 0o777) == "0o600"
    r = volume.try_mount("--key-file", str(volume.key))
    assert r.returncode == 1 and "wrong key" in r.stderr
    volume.try_mount("--key-file", str(new), check=True)
    volume.mounted = True
    try:
        _diff(src, volume.mnt)
    finally:
        volume.umount()
    # the last keyslot cannot go; a missing slot is named
    listing = cryptfs("key", "list", volume.url, "--key-file", str(new), *common).stdout
    slot = listing.split()[0]
    r = cryptfs("key", "remove", volume.url, slot, "--key-file", str(new), *common, check=False)
    assert r.returncode == 1 and "last keyslot" in r.stderr
    r = cryptfs("key", "remove", volume.url, "nope", "--key-file", str(new), *common, check=False)
    assert r.returncode == 1 and "no keyslot 'nope'" in r.stderr


def test_sse_c_over_https_mount(tls_s3server: S3Server, tls_ca: Path, tmp_path: Path) -> None:
    assert tls_s3server.https_endpoint is not None
    https = tls_s3server.https_endpoint
    tls_s3server.client().create_bucket(Bucket="ssec-e2e")
    url = "s3://ssec-e2e/vol"
    key, customer = tmp_path / "vol.key", tmp_path / "sse-c.key"
    tls = ["--endpoint-url", https, "--ca-bundle", str(tls_ca)]
    # SSE-C over plain http is refused before anything is written
    r = cryptfs(
        "init", url, "--key-file", str(key), "--sse", "c", "--sse-c-key-file", str(customer),
        "--endpoint-url", tls_s3server.endpoint, check=False,
    )  # fmt: skip
    assert r.returncode == 1 and "https" in r.stderr and "Traceback" not in r.stderr
    # the wrong CA is refused
    r = cryptfs("init", url, "--key-file", str(key), "--endpoint-url", https, check=False)
    assert r.returncode == 1 and "certificate" in r.stderr.lower()

    r = cryptfs(
        "init", url, "--key-file", str(key), "--sse", "c", "--sse-c-key-file", str(customer), *tls
    )
    assert "SSE-C" in r.stdout
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    vol = Volume(url, https, key, mnt, tmp_path / "cache", "ssec-e2e", tls_s3server)
    r = vol.try_mount("--key-file", str(key), "--ca-bundle", str(tls_ca))
    assert r.returncode == 1 and "--sse-c-key-file" in r.stderr
    src = tmp_path / "src"
    src.mkdir()
    _tree(src)
    (src / "big").write_bytes(os.urandom(20 << 20))  # multipart
    extra = ["--ca-bundle", str(tls_ca), "--sse-c-key-file", str(customer)]
    vol.try_mount("--key-file", str(key), *extra, check=True)
    try:
        subprocess.run(["rsync", "-a", f"{src}/", f"{mnt}/"], check=True)
        subprocess.run(["mv", str(mnt / "sub"), str(mnt / "moved")], check=True)
        subprocess.run(["mv", str(mnt / "moved"), str(mnt / "sub")], check=True)
    finally:
        vol.umount()
    vol.try_mount("--key-file", str(key), *extra, check=True)
    try:
        _diff(src, mnt)
    finally:
        vol.umount()
    from botocore.exceptions import ClientError

    c = tls_s3server.client()
    keys = [k for k in vol.raw_keys() if k.startswith("vol/")]
    assert len(keys) >= 8
    for k in keys:  # the server really encrypted every object with the customer key
        with pytest.raises(ClientError):
            c.head_object(Bucket="ssec-e2e", Key=k)


def _downloaded(summary: str) -> int:
    """What a rotation's summary says it downloaded (the trailers of the bodies it pinned)."""
    line = next(x for x in summary.splitlines() if x.startswith("bytes downloaded:"))
    return int(line.split()[-1])
