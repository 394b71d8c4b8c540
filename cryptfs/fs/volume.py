"""An opened volume: config, purpose keys, name codec and the path → object-key mapping.

Owns: creating and unlocking volumes (the config object), and key layout (docs/FORMAT.md §4).
Must not import: fuse, pyfuse3.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from cryptfs.errors import (
    IntegrityError,
    NotFound,
    PreconditionFailed,
    UsageError,
    VolumeExists,
    VolumeNotFound,
)
from cryptfs.format.keys import SCHEME_KMS, SCHEME_LOCAL, VolumeKeys, new_master_key
from cryptfs.format.names import NameCodec
from cryptfs.format.volume import CONFIG_NAME, KeySource, SlotPayload, VolumeConfig
from cryptfs.keys.keyring import Keyring, Target, add_kms_slot, unlock
from cryptfs.store.base import ObjectStore
from cryptfs.store.kms import KmsClient

log = logging.getLogger(__name__)

MARKER = ".cryptfs.dir"


@dataclass
class Volume:
    store: ObjectStore
    config: VolumeConfig
    keys: VolumeKeys
    names: NameCodec
    keyring: Keyring
    config_etag: str = ""
    slot_id: str = ""  # the keyslot this volume was opened with

    @property
    def chunk_log2(self) -> int:
        return self.config.chunk_log2

    @property
    def chunk(self) -> int:
        return 1 << self.config.chunk_log2

    @property
    def volume_id(self) -> bytes:
        return self.config.volume_id

    @property
    def payload(self) -> SlotPayload:
        return self.keyring.payload

    @classmethod
    def _assemble(
        cls,
        store: ObjectStore,
        cfg: VolumeConfig,
        payload: SlotPayload,
        kms: KmsClient | None,
        etag: str,
        slot_id: str,
    ) -> Volume:
        keys = VolumeKeys.derive(payload.vmk, cfg.volume_id)
        names = NameCodec(keys.names if cfg.encrypt_names else None, cfg.volume_id)
        keyring = Keyring(keys, payload, Target.of(cfg), kms)
        return cls(store, cfg, keys, names, keyring, etag, slot_id)

    @classmethod
    async def create(
        cls,
        store: ObjectStore,
        source: KeySource,
        *,
        chunk_log2: int,
        encrypt_names: bool,
        kms: KmsClient | None = None,
        kms_key_id: str | None = None,
        sse: dict[str, str] | None = None,
    ) -> Volume:
        """A new volume: every key in ``source`` (and the KMS key) gets a keyslot."""
        try:
            await store.head(CONFIG_NAME)
            raise VolumeExists("a cryptfs volume already exists at this location")
        except NotFound:
            pass
        cfg, vmk = VolumeConfig.create(chunk_log2, encrypt_names)
        cfg.sse = sse
        if kms_key_id is not None:
            if kms is None:
                raise UsageError("--kms-key-id needs a KMS client")
            arn = await kms.key_arn(kms_key_id)
            cfg.dek = {"scheme": SCHEME_KMS, "kid": arn}
            payload = SlotPayload(vmk)
            await add_kms_slot(cfg, kms, arn, payload)
        else:
            kid, mk = new_master_key()
            cfg.dek = {"scheme": SCHEME_LOCAL, "kid": kid}
            payload = SlotPayload(vmk, {kid: mk})
        if source.keyfile is not None:
            cfg.add_slot(payload, KeySource(keyfile=source.keyfile))
        if source.passphrase is not None:
            cfg.add_slot(payload, KeySource(passphrase=source.passphrase))
        if not cfg.keyslots:
            raise UsageError("give --key-file, --passphrase-file or --kms-key-id")
        try:
            etag = await store.put(CONFIG_NAME, cfg.to_bytes(vmk), {}, if_none_match=True)
        except PreconditionFailed:
            raise VolumeExists("a cryptfs volume already exists at this location") from None
        return cls._assemble(store, cfg, payload, kms, etag, cfg.keyslots[0]["id"])

    @classmethod
    async def load_config(cls, store: ObjectStore) -> tuple[VolumeConfig, str]:
        try:
            info, data = await store.get(CONFIG_NAME)
        except NotFound:
            raise VolumeNotFound(
                "no cryptfs volume at this location (run 'cryptfs init' first)"
            ) from None
        return VolumeConfig.from_bytes(data), info.etag

    @classmethod
    async def open(
        cls, store: ObjectStore, source: KeySource, kms: KmsClient | None = None
    ) -> Volume:
        cfg, etag = await cls.load_config(store)
        payload, slot_id = await unlock(cfg, source, kms)
        return cls._assemble(store, cfg, payload, kms, etag, slot_id)

    async def reload_config(self) -> bool:
        """Pick up a config changed by another host (keyslots, rotation); True if it changed.

        A config that does not authenticate under this volume's key is ignored (and logged).
        """
        info = await self.store.head(CONFIG_NAME)
        if info.etag == self.config_etag:
            return False
        cfg, etag = await self.load_config(self.store)
        try:
            cfg.verify(self.payload)
        except IntegrityError as e:
            log.error("ignoring a changed volume config: %s", e)
            return False
        self.config, self.config_etag = cfg, etag
        self.keyring.follow(Target.of(cfg))
        return True

    async def save_config(self) -> None:
        """Write the (changed) config back, only over the version this volume read."""
        data = self.config.to_bytes(self.payload.vmk)
        try:
            self.config_etag = await self.store.put(
                CONFIG_NAME, data, {}, if_match=self.config_etag
            )
        except PreconditionFailed:
            raise UsageError(
                "the volume config was changed by someone else meanwhile; run the command again"
            ) from None
        self.keyring.target = Target.of(self.config)
