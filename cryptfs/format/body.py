"""Object body format v1: a 92-byte header, then AES-256-GCM chunks (docs/FORMAT.md §2).

Owns: header layout, key derivation for one body generation, chunk sealing/opening, and the
offset arithmetic between plaintext and ciphertext.  Pure and synchronous.
Must not import: store, fs, fuse.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cryptfs.crypto import (
    Aead,
    Secret,
    constant_time_eq,
    hkdf_expand,
    hkdf_extract,
    random_bytes,
    sha256,
)
from cryptfs.errors import IntegrityError, UnsupportedFormat

MAGIC = b"CRYPTFS"
VERSION = 1
SUITE_AES256GCM_HKDF_SHA256 = 1
HEADER_SIZE = 92
TAG_SIZE = 16
FILE_ID_SIZE = 16
SALT_SIZE = 32
MIN_CHUNK_LOG2 = 12
MAX_CHUNK_LOG2 = 24
_MAX_CHUNKS = 1 << 88

_HEADER = struct.Struct(">7sBBBH16s32s32s")
assert _HEADER.size == HEADER_SIZE


PIN_MAX = 4 << 20  # a §2 body is pinned by a rotation only up to this many stored bytes
PIN_LABEL = b"cryptfs/v2/pin\0"


def body_pin(body: bytes | memoryview) -> bytes:
    """A §2 body's pin (FORMAT.md §8.5, "Pinned bodies"): SHA-256 of a label and every
    stored byte; a reader of a pinned body fetches it whole and checks it first."""
    return sha256(PIN_LABEL + bytes(body))


def check_chunk_log2(chunk_log2: int) -> None:
    if not MIN_CHUNK_LOG2 <= chunk_log2 <= MAX_CHUNK_LOG2:
        raise UnsupportedFormat(f"chunk size 2^{chunk_log2} outside 2^12..2^24")


# --- offset arithmetic (pure, named, tested exhaustively) --------------------------------


def chunk_count(plain_size: int, chunk: int) -> int:
    """Number of chunks in a body; an empty file has exactly one (empty, final) chunk."""
    return max(1, -(-plain_size // chunk))


def cipher_size(plain_size: int, chunk: int) -> int:
    return HEADER_SIZE + plain_size + TAG_SIZE * chunk_count(plain_size, chunk)


def plain_size(cipher_len: int, chunk: int) -> int:
    """Plaintext size from an object's length alone (LIST gives it without a HEAD)."""
    body = cipher_len - HEADER_SIZE
    if body == TAG_SIZE:
        return 0
    rem = body % (chunk + TAG_SIZE)
    if body < TAG_SIZE or 1 <= rem <= TAG_SIZE:
        raise IntegrityError(f"object length {cipher_len} is not a valid v1 body length")
    n = -(-body // (chunk + TAG_SIZE))
    return body - TAG_SIZE * n


def chunk_span(index: int, plain: int, chunk: int) -> tuple[int, int]:
    """(offset, length) of chunk ``index``'s ciphertext inside the object."""
    n = chunk_count(plain, chunk)
    if not 0 <= index < n:
        raise ValueError(f"chunk {index} outside 0..{n - 1}")
    pt_len = min(chunk, plain - index * chunk) if plain else 0
    return HEADER_SIZE + index * (chunk + TAG_SIZE), pt_len + TAG_SIZE


def chunks_for_range(offset: int, length: int, chunk: int) -> range:
    """Chunk indexes covering plaintext bytes [offset, offset+length)."""
    if length <= 0:
        return range(0)
    return range(offset // chunk, (offset + length - 1) // chunk + 1)


# --- header and keys ---------------------------------------------------------------------


@dataclass(frozen=True)
class Header:
    chunk_log2: int
    file_id: bytes
    salt: bytes
    commitment: bytes

    @property
    def chunk(self) -> int:
        return 1 << self.chunk_log2

    def pack(self) -> bytes:
        return _HEADER.pack(
            MAGIC,
            VERSION,
            SUITE_AES256GCM_HKDF_SHA256,
            self.chunk_log2,
            0,
            self.file_id,
            self.salt,
            self.commitment,
        )

    @classmethod
    def parse(cls, data: bytes) -> Header:
        if len(data) < HEADER_SIZE:
            raise IntegrityError("object shorter than the v1 header")
        magic, version, suite, log2, reserved, fid, salt, commit = _HEADER.unpack(
            data[:HEADER_SIZE]
        )
        if magic != MAGIC:
            raise IntegrityError("not a cryptfs object (bad magic)")
        if version != VERSION or suite != SUITE_AES256GCM_HKDF_SHA256:
            raise UnsupportedFormat(f"body version {version} suite {suite} not supported")
        if reserved != 0:
            raise IntegrityError("reserved header bytes are not zero")
        check_chunk_log2(log2)
        return cls(log2, fid, salt, commit)


def _info(chunk_log2: int, file_id: bytes, purpose: bytes) -> bytes:
    return b"cryptfs/v1" + bytes([SUITE_AES256GCM_HKDF_SHA256, chunk_log2]) + file_id + purpose


class BodyCipher:
    """Seals or opens the chunks of one body generation (one salt)."""

    __slots__ = ("_aead", "chunk", "header", "header_bytes")

    def __init__(self, dek: Secret, header: Header) -> None:
        self.header = header
        self.header_bytes = header.pack()
        self.chunk = header.chunk
        prk = hkdf_extract(header.salt, dek)
        self._aead = Aead(hkdf_expand(prk, _info(header.chunk_log2, header.file_id, b"/content")))

    @staticmethod
    def commitment(dek: Secret, chunk_log2: int, file_id: bytes, salt: bytes) -> bytes:
        prk = hkdf_extract(salt, dek)
        return hkdf_expand(prk, _info(chunk_log2, file_id, b"/commit")).reveal()

    @classmethod
    def new(cls, dek: Secret, file_id: bytes, chunk_log2: int) -> BodyCipher:
        """A fresh generation: new random salt, so nonces never repeat under one key."""
        check_chunk_log2(chunk_log2)
        salt = random_bytes(SALT_SIZE)
        commit = cls.commitment(dek, chunk_log2, file_id, salt)
        return cls(dek, Header(chunk_log2, file_id, salt, commit))

    @classmethod
    def open(cls, dek: Secret, header_bytes: bytes) -> BodyCipher:
        """Parse a header and check the key commitment before any decryption."""
        header = Header.parse(header_bytes)
        expect = cls.commitment(dek, header.chunk_log2, header.file_id, header.salt)
        if not constant_time_eq(expect, header.commitment):
            raise IntegrityError("key commitment mismatch (wrong data key or swapped header)")
        return cls(dek, header)

    # -- what a reader of any body revision asks (``Body3`` answers the same) ---------------

    @property
    def gen(self) -> bytes:
        """The version's generation: its salt (the metadata's ``gen``)."""
        return self.header.salt

    def span(self, index: int, plain: int) -> tuple[int, int]:
        return chunk_span(index, plain, self.chunk)

    def open_at(self, index: int, count: int, ciphertext: bytes | memoryview) -> bytes:
        """Chunk ``index`` of a body of ``count`` chunks."""
        return self.open_chunk(index, index == count - 1, ciphertext)

    @staticmethod
    def nonce(index: int, final: bool) -> bytes:
        if not 0 <= index < _MAX_CHUNKS:
            raise ValueError("chunk counter overflow")
        return index.to_bytes(11, "big") + (b"\x01" if final else b"\x00")

    def _check_length(self, final: bool, plaintext: bytes | memoryview) -> None:
        if len(plaintext) > self.chunk or (not final and len(plaintext) != self.chunk):
            raise ValueError("only the final chunk may be short")

    def seal_chunk(self, index: int, final: bool, plaintext: bytes | memoryview) -> bytes:
        self._check_length(final, plaintext)
        return self._aead.seal(self.nonce(index, final), plaintext, self.header_bytes)

    def seal_chunk_into(
        self, index: int, final: bool, plaintext: bytes | memoryview, out: memoryview
    ) -> None:
        """``seal_chunk`` into ``out`` (exactly ``len(plaintext) + 16`` bytes)."""
        self._check_length(final, plaintext)
        self._aead.seal_into(self.nonce(index, final), plaintext, self.header_bytes, out)

    def open_chunk(self, index: int, final: bool, ciphertext: bytes | memoryview) -> bytes:
        try:
            return self._aead.open(self.nonce(index, final), ciphertext, self.header_bytes)
        except IntegrityError:
            raise IntegrityError(f"chunk {index} failed authentication") from None

    def seal_all(self, plaintext: bytes) -> bytes:
        """Whole body (header + chunks) for a small file held in memory."""
        c = self.chunk
        n = chunk_count(len(plaintext), c)
        out = [self.header_bytes]
        view = memoryview(plaintext)
        for i in range(n):
            out.append(self.seal_chunk(i, i == n - 1, view[i * c : (i + 1) * c]))
        return b"".join(out)

    def open_all(self, body: bytes) -> bytes:
        size = plain_size(len(body), self.chunk)
        n = chunk_count(size, self.chunk)
        out = []
        for i in range(n):
            off, ln = chunk_span(i, size, self.chunk)
            out.append(self.open_chunk(i, i == n - 1, memoryview(body)[off : off + ln]))
        return b"".join(out)
