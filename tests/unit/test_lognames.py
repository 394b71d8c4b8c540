"""Log lines name no file unless --log-names (cryptfs.lognames, docs/SECURITY.md)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from cryptfs import lognames
from cryptfs.crypto import Secret
from cryptfs.errors import NoEntry, StoreUnavailable
from cryptfs.format.names import NameCodec


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
