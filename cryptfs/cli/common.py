"""What the commands share: the option table's flags, opening a volume's remote and keys,
the progress display, logging, and resolving settings (``cryptfs.config``).

Must not import: ``cryptfs.fs``, ``cryptfs.fuse``, ``cryptfs.daemon`` (a command imports what it
runs when it runs it: ``cryptfs --help`` loads none of them).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from cryptfs.config import OPTIONS, Opt, parse_size, takes
from cryptfs.crypto import Secret
from cryptfs.errors import UsageError
from cryptfs.format.volume import (
    KeySource,
    create_key_file,
    read_key_file,
    read_passphrase_file,
)

log = logging.getLogger("cryptfs")

SETTLE_HELP = (
    "seconds after the start before the last pass over the bucket (running mounts re-read "
    "the config every 30 s; default 35, 0 if no host has the volume mounted)"
)


def size_arg(text: str) -> int:
    """An argparse type: a number of bytes (``64K``, ``2G``)."""
    try:
        return parse_size(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_options(p: argparse.ArgumentParser, command: str) -> None:
    """The flags of every option of the table (``cryptfs.config.OPTIONS``) ``command``
    takes, and ``--config``; none has a default here (None: not given), so that
    ``apply_config`` can tell the command line from the environment, a file, the default."""
    for opt in OPTIONS:
        if opt.flags and takes(command, opt):
            _add(p, opt)
    p.add_argument("--config", help="TOML settings: NAME (/etc/cryptfs/NAME.toml) or a path")


def _add(p: argparse.ArgumentParser, opt: Opt) -> None:
    flags = opt.flags
    if opt.name == "verbose":
        p.add_argument(*flags, action="count", default=0, help=opt.help)
    elif opt.kind is bool:
        p.add_argument(*flags, action="store_true", default=None, help=opt.help)
    elif opt.kind is list:
        p.add_argument(*flags, dest=opt.name, action="append", default=None, help=opt.help)
    else:
        kind = size_arg if opt.size else opt.kind
        p.add_argument(*flags, dest=opt.name, type=kind, help=opt.help)


def add_positional(p: argparse.ArgumentParser, help: str = "s3://BUCKET[/PREFIX]") -> None:
    p.add_argument("location", nargs="?", help=help)


def remote_of(args: Any) -> Any:
    from cryptfs.session import Remote
    from cryptfs.store.kms import KmsOptions
    from cryptfs.store.s3 import S3Options

    endpoint = args.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
    verify: bool | str = str(args.ca_bundle) if args.ca_bundle else True
    kms_endpoint = args.kms_endpoint_url or os.environ.get("AWS_ENDPOINT_URL_KMS") or None
    sse_c = None
    if args.sse_c_key_file is not None:
        sse_c = read_or_create_key(args.sse_c_key_file, getattr(args, "cmd", "") == "init")
    s3ec_keys = (read_key_file(args.s3ec_key_file),) if args.s3ec_key_file else ()
    s3ec_kms = tuple(getattr(args, "s3ec_kms_key_id", None) or ())
    return Remote(
        S3Options(
            endpoint_url=endpoint,
            region=args.region,
            verify=verify,
            max_attempts=max(1, args.s3_attempts),
            addressing_style=args.addressing_style,
            read_timeout=args.s3_timeout,
            connect_timeout=min(10.0, args.s3_timeout),
        ),
        KmsOptions(endpoint_url=kms_endpoint, region=args.region, verify=verify),
        sse_c,
        s3ec_keys,
        s3ec_kms,
    )


def read_or_create_key(path: Path, create: bool) -> Secret:
    if create and not path.exists():
        key = create_key_file(path)
        print(f"created new key file {path} (mode 0600) — back it up", file=sys.stderr)
        return key
    return read_key_file(path)


def key_source(args: Any, *, create: bool = False) -> KeySource:
    """The keys offered to open (or, with ``create``, to protect) a volume.  With neither a
    key file nor a passphrase, the volume's KMS keyslot is tried."""
    src = KeySource()
    if args.key_file is not None:
        src.keyfile = read_or_create_key(args.key_file, create)
    if args.passphrase_file is not None:
        src.passphrase = read_passphrase_file(args.passphrase_file)
    src.kms = not src.local
    if getattr(args, "kms_key_id", None) and getattr(args, "cmd", "") != "init":
        src.kms_keys = (args.kms_key_id,)
    return src


class Progress:
    """A progress bar with rate and time left on a terminal (``rich``); off a terminal, a log
    line every 10 % (a service's journal wants no bar).  ``unit="bytes"``: sizes and a
    transfer rate; a total equal to what is done means the size is not known yet."""

    def __init__(self, what: str, unit: str = "") -> None:
        self.what = what
        self.unit = unit
        self.tty = sys.stderr.isatty()
        self.last = -1.0
        self._bar: Any = None
        self._task: Any = None

    def _start(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.progress import Progress as Bar

        counts = (MofNCompleteColumn(), TextColumn("{task.fields[rate]}"))
        sizes = (DownloadColumn(binary_units=True), TransferSpeedColumn())
        self._bar = Bar(
            TextColumn(self.what),
            BarColumn(),
            *(sizes if self.unit == "bytes" else counts),
            TimeRemainingColumn(),
            console=Console(file=sys.stderr),
            auto_refresh=False,  # (no thread of its own: redrawn on update, 10 times a second)
        )
        self._bar.start()
        self._task = self._bar.add_task(self.what, total=None, rate="")

    def update(self, done: int, total: int) -> None:
        frac = done / total if total else 1.0
        now = time.monotonic()
        if self.tty:
            if now - self.last < 0.1 and done != total:
                return
            self.last = now
            if self._bar is None:
                self._start()
            unknown = self.unit == "bytes" and total == done  # (a tree: size not known)
            self._bar.update(self._task, completed=done, total=None if unknown else total)
            speed = self._bar.tasks[0].speed
            self._bar.update(self._task, rate=f"{speed:,.0f}/s" if speed else "")
            self._bar.refresh()
        elif int(frac * 10) > self.last:
            self.last = int(frac * 10)
            log.info("%s: %d/%d", self.what, done, total)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3}


class JournalFormatter(logging.Formatter):
    """``<priority>`` prefixes (sd-daemon(3)), which journald turns into log priorities."""

    def format(self, record: logging.LogRecord) -> str:
        prio = _PRIORITY.get(record.levelno, 2 if record.levelno > logging.ERROR else 6)
        return f"<{prio}>" + super().format(record)


def setup_logging(verbose: int, log_file: Path | None, log_names: bool = False) -> None:
    from cryptfs import lognames

    lognames.show_names(log_names)  # (docs/SECURITY.md: the log names no file by default)
    journal = bool(os.environ.get("JOURNAL_STREAM")) and log_file is None
    level = (
        logging.DEBUG
        if verbose > 1
        else logging.INFO
        if verbose or log_file or journal
        else logging.WARNING
    )
    handler: logging.Handler
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        handler = logging.FileHandler(log_file)
        os.chmod(log_file, 0o600)
    else:
        handler = logging.StreamHandler()
    if journal:  # journald adds the time; one line per event
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("botocore", "aiobotocore", "urllib3", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    pyfuse3_log = logging.getLogger("pyfuse3")
    if not any(isinstance(f, lognames.BytesArgs) for f in pyfuse3_log.filters):
        pyfuse3_log.addFilter(lognames.BytesArgs())


def apply_config(args: Any) -> None:
    """Fill every option the command line left out from CRYPTFS_* / the config file /
    defaults (cryptfs.config), then check the positional ones are there."""
    from cryptfs.config import OPTIONS, resolve

    given = {o.name: getattr(args, o.name, None) for o in OPTIONS}
    for name, value in resolve(given, args.config).items():
        setattr(args, name, value)
    if args.location is None:
        raise UsageError("give the volume, s3://BUCKET[/PREFIX] (argument or config 'location')")
    if args.cmd == "mount" and args.mountpoint is None:
        raise UsageError("give a mount point (argument or config 'mountpoint')")
