"""Pure, synchronous cryptographic primitives. The only importer of ``cryptography``.

Owns: AES-256-GCM, AES-SIV, HKDF-SHA256, HMAC-SHA256, Argon2id, randomness, and the
``Secret`` wrapper that keeps key material out of reprs and logs.
Must not import: anything else from cryptfs except ``errors``.
"""

from __future__ import annotations

import hashlib
import hmac as _hmac
import os
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as _chmac
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from cryptfs.errors import IntegrityError

__all__ = [
    "GCM_NONCE",
    "GCM_TAG",
    "Aead",
    "Secret",
    "aes_siv_decrypt",
    "aes_siv_encrypt",
    "argon2id",
    "constant_time_eq",
    "hkdf",
    "hkdf_expand",
    "hkdf_extract",
    "hmac_sha256",
    "random_bytes",
    "sha256",
]

GCM_NONCE = 12
GCM_TAG = 16


class Secret:
    """Key material. ``repr``/``str`` never show the bytes; use ``.reveal()`` deliberately."""

    __slots__ = ("_b",)

    def __init__(self, value: bytes) -> None:
        self._b = bytes(value)

    def reveal(self) -> bytes:
        return self._b

    def __len__(self) -> int:
        return len(self._b)

    def __repr__(self) -> str:
        return f"<Secret {len(self._b)} bytes>"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and _hmac.compare_digest(self._b, other._b)

    def __hash__(self) -> int:  # pragma: no cover - secrets are never dict keys
        raise TypeError("Secret is not hashable")

    def __reduce__(self) -> str:
        raise TypeError("Secret must not be pickled")


def random_bytes(n: int) -> bytes:
    return os.urandom(n)


def sha256(data: bytes | bytearray | memoryview) -> bytes:
    # (hashlib, OpenSSL's SHA-256 as cryptography's: it lets go of the GIL on large inputs,
    # so hashing chunks in worker threads runs beside the trio thread)
    return hashlib.sha256(data).digest()


def hmac_sha256(key: Secret, data: bytes) -> bytes:
    h = _chmac.HMAC(key.reveal(), hashes.SHA256())
    h.update(data)
    return h.finalize()


def constant_time_eq(a: bytes, b: bytes) -> bool:
    return _hmac.compare_digest(a, b)


def hkdf_extract(salt: bytes, ikm: Secret) -> Secret:
    """RFC 5869 HKDF-Extract with SHA-256."""
    h = _chmac.HMAC(salt, hashes.SHA256())
    h.update(ikm.reveal())
    return Secret(h.finalize())


def hkdf_expand(prk: Secret, info: bytes, length: int = 32) -> Secret:
    return Secret(HKDFExpand(hashes.SHA256(), length, info).derive(prk.reveal()))


def hkdf(ikm: Secret, salt: bytes, info: bytes, length: int = 32) -> Secret:
    return hkdf_expand(hkdf_extract(salt, ikm), info, length)


def hkdf_sha512(ikm: Secret, salt: bytes, info: bytes, length: int) -> Secret:
    """RFC 5869 HKDF with SHA-512 (the AWS S3 Encryption Client's v3 key derivation)."""
    h = _chmac.HMAC(salt, hashes.SHA512())
    h.update(ikm.reveal())
    return Secret(HKDFExpand(hashes.SHA512(), length, info).derive(h.finalize()))


def argon2id(password: bytes, salt: bytes, *, t: int, m_kib: int, p: int) -> Secret:
    kdf = Argon2id(salt=salt, length=32, iterations=t, lanes=p, memory_cost=m_kib)
    return Secret(kdf.derive(password))


class Aead:
    """AES-256-GCM under one key. ``open`` raises IntegrityError, never returns bad bytes."""

    __slots__ = ("_gcm",)

    def __init__(self, key: Secret) -> None:
        if len(key) != 32:
            raise ValueError("AES-256-GCM needs a 32-byte key")
        self._gcm = AESGCM(key.reveal())

    def __repr__(self) -> str:
        return "<Aead AES-256-GCM>"

    def seal(self, nonce: bytes, plaintext: bytes | bytearray | memoryview, aad: bytes) -> bytes:
        return self._gcm.encrypt(nonce, plaintext, aad)

    def open(self, nonce: bytes, ciphertext: bytes | bytearray | memoryview, aad: bytes) -> bytes:
        try:
            return self._gcm.decrypt(nonce, ciphertext, aad)
        except InvalidTag:
            raise IntegrityError("authentication tag mismatch") from None

    def seal_into(
        self, nonce: bytes, plaintext: bytes | bytearray | memoryview, aad: bytes, out: memoryview
    ) -> None:
        """``seal`` into ``out``, which must be exactly ``len(plaintext) + 16`` bytes."""
        self._gcm.encrypt_into(nonce, plaintext, aad, out)

    def open_into(
        self, nonce: bytes, ciphertext: bytes | bytearray | memoryview, aad: bytes, out: memoryview
    ) -> None:
        """``open`` into ``out`` (exactly ``len(ciphertext) - 16`` bytes).  OpenSSL writes the
        plaintext before it checks the tag: on a mismatch ``out`` is zeroed before the
        IntegrityError, so no unauthenticated byte is left where a caller could use it."""
        try:
            self._gcm.decrypt_into(nonce, ciphertext, aad, out)
        except InvalidTag:
            out[:] = bytes(len(out))
            raise IntegrityError("authentication tag mismatch") from None

    def seal_random(self, plaintext: bytes, aad: bytes) -> bytes:
        """nonce ‖ ciphertext ‖ tag with a fresh random 96-bit nonce."""
        nonce = random_bytes(GCM_NONCE)
        return nonce + self._gcm.encrypt(nonce, plaintext, aad)

    def open_random(self, blob: bytes, aad: bytes) -> bytes:
        if len(blob) < GCM_NONCE + GCM_TAG:
            raise IntegrityError("sealed blob too short")
        return self.open(blob[:GCM_NONCE], blob[GCM_NONCE:], aad)


def aes_siv_encrypt(key: Secret, plaintext: bytes, ad: Sequence[bytes]) -> bytes:
    """RFC 5297 AES-SIV (deterministic, authenticated). ``key`` is 64 bytes (AES-256-SIV)."""
    return AESSIV(key.reveal()).encrypt(plaintext, list(ad))


def aes_siv_decrypt(key: Secret, ciphertext: bytes, ad: Sequence[bytes]) -> bytes:
    try:
        return AESSIV(key.reveal()).decrypt(ciphertext, list(ad))
    except (InvalidTag, ValueError):
        raise IntegrityError("name authentication failed") from None
