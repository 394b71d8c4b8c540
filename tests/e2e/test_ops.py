"""Operations end to end: systemd readiness, the unit file, mount(8)/fstab, config files,
stats and metrics."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_ports
from tests.e2e.conftest import Volume, cryptfs

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _recv(sock: socket.socket, want: str, timeout: float) -> list[str]:
    """Notifications until one contains ``want``."""
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            msg = sock.recv(4096).decode()
        except TimeoutError:
            break
        got.append(msg)
        if want in msg:
            return got
    raise AssertionError(f"no {want!r} within {timeout} s; got {got}")


def test_sd_notify_ready_only_when_live_and_sigterm_flushes(volume: Volume, tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    env = dict(os.environ, NOTIFY_SOCKET=str(path), JOURNAL_STREAM="9:12345")
    errlog = tmp_path / "stderr.log"
    with open(errlog, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cryptfs", "mount", volume.url, str(volume.mnt),
             "--foreground", "--key-file", str(volume.key), "--endpoint-url", volume.endpoint,
             "--cache-dir", str(volume.cache), "--writeback-delay", "30"],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
    try:
        _recv(sock, "READY=1", 60)
        # at READY the mount point is a live cryptfs mount that answers at once
        assert os.path.ismount(volume.mnt)
        t = time.monotonic()
        assert os.listdir(volume.mnt) == []
        assert time.monotonic() - t < 2
        (volume.mnt / "late.txt").write_bytes(b"written just before SIGTERM\n")
        # the 30 s write-back delay has not passed: the upload is still pending
        proc.send_signal(signal.SIGTERM)
        _recv(sock, "STOPPING=1", 30)
        assert proc.wait(60) == 0, errlog.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.close()
    assert not os.path.ismount(volume.mnt)
    r = cryptfs("ls", volume.url, "--key-file", str(volume.key), "--endpoint-url", volume.endpoint)
    assert "late.txt" in r.stdout.split()
    # under systemd (JOURNAL_STREAM) every log line carries a journald priority, no secret
    lines = errlog.read_text().splitlines()
    assert "<6>cryptfs.daemon: mounted" in "\n".join(lines)
    assert lines and all(line[:1] == "<" and line[2:3] == ">" for line in lines), lines
    assert volume.key.read_text().strip() not in errlog.read_text()


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze missing: make system-deps installs the systemd package")
    text = (REPO / "systemd/cryptfs@.service").read_text()
    # verify checks that ExecStart's binary exists: point it at this installation
    assert "ExecStart=/usr/local/bin/cryptfs mount --config %i --foreground" in text
    unit = tmp_path / "cryptfs@demo.service"
    unit.write_text(text.replace("/usr/local/bin/cryptfs", str(BIN / "cryptfs")))
    r = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    out = (r.stdout + r.stderr).strip()
    assert r.returncode == 0 and "cryptfs@demo.service" not in out, out
    assert "LoadCredential=key:" in text and "--key-file" not in text  # no secret in argv
    for line in ("Type=notify", "TimeoutStopSec=15min", "After=network-online.target"):
        assert line in text


@pytest.fixture
def mount_helpers() -> Iterator[None]:
    """/sbin/mount.cryptfs and /sbin/umount.fuse.cryptfs, as an install would put them."""
    made = []
    for name in ("mount.cryptfs", "umount.fuse.cryptfs"):
        target = Path("/sbin") / name
        if not target.exists():
            target.symlink_to(BIN / name)
            made.append(target)
    try:
        yield
    finally:
        for t in made:
            t.unlink()


def test_mount_t_cryptfs_fstab_and_umount_waits(
    volume: Volume, tmp_path: Path, mount_helpers: None
) -> None:
    opts = (
        f"keyfile={volume.key},endpoint={volume.endpoint},cache_dir={volume.cache},"
        "writeback_delay=30,_netdev,nofail"
    )
    r = subprocess.run(
        ["mount", "-t", "cryptfs", volume.url, str(volume.mnt), "-o", opts],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert os.path.ismount(volume.mnt)
    (volume.mnt / "via-mount-t").write_bytes(b"x" * 100_000)
    # umount(8) runs umount.fuse.cryptfs, which returns only after the upload (30 s delay)
    r = subprocess.run(["umount", str(volume.mnt)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert not os.path.ismount(volume.mnt)
    ls = cryptfs("ls", volume.url, "-l", "--key-file", str(volume.key),
                 "--endpoint-url", volume.endpoint).stdout  # fmt: skip
    assert "via-mount-t" in ls and "100000" in ls

    fstab = tmp_path / "fstab"
    fstab.write_text(f"# test fstab\n{volume.url}  {volume.mnt}  cryptfs  {opts}  0 0\n")
    r = subprocess.run(
        ["mount", "--fstab", str(fstab), str(volume.mnt)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    try:
        assert (volume.mnt / "via-mount-t").read_bytes() == b"x" * 100_000
    finally:
        subprocess.run(["umount", str(volume.mnt)], check=True, timeout=120)


def test_config_file_stats_and_metrics(volume: Volume, tmp_path: Path) -> None:
    port = free_ports(1)[0]
    conf = tmp_path / "vol.toml"
    conf.write_text(
        f'location = "{volume.url}"\nmountpoint = "{volume.mnt}"\nkey_file = "vol.key"\n'
        f'endpoint_url = "{volume.endpoint}"\ncache_dir = "{volume.cache}"\n'
        f'writeback_delay = 0.2\nmetrics_address = "127.0.0.1:{port}"\n'
    )
    cryptfs("mount", "--config", str(conf))
    volume.mounted = True
    try:
        for i in range(5):
            (volume.mnt / f"f{i}").write_bytes(os.urandom(20_000))
        deadline = time.monotonic() + 30
        while True:
            snap = json.loads(cryptfs("stats", str(volume.mnt), "--json").stdout)
            if snap["uploads"] >= 5 and snap["pending_files"] == 0:
                break
            assert time.monotonic() < deadline, snap
            time.sleep(0.2)
        assert snap["upload_bytes"] == 100_000 and snap["s3_requests"] > 5
        assert snap["integrity_failures"] == 0 and snap["location"].rstrip("/") == volume.url
        human = cryptfs("stats", str(volume.mnt)).stdout
        assert "pending uploads     0 file(s)" in human and "hit rate" in human
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        text = body.decode()
        assert f'cryptfs_uploads_total{{mountpoint="{volume.mnt}"}} 5.0' in text
        assert "# TYPE cryptfs_pending_files gauge" in text
        # histograms of S3 requests and FUSE operations (prometheus-client), a hit ratio
        assert 'cryptfs_s3_request_seconds_count{op="put"}' in text
        assert 'cryptfs_fuse_op_seconds_bucket{le="0.005",op="write"}' in text
        assert f'cryptfs_cache_hit_ratio{{mountpoint="{volume.mnt}"}}' in text
    finally:
        volume.umount()
    # a wrong key in the file is named
    conf.write_text(conf.read_text() + "writeback_dealy = 3\n")
    r = cryptfs("mount", "--config", str(conf), check=False)
    assert r.returncode == 1 and "writeback_dealy" in r.stderr
