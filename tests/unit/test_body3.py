"""Body revision 3 (docs/FORMAT.md §8.5): its arithmetic, and every mix of parts the design
says a reader refuses, attacked here (on a mount: tests/unit/test_trust.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cryptfs.crypto import Secret, random_bytes
from cryptfs.errors import IntegrityError
from cryptfs.format import body3 as b3

C = 4096  # chunk
S = 4 * C  # segment: four chunks (8 MiB and 64 KiB in a volume; small here)
VOL, FID, GEN = b"v" * 16, b"f" * 16, b"g" * 32
DEK = Secret(b"d" * 32)
DATA = Path(__file__).resolve().parents[1] / "data"
SIZES = [0, 1, C - 1, C, C + 1, S - 1, S, S + 1, 2 * S, 3 * S + 5, 5 * S - 1]


def body(data: bytes, dek: Secret = DEK, fid: bytes = FID, gen: bytes = GEN) -> bytes:
    return b3.seal_body(dek, VOL, fid, gen, data, 123, S, C)


def read(raw: bytes, dek: Secret = DEK, fid: bytes = FID, gen: bytes = GEN) -> bytes:
    return b3.open_body(dek, VOL, fid, gen, raw, S, C)[0]


@pytest.mark.parametrize("size", SIZES)
def test_sizes_and_lengths_are_one_to_one(size: int) -> None:
    data = random_bytes(size)
    raw = body(data)
    assert len(raw) == b3.body_size(size, S, C)
    assert b3.plain_size(len(raw), S, C) == (b3.segments_of(size, S), size)
    assert read(raw) == data


def test_no_other_length_is_a_body() -> None:
    valid = {b3.body_size(n, S, C) for n in range(0, 6 * S + 1)}
    for length in range(min(valid) - 50, max(valid) + 1):
        if length in valid:
            assert b3.body_size(b3.plain_size(length, S, C)[1], S, C) == length
        else:
            with pytest.raises(IntegrityError):
                b3.plain_size(length, S, C)


def test_a_reader_of_one_chunk_fetches_the_table_and_that_chunk() -> None:
    data = random_bytes(3 * S + 5)
    raw = body(data)
    manifest = b3.open_trailer(DEK, VOL, FID, GEN, raw[-4096:], len(raw), S, C)
    j, k, i = 1, 4, 2
    start = b3.segment_offset(j, S, C)
    head = raw[start : start + b3.SEG_HEADER_SIZE + b3.HASH_SIZE * k]
    reader = b3.SegmentReader(FID, j, manifest.entries[j], head, k)
    off = start + b3.chunk_offset(i, k, C)
    got = reader.open_chunk(i, raw[off : off + C + 16])
    assert got == data[j * S + i * C : j * S + (i + 1) * C]


def _segments(raw: bytes, size: int) -> tuple[list[bytes], bytes]:
    n = b3.segments_of(size, S)
    full = b3.segment_size(S, C)
    segs = [raw[j * full : (j + 1) * full] for j in range(n - 1)]
    segs.append(raw[(n - 1) * full : len(raw) - b3.trailer_size(n)])
    return segs, raw[len(raw) - b3.trailer_size(n) :]


def test_mixed_parts_read_eio() -> None:
    data = random_bytes(3 * S)
    v1 = body(data)
    v2 = body(data[:S] + random_bytes(S) + data[2 * S :])  # another version of this file
    other = body(data, fid=b"o" * 16)  # the same bytes in another file
    s1, t1 = _segments(v1, len(data))
    s2, t2 = _segments(v2, len(data))
    so, _ = _segments(other, len(data))
    attacks = {
        "a segment of another version at its index": s2[0] + s1[1] + s2[2] + t2,
        "a segment of another file": so[0] + s2[1] + s2[2] + t2,
        "two segments swapped": s2[1] + s2[0] + s2[2] + t2,
        "a segment dropped": s2[0] + s2[2] + t2,
        "a segment duplicated": s2[0] + s2[1] + s2[1] + s2[2] + t2,
        "another version's trailer": s2[0] + s2[1] + s2[2] + t1,
        "cut at a segment": s2[0] + s2[1] + t2,
        "a flipped bit": s2[0] + s2[1][:200] + bytes([s2[1][200] ^ 1]) + s2[1][201:] + s2[2] + t2,
    }
    assert read(s2[0] + s2[1] + s2[2] + t2)  # (the parts as written read)
    for what, raw in attacks.items():
        with pytest.raises(IntegrityError):
            read(raw)
        assert what


def test_a_holder_of_an_old_data_key_cannot_forge_a_copied_segment() -> None:
    """Version 2 keeps segment 0 of version 1 (a copy: its key is in both manifests). The
    holder of version 1's data key knows that key and seals a chunk of their own under it,
    with the right nonce and AAD: GCM accepts it, the hash table pinned by version 2's
    manifest does not (FORMAT.md §8.5: what the design review found)."""
    data = random_bytes(2 * S)
    v1_seg0, entry0 = b3.seal_segment(FID, 0, data[:S], C)
    v2_seg1, entry1 = b3.seal_segment(FID, 1, random_bytes(S), C)
    dek2 = Secret(random_bytes(32))
    trailer2 = b3.seal_trailer(dek2, VOL, FID, GEN, b3.Manifest(2 * S, 1, (entry0, entry1)))
    v2 = v1_seg0 + v2_seg1 + trailer2
    assert b3.open_body(dek2, VOL, FID, GEN, v2, S, C)[0][:S] == data[:S]
    # the old DEK's holder: version 1's manifest gives them entry0.key
    key, _ = b3._segment_keys(entry0.key, entry0.salt)
    from cryptfs.crypto import Aead

    aad = v1_seg0[: b3.SEG_HEADER_SIZE] + (4).to_bytes(4, "big")
    forged = Aead(key).seal(b3._nonce(1, False), b"EVIL" * (C // 4), aad)
    off = b3.chunk_offset(1, 4, C)
    bad = v2[:off] + forged + v2[off + len(forged) :]
    with pytest.raises(IntegrityError, match="not the one its table names"):
        b3.open_body(dek2, VOL, FID, GEN, bad, S, C)
    # and with a table rewritten to match, the table is not the one the manifest pins
    table_at = b3.SEG_HEADER_SIZE + b3.HASH_SIZE
    from cryptfs.crypto import sha256

    bad2 = bad[:table_at] + sha256(forged) + bad[table_at + b3.HASH_SIZE :]
    with pytest.raises(IntegrityError, match="manifest names"):
        b3.open_body(dek2, VOL, FID, GEN, bad2, S, C)


def test_a_reader_of_the_trailer_alone_refuses_an_extended_object() -> None:
    """A reader that fetches the trailer and then single chunks never reads the whole object:
    the trailer is checked against the object's length (the review of this module found
    1,000 bytes put before an intact trailer accepted there)."""
    raw = body(random_bytes(2 * S + 7))
    n = b3.segments_of(2 * S + 7, S)
    cut = len(raw) - b3.trailer_size(n)
    for bad in (raw[:cut] + bytes(1000) + raw[cut:], raw[: cut - 100] + raw[cut:]):
        with pytest.raises(IntegrityError):
            b3.open_trailer(DEK, VOL, FID, GEN, bad[-4096:], len(bad), S, C)
    assert b3.open_trailer(DEK, VOL, FID, GEN, raw[-4096:], len(raw), S, C).size == 2 * S + 7


def test_wrong_keys_and_contexts() -> None:
    raw = body(b"x" * (S + 3))
    with pytest.raises(IntegrityError, match="commitment"):
        read(raw, dek=Secret(b"e" * 32))
    with pytest.raises(IntegrityError):
        read(raw, gen=b"h" * 32)  # another version's gen in the metadata
    with pytest.raises(IntegrityError):
        read(raw, fid=b"o" * 16)


def test_golden_vector() -> None:
    """Bytes written once (tests/data/body3_vectors.json) keep reading; the reference
    decryptor reads them from FORMAT.md §8.5 alone (test_reference_decryptor.py)."""
    v = json.loads((DATA / "body3_vectors.json").read_text())
    raw = bytes.fromhex(v["body"])
    got, manifest = b3.open_body(
        Secret(bytes.fromhex(v["dek"])), bytes.fromhex(v["volume_id"]),
        bytes.fromhex(v["file_id"]), bytes.fromhex(v["gen"]), raw, v["segment"], v["chunk"],
    )  # fmt: skip
    assert got == bytes.fromhex(v["plaintext"]) and manifest.mtime_ns == v["mtime_ns"]
