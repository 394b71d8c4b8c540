"""Random mutations of valid objects never decrypt to other bytes and never crash the parser."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from cryptfs.crypto import Secret
from cryptfs.errors import IntegrityError, UnsupportedFormat
from cryptfs.format.body import HEADER_SIZE, BodyCipher
from cryptfs.format.keys import VolumeKeys
from cryptfs.format.meta import KIND_FILE, Attrs, MetaCodec, ObjectMeta
from cryptfs.format.volume import SlotPayload, VolumeConfig

VID = b"I" * 16
KEYS = VolumeKeys.derive(Secret(b"v" * 32), VID)
PAYLOAD = SlotPayload(Secret(b"v" * 32), {"mk-000000000001": Secret(b"m" * 32)}, "mk-000000000001")
CONFIG = VolumeConfig(VID, 12, True, epoch=1)
CODEC = MetaCodec(KEYS, PAYLOAD, CONFIG)
FID = b"F" * 16
DEK = Secret(b"d" * 32)
KEK = KEYS.local_kek("mk-000000000001", PAYLOAD.master("mk-000000000001"))
PLAIN = bytes(range(256)) * 40  # 10240 bytes: 3 chunks of 4 KiB
CIPHER = BodyCipher.new(DEK, FID, 12)
BODY = CIPHER.seal_all(PLAIN)
KEY = "ZGly/ZmlsZQ"
META = CODEC.encode(
    b"/dir/file",
    KEY,
    ObjectMeta(
        FID,
        Attrs(KIND_FILE, 0o644, 1, 1, 2, 3, 4, len(PLAIN), CIPHER.header.salt),
        KEYS.wrap_local(KEK, "mk-000000000001", DEK, FID),
    ),
)


def read_object(body: bytes, md: dict[str, str], key: str = KEY) -> bytes:
    """What the filesystem does on a read, minus I/O."""
    meta = CODEC.decode(b"/dir/file", key, md)
    assert meta.dek is not None
    dek = KEYS.unwrap_local(KEK, meta.dek, meta.file_id)
    cipher = BodyCipher.open(dek, body[:HEADER_SIZE])
    if cipher.header.file_id != meta.file_id or cipher.header.salt != meta.attrs.salt:
        raise IntegrityError("header/metadata mismatch")
    data = cipher.open_all(body)
    if len(data) != meta.attrs.size:
        raise IntegrityError("size mismatch")
    return data


def test_unmodified_object_reads_back() -> None:
    assert read_object(BODY, dict(META)) == PLAIN


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_body_mutations(data: st.DataObject) -> None:
    body = bytearray(BODY)
    kind = data.draw(st.sampled_from(["flip", "truncate", "extend", "splice"]))
    if kind == "flip":
        i = data.draw(st.integers(0, len(body) - 1))
        body[i] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        del body[data.draw(st.integers(0, len(body) - 1)) :]
    elif kind == "extend":
        body += data.draw(st.binary(min_size=1, max_size=5000))
    else:
        a = data.draw(st.integers(0, len(body) - 1))
        b = data.draw(st.integers(a, len(body)))
        body[a:b] = data.draw(st.binary(max_size=b - a + 20))
    if bytes(body) == BODY:
        return
    try:
        out = read_object(bytes(body), dict(META))
    except (IntegrityError, UnsupportedFormat):
        return
    raise AssertionError(f"mutated body decrypted ({kind}): equal={out == PLAIN}")


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(META)), st.data())
def test_metadata_mutations(field: str, data: st.DataObject) -> None:
    md = dict(META)
    value = md[field]
    choice = data.draw(st.sampled_from(["drop", "replace", "flip"]))
    if choice == "drop":
        del md[field]
    elif choice == "replace":
        md[field] = data.draw(st.text(max_size=120))
    else:
        i = data.draw(st.integers(0, max(0, len(value) - 1)))
        md[field] = value[:i] + ("A" if value[i : i + 1] != "A" else "B") + value[i + 1 :]
    if md == META:
        return
    try:
        out = read_object(BODY, md)
    except (IntegrityError, UnsupportedFormat):
        return
    # revision 2 authenticates every field (revision 1 left cfs-w and cfs-kid outside)
    raise AssertionError(f"metadata field {field} changed but the object still read: {out!r}")


def test_moved_object_does_not_read() -> None:
    try:
        read_object(BODY, dict(META), key="ZGly/b3RoZXI")
    except IntegrityError:
        return
    raise AssertionError("metadata authenticated at another object key")


def test_base64_is_canonical() -> None:
    from cryptfs.format.names import b64d, b64e

    raw = bytes(range(16))
    text = b64e(raw)
    assert b64d(text) == raw
    sloppy = text[:-1] + chr(ord(text[-1]) + 1)  # same bytes, other unused bits
    try:
        b64d(sloppy)
    except IntegrityError:
        return
    raise AssertionError("non-canonical base64 accepted")
