"""An opened volume: its config, purpose keys, name and metadata codecs, and keyring.

Owns: creating and unlocking volumes (the config object), the volume-level key layout
(docs/FORMAT.md §4: the config and directory-marker names), and how log lines name a key.
The mapping from a path to an object key is ``cryptfs.fs.paths``'s.
Must not import: ``cryptfs.fs``, ``cryptfs.fuse``, pyfuse3.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from cryptfs import lognames
from cryptfs.errors import (
    IntegrityError,
    NotFound,
    PreconditionFailed,
    UsageError,
    VolumeExists,
    VolumeNotFound,
)
from cryptfs.format import body3
from cryptfs.format.body import cipher_size
from cryptfs.format.keys import SCHEME_KMS, SCHEME_LOCAL, VolumeKeys, new_master_key
from cryptfs.format.meta import MARKER as MARKER
from cryptfs.format.meta import Attrs, MetaCodec
from cryptfs.format.names import NameCodec
from cryptfs.format.volume import (
    CONFIG_NAME,
    SEGMENTS_DEFAULT,
    KeySource,
    SlotPayload,
    VolumeConfig,
)
from cryptfs.keys.keyring import Keyring, Target, add_kms_slot, unlock
from cryptfs.state import VolumeState
from cryptfs.store.base import ObjectStore
from cryptfs.store.kms import KmsClient

log = logging.getLogger(__name__)


@dataclass
class Volume:
    store: ObjectStore
    config: VolumeConfig
    keys: VolumeKeys
    names: NameCodec
    keyring: Keyring
    config_etag: str = ""
    slot_id: str = ""  # the keyslot this volume was opened with
    state: VolumeState | None = None  # what this machine remembers of the volume

    @property
    def meta(self) -> MetaCodec:
        codec = self.keyring.codec
        assert codec is not None
        return codec

    @property
    def chunk_log2(self) -> int:
        return self.config.chunk_log2

    @property
    def chunk(self) -> int:
        return 1 << self.config.chunk_log2

    @property
    def segment(self) -> int | None:
        """Plaintext bytes of a revision-3 body's segment; None: bodies are written as
        revision 1 (a volume made before revision 3, until ``cryptfs upgrade``)."""
        s = self.config.segment_log2
        return None if s is None else 1 << s

    def segment_bytes(self) -> int:
        """``segment`` where a revision-3 body is read (its metadata authenticated, so the
        config names segments: MetaCodec refuses revision 3 otherwise)."""
        seg = self.segment
        if seg is None:
            raise IntegrityError("a revision-3 body in a volume without segments")
        return seg

    def body_length(self, attrs: Attrs) -> int:
        """The length of the object holding a body of ``attrs.size`` bytes, of the revision
        ``attrs.body`` names (FORMAT.md §2, §8.5)."""
        if attrs.body == 3:
            return body3.body_size(attrs.size, self.segment_bytes(), self.chunk)
        return cipher_size(attrs.size, self.chunk)

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
        keyring = Keyring(keys, payload, Target.of(cfg), kms, codec=MetaCodec(keys, payload, cfg))
        return cls(store, cfg, keys, names, keyring, etag, slot_id)

    def key_ident(self, key: str, path: bytes | None = None) -> str:
        """How a log line names the object ``key``: by the key only if it is made of
        encrypted names, by ``path`` only with ``--log-names`` (``cryptfs.lognames``)."""
        return lognames.ident(key, opaque=self.names.opaque(key), path=path)

    def scrub(self, e: BaseException) -> str:
        """``e``'s message for a log line: names cut out, keys only if they reveal none."""
        return lognames.scrub(e, self.names.opaque)

    def set_payload(self, payload: SlotPayload) -> None:
        """The payload (or config) changed (rotation, upgrade): rebuild what depends on it."""
        self.keyring.set_payload(payload, MetaCodec(self.keys, payload, self.config))

    def set_config(self, cfg: VolumeConfig) -> None:
        self.config = cfg
        self.keyring.codec = MetaCodec(self.keys, self.payload, cfg)

    @classmethod
    async def create(
        cls,
        store: ObjectStore,
        source: KeySource,
        *,
        chunk_log2: int,
        encrypt_names: bool,
        segment_log2: int | None = SEGMENTS_DEFAULT,
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
        cfg, vmk = VolumeConfig.create(chunk_log2, encrypt_names, segment_log2)
        cfg.sse = sse
        # every revision-2 volume has a master key: it authenticates the config and all
        # metadata, and wraps the data keys unless KMS does (docs/FORMAT.md §7.1)
        kid, mk = new_master_key()
        payload = SlotPayload(vmk, {kid: mk}, current=kid)
        if kms_key_id is not None:
            if kms is None:
                raise UsageError("--kms-key-id needs a KMS client")
            arn = await kms.key_arn(kms_key_id)
            cfg.dek = {"scheme": SCHEME_KMS, "kid": arn}
            cfg.kms_keys = [arn]
            await add_kms_slot(cfg, kms, arn, payload)
        else:
            cfg.dek = {"scheme": SCHEME_LOCAL, "kid": kid}
        if source.keyfile is not None:
            cfg.add_slot(payload, KeySource(keyfile=source.keyfile))
        if source.passphrase is not None:
            cfg.add_slot(payload, KeySource(passphrase=source.passphrase))
        if not cfg.keyslots:
            raise UsageError("give --key-file, --passphrase-file or --kms-key-id")
        try:
            etag = await store.put(CONFIG_NAME, cfg.to_bytes(payload), {}, if_none_match=True)
        except PreconditionFailed:
            raise VolumeExists("a cryptfs volume already exists at this location") from None
        vol = cls._assemble(store, cfg, payload, kms, etag, cfg.keyslots[0]["id"])
        vol.state = VolumeState.load(cfg.volume_id)
        vol.state.see(cfg.epoch, cfg.dek["kid"] if kms_key_id is not None else None)
        return vol

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
        state = VolumeState.load(cfg.volume_id)
        # (the epoch is read before the config authenticates: that only refuses sooner, and
        # with a clear message; what is accepted must then authenticate, below)
        _check_epoch(cfg, state)
        trusted: frozenset[str] | None = None
        if not source.local and kms is not None and (source.kms_keys or state.kms_slot_keys):
            named = [await kms.key_arn(k) for k in source.kms_keys]
            trusted = frozenset(named) | frozenset(state.kms_slot_keys)
        payload, slot_id = await unlock(cfg, source, kms, trusted)
        vol = cls._assemble(store, cfg, payload, kms, etag, slot_id)
        vol.state = state
        slot = cfg.slot(slot_id)
        state.see(cfg.epoch, str(slot["key_id"]) if slot["type"] == "kms" else None)
        return vol

    async def reload_config(self) -> bool:
        """Pick up a config changed by another host (keyslots, rotation); True if it changed.

        A config that does not authenticate under this volume's key is ignored (and logged),
        and the mount then holds its writes until it is restarted: its key may have been
        retired by a rotation, and whoever also holds that key could next write a config that
        authenticates under it, or put back the one this mount knew.  (So a bucket writer can
        make running mounts hold their writes, staged, as deleting objects denies service;
        docs/SECURITY.md.)
        """
        if self.keyring.stale_for_good:
            return False
        info = await self.store.head(CONFIG_NAME)
        if info.etag == self.config_etag:
            return False
        cfg, etag = await self.load_config(self.store)
        try:
            cfg.verify(self.payload)
            if self.state is not None:
                _check_epoch(cfg, self.state)
        except IntegrityError as e:
            # rotated elsewhere (this mount's key is retired) or tampered with: either way
            # nothing new may be written under this mount's keys any more
            self.keyring.stale = (
                "the volume config changed and does not authenticate under this mount's key "
                "(rotated elsewhere, or tampered with): new uploads are held until the mount "
                "is restarted with the current key"
            )
            log.error("ignoring a changed volume config: %s; %s", e, self.keyring.stale)
            self.config_etag = etag
            # and for good: whoever holds the key this mount holds (a retired one, after a
            # rotation) could write a config that authenticates under it next
            self.keyring.stale_for_good = True
            # nor believe, under keys that may be retired now, what S3 wrote after it
            self.meta.frozen = info.modified or 1.0
            return False
        self.set_config(cfg)
        self.config_etag = etag
        if self.state is not None:
            self.state.see(cfg.epoch)
        self.keyring.follow(Target.of(cfg))
        return True

    async def save_config(self) -> None:
        """Write the (changed) config back, only over the version this volume read; a
        revision-2 config gets the next epoch."""
        if self.config.version >= 2:
            self.config.epoch += 1
        data = self.config.to_bytes(self.payload)
        try:
            self.config_etag = await self.store.put(
                CONFIG_NAME, data, {}, if_match=self.config_etag
            )
        except PreconditionFailed:
            if self.config.version >= 2:
                self.config.epoch -= 1
            raise UsageError(
                "the volume config was changed by someone else meanwhile; run the command again"
            ) from None
        self.set_config(self.config)
        if self.state is not None:
            self.state.see(self.config.epoch)
        self.keyring.target = Target.of(self.config)


def _check_epoch(cfg: VolumeConfig, state: VolumeState) -> None:
    if cfg.version >= 2 and cfg.epoch < state.epoch:
        raise IntegrityError(
            f"the volume config is at epoch {cfg.epoch}, older than epoch {state.epoch} this "
            "machine has seen: a replayed (or restored) config; refusing it"
        )
    if cfg.version < 2 and state.epoch > 0:
        raise IntegrityError(
            "the volume config is revision 1, but this machine has seen it at revision 2 "
            f"(epoch {state.epoch}): a replayed config; refusing it"
        )
