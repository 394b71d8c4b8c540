"""What an attacker can build from docs/FORMAT.md alone: sealed bodies, wrapped data keys,
config MACs, and raw-S3 access to a volume's objects.

Like tests/reference_decryptor.py (which it builds on), this imports nothing from ``cryptfs``:
an attacker has the public format, the bucket and, in some scenarios, an old key file - never
the implementation's keys.
"""

from __future__ import annotations

import base64
import hmac
import json
import os
import time
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tests.reference_decryptor import (
    Keys,
    _payload,
    b64u,
    body_keys,
    canonical,
    hkdf,
    open_keyfile_slot,
)

HEADER = 92
CONFIG = ".cryptfs.json"
MARKER = ".cryptfs.dir"


def b64e(data: bytes) -> str:
    """Unpadded base64url, as every binary field of the format."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# -- §2 bodies -------------------------------------------------------------------------------


def seal_body(dek: bytes, file_id: bytes, salt: bytes, chunk_log2: int, plaintext: bytes) -> bytes:
    """A whole object body of FORMAT.md §2, sealed under ``dek`` with the given salt."""
    k_content, commitment = body_keys(dek, salt, chunk_log2, file_id)
    header = b"CRYPTFS" + bytes([1, 1, chunk_log2]) + b"\0\0" + file_id + salt + commitment
    assert len(header) == HEADER
    c = 1 << chunk_log2
    pieces = [plaintext[i : i + c] for i in range(0, len(plaintext), c)] or [b""]
    out = bytearray(header)
    for i, piece in enumerate(pieces):
        nonce = i.to_bytes(11, "big") + (b"\x01" if i == len(pieces) - 1 else b"\x00")
        out += AESGCM(k_content).encrypt(nonce, piece, header)
    return bytes(out)


def commits_to(dek: bytes, body: bytes) -> bool:
    """Does the body carry the key commitment of ``dek`` (§2: its header's; §8.5: its
    manifest's)?  (True: ``dek`` opens it.)"""
    if is_body3(body):
        trailer = body[len(body) - int.from_bytes(body[-8:-4], "big") :]
        prk = hmac.new(trailer[:32], dek, "sha256").digest()
        return hmac.compare_digest(_expand(prk, b"cryptfs/v3/manifest/commit"), trailer[-40:-8])
    header = body[:HEADER]
    chunk_log2, file_id, salt = header[9], header[12:28], header[28:60]
    _, commitment = body_keys(dek, salt, chunk_log2, file_id)
    return hmac.compare_digest(commitment, header[60:92])


def header_fields(body: bytes) -> tuple[bytes, bytes]:
    """(file_id, salt) of a §2 body."""
    return body[12:28], body[28:60]


# -- §8.5 bodies -----------------------------------------------------------------------------


def is_body3(body: bytes) -> bool:
    """A body of revision 3 ends with its trailer's magic (a §2 body ends with a GCM tag)."""
    return body[-4:] == b"CFT3"


def _expand(prk: bytes, info: bytes) -> bytes:
    from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

    return HKDFExpand(hashes.SHA256(), 32, info).derive(prk)


def seal_body3(
    dek: bytes,
    volume_id: bytes,
    file_id: bytes,
    gen: bytes,
    seg: int,
    chunk: int,
    plaintext: bytes,
    mtime_ns: int = 0,
) -> bytes:
    """A whole object body of FORMAT.md §8.5 for file ``file_id``'s version ``gen``, sealed
    under ``dek`` (its manifest) and segment keys of the attacker's own."""
    import hashlib

    sha = lambda d: hashlib.sha256(d).digest()  # noqa: E731
    n = max(1, -(-len(plaintext) // seg))
    out, entries = bytearray(), b""
    for j in range(n):
        piece = plaintext[j * seg : (j + 1) * seg]
        pk, salt = os.urandom(32), os.urandom(32)
        prk = hmac.new(salt, pk, "sha256").digest()
        key, commit = _expand(prk, b"cryptfs/v3/seg"), _expand(prk, b"cryptfs/v3/commit")
        header = b"CFS3" + j.to_bytes(4, "big") + file_id + salt + commit
        k = max(1, -(-len(piece) // chunk))
        chunks = [
            AESGCM(key).encrypt(
                i.to_bytes(11, "big") + (b"\x01" if i == k - 1 else b"\x00"),
                piece[i * chunk : (i + 1) * chunk],
                header + k.to_bytes(4, "big"),
            )
            for i in range(k)
        ]
        table = b"".join(sha(c) for c in chunks)
        out += header + table + b"".join(chunks)
        entries += pk + salt + sha(header + table)
    r = os.urandom(32)
    prk = hmac.new(r, dek, "sha256").digest()
    manifest = len(plaintext).to_bytes(8, "big") + mtime_ns.to_bytes(8, "big", signed=True)
    manifest += n.to_bytes(4, "big") + entries
    aad = b"cryptfs/v3/manifest\0" + volume_id + file_id + gen
    sealed = AESGCM(_expand(prk, b"cryptfs/v3/manifest/key")).encrypt(bytes(12), manifest, aad)
    trailer = r + sealed + _expand(prk, b"cryptfs/v3/manifest/commit")
    return bytes(out + trailer + (len(trailer) + 8).to_bytes(4, "big") + b"CFT3")


def forge_like(
    body: bytes, dek: bytes, plaintext: bytes, cfg: dict[str, Any], gen: bytes | None = None
) -> bytes:
    """A body of ``plaintext`` sealed under ``dek`` in the place of ``body``: the same
    revision, file id and generation (§2: the header's salt; §8.5: ``gen``, sealed in the
    attributes, which a bucket writer without the key cannot read: a guess unless given)."""
    chunk = 1 << cfg["chunk_log2"]
    if not is_body3(body):
        file_id, salt = header_fields(body)
        return seal_body(dek, file_id, salt, cfg["chunk_log2"], plaintext)
    seg = 1 << cfg["segment_log2"]
    gen = gen or os.urandom(32)
    return seal_body3(dek, b64u(cfg["volume_id"]), body[8:24], gen, seg, chunk, plaintext)


def body_file_id(body: bytes) -> bytes:
    """The file id a body names (§2: its header; §8.5: its first segment's header)."""
    return body[8:24] if is_body3(body) else body[12:28]


# -- §1 keys ---------------------------------------------------------------------------------


def kms_file_context(volume_id: bytes, file_id: bytes) -> dict[str, str]:
    return {"cryptfs:volume": b64e(volume_id), "cryptfs:file": b64e(file_id)}


def wrap_local(keys: Keys, kid: str, dek: bytes, file_id: bytes) -> str:
    """``cfs-k`` of a data key wrapped as §1 says under local key ``kid``: ``vmk`` (the legacy
    key derived from the VMK, which no rotation changes) or a master key in ``keys.mks``."""
    if kid == "vmk":
        kek = keys.purpose("kek")
    else:
        kek = hkdf(keys.mks[kid], keys.volume_id, b"cryptfs/v1/mk-kek\0" + kid.encode())
    aad = b"cryptfs/v1/wrap\0" + keys.volume_id + file_id + kid.encode()
    nonce = os.urandom(12)
    return b64e(nonce + AESGCM(kek).encrypt(nonce, dek, aad))


def _local_keks(keys: Keys, kid: str) -> list[bytes]:
    """Every key-encryption key the holder of ``keys`` can derive for ``kid``: the legacy one
    from the VMK (§1 ``kek``) and one from each master key it knows."""
    keks = [keys.purpose("kek")]
    for mk in keys.mks.values():
        keks.append(hkdf(mk, keys.volume_id, b"cryptfs/v1/mk-kek\0" + kid.encode()))
    return keks


def try_unwrap(keys: Keys, md: dict[str, str]) -> bytes | None:
    """The data key in an object's metadata by every means the holder of ``keys`` has (any
    key-encryption key it can derive, in the wrapping of §1 and of §7.4); None if none works."""
    if md.get("cfs-w") != "gcm" or "cfs-k" not in md:
        return None
    file_id, blob, kid = b64u(md["cfs-f"]), b64u(md["cfs-k"]), md["cfs-kid"]
    aad1 = b"cryptfs/v1/wrap\0" + keys.volume_id + file_id + kid.encode()
    aad2 = b"cryptfs/v2/wrap\0" + keys.volume_id + file_id + kid.encode()
    for kek in _local_keks(keys, kid):
        attempts = [(kek, blob[:12], blob[12:], aad1)]
        if len(blob) > 32:
            k2 = HKDF(hashes.SHA256(), 32, blob[:32], b"cryptfs/v2/wrap").derive(kek)
            attempts.append((k2, bytes(12), blob[32:], aad2))
        for key, nonce, ct, aad in attempts:
            try:
                return AESGCM(key).decrypt(nonce, ct, aad)
            except Exception:
                continue
    return None


def directory_marker(keys: Keys, path: bytes, mode: int = 0o755) -> dict[str, str]:
    """The metadata of a directory marker of FORMAT.md §3 (its body is empty) for ``path``,
    attributes sealed under the VMK's attribute key."""
    file_id, now = os.urandom(16), time.time_ns()
    attrs = {"t": "d", "m": mode, "u": os.getuid(), "g": os.getgid(), "mt": now, "ct": now}
    attrs |= {"at": now, "sz": 0, "gen": ""}
    aad = b"cryptfs/v1/attrs\0" + keys.volume_id + file_id + path
    nonce = os.urandom(12)
    sealed = nonce + AESGCM(keys.attrs).encrypt(nonce, canonical(attrs), aad)
    return {"cfs": "1", "cfs-f": b64e(file_id), "cfs-w": "-", "cfs-kid": "-", "cfs-a": b64e(sealed)}


def keyfile_bytes(text: str) -> bytes:
    """The 32 key bytes of a key file (b64u and a newline)."""
    return b64u(text.strip())


def config_mac(keys: Keys, cfg: dict[str, Any]) -> str:
    """``mac`` of FORMAT.md §1 over a config's authenticated fields."""
    body = {k: cfg[k] for k in ("cryptfs", "volume_id", "chunk_log2", "names", "suite")}
    for optional in ("dek", "sse"):
        if optional in cfg:
            body[optional] = cfg[optional]
    mac = hmac.new(keys.purpose("config"), b"cryptfs/v1/config\0" + canonical(body), "sha256")
    return b64e(mac.digest())


def open_keyslot(config: bytes, keyfile_text: str) -> Keys:
    """What a key file's slot in ``config`` holds (VMK, master keys), without checking the
    config's MAC: all an attacker with that key file and that config copy learns."""
    cfg = json.loads(config)
    volume_id = b64u(cfg["volume_id"])
    vmk, mks, current = _payload(open_keyfile_slot(cfg, keyfile_bytes(keyfile_text)))
    keys = Keys(volume_id, vmk, mks, b"", b"", cfg["names"] == "aes-siv", cfg["chunk_log2"])
    keys.names, keys.attrs = keys.purpose("names", 64), keys.purpose("attrs")
    keys.current = current
    if cfg["cryptfs"] == 2:  # (the object revisions that config accepts, §7.2)
        keys.revision, keys.objects = 2, tuple(cfg["objects"])
        keys.segment_log2 = cfg.get("segment_log2")
    return keys


# -- the bucket ------------------------------------------------------------------------------


class Bucket:
    """Raw S3 access to one volume (``prefix`` without a trailing slash)."""

    def __init__(self, client: Any, bucket: str, prefix: str) -> None:
        self.c, self.bucket, self.prefix = client, bucket, prefix

    def key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}"

    def keys(self) -> list[str]:
        out: list[str] = []
        pages = self.c.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix + "/"
        )
        for page in pages:
            out += [o["Key"] for o in page.get("Contents", [])]
        return out

    def file_keys(self) -> list[str]:
        """Objects that are files (not the config, not directory markers)."""
        return [k for k in self.keys() if not k.endswith((CONFIG, MARKER))]

    def get(self, key: str) -> tuple[bytes, dict[str, str]]:
        obj = self.c.get_object(Bucket=self.bucket, Key=key)
        return obj["Body"].read(), dict(obj["Metadata"])

    def head(self, key: str) -> dict[str, Any]:
        return dict(self.c.head_object(Bucket=self.bucket, Key=key))

    def put(self, key: str, body: bytes, md: dict[str, str] | None = None) -> str:
        r = self.c.put_object(Bucket=self.bucket, Key=key, Body=body, Metadata=md or {})
        return str(r["ETag"])

    def delete(self, key: str) -> None:
        self.c.delete_object(Bucket=self.bucket, Key=key)

    def config(self) -> bytes:
        return self.get(self.key(CONFIG))[0]

    def config_json(self) -> dict[str, Any]:
        cfg: dict[str, Any] = json.loads(self.config())
        return cfg

    def put_config(self, cfg: bytes | dict[str, Any]) -> None:
        data = cfg if isinstance(cfg, bytes) else json.dumps(cfg, indent=1).encode() + b"\n"
        self.put(self.key(CONFIG), data)
