"""Issue 21, edits in place on a real mount over SeaweedFS: an edit of a big file sends the
segments it touches and has the server copy the others (UploadPartCopy, If-Match the version
replaced); what every tool reads back, after a remount too, is what was written; another
host's change meanwhile makes one conflict copy that holds this host's whole version."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import Volume, cryptfs

pytestmark = pytest.mark.e2e

MiB = 1 << 20
FSYNC = "import os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); os.fsync(fd)"


def _stats(v: Volume) -> dict[str, int]:
    return json.loads(cryptfs("stats", str(v.mnt), "--json").stdout)  # type: ignore[no-any-return]


@pytest.mark.parametrize("versioning", [False, True])
def test_an_append_loop_with_fsync_sends_only_what_changed(
    volume: Volume, tmp_path: Path, versioning: bool
) -> None:
    """A 40 MiB file (segments of 8 MiB), then 5 appends of 300 KB, each fsynced: each
    upload copies the 5 whole segments before the end on the server and sends about one
    segment; with versioning on, each append also fetches at most that segment (not the 40
    MiB); ``cmp`` after each, and after a remount."""
    if versioning:
        _versioning(volume)
    volume.mount()
    want = tmp_path / "want"
    f = volume.mnt / "log"
    subprocess.run(["dd", "if=/dev/urandom", f"of={want}", "bs=1M", "count=40", "status=none"],
                   check=True)  # fmt: skip
    subprocess.run(["cp", str(want), str(f)], check=True)
    subprocess.run([sys.executable, "-c", FSYNC, str(f)], check=True)
    for i in range(5):
        line = os.urandom(300_000)
        with open(want, "ab") as w:
            w.write(line)
        before = _stats(volume)
        with open(f, "ab") as a:
            a.write(line)
            a.flush()
            os.fsync(a.fileno())
        after = _stats(volume)
        copied = after["upload_copied_bytes"] - before["upload_copied_bytes"]
        got = after["s3_bytes_in"] - before["s3_bytes_in"]
        sent = after["s3_bytes_out"] - before["s3_bytes_out"]
        assert copied == 40 * MiB, (i, copied)  # segments 0-4, whole in both versions
        assert sent < 10 * MiB, (i, sent)  # the last segment (and the new bytes), not 40 MiB
        assert got < (9 if versioning else 41) * MiB, (i, got)
        subprocess.run(["cmp", str(want), str(f)], check=True)
    volume.umount()
    volume.mount()
    subprocess.run(["cmp", str(want), str(f)], check=True)
    assert _stats(volume)["integrity_failures"] == 0


def test_two_mounts_editing_one_big_file_make_one_whole_conflict_copy(
    volume: Volume, tmp_path: Path
) -> None:
    """Mount A writes into the middle of a 24 MiB file and holds the upload back; mount B
    replaces the file meanwhile. A's upload copies from the version it edited, If-Match:
    refused, so A's version goes up whole as the one conflict copy (the bytes A did not
    write included: its staged copy holds them), and B's stays under the name."""
    other = tmp_path / "mnt-b"
    other.mkdir()
    b = Volume(volume.url, volume.endpoint, volume.key, other, tmp_path / "cache-b",
               volume.bucket, volume.server)  # fmt: skip
    volume.mount("--writeback-delay", "600")
    try:
        b.mount()
        base = bytearray(os.urandom(24 * MiB + 5))
        (b.mnt / "f").write_bytes(base)
        subprocess.run([sys.executable, "-c", FSYNC, str(b.mnt / "f")], check=True)
        with open(volume.mnt / "f", "r+b") as fa:
            fa.seek(12 * MiB)
            fa.write(b"written on A")
            fa.flush()  # (staged on A, not uploaded: its write-back waits 10 minutes)
            base[12 * MiB : 12 * MiB + 12] = b"written on A"
            theirs = os.urandom(20 * MiB)
            (b.mnt / "f").write_bytes(theirs)
            subprocess.run([sys.executable, "-c", FSYNC, str(b.mnt / "f")], check=True)
            os.fsync(fa.fileno())
        names = sorted(p.name for p in volume.mnt.iterdir())
        assert names[0] == "f" and len(names) == 2 and names[1].startswith("f.conflict-"), names
        assert _stats(volume)["conflicts"] == 1
        b.umount()
        volume.umount()
        volume.mount()
        assert (volume.mnt / "f").read_bytes() == theirs
        assert (volume.mnt / names[1]).read_bytes() == bytes(base)
    finally:
        if b.mounted:
            subprocess.run(["fusermount3", "-u", str(other)], check=False)


def _versioning(v: Volume) -> None:
    v.server.client().put_bucket_versioning(
        Bucket=v.bucket, VersioningConfiguration={"Status": "Enabled"}
    )


def _kill_9(v: Volume) -> None:
    r = subprocess.run(["pgrep", "-f", f"cryptfs mount .*{v.mnt}"], capture_output=True,
                       text=True, check=False)  # fmt: skip
    pids = [int(p) for p in r.stdout.split()]
    assert pids, "daemon not found"
    for p in pids:
        os.kill(p, 9)
    time.sleep(0.5)
    cryptfs("umount", str(v.mnt), check=False)  # ("ended without reporting")
    assert not os.path.ismount(v.mnt)


@pytest.mark.parametrize("replaced", [False, True])
def test_kill_9_with_an_edit_staged_lazily_loses_nothing(
    volume: Volume, tmp_path: Path, replaced: bool
) -> None:
    """With versioning on, an edit of a 24 MiB file is staged as only what was written and
    closed; the daemon is killed (-9) before its upload. The next mount finds the rest by
    the version's id and uploads the whole edit (as a conflict copy if the file was replaced
    meanwhile: nothing lost either way)."""
    _versioning(volume)
    volume.mount("--writeback-delay", "3600")
    data = bytearray(os.urandom(24 * MiB + 3))
    (volume.mnt / "f").write_bytes(data)
    subprocess.run([sys.executable, "-c", FSYNC, str(volume.mnt / "f")], check=True)
    volume.umount()
    volume.mount("--writeback-delay", "3600")  # (nothing of the file staged or cached)
    with open(volume.mnt / "f", "r+b") as fh:
        fh.seek(17 * MiB + 11)
        fh.write(b"edited before the kill")
    data[17 * MiB + 11 : 17 * MiB + 33] = b"edited before the kill"
    _kill_9(volume)
    staged = [p.stat().st_blocks * 512 for p in volume.cache.rglob("staging/*.data")]
    assert staged and max(staged) < MiB, staged  # (one chunk of it on disk: not the file)
    theirs = os.urandom(1000)
    if replaced:  # (by another host: a cache of its own, no journal)
        other = tmp_path / "mnt-b"
        other.mkdir()
        b = Volume(volume.url, volume.endpoint, volume.key, other, tmp_path / "cache-b",
                   volume.bucket, volume.server)  # fmt: skip
        b.mount()
        (b.mnt / "f").write_bytes(theirs)
        b.umount()
    volume.mount()
    assert "recovered staged file" in volume.log
    names = sorted(p.name for p in volume.mnt.iterdir())
    if replaced:
        assert names[0] == "f" and names[1].startswith("f.conflict-"), names
        assert (volume.mnt / "f").read_bytes() == theirs
        assert (volume.mnt / names[1]).read_bytes() == bytes(data)
    else:
        assert names == ["f"]
        assert (volume.mnt / "f").read_bytes() == bytes(data)
