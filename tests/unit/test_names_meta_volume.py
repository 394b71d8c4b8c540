from __future__ import annotations

import errno
import inspect

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cryptfs import errors as E
from cryptfs.crypto import Secret
from cryptfs.errors import IntegrityError, Invalid, NameTooLong, WrongKey
from cryptfs.format.keys import VolumeKeys, WrappedKey
from cryptfs.format.meta import KIND_FILE, Attrs, ObjectMeta, decode_meta, encode_meta
from cryptfs.format.names import MAX_COMPONENT, NameCodec
from cryptfs.format.volume import KeySource, SlotPayload, VolumeConfig
from cryptfs.fuse.ops import ERRNO_OF

VOL = b"V" * 16
KEYS = VolumeKeys.derive(Secret(b"m" * 32), VOL)


@given(
    st.binary(min_size=1, max_size=255).filter(
        lambda n: b"/" not in n and b"\0" not in n and n not in (b".", b"..")
    )
)
def test_name_roundtrip(name: bytes) -> None:
    codec = NameCodec(KEYS.names, VOL)
    comp, long_name = codec.encode(b"/dir", name)
    assert len(comp) <= MAX_COMPONENT
    assert "/" not in comp
    assert codec.decode(b"/dir", comp, long_name) == name


def test_same_name_differs_between_directories_and_is_authenticated() -> None:
    codec = NameCodec(KEYS.names, VOL)
    a, _ = codec.encode(b"/a", b"report.pdf")
    b, _ = codec.encode(b"/b", b"report.pdf")
    assert a != b
    with pytest.raises(IntegrityError):
        codec.decode(b"/b", a)


def test_long_names_use_hashed_component() -> None:
    codec = NameCodec(KEYS.names, VOL)
    comp, long_name = codec.encode(b"/", b"x" * 255)
    assert comp.startswith("~") and long_name is not None
    with pytest.raises(IntegrityError):
        codec.decode(b"/", comp, long_name[:-2] + "AA")


def test_name_limits() -> None:
    codec = NameCodec(KEYS.names, VOL)
    with pytest.raises(NameTooLong):
        codec.encode(b"/", b"x" * 256)
    with pytest.raises(Invalid):
        NameCodec(None, VOL).encode(b"/", b".cryptfs.dir")


def _attrs() -> Attrs:
    return Attrs(KIND_FILE, 0o640, 1, 2, 10**18 + 123, 5, 6, size=7, salt=b"s" * 32)


def test_meta_roundtrip_and_path_binding() -> None:
    meta = ObjectMeta(b"F" * 16, _attrs(), WrappedKey("gcm", "vmk", b"w" * 60))
    md = encode_meta(KEYS, b"/a/b", meta)
    assert decode_meta(KEYS, b"/a/b", md) == meta
    with pytest.raises(IntegrityError):
        decode_meta(KEYS, b"/a/c", md)  # object moved to another path
    md2 = dict(
        md,
        **{
            "cfs-f": encode_meta(
                KEYS, b"/a/b", ObjectMeta(b"G" * 16, _attrs(), WrappedKey("gcm", "vmk", b""))
            )["cfs-f"]
        },
    )
    with pytest.raises(IntegrityError):
        decode_meta(KEYS, b"/a/b", md2)  # attributes of another file
    with pytest.raises(IntegrityError):
        decode_meta(KEYS, b"/a/b", {})  # foreign object


def test_dek_wrap_bound_to_file() -> None:
    dek = Secret(b"d" * 32)
    kek = KEYS.local_kek("mk-1", Secret(b"m" * 32))
    for rev in (1, 2):
        wrapped = KEYS.wrap_local(kek, "mk-1", dek, b"F" * 16, rev)
        assert KEYS.unwrap_local(kek, wrapped, b"F" * 16) == dek
        with pytest.raises(IntegrityError):
            KEYS.unwrap_local(kek, wrapped, b"G" * 16)
    # revision 2: every wrap under its own key (no nonce to collide)
    a, b = (KEYS.wrap_local(kek, "mk-1", dek, b"F" * 16) for _ in range(2))
    assert a.blob[:32] != b.blob[:32] and len(a.blob) == 80
    # the legacy kid needs the VMK, which revision-2 payloads never offer for it
    with pytest.raises(IntegrityError):
        KEYS.local_kek("vmk", None)


FAST = {"t": 1, "m": 1024, "p": 1}


def new_config() -> tuple[VolumeConfig, Secret, SlotPayload]:
    """A new revision-2 config whose data keys are local, under master key ``mk-1``."""
    cfg, vmk = VolumeConfig.create(16, True)
    payload = SlotPayload(vmk, {"mk-1": Secret(b"m" * 32)}, "mk-1")
    cfg.dek = {"scheme": "gcm", "kid": "mk-1"}
    return cfg, vmk, payload


def test_volume_config_slots() -> None:
    cfg, vmk, payload = new_config()
    cfg.add_slot(payload, KeySource(keyfile=Secret(b"k" * 32)))
    cfg.add_slot(payload, KeySource(passphrase=Secret(b"correct horse")), argon2=FAST)
    data = cfg.to_bytes(payload)
    assert b"k" * 8 not in data and b"correct horse" not in data
    loaded = VolumeConfig.from_bytes(data)
    for src in (
        KeySource(keyfile=Secret(b"k" * 32)),
        KeySource(passphrase=Secret(b"correct horse")),
    ):
        got, _slot = loaded.unlock_local(src)
        assert got.vmk == vmk and got.mks["mk-1"] == Secret(b"m" * 32) and got.cur == "mk-1"
    with pytest.raises(WrongKey):
        loaded.unlock_local(KeySource(keyfile=Secret(b"z" * 32)))
    with pytest.raises(WrongKey):
        loaded.unlock_local(KeySource(passphrase=Secret(b"wrong")))
    tampered = VolumeConfig.from_bytes(data.replace(b'"aes-siv"', b'"plain"'))
    with pytest.raises(IntegrityError):
        tampered.unlock_local(KeySource(keyfile=Secret(b"k" * 32)))


def test_config_mac_covers_keyslots_and_epoch() -> None:
    """Revision 2: a keyslot added, removed or re-added, or the epoch changed, by anyone
    without the current master key, makes the config fail to authenticate."""
    import json

    cfg, vmk, payload = new_config()
    cfg.add_slot(payload, KeySource(keyfile=Secret(b"k" * 32)))
    cfg.add_slot(payload, KeySource(passphrase=Secret(b"pw")), argon2=FAST)
    data = cfg.to_bytes(payload)
    VolumeConfig.from_bytes(data).verify(payload)
    d = json.loads(data)
    for mutate in (
        lambda d: d["keyslots"].pop(),
        lambda d: d["keyslots"].append(dict(d["keyslots"][0], id="keyfile-ffffff")),
        lambda d: d.update(epoch=d["epoch"] + 5),
        lambda d: d.update(kms_keys=["arn:aws:kms:us-east-1:1:key/x"]),
        lambda d: d.update(objects=[1, 2]),
    ):
        m = json.loads(data)
        mutate(m)
        with pytest.raises(IntegrityError):
            VolumeConfig.from_bytes(json.dumps(m).encode()).verify(payload)
    # a MAC made with an old payload (VMK and a retired master key) is refused
    old = SlotPayload(vmk, {"mk-0": Secret(b"o" * 32)}, "mk-0")
    forged = VolumeConfig.from_bytes(data)
    forged.dek = {"scheme": "gcm", "kid": "mk-0"}
    with pytest.raises(IntegrityError):
        VolumeConfig.from_bytes(forged.to_bytes(old)).verify(payload)
    assert d["cryptfs"] == 2
    # nor a downgrade: a revision-1 config (MAC keyed by the VMK, which an old key holder
    # knows) over the current, revision-2 keyslots
    down = VolumeConfig.from_bytes(data)
    down.version = 1
    with pytest.raises(IntegrityError, match="revision-1"):
        VolumeConfig.from_bytes(down.to_bytes(SlotPayload(vmk))).verify(payload)


def test_config_bounds() -> None:
    cfg, _vmk, payload = new_config()
    cfg.add_slot(payload, KeySource(passphrase=Secret(b"pw")), argon2=FAST)
    cfg.keyslots[0]["m"] = 1 << 30  # a planted slot asking for 1 TiB
    with pytest.raises(IntegrityError, match="memory"):
        VolumeConfig.from_bytes(cfg.to_bytes(payload)).unlock_local(
            KeySource(passphrase=Secret(b"pw"))
        )
    with pytest.raises(IntegrityError):
        VolumeConfig.from_bytes(b" " * (2 << 20))
    with pytest.raises(IntegrityError):
        VolumeConfig.from_bytes(cfg.to_bytes(payload).replace(b'"epoch": 1', b'"epoch": "1"'))


def test_payload_revisions_round_trip() -> None:
    vmk = Secret(b"v" * 32)
    for p in (
        SlotPayload(vmk),
        SlotPayload(vmk, {"mk-1": Secret(b"a" * 32)}),
        SlotPayload(vmk, {"mk-1": Secret(b"a" * 32), "vmk": vmk}, "mk-1"),
    ):
        q = SlotPayload.from_bytes(p.to_bytes())
        assert (q.vmk, q.mks, q.current) == (p.vmk, p.mks, p.current)
    v2 = SlotPayload(vmk, {"mk-1": Secret(b"a" * 32)}, "mk-1")
    assert v2.master("vmk") is None and SlotPayload(vmk).master("vmk") == vmk
    for bad in (b"\x02" + b"v" * 32 + b"\x04mk-9", b"\x03" + b"v" * 40):
        with pytest.raises(IntegrityError):
            SlotPayload.from_bytes(bad)


def test_secret_repr_hides_bytes() -> None:
    s = Secret(b"supersecret")
    assert "supersecret" not in repr(s) and "supersecret" not in str(s)
    assert "supersecret" not in repr(KEYS)


def test_every_error_leaf_has_an_errno() -> None:
    leaves = [
        c
        for _, c in inspect.getmembers(E, inspect.isclass)
        if issubclass(c, E.CryptfsError) and not c.__subclasses__()
    ]
    assert leaves
    missing = [c.__name__ for c in leaves if c not in ERRNO_OF]
    assert not missing, missing
    assert ERRNO_OF[E.IntegrityError] == errno.EIO
