"""The command line's grammar: one subcommand per command, each mount setting's flag from the
option table (``cryptfs.config.OPTIONS``); the options of one command only are declared here.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cryptfs import __version__
from cryptfs.cli.common import SETTLE_HELP, add_options, add_positional, size_arg


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cryptfs", description="Client-side encrypted S3 mount")
    ap.add_argument("--version", action="version", version=f"cryptfs {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True)
    _init(sub.add_parser("init", help="create an encrypted volume in a bucket"))
    _mount(sub.add_parser("mount", help="mount a volume"))
    for name, helptext in (
        ("ls", "list decrypted names of a volume path (no mount needed)"),
        ("decrypt", "decrypt a file or a whole tree to a local directory (no mount needed)"),
    ):
        p = sub.add_parser(name, help=helptext)
        add_positional(p, "s3://BUCKET/PREFIX[/PATH/IN/VOLUME]")
        if name == "decrypt":
            p.add_argument("dest", type=Path)
        else:
            p.add_argument("-l", dest="long", action="store_true", help="long listing")
        add_options(p, name)
    _key(sub.add_parser("key", help="list, add or remove the keyslots of a volume"))
    _rotate(sub.add_parser("rotate", help="new master key: rewrap every data key, server-side"))
    p = sub.add_parser(
        "upgrade", help="move a volume to the current format revision, in place, server-side"
    )
    add_positional(p)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--settle", type=float, default=35.0, help=SETTLE_HELP)
    add_options(p, "upgrade")
    _fsck(sub.add_parser("fsck", help="check (and with --repair fix what is safe) a volume"))
    _import(
        sub.add_parser(
            "import", help="convert AWS S3 Encryption Client objects in the volume to cryptfs files"
        )
    )
    p = sub.add_parser("umount", help="upload pending data, then unmount")
    p.add_argument("mountpoint", type=Path)
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument("-v", "--verbose", action="count", default=0)
    p = sub.add_parser("stats", help="what a running mount is doing (uploads, cache, S3)")
    p.add_argument("mountpoint", type=Path)
    p.add_argument("--json", action="store_true", help="machine-readable")
    p.add_argument("-v", "--verbose", action="count", default=0)
    return ap


def _init(p: argparse.ArgumentParser) -> None:
    add_positional(p)
    # (its own key flags: they make the keys, where the other commands' open the volume)
    p.add_argument("--key-file", type=Path, help="key file (created with a new key if missing)")
    p.add_argument("--passphrase-file", type=Path, help="file holding a passphrase")
    p.add_argument("--kms-key-id", help="AWS KMS key (id, ARN or alias) for per-file data keys")
    p.add_argument("--chunk-size", type=size_arg, default=64 << 10, help="default 64K")
    p.add_argument(
        "--segment-size",
        type=size_arg,
        help="a file body's unit of rewriting (FORMAT.md §8.5): default 8M (or the chunk size)",
    )
    p.add_argument("--plaintext-names", action="store_true", help="do not encrypt names")
    p.add_argument("--sse", choices=("s3", "kms", "c"), help="also use S3 server-side encryption")
    p.add_argument("--sse-kms-key-id", help="KMS key for --sse kms (default: the AWS one)")
    add_options(p, "init")


def _mount(p: argparse.ArgumentParser) -> None:
    add_positional(p)
    p.add_argument("mountpoint", nargs="?", type=Path)
    p.add_argument("--foreground", "-f", action="store_true")
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    add_options(p, "mount")


def _key(p: argparse.ArgumentParser) -> None:
    ksub = p.add_subparsers(dest="key_cmd", required=True)
    for name, helptext in (
        ("list", "show the keyslots"),
        ("add", "add a key file, passphrase or KMS key that opens the volume"),
        ("remove", "remove a keyslot (never the last)"),
    ):
        kp = ksub.add_parser(name, help=helptext)
        add_positional(kp)
        if name == "add":
            g = kp.add_mutually_exclusive_group(required=True)
            g.add_argument("--new-key-file", type=Path, help="created if missing")
            g.add_argument("--new-passphrase-file", type=Path)
            g.add_argument("--new-kms-key-id")
        elif name == "remove":
            kp.add_argument("slot", help="keyslot id (see 'cryptfs key list')")
        add_options(kp, "key")


def _rotate(p: argparse.ArgumentParser) -> None:
    add_positional(p)
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
    add_options(p, "rotate")


def _fsck(p: argparse.ArgumentParser) -> None:
    add_positional(p)
    p.add_argument("--full", action="store_true", help="also read and authenticate all content")
    p.add_argument("--repair", action="store_true", help="abort stale uploads, write markers")
    p.add_argument(
        "--upload-age", type=float, default=3600.0, help="multipart uploads older are stale (s)"
    )
    p.add_argument("--cache-dir", type=Path, help="also report what is staged here")
    add_options(p, "fsck")


def _import(p: argparse.ArgumentParser) -> None:
    add_positional(p)
    p.add_argument("--max-size", type=size_arg, default=1 << 30, help="largest object (default 1G)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument(
        "--path", action="append", help="import the objects whose keys start with this "
        "path inside the volume (repeatable)",
    )  # fmt: skip
    g.add_argument("--all", action="store_true", help="import every S3EC object of the volume")
    add_options(p, "import")
