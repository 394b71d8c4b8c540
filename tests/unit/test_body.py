from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cryptfs.crypto import Secret
from cryptfs.errors import IntegrityError, UnsupportedFormat
from cryptfs.format.body import (
    HEADER_SIZE,
    TAG_SIZE,
    BodyCipher,
    Header,
    chunk_count,
    chunk_span,
    chunks_for_range,
    cipher_size,
    plain_size,
)

DATA = Path(__file__).parent.parent / "data"
C = 1 << 12


def _cipher(fid: bytes = b"F" * 16) -> tuple[Secret, BodyCipher]:
    dek = Secret(b"k" * 32)
    return dek, BodyCipher.new(dek, fid, 12)


@pytest.mark.parametrize("size", [0, 1, C - 1, C, C + 1, 3 * C, 3 * C + 17])
def test_roundtrip_and_sizes(size: int) -> None:
    dek, enc = _cipher()
    pt = bytes(range(256)) * (size // 256) + bytes(size % 256)
    body = enc.seal_all(pt)
    assert len(body) == cipher_size(size, C)
    assert plain_size(len(body), C) == size
    dec = BodyCipher.open(dek, body[:HEADER_SIZE])
    assert dec.open_all(body) == pt


def test_empty_file_is_header_plus_one_tag() -> None:
    _, enc = _cipher()
    assert len(enc.seal_all(b"")) == HEADER_SIZE + TAG_SIZE == 108


@given(st.integers(0, 50 * C))
def test_size_formula_inverts(size: int) -> None:
    assert plain_size(cipher_size(size, C), C) == size


@given(st.integers(HEADER_SIZE, HEADER_SIZE + 10 * (C + TAG_SIZE)))
def test_invalid_lengths_rejected_or_consistent(length: int) -> None:
    try:
        size = plain_size(length, C)
    except IntegrityError:
        return
    assert cipher_size(size, C) == length


@given(st.integers(0, 20 * C), st.integers(0, 20 * C), st.integers(1, 3 * C))
def test_chunk_ranges_cover_exactly(size: int, offset: int, length: int) -> None:
    r = chunks_for_range(offset, length, C)
    assert r.start * C <= offset < r.stop * C
    assert (r.stop - 1) * C < offset + length <= r.stop * C
    if offset < size:
        last = chunk_count(size, C) - 1
        off, ln = chunk_span(min(r.stop - 1, last), size, C)
        assert off + ln <= cipher_size(size, C)


def test_wrong_key_caught_by_commitment() -> None:
    _, enc = _cipher()
    body = enc.seal_all(b"secret")
    with pytest.raises(IntegrityError, match="commitment"):
        BodyCipher.open(Secret(b"x" * 32), body[:HEADER_SIZE])


def test_flipped_bit_detected() -> None:
    dek, enc = _cipher()
    body = bytearray(enc.seal_all(b"a" * (2 * C)))
    body[HEADER_SIZE + 5] ^= 1
    with pytest.raises(IntegrityError):
        BodyCipher.open(dek, bytes(body[:HEADER_SIZE])).open_all(bytes(body))


def test_dropped_last_chunk_detected() -> None:
    dek, enc = _cipher()
    body = enc.seal_all(b"a" * (3 * C))
    truncated = body[: HEADER_SIZE + 2 * (C + TAG_SIZE)]
    with pytest.raises(IntegrityError):
        BodyCipher.open(dek, truncated[:HEADER_SIZE]).open_all(truncated)


def test_swapped_chunks_detected() -> None:
    dek, enc = _cipher()
    body = enc.seal_all(b"a" * C + b"b" * C + b"c" * 10)
    s = HEADER_SIZE
    c0, c1 = body[s : s + C + TAG_SIZE], body[s + C + TAG_SIZE : s + 2 * (C + TAG_SIZE)]
    swapped = body[:s] + c1 + c0 + body[s + 2 * (C + TAG_SIZE) :]
    with pytest.raises(IntegrityError):
        BodyCipher.open(dek, swapped[:HEADER_SIZE]).open_all(swapped)


def test_header_of_other_generation_detected() -> None:
    dek, enc1 = _cipher()
    enc2 = BodyCipher.new(dek, b"F" * 16, 12)
    b1, b2 = enc1.seal_all(b"x" * 100), enc2.seal_all(b"x" * 100)
    spliced = b1[:HEADER_SIZE] + b2[HEADER_SIZE:]
    with pytest.raises(IntegrityError):
        BodyCipher.open(dek, spliced[:HEADER_SIZE]).open_all(spliced)


def test_unknown_version_refused() -> None:
    _, enc = _cipher()
    h = bytearray(enc.header_bytes)
    h[7] = 2
    with pytest.raises(UnsupportedFormat):
        Header.parse(bytes(h))


def test_golden_vectors() -> None:
    """Format v1 bodies written by earlier versions keep decrypting byte for byte."""
    vectors = json.loads((DATA / "body_vectors.json").read_text())
    assert vectors
    for v in vectors:
        dek = Secret(bytes.fromhex(v["dek"]))
        commit = BodyCipher.commitment(
            dek, v["chunk_log2"], bytes.fromhex(v["file_id"]), bytes.fromhex(v["salt"])
        )
        header = Header(
            v["chunk_log2"], bytes.fromhex(v["file_id"]), bytes.fromhex(v["salt"]), commit
        )
        body = bytes.fromhex(v["body"])
        assert BodyCipher(dek, header).seal_all(bytes.fromhex(v["plaintext"])) == body
        assert BodyCipher.open(dek, body[:HEADER_SIZE]).open_all(body) == bytes.fromhex(
            v["plaintext"]
        )
