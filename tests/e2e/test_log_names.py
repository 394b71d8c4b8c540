"""The daemon's log names no file unless --log-names / ``log_names = true`` (docs/SECURITY.md,
"Local secrets"): a stolen cache disk must not reveal names through cryptfs.log."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import S3Server
from tests.e2e.conftest import Volume, cryptfs

pytestmark = pytest.mark.e2e
NAME = "secret-name-"  # every name below starts with it; the log must not hold it


@pytest.fixture(params=["encrypted", "plaintext"])
def any_volume(
    request: pytest.FixtureRequest, s3server: S3Server, bucket: str, tmp_path: Path
) -> Iterator[Volume]:
    key = tmp_path / "vol.key"
    url = f"s3://{bucket}/data"
    extra = ["--plaintext-names"] if request.param == "plaintext" else []
    cryptfs("init", url, "--key-file", str(key), "--endpoint-url", s3server.endpoint, *extra)
    (tmp_path / "mnt").mkdir()
    v = Volume(url, s3server.endpoint, key, tmp_path / "mnt", tmp_path / "cache", bucket, s3server)
    try:
        yield v
    finally:
        if os.path.ismount(v.mnt):
            subprocess.run(["fusermount3", "-uz", str(v.mnt)], check=False)
        assert "Traceback" not in v.log, v.log[-4000:]


def _exercise(volume: Volume, *mount_args: str) -> str:
    """Create, fsync, rename, miss names, read a tampered file (-vv: debug lines too);
    returns the tampered object's key."""
    volume.mount("-v", "-v", *mount_args)
    m = volume.mnt
    (m / f"{NAME}dir").mkdir()
    with open(m / f"{NAME}dir" / f"{NAME}alpha", "wb") as f:
        f.write(os.urandom(200_000))
        f.flush()
        os.fsync(f.fileno())
    os.rename(m / f"{NAME}dir" / f"{NAME}alpha", m / f"{NAME}dir" / f"{NAME}beta")
    os.symlink(f"{NAME}target", m / f"{NAME}link")
    assert not (m / f"{NAME}missing").exists()
    with pytest.raises(FileExistsError):
        os.open(m / f"{NAME}link", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    volume.umount()
    victim = volume.flip_byte(150_000)
    volume.mount("-v", "-v", *mount_args)
    with pytest.raises(OSError) as ei:
        (m / f"{NAME}dir" / f"{NAME}beta").read_bytes()
    assert ei.value.errno == errno.EIO
    volume.umount()
    return victim.split("/", 1)[1]  # (relative to the volume's prefix, as logged)


@pytest.mark.allow_error_logs
def test_default_log_names_no_file(any_volume: Volume) -> None:
    key = _exercise(any_volume)
    log = any_volume.log
    assert "integrity failure" in log and "lookup: …" in log
    assert NAME not in log, [line for line in log.splitlines() if NAME in line]
    if NAME in key:  # plaintext names: the key is the name, the inode stands for it
        assert "integrity failure: inode " in log
    else:
        assert f"integrity failure: object {key} (inode " in log


@pytest.mark.allow_error_logs
def test_log_names_from_the_config_file(volume: Volume, tmp_path: Path) -> None:
    conf = tmp_path / "vol.toml"
    conf.write_text("log_names = true\n")
    key = _exercise(volume, "--config", str(conf))
    log = volume.log
    assert f"integrity failure: object {key} (inode " in log
    assert f"path /{NAME}dir/{NAME}beta" in log and f"lookup: {NAME}missing" in log
