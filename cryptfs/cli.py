"""Command line: ``cryptfs init | mount | umount | ls | decrypt | key | rotate | upgrade``.

Secrets are never taken from the command line: keys and passphrases come from files (mode
0600).  Errors print one line (no traceback) and exit non-zero.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio

from cryptfs import __version__
from cryptfs.crypto import Secret
from cryptfs.errors import CryptfsError, UsageError, WrongKey
from cryptfs.format.volume import (
    KeySource,
    create_key_file,
    read_key_file,
    read_passphrase_file,
)

log = logging.getLogger("cryptfs")


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().rstrip("ib").rstrip("b")
    mult = units.get(t[-1:], 1)
    if t[-1:] in units:
        t = t[:-1]
    try:
        return int(t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint-url", help="S3 endpoint (default: AWS_ENDPOINT_URL or AWS)")
    p.add_argument("--region", help="S3 region (default: from the AWS config, else us-east-1)")
    p.add_argument("--ca-bundle", type=Path, help="CA bundle for private TLS endpoints")
    p.add_argument("--kms-endpoint-url", help="AWS KMS endpoint (default: AWS)")
    p.add_argument(
        "--sse-c-key-file", type=Path, help="SSE-C customer key file (volumes with --sse c)"
    )
    p.add_argument(
        "--s3ec-key-file", type=Path, help="raw AES key of AWS S3 Encryption Client objects"
    )
    p.add_argument(
        "--s3ec-kms-key-id", action="append", default=None,
        help="AWS KMS key that S3 Encryption Client objects' data keys may be under "
        "(repeatable; their KMS objects are read only under a key named here)",
    )  # fmt: skip
    p.add_argument("--s3-attempts", type=int, help="attempts per S3 request (default 5)")
    p.add_argument("--s3-timeout", type=float, help="seconds per S3 answer (default 60)")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument(
        "--log-names", action="store_true", default=None,
        help="let log lines name files by their paths (default: object keys and inodes only)",
    )  # fmt: skip
    p.add_argument("--config", help="TOML settings: NAME (/etc/cryptfs/NAME.toml) or a path")


def _keys(p: argparse.ArgumentParser) -> None:
    """How to open a volume: a key file, a passphrase file, or (neither) its KMS keyslot."""
    p.add_argument("--key-file", type=Path)
    p.add_argument("--passphrase-file", type=Path)
    p.add_argument(
        "--kms-key-id",
        help="the AWS KMS key whose keyslot opens the volume (needed once after a rotation "
        "to a KMS key this machine has not seen open it)",
    )


SETTLE_HELP = (
    "seconds after the start before the last pass over the bucket (running mounts re-read "
    "the config every 30 s; default 35, 0 if no host has the volume mounted)"
)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cryptfs", description="Client-side encrypted S3 mount")
    ap.add_argument("--version", action="version", version=f"cryptfs {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("init", help="create an encrypted volume in a bucket")
    p.add_argument("location", nargs="?", help="s3://BUCKET[/PREFIX]")
    p.add_argument("--key-file", type=Path, help="key file (created with a new key if missing)")
    p.add_argument("--passphrase-file", type=Path, help="file holding a passphrase")
    p.add_argument("--kms-key-id", help="AWS KMS key (id, ARN or alias) for per-file data keys")
    p.add_argument("--chunk-size", type=_size, default=64 << 10, help="default 64K")
    p.add_argument("--plaintext-names", action="store_true", help="do not encrypt names")
    p.add_argument("--sse", choices=("s3", "kms", "c"), help="also use S3 server-side encryption")
    p.add_argument("--sse-kms-key-id", help="KMS key for --sse kms (default: the AWS one)")
    _common(p)

    p = sub.add_parser("mount", help="mount a volume")
    p.add_argument("location", nargs="?")
    p.add_argument("mountpoint", nargs="?", type=Path)
    _keys(p)
    p.add_argument("--cache-dir", type=Path)
    p.add_argument("--foreground", "-f", action="store_true")
    p.add_argument("-o", dest="options", action="append", help="FUSE/mount options")
    p.add_argument("--writeback-delay", type=float, help="seconds (default 2)")
    p.add_argument("--metadata-ttl", type=float, help="seconds (default 10)")
    p.add_argument("--log-file", type=Path, help="daemon log (default: in the cache dir)")
    p.add_argument("--metrics-address", help="serve Prometheus metrics on HOST:PORT")
    p.add_argument("--read-ahead-kb", type=int, help="kernel read-ahead in KiB (default 4096)")
    p.add_argument(
        "--read-ahead-files", type=int, help="small files fetched ahead, in name order (default 8)"
    )
    p.add_argument(
        "--cache-size", type=_size, help="encrypted chunks kept on the cache disk (default 2G)"
    )
    p.add_argument(
        "--writeback-cache", action="store_true", default=None,
        help="kernel batches small writes; then other hosts' changes of a file's size or "
        "mtime are not seen by this mount: single-host volumes only",
    )  # fmt: skip
    p.add_argument(
        "--s3ec-max-size", type=_size, help="largest S3 Encryption Client object read (256M)"
    )
    p.add_argument(
        "--show-s3ec", action="store_true", default=None,
        help="show AWS S3 Encryption Client objects (read-only, under their own key names)",
    )  # fmt: skip
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    _common(p)

    for name, helptext in (
        ("ls", "list decrypted names of a volume path (no mount needed)"),
        ("decrypt", "decrypt a file or a whole tree to a local directory (no mount needed)"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("location", nargs="?", help="s3://BUCKET/PREFIX[/PATH/IN/VOLUME]")
        if name == "decrypt":
            p.add_argument("dest", type=Path)
        else:
            p.add_argument("-l", dest="long", action="store_true", help="long listing")
        _keys(p)
        _common(p)

    p = sub.add_parser("key", help="list, add or remove the keyslots of a volume")
    ksub = p.add_subparsers(dest="key_cmd", required=True)
    for name, helptext in (
        ("list", "show the keyslots"),
        ("add", "add a key file, passphrase or KMS key that opens the volume"),
        ("remove", "remove a keyslot (never the last)"),
    ):
        kp = ksub.add_parser(name, help=helptext)
        kp.add_argument("location", nargs="?", help="s3://BUCKET[/PREFIX]")
        if name == "add":
            g = kp.add_mutually_exclusive_group(required=True)
            g.add_argument("--new-key-file", type=Path, help="created if missing")
            g.add_argument("--new-passphrase-file", type=Path)
            g.add_argument("--new-kms-key-id")
        elif name == "remove":
            kp.add_argument("slot", help="keyslot id (see 'cryptfs key list')")
        _keys(kp)
        _common(kp)

    p = sub.add_parser("rotate", help="new master key: rewrap every data key, server-side")
    p.add_argument("location", nargs="?", help="s3://BUCKET[/PREFIX]")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--to-key-file", type=Path, help="the new key file (created if missing)")
    g.add_argument("--to-kms-key-id", help="the new AWS KMS key")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--settle", type=float, default=35.0, help=SETTLE_HELP)
    p.add_argument(
        "--discard-late", action="store_true",
        help="finish although objects were written under a retiring key after the rotation "
        "began (they stay unreadable)",
    )  # fmt: skip
    _keys(p)
    _common(p)

    p = sub.add_parser(
        "upgrade", help="move a volume to the current format revision, in place, server-side"
    )
    p.add_argument("location", nargs="?", help="s3://BUCKET[/PREFIX]")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--settle", type=float, default=35.0, help=SETTLE_HELP)
    _keys(p)
    _common(p)

    p = sub.add_parser("fsck", help="check (and with --repair fix what is safe) a volume")
    p.add_argument("location", nargs="?", help="s3://BUCKET[/PREFIX]")
    p.add_argument("--full", action="store_true", help="also read and authenticate all content")
    p.add_argument("--repair", action="store_true", help="abort stale uploads, write markers")
    p.add_argument(
        "--upload-age", type=float, default=3600.0, help="multipart uploads older are stale (s)"
    )
    p.add_argument("--cache-dir", type=Path, help="also report what is staged here")
    _keys(p)
    _common(p)

    p = sub.add_parser(
        "import", help="convert AWS S3 Encryption Client objects in the volume to cryptfs files"
    )
    p.add_argument("location", nargs="?", help="s3://BUCKET[/PREFIX]")
    p.add_argument("--max-size", type=_size, default=1 << 30, help="largest object (default 1G)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument(
        "--path", action="append", help="import the objects whose keys start with this "
        "path inside the volume (repeatable)",
    )  # fmt: skip
    g.add_argument("--all", action="store_true", help="import every S3EC object of the volume")
    _keys(p)
    _common(p)

    p = sub.add_parser("umount", help="upload pending data, then unmount")
    p.add_argument("mountpoint", type=Path)
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument("-v", "--verbose", action="count", default=0)

    p = sub.add_parser("stats", help="what a running mount is doing (uploads, cache, S3)")
    p.add_argument("mountpoint", type=Path)
    p.add_argument("--json", action="store_true", help="machine-readable")
    p.add_argument("-v", "--verbose", action="count", default=0)
    return ap


def _remote(args: Any) -> Any:
    from cryptfs.session import Remote
    from cryptfs.store.kms import KmsOptions
    from cryptfs.store.s3 import S3Options

    endpoint = args.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
    verify: bool | str = str(args.ca_bundle) if args.ca_bundle else True
    kms_endpoint = args.kms_endpoint_url or os.environ.get("AWS_ENDPOINT_URL_KMS") or None
    sse_c = None
    if args.sse_c_key_file is not None:
        sse_c = _read_or_create_key(args.sse_c_key_file, getattr(args, "cmd", "") == "init")
    s3ec_keys = (read_key_file(args.s3ec_key_file),) if args.s3ec_key_file else ()
    s3ec_kms = tuple(getattr(args, "s3ec_kms_key_id", None) or ())
    return Remote(
        S3Options(
            endpoint_url=endpoint,
            region=args.region,
            verify=verify,
            max_attempts=max(1, args.s3_attempts),
            read_timeout=args.s3_timeout,
            connect_timeout=min(10.0, args.s3_timeout),
        ),
        KmsOptions(endpoint_url=kms_endpoint, region=args.region, verify=verify),
        sse_c,
        s3ec_keys,
        s3ec_kms,
    )


def _read_or_create_key(path: Path, create: bool) -> Secret:
    if create and not path.exists():
        key = create_key_file(path)
        print(f"created new key file {path} (mode 0600) — back it up", file=sys.stderr)
        return key
    return read_key_file(path)


def _key_source(args: Any, *, create: bool = False) -> KeySource:
    """The keys offered to open (or, with ``create``, to protect) a volume.  With neither a
    key file nor a passphrase, the volume's KMS keyslot is tried."""
    src = KeySource()
    if args.key_file is not None:
        src.keyfile = _read_or_create_key(args.key_file, create)
    if args.passphrase_file is not None:
        src.passphrase = read_passphrase_file(args.passphrase_file)
    src.kms = not src.local
    if getattr(args, "kms_key_id", None) and getattr(args, "cmd", "") != "init":
        src.kms_keys = (args.kms_key_id,)
    return src


def cmd_init(args: Any) -> int:
    from cryptfs.session import open_remote, sse_from_config
    from cryptfs.store.s3 import S3Location
    from cryptfs.volume import Volume

    loc = S3Location.parse(args.location)
    c = args.chunk_size
    if c & (c - 1) or not 1 << 12 <= c <= 1 << 24:
        raise UsageError("--chunk-size must be a power of two between 4K and 16M")
    if args.key_file is None and args.passphrase_file is None and args.kms_key_id is None:
        raise UsageError(
            "give --key-file, --passphrase-file or --kms-key-id (keys never come from argv)"
        )
    sse: dict[str, str] | None = None
    if args.sse is not None:
        sse = {"mode": args.sse}
        if args.sse == "kms" and args.sse_kms_key_id:
            sse["key_id"] = args.sse_kms_key_id
        if args.sse == "c" and args.sse_c_key_file is None:
            raise UsageError("--sse c needs --sse-c-key-file (created if missing)")
    if args.sse != "c" and args.sse_c_key_file is not None:
        raise UsageError("--sse-c-key-file goes with --sse c")
    if args.sse_kms_key_id and args.sse != "kms":
        raise UsageError("--sse-kms-key-id goes with --sse kms")
    remote = _remote(args)

    async def main() -> None:
        async with open_remote(loc, remote) as (store, kms):
            store.set_sse(sse_from_config(sse, remote.sse_c_key))
            source = _key_source(args, create=True)
            vol = await Volume.create(
                store,
                source,
                chunk_log2=c.bit_length() - 1,
                encrypt_names=not args.plaintext_names,
                kms=kms,
                kms_key_id=args.kms_key_id,
                sse=sse,
            )
            vol.keyring.close()
        extra = f", server-side encryption SSE-{args.sse.upper()}" if args.sse else ""
        print(f"created cryptfs volume at {loc}{extra}")

    trio.run(main)
    return 0


def cmd_key(args: Any) -> int:
    from cryptfs.keyadmin import add_slot, describe_slots, remove_slot
    from cryptfs.session import open_remote, volume_session
    from cryptfs.store.s3 import S3Location

    loc = S3Location.parse(args.location)
    source = _key_source(args)
    remote = _remote(args)

    async def main() -> None:
        async with (
            open_remote(loc, remote) as (store, kms),
            volume_session(store, kms, source) as vol,
        ):
            if args.key_cmd == "list":
                for line in describe_slots(vol):
                    print(line)
            elif args.key_cmd == "add":
                new = KeySource()
                if args.new_key_file is not None:
                    new.keyfile = _read_or_create_key(args.new_key_file, True)
                if args.new_passphrase_file is not None:
                    new.passphrase = read_passphrase_file(args.new_passphrase_file)
                slot = await add_slot(vol, new, args.new_kms_key_id)
                print(f"added keyslot {slot}")
            else:
                if args.slot == vol.slot_id:
                    print(f"note: removing {args.slot}, the slot you opened with", file=sys.stderr)
                await remove_slot(vol, args.slot)
                print(f"removed keyslot {args.slot}")

    trio.run(main)
    return 0


def cmd_rotate(args: Any) -> int:
    from cryptfs.keyadmin import rotate
    from cryptfs.session import open_remote, open_volume
    from cryptfs.store.s3 import S3Location

    loc = S3Location.parse(args.location)
    source = _key_source(args)
    to_source: KeySource | None = None
    if args.to_key_file is not None:
        to_source = KeySource(keyfile=_read_or_create_key(args.to_key_file, True))
    remote = _remote(args)
    bar = _Progress("rewrapping")

    async def main() -> None:
        async with open_remote(loc, remote) as (store, kms):
            resume = False
            try:
                vol = await open_volume(store, kms, source)
            except WrongKey:
                # an interrupted rotation already replaced the old slot: go on with the new key
                vol = await open_volume(store, kms, to_source or KeySource(kms=True))
                resume = True
                print("resuming an interrupted rotation", file=sys.stderr)
            try:
                report = await rotate(
                    vol,
                    to_source=to_source,
                    to_kms_key_id=args.to_kms_key_id,
                    resume=resume,
                    concurrency=args.concurrency,
                    progress=bar.update,
                    settle=args.settle,
                    discard_late=args.discard_late,
                )
            finally:
                vol.keyring.close()
                bar.close()
        print(report.summary())
        if not report.finished:
            raise SystemExit(3)

    trio.run(main)
    return 0


class _Progress:
    """A one-line progress bar on a terminal; a log line every 10 % otherwise."""

    def __init__(self, what: str, unit: str = "") -> None:
        self.what = what
        self.unit = unit
        self.tty = sys.stderr.isatty()
        self.last = -1.0
        self.shown = False

    def update(self, done: int, total: int) -> None:
        frac = done / total if total else 1.0
        now = time.monotonic()
        if self.tty:
            if now - self.last < 0.1 and done != total:
                return
            self.last = now
            width = 30
            fill = int(frac * width)
            if self.unit == "bytes" and total == done:  # size unknown (a tree): a counter
                text = f"\r{self.what}: {done / 2**20:.1f} MiB"
            else:
                text = f"\r{self.what} [{'#' * fill}{'.' * (width - fill)}] {done}/{total}"
            sys.stderr.write(text)
            sys.stderr.flush()
            self.shown = True
        elif int(frac * 10) > self.last:
            self.last = int(frac * 10)
            log.info("%s: %d/%d", self.what, done, total)

    def close(self) -> None:
        if self.shown:
            sys.stderr.write("\n")


def cmd_offline(args: Any) -> int:
    from cryptfs.offline import decrypt_tree, list_entries, open_offline

    source = _key_source(args)
    remote = _remote(args)

    async def main() -> None:
        async with open_offline(args.location, source, remote) as (fs, node):
            if args.cmd == "ls":
                for line in await list_entries(fs, node, args.long):
                    print(line)
                return
            dest = args.dest
            if node.is_dir or not dest.is_dir():
                target = dest
            else:
                target = dest / node.name.decode(errors="surrogateescape")
            size = fs.stat(node).size if not node.is_dir else 0
            bar = _Progress("decrypting", unit="bytes")
            done = 0

            def tick(n: int) -> None:
                nonlocal done
                done += n
                bar.update(done, max(size, done))

            try:
                files, total = await decrypt_tree(fs, node, target, tick)
            finally:
                bar.close()
            print(f"decrypted {files} file(s), {total} bytes, to {target}", file=sys.stderr)

    trio.run(main)
    return 0


_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3}


class _JournalFormatter(logging.Formatter):
    """``<priority>`` prefixes (sd-daemon(3)), which journald turns into log priorities."""

    def format(self, record: logging.LogRecord) -> str:
        prio = _PRIORITY.get(record.levelno, 2 if record.levelno > logging.ERROR else 6)
        return f"<{prio}>" + super().format(record)


def _setup_logging(verbose: int, log_file: Path | None, log_names: bool = False) -> None:
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
        handler.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
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


def cmd_mount(args: Any) -> int:
    from cryptfs.daemon import MountConfig, check_mountpoint, run_mount
    from cryptfs.fs.model import Options
    from cryptfs.runstate import default_cache_dir
    from cryptfs.store.s3 import S3Location

    loc = S3Location.parse(args.location)
    mp = args.mountpoint.absolute()
    cache_dir = (args.cache_dir or default_cache_dir()).absolute()
    source = _key_source(args)  # validates key files before daemonising
    check_mountpoint(mp)
    opts = [o for group in args.options for o in group.split(",")]
    if not args.foreground:
        return _spawn_daemon(args, cache_dir)

    ready_fd = args.ready_fd
    cfg = MountConfig(
        location=loc,
        mountpoint=mp,
        source=source,
        remote=_remote(args),
        cache_dir=cache_dir,
        fuse_options=opts,
        fs=Options(
            writeback_delay=args.writeback_delay,
            metadata_ttl=args.metadata_ttl,
            foreign_max_bytes=args.s3ec_max_size,
            show_foreign=bool(args.show_s3ec),
            sibling_readahead=args.read_ahead_files,
        ),
        metrics_address=args.metrics_address,
        read_ahead_kb=args.read_ahead_kb,
        writeback_cache=bool(args.writeback_cache),
        cache_size=args.cache_size,
    )

    def ready() -> None:
        if ready_fd is not None:
            os.write(ready_fd, b"OK\n")
            os.close(ready_fd)

    try:
        left = trio.run(run_mount, cfg, ready)
    except CryptfsError as e:
        if ready_fd is not None:
            os.write(ready_fd, f"ERR {e}\n".encode())
        raise
    return 0 if left == 0 else 3


def _spawn_daemon(args: Any, cache_dir: Path) -> int:
    log_file = (args.log_file or cache_dir / "cryptfs.log").absolute()
    # the daemon runs in "/" so it keeps no directory busy: hand it absolute paths only
    argv = [
        sys.executable, "-m", "cryptfs", "mount", args.location,
        str(args.mountpoint.absolute()), "--foreground", "--cache-dir", str(cache_dir),
        "--log-file", str(log_file), "--writeback-delay", str(args.writeback_delay),
        "--metadata-ttl", str(args.metadata_ttl),
    ]  # fmt: skip
    for flag, value in (
        ("--key-file", args.key_file),
        ("--passphrase-file", args.passphrase_file),
        ("--ca-bundle", args.ca_bundle),
        ("--sse-c-key-file", args.sse_c_key_file),
        ("--s3ec-key-file", args.s3ec_key_file),
    ):
        if value is not None:
            argv += [flag, str(value.absolute())]
    for flag, text in (
        ("--endpoint-url", args.endpoint_url),
        ("--region", args.region),
        ("--kms-endpoint-url", args.kms_endpoint_url),
        ("--metrics-address", args.metrics_address),
        ("--s3-attempts", str(args.s3_attempts)),
        ("--s3ec-max-size", str(args.s3ec_max_size)),
        ("--kms-key-id", args.kms_key_id),
        ("--read-ahead-kb", str(args.read_ahead_kb)),
        ("--read-ahead-files", str(args.read_ahead_files)),
        ("--cache-size", str(args.cache_size)),
        ("--s3-timeout", str(args.s3_timeout)),
    ):
        if text:
            argv += [flag, text]
    if args.writeback_cache:
        argv.append("--writeback-cache")
    if args.log_names:
        argv.append("--log-names")
    if args.show_s3ec:
        argv.append("--show-s3ec")
    for key_id in args.s3ec_kms_key_id or ():
        argv += ["--s3ec-kms-key-id", key_id]
    for o in args.options:
        argv += ["-o", o]
    argv += ["-v"] * args.verbose
    r, w = os.pipe()
    argv += ["--ready-fd", str(w)]
    cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    proc = subprocess.Popen(
        argv,
        pass_fds=(w,),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        cwd="/",
    )
    os.close(w)
    with os.fdopen(r, "rb") as f:
        msg = f.readline().decode(errors="replace").strip()
    if msg == "OK":
        print(f"mounted {args.location} at {args.mountpoint.absolute()} (pid {proc.pid})")
        return 0
    rc = proc.wait()
    if msg.startswith("ERR "):
        print(f"cryptfs: {msg[4:]}", file=sys.stderr)
    else:
        print(f"cryptfs: mount failed (daemon exit {rc}); see {log_file}", file=sys.stderr)
    return 1


def cmd_umount(args: Any) -> int:
    import json

    from cryptfs.runstate import state_file

    mp = args.mountpoint.absolute()
    pidfile = state_file(mp, "pid")
    statusfile = state_file(mp, "status")
    pid = None
    if pidfile.exists():
        try:
            pid = int(pidfile.read_text().strip())
        except ValueError:
            pid = None
    r = subprocess.run(["fusermount3", "-u", str(mp)], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise UsageError(f"cannot unmount {mp}: {r.stderr.strip() or 'fusermount3 failed'}")
    if pid is None:
        return 0
    deadline = time.monotonic() + args.timeout
    bar = _Progress("uploading")
    first: int | None = None
    try:
        while _alive(pid):
            if time.monotonic() > deadline:
                raise UsageError(f"daemon {pid} still uploading after {args.timeout:.0f} s")
            left = _pending(mp)
            if left is not None and left > 0:
                first = max(first or 0, left)
                bar.update(first - left, first)
            _pause(0.1)
    finally:
        bar.close()
    try:
        status = json.loads(statusfile.read_text())
    except (OSError, ValueError):
        print(
            f"cryptfs: the daemon (pid {pid}) ended without reporting what it uploaded (see"
            " its log); whatever it had staged is uploaded at the next mount",
            file=sys.stderr,
        )
        return 3
    return _report_left(mp, status)


def _report_left(mp: Path, status: dict[str, Any]) -> int:
    """Exit code 3 and the names of what an unmount left behind (its daemon's status: paths
    in the volume, shown under the mount point)."""
    staged, lost = list(status.get("staged", [])), list(status.get("lost", []))
    left = int(status.get("pending", 0))
    if not left:
        return 0

    def names(paths: list[str]) -> str:
        shown = [f"  {mp}{p.encode(errors='surrogateescape').decode(errors='replace')}"
                 for p in paths[:20]]  # fmt: skip
        more = [f"  … and {len(paths) - 20} more"] if len(paths) > 20 else []
        return "\n".join(shown + more)

    if staged or not lost:
        print(
            f"cryptfs: {len(staged) or left} file(s) could not be uploaded; they stay staged"
            " and are uploaded at the next mount" + (":\n" + names(staged) if staged else ""),
            file=sys.stderr,
        )
    if lost:
        print(
            f"cryptfs: {len(lost)} change(s) of attributes only (mode, owner, times, a new"
            " directory) could not be uploaded and are lost:\n" + names(lost),
            file=sys.stderr,
        )
    return 3


def _pending(mp: Path) -> int | None:
    """Files the daemon of ``mp`` still has to upload (None if it does not answer)."""
    from cryptfs.runstate import state_file
    from cryptfs.stats import read_socket

    try:
        return int(read_socket(state_file(mp, "sock"), timeout=1.0)["pending_files"])
    except (OSError, ValueError, KeyError):
        return None


def cmd_fsck(args: Any) -> int:
    from cryptfs.fsck import EXIT_ERROR, fsck
    from cryptfs.runstate import default_cache_dir
    from cryptfs.session import open_remote, volume_session
    from cryptfs.store.s3 import S3Location

    bar = _Progress("checking")

    async def main() -> int:
        loc = S3Location.parse(args.location)
        source = _key_source(args)
        remote = _remote(args)
        async with (
            open_remote(loc, remote) as (store, kms),
            volume_session(store, kms, source, remote) as vol,
        ):
            try:
                report = await fsck(
                    vol,
                    key_prefix=loc.prefix,
                    full=args.full,
                    repair=args.repair,
                    upload_age=args.upload_age,
                    cache_dir=args.cache_dir or default_cache_dir(),
                    progress=bar.update,
                )
            finally:
                bar.close()
        print(report.summary())
        return report.exit_code()

    try:
        return trio.run(main)
    except CryptfsError as e:
        print(f"cryptfs: {e}", file=sys.stderr)
        return EXIT_ERROR


def _volume_job(args: Any, label: str, job: Any, failed: Any) -> int:
    """Open the volume ``args`` names, ``await job(vol, loc, progress)`` with a progress
    bar, print the report's summary; exit code 3 if ``failed(report)``."""
    from cryptfs.session import open_remote, volume_session
    from cryptfs.store.s3 import S3Location

    loc = S3Location.parse(args.location)
    source = _key_source(args)
    remote = _remote(args)
    bar = _Progress(label)

    async def main() -> int:
        async with (
            open_remote(loc, remote) as (store, kms),
            volume_session(store, kms, source, remote) as vol,
        ):
            try:
                report = await job(vol, loc, bar.update)
            finally:
                bar.close()
        print(report.summary())
        return 3 if failed(report) else 0

    return trio.run(main)


def cmd_upgrade(args: Any) -> int:
    from cryptfs.upgrade import upgrade

    return _volume_job(
        args,
        "upgrading",
        lambda vol, _loc, progress: upgrade(
            vol, concurrency=args.concurrency, progress=progress, settle=args.settle
        ),
        lambda report: not report.finished,
    )


def cmd_import(args: Any) -> int:
    from cryptfs.importer import import_s3ec

    return _volume_job(
        args,
        "importing",
        lambda vol, loc, progress: import_s3ec(
            vol,
            key_prefix=loc.prefix,
            paths=None if args.all else tuple(args.path),
            max_size=args.max_size,
            progress=progress,
        ),
        lambda report: bool(report.failed),
    )


def cmd_stats(args: Any) -> int:
    import json

    from cryptfs.runstate import state_file
    from cryptfs.stats import human_text, read_socket

    mp = args.mountpoint.absolute()
    try:
        snap = read_socket(state_file(mp, "sock"))
    except OSError:
        raise UsageError(f"no cryptfs mount answers at {mp}") from None
    print(json.dumps(snap, indent=1, sort_keys=True) if args.json else human_text(snap), end="")
    if args.json:
        print()
    return 0


def _pause(seconds: float) -> None:
    trio.run(trio.sleep, seconds)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie of ours is not alive
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except OSError:
        return False


def _apply_config(args: Any) -> None:
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


def main(argv: list[str] | None = None) -> int:
    from cryptfs.hardening import disable_core_dumps

    disable_core_dumps()  # before any key file is read: keys never reach a core dump
    args = build_parser().parse_args(argv)
    try:
        if hasattr(args, "config"):
            _apply_config(args)
    except CryptfsError as e:
        print(f"cryptfs: {e}", file=sys.stderr)
        return 1
    log_file = getattr(args, "log_file", None) if getattr(args, "foreground", False) else None
    _setup_logging(args.verbose, log_file, bool(getattr(args, "log_names", False)))
    try:
        if args.cmd == "init":
            return cmd_init(args)
        if args.cmd == "mount":
            return cmd_mount(args)
        if args.cmd in ("ls", "decrypt"):
            return cmd_offline(args)
        if args.cmd == "key":
            return cmd_key(args)
        if args.cmd == "rotate":
            return cmd_rotate(args)
        if args.cmd == "stats":
            return cmd_stats(args)
        if args.cmd == "fsck":
            return cmd_fsck(args)
        if args.cmd == "import":
            return cmd_import(args)
        if args.cmd == "upgrade":
            return cmd_upgrade(args)
        return cmd_umount(args)
    except CryptfsError as e:
        print(f"cryptfs: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
