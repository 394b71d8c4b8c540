"""Names of foreign objects (AWS S3 Encryption Client): their keys are shown as plaintext
names, and nothing authenticates a key, so a bucket writer chooses them."""

from __future__ import annotations

import base64
import logging
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cryptfs.cache.staging import StagingArea
from cryptfs.crypto import Secret
from cryptfs.format import s3ec
from cryptfs.format.volume import KeySource
from cryptfs.fs.filesystem import Filesystem
from cryptfs.fs.model import Options
from cryptfs.offline import decrypt_tree, list_entries
from cryptfs.store.memory import MemoryStore
from cryptfs.volume import Volume

WRAPPING = Secret(os.urandom(32))


def _s3ec_v2(plaintext: bytes) -> tuple[bytes, dict[str, str]]:
    """An S3EC v2 object whose data key is AES/GCM-wrapped by ``WRAPPING``."""
    data_key, iv = os.urandom(32), os.urandom(12)
    edk = s3ec.wrap_aes_gcm(WRAPPING, Secret(data_key), os.urandom(12))
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    md = {"x-amz-key-v2": b64(edk), "x-amz-cek-alg": "AES/GCM/NoPadding",
          "x-amz-iv": b64(iv), "x-amz-wrap-alg": "AES/GCM", "x-amz-tag-len": "128",
          "x-amz-matdesc": "{}"}  # fmt: skip
    return AESGCM(data_key).encrypt(iv, plaintext, None), md


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "empty"),
        (".", "'.'"),
        ("..", "'..'"),
        ("x" * 256, "256 bytes"),
        ("é" * 128, "256 bytes"),
        ("a\0b", "NUL"),
        ("a/b", "'/'"),
        (b"a\0", "NUL"),
    ],
)
def test_names_that_cannot_be_entries(name: str | bytes, why: str) -> None:
    problem = s3ec.name_problem(name)
    assert problem is not None and why in problem


@pytest.mark.parametrize("name", ["a", "...", ".hidden", "x" * 255, "é" * 127, "a b\tc", b"\xff"])
def test_names_that_can(name: str | bytes) -> None:
    assert s3ec.name_problem(name) is None


async def test_decrypt_never_writes_outside_its_destination(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A foreign prefix named ``..`` (objects ``../evil``) would make ``cryptfs decrypt``
    write beside its destination, ``../../x`` above it; such entries are skipped, with a
    warning that names the object by inode (its key is a name: only --log-names shows it)."""
    store = MemoryStore()
    vol = await Volume.create(
        store, KeySource(keyfile=Secret(b"k" * 32)), chunk_log2=12, encrypt_names=True
    )
    vol.keyring.s3ec_keys = [WRAPPING]
    fs = Filesystem(
        vol,
        StagingArea(tmp_path / "st", vol.keys.cache, vol.chunk),
        Options(show_foreign=True),  # (--show-s3ec)
    )
    await fs.ensure_root()
    planted = {
        "ok.txt": b"an honest foreign file\n",
        "../evil": b"beside the destination\n",
        "../../evil2": b"above it\n",
        "d/../evil3": b"in d's parent: the destination itself\n",
        "nul\0.txt": b"a NUL\n",
        "x" * 300: b"too long\n",
    }
    for key, plain in planted.items():
        body, md = _s3ec_v2(plain)
        await store.put(key, body, md)

    caplog.set_level(logging.WARNING)
    names = await list_entries(fs, fs.root, False)
    assert "ok.txt" in names and "d" in names
    assert not any(n in ("..", ".") or "\0" in n or len(n) > 255 for n in names), names

    out = tmp_path / "out" / "inner" / "dest"
    out.mkdir(parents=True)
    files, _ = await decrypt_tree(fs, fs.root, out)
    assert (out / "ok.txt").read_bytes() == planted["ok.txt"]
    assert files == 1
    for p in (out / "evil3", out.parent / "evil", out.parent.parent / "evil2"):
        assert not p.exists(), p
    assert sorted(os.listdir(out.parent)) == ["dest"]
    assert ("skipped" in caplog.text or "not shown" in caplog.text) and "../" not in caplog.text


@pytest.mark.allow_error_logs
async def test_import_skips_keys_that_cannot_be_native_paths(tmp_path: Path) -> None:
    """``cryptfs import`` makes the key the native path: a NUL, an empty, '.' or '..'
    component, or one over 255 bytes, is not imported (and listed as such), before its body
    is downloaded or its data key unwrapped (a KMS request)."""
    from cryptfs.importer import import_s3ec

    store = MemoryStore()
    vol = await Volume.create(
        store, KeySource(keyfile=Secret(b"k" * 32)), chunk_log2=12, encrypt_names=True
    )
    vol.keyring.s3ec_keys = [WRAPPING]
    planted = ["ok.txt", "nul\0.txt", "d/a\0b", "x" * 256, "d//e", "d/./f"]
    for key in planted:
        body, md = _s3ec_v2(b"data of " + key.encode())
        await store.put(key, body, md)
    store.calls.clear()
    report = await import_s3ec(vol, key_prefix="", paths=None)
    assert report.imported == 1, report
    assert store.calls.get("get") == 1  # refused before its body is fetched or unwrapped
    failed = dict(report.failed)
    assert set(failed) == set(planted) - {"ok.txt"}, failed
    assert all("not imported: its key has" in why for why in failed.values()), failed
    for key in failed:
        assert key in store.objects, key  # left as it was


@pytest.mark.allow_error_logs
async def test_import_deletes_an_original_only_if_the_native_file_holds_its_content(
    tmp_path: Path,
) -> None:
    """A rerun of ``cryptfs import`` deleted an S3EC original whenever a native file of its
    name and size existed: another file of that size lost it (issue 18, lower). Now the
    original goes only if the native file holds its content."""
    from cryptfs.importer import import_s3ec
    from tests.fsutil import read_file, write_file

    store = MemoryStore()
    vol = await Volume.create(
        store, KeySource(keyfile=Secret(b"k" * 32)), chunk_log2=12, encrypt_names=True
    )
    vol.keyring.s3ec_keys = [WRAPPING]
    for key, text in (("same.txt", b"the original"), ("other.txt", b"the original")):
        body, md = _s3ec_v2(text)
        await store.put(key, body, md)
    fs = Filesystem(vol, StagingArea(tmp_path / "st", vol.keys.cache, vol.chunk), Options())
    await fs.ensure_root()
    await write_file(fs, 1, b"same.txt", b"the original")  # (a crash before the delete)
    await write_file(fs, 1, b"other.txt", b"ANOTHER FILE")  # same size, other content
    report = await import_s3ec(vol, key_prefix="", paths=None)
    assert report.imported == 1 and "same.txt" not in store.objects
    assert (
        "other.txt" in store.objects and "different native file" in dict(report.failed)["other.txt"]
    )
    check = Filesystem(vol, StagingArea(tmp_path / "st2", vol.keys.cache, vol.chunk), Options())
    await check.ensure_root()
    assert await read_file(check, (await check.lookup(1, b"other.txt")).ino) == b"ANOTHER FILE"
