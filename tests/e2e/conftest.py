from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import S3Server


def cryptfs(
    *args: str, check: bool = True, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        [sys.executable, "-m", "cryptfs", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    if check and r.returncode != 0:
        raise AssertionError(f"cryptfs {' '.join(args)} failed ({r.returncode}):\n{r.stderr}")
    return r


@dataclass
class Volume:
    url: str
    endpoint: str
    key: Path
    mnt: Path
    cache: Path
    bucket: str
    server: S3Server
    mounted: bool = field(default=False)

    def try_mount(
        self,
        *key_args: str,
        env: dict[str, str] | None = None,
        check: bool = False,
        endpoint: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Mount with explicit key arguments (a key file or a passphrase file)."""
        return cryptfs(
            "mount", self.url, str(self.mnt), *key_args, "--endpoint-url",
            endpoint or self.endpoint, "--cache-dir", str(self.cache), env=env, check=check,
        )  # fmt: skip

    def mount(self, *extra: str) -> subprocess.CompletedProcess[str]:
        r = self.try_mount(
            "--key-file", str(self.key), "--writeback-delay", "0.5", *extra, check=True
        )
        self.mounted = True
        return r

    def umount(self) -> None:
        cryptfs("umount", str(self.mnt))
        self.mounted = False

    @property
    def log(self) -> str:
        p = self.cache / "cryptfs.log"
        return p.read_text() if p.exists() else ""

    def flip_byte(self, offset: int) -> str:
        """Flip a bit of byte ``offset`` of the (first) object longer than that, as a bucket
        writer could; returns its key."""
        c = self.server.client()
        sizes = {
            k: c.head_object(Bucket=self.bucket, Key=k)["ContentLength"] for k in self.raw_keys()
        }
        victim = next(k for k, s in sizes.items() if s > offset)
        obj = c.get_object(Bucket=self.bucket, Key=victim)
        body = bytearray(obj["Body"].read())
        body[offset] ^= 0x40
        c.put_object(Bucket=self.bucket, Key=victim, Body=bytes(body), Metadata=obj["Metadata"])
        return victim

    def raw_keys(self) -> list[str]:
        c = self.server.client()
        keys = []
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=self.bucket):
            keys += [o["Key"] for o in page.get("Contents", [])]
        return keys


@pytest.fixture
def volume(s3server: S3Server, bucket: str, tmp_path: Path) -> Iterator[Volume]:
    key = tmp_path / "vol.key"
    url = f"s3://{bucket}/data"
    cryptfs(
        "init",
        url,
        "--key-file",
        str(key),
        "--endpoint-url",
        s3server.endpoint,
        "--chunk-size",
        "64K",
    )
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    v = Volume(url, s3server.endpoint, key, mnt, tmp_path / "cache", bucket, s3server)
    try:
        yield v
    finally:
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
            if os.path.ismount(mnt):
                subprocess.run(["fusermount3", "-uz", str(mnt)], check=False)
        log = v.log
        assert "Traceback" not in log, log[-4000:]
        secret = key.read_text().strip() if key.exists() else ""
        assert not secret or secret not in log, "key material in the daemon log"
        if log:
            assert (v.cache / "cryptfs.log").stat().st_mode & 0o077 == 0
