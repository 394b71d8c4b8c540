"""docs/FORMAT.md is the spec: an independent decryptor written from it alone
(tests/reference_decryptor.py, no cryptfs imports) reads the golden data byte for byte."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from tests import reference_decryptor as ref

DATA = Path(__file__).resolve().parents[1] / "data"


def test_reference_decryptor_imports_nothing_of_cryptfs() -> None:
    text = (Path(ref.__file__)).read_text()
    assert "import cryptfs" not in text and "from cryptfs" not in text


def test_body_vectors() -> None:
    for v in json.loads((DATA / "body_vectors.json").read_text()):
        plain, file_id, salt = ref.decrypt_body(
            bytes.fromhex(v["body"]), bytes.fromhex(v["dek"]), int(v["chunk_log2"])
        )
        assert plain == bytes.fromhex(v["plaintext"])
        assert (file_id.hex(), salt.hex()) == (v["file_id"], v["salt"])


@pytest.mark.parametrize(
    "name",
    [
        "golden_volume_v1.json",
        "golden_volume_v1_mk.json",
        "golden_volume_v2.json",
        "golden_volume_v2_special.json",
        "golden_volume_v3_bodies.json",
        "golden_volume_v3_pinned.json",
    ],
)
def test_golden_volumes(name: str) -> None:
    golden = json.loads((DATA / name).read_text())
    objects = {
        k: (bytes.fromhex(o["body"]), dict(o["metadata"])) for k, o in golden["objects"].items()
    }
    tree = ref.decrypt_volume(objects, ref.b64u(golden["key_file"]))
    for path, data in golden["files"].items():
        entry = tree[path.encode()]
        assert entry["data"] == bytes.fromhex(data), path
        assert (entry["mode"] & 0o7777, entry["attrs"]["u"], entry["attrs"]["mt"]) == (
            0o640,
            1000,
            1_700_000_000_123_456_789,
        )
    assert tree[b"/link"]["data"] == b"docs/report.pdf"
    assert tree[b"/docs"]["mode"] & 0o7777 == 0o750
    assert set(tree) >= {b"/", b"/docs", b"/link"}
    if "pinned" in name:  # (FORMAT.md §8.5, "Pinned bodies": every file and symlink, checked)
        assert all("bp" in e["attrs"] for e in tree.values() if e["attrs"]["t"] in "fl")


def test_special_files_from_the_document_alone() -> None:
    """FORMAT.md §7.9: FIFOs, devices and sockets, with a device's number."""
    golden = json.loads((DATA / "golden_volume_v2_special.json").read_text())
    objects = {
        k: (bytes.fromhex(o["body"]), dict(o["metadata"])) for k, o in golden["objects"].items()
    }
    tree = ref.decrypt_volume(objects, ref.b64u(golden["key_file"]))
    got = {p: (e["mode"], e["rdev"], e["data"]) for p, e in tree.items() if p.count(b"/") == 2}
    assert got[b"/docs/fifo"] == (stat.S_IFIFO | 0o640, 0, b"")
    assert got[b"/docs/tty"] == (stat.S_IFCHR | 0o620, os.makedev(4, 64), b"")
    assert got[b"/docs/disk"] == (stat.S_IFBLK | 0o660, os.makedev(8, 1), b"")
    assert got[b"/docs/socket"] == (stat.S_IFSOCK | 0o755, 0, b"")


@pytest.mark.parametrize("name", ["golden_volume_v1_mk.json", "golden_volume_v2.json"])
def test_tampering_is_caught_by_the_reference_too(name: str) -> None:
    golden = json.loads((DATA / name).read_text())
    objects = {
        k: (bytes.fromhex(o["body"]), dict(o["metadata"])) for k, o in golden["objects"].items()
    }
    victim = next(k for k, (b, md) in objects.items() if len(b) > 5000)
    body, md = objects[victim]
    objects[victim] = (body[:-1] + bytes([body[-1] ^ 1]), md)
    with pytest.raises(ref.Invalid):
        ref.decrypt_volume(objects, ref.b64u(golden["key_file"]))


def test_revision_2_metadata_is_bound_to_the_key_and_the_wrapping() -> None:
    """§7.3: moving an object, or changing the data key it names, fails in the reference."""
    golden = json.loads((DATA / "golden_volume_v2.json").read_text())
    objects = {
        k: (bytes.fromhex(o["body"]), dict(o["metadata"])) for k, o in golden["objects"].items()
    }
    key = ref.b64u(golden["key_file"])
    files = [k for k, (b, md) in objects.items() if md.get("cfs-w") == "gcm"]
    a, b = files[0], files[1]
    swapped = dict(objects)
    swapped[a] = (objects[a][0], dict(objects[a][1], **{"cfs-k": objects[b][1]["cfs-k"]}))
    with pytest.raises(ref.Invalid):
        ref.decrypt_volume(swapped, key)
    for field in ("cfs-kid", "cfs-w", "cfs-m"):
        changed = dict(objects)
        changed[a] = (objects[a][0], dict(objects[a][1], **{field: "x"}))
        with pytest.raises(ref.Invalid):
            ref.decrypt_volume(changed, key)


def test_body_revision_3_from_the_document_alone() -> None:
    """FORMAT.md §8.5 (a design: cryptfs does not write it yet) is complete enough to
    decrypt its golden vector without cryptfs."""
    v = json.loads((DATA / "body3_vectors.json").read_text())
    got, mtime = ref.decrypt_body3(
        bytes.fromhex(v["body"]), bytes.fromhex(v["dek"]), bytes.fromhex(v["volume_id"]),
        bytes.fromhex(v["file_id"]), bytes.fromhex(v["gen"]), v["segment"], v["chunk"],
    )  # fmt: skip
    assert got == bytes.fromhex(v["plaintext"]) and mtime == v["mtime_ns"]
    tampered = bytearray.fromhex(v["body"])
    tampered[200] ^= 1
    with pytest.raises(ref.Invalid):
        ref.decrypt_body3(
            bytes(tampered), bytes.fromhex(v["dek"]), bytes.fromhex(v["volume_id"]),
            bytes.fromhex(v["file_id"]), bytes.fromhex(v["gen"]), v["segment"], v["chunk"],
        )  # fmt: skip
