"""Objects of the official AWS S3 Encryption Client through a real mount, then imported."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import KmsServer, S3Server
from tests.e2e.conftest import Volume, cryptfs
from tests.integration.test_s3ec import (
    OBJECTS,
    _move_to_instruction_file,
    _write_with_official_client,
)

pytestmark = pytest.mark.e2e


@pytest.mark.allow_error_logs
def test_s3ec_objects_in_a_mount_and_cryptfs_import(
    s3server: S3Server, kms_server: KmsServer, bucket: str, tmp_path: Path
) -> None:
    theirs = kms_server.new_key()
    _write_with_official_client(s3server, kms_server, theirs, bucket, "data/")
    _move_to_instruction_file(s3server.client(), bucket, "data/v3/hello.txt", {})
    key = tmp_path / "k"
    url = f"s3://{bucket}/data"
    common = ["--endpoint-url", s3server.endpoint, "--kms-endpoint-url", kms_server.endpoint]
    cryptfs("init", url, "--key-file", str(key), *common)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    vol = Volume(url, s3server.endpoint, key, mnt, tmp_path / "cache", bucket, s3server)
    # not shown unless asked for
    vol.try_mount("--key-file", str(key), "--kms-endpoint-url", kms_server.endpoint, check=True)
    vol.mounted = True
    try:
        assert os.listdir(mnt) == []
    finally:
        vol.umount()
    show = ["--show-s3ec", "--s3ec-kms-key-id", theirs]
    vol.try_mount(
        "--key-file", str(key), "--kms-endpoint-url", kms_server.endpoint, *show, check=True
    )
    vol.mounted = True
    try:
        for name, (_v, data) in OBJECTS.items():
            assert (mnt / name).read_bytes() == data, name
        out = subprocess.run(["ls", "-l", str(mnt / "v3")], capture_output=True, text=True)
        assert "hello.txt" in out.stdout and "r--r--r--" in out.stdout
        assert sorted(os.listdir(mnt / "v3")) == ["deep", "empty", "hello.txt"]  # no .instruction
        with pytest.raises(OSError) as exc:
            (mnt / "v3" / "hello.txt").write_text("no")
        assert exc.value.errno == errno.EROFS
        with pytest.raises(OSError) as exc:
            os.unlink(mnt / "v2" / "legacy.txt")
        assert exc.value.errno == errno.EROFS
        (mnt / "mine.txt").write_text("native files live beside them\n")
    finally:
        vol.umount()
    r = cryptfs(
        "import", url, "--all", "--key-file", str(key), "--s3ec-kms-key-id", theirs, *common
    )
    assert f"imported:                    {len(OBJECTS)}" in r.stdout, r.stdout
    vol.try_mount("--key-file", str(key), "--kms-endpoint-url", kms_server.endpoint, check=True)
    vol.mounted = True
    try:
        for name, (_v, data) in OBJECTS.items():
            assert (mnt / name).read_bytes() == data, name
        (mnt / "v3" / "hello.txt").write_text("now an ordinary, writable file\n")
        assert (mnt / "mine.txt").read_text() == "native files live beside them\n"
    finally:
        vol.umount()
    keys = vol.raw_keys()
    assert not any(k.endswith(("hello.txt", ".instruction")) for k in keys)  # names encrypted
