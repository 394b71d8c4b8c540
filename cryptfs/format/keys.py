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
    """A data key as stored in an object's metadata: how, under which key, and the blob."""

    scheme: str
    kid: str
    blob: bytes


@dataclass(frozen=True, repr=False)
class VolumeKeys:
    volume_id: bytes
    wrap: Aead
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
            wrap=Aead(k("kek")),
            names=k("names", 64),
            attrs=Aead(k("attrs")),
            cache=k("cache"),
            config_mac=k("config"),
        )

    def _wrap_aad(self, file_id: bytes, kid: str) -> bytes:
        return b"cryptfs/v1/wrap\0" + self.volume_id + file_id + kid.encode()

    def local_kek(self, kid: str, mk: Secret | None) -> Aead:
        """The AES-GCM key that wraps DEKs for local master key ``kid``."""
        if kid == LOCAL_KID:
            return self.wrap
        if mk is None:
            raise IntegrityError(f"no master key {kid!r} in this volume's keyslot")
        return Aead(hkdf(mk, self.volume_id, b"cryptfs/v1/mk-kek\0" + kid.encode()))

    def wrap_local(self, kek: Aead, kid: str, dek: Secret, file_id: bytes) -> WrappedKey:
        blob = kek.seal_random(dek.reveal(), self._wrap_aad(file_id, kid))
        return WrappedKey(SCHEME_LOCAL, kid, blob)

    def unwrap_local(self, kek: Aead, wk: WrappedKey, file_id: bytes) -> Secret:
        dek = kek.open_random(wk.blob, self._wrap_aad(file_id, wk.kid))
        if len(dek) != DEK_SIZE:
            raise IntegrityError("wrapped data key has the wrong size")
        return Secret(dek)


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
