"""Objects written by the AWS S3 Encryption Client (S3EC), v2 and v3 message formats.

Owns: parsing their user metadata and decrypting their bodies once the data key is known.
The data key itself is unwrapped by the caller (AWS KMS, ``kms+context``), with the
encryption context stored in the object, exactly as their client does.

- v2 (``x-amz-key-v2``, ``x-amz-cek-alg = AES/GCM/NoPadding``, ``x-amz-iv``,
  ``x-amz-wrap-alg``, ``x-amz-matdesc``): body = AES-256-GCM(data key, iv, plaintext),
  no AAD, 16-byte tag at the end.
- v3 (``x-amz-c = 115``, ``x-amz-3``, ``x-amz-w``, ``x-amz-t``/``x-amz-m``, ``x-amz-d``,
  ``x-amz-i``): key-committing.  PRK = HMAC-SHA512(message id, data key); key =
  HKDF-Expand-SHA512(PRK, 0x0073 ‖ "DERIVEKEY", 32); commitment = …("COMMITKEY", 28) must
  equal ``x-amz-d``; body = AES-256-GCM(key, IV = 0x01×12, AAD = 0x0073).

One GCM tag covers the whole object: nothing is served before the whole body authenticates.

Instruction files (their metadata strategy "instruction file"): the envelope lives in a
second object, ``<key>.instruction``, whose body is a JSON object of S3EC metadata keys and
nothing else.  v1/v2: all content metadata is in it and none on the object; v3: ``x-amz-c``,
``x-amz-d`` and ``x-amz-i`` stay on the object and must not appear in the instruction file.
Object metadata wins over the instruction file where both name a key (as their client merges).

Names: an S3EC object is shown under its own key, which nothing authenticates (anyone who can
write to the bucket chooses it); ``name_problem`` says which key components cannot be a
directory entry (empty, ``.``, ``..``, over 255 bytes, a NUL or a ``/``), so that such an
object is skipped with a warning naming its key, never written out or imported under it.
Must not import: store, fs, fuse.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Container, Mapping
from dataclasses import dataclass

from cryptfs.crypto import Aead, Secret, constant_time_eq, hkdf_sha512
from cryptfs.errors import IntegrityError, UnsupportedFormat

V2_KEYS = ("x-amz-key-v2", "x-amz-cek-alg", "x-amz-iv", "x-amz-wrap-alg")
V3_KEYS = ("x-amz-3", "x-amz-c", "x-amz-d", "x-amz-i")
CEK_V2 = "AES/GCM/NoPadding"
SUITE_V3 = "115"
_SUITE_V3_ID = b"\x00\x73"
_V3_WRAP = {"02": "AES/GCM", "12": "kms+context", "22": "RSA-OAEP-SHA1"}
TAG = 16
INSTRUCTION_SUFFIX = ".instruction"
METADATA_KEYS = frozenset(
    V2_KEYS + V3_KEYS
    + ("x-amz-key", "x-amz-matdesc", "x-amz-tag-len", "x-amz-crypto-instr-file")
    + ("x-amz-m", "x-amz-t", "x-amz-w")
)  # fmt: skip
_V3_OBJECT_ONLY = frozenset(("x-amz-c", "x-amz-d", "x-amz-i"))


@dataclass(frozen=True)
class S3ecObject:
    version: int
    wrap: str  # "kms+context" is what cryptfs can unwrap
    encrypted_key: bytes
    context: dict[str, str]  # the stored KMS encryption context
    iv: bytes = b""
    message_id: bytes = b""
    commitment: bytes = b""
    instruction: bool = False  # its key material came from ``<key>.instruction``

    def plain_size(self, object_size: int) -> int:
        if object_size < TAG:
            raise IntegrityError("S3EC object shorter than its GCM tag")
        return object_size - TAG


NAME_MAX = 255  # bytes of a directory entry's name (Linux, FUSE)


def name_problem(name: str | bytes) -> str | None:
    """Why ``name``, one component of a foreign object's key, cannot be the name of a
    directory entry (None: it can).  For the warning that says the object was skipped."""
    if isinstance(name, str):
        try:
            name = name.encode(errors="surrogateescape")
        except UnicodeEncodeError:
            return "a name that is not valid UTF-8"
    if not name:
        return "an empty name"
    if name in (b".", b".."):
        return f"the name {name.decode()!r}"
    if len(name) > NAME_MAX:
        return f"a name of {len(name)} bytes (at most {NAME_MAX})"
    if b"\0" in name:
        return "a NUL byte in the name"
    if b"/" in name:
        return "a '/' in the name"
    return None


def is_s3ec(md: Mapping[str, str]) -> bool:
    return any(k in md for k in V2_KEYS + V3_KEYS + ("x-amz-key",))


def needs_instruction(md: Mapping[str, str]) -> bool:
    """v3 content metadata on the object but its data key elsewhere: an instruction file."""
    return any(k in md for k in _V3_OBJECT_ONLY) and "x-amz-3" not in md


def is_instruction_key(key: str) -> bool:
    return key.endswith(INSTRUCTION_SUFFIX)


def has_instruction(key: str, listed: Container[str]) -> bool:
    """Does a listing (``listed``: its keys) hold an instruction file for ``key``?"""
    return key + INSTRUCTION_SUFFIX in listed


def is_instruction_of_listed(key: str, listed: Container[str]) -> bool:
    """Is ``key`` the instruction file of an object in the same listing (part of it)?"""
    return is_instruction_key(key) and key[: -len(INSTRUCTION_SUFFIX)] in listed


def merge_instruction(md: Mapping[str, str], body: bytes) -> dict[str, str]:
    """The envelope of an object whose key material is in an instruction file, checked as
    their client checks it (IntegrityError for anything else)."""
    try:
        inst = json.loads(body)
    except ValueError:
        raise IntegrityError("S3EC instruction file is not JSON") from None
    if not isinstance(inst, dict) or not all(isinstance(v, str) for v in inst.values()):
        raise IntegrityError("S3EC instruction file is not a JSON object of strings")
    if not inst or set(inst) - METADATA_KEYS:
        raise IntegrityError("S3EC instruction file holds keys that are not S3EC metadata")
    if set(inst) & _V3_OBJECT_ONLY:
        raise IntegrityError("S3EC instruction file holds object-only v3 keys (tampered?)")
    merged = dict(inst)
    merged.update(md)
    if "x-amz-3" not in merged and any(
        k in md for k in ("x-amz-cek-alg", "x-amz-iv", "x-amz-wrap-alg")
    ):
        raise IntegrityError("S3EC v1/v2 content metadata on the object and in an instruction file")
    return merged


def _b64(md: Mapping[str, str], key: str) -> bytes:
    try:
        return base64.b64decode(md[key], validate=True)
    except KeyError:
        raise IntegrityError(f"S3EC metadata {key} missing") from None
    except (binascii.Error, ValueError):
        raise IntegrityError(f"S3EC metadata {key} is not base64") from None


def _context(text: str | None) -> dict[str, str]:
    if not text:
        return {}
    try:
        ctx = json.loads(text)
    except ValueError:
        raise IntegrityError("S3EC encryption context is not JSON") from None
    if not isinstance(ctx, dict):
        raise IntegrityError("S3EC encryption context is not an object")
    return {str(k): str(v) for k, v in ctx.items()}


def parse(md: Mapping[str, str]) -> S3ecObject:
    """The S3EC envelope of an object; UnsupportedFormat for what cryptfs cannot read."""
    has2 = any(k in md for k in V2_KEYS)
    has3 = any(k in md for k in V3_KEYS)
    if "x-amz-key" in md and "x-amz-key-v2" not in md and not has3:
        raise UnsupportedFormat(
            "S3 Encryption Client v1 objects (CBC, unauthenticated) are refused"
        )
    if has2 and has3:
        raise IntegrityError("S3EC metadata mixes v2 and v3 keys (tampered?)")
    if has3:
        if md.get("x-amz-c") != SUITE_V3:
            raise UnsupportedFormat(f"S3EC v3 content algorithm {md.get('x-amz-c')!r}")
        wrap = _V3_WRAP.get(md.get("x-amz-w", "12"), "?")
        ctx = _context(md.get("x-amz-t") if wrap == "kms+context" else md.get("x-amz-m"))
        obj = S3ecObject(
            3,
            wrap,
            _b64(md, "x-amz-3"),
            ctx,
            message_id=_b64(md, "x-amz-i"),
            commitment=_b64(md, "x-amz-d"),
        )
        expected_alg = SUITE_V3
    elif has2:
        if md.get("x-amz-cek-alg") != CEK_V2:
            raise UnsupportedFormat(
                f"S3EC content algorithm {md.get('x-amz-cek-alg')!r} (only {CEK_V2})"
            )
        if md.get("x-amz-tag-len", "128") != "128":
            raise UnsupportedFormat("S3EC tag length other than 128 bits")
        wrap = md.get("x-amz-wrap-alg", "?")
        obj = S3ecObject(
            2, wrap, _b64(md, "x-amz-key-v2"), _context(md.get("x-amz-matdesc")),
            iv=_b64(md, "x-amz-iv"),
        )  # fmt: skip
        if len(obj.iv) != 12:
            raise IntegrityError("S3EC IV is not 12 bytes")
        expected_alg = CEK_V2
    else:
        raise UnsupportedFormat("not an S3 Encryption Client object")
    if obj.wrap == "AES/GCM":
        return obj  # a raw AES key: the material description is informational only
    if obj.wrap != "kms+context":
        raise UnsupportedFormat(
            f"S3EC key wrapping {obj.wrap!r} is not supported (cryptfs reads kms+context "
            "and AES/GCM)"
        )
    # as their client: the context names the content algorithm, so a downgrade of the
    # algorithm in the metadata fails at KMS (the context is bound to the data key)
    if obj.context.get("aws:x-amz-cek-alg") != expected_alg:
        raise IntegrityError("S3EC encryption context does not name the content algorithm")
    return obj


# AES/GCM wrapping of the data key, as the Java client's AesKeyring does it:
# iv(12) ‖ AES-256-GCM(wrapping key, iv, data key, AAD = "AES/GCM/NoPadding")
_AES_GCM_WRAP_AAD = CEK_V2.encode()


def unwrap_aes_gcm(wrapping_key: Secret, encrypted_key: bytes) -> Secret:
    if len(encrypted_key) != 12 + 32 + TAG:
        raise IntegrityError("S3EC AES/GCM-wrapped data key has the wrong length")
    return Secret(
        Aead(wrapping_key).open(encrypted_key[:12], encrypted_key[12:], _AES_GCM_WRAP_AAD)
    )


def wrap_aes_gcm(wrapping_key: Secret, data_key: Secret, iv: bytes) -> bytes:
    """The inverse (for test vectors)."""
    return iv + Aead(wrapping_key).seal(iv, data_key.reveal(), _AES_GCM_WRAP_AAD)


def decrypt(obj: S3ecObject, data_key: Secret, body: bytes) -> bytes:
    """The whole plaintext, or IntegrityError; never partial or unauthenticated bytes."""
    if len(data_key) != 32:
        raise IntegrityError("S3EC data key is not 256 bits")
    if obj.version == 3:
        if len(obj.message_id) != 28 or len(obj.commitment) != 28:
            raise IntegrityError("S3EC v3 message id or commitment has the wrong length")
        key = hkdf_sha512(data_key, obj.message_id, _SUITE_V3_ID + b"DERIVEKEY", 32)
        commit = hkdf_sha512(data_key, obj.message_id, _SUITE_V3_ID + b"COMMITKEY", 28)
        if not constant_time_eq(commit.reveal(), obj.commitment):
            raise IntegrityError("S3EC v3 key commitment does not match (wrong key or tampered)")
        return Aead(key).open(b"\x01" * 12, body, _SUITE_V3_ID)
    return Aead(data_key).open(obj.iv, body, b"")
