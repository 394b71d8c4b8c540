"""Command line: ``cryptfs init | mount | umount | stats | ls | decrypt | key | rotate |
upgrade | fsck | import``, one module per group of commands (``volume``, ``mount``,
``offline``), the grammar in ``parser`` and what they share in ``common``.

Secrets are never taken from the command line: keys and passphrases come from files (mode
0600).  Errors print one line (no traceback) and exit non-zero.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from cryptfs.cli.common import apply_config, setup_logging
from cryptfs.cli.parser import build_parser
from cryptfs.errors import CryptfsError

__all__ = ["build_parser", "main"]


def _commands() -> dict[str, Callable[[Any], int]]:
    from cryptfs.cli import mount, offline, volume

    return {
        "init": volume.cmd_init,
        "key": volume.cmd_key,
        "rotate": volume.cmd_rotate,
        "upgrade": volume.cmd_upgrade,
        "fsck": volume.cmd_fsck,
        "import": volume.cmd_import,
        "mount": mount.cmd_mount,
        "umount": mount.cmd_umount,
        "stats": mount.cmd_stats,
        "ls": offline.cmd_offline,
        "decrypt": offline.cmd_offline,
    }


def main(argv: list[str] | None = None) -> int:
    from cryptfs.hardening import disable_core_dumps

    disable_core_dumps()  # before any key file is read: keys never reach a core dump
    args = build_parser().parse_args(argv)
    try:
        if hasattr(args, "config"):
            apply_config(args)
    except CryptfsError as e:
        print(f"cryptfs: {e}", file=sys.stderr)
        return 1
    log_file = getattr(args, "log_file", None) if getattr(args, "foreground", False) else None
    setup_logging(args.verbose, log_file, bool(getattr(args, "log_names", False)))
    try:
        return _commands()[args.cmd](args)
    except CryptfsError as e:
        print(f"cryptfs: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
