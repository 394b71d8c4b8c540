"""Objects written by the official AWS S3 Encryption Client (the test oracle: the
``amazon-s3-encryption-client-python`` package, in a venv of its own, tests/s3ec_oracle.py)
against SeaweedFS with a KMS keyring on moto: ``cryptfs import`` turns them into native files
that read back byte for byte; tampered ones are refused and left alone."""

from __future__ import annotations

import base64
import json
import os
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from cryptfs.crypto import Secret
from cryptfs.errors import IntegrityError, UnsupportedFormat
from cryptfs.format import s3ec
from cryptfs.format.volume import KeySource
from cryptfs.fs.filesystem import Filesystem
from cryptfs.fs.model import ROOT_INO
from cryptfs.importer import import_s3ec
from cryptfs.session import Remote, open_remote, open_volume
from cryptfs.store.kms import KmsOptions
from cryptfs.store.s3 import S3Location, S3Options
from cryptfs.volume import Volume
from tests.conftest import ACCESS_KEY, SECRET_KEY, KmsServer, S3Server
from tests.fsutil import read_file, walk

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]

OBJECTS = {
    "v3/hello.txt": (3, b"hello from the S3 Encryption Client v3\n"),
    "v3/deep/er/data.bin": (3, os.urandom(300_000)),
    "v3/empty": (3, b""),
    "v2/legacy.txt": (2, b"a v2 (non-committing) object\n"),
}


def _oracle(
    s3: S3Server, kms: KmsServer, key_arn: str, bucket: str, op: str, objects: dict[str, Any]
) -> Any:
    """Ask the official client (``tests/s3ec_oracle.py``, in the venv of its own that
    ``make install`` makes: it pins an older ``cryptography`` than cryptfs runs on)."""
    python = os.environ.get("CRYPTFS_S3EC_PYTHON", str(ROOT / ".venv-oracle/bin/python"))
    if not Path(python).exists():
        raise RuntimeError(f"no S3 Encryption Client oracle at {python}: run `make install`")
    req = {"op": op, "s3": s3.endpoint, "kms": kms.endpoint, "key_arn": key_arn,
           "bucket": bucket, "objects": objects}  # fmt: skip
    env = dict(os.environ, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
    res = subprocess.run(
        [python, str(ROOT / "tests/s3ec_oracle.py")],
        input=json.dumps(req), capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    if res.returncode != 0:
        raise RuntimeError(f"S3 Encryption Client oracle failed: {res.stderr.strip()[-2000:]}")
    return json.loads(res.stdout)


def _official_get(
    s3: S3Server, kms: KmsServer, key_arn: str, bucket: str, keys: list[str]
) -> dict[str, bytes]:
    """The objects at ``keys`` as the official client decrypts them."""
    got = _oracle(s3, kms, key_arn, bucket, "get", {k: 3 if "/v3/" in k else 2 for k in keys})
    return {k: base64.b64decode(v) for k, v in got.items()}


@dataclass
class Opened:
    """A new volume (encrypted names) over a prefix that holds S3EC objects."""

    loc: S3Location
    src: KeySource
    store: Any
    kms: Any
    vol: Volume


@asynccontextmanager
async def _new_volume(
    s3: S3Server,
    kms_server: KmsServer | None,
    bucket: str,
    prefix: str,
    s3ec_kms: str | None = None,
) -> AsyncIterator[Opened]:
    """``s3ec_kms``: the KMS key the user names for S3EC objects (--s3ec-kms-key-id)."""
    loc = S3Location.parse(f"s3://{bucket}/{prefix}")
    src = KeySource(keyfile=Secret(os.urandom(32)))
    remote = Remote(S3Options(endpoint_url=s3.endpoint))
    if kms_server is not None:
        remote = Remote(remote.s3, KmsOptions(endpoint_url=kms_server.endpoint))
    async with open_remote(loc, remote) as (store, kms):
        vol = await Volume.create(store, src, chunk_log2=16, encrypt_names=True, kms=kms)
        vol.keyring.s3ec_kms_keys = [s3ec_kms] if s3ec_kms else []
        yield Opened(loc, src, store, kms, vol)


def _write_with_official_client(
    s3: S3Server, kms: KmsServer, key_arn: str, bucket: str, prefix: str
) -> None:
    objects = {
        prefix + key: [version, base64.b64encode(data).decode()]
        for key, (version, data) in OBJECTS.items()
    }
    _oracle(s3, kms, key_arn, bucket, "put", objects)


async def _official_objects(s3: S3Server, kms: KmsServer, bucket: str, prefix: str) -> str:
    """The official client writes OBJECTS below ``prefix``; returns its KMS key's ARN."""
    key_arn = kms.new_key()
    await trio.to_thread.run_sync(_write_with_official_client, s3, kms, key_arn, bucket, prefix)
    return key_arn


_V3_ON_OBJECT = ("x-amz-c", "x-amz-d", "x-amz-i")


def _move_to_instruction_file(raw: Any, bucket: str, key: str, extra: dict[str, str]) -> None:
    """Rewrite an object in their instruction-file layout: the envelope moves to
    ``key.instruction`` (v3: all but x-amz-c/d/i, which stay on the object), plus ``extra``."""
    import json

    obj = raw.get_object(Bucket=bucket, Key=key)
    body, md = obj["Body"].read(), dict(obj["Metadata"])
    v3 = "x-amz-c" in md
    stay = {k: v for k, v in md.items() if v3 and k in _V3_ON_OBJECT}
    moved = {k: v for k, v in md.items() if k not in stay} | extra
    raw.put_object(Bucket=bucket, Key=key, Body=body, Metadata=stay)
    raw.put_object(Bucket=bucket, Key=key + ".instruction", Body=json.dumps(moved).encode())


@pytest.mark.allow_error_logs
async def test_import_objects_of_the_official_client(
    s3server: S3Server, kms_server: KmsServer, bucket: str, tmp_path: Path
) -> None:
    key_arn = await _official_objects(s3server, kms_server, bucket, "vol/")
    raw = s3server.client()
    # their formats, as their client wrote them
    md3 = raw.head_object(Bucket=bucket, Key="vol/v3/hello.txt")["Metadata"]
    md2 = raw.head_object(Bucket=bucket, Key="vol/v2/legacy.txt")["Metadata"]
    assert md3["x-amz-c"] == "115" and "x-amz-d" in md3 and "x-amz-key-v2" not in md3
    assert md2["x-amz-cek-alg"] == "AES/GCM/NoPadding" and "x-amz-3" not in md2
    # tamper with copies: a flipped body bit, and a v3 commitment from another object
    for name, src in (("v3/flipped", "vol/v3/hello.txt"), ("v3/swapped", "vol/v3/empty")):
        obj = raw.get_object(Bucket=bucket, Key=src)
        body, md = bytearray(obj["Body"].read()), dict(obj["Metadata"])
        if name.endswith("flipped"):
            body[3] ^= 0x40
        else:
            md["x-amz-d"] = md3["x-amz-d"]
        raw.put_object(Bucket=bucket, Key="vol/" + name, Body=bytes(body), Metadata=md)

    async with _new_volume(s3server, kms_server, bucket, "vol", key_arn) as o:
        loc, src, store, kms, vol = o.loc, o.src, o.store, o.kms, o.vol
        # only what the user points at is converted
        some = await import_s3ec(vol, key_prefix=loc.prefix, paths=("v2",))
        assert some.found == 1 and some.imported == 1, some.summary()
        report = await import_s3ec(vol, key_prefix=loc.prefix, paths=None)
        assert report.found == len(OBJECTS) + 1 and report.imported == len(OBJECTS) - 1, report
        assert sorted(k for k, _ in report.failed) == ["v3/flipped", "v3/swapped"]
        # the failures stay untouched; the imported originals are gone
        listed = raw.list_objects_v2(Bucket=bucket, Prefix="vol/")["Contents"]
        left = {o["Key"] for o in listed if o["Key"].startswith(("vol/v2/", "vol/v3/"))}
        assert left == {"vol/v3/flipped", "vol/v3/swapped"}

        v_again = await open_volume(store, kms, src)
        v_again.keyring.s3ec_kms_keys = [key_arn]
        again = await import_s3ec(v_again, key_prefix=loc.prefix, paths=None)
        assert again.imported == 0 and len(again.failed) == 2  # resumable, nothing twice

        from cryptfs.cache.staging import StagingArea

        v = await open_volume(store, kms, src)
        fs = Filesystem(
            v, StagingArea(tmp_path / "st", v.keys.cache, v.chunk), key_prefix=loc.prefix
        )
        await fs.ensure_root()
        for key, (_version, data) in OBJECTS.items():
            node = await walk(fs, key)
            assert await read_file(fs, node.ino) == data, key
        assert (await fs.lookup(ROOT_INO, b"v3")).is_dir


def test_parse_refuses_what_it_cannot_read_safely() -> None:
    v3 = {
        "x-amz-3": "AAAA", "x-amz-c": "115", "x-amz-d": "AAAA", "x-amz-i": "AAAA",
        "x-amz-t": '{"aws:x-amz-cek-alg": "115"}', "x-amz-w": "12",
    }  # fmt: skip
    assert s3ec.parse(v3).version == 3
    with pytest.raises(UnsupportedFormat, match="wrapping"):
        s3ec.parse(v3 | {"x-amz-w": "22"})
    with pytest.raises(IntegrityError, match="content algorithm"):
        s3ec.parse(v3 | {"x-amz-t": '{"aws:x-amz-cek-alg": "AES/GCM/NoPadding"}'})
    with pytest.raises(IntegrityError, match="mixes"):
        s3ec.parse(v3 | {"x-amz-key-v2": "AAAA"})
    with pytest.raises(UnsupportedFormat, match="v1"):
        s3ec.parse({"x-amz-key": "AAAA", "x-amz-iv": "AAAA", "x-amz-matdesc": "{}"})
    assert not s3ec.is_s3ec({"cfs": "1"})


@pytest.mark.allow_error_logs
async def test_mount_shows_them_read_only_under_their_own_names(
    s3server: S3Server, kms_server: KmsServer, bucket: str, tmp_path: Path
) -> None:
    from cryptfs.cache.staging import StagingArea
    from cryptfs.errors import FileTooBig, ReadOnly
    from cryptfs.fs.model import Options

    key_arn = await _official_objects(s3server, kms_server, bucket, "m/")
    raw = s3server.client()
    obj = raw.get_object(Bucket=bucket, Key="m/v3/hello.txt")
    body = bytearray(obj["Body"].read())
    body[-1] ^= 1  # the GCM tag
    raw.put_object(Bucket=bucket, Key="m/v3/tampered", Body=bytes(body), Metadata=obj["Metadata"])

    async with _new_volume(s3server, kms_server, bucket, "m", key_arn) as o:
        loc, vol = o.loc, o.vol
        hidden = Filesystem(
            vol, StagingArea(tmp_path / "st0", vol.keys.cache, vol.chunk), key_prefix=loc.prefix
        )
        await hidden.ensure_root()
        assert [n for n, _ in await hidden.readdir(ROOT_INO)] == []  # not shown by default
        fs = Filesystem(
            vol,
            StagingArea(tmp_path / "st", vol.keys.cache, vol.chunk),
            Options(foreign_max_bytes=200_000, show_foreign=True),
            key_prefix=loc.prefix,
        )
        await fs.ensure_root()
        await fs.mkdir(ROOT_INO, b"native", 0o755, 0, 0)  # our own files live beside them
        names = [n for n, _ in await fs.readdir(ROOT_INO)]
        assert names == [b"native", b"v2", b"v3"]
        for key, (_v, data) in OBJECTS.items():
            node = await walk(fs, key)
            st = fs.stat(node)
            assert st.size == len(data) and st.mode & 0o777 == 0o444, key
            if len(data) > 200_000:
                with pytest.raises(FileTooBig):
                    await read_file(fs, node.ino)
                continue
            assert await read_file(fs, node.ino) == data, key
        v3 = await fs.lookup(ROOT_INO, b"v3")
        bad = await fs.lookup(v3.ino, b"tampered")
        with pytest.raises(IntegrityError):
            await read_file(fs, bad.ino)
        assert fs.integrity_failures == 1
        hello = await fs.lookup(v3.ino, b"hello.txt")
        with pytest.raises(ReadOnly):
            await fs.open(hello.ino, os.O_RDWR)
        with pytest.raises(ReadOnly):
            await fs.create(v3.ino, b"new", 0o644, 0, 0)
        with pytest.raises(ReadOnly):
            await fs.unlink(v3.ino, b"hello.txt")
        with pytest.raises(ReadOnly):
            await fs.rename(v3.ino, b"hello.txt", ROOT_INO, b"moved", 0)
        assert raw.head_object(Bucket=bucket, Key="m/v3/hello.txt")  # untouched

        # plaintexts held for open files stay within the bound in total: the least recently
        # read one is dropped and fetched again when read again
        small = Filesystem(
            vol,
            StagingArea(tmp_path / "st2", vol.keys.cache, vol.chunk),
            Options(foreign_max_bytes=50, show_foreign=True),
            key_prefix=loc.prefix,
        )
        await small.ensure_root()
        a = await small.lookup((await small.lookup(ROOT_INO, b"v3")).ino, b"hello.txt")
        b = await small.lookup((await small.lookup(ROOT_INO, b"v2")).ino, b"legacy.txt")
        ha, hb = await small.open(a.ino, os.O_RDONLY), await small.open(b.ino, os.O_RDONLY)
        assert await small.read(ha.fh, 0, 100) == OBJECTS["v3/hello.txt"][1]
        assert await small.read(hb.fh, 0, 100) == OBJECTS["v2/legacy.txt"][1]
        assert a.plain is None and b.plain is not None  # 40 + 29 bytes > 50
        assert await small.read(ha.fh, 0, 100) == OBJECTS["v3/hello.txt"][1]
        assert b.plain is None
        await small.release(ha.fh)
        await small.release(hb.fh)
        assert not small.foreign.held


def _aes_wrapped_object(version: int, wrapping: Secret, plaintext: bytes) -> tuple[bytes, dict]:  # type: ignore[type-arg]
    """An S3EC object with an AES/GCM-wrapped data key, built from their specification
    (the Python client has no AES keyring to serve as an oracle here)."""
    import base64
    import hashlib
    import hmac

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

    data_key = os.urandom(32)
    edk = s3ec.wrap_aes_gcm(wrapping, Secret(data_key), os.urandom(12))
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    if version == 2:
        iv = os.urandom(12)
        body = AESGCM(data_key).encrypt(iv, plaintext, None)
        md = {"x-amz-key-v2": b64(edk), "x-amz-cek-alg": "AES/GCM/NoPadding",
              "x-amz-iv": b64(iv), "x-amz-wrap-alg": "AES/GCM", "x-amz-tag-len": "128",
              "x-amz-matdesc": "{}"}  # fmt: skip
        return body, md
    message_id = os.urandom(28)
    prk = hmac.new(message_id, data_key, hashlib.sha512).digest()
    key = HKDFExpand(hashes.SHA512(), 32, b"\x00\x73DERIVEKEY").derive(prk)
    commit = HKDFExpand(hashes.SHA512(), 28, b"\x00\x73COMMITKEY").derive(prk)
    body = AESGCM(key).encrypt(b"\x01" * 12, plaintext, b"\x00\x73")
    md = {"x-amz-3": b64(edk), "x-amz-c": "115", "x-amz-w": "02", "x-amz-m": "{}",
          "x-amz-d": b64(commit), "x-amz-i": b64(message_id)}  # fmt: skip
    return body, md


@pytest.mark.allow_error_logs
async def test_aes_gcm_wrapped_objects_need_their_key(
    s3server: S3Server, bucket: str, tmp_path: Path
) -> None:
    from cryptfs.cache.staging import StagingArea
    from cryptfs.errors import KeyAccessDenied
    from cryptfs.fs.model import Options

    wrapping = Secret(os.urandom(32))
    raw = s3server.client()
    for v in (2, 3):
        body, md = _aes_wrapped_object(v, wrapping, f"raw AES, v{v}\n".encode())
        raw.put_object(Bucket=bucket, Key=f"a/aes-v{v}.txt", Body=body, Metadata=md)
    async with _new_volume(s3server, None, bucket, "a") as o:
        loc, src, store, k, vol = o.loc, o.src, o.store, o.kms, o.vol

        async def read_all(keys: list[Secret]) -> dict[bytes, Any]:
            v = await open_volume(store, k, src, Remote(s3ec_keys=tuple(keys)))
            fs = Filesystem(v, StagingArea(tmp_path / os.urandom(4).hex(), v.keys.cache, v.chunk),
                            Options(show_foreign=True), key_prefix=loc.prefix)  # fmt: skip
            await fs.ensure_root()
            out: dict[bytes, Any] = {}
            for name, node in await fs.readdir(ROOT_INO):
                try:
                    out[name] = await read_file(fs, node.ino)
                except (KeyAccessDenied, IntegrityError) as e:
                    out[name] = type(e)
            return out

        assert await read_all([Secret(os.urandom(32)), wrapping]) == {
            b"aes-v2.txt": b"raw AES, v2\n",
            b"aes-v3.txt": b"raw AES, v3\n",
        }
        assert set((await read_all([])).values()) == {KeyAccessDenied}
        assert set((await read_all([Secret(os.urandom(32))])).values()) == {IntegrityError}
        assert vol is not None


@pytest.mark.allow_error_logs
async def test_instruction_files(
    s3server: S3Server, kms_server: KmsServer, bucket: str, tmp_path: Path
) -> None:
    """Objects whose envelope is in an instruction file: the official client reads them back
    (so the layout is theirs), then a mount shows and reads them and import converts them."""
    from cryptfs.cache.staging import StagingArea
    from cryptfs.fs.model import Options

    key_arn = await _official_objects(s3server, kms_server, bucket, "i/")
    raw = s3server.client()
    moved = ["i/v3/hello.txt", "i/v2/legacy.txt", "i/v3/empty"]
    for key in moved:
        _move_to_instruction_file(raw, bucket, key, {})
    # tampered: object-only v3 keys must not come from the instruction file
    raw.copy_object(Bucket=bucket, Key="i/v3/bad", CopySource=f"{bucket}/i/v3/hello.txt")
    _move_to_instruction_file(raw, bucket, "i/v3/bad", {})
    inst = raw.get_object(Bucket=bucket, Key="i/v3/hello.txt.instruction")["Body"].read()
    md = raw.head_object(Bucket=bucket, Key="i/v3/hello.txt")["Metadata"]
    assert "x-amz-3" not in md and b"x-amz-3" in inst and b"x-amz-d" not in inst
    raw.put_object(
        Bucket=bucket, Key="i/v3/bad", Body=raw.get_object(Bucket=bucket, Key="i/v3/hello.txt")[
            "Body"].read(), Metadata={"x-amz-c": md["x-amz-c"]},
    )  # fmt: skip
    raw.put_object(
        Bucket=bucket, Key="i/v3/bad.instruction",
        Body=inst[:-1] + f', "x-amz-d": "{md["x-amz-d"]}", "x-amz-i": "{md["x-amz-i"]}"}}'.encode(),
    )  # fmt: skip

    got = await trio.to_thread.run_sync(_official_get, s3server, kms_server, key_arn, bucket, moved)
    assert got == {k: OBJECTS[k[2:]][1] for k in moved}  # their client reads this layout

    async with _new_volume(s3server, kms_server, bucket, "i", key_arn) as o:
        loc, vol = o.loc, o.vol

        def new_fs() -> Filesystem:
            return Filesystem(
                vol, StagingArea(tmp_path / os.urandom(4).hex(), vol.keys.cache, vol.chunk),
                Options(show_foreign=True), key_prefix=loc.prefix,
            )  # fmt: skip

        fs = new_fs()
        await fs.ensure_root()
        v3 = await fs.lookup(ROOT_INO, b"v3")
        names = [n for n, _ in await fs.readdir(v3.ino)]
        assert names == [b"deep", b"empty", b"hello.txt"]  # no .instruction, no tampered one
        for key in moved:
            node = await walk(fs, key[2:])
            assert fs.stat(node).size == len(OBJECTS[key[2:]][1])
            assert await read_file(fs, node.ino) == OBJECTS[key[2:]][1], key
        # found by lookup alone, in a directory never listed
        fs2 = new_fs()
        await fs2.ensure_root()
        v2 = await fs2.lookup(ROOT_INO, b"v2")
        legacy = await fs2.lookup(v2.ino, b"legacy.txt")
        assert await read_file(fs2, legacy.ino) == OBJECTS["v2/legacy.txt"][1]
        with pytest.raises(IntegrityError, match="object-only"):
            await fs2.lookup((await fs2.lookup(ROOT_INO, b"v3")).ino, b"bad")

        report = await import_s3ec(vol, key_prefix=loc.prefix, paths=None)
        assert report.imported == len(OBJECTS), report.summary()
        assert [k for k, _ in report.failed] == ["v3/bad"]
        # (the foreign objects' own folders: "i/v" alone also matched, one run in 32, an
        # encrypted name of the volume's own that began with a "v")
        left = {
            o["Key"]
            for p in ("i/v2/", "i/v3/")
            for o in raw.list_objects_v2(Bucket=bucket, Prefix=p).get("Contents", [])
        }
        assert left == {"i/v3/bad", "i/v3/bad.instruction"}  # instruction files went too
        fs3 = new_fs()
        await fs3.ensure_root()
        for key, (_v, data) in OBJECTS.items():
            node = await walk(fs3, key)
            assert node.foreign is None and await read_file(fs3, node.ino) == data, key


def test_instruction_file_rules() -> None:
    obj = {"x-amz-c": "115", "x-amz-d": "AAAA", "x-amz-i": "AAAA"}
    inst = {"x-amz-3": "AAAA", "x-amz-w": "12", "x-amz-t": '{"aws:x-amz-cek-alg": "115"}'}
    assert s3ec.needs_instruction(obj) and not s3ec.needs_instruction(obj | inst)
    merged = s3ec.merge_instruction(obj, json.dumps(inst).encode())
    assert s3ec.parse(merged).version == 3
    for bad in (b"[]", b"{}", b"not json", json.dumps(inst | {"other": "x"}).encode(),
                json.dumps(inst | {"x-amz-d": "AAAA"}).encode()):  # fmt: skip
        with pytest.raises(IntegrityError):
            s3ec.merge_instruction(obj, bad)
    v2 = {"x-amz-key-v2": "AAAA", "x-amz-cek-alg": "AES/GCM/NoPadding", "x-amz-iv": "AAAA"}
    with pytest.raises(IntegrityError, match="v1/v2"):
        s3ec.merge_instruction({"x-amz-iv": "AAAA"}, json.dumps(v2).encode())
