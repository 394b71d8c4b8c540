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
from cryptfs.format.keys import (
    LOCAL_KID,
    MK_SIZE,
    SCHEME_KMS,
    SCHEME_LOCAL,
    VolumeKeys,
    master_derive,
)
from cryptfs.format.names import b64d, b64e

CONFIG_NAME = ".cryptfs.json"
FORMAT_VERSION = 2  # what new volumes are written as; revision 1 is still read (and kept)
CONFIG_MAX = 1 << 20  # a config is a few KiB; anything larger is refused unread
MAX_SLOTS = 64
VMK_SIZE = 32
KEYFILE_SIZE = 32
# RFC 9106 "second recommended" parameters (t=3, 64 MiB, p=4): ~2 s on a small server.
ARGON2_DEFAULT = {"t": 3, "m": 65536, "p": 4}
# What a slot read from the bucket may ask for: a planted slot must neither hang a mount nor
# exhaust its memory (docs/FORMAT.md §7.2).
ARGON2_MAX = {"t": 16, "m": 1 << 20, "p": 64}
_KNOWN_FIELDS = {
    "cryptfs", "volume_id", "chunk_log2", "names", "suite", "keyslots", "mac", "dek", "sse"
}  # fmt: skip
_KNOWN_FIELDS_V2 = _KNOWN_FIELDS | {"epoch", "objects", "kms_keys", "retiring", "segment_log2"}
# revision-3 bodies (docs/FORMAT.md §8.5): segments of 2^segment_log2 plaintext bytes
SEGMENT_LOG2_DEFAULT = 23
SEGMENTS_DEFAULT = -1  # (``create``: the default, or the chunk size if that is larger)
MAX_SEGMENT_LOG2 = 26  # (an upload holds a few segments per part in flight: 64 MiB at most)
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
    # KMS keys (id, ARN or alias) the user names for the keyslots (--kms-key-id): tried even
    # if this machine has not seen them open the volume (docs/FORMAT.md §7.5)
    kms_keys: tuple[str, ...] = ()

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
    """What every keyslot wraps: the VMK and the volume's master keys (kid -> key).

    Encodings (docs/FORMAT.md §1, §7.1):

    - revision 1: exactly 32 bytes = a VMK alone, or ``0x01 ‖ VMK ‖ (len(kid) u8 ‖ kid ‖
      key[32])*`` with kids in sorted order; ``current`` is None and the current key is the
      VMK itself (kid ``vmk``);
    - revision 2: ``0x02 ‖ VMK ‖ u8 len(cur) ‖ cur ‖ (len(kid) u8 ‖ kid ‖ key[32])*``; the
      current master key authenticates the config and new metadata, and the VMK is accepted
      for nothing but names and the cache.
    """

    vmk: Secret
    mks: dict[str, Secret] = field(default_factory=dict)
    current: str | None = None

    def __repr__(self) -> str:
        return f"<SlotPayload rev={self.rev} cur={self.cur} mks={sorted(self.mks)}>"

    @property
    def rev(self) -> int:
        return 1 if self.current is None else 2

    @property
    def cur(self) -> str:
        """The kid of the key that authenticates the config and new metadata."""
        return self.current if self.current is not None else LOCAL_KID

    def master(self, kid: str) -> Secret | None:
        """Master key ``kid``.  The VMK stands for kid ``vmk`` in revision-1 payloads; a
        revision-2 payload accepts it only where it lists it (the first rotation of an
        upgraded volume, until it finishes)."""
        if kid == LOCAL_KID and self.current is None:
            return self.vmk
        return self.mks.get(kid)  # revision 2: "vmk" only while a rotation retires it

    def to_bytes(self) -> bytes:
        if self.current is None and not self.mks:
            return self.vmk.reveal()
        if self.current is None:
            out = bytearray(b"\x01" + self.vmk.reveal())
        else:
            if self.current not in self.mks:
                raise ValueError("the current master key must be in the payload")
            c = self.current.encode()
            out = bytearray(b"\x02" + self.vmk.reveal() + bytes([len(c)]) + c)
        for kid in sorted(self.mks):
            k = kid.encode()
            out += bytes([len(k)]) + k + self.mks[kid].reveal()
        return bytes(out)

    @classmethod
    def from_bytes(cls, data: bytes) -> SlotPayload:
        if len(data) == VMK_SIZE:
            return cls(Secret(data))
        if len(data) < 1 + VMK_SIZE or data[0] not in (1, 2):
            raise IntegrityError("keyslot payload is malformed")
        vmk = Secret(data[1 : 1 + VMK_SIZE])
        i = 1 + VMK_SIZE
        current: str | None = None
        if data[0] == 2:
            current, i = _kid_at(data, i)
        mks: dict[str, Secret] = {}
        while i < len(data):
            kid, i = _kid_at(data, i)
            key = data[i : i + MK_SIZE]
            if len(key) != MK_SIZE or kid in mks:
                raise IntegrityError("keyslot payload is malformed")
            mks[kid] = Secret(key)
            i += MK_SIZE
        if current is not None and current not in mks:
            raise IntegrityError("keyslot payload names a current key it does not hold")
        return cls(vmk, mks, current)


def _kid_at(data: bytes, i: int) -> tuple[str, int]:
    if i >= len(data):
        raise IntegrityError("keyslot payload is malformed")
    n = data[i]
    raw = data[i + 1 : i + 1 + n]
    if not n or len(raw) != n:
        raise IntegrityError("keyslot payload is malformed")
    try:
        return raw.decode("ascii"), i + 1 + n
    except UnicodeDecodeError:
        raise IntegrityError("keyslot payload is malformed") from None


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
    # revision 2 (docs/FORMAT.md §7.2)
    version: int = FORMAT_VERSION
    epoch: int = 0
    kms_keys: list[str] = field(default_factory=list)
    objects: list[int] = field(default_factory=lambda: [2])
    # during a rotation: the master keys (and KMS keys) being retired, and the last moment
    # (the S3 server's Last-Modified clock, epoch seconds; 0 = not known yet) an object under
    # one of them may have been written (docs/FORMAT.md §7.8)
    retiring: Retiring | None = None
    # set: files are uploaded with revision-3 bodies, segments of 2^segment_log2 bytes
    # (docs/FORMAT.md §8.5); absent on volumes made before it (and until `cryptfs upgrade`)
    segment_log2: int | None = None

    @property
    def accepted_objects(self) -> frozenset[int]:
        return frozenset(self.objects) if self.version >= 2 else frozenset({1})

    @property
    def write_rev(self) -> int:
        """The metadata revision new objects get."""
        if self.version < 2:
            return 1
        return 3 if 3 in self.objects else 2

    def allowed_kms(self) -> frozenset[str]:
        """KMS keys whose data keys this volume accepts (revision 1: its ``dek`` key only)."""
        if self.version >= 2:
            return frozenset(self.kms_keys)
        return frozenset([self.dek["kid"]] if self.dek.get("scheme") == SCHEME_KMS else [])

    # -- slots -----------------------------------------------------------------------------

    def _slot_kek(self, slot: dict[str, Any], source: KeySource) -> Secret | None:
        if slot["type"] == "keyfile" and source.keyfile is not None:
            return hkdf(source.keyfile, b64d(slot["salt"]), b"cryptfs/v1/keyfile")
        if slot["type"] == "passphrase" and source.passphrase is not None:
            if slot.get("kdf") != "argon2id":
                raise UnsupportedFormat(f"passphrase KDF {slot.get('kdf')!r} not supported")
            check_argon2(slot)
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

    def add_slot(
        self, payload: SlotPayload, source: KeySource, argon2: dict[str, int] | None = None
    ) -> str:
        """Add a key-file or passphrase slot wrapping ``payload``; returns its id.

        ``argon2`` overrides the KDF parameters (test suites; never from the environment)."""
        slot: dict[str, Any] = {"salt": b64e(random_bytes(16))}
        if source.keyfile is not None:
            slot.update(type="keyfile", id=self.new_slot_id("keyfile"))
        elif source.passphrase is not None:
            slot.update(type="passphrase", id=self.new_slot_id("passphrase"), kdf="argon2id")
            slot.update(argon2 or ARGON2_DEFAULT)
            check_argon2(slot)
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
        """The config authenticates under the payload's current key (else it was tampered
        with, or written under a key this payload does not hold), and names only keys the
        payload can stand behind."""
        if self.version < 2 and payload.rev >= 2:
            # a revision-2 payload is only ever sealed beside a revision-2 config: a
            # revision-1 one (its MAC keyed by the VMK, which never rotates) would let
            # whoever held any earlier key forge it
            raise IntegrityError("a revision-1 volume config over a revision-2 keyslot: refused")
        if not constant_time_eq(self._mac(payload).encode(), str(self.stored_mac).encode()):
            raise IntegrityError("volume config does not authenticate (tampered or replayed)")
        if self.version < 2:
            return
        local, kid = self.dek["scheme"] == SCHEME_LOCAL, self.dek["kid"]
        if local and payload.master(kid) is None:
            raise IntegrityError("volume config names a data-key target it may not use")
        if not local and kid not in self.kms_keys:
            raise IntegrityError("volume config's KMS target is not among its KMS keys")

    # -- serialisation ---------------------------------------------------------------------

    def _body(self) -> dict[str, Any]:
        if self.version >= 2:
            return self._body_v2()
        body: dict[str, Any] = {
            "cryptfs": 1,
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

    def retiring_kids(self) -> frozenset[str]:
        return frozenset(self.retiring.kids) if self.retiring else frozenset()

    def _body_v2(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "cryptfs": self.version,
            "volume_id": b64e(self.volume_id),
            "chunk_log2": self.chunk_log2,
            "names": "aes-siv" if self.encrypt_names else "plain",
            "suite": 1,
            "epoch": self.epoch,
            "objects": sorted(self.objects),
            "dek": self.dek,
            "kms_keys": sorted(self.kms_keys),
            "keyslots": self.keyslots,
        }
        if self.sse is not None:
            body["sse"] = self.sse
        if self.retiring is not None:
            body["retiring"] = self.retiring.to_json()
        if self.segment_log2 is not None:
            body["segment_log2"] = self.segment_log2
        return body

    def _mac(self, payload: SlotPayload) -> str:
        if self.version < 2:
            keys = VolumeKeys.derive(payload.vmk, self.volume_id)
            msg = b"cryptfs/v1/config\0" + _canon(self._body())
            return b64e(hmac_sha256(keys.config_mac, msg))
        cur = payload.cur
        mk = payload.master(cur)
        assert mk is not None
        key = master_derive(mk, self.volume_id, "config", cur)
        return b64e(hmac_sha256(key, b"cryptfs/v2/config\0" + _canon(self._body())))

    def to_bytes(self, payload: SlotPayload) -> bytes:
        body = self._body()
        body["keyslots"] = self.keyslots
        body["mac"] = self._mac(payload)
        self.stored_mac = body["mac"]
        return json.dumps(body, indent=1, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes) -> VolumeConfig:
        if len(data) > CONFIG_MAX:
            raise IntegrityError(f"volume config of {len(data)} bytes is over {CONFIG_MAX}")
        try:
            d = json.loads(data)
        except ValueError:
            raise IntegrityError("volume config is not valid JSON") from None
        version = d.get("cryptfs") if isinstance(d, dict) else None
        if version not in (1, 2) or isinstance(version, bool):
            raise UnsupportedFormat(
                f"volume format {version if isinstance(d, dict) else '?'!r} "
                "not supported by this cryptfs"
            )
        unknown = set(d) - (_KNOWN_FIELDS if version == 1 else _KNOWN_FIELDS_V2)
        if unknown:
            raise UnsupportedFormat(f"volume config has unknown fields {sorted(unknown)}")
        if d.get("suite") != 1 or d.get("names") not in ("aes-siv", "plain"):
            raise UnsupportedFormat("volume suite or name mode not supported")
        try:
            cfg = cls(
                volume_id=b64d(_str(d["volume_id"])),
                chunk_log2=_int(d["chunk_log2"]),
                encrypt_names=d["names"] == "aes-siv",
                keyslots=[_slot(s) for s in _list(d["keyslots"])],
                dek=_str_map(d.get("dek", LEGACY_DEK)),
                sse=_str_map(d["sse"]) if "sse" in d else None,
                version=version,
            )
            cfg.stored_mac = _str(d["mac"])
            if version >= 2:
                cfg.epoch = _int(d["epoch"])
                cfg.objects = [_int(x) for x in _list(d["objects"])]
                cfg.kms_keys = [_str(x) for x in _list(d["kms_keys"])]
                if "retiring" in d:
                    cfg.retiring = Retiring.from_json(d["retiring"])
                if "segment_log2" in d:
                    cfg.segment_log2 = _int(d["segment_log2"])
        except (KeyError, TypeError, ValueError, AttributeError):
            raise IntegrityError("volume config is malformed") from None
        if len(cfg.volume_id) != 16 or len(cfg.keyslots) > MAX_SLOTS:
            raise IntegrityError("volume config is malformed")
        if len({s["id"] for s in cfg.keyslots}) != len(cfg.keyslots):
            raise IntegrityError("volume config has two keyslots of one id")
        if version >= 2 and (
            cfg.epoch < 1
            or not cfg.objects
            or not set(cfg.objects) <= {1, 2, 3}
            # (revision-3 objects, and only they, may have revision-3 bodies: FORMAT.md §8.5)
            or (3 in cfg.objects) != (cfg.segment_log2 is not None)
        ):
            raise IntegrityError("volume config is malformed (epoch or object revisions)")
        if cfg.dek.get("scheme") not in (SCHEME_LOCAL, SCHEME_KMS) or not cfg.dek.get("kid"):
            raise UnsupportedFormat(f"data-key scheme {cfg.dek!r} not supported")
        if cfg.sse is not None and cfg.sse.get("mode") not in SSE_MODES:
            raise UnsupportedFormat(f"server-side encryption {cfg.sse!r} not supported")
        check_chunk_log2(cfg.chunk_log2)
        if cfg.segment_log2 is not None:
            check_segment_log2(cfg.segment_log2, cfg.chunk_log2)
        return cfg

    @classmethod
    def create(
        cls, chunk_log2: int, encrypt_names: bool, segment_log2: int | None = SEGMENTS_DEFAULT
    ) -> tuple[VolumeConfig, Secret]:
        """A new volume's config; ``segment_log2`` None: its files get revision-1 bodies
        (tests of what volumes made before revision 3 hold)."""
        check_chunk_log2(chunk_log2)
        seg = segment_log2
        if seg == SEGMENTS_DEFAULT:
            seg = max(SEGMENT_LOG2_DEFAULT, chunk_log2)
        if seg is not None:
            check_segment_log2(seg, chunk_log2)
        cfg = cls(random_bytes(16), chunk_log2, encrypt_names, epoch=1, objects=[2])
        cfg.segment_log2 = seg
        if seg is not None:
            cfg.objects = [2, 3]
        return cfg, Secret(random_bytes(VMK_SIZE))


def check_segment_log2(segment_log2: int, chunk_log2: int) -> None:
    """A segment holds whole chunks, and at most 64 MiB (FORMAT.md §7.2, §8.5)."""
    if isinstance(segment_log2, bool) or not chunk_log2 <= segment_log2 <= MAX_SEGMENT_LOG2:
        raise UnsupportedFormat(
            f"segment size 2^{segment_log2} outside 2^{chunk_log2} (the chunk)"
            f"..2^{MAX_SEGMENT_LOG2}"
        )


@dataclass
class Retiring:
    """Keys a rotation is retiring, accepted only for objects the S3 server last modified no
    later than ``until`` (its own clock: a bucket writer cannot backdate Last-Modified)."""

    kids: list[str]
    kms: list[str] = field(default_factory=list)
    until: int = 0  # 0: being set (nothing under a retiring key is accepted meanwhile)
    began: int = 0  # the rotating client's clock at the first write (bounds ``until``)

    def to_json(self) -> dict[str, Any]:
        return {
            "kids": sorted(self.kids),
            "kms": sorted(self.kms),
            "until": self.until,
            "began": self.began,
        }

    @classmethod
    def from_json(cls, v: object) -> Retiring:
        if not isinstance(v, dict) or set(v) != {"kids", "kms", "until", "began"}:
            raise ValueError("retiring")
        r = cls([_str(k) for k in _list(v["kids"])], [_str(k) for k in _list(v["kms"])])
        r.until, r.began = _int(v["until"]), _int(v["began"])
        return r

    def admits(self, modified: float | None) -> bool:
        """May an object last modified at ``modified`` be under a retiring key?"""
        return self.until > 0 and modified is not None and 0 < modified <= self.until


def check_argon2(slot: dict[str, Any]) -> None:
    """Argon2id parameters within what a mount will spend (a planted slot is refused)."""
    try:
        t, m, p = (_int(slot[k]) for k in ("t", "m", "p"))
    except (KeyError, TypeError, ValueError):
        raise IntegrityError("passphrase slot has malformed KDF parameters") from None
    if not (1 <= t <= ARGON2_MAX["t"] and 1 <= p <= ARGON2_MAX["p"] and 8 * p <= m):
        raise IntegrityError(f"passphrase slot KDF parameters out of bounds (t={t}, p={p})")
    if m > ARGON2_MAX["m"]:
        raise IntegrityError(f"passphrase slot asks for {m} KiB of memory (at most 1 GiB)")


def _int(v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError("not an integer")
    return v


def _str(v: object) -> str:
    if not isinstance(v, str):
        raise TypeError("not a string")
    return v


def _list(v: object) -> list[Any]:
    if not isinstance(v, list):
        raise TypeError("not a list")
    return v


def _str_map(v: object) -> dict[str, str]:
    if not isinstance(v, dict):
        raise TypeError("not an object")
    return {_str(k): _str(x) for k, x in v.items()}


_SLOT_FIELDS = {
    "keyfile": {"type", "id", "salt", "wrapped"},
    "passphrase": {"type", "id", "salt", "wrapped", "kdf", "t", "m", "p"},
    "kms": {"type", "id", "key_id", "blob"},
}


def _slot(v: object) -> dict[str, Any]:
    """A keyslot with exactly the fields of its type, of the right types."""
    if not isinstance(v, dict):
        raise TypeError("keyslot is not an object")
    kind = _str(v.get("type"))
    want = _SLOT_FIELDS.get(kind)
    if want is None:
        raise UnsupportedFormat(f"keyslot type {kind!r} not supported")
    if set(v) != want:
        raise ValueError("keyslot fields")
    for k, x in v.items():
        (_int if k in ("t", "m", "p") else _str)(x)
    return dict(v)
