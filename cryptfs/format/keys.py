"""Purpose keys derived from the volume master key (VMK), and per-file DEK wrapping.

Owns: the HKDF labels of docs/FORMAT.md §1 and the local (``gcm``) wrapping of data keys.
Must not import: store, fs, fuse.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptfs.crypto import Aead, Secret, hkdf, random_bytes
from cryptfs.errors import IntegrityError

LOCAL_KID = "vmk"
DEK_SIZE = 32


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

    def wrap_dek(self, dek: Secret, file_id: bytes) -> bytes:
        return self.wrap.seal_random(dek.reveal(), self._wrap_aad(file_id, LOCAL_KID))

    def unwrap_dek(self, blob: bytes, file_id: bytes, kid: str) -> Secret:
        if kid != LOCAL_KID:
            raise IntegrityError(f"unknown data-key wrapping key id {kid!r}")
        dek = self.wrap.open_random(blob, self._wrap_aad(file_id, kid))
        if len(dek) != DEK_SIZE:
            raise IntegrityError("wrapped data key has the wrong size")
        return Secret(dek)


def new_dek() -> Secret:
    return Secret(random_bytes(DEK_SIZE))
