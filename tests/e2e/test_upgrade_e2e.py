"""``cryptfs upgrade`` of a volume written by an earlier cryptfs (the committed golden volume),
over SeaweedFS, through the command line, then used through a real mount."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
from pathlib import Path

import pytest

from tests.conftest import S3Server
from tests.e2e.conftest import Volume, cryptfs

pytestmark = pytest.mark.e2e
DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.mark.allow_error_logs
def test_upgrade_a_revision_1_volume_in_place(
    s3server: S3Server, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CRYPTFS_STATE_DIR", str(tmp_path / "state"))  # golden ids repeat
    golden = json.loads((DATA / "golden_volume_v1_mk.json").read_text())
    raw = s3server.client()
    for key, obj in golden["objects"].items():
        raw.put_object(
            Bucket=bucket,
            Key="up/" + key,
            Body=bytes.fromhex(obj["body"]),
            Metadata=obj["metadata"],
        )
    key = tmp_path / "k"
    key.write_text(golden["key_file"] + "\n")
    key.chmod(0o600)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    vol = Volume(f"s3://{bucket}/up", s3server.endpoint, key, mnt, tmp_path / "c", bucket, s3server)
    files = {p: bytes.fromhex(d) for p, d in golden["files"].items()}

    # this cryptfs mounts the revision-1 volume as it is, and writes revision 1 into it
    vol.mount()
    try:
        for path, data in files.items():
            assert (mnt / path.lstrip("/")).read_bytes() == data
        (mnt / "docs" / "new.txt").write_text("written before the upgrade\n")
    finally:
        vol.umount()
    before = {o["Key"]: o for o in raw.list_objects_v2(Bucket=bucket, Prefix="up/")["Contents"]}
    old_md = {k: raw.head_object(Bucket=bucket, Key=k)["Metadata"] for k in before}
    assert {md.get("cfs") for k, md in old_md.items() if not k.endswith(".json")} == {"1"}

    common = ["--key-file", str(key), "--endpoint-url", s3server.endpoint]
    r = cryptfs("upgrade", vol.url, *common, "--settle", "0")
    assert "bytes downloaded:      0" in r.stdout and "complete" in r.stdout, r.stdout
    after = {o["Key"]: o for o in raw.list_objects_v2(Bucket=bucket, Prefix="up/")["Contents"]}
    assert set(after) == set(before)
    for k in after:
        if not k.endswith(".cryptfs.json"):
            assert raw.head_object(Bucket=bucket, Key=k)["Metadata"]["cfs"] == "2", k
            assert after[k]["Size"] == before[k]["Size"]  # bodies untouched
    cfg = json.loads(raw.get_object(Bucket=bucket, Key="up/.cryptfs.json")["Body"].read())
    # (revision-3 objects and bodies for what is written from now on: FORMAT.md §8.5)
    assert (cfg["cryptfs"], cfg["objects"], cfg["segment_log2"]) == (2, [2, 3], 23)
    assert "file bodies:           revision 3 from now on" in r.stdout, r.stdout
    again = cryptfs("upgrade", vol.url, *common, "--settle", "0")
    assert "complete" in again.stdout

    vol.mount()
    try:
        for path, data in files.items():
            assert (mnt / path.lstrip("/")).read_bytes() == data
        assert (mnt / "docs" / "new.txt").read_text() == "written before the upgrade\n"
        (mnt / "after.txt").write_text("written after\n")
    finally:
        vol.umount()
    revs = {
        raw.head_object(Bucket=bucket, Key=o["Key"])["Metadata"].get("cfs")
        for o in raw.list_objects_v2(Bucket=bucket, Prefix="up/")["Contents"]
        if o["Key"] not in before
    }
    assert revs == {"3"}  # (after.txt: written after the upgrade, at revision 3)

    # an object put back with its metadata from before the upgrade is refused: its entry is
    # left out (an integrity failure) or reads EIO, never its old self
    victim = next(k for k, md in old_md.items() if md.get("cfs-w") == "gcm" and k.count("/") == 1)
    raw.copy_object(
        Bucket=bucket, Key=victim, CopySource={"Bucket": bucket, "Key": victim},
        Metadata=old_md[victim], MetadataDirective="REPLACE",
    )  # fmt: skip
    expect = {
        "hello.txt": files["/hello.txt"],
        "empty": b"",
        "link": b"docs/report.pdf",
        "after.txt": b"written after\n",
    }
    vol.mount()
    try:
        refused, errs = 0, []
        for name, data in expect.items():
            p = mnt / name
            try:
                got = os.readlink(p).encode() if name == "link" else p.read_bytes()
            except FileNotFoundError:
                refused += 1
                continue
            except OSError as e:
                errs.append(e.errno)
                refused += 1
                continue
            assert got == data, name
        assert refused == 1 and set(errs) <= {errno.EIO}
    finally:
        vol.umount()
    # and now a rotation revokes the old key file; the planted object, which authenticates
    # under no key, is named and left as it is (it does not hold the rotation back)
    new = tmp_path / "new.key"
    r = cryptfs("rotate", vol.url, *common, "--to-key-file", str(new), "--settle", "0")
    assert "complete" in r.stdout and "do not authenticate:   1" in r.stdout, r.stdout
    assert victim[len("up/") :] in r.stdout
    rotated = dataclasses.replace(vol, key=new)
    rotated.mount()
    try:
        assert (mnt / "after.txt").read_bytes() == b"written after\n"
        assert (mnt / "docs" / "new.txt").read_text() == "written before the upgrade\n"
    finally:
        rotated.umount()
