"""The volume config object ``<prefix>/.cryptfs.json`` and its keyslots (docs/FORMAT.md §1).

A random 32-byte volume master key (VMK) is wrapped by one or more keyslots (key file,
passphrase via Argon2id).  The non-slot fields are authenticated by an HMAC under a key derived
from the VMK, so a bucket writer cannot flip e.g. the name-encryption flag.
Must not import: store, fs, fuse.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptfs.crypto import (
    Aead,
    Secret,
    argon2id,
    constant_time_eq,
    hkdf,
    hmac_sha256,
    random_bytes,
)
from cryptfs.errors import IntegrityError, UnsupportedFormat, UsageError, WrongKey
from cryptfs.format.body import check_chunk_log2
from cryptfs.format.keys import LOCAL_KID, MK_SIZE, SCHEME_KMS, SCHEME_LOCAL, VolumeKeys
from cryptfs.format.names import b64d, b64e

CONFIG_NAME = ".cryptfs.json"
FORMAT_VERSION = 1
VMK_SIZE = 32
KEYFILE_SIZE = 32
# RFC 9106 "second recommended" parameters (t=3, 64 MiB, p=4): ~2 s on a small server.
ARGON2_DEFAULT = {"t": 3, "m": 65536, "p": 4}
# Only for test suites: selected by CRYPTFS_TEST_FAST_KDF=1 at init, recorded in the slot.
ARGON2_TEST = {"t": 1, "m": 1024, "p": 1}
_KNOWN_FIELDS = {
    "cryptfs", "volume_id", "chunk_log2", "names", "suite", "keyslots", "mac", "dek", "sse"
}  # fmt: skip
LEGACY_DEK = {"scheme": SCHEME_LOCAL, "kid": LOCAL_KID}
SSE_MODES = ("s3", "kms", "c")


def _canon(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


@dataclass
class KeySource:
    """What the user offers to open a volume: a key file, a passphrase, and/or AWS KMS."""

    keyfile: Secret | None = None
    passphrase: Secret | None = None
    kms: bool = False  # try the volume's KMS keyslots (needs KMS credentials)

    def __repr__(self) -> str:
        return (
            f"<KeySource keyfile={self.keyfile is not None} pass={self.passphrase is not None}"
            f" kms={self.kms}>"
        )

    @property
    def local(self) -> bool:
        return self.keyfile is not None or self.passphrase is not None


@dataclass(repr=False)
class SlotPayload:
    """What every keyslot wraps: the VMK and the volume's local master keys (kid -> key).

    Encoding: exactly 32 bytes = a VMK alone (volumes from before master keys); otherwise
    ``0x01 ‖ VMK ‖ (len(kid) u8 ‖ kid ‖ key[32])*`` with kids in sorted order.
    """

    vmk: Secret
    mks: dict[str, Secret] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"<SlotPayload mks={sorted(self.mks)}>"

    def to_bytes(self) -> bytes:
        if not self.mks:
            return self.vmk.reveal()
        out = bytearray(b"\x01" + self.vmk.reveal())
        for kid in sorted(self.mks):
            k = kid.encode()
            out += bytes([len(k)]) + k + self.mks[kid].reveal()
        return bytes(out)

    @classmethod
    def from_bytes(cls, data: bytes) -> SlotPayload:
        if len(data) == VMK_SIZE:
            return cls(Secret(data))
        if len(data) < 1 + VMK_SIZE or data[0] != 1:
            raise IntegrityError("keyslot payload is malformed")
        vmk = Secret(data[1 : 1 + VMK_SIZE])
        mks: dict[str, Secret] = {}
        i = 1 + VMK_SIZE
        while i < len(data):
            n = data[i]
            kid = data[i + 1 : i + 1 + n].decode("ascii", errors="replace")
            key = data[i + 1 + n : i + 1 + n + MK_SIZE]
            if len(key) != MK_SIZE:
                raise IntegrityError("keyslot payload is malformed")
            mks[kid] = Secret(key)
            i += 1 + n + MK_SIZE
        return cls(vmk, mks)


def check_private_file(path: Path) -> None:
    st = path.stat()
    if st.st_mode & 0o077:
        raise UsageError(
            f"{path} is readable by group or others (mode {stat.S_IMODE(st.st_mode):04o});"
            " run: chmod 600 " + str(path)
        )


def read_key_file(path: Path) -> Secret:
    try:
        check_private_file(path)
        text = path.read_bytes().strip()
    except FileNotFoundError:
        raise UsageError(f"key file {path} does not exist") from None
    except PermissionError:
        raise UsageError(f"key file {path} is not readable") from None
    try:
        raw = b64d(text.decode("ascii"))
    except (IntegrityError, UnicodeDecodeError):
        raw = b""
    if len(raw) != KEYFILE_SIZE:
        raise UsageError(f"key file {path} is not a cryptfs key (base64 of 32 bytes)")
    return Secret(raw)


def create_key_file(path: Path) -> Secret:
    """Write a new random key, mode 0600, refusing to overwrite."""
    key = random_bytes(KEYFILE_SIZE)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(b64e(key).encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())
    return Secret(key)


def read_passphrase_file(path: Path) -> Secret:
    try:
        check_private_file(path)
        data = path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"passphrase file {path} does not exist") from None
    data = data.rstrip(b"\r\n")
    if not data:
        raise UsageError(f"passphrase file {path} is empty")
    return Secret(data)


@dataclass
class VolumeConfig:
    volume_id: bytes
    chunk_log2: int
    encrypt_names: bool
    keyslots: list[dict[str, Any]] = field(default_factory=list)
    # how new data keys are wrapped: {"scheme": "gcm", "kid": K} or {"scheme": "kms", "kid": ARN}
    dek: dict[str, str] = field(default_factory=lambda: dict(LEGACY_DEK))
    # optional server-side encryption: {"mode": "s3"}, {"mode": "kms", "key_id": K},
    # {"mode": "c", "key_md5": b64}
    sse: dict[str, str] | None = None
    stored_mac: str = field(default="", repr=False)

    # -- slots -----------------------------------------------------------------------------

    def _slot_kek(self, slot: dict[str, Any], source: KeySource) -> Secret | None:
        if slot["type"] == "keyfile" and source.keyfile is not None:
            return hkdf(source.keyfile, b64d(slot["salt"]), b"cryptfs/v1/keyfile")
        if slot["type"] == "passphrase" and source.passphrase is not None:
            if slot.get("kdf") != "argon2id":
                raise UnsupportedFormat(f"passphrase KDF {slot.get('kdf')!r} not supported")
            return argon2id(
                source.passphrase.reveal(),
                b64d(slot["salt"]),
                t=slot["t"],
                m_kib=slot["m"],
                p=slot["p"],
            )
        return None

    def _slot_aad(self, slot: dict[str, Any]) -> bytes:
        params = {k: v for k, v in slot.items() if k != "wrapped"}
        return b"cryptfs/v1/keyslot\0" + self.volume_id + _canon(params)

    def new_slot_id(self, kind: str) -> str:
        taken = {s["id"] for s in self.keyslots}
        while True:
            sid = f"{kind}-{random_bytes(3).hex()}"
            if sid not in taken:
                return sid

    def slot(self, slot_id: str) -> dict[str, Any]:
        for s in self.keyslots:
            if s["id"] == slot_id:
                return s
        raise UsageError(
            f"no keyslot {slot_id!r} (this volume has: {[s['id'] for s in self.keyslots]})"
        )

    def add_slot(self, payload: SlotPayload, source: KeySource) -> str:
        """Add a key-file or passphrase slot wrapping ``payload``; returns its id."""
        slot: dict[str, Any] = {"salt": b64e(random_bytes(16))}
        if source.keyfile is not None:
            slot.update(type="keyfile", id=self.new_slot_id("keyfile"))
        elif source.passphrase is not None:
            fast = os.environ.get("CRYPTFS_TEST_FAST_KDF") == "1"
            slot.update(type="passphrase", id=self.new_slot_id("passphrase"), kdf="argon2id")
            slot.update(ARGON2_TEST if fast else ARGON2_DEFAULT)
        else:
            raise UsageError("no key given")
        kek = self._slot_kek(slot, source)
        assert kek is not None
        slot["wrapped"] = b64e(Aead(kek).seal_random(payload.to_bytes(), self._slot_aad(slot)))
        self.keyslots.append(slot)
        return str(slot["id"])

    def add_kms_slot(self, slot_id: str, key_arn: str, blob: bytes) -> None:
        """Record a KMS slot; ``blob`` is KMS Encrypt(payload) under ``kms_slot_context``."""
        self.keyslots.append({"type": "kms", "id": slot_id, "key_id": key_arn, "blob": b64e(blob)})

    def remove_slot(self, slot_id: str) -> dict[str, Any]:
        slot = self.slot(slot_id)
        if len(self.keyslots) == 1:
            raise UsageError("refusing to remove the last keyslot (the volume would be lost)")
        self.keyslots.remove(slot)
        return slot

    def kms_slots(self) -> list[dict[str, Any]]:
        return [s for s in self.keyslots if s["type"] == "kms"]

    def unlock_local(self, source: KeySource) -> tuple[SlotPayload, str]:
        """Open the first key-file/passphrase slot the source fits; WrongKey if none does."""
        tried = False
        for slot in self.keyslots:
            kek = self._slot_kek(slot, source)
            if kek is None:
                continue
            tried = True
            try:
                raw = Aead(kek).open_random(b64d(slot["wrapped"]), self._slot_aad(slot))
            except IntegrityError:
                continue
            payload = SlotPayload.from_bytes(raw)
            self.verify(payload)
            return payload, str(slot["id"])
        if not tried:
            kinds = sorted({s["type"] for s in self.keyslots})
            raise WrongKey(f"this volume has no keyslot of the given kind (it has: {kinds})")
        raise WrongKey("wrong key or passphrase: no keyslot of this volume opens with it")

    def verify(self, payload: SlotPayload) -> None:
        """The config authenticates under the payload's VMK (else it was tampered with)."""
        self._check_mac(VolumeKeys.derive(payload.vmk, self.volume_id))

    # -- serialisation ---------------------------------------------------------------------

    def _body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "cryptfs": FORMAT_VERSION,
            "volume_id": b64e(self.volume_id),
            "chunk_log2": self.chunk_log2,
            "names": "aes-siv" if self.encrypt_names else "plain",
            "suite": 1,
        }
        # absent fields keep the MAC of volumes written before they existed
        if self.dek != LEGACY_DEK:
            body["dek"] = self.dek
        if self.sse is not None:
            body["sse"] = self.sse
        return body

    def _mac(self, keys: VolumeKeys) -> str:
        return b64e(hmac_sha256(keys.config_mac, b"cryptfs/v1/config\0" + _canon(self._body())))

    def _check_mac(self, keys: VolumeKeys) -> None:
        if not constant_time_eq(self._mac(keys).encode(), str(self.stored_mac).encode()):
            raise IntegrityError("volume config does not authenticate (tampered)")

    def to_bytes(self, vmk: Secret) -> bytes:
        body = self._body()
        body["keyslots"] = self.keyslots
        body["mac"] = self._mac(VolumeKeys.derive(vmk, self.volume_id))
        self.stored_mac = body["mac"]
        return json.dumps(body, indent=1, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes) -> VolumeConfig:
        try:
            d = json.loads(data)
        except ValueError:
            raise IntegrityError("volume config is not valid JSON") from None
        if not isinstance(d, dict) or d.get("cryptfs") != FORMAT_VERSION:
            raise UnsupportedFormat(
                f"volume format {d.get('cryptfs') if isinstance(d, dict) else '?'!r} "
                "not supported by this cryptfs"
            )
        unknown = set(d) - _KNOWN_FIELDS
        if unknown:
            raise UnsupportedFormat(f"volume config has unknown fields {sorted(unknown)}")
        if d.get("suite") != 1 or d.get("names") not in ("aes-siv", "plain"):
            raise UnsupportedFormat("volume suite or name mode not supported")
        try:
            cfg = cls(
                volume_id=b64d(d["volume_id"]),
                chunk_log2=int(d["chunk_log2"]),
                encrypt_names=d["names"] == "aes-siv",
                keyslots=[dict(s) for s in d["keyslots"]],
                dek={str(k): str(v) for k, v in d.get("dek", LEGACY_DEK).items()},
                sse={str(k): str(v) for k, v in d["sse"].items()} if "sse" in d else None,
            )
            cfg.stored_mac = str(d["mac"])
            for s in cfg.keyslots:
                str(s["id"]), str(s["type"])
        except (KeyError, TypeError, ValueError, AttributeError):
            raise IntegrityError("volume config is malformed") from None
        if cfg.dek.get("scheme") not in (SCHEME_LOCAL, SCHEME_KMS) or not cfg.dek.get("kid"):
            raise UnsupportedFormat(f"data-key scheme {cfg.dek!r} not supported")
        if cfg.sse is not None and cfg.sse.get("mode") not in SSE_MODES:
            raise UnsupportedFormat(f"server-side encryption {cfg.sse!r} not supported")
        check_chunk_log2(cfg.chunk_log2)
        return cfg

    @classmethod
    def create(cls, chunk_log2: int, encrypt_names: bool) -> tuple[VolumeConfig, Secret]:
        check_chunk_log2(chunk_log2)
        return cls(random_bytes(16), chunk_log2, encrypt_names), Secret(random_bytes(VMK_SIZE))
