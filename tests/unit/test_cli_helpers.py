"""Small CLI pieces: progress display, the mount(8) option translation, journald format."""

from __future__ import annotations

import io
import logging

import pytest

from cryptfs.cli import common as cli
from cryptfs.mount_helper import translate


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal_quiet_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    tty = _Tty()
    monkeypatch.setattr("sys.stderr", tty)
    bar = cli.Progress("rewrapping")
    for i in range(1, 4):
        bar.update(i, 3)
    bar.close()
    shown = tty.getvalue()
    assert "rewrapping" in shown and "3/3" in shown  # (rich: bar, count, rate, time left)
    assert shown.replace("\x1b[?25h", "").endswith("\n")  # (the line ends; cursor back)
    plain = io.StringIO()
    monkeypatch.setattr("sys.stderr", plain)
    bar = cli.Progress("rewrapping")
    bar.update(3, 3)
    bar.close()
    assert plain.getvalue() == ""


def test_mount_options_translate() -> None:
    argv = translate(
        "s3://b/p",
        "/mnt",
        "keyfile=/k,endpoint=http://127.0.0.1:1,_netdev,nofail,x-systemd.automount,allow_other,ro",
    )
    assert argv == [
        "mount", "s3://b/p", "/mnt", "--key-file", "/k", "--endpoint-url", "http://127.0.0.1:1",
        "-o", "allow_other,ro",
    ]  # fmt: skip
    with pytest.raises(SystemExit, match="keyfile needs a value"):
        translate("s3://b/p", "/mnt", "keyfile")
    # every setting of the option table is a mount option too (a switch: a bare word)
    argv = translate("s3://b/p", "/mnt", "cache_size=0,show_s3ec,read_ahead_kb=128,noatime")
    assert argv[3:] == ["--cache-size", "0", "--show-s3ec", "--read-ahead-kb", "128",
                        "-o", "noatime"]  # fmt: skip


@pytest.mark.allow_error_logs
def test_journald_priorities(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "8:12345")
    out = io.StringIO()
    monkeypatch.setattr("sys.stderr", out)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        cli.setup_logging(0, None)
        logging.getLogger("cryptfs.x").info("mounted")
        logging.getLogger("cryptfs.x").error("integrity failure")
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    assert out.getvalue().splitlines() == [
        "<6>cryptfs.x: mounted",
        "<3>cryptfs.x: integrity failure",
    ]
