"""Issue 17, played as the attacker: a bucket writer can neither change what a mount serves
nor outlive a key rotation.

Every test runs a real mount (a daemon in a subprocess) against SeaweedFS and moto's KMS. The
attacker has raw S3 access to the bucket (tests/conftest.py ``botocore_client``), KMS keys of
its own in moto, the public format (docs/FORMAT.md, built in tests/attacker.py, which imports
nothing from cryptfs) and, where a scenario says so, an OLD key file and an old copy of the
volume config. Each test asserts the outcome a user sees: the attacked read fails with EIO (or
the entry is absent), the failure is counted (``cryptfs stats``), and the attacker's bytes are
never returned; a mount of a replayed or forged config is refused.

A "machine" is a cache dir plus a state dir (``CRYPTFS_STATE_DIR``, where a mount may remember
what it has seen of a volume, such as the newest config); each test gets its own. Reads after an
attack are made by a cold mount (new process, block cache emptied), so nothing can come from
what an earlier mount cached.
"""

from __future__ import annotations

import base64
import dataclasses
import errno
import functools
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.attacker import (
    Bucket,
    b64e,
    body_file_id,
    commits_to,
    config_mac,
    directory_marker,
    forge_like,
    is_body3,
    kms_file_context,
    open_keyslot,
    try_unwrap,
    wrap_local,
)
from tests.conftest import KmsServer
from tests.e2e.conftest import Volume, cryptfs
from tests.integration.test_s3ec import _oracle
from tests.reference_decryptor import (
    Invalid,
    Keys,
    b64u,
    decrypt_attrs,
    decrypt_body,
    decrypt_body3,
)

pytestmark = pytest.mark.e2e

CHUNK = 64 << 10  # the ``volume`` fixture's chunk size
GENUINE = b"genuine ledger line, written by the owner\n" * 2400  # 100 800 B: two chunks
EVIL = (b"ATTACKER-BYTES " * 7000)[: len(GENUINE)]  # what the attacker wants served
REPLAY = re.compile(r"epoch|older|replay", re.IGNORECASE)


@pytest.fixture(autouse=True)
def _machine_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """This test's machine remembers what it saw in a state dir of its own (not ~)."""
    monkeypatch.setenv("CRYPTFS_STATE_DIR", str(tmp_path / "state"))


# -- helpers ---------------------------------------------------------------------------------


def _bucket(vol: Volume) -> Bucket:
    return Bucket(vol.server.client(), vol.bucket, vol.url.split("/", 3)[3])  # type: ignore[no-untyped-call]


def _object_sizes(cfg: dict[str, Any], plain: int) -> set[int]:
    """The lengths a file of ``plain`` bytes may have in the bucket (FORMAT.md §2, §8.5)."""
    v1 = 92 + plain + 16 * max(1, -(-plain // CHUNK))
    if "segment_log2" not in cfg:
        return {v1}
    seg = 1 << cfg["segment_log2"]
    n = max(1, -(-plain // seg))
    sizes = [seg] * (n - 1) + [plain - (n - 1) * seg]
    v3 = sum(88 + b + 48 * max(1, -(-b // CHUNK)) for b in sizes) + 108 + 96 * n
    return {v1, v3}


def _decrypt(keys: Keys, b: Bucket, key: str, body: bytes, md: dict[str, str], dek: bytes) -> bytes:
    """The plaintext of a file's object, for a holder of the volume's key (the owner)."""
    if not is_body3(body):
        return decrypt_body(body, dek, keys.chunk_log2)[0]
    attrs = decrypt_attrs(keys, md, b"", key.removeprefix(b.prefix + "/"))
    seg = 1 << b.config_json()["segment_log2"]
    return decrypt_body3(body, dek, keys.volume_id, b64u(md["cfs-f"]), b64u(attrs["gen"]),
                         seg, 1 << keys.chunk_log2)[0]  # fmt: skip


def _write(path: Path, data: bytes, mode: str = "wb") -> None:
    """Write through the mount and fsync: the object is in S3 when this returns."""
    with open(path, mode) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


SERVED = "the attacker's bytes"


def _seen(got: bytes | int) -> str:
    """What a reader got, in words (the errno's name, or whose bytes)."""
    if isinstance(got, int):
        return errno.errorcode.get(got, str(got))
    if got and EVIL.startswith(got):
        return SERVED
    if b"ATTACKER-BYTES" in got:
        return SERVED + ", in part"
    if got == GENUINE:
        return "the genuine bytes"
    return f"{len(got)} other bytes"


def _read(path: Path) -> bytes | int:
    """The bytes, or the errno of the failure."""
    try:
        return path.read_bytes()
    except OSError as e:
        return e.errno or -1


def _outcome(path: Path) -> str:
    """What a reader of the whole file gets, in words."""
    return _seen(_read(path))


def _pread(path: Path, n: int = 4096) -> str:
    """What a reader of the first ``n`` bytes gets, in words."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        return _seen(e.errno or -1)
    try:
        return _seen(os.pread(fd, n, 0))
    except OSError as e:
        return _seen(e.errno or -1)
    finally:
        os.close(fd)


def _stats(mnt: Path) -> dict[str, Any]:
    snap: dict[str, Any] = json.loads(cryptfs("stats", str(mnt), "--json").stdout)
    return snap


def _cold(vol: Volume) -> None:
    """Empty the (unmounted) volume's cache dir but for the log: the next mount reads S3."""
    assert not os.path.ismount(vol.mnt)
    if vol.cache.exists():
        for p in vol.cache.iterdir():
            if p.name == "cryptfs.log":
                continue
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()


def _cold_read(vol: Volume, mount: Callable[[], object], name: str) -> tuple[str, dict[str, Any]]:
    """What a reader of ``name`` gets from a cold mount (``mount()``), and that mount's stats."""
    _cold(vol)
    mount()
    try:
        return _outcome(vol.mnt / name), _stats(vol.mnt)
    finally:
        vol.umount()


def _other_machine(vol: Volume, tmp_path: Path, name: str) -> tuple[Volume, dict[str, str]]:
    """The same volume seen from a machine that never mounted it: its own cache and state."""
    base = tmp_path / name
    base.mkdir()
    env = dict(os.environ, CRYPTFS_STATE_DIR=str(base / "state"))
    return dataclasses.replace(vol, cache=base / "cache", mounted=False), env


def _refused(r: subprocess.CompletedProcess[str], vol: Volume) -> bool:
    """Did ``try_mount`` refuse?  (If it mounted, it is noted so that teardown unmounts.)"""
    if r.returncode == 0:
        vol.mounted = True
    return r.returncode != 0 and not os.path.ismount(vol.mnt)


@functools.cache
def _no_settle() -> tuple[str, ...]:
    """``rotate`` waits for running mounts to re-read the config (``--settle``, where it
    exists); no mount runs during the rotations here."""
    return ("--settle", "0") if "--settle" in cryptfs("rotate", "--help").stdout else ()


def _rotate_to_key_file(vol: Volume, new: Path) -> Volume:
    r = cryptfs(
        "rotate", vol.url, "--key-file", str(vol.key), "--to-key-file", str(new),
        "--endpoint-url", vol.endpoint, *_no_settle(),
    )  # fmt: skip
    assert ": complete" in r.stdout, r.stdout
    return dataclasses.replace(vol, key=new)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass
class KmsVolume:
    """A volume whose data keys are wrapped by KMS key ``key_a`` (it also has a key-file slot
    for ``vol.key``, so that the shared fixture's mount and teardown apply)."""

    vol: Volume
    key_a: str
    kms: KmsServer

    def mount(self, *extra: str) -> None:
        self.vol.mount("--kms-endpoint-url", self.kms.endpoint, *extra)

    def mount_by_kms(self, *extra: str) -> None:
        """Through the KMS keyslot alone (after a rotation removed the key-file slot)."""
        self.vol.try_mount(
            "--kms-endpoint-url", self.kms.endpoint, "--writeback-delay", "0.5", *extra,
            check=True,
        )  # fmt: skip
        self.vol.mounted = True


@pytest.fixture
def kms_volume(volume: Volume, kms_server: KmsServer) -> KmsVolume:
    key_a = kms_server.new_key()
    url = f"s3://{volume.bucket}/kms"
    cryptfs(
        "init", url, "--kms-key-id", key_a, "--key-file", str(volume.key), "--endpoint-url",
        volume.endpoint, "--kms-endpoint-url", kms_server.endpoint, "--chunk-size", "64K",
    )  # fmt: skip
    # same mount point and cache dir as ``volume``: its teardown unmounts and checks the log
    return KmsVolume(dataclasses.replace(volume, url=url), key_a, kms_server)


# -- 1. KMS data-key substitution ------------------------------------------------------------


@dataclass
class Planted:
    key: str  # the object key attacked
    etag: str  # of the attacker's object
    arn: str  # the attacker's KMS key
    dek: bytes  # the attacker's data key


def _substitute_data_key(kv: KmsVolume) -> Planted:
    """The owner writes ``ledger.txt``; the attacker replaces its data key by one of its own,
    under its own KMS key X, and its body by EVIL sealed under that key with the ORIGINAL salt
    and length (so the authentic ``cfs-a`` - path, size, generation - still matches)."""
    kv.mount()
    _write(kv.vol.mnt / "ledger.txt", GENUINE)
    kv.vol.umount()
    b = _bucket(kv.vol)
    [key] = b.file_keys()
    body, md = b.get(key)
    cfg = b.config_json()
    file_id = body_file_id(body)
    assert b64u(md["cfs-f"]) == file_id and md["cfs-kid"] == kv.key_a  # as FORMAT.md says
    x = kv.kms.new_key()
    dek = os.urandom(32)
    ctx = kms_file_context(b64u(cfg["volume_id"]), file_id)
    blob = kv.kms.client().encrypt(KeyId=x, Plaintext=dek, EncryptionContext=ctx)  # type: ignore[no-untyped-call]
    # (a revision-3 body's generation is sealed in the attributes: the attacker guesses it;
    # the mount refuses the data key before that could matter)
    gen = os.urandom(32)
    forged = forge_like(body, dek, EVIL, cfg, gen)
    assert len(forged) == len(body)
    if is_body3(forged):
        vid, seg = b64u(cfg["volume_id"]), 1 << cfg["segment_log2"]
        got = decrypt_body3(forged, dek, vid, file_id, gen, seg, CHUNK)[0]
    else:
        got = decrypt_body(forged, dek, cfg["chunk_log2"])[0]
    assert got == EVIL
    etag = b.put(key, forged, md | {"cfs-kid": x, "cfs-k": b64e(blob["CiphertextBlob"])})
    return Planted(key, etag, x, dek)


@pytest.mark.allow_error_logs
def test_kms_data_key_substitution_reads_eio(kms_volume: KmsVolume) -> None:
    """Attack 1: a data key under the attacker's KMS key is not believed."""
    _substitute_data_key(kms_volume)
    vol = kms_volume.vol
    _cold(vol)
    kms_volume.mount()
    try:
        whole = _outcome(vol.mnt / "ledger.txt")
        head = _pread(vol.mnt / "ledger.txt")
        snap = _stats(vol.mnt)
    finally:
        vol.umount()
    assert SERVED not in (whole, head), f"the mount served {SERVED}: read {whole}, pread {head}"
    assert whole == "EIO"
    # (a second look may find the entry skipped, as a listing skips what does not authenticate)
    assert head in ("EIO", "ENOENT")
    assert snap["integrity_failures"] >= 1, snap


@pytest.mark.allow_error_logs
@pytest.mark.parametrize("how", ["append", "overwrite"])
def test_kms_substituted_data_key_is_never_rewrapped(kms_volume: KmsVolume, how: str) -> None:
    """Attack 1, second half: the owner writes the attacked file after reading it; the mount
    must not adopt the attacker's data key (rewrapped under the volume's KMS key, the attacker
    would read every later version)."""
    planted = _substitute_data_key(kms_volume)
    vol = kms_volume.vol
    b = _bucket(vol)
    _cold(vol)
    kms_volume.mount()
    write_error = None
    try:
        attacked = _outcome(vol.mnt / "ledger.txt")
        try:
            if how == "append":
                _write(vol.mnt / "ledger.txt", b"appended by the owner\n", "ab")
            else:
                _write(vol.mnt / "ledger.txt", b"rewritten by the owner\n" * 100)
        except OSError as e:
            write_error = e.errno
    finally:
        vol.umount()  # uploads whatever was staged
    body, md = b.get(planted.key)
    etag = b.head(planted.key)["ETag"]
    _cold(vol)
    kms_volume.mount()
    try:
        after = _outcome(vol.mnt / "ledger.txt")
    finally:
        vol.umount()

    if etag == planted.etag:  # the mount wrote nothing over the attacker's object
        assert write_error is not None, "the owner's write was dropped without an error"
    else:
        assert md["cfs-kid"] != planted.arn, "the new version's data key is the attacker's KMS's"
        adopted = commits_to(planted.dek, body)
        assert not adopted, (
            f"the mount rewrapped the attacker's data key under {md['cfs-kid']} (the volume's "
            f"KMS key: {md['cfs-kid'] == kms_volume.key_a}): the new version opens with it"
        )
    assert attacked != SERVED, f"the mount served {SERVED}"
    assert SERVED not in after, f"a later read got {after}"


@pytest.mark.allow_error_logs
def test_rotation_does_not_adopt_a_substituted_data_key(kms_volume: KmsVolume) -> None:
    """Attack 1 through ``cryptfs rotate`` (KMS A -> B): a rotation that rewraps the attacker's
    data key (KMS ReEncrypt X -> B) would make it the volume's own."""
    planted = _substitute_data_key(kms_volume)
    vol, kms = kms_volume.vol, kms_volume.kms
    key_b = kms.new_key()
    r = cryptfs(
        "rotate", vol.url, "--key-file", str(vol.key), "--to-kms-key-id", key_b,
        "--endpoint-url", vol.endpoint, "--kms-endpoint-url", kms.endpoint, *_no_settle(),
        check=False,
    )  # fmt: skip
    b = _bucket(vol)
    body, md = b.get(planted.key)
    got, snap = _cold_read(vol, kms_volume.mount_by_kms, "ledger.txt")
    laundered = md["cfs-kid"] == key_b and commits_to(planted.dek, body)
    assert not laundered, (
        "rotation rewrapped the attacker's data key under the new KMS key:\n" + r.stdout
    )
    assert got != SERVED, f"the mount served {SERVED} after the rotation"
    assert got == "EIO"
    assert snap["integrity_failures"] >= 1, snap


# -- 2. S3 Encryption Client objects ---------------------------------------------------------


@pytest.mark.allow_error_logs
@pytest.mark.parametrize("version", [2, 3])
def test_s3ec_object_in_place_of_a_native_file(
    volume: Volume, kms_server: KmsServer, version: int
) -> None:
    """Attack 2: the official S3 Encryption Client writes, with the attacker's KMS key, an
    object at the exact key of an existing cryptfs file."""
    kms_args = ("--kms-endpoint-url", kms_server.endpoint)
    volume.mount(*kms_args)
    _write(volume.mnt / "payroll.txt", GENUINE)
    volume.umount()
    b = _bucket(volume)
    [key] = b.file_keys()
    x = kms_server.new_key()
    _oracle(volume.server, kms_server, x, volume.bucket, "put", {key: [version, _b64(EVIL)]})
    md = b.head(key)["Metadata"]
    assert "cfs" not in md and ("x-amz-3" in md or "x-amz-key-v2" in md), md  # theirs now

    # a reader that opens the name
    direct, snap = _cold_read(volume, lambda: volume.mount(*kms_args), "payroll.txt")
    _cold(volume)
    volume.mount(*kms_args)  # a reader that lists first, then reads whatever is there
    try:
        listed = {n: _outcome(volume.mnt / n) for n in sorted(os.listdir(volume.mnt))}
    finally:
        volume.umount()

    assert direct != SERVED, "the mount served the attacker's S3EC object as payroll.txt"
    served = [n for n, got in listed.items() if SERVED in got]
    assert not served, f"the mount served the attacker's S3EC object as {served}"
    assert direct in ("EIO", "ENOENT")
    if direct == "EIO":
        assert snap["integrity_failures"] >= 1, snap
    assert set(listed) <= {"payroll.txt"}, f"entries that are not the owner's: {sorted(listed)}"
    assert listed.get("payroll.txt", "EIO") == "EIO", listed


@pytest.mark.allow_error_logs
def test_show_s3ec_decrypts_only_under_the_named_kms_keys(
    volume: Volume, kms_server: KmsServer
) -> None:
    """Attack 2 with S3EC objects shown (``--show-s3ec``): the one under the configured KMS
    key reads; the attacker's, at a plaintext key and under its own KMS key X, reads EIO."""
    b = _bucket(volume)
    key_a, x = kms_server.new_key(), kms_server.new_key()
    good = b"from the partner, under the agreed KMS key\n"
    partner_obj = {b.key("from-partner.txt"): [3, _b64(good)]}
    _oracle(volume.server, kms_server, key_a, volume.bucket, "put", partner_obj)
    evil_objs = {
        b.key("from-attacker-v3.txt"): [3, _b64(EVIL)],
        b.key("from-attacker-v2.txt"): [2, _b64(EVIL)],
    }
    _oracle(volume.server, kms_server, x, volume.bucket, "put", evil_objs)
    volume.mount(
        "--kms-endpoint-url", kms_server.endpoint, "--show-s3ec", "--s3ec-kms-key-id", key_a
    )
    try:
        partner = _read(volume.mnt / "from-partner.txt")
        v3 = _outcome(volume.mnt / "from-attacker-v3.txt")
        v2 = _outcome(volume.mnt / "from-attacker-v2.txt")
        snap = _stats(volume.mnt)
    finally:
        volume.umount()
    assert SERVED not in (v3, v2), f"the mount decrypted the attacker's S3EC objects: {v3}, {v2}"
    assert (v3, v2) == ("EIO", "EIO")
    assert snap["integrity_failures"] >= 2, snap
    assert partner == good  # (the option does show S3EC objects under the named key)


def test_s3ec_objects_are_not_shown_by_default(volume: Volume, kms_server: KmsServer) -> None:
    """Attack 2, default mount: objects of the S3 Encryption Client are not shown at all,
    even under a KMS key the mount may use."""
    b = _bucket(volume)
    key_a = kms_server.new_key()
    planted = {b.key("planted.txt"): [3, _b64(EVIL)], b.key("dir/deep.txt"): [2, _b64(EVIL)]}
    _oracle(volume.server, kms_server, key_a, volume.bucket, "put", planted)
    volume.mount("--kms-endpoint-url", kms_server.endpoint)
    try:
        listing = sorted(os.listdir(volume.mnt))
        direct = _outcome(volume.mnt / "planted.txt")
        deep = _outcome(volume.mnt / "dir" / "deep.txt")
    finally:
        volume.umount()
    assert SERVED not in (direct, deep), f"the mount served S3EC objects: {direct}, {deep}"
    assert listing == [], listing
    assert (direct, deep) == ("ENOENT", "ENOENT")


# -- 3. Data keys outlive versions and rotations ---------------------------------------------


def _generations(
    vol: Volume, mount: Callable[[], object]
) -> tuple[str, list[tuple[bytes, dict[str, str]]]]:
    """``notes.txt`` written, rewritten, then appended to, one mount each: the object key and
    every version (body, metadata) as the bucket held it."""
    b = _bucket(vol)
    versions = []
    for mode, data in (("wb", GENUINE), ("wb", b"version two\n" * 9000), ("ab", b"three\n")):
        mount()
        try:
            _write(vol.mnt / "notes.txt", data, mode)
        finally:
            vol.umount()
        [key] = b.file_keys()
        versions.append(b.get(key))
    return key, versions


def _fresh_dek_problems(
    versions: list[tuple[bytes, dict[str, str]]], deks: list[bytes]
) -> list[str]:
    problems = []
    for i, dek in enumerate(deks):
        for j in range(i + 1, len(versions)):
            if commits_to(dek, versions[j][0]):
                problems.append(f"version {j + 1} opens with the data key of version {i + 1}")
    return problems


def test_every_upload_uses_a_fresh_data_key(volume: Volume) -> None:
    """Attack 3: someone who once unwrapped a file's data key (simulated with the key file)
    reads none of its later versions."""
    b = _bucket(volume)
    key, versions = _generations(volume, volume.mount)
    keys = open_keyslot(b.config(), volume.key.read_text())
    deks = []
    for body, md in versions:
        dek = try_unwrap(keys, md)
        assert dek is not None and commits_to(dek, body)  # the simulation works
        deks.append(dek)
    assert _decrypt(keys, b, key, *versions[0], deks[0]) == GENUINE
    problems = _fresh_dek_problems(versions, deks)
    assert not problems


def test_every_upload_uses_a_fresh_kms_data_key(kms_volume: KmsVolume) -> None:
    """Attack 3 on a KMS volume: someone who once had kms:Decrypt for a file's data key reads
    none of its later versions (every upload asks KMS for a new data key)."""
    _key, versions = _generations(kms_volume.vol, kms_volume.mount)
    volume_id = b64u(_bucket(kms_volume.vol).config_json()["volume_id"])
    kms = kms_volume.kms.client()  # type: ignore[no-untyped-call]
    deks = []
    for body, md in versions:
        ctx = kms_file_context(volume_id, b64u(md["cfs-f"]))
        blob = b64u(md["cfs-k"])
        dek = bytes(
            kms.decrypt(CiphertextBlob=blob, EncryptionContext=ctx, KeyId=md["cfs-kid"])[
                "Plaintext"
            ]
        )
        assert commits_to(dek, body)  # the simulation works
        deks.append(dek)
    problems = _fresh_dek_problems(versions, deks)
    assert not problems


def test_old_key_and_config_open_no_data_key_after_rotation(volume: Volume, tmp_path: Path) -> None:
    """Attack 3 across ``cryptfs rotate --to-key-file``: the old key file, a copy of the old
    config and of the old metadata give no data key of anything written after the rotation."""
    b = _bucket(volume)
    volume.mount()
    _write(volume.mnt / "kept.txt", GENUINE)
    volume.umount()
    [kept] = b.file_keys()
    old_config, old_key = b.config(), volume.key.read_text()
    _old_body, old_md = b.get(kept)
    rotated = _rotate_to_key_file(volume, tmp_path / "new.key")
    rotated.mount()
    try:
        _write(rotated.mnt / "kept.txt", b"rewritten after the rotation\n" * 3000)
        _write(rotated.mnt / "created.txt", b"created after the rotation\n" * 3000)
    finally:
        rotated.umount()

    old = open_keyslot(old_config, old_key)  # what the thief of the old key file holds
    dek_old = try_unwrap(old, old_md)
    assert dek_old is not None  # the simulation works: once, the old key opened it
    problems = []
    with pytest.raises(Invalid):
        open_keyslot(b.config(), old_key)  # (the old key opens no slot of the current config)
    for key in b.file_keys():
        body, md = b.get(key)
        if try_unwrap(old, md) is not None:
            problems.append(f"the old key unwraps the data key of {key}")
        if commits_to(dek_old, body):
            problems.append(f"{key} opens with the data key from before the rotation")
    assert not problems


@pytest.mark.allow_error_logs
@pytest.mark.parametrize("kid", ["vmk", "retired-mk", "its-own"])
def test_old_key_cannot_plant_content_after_rotation(
    volume: Volume, tmp_path: Path, kid: str
) -> None:
    """Attack 3, the other way round: the thief of the old key file (and an old config copy)
    seals a body of its own, keeping the object's authentic attributes (same salt, same
    size), under a data key it wraps with what it holds - the legacy key derived from the
    VMK, which no rotation changes, or the retired master key - or ("its-own") under the
    file's own data key, which the old key unwraps from the metadata it saw before the
    rotation and which the rotation rewrapped but did not change: that body goes under the
    rotated, authentic metadata, whose pin refuses it (before the pins it was served).
    A mount with the new key must not serve it."""
    b = _bucket(volume)
    volume.mount()
    _write(volume.mnt / "contract.txt", GENUINE)
    volume.umount()
    old_config, old_key = b.config(), volume.key.read_text()
    [key] = b.file_keys()
    _body, old_md = b.get(key)  # (what the thief saw before the rotation)
    rotated = _rotate_to_key_file(volume, tmp_path / "new.key")
    old = open_keyslot(old_config, old_key)
    body, md = b.get(key)
    file_id = body_file_id(body)
    # (the old key opened the attributes sealed before the rotation: the generation is known)
    gen = b64u(decrypt_attrs(old, old_md, b"", key.removeprefix(b.prefix + "/"))["gen"])
    if kid == "its-own":
        dek = try_unwrap(old, old_md)
        assert dek is not None  # (the file's data key, from before the rotation)
    else:
        dek = os.urandom(32)
        wrap_kid = "vmk" if kid == "vmk" else next(iter(old.mks))
        md = md | {
            "cfs-w": "gcm",
            "cfs-kid": wrap_kid,
            "cfs-k": wrap_local(old, wrap_kid, dek, file_id),
        }
    b.put(key, forge_like(body, dek, EVIL, json.loads(old_config), gen), md)

    got, snap = _cold_read(rotated, rotated.mount, "contract.txt")
    assert got != SERVED, f"the mount served a body sealed under a data key of the old ({kid})"
    assert got == "EIO"
    assert snap["integrity_failures"] >= 1, snap


# -- 4. Config replay and forgery ------------------------------------------------------------


def _replayed_mount_refused(vol: Volume, *key_args: str) -> subprocess.CompletedProcess[str]:
    r = vol.try_mount(*key_args, "--writeback-delay", "0.5")
    if not _refused(r, vol):
        vol.umount()
        pytest.fail(f"a mount accepted the replayed config: {r.stdout}")
    return r


def test_config_replay_after_key_file_rotation_is_refused(volume: Volume, tmp_path: Path) -> None:
    """Attack 4a: the config from before ``rotate --to-key-file`` is put back; this machine
    has mounted the rotated volume since, so it knows the config went forward."""
    b = _bucket(volume)
    volume.mount()
    _write(volume.mnt / "a.txt", b"before the rotation\n")
    volume.umount()
    old_config = b.config()
    rotated = _rotate_to_key_file(volume, tmp_path / "new.key")
    rotated.mount()
    assert (rotated.mnt / "a.txt").read_bytes() == b"before the rotation\n"
    rotated.umount()
    b.put_config(old_config)
    r = _replayed_mount_refused(rotated, "--key-file", str(rotated.key))
    assert REPLAY.search(r.stderr), f"refused, but not as a replay: {r.stderr.strip()}"


def test_config_replay_with_current_keyslots_is_refused(volume: Volume, tmp_path: Path) -> None:
    """Attack 4a, spliced: the old config's authenticated fields (its ``dek`` names the
    retired master key) with the current keyslots, which open with the new key file."""
    b = _bucket(volume)
    volume.mount()
    _write(volume.mnt / "a.txt", b"before the rotation\n")
    volume.umount()
    old = json.loads(b.config())
    rotated = _rotate_to_key_file(volume, tmp_path / "new.key")
    rotated.mount()
    rotated.umount()
    b.put_config(old | {"keyslots": b.config_json()["keyslots"]})
    _replayed_mount_refused(rotated, "--key-file", str(rotated.key))  # (a forgery: any reason)


@pytest.mark.allow_error_logs
def test_config_replay_after_kms_rotation_is_refused(kms_volume: KmsVolume) -> None:
    """Attack 4a on KMS (A -> B): the old config's keyslot is under A, which still works, and
    its ``dek`` names A: a mount of it would wrap new files' keys under the retired key."""
    vol, kms = kms_volume.vol, kms_volume.kms
    b = _bucket(vol)
    kms_volume.mount()
    _write(vol.mnt / "a.txt", b"before the rotation\n")
    vol.umount()
    old_config = b.config()
    key_b = kms.new_key()
    r = cryptfs(
        "rotate", vol.url, "--key-file", str(vol.key), "--to-kms-key-id", key_b,
        "--endpoint-url", vol.endpoint, "--kms-endpoint-url", kms.endpoint, *_no_settle(),
    )  # fmt: skip
    assert ": complete" in r.stdout, r.stdout
    kms_volume.mount_by_kms()
    assert (vol.mnt / "a.txt").read_bytes() == b"before the rotation\n"
    vol.umount()
    b.put_config(old_config)
    m = vol.try_mount("--kms-endpoint-url", kms.endpoint, "--writeback-delay", "0.5")
    if not _refused(m, vol):
        before = set(b.file_keys())
        _write(vol.mnt / "after-replay.txt", b"new file after the replay\n")
        vol.umount()
        [new] = set(b.file_keys()) - before
        kid = b.head(new)["Metadata"].get("cfs-kid")
        retired = " (the retired key A)" if kid == kms_volume.key_a else ""
        pytest.fail(
            f"a mount accepted the replayed pre-rotation config; a new file's data key went to "
            f"{kid}{retired}"
        )
    assert REPLAY.search(m.stderr), f"refused, but not as a replay: {m.stderr.strip()}"


def _reinsert_removed_passphrase_slot(volume: Volume, tmp_path: Path) -> Path:
    """Attack 4b: ``key add`` a passphrase, the attacker saves its slot, ``key remove`` it,
    and the attacker puts the slot back into the current config's keyslots."""
    pw = tmp_path / "pw"
    pw.write_text("correct horse battery staple\n")
    pw.chmod(0o600)
    common = ["--key-file", str(volume.key), "--endpoint-url", volume.endpoint]
    env = dict(os.environ)  # (the passphrase slot gets the real Argon2id parameters)
    r = cryptfs("key", "add", volume.url, "--new-passphrase-file", str(pw), *common, env=env)
    slot_id = r.stdout.split("added keyslot ")[1].split()[0]
    b = _bucket(volume)
    [slot] = [s for s in b.config_json()["keyslots"] if s["id"] == slot_id]
    volume.try_mount("--passphrase-file", str(pw), check=True)  # it did open the volume
    volume.mounted = True
    volume.umount()
    cryptfs("key", "remove", volume.url, slot_id, *common)
    assert slot_id not in cryptfs("key", "list", volume.url, *common).stdout
    cfg = b.config_json()
    cfg["keyslots"].append(slot)
    b.put_config(cfg)
    return pw


def test_reinserted_keyslot_does_not_open_the_volume(volume: Volume, tmp_path: Path) -> None:
    """Attack 4b: the removed passphrase must not open the volume through its re-added slot."""
    pw = _reinsert_removed_passphrase_slot(volume, tmp_path)
    r = volume.try_mount("--passphrase-file", str(pw))
    if not _refused(r, volume):
        volume.umount()
        pytest.fail("the removed passphrase opens the volume again (its slot was re-added)")


def test_config_with_a_reinserted_keyslot_is_refused(volume: Volume, tmp_path: Path) -> None:
    """Attack 4b: a config whose keyslots a bucket writer changed is refused, whatever key."""
    _reinsert_removed_passphrase_slot(volume, tmp_path)
    r = volume.try_mount("--key-file", str(volume.key))
    if not _refused(r, volume):
        volume.umount()
        pytest.fail("a mount accepted a config whose keyslots a bucket writer changed")


@pytest.mark.allow_error_logs
@pytest.mark.parametrize("form", ["as-is", "as-revision-1"])
def test_config_forged_with_an_old_key_is_refused(
    volume: Volume, kms_server: KmsServer, tmp_path: Path, form: str
) -> None:
    """Attack 4c: the thief of the OLD key file, with the OLD config, takes the current
    config, points ``dek`` at its own KMS key and recomputes the MAC as FORMAT.md §1 says
    under the VMK from the old slot - keeping every other field (``as-is``), or cut down to
    the fields of §1 (``as-revision-1``: a downgrade, where the config is of a later
    revision). Refused by this machine (which mounted the rotated volume) and by one that
    never saw the volume."""
    b = _bucket(volume)
    volume.mount()
    _write(volume.mnt / "a.txt", b"before the rotation\n")
    volume.umount()
    old_config, old_key = b.config(), volume.key.read_text()
    rotated = _rotate_to_key_file(volume, tmp_path / "new.key")
    rotated.mount()
    rotated.umount()

    old = open_keyslot(old_config, old_key)
    x = kms_server.new_key()
    forged = b.config_json()
    if form == "as-revision-1":
        section1 = ("volume_id", "chunk_log2", "names", "suite", "sse", "keyslots")
        forged = {k: forged[k] for k in section1 if k in forged} | {"cryptfs": 1}
        # and a root directory of §3 (its attributes under the VMK), should the one there be
        # of a later revision
        b.put(b.key(".cryptfs.dir"), b"", directory_marker(old, b"/"))
    elif "kms_keys" in forged:
        forged["kms_keys"] = sorted({*forged["kms_keys"], x})
    forged["dek"] = {"scheme": "kms", "kid": x}
    forged["mac"] = config_mac(old, forged)
    b.put_config(forged)

    kms_args = ("--kms-endpoint-url", kms_server.endpoint)
    elsewhere, env = _other_machine(rotated, tmp_path, "machine2")
    accepted = []
    for i, (machine, machine_env) in enumerate(((rotated, None), (elsewhere, env))):
        r = machine.try_mount(
            "--key-file", str(machine.key), *kms_args, "--writeback-delay", "0.5", env=machine_env
        )
        if _refused(r, machine):
            continue
        before = set(b.file_keys())
        _write(machine.mnt / f"after-forgery-{i}.txt", b"written after the forgery\n")
        machine.umount()
        [new] = set(b.file_keys()) - before
        kid = b.head(new)["Metadata"].get("cfs-kid")
        accepted.append(
            f"machine {i + 1} mounted it; a new file's data key went to {kid}"
            + (" (the attacker's KMS key)" if kid == x else "")
        )
    assert not accepted, "; ".join(accepted)


@pytest.mark.allow_error_logs
def test_planted_kms_keyslot_does_not_open_the_volume(kms_volume: KmsVolume) -> None:
    """Attack 4, with no key at all: a KMS volume is mounted through its KMS keyslot. The
    attacker replaces the config by one of its own - same volume id, a VMK of its own in a
    KMS keyslot under its own KMS key X (which the mount's credentials may use, as a key
    policy can allow anyone), ``dek`` on X, and a MAC under that VMK - and deletes the root
    directory's marker. The mount must not open it: whatever it wrote there would be the
    attacker's to read (names under its VMK, data keys under its KMS key)."""
    vol, kms = kms_volume.vol, kms_volume.kms
    b = _bucket(vol)
    kms_volume.mount_by_kms()  # this machine has opened the volume through its KMS slot
    _write(vol.mnt / "a.txt", b"the owner's file\n")
    vol.umount()

    current = b.config_json()
    volume_id = b64u(current["volume_id"])
    x = kms.new_key()
    vmk = os.urandom(32)
    slot_id = "kms-" + os.urandom(3).hex()
    ctx = {"cryptfs:volume": current["volume_id"], "cryptfs:keyslot": slot_id}
    blob = kms.client().encrypt(KeyId=x, Plaintext=vmk, EncryptionContext=ctx)  # type: ignore[no-untyped-call]
    fields = ("volume_id", "chunk_log2", "names", "suite")
    forged: dict[str, Any] = {k: current[k] for k in fields} | {"cryptfs": 1}
    forged["dek"] = {"scheme": "kms", "kid": x}
    forged["keyslots"] = [
        {"type": "kms", "id": slot_id, "key_id": x, "blob": b64e(blob["CiphertextBlob"])}
    ]
    attacker = Keys(volume_id, vmk, {}, b"", b"", True, current["chunk_log2"])
    forged["mac"] = config_mac(attacker, forged)
    b.put_config(forged)
    b.delete(b.key(".cryptfs.dir"))  # (the root marker: the mount makes one under the new VMK)

    _cold(vol)
    r = vol.try_mount("--kms-endpoint-url", kms.endpoint, "--writeback-delay", "0.5")
    if not _refused(r, vol):
        before = set(b.file_keys())
        _write(vol.mnt / "after-planted-slot.txt", b"written into the attacker's volume\n")
        vol.umount()
        [new] = set(b.file_keys()) - before
        kid = b.head(new)["Metadata"].get("cfs-kid")
        pytest.fail(
            "a mount opened a config the attacker wrote (its own KMS keyslot); a new file's "
            f"data key went to {kid}" + (" (the attacker's KMS key)" if kid == x else "")
        )


# -- 5. Logs ---------------------------------------------------------------------------------

NAMES = ("secretdir-QX7", "secretname-QX7", "secretmoved-QX7", "secretclash-QX7")
SECRET_SIZE = 77_777


def _flip_body(b: Bucket, plain_size: int) -> str:
    """Flip one byte of the body of the (only) file object of that size; its key."""
    sizes = _object_sizes(b.config_json(), plain_size)
    [key] = [k for k in b.file_keys() if b.head(k)["ContentLength"] in sizes]
    body, md = b.get(key)
    flipped = bytearray(body)
    flipped[5000] ^= 0x20
    b.put(key, bytes(flipped), md)
    return key


def _umount(vol: Volume) -> str:
    r = cryptfs("umount", str(vol.mnt))
    vol.mounted = False
    return r.stdout + r.stderr


@pytest.mark.allow_error_logs
def test_daemon_log_holds_no_names(volume: Volume, tmp_path: Path) -> None:
    """Attack 5: a default mount creates, writes and fsyncs, renames, meets a conflict and an
    integrity failure; no file or directory name reaches its log or its output."""
    out: list[str] = []
    m = volume.mnt
    r = volume.mount("--writeback-delay", "30")
    out += [r.stdout, r.stderr]
    other = dataclasses.replace(volume, mnt=tmp_path / "mnt2", cache=tmp_path / "cache2")
    other.mnt.mkdir()
    try:
        (m / "secretdir-QX7").mkdir()
        _write(m / "secretdir-QX7" / "secretname-QX7.txt", os.urandom(SECRET_SIZE))
        d = m / "secretdir-QX7"
        os.rename(d / "secretname-QX7.txt", d / "secretmoved-QX7.txt")
        _write(m / "secretclash-QX7.txt", b"first version\n")
        with open(m / "secretclash-QX7.txt", "ab") as f:
            f.write(b"this host's change, staged\n")
        # another host changes the same file meanwhile
        r = other.mount()
        out += [r.stdout, r.stderr]
        _write(other.mnt / "secretclash-QX7.txt", b"the other host's version\n")
        out.append(_umount(other))
        fd = os.open(m / "secretclash-QX7.txt", os.O_RDONLY)
        try:
            os.fsync(fd)  # this host's upload meets the other's version: a conflict copy
        finally:
            os.close(fd)
        snap = _stats(m)
        assert snap["conflicts"] >= 1, snap
    finally:
        if os.path.ismount(m):
            out.append(_umount(volume))
        if os.path.ismount(other.mnt):
            out.append(_umount(other))

    _flip_body(_bucket(volume), SECRET_SIZE)
    _cold(volume)
    r = volume.mount()
    out += [r.stdout, r.stderr]
    try:
        got = _outcome(m / "secretdir-QX7" / "secretmoved-QX7.txt")
        snap = _stats(m)
    finally:
        out.append(_umount(volume))
    assert got == "EIO" and snap["integrity_failures"] >= 1, (got, snap)
    assert "integrity failure" in volume.log

    texts = {"log": volume.log, "other host's log": other.log, "output": "".join(out)}
    for where, text in texts.items():
        leaked = [n for n in NAMES if n in text]
        assert not leaked, f"the {where} names {leaked}"


@pytest.mark.allow_error_logs
def test_log_names_option_names_the_failing_file(volume: Volume) -> None:
    """Attack 5 with ``--log-names``: the integrity failure's log line names the file."""
    volume.mount("--log-names")
    _write(volume.mnt / "secretname-QX7.txt", os.urandom(SECRET_SIZE))
    volume.umount()
    _flip_body(_bucket(volume), SECRET_SIZE)
    _cold(volume)
    volume.mount("--log-names")
    try:
        got = _outcome(volume.mnt / "secretname-QX7.txt")
    finally:
        volume.umount()
    assert got == "EIO"
    lines = [line for line in volume.log.splitlines() if "integrity failure" in line]
    assert lines and any("secretname-QX7" in line for line in lines), lines
