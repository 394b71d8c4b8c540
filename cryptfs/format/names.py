"""Encryption of path components into S3 key components (docs/FORMAT.md §4).

Each component is AES-SIV(K_names, pad16(name), AD = [label, volume_id, parent path]) encoded
as unpadded base64url.  A component whose encoding is longer than ``MAX_COMPONENT`` characters
is stored under ``~`` + base64url(SHA-256(encoding)) and the full encoding travels in the
object's ``cfs-n`` metadata (gocryptfs calls these long names).  Plaintext-name volumes store
names as they are but reserve the ``.cryptfs`` prefix.
Must not import: store, fs, fuse.
"""

from __future__ import annotations

import base64

from cryptfs.crypto import Secret, aes_siv_decrypt, aes_siv_encrypt, sha256
from cryptfs.errors import IntegrityError, Invalid, NameTooLong

NAME_MAX = 255
MAX_COMPONENT = 255  # longest S3 key component we write (SeaweedFS refuses more)
LONG_PREFIX = "~"
RESERVED_PREFIX = b".cryptfs"
_LABEL = b"cryptfs/v1/name"


def b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64d(text: str) -> bytes:
    """Strict unpadded base64url: only the canonical encoding of some bytes is accepted."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError):
        raise IntegrityError("malformed base64") from None
    if b64e(raw) != text:
        raise IntegrityError("non-canonical base64")
    return raw


def _pad(name: bytes) -> bytes:
    n = 16 - len(name) % 16
    return name + bytes([n]) * n


def _unpad(data: bytes) -> bytes:
    n = data[-1] if data else 0
    if not 1 <= n <= 16 or data[-n:] != bytes([n]) * n:
        raise IntegrityError("bad name padding")
    return data[:-n]


def check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise NameTooLong(f"name longer than {NAME_MAX} bytes")
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise Invalid("invalid file name")


class NameCodec:
    """Maps (plaintext parent path, name) ↔ key component."""

    def __init__(self, key: Secret | None, volume_id: bytes) -> None:
        self._key = key
        self._vol = volume_id

    @property
    def encrypted(self) -> bool:
        return self._key is not None

    def encode(self, parent: bytes, name: bytes) -> tuple[str, str | None]:
        """(key component, full long-name encoding or None)."""
        check_name(name)
        if self._key is None:
            if name.startswith(RESERVED_PREFIX):
                raise Invalid("names starting with .cryptfs are reserved")
            try:
                return name.decode("utf-8"), None
            except UnicodeDecodeError:
                raise Invalid("plaintext-name volumes need UTF-8 names") from None
        enc = b64e(aes_siv_encrypt(self._key, _pad(name), [_LABEL, self._vol, parent]))
        if len(enc) <= MAX_COMPONENT:
            return enc, None
        return LONG_PREFIX + b64e(sha256(enc.encode())), enc

    def opaque(self, key: str) -> bool:
        """Does object key ``key`` reveal no name (so that a log line may show it)?  Only if
        names are encrypted and each of its components is one as written here (AES-SIV: a
        tag and at least one padded block, or a hashed long name) or a reserved one
        (markers, the config): an S3 Encryption Client object's key is its name."""
        if self._key is None:
            return False
        for comp in key.split("/"):
            if not comp or comp.startswith(RESERVED_PREFIX.decode()):
                continue
            long = comp.startswith(LONG_PREFIX)
            try:
                raw = b64d(comp[1:] if long else comp)
            except IntegrityError:
                return False
            if not (len(raw) == 32 if long else len(raw) >= 32 and len(raw) % 16 == 0):
                return False
        return True

    def is_long(self, component: str) -> bool:
        return self._key is not None and component.startswith(LONG_PREFIX)

    def decode(self, parent: bytes, component: str, long_name: str | None = None) -> bytes:
        if self._key is None:  # every key is a name here, whoever wrote it
            name = component.encode("utf-8", errors="surrogateescape")
            if not name or name in (b".", b"..") or b"\0" in name or len(name) > 255:
                raise IntegrityError("a key component that is no entry name")
            return name
        if component.startswith(LONG_PREFIX):
            if long_name is None or LONG_PREFIX + b64e(sha256(long_name.encode())) != component:
                raise IntegrityError("long name does not match its hashed key component")
            component = long_name
        return _unpad(aes_siv_decrypt(self._key, b64d(component), [_LABEL, self._vol, parent]))
