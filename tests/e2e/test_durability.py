"""Durability end to end: two hosts on one bucket, a full cache disk, an S3 outage mid-copy."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import S3Server, restart_seaweed, start_seaweed, stop_seaweed
from tests.e2e.conftest import Volume, cryptfs

pytestmark = pytest.mark.e2e


def _wait_for(pred, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def _pending(mnt: Path) -> int:
    import json

    return int(json.loads(cryptfs("stats", str(mnt), "--json").stdout)["pending_files"])


@pytest.mark.allow_error_logs
def test_two_mounts_see_each_other_and_never_lose_a_write(volume: Volume, tmp_path: Path) -> None:
    mnt_b = tmp_path / "mnt-b"
    mnt_b.mkdir()
    b = Volume(volume.url, volume.endpoint, volume.key, mnt_b, tmp_path / "cache-b",
               volume.bucket, volume.server)  # fmt: skip
    fast = ("--writeback-delay", "0.2", "--metadata-ttl", "1")
    volume.try_mount("--key-file", str(volume.key), *fast, check=True)
    volume.mounted = True
    b.try_mount("--key-file", str(volume.key), *fast, check=True)
    b.mounted = True
    a_file, b_file = volume.mnt / "shared.txt", mnt_b / "shared.txt"
    try:
        a_file.write_text("one\n")
        _wait_for(lambda: _pending(volume.mnt) == 0, 30, "the upload from A")
        # B sees the new file within the metadata TTL
        _wait_for(lambda: b_file.exists() and b_file.read_text() == "one\n", 10, "B to see it")
        b_file.write_text("two, from B\n")
        _wait_for(lambda: _pending(mnt_b) == 0, 30, "the upload from B")
        # stat alone (the kernel keeps attributes as long as the metadata TTL, no longer)
        _wait_for(lambda: a_file.stat().st_size == 12, 10, "A's stat to see B's size")
        _wait_for(lambda: a_file.read_text() == "two, from B\n", 10, "A to see B's change")
        (volume.mnt / "short-lived").write_text("x")
        _wait_for(lambda: (mnt_b / "short-lived").exists(), 10, "B to see a new file")
        os.unlink(mnt_b / "short-lived")
        _wait_for(lambda: _pending(mnt_b) == 0, 30, "the removal from B")
        _wait_for(lambda: not (volume.mnt / "short-lived").exists(), 10, "A to see it gone")

        # both change the same file before either has seen the other's version
        fa = os.open(a_file, os.O_WRONLY | os.O_TRUNC)
        fb = os.open(b_file, os.O_WRONLY | os.O_TRUNC)
        os.write(fa, b"three, from A\n")
        os.write(fb, b"three, from B\n")
        os.close(fa)
        os.close(fb)
        _wait_for(lambda: _pending(volume.mnt) == 0 and _pending(mnt_b) == 0, 30, "uploads")
        time.sleep(1.5)  # past the metadata TTL: both see the final listing

        def versions(mnt: Path) -> dict[str, str]:
            return {n: (mnt / n).read_text() for n in sorted(os.listdir(mnt))}

        va, vb = versions(volume.mnt), versions(mnt_b)
        assert va == vb, (va, vb)
        conflicts = [n for n in va if n.startswith("shared.txt.conflict-")]
        assert len(conflicts) == 1, va
        # neither write is lost: one holds the name, the other the conflict copy
        assert {va["shared.txt"], va[conflicts[0]]} == {"three, from A\n", "three, from B\n"}
    finally:
        for v in (volume, b):
            if v.mounted:
                v.umount()
    assert "conflict" in volume.log + b.log


def _write_mib(path: Path, mib: int) -> None:
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(1 << 20))
            f.flush()


@pytest.fixture
def small_cache_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs as the cache disk."""
    d = tmp_path / "smallcache"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(d)], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


def test_full_cache_disk_gives_enospc_and_corrupts_nothing(
    volume: Volume, small_cache_fs: Path, tmp_path: Path
) -> None:
    volume.cache = small_cache_fs
    extra = ("--writeback-delay", "30", "--log-file", str(tmp_path / "daemon.log"))
    volume.try_mount("--key-file", str(volume.key), *extra, check=True)
    volume.mounted = True
    keep = {f"k{i}": os.urandom(100_000) for i in range(5)}
    try:
        for name, data in keep.items():
            (volume.mnt / name).write_bytes(data)
        # a file bigger than the cache disk: the writer gets ENOSPC
        with pytest.raises(OSError) as exc:
            _write_mib(volume.mnt / "huge", 16)
        assert exc.value.errno == errno.ENOSPC
        os.unlink(volume.mnt / "huge")
        # the mount still works and what was written before is intact
        (volume.mnt / "after").write_bytes(b"still fine")
        for name, data in keep.items():
            assert (volume.mnt / name).read_bytes() == data
    finally:
        volume.umount()
    volume.cache = tmp_path / "cache2"
    volume.mount()
    try:
        for name, data in keep.items():
            assert (volume.mnt / name).read_bytes() == data
        assert (volume.mnt / "after").read_bytes() == b"still fine"
        assert not (volume.mnt / "huge").exists()
    finally:
        volume.umount()


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[S3Server]:
    server = start_seaweed(tmp_path / "own-s3")
    try:
        yield server
    finally:
        stop_seaweed(server)


@pytest.mark.allow_error_logs
def test_s3_outage_mid_copy_loses_nothing(own_server: S3Server, tmp_path: Path) -> None:
    own_server.client().create_bucket(Bucket="outage")
    key, url = tmp_path / "k", "s3://outage/vol"
    cryptfs("init", url, "--key-file", str(key), "--endpoint-url", own_server.endpoint)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    vol = Volume(url, own_server.endpoint, key, mnt, tmp_path / "cache", "outage", own_server)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):
        (src / f"f{i:02d}").write_bytes(os.urandom(50_000 + i))
    # few attempts per request keep the outage part of this test short
    vol.try_mount("--key-file", str(key), "--writeback-delay", "0.1", "--s3-attempts", "2",
                  check=True)  # fmt: skip
    vol.mounted = True
    try:
        (mnt / "before").write_bytes(b"uploaded before the outage")
        _wait_for(lambda: _pending(mnt) == 0, 30, "the first upload")
        (mnt / "tree").mkdir()
        names = sorted(os.listdir(src))
        first, second = names[:20], names[20:]
        subprocess.run(["cp", "-a", *(str(src / n) for n in first), str(mnt / "tree")], check=True)
        _wait_for(lambda: _pending(mnt) == 0, 30, "the first half to upload")
        stop_seaweed(own_server)  # the server goes away in the middle of the copy
        # the rest of the copy: writes are staged locally, cp itself never notices
        subprocess.run(["cp", "-a", *(str(src / n) for n in second), str(mnt / "tree")],
                       check=True, timeout=120)  # fmt: skip
        time.sleep(1)  # past the write-back delay: the uploads are failing now
        assert _pending(mnt) >= len(second)
        # a read that needs S3 fails with EIO in bounded time, it does not hang
        with contextlib.suppress(OSError):
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
        t = time.monotonic()
        with pytest.raises(OSError) as exc:
            (mnt / "before").read_bytes()
        assert exc.value.errno == errno.EIO and time.monotonic() - t < 120
        # unmounting during the outage: a clear report, exit 3, everything kept staged
        r = cryptfs("umount", str(mnt), check=False, timeout=300)
        vol.mounted = False
        assert r.returncode == 3 and "stay staged" in r.stderr, r.stderr
        assert all(f"{mnt}/tree/{n}\n" in r.stderr for n in second[:10]), r.stderr  # named
        assert not os.path.ismount(mnt)
        restart_seaweed(own_server)
    finally:
        if own_server.proc.poll() is not None:
            restart_seaweed(own_server)
        if vol.mounted:
            vol.umount()
    vol.mount()  # the next mount uploads what the outage left staged, before it answers
    assert vol.log.count("recovered staged file") >= len(second)
    try:
        r = subprocess.run(["diff", "-r", str(src), str(mnt / "tree")], capture_output=True)
        assert r.returncode == 0, r.stdout[-2000:]
        assert (mnt / "before").read_bytes() == b"uploaded before the outage"
    finally:
        vol.umount()
    # and the volume checks clean, content included (no leftovers of the outage)
    opts = ["--key-file", str(key), "--endpoint-url", own_server.endpoint]
    r = cryptfs("fsck", url, "--full", "--upload-age", "0", "--cache-dir", str(vol.cache), *opts)
    assert r.returncode == 0 and r.stdout.strip().endswith("clean"), r.stdout
    assert "files: 41" in r.stdout


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_memory_stays_bounded_with_many_open_files(volume: Volume) -> None:
    r = volume.mount()
    pid = int(r.stdout.rsplit("(pid ", 1)[1].split(")")[0])
    try:
        d = volume.mnt / "many"
        d.mkdir()
        for i in range(600):
            (d / f"f{i:04d}").write_bytes(os.urandom(400_000))
        _wait_for(lambda: _pending(volume.mnt) == 0, 120, "the uploads")
        with contextlib.suppress(OSError):
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
        before = _rss_mib(pid)
        fds = [os.open(d / f"f{i:04d}", os.O_RDONLY) for i in range(600)]
        try:
            for fd in fds:  # every file open at once, all read from S3
                assert len(os.read(fd, 500_000)) == 400_000
            during = _rss_mib(pid)
        finally:
            for fd in fds:
                os.close(fd)
        # 240 MB were read: the decrypted-chunk cache is bounded (64 MiB), the rest is
        # per-file bookkeeping; RSS must not grow with the bytes read
        assert during - before < 110, (before, during)
    finally:
        volume.umount()


@pytest.mark.allow_error_logs
def test_an_outage_mid_multipart_upload_leaves_no_upload_open(
    volume: Volume, tmp_path: Path
) -> None:
    """S3 answers 503 to everything for 15 s in the middle of a 200 MiB file's multipart
    upload (its parts and its abort fail): the file is uploaded intact once S3 is back, and
    the upload the outage left open is aborted by the running mount (issue 18: it stayed open
    in the bucket, billed, until someone aborted it)."""
    from tests.faults import FaultProxy

    src = tmp_path / "big"
    src.write_bytes(os.urandom(200 << 20))
    client = volume.server.client()

    def open_uploads() -> list[dict[str, object]]:
        return client.list_multipart_uploads(Bucket=volume.bucket).get("Uploads", [])

    with FaultProxy(volume.endpoint).running() as proxy:
        volume.try_mount("--key-file", str(volume.key), "--writeback-delay", "0.1",
                         "--s3-attempts", "2", endpoint=proxy.endpoint, check=True)  # fmt: skip
        volume.mounted = True
        subprocess.run(["cp", str(src), str(volume.mnt / "big")], check=True)
        _wait_for(open_uploads, 60, "the multipart upload to begin")
        proxy.fail_next(100_000, 503, b"<Error><Code>ServiceUnavailable</Code></Error>")
        time.sleep(15)  # the outage
        with proxy._lock:
            proxy._faults.clear()
        assert "upload of" in volume.log and "retrying" in volume.log  # the outage hit it
        _wait_for(lambda: _pending(volume.mnt) == 0, 180, "the upload after the outage")
        _wait_for(lambda: not open_uploads(), 60, "the upload left open to be aborted")
        assert "aborted multipart upload" in volume.log
        volume.umount()
    volume.mount()
    try:
        r = subprocess.run(["cmp", str(src), str(volume.mnt / "big")], capture_output=True)
        assert r.returncode == 0, r.stdout
    finally:
        volume.umount()
    assert open_uploads() == []
