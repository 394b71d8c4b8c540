"""Log lines name no file unless --log-names (cryptfs.lognames, docs/SECURITY.md)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyfuse3
import pytest

from cryptfs import lognames
from cryptfs.cache.staging import StagingArea
from cryptfs.crypto import Secret
from cryptfs.errors import NoEntry, StoreUnavailable
from cryptfs.format.names import NameCodec
from cryptfs.format.volume import KeySource
from cryptfs.fs.filesystem import Filesystem
from cryptfs.fs.model import ROOT_INO, Options
from cryptfs.fuse.ops import Operations
from cryptfs.store.memory import MemoryStore
from cryptfs.volume import Volume

SECRET = b"secret-name-"


@pytest.fixture
def names_shown() -> Iterator[None]:
    lognames.show_names(True)
    try:
        yield
    finally:
        lognames.show_names(False)


def test_ident_shows_a_key_only_if_opaque_and_a_path_only_with_log_names() -> None:
    assert lognames.ident("K1/K2", opaque=True, path=b"/a/b", ino=7) == "object K1/K2 (inode 7)"
    hidden = lognames.ident("a/b", opaque=False, path=b"/a/b", ino=7, fid=b"\x01" * 16)
    assert hidden == f"inode 7 (file {'01' * 16})"
    assert lognames.ident("a/b", opaque=False) == "object …"
    assert lognames.name(b"b") == "…"


def test_ident_with_log_names(names_shown: None) -> None:
    assert lognames.ident("a/b", opaque=False, path=b"/a/b", ino=7) == (
        "object a/b (inode 7, path /a/b)"
    )
    assert lognames.name(b"b") == "'b'"


def test_scrub_cuts_declared_names_keys_and_file_names() -> None:
    e = NoEntry("report.txt", names=("report.txt",))
    assert lognames.scrub(e) == "…"
    s = StoreUnavailable("S3 server error 503 for d/report.txt", object_keys=("d/report.txt",))
    assert lognames.scrub(s) == "S3 server error 503 for …"
    assert lognames.scrub(s, lambda k: True) == str(s)  # a key of encrypted names stays
    err = FileNotFoundError(2, "No such file or directory", "/home/u/report.txt")
    assert lognames.scrub(err) == "[Errno 2] No such file or directory"
    assert lognames.scrub(KeyError(b"report.txt")) == "KeyError"


def test_scrub_with_log_names(names_shown: None) -> None:
    assert lognames.scrub(NoEntry("report.txt", names=("report.txt",))) == "report.txt"
    assert lognames.scrub(KeyError("report.txt")) == "'report.txt'"


def test_traceback_text_keeps_frames_not_messages() -> None:
    name = "report" + ".txt"  # (not in the source lines the traceback shows)
    try:
        try:
            {}[name]
        except KeyError as inner:
            raise ValueError("bad " + name) from inner
    except ValueError as e:
        text = lognames.traceback_text(e)
    assert "report.txt" not in text
    assert "Traceback" in text and "builtins.KeyError" in text and "builtins.ValueError" in text
    assert "test_traceback_text_keeps_frames_not_messages" in text


def test_pyfuse3_bytes_arguments_are_hidden(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("tests.lognames")
    logger.addFilter(lognames.BytesArgs())
    with caplog.at_level(logging.INFO, "tests.lognames"):
        logger.info("entry of parent inode %d, name %s", 5, b"report.txt")
    assert "report.txt" not in caplog.text and "parent inode 5, name …" in caplog.text


def test_opaque_keys_are_encrypted_names_only() -> None:
    codec = NameCodec(Secret(b"n" * 32), b"v" * 16)
    comp, _ = codec.encode(b"/", b"report.txt")
    sub, _ = codec.encode(b"/report.txt", b"x" * 250)  # a long name: hashed in the key
    assert codec.opaque(comp) and codec.opaque(f"{comp}/.cryptfs.dir") and codec.opaque("")
    assert codec.opaque(f"{comp}/{sub}") and sub.startswith("~")
    assert not codec.opaque("report.txt") and not codec.opaque(f"{comp}/report.txt")
    assert not codec.opaque("photos/cat.jpg.instruction")
    assert not NameCodec(None, b"v" * 16).opaque(comp)  # plaintext names: the key is the name


async def _fs(tmp_path: Path, store: MemoryStore, *, encrypt: bool) -> Filesystem:
    src = KeySource(keyfile=Secret(b"k" * 32))
    try:
        vol = await Volume.open(store, src)
    except Exception:
        vol = await Volume.create(store, src, chunk_log2=12, encrypt_names=encrypt)
    staging = StagingArea(tmp_path / vol.volume_id.hex(), vol.keys.cache, vol.chunk)
    fs = Filesystem(vol, staging, Options(writeback_delay=0.1, metadata_ttl=0))
    await fs.ensure_root()
    return fs


async def _exercise(tmp_path: Path, *, encrypt: bool) -> str:
    """Create, fail an upload, rename, fsync, miss a name and read a tampered object, as the
    kernel would ask (``Operations``); returns the tampered object's key."""
    store = MemoryStore()
    fs = await _fs(tmp_path, store, encrypt=encrypt)
    ops = Operations(fs)
    ctx = SimpleNamespace(uid=0, gid=0)
    d = await fs.mkdir(ROOT_INO, SECRET + b"dir", 0o755, 0, 0)
    info, entry = await ops.create(d.ino, SECRET + b"alpha", 0o644, os.O_RDWR, ctx)
    await ops.write(info.fh, 0, os.urandom(3 * 4096))
    put = store.put

    async def unavailable(key: str, *a: Any, **kw: Any) -> str:
        store.put = put  # type: ignore[method-assign]
        raise StoreUnavailable(f"S3 server error 503 for {key}", object_keys=(key,))

    store.put = unavailable  # type: ignore[method-assign]
    await fs.writeback.background_sync(fs.node(entry.st_ino))  # logs the failure, retries later
    await ops.rename(d.ino, SECRET + b"alpha", d.ino, SECRET + b"beta", 0, ctx)
    await ops.fsync(info.fh, False)
    await ops.release(info.fh)
    with pytest.raises(pyfuse3.FUSEError):
        await ops.lookup(d.ino, SECRET + b"missing", ctx)
    key, _ = fs.object_key(fs.node(entry.st_ino))
    data, md, etag = store.objects[key]
    store.objects[key] = (data[:5000] + bytes([data[5000] ^ 1]) + data[5001:], md, etag)
    ops2 = Operations(await _fs(tmp_path / "2", store, encrypt=encrypt))
    d2 = await ops2.lookup(ROOT_INO, SECRET + b"dir", ctx)
    e2 = await ops2.lookup(d2.st_ino, SECRET + b"beta", ctx)
    h2 = await ops2.open(e2.st_ino, os.O_RDONLY, ctx)
    with pytest.raises(pyfuse3.FUSEError):
        await ops2.read(h2.fh, 0, 1 << 20)
    return key


@pytest.mark.allow_error_logs
@pytest.mark.parametrize("encrypt", [True, False])
async def test_default_logs_name_no_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, encrypt: bool
) -> None:
    with caplog.at_level(logging.DEBUG, "cryptfs"):
        key = await _exercise(tmp_path, encrypt=encrypt)
    text = caplog.text
    assert "integrity failure" in text and "upload of" in text and "lookup: …" in text
    assert SECRET.decode() not in text
    if encrypt:  # the key is made of encrypted names: it names the object
        assert f"integrity failure: object {key} (inode" in text
    else:  # the key is the name: the inode and file id instead
        assert "integrity failure: inode" in text and "S3 server error 503 for …" in text


@pytest.mark.allow_error_logs
async def test_log_names_shows_paths(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, names_shown: None
) -> None:
    with caplog.at_level(logging.DEBUG, "cryptfs"):
        key = await _exercise(tmp_path, encrypt=False)
    name = SECRET.decode()
    assert f"integrity failure: object {key} (inode" in caplog.text
    assert f"path /{name}dir/{name}beta" in caplog.text
    assert f"lookup: {name}missing" in caplog.text


def test_s3_errors_declare_the_keys_they_quote() -> None:
    from botocore.exceptions import ClientError, EndpointConnectionError

    from cryptfs.store.classify import classify
    from cryptfs.store.lean import ErrorAnswer

    e = classify(ErrorAnswer(503, "InternalError"), "d/report.txt", ("d/report.txt",))
    assert "d/report.txt" in str(e) and lognames.scrub(e) == "S3 server error InternalError for …"
    answer = {"Error": {"Code": "InternalError"}, "ResponseMetadata": {"HTTPStatusCode": 503}}
    e = classify(ClientError(answer, "HeadBucket"), "d/report.txt", ("d/report.txt",))
    assert lognames.scrub(e) == "S3 server error InternalError for …"
    url = "http://s3.example:9000/bucket/d/report.txt?uploads"
    e = classify(EndpointConnectionError(endpoint_url=url), "d/report.txt", ("d/report.txt",))
    assert url in str(e) and "report" not in lognames.scrub(e)
