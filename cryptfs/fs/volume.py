"""An opened volume: config, purpose keys, name codec and the path → object-key mapping.

Owns: creating and unlocking volumes (the config object), and key layout (docs/FORMAT.md §4).
Must not import: fuse, pyfuse3.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from cryptfs.crypto import Secret
from cryptfs.errors import NotFound, PreconditionFailed, VolumeExists, VolumeNotFound
from cryptfs.format.keys import VolumeKeys
from cryptfs.format.names import NameCodec
from cryptfs.format.volume import CONFIG_NAME, KeySource, VolumeConfig
from cryptfs.store.base import ObjectStore

log = logging.getLogger(__name__)

MARKER = ".cryptfs.dir"


@dataclass
class Volume:
    store: ObjectStore
    config: VolumeConfig
    keys: VolumeKeys
    names: NameCodec

    @property
    def chunk_log2(self) -> int:
        return self.config.chunk_log2

    @property
    def chunk(self) -> int:
        return 1 << self.config.chunk_log2

    @property
    def volume_id(self) -> bytes:
        return self.config.volume_id

    @classmethod
    def _assemble(cls, store: ObjectStore, cfg: VolumeConfig, vmk: Secret) -> Volume:
        keys = VolumeKeys.derive(vmk, cfg.volume_id)
        names = NameCodec(keys.names if cfg.encrypt_names else None, cfg.volume_id)
        return cls(store, cfg, keys, names)

    @classmethod
    async def create(
        cls, store: ObjectStore, source: KeySource, *, chunk_log2: int, encrypt_names: bool
    ) -> tuple[Volume, Secret]:
        try:
            await store.head(CONFIG_NAME)
            raise VolumeExists("a cryptfs volume already exists at this location")
        except NotFound:
            pass
        cfg, vmk = VolumeConfig.create(chunk_log2, encrypt_names)
        cfg.add_slot(vmk, source)
        try:
            await store.put(CONFIG_NAME, cfg.to_bytes(vmk), {}, if_none_match=True)
        except PreconditionFailed:
            raise VolumeExists("a cryptfs volume already exists at this location") from None
        return cls._assemble(store, cfg, vmk), vmk

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
    async def open(cls, store: ObjectStore, source: KeySource) -> Volume:
        cfg, _etag = await cls.load_config(store)
        vmk = cfg.unlock(source)
        return cls._assemble(store, cfg, vmk)
