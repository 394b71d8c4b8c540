"""Purpose keys derived from the volume master key (VMK), and per-file DEK wrapping.

Owns: the HKDF labels of docs/FORMAT.md §1, the local (``gcm``) wrapping of data keys and the
KMS encryption contexts.  Must not import: store, fs, fuse.

Key hierarchy (docs/SECURITY.md): keyslots wrap a *slot payload* = the VMK plus zero or more
local master keys (``mk-…``).  The VMK yields the name, attribute, cache and config-MAC keys.
A file's random data key (DEK) is wrapped either by a local master key (scheme ``gcm``; the
legacy kid ``vmk`` means "a key derived from the VMK", as format v1 volumes created before
master keys existed do) or by AWS KMS (scheme ``kms``; the kid is the KMS key ARN).
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptfs.crypto import Aead, Secret, hkdf, random_bytes
from cryptfs.errors import IntegrityError
from cryptfs.format.names import b64e

LOCAL_KID = "vmk"  # legacy: the DEK-wrapping key is derived from the VMK
SCHEME_LOCAL = "gcm"
SCHEME_KMS = "kms"
DEK_SIZE = 32
MK_SIZE = 32


@dataclass(frozen=True)
class WrappedKey:
    """A data key as stored in an object's metadata: how, under which key, and the blob.

    ``rev`` is the metadata revision whose encoding a local (``gcm``) blob uses: revision 1
    ``nonce ‖ AES-GCM`` under the KEK, revision 2 ``r ‖ AES-GCM`` under a key derived from
    the KEK and ``r`` (docs/FORMAT.md §7.4).  KMS blobs are KMS's own in both.
    """

    scheme: str
    kid: str
    blob: bytes
    rev: int = 1


@dataclass(frozen=True, repr=False)
class VolumeKeys:
    volume_id: bytes
    names: Secret
    attrs: Aead
    cache: Secret
    config_mac: Secret

    def __repr__(self) -> str:
        return "<VolumeKeys>"

    @classmethod
    def derive(cls, vmk: Secret, volume_id: bytes) -> VolumeKeys:
        def k(label: str, n: int = 32) -> Secret:
            return hkdf(vmk, volume_id, b"cryptfs/v1/" + label.encode(), n)

        return cls(
            volume_id=volume_id,
            names=k("names", 64),
            attrs=Aead(k("attrs")),
            cache=k("cache"),
            config_mac=k("config"),
        )

    def _wrap_aad(self, file_id: bytes, kid: str, rev: int = 1) -> bytes:
        label = b"cryptfs/v2/wrap\0" if rev >= 2 else b"cryptfs/v1/wrap\0"
        return label + self.volume_id + file_id + kid.encode()

    def local_kek(self, kid: str, mk: Secret | None) -> Secret:
        """The key that wraps DEKs for local master key ``kid`` (``vmk``: the legacy one)."""
        if kid == LOCAL_KID:
            if mk is None:
                raise IntegrityError("legacy data-key wrapping (kid 'vmk') is not accepted here")
            return hkdf(mk, self.volume_id, b"cryptfs/v1/kek")
        if mk is None:
            raise IntegrityError(f"no master key {kid!r} in this volume's keyslot")
        return hkdf(mk, self.volume_id, b"cryptfs/v1/mk-kek\0" + kid.encode())

    def wrap_local(
        self, kek: Secret, kid: str, dek: Secret, file_id: bytes, rev: int = 2
    ) -> WrappedKey:
        aad = self._wrap_aad(file_id, kid, rev)
        if rev >= 2:
            blob = seal_once(kek, WRAP2_INFO, dek.reveal(), aad)
        else:
            blob = Aead(kek).seal_random(dek.reveal(), aad)
        return WrappedKey(SCHEME_LOCAL, kid, blob, rev)

    def unwrap_local(self, kek: Secret, wk: WrappedKey, file_id: bytes) -> Secret:
        aad = self._wrap_aad(file_id, wk.kid, wk.rev)
        if wk.rev >= 2:
            dek = open_once(kek, WRAP2_INFO, wk.blob, aad)
        else:
            dek = Aead(kek).open_random(wk.blob, aad)
        if len(dek) != DEK_SIZE:
            raise IntegrityError("wrapped data key has the wrong size")
        return Secret(dek)


WRAP2_INFO = b"cryptfs/v2/wrap"
ONCE_SALT = 32
_ZERO_NONCE = bytes(12)


def seal_once(key: Secret, info: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """``r ‖ AES-256-GCM(HKDF(key, salt=r, info), nonce=0^12, plaintext, aad)`` with 32 fresh
    random bytes ``r``: every seal has a key of its own, so no nonce can ever repeat, however
    many seals one ``key`` makes (docs/FORMAT.md §7.3)."""
    r = random_bytes(ONCE_SALT)
    return r + Aead(hkdf(key, r, info)).seal(_ZERO_NONCE, plaintext, aad)


def open_once(key: Secret, info: bytes, blob: bytes, aad: bytes) -> bytes:
    if len(blob) < ONCE_SALT + 16:
        raise IntegrityError("sealed field too short")
    r = blob[:ONCE_SALT]
    return Aead(hkdf(key, r, info)).open(_ZERO_NONCE, blob[ONCE_SALT:], aad)


def master_derive(mk: Secret, volume_id: bytes, label: str, kid: str) -> Secret:
    """A revision-2 purpose key of master key ``kid`` (docs/FORMAT.md §7.1)."""
    return hkdf(mk, volume_id, b"cryptfs/v2/" + label.encode() + b"\0" + kid.encode())


def kms_file_context(volume_id: bytes, file_id: bytes) -> dict[str, str]:
    """Encryption context of a file's KMS data key: volume and file id, never the path
    (contexts appear in plaintext in CloudTrail)."""
    return {"cryptfs:volume": b64e(volume_id), "cryptfs:file": b64e(file_id)}


def kms_slot_context(volume_id: bytes, slot_id: str) -> dict[str, str]:
    return {"cryptfs:volume": b64e(volume_id), "cryptfs:keyslot": slot_id}


def new_dek() -> Secret:
    return Secret(random_bytes(DEK_SIZE))


def new_master_key() -> tuple[str, Secret]:
    return "mk-" + random_bytes(6).hex(), Secret(random_bytes(MK_SIZE))
