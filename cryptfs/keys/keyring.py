"""The keyring of an opened volume: makes, unwraps and rewraps per-file data keys.

Owns: the data-key cache (unwrapped DEKs, in memory only, bounded count and TTL, cleared on
close), the choice of wrapping for new files (the volume config's ``dek`` target) and the
unlocking of keyslots, including KMS slots.

Error handling:
    A data key that does not unwrap is an ``IntegrityError`` (tampered metadata, wrong
    context); KMS refusals are ``KeyAccessDenied``; both reach the reader as EIO with the
    reason logged by the filesystem.  Transient KMS errors are retried inside ``store.kms``.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

from cryptfs.crypto import Secret
from cryptfs.errors import IntegrityError, KeyAccessDenied, ReadOnly, UsageError
from cryptfs.format.keys import (
    SCHEME_KMS,
    SCHEME_LOCAL,
    VolumeKeys,
    WrappedKey,
    kms_file_context,
    kms_slot_context,
    new_dek,
)
from cryptfs.format.meta import MetaCodec
from cryptfs.format.names import b64d
from cryptfs.format.s3ec import S3ecObject, unwrap_aes_gcm
from cryptfs.format.volume import KeySource, SlotPayload, VolumeConfig
from cryptfs.store.kms import KmsClient

log = logging.getLogger(__name__)


class DekCache:
    """Unwrapped data keys by (file id, wrapped blob): LRU-bounded, each entry lives ``ttl``."""

    def __init__(self, max_entries: int = 4096, ttl: float = 300.0) -> None:
        self.max_entries = max_entries
        self.ttl = ttl
        self._d: OrderedDict[tuple[bytes, bytes], tuple[Secret, float]] = OrderedDict()

    def get(self, file_id: bytes, blob: bytes) -> Secret | None:
        k = (file_id, blob)
        hit = self._d.get(k)
        if hit is None:
            return None
        if hit[1] < time.monotonic():
            del self._d[k]
            return None
        self._d.move_to_end(k)
        return hit[0]

    def put(self, file_id: bytes, blob: bytes, dek: Secret) -> None:
        self._d[(file_id, blob)] = (dek, time.monotonic() + self.ttl)
        self._d.move_to_end((file_id, blob))
        while len(self._d) > self.max_entries:
            self._d.popitem(last=False)

    def clear(self) -> None:
        self._d.clear()

    def __len__(self) -> int:
        return len(self._d)


@dataclass(frozen=True)
class Target:
    """How new data keys are wrapped: ``gcm`` under local master key ``kid``, or ``kms``."""

    scheme: str
    kid: str

    @classmethod
    def of(cls, cfg: VolumeConfig) -> Target:
        return cls(cfg.dek["scheme"], cfg.dek["kid"])


def _same_key(asked: str, answered: str) -> bool:
    """KMS answers with the key's ARN; ``asked`` is an ARN too (configs store ARNs)."""
    return answered == asked


class Keyring:
    def __init__(
        self,
        keys: VolumeKeys,
        payload: SlotPayload,
        target: Target,
        kms: KmsClient | None,
        cache: DekCache | None = None,
        codec: MetaCodec | None = None,
    ) -> None:
        self.keys = keys
        self.payload = payload
        self.target = target
        self.kms = kms
        self.cache = cache or DekCache()
        # what the authenticated config and payload allow (which KMS keys, which local keys,
        # which revision new local wrappings use); set by the volume
        self.codec = codec
        self._keks: dict[str, Secret] = {}
        # set when the config names a wrapping key this keyring does not hold (rotated
        # elsewhere): new files are refused rather than tied to a retired key
        self.stale: str | None = None
        self.stale_for_good = False  # (set by the volume: never cleared by ``follow``)
        # raw AES keys of the AWS S3 Encryption Client (AES/GCM wrapping), if given
        self.s3ec_keys: list[Secret] = []
        # the KMS keys (ARNs) S3 Encryption Client data keys may be under (--s3ec-kms-key-id)
        self.s3ec_kms_keys: list[str] = []

    def __repr__(self) -> str:
        return f"<Keyring target={self.target}>"

    def _kek(self, kid: str) -> Secret:
        kek = self._keks.get(kid)
        if kek is None:
            kek = self.keys.local_kek(kid, self.payload.master(kid))
            self._keks[kid] = kek
        return kek

    def set_payload(self, payload: SlotPayload, codec: MetaCodec) -> None:
        self.payload = payload
        self.codec = codec
        self._keks.clear()

    @property
    def wrap_rev(self) -> int:
        return self.codec.write_rev if self.codec is not None else 1

    def _check(self, wk: WrappedKey) -> None:
        if self.codec is not None:
            self.codec.check_wrapping(wk)

    def _need_kms(self) -> KmsClient:
        if self.kms is None:
            raise KeyAccessDenied(
                "this volume's data keys are wrapped by AWS KMS: mount with KMS access "
                "(credentials, and --kms-endpoint-url if not AWS)"
            )
        return self.kms

    async def wrap(self, dek: Secret, file_id: bytes, target: Target | None = None) -> WrappedKey:
        t = target or self.target
        if t.scheme == SCHEME_LOCAL:
            return self.keys.wrap_local(self._kek(t.kid), t.kid, dek, file_id, self.wrap_rev)
        ctx = kms_file_context(self.keys.volume_id, file_id)
        blob, arn = await self._need_kms().encrypt(t.kid, dek, ctx)
        if not _same_key(t.kid, arn):
            raise IntegrityError(f"AWS KMS encrypted under {arn}, not the asked {t.kid}")
        return WrappedKey(SCHEME_KMS, arn, blob, self.wrap_rev)

    async def new_dek(self, file_id: bytes) -> tuple[Secret, WrappedKey]:
        """A fresh data key for one upload of ``file_id``'s body, wrapped for the target."""
        if self.stale is not None:
            raise ReadOnly(self.stale)
        if self.target.scheme == SCHEME_KMS:
            ctx = kms_file_context(self.keys.volume_id, file_id)
            dek, blob, arn = await self._need_kms().generate_data_key(self.target.kid, ctx)
            if len(dek) != 32:
                raise IntegrityError("AWS KMS returned a data key of the wrong size")
            if not _same_key(self.target.kid, arn):
                raise IntegrityError(f"AWS KMS made a data key under {arn}, not {self.target.kid}")
            wk = WrappedKey(SCHEME_KMS, arn, blob, self.wrap_rev)
        else:
            dek = new_dek()
            wk = await self.wrap(dek, file_id)
        self.cache.put(file_id, wk.blob, dek)
        return dek, wk

    async def unwrap(self, wk: WrappedKey, file_id: bytes) -> Secret:
        dek = self.cache.get(file_id, wk.blob)
        if dek is not None:
            return dek
        self._check(wk)
        if wk.scheme == SCHEME_LOCAL:
            dek = self.keys.unwrap_local(self._kek(wk.kid), wk, file_id)
        elif wk.scheme == SCHEME_KMS:
            ctx = kms_file_context(self.keys.volume_id, file_id)
            dek, arn = await self._need_kms().decrypt(wk.blob, ctx, wk.kid)
            if not _same_key(wk.kid, arn):
                raise IntegrityError(f"AWS KMS decrypted under {arn}, not the expected {wk.kid}")
            if len(dek) != 32:
                raise IntegrityError("AWS KMS returned a data key of the wrong size")
        else:
            raise IntegrityError(f"unknown data-key scheme {wk.scheme!r}")
        self.cache.put(file_id, wk.blob, dek)
        return dek

    def follow(self, target: Target) -> None:
        """The volume config now names ``target`` for new data keys."""
        if target == self.target:
            return
        self.target = target
        if target.scheme == SCHEME_LOCAL and self.payload.master(target.kid) is None:
            self.stale = (
                f"the volume's master key was rotated to {target.kid} elsewhere; new files "
                "are refused until this mount is restarted with the new key"
            )
            log.error("%s", self.stale)
            return
        log.info("new files' data keys now wrapped by %s (changed elsewhere)", target.kid)
        if not self.stale_for_good:
            self.stale = None

    def on_target(self, wk: WrappedKey, target: Target | None = None) -> bool:
        t = target or self.target
        return wk.scheme == t.scheme and wk.kid == t.kid

    async def rewrap(self, wk: WrappedKey, file_id: bytes, target: Target) -> WrappedKey:
        """The same data key wrapped for ``target``; KMS to KMS stays inside KMS."""
        self._check(wk)
        if wk.scheme == SCHEME_KMS and target.scheme == SCHEME_KMS:
            ctx = kms_file_context(self.keys.volume_id, file_id)
            blob, arn = await self._need_kms().re_encrypt(wk.blob, ctx, wk.kid, target.kid)
            if not _same_key(target.kid, arn):
                raise IntegrityError(f"AWS KMS re-encrypted under {arn}, not {target.kid}")
            return WrappedKey(SCHEME_KMS, arn, blob, self.wrap_rev)
        return await self.wrap(await self.unwrap(wk, file_id), file_id, target)

    async def unwrap_s3ec(self, env: S3ecObject, what: str) -> Secret:
        """The data key of an S3 Encryption Client object (KMS or a raw AES key)."""
        if env.wrap == "kms+context":
            # the AWS S3EC specification: Decrypt names the configured key, never "any key
            # the ciphertext says" (a bucket writer could otherwise use a KMS key of theirs)
            if not self.s3ec_kms_keys:
                raise KeyAccessDenied(
                    f"{what}: its data key is wrapped by AWS KMS: name the key with "
                    "--s3ec-kms-key-id"
                )
            last: Exception | None = None
            for key_id in self.s3ec_kms_keys:
                try:
                    data_key, arn = await self._need_kms().decrypt(
                        env.encrypted_key, env.context, key_id, what=f"S3EC data key of {what}"
                    )
                except (KeyAccessDenied, IntegrityError) as e:
                    last = e
                    continue
                if not _same_key(key_id, arn):
                    raise IntegrityError(f"{what}: AWS KMS decrypted under {arn}, not {key_id}")
                return data_key
            assert last is not None
            raise IntegrityError(f"{what}: no configured KMS key decrypts its data key") from last
        if not self.s3ec_keys:
            raise KeyAccessDenied(
                f"{what}: its data key is wrapped by a raw AES key: give --s3ec-key-file"
            )
        for key in self.s3ec_keys:
            try:
                return unwrap_aes_gcm(key, env.encrypted_key)
            except IntegrityError:
                continue
        raise IntegrityError(f"{what}: no given AES key unwraps its data key")

    def close(self) -> None:
        self.cache.clear()
        self._keks.clear()


# -- keyslots --------------------------------------------------------------------------------


async def unlock(
    cfg: VolumeConfig,
    source: KeySource,
    kms: KmsClient | None,
    trusted_kms: frozenset[str] | None = None,
) -> tuple[SlotPayload, str]:
    """Open a keyslot with what the user offers; returns the payload and the slot's id.

    ``trusted_kms``: the KMS keys (ARNs) whose keyslots may be tried; None = any (a machine
    that has seen nothing of this volume and was told nothing: docs/FORMAT.md §7.5).  KMS
    decrypts whatever is under any key the principal may use, so a slot planted under a
    bucket writer's own key would otherwise open a config they wrote.
    """
    if source.local:
        return cfg.unlock_local(source)
    slots = cfg.kms_slots()
    if not source.kms or kms is None:
        raise UsageError("give --key-file, --passphrase-file or --kms (keys never come from argv)")
    if not slots:
        kinds = sorted({s["type"] for s in cfg.keyslots})
        raise UsageError(
            "give --key-file or --passphrase-file (this volume has no KMS keyslot; "
            f"it has: {kinds})"
        )
    if trusted_kms is not None:
        untrusted = sorted({str(s["key_id"]) for s in slots} - trusted_kms)
        slots = [s for s in slots if s["key_id"] in trusted_kms]
        if not slots:
            raise KeyAccessDenied(
                f"this volume's KMS keyslots are under {untrusted}, which this machine has "
                "not seen open it: if the volume was rotated to that key, name it with "
                "--kms-key-id (refusing, as a planted keyslot would look the same)"
            )
    last: Exception | None = None
    for slot in slots:
        ctx = kms_slot_context(cfg.volume_id, slot["id"])
        try:
            raw, arn = await kms.decrypt(
                b64d(slot["blob"]), ctx, slot["key_id"], what=f"keyslot {slot['id']}"
            )
        except (KeyAccessDenied, IntegrityError) as e:
            last = e
            continue
        if not _same_key(str(slot["key_id"]), arn):
            last = IntegrityError(f"keyslot {slot['id']}: AWS KMS answered for another key")
            continue
        try:
            payload = SlotPayload.from_bytes(raw.reveal())
            cfg.verify(payload)
        except IntegrityError as e:  # a planted slot: its payload is not this config's
            last = e
            continue
        return payload, str(slot["id"])
    assert last is not None
    raise last


async def add_kms_slot(cfg: VolumeConfig, kms: KmsClient, key_id: str, payload: SlotPayload) -> str:
    arn = await kms.key_arn(key_id)
    slot_id = cfg.new_slot_id("kms")
    blob, arn = await kms.encrypt(
        arn,
        Secret(payload.to_bytes()),
        kms_slot_context(cfg.volume_id, slot_id),
        what=f"keyslot {slot_id}",
    )
    cfg.add_kms_slot(slot_id, arn, blob)
    return slot_id
