"""The commands that work on a volume in the bucket: ``init``, ``key``, ``rotate``,
``upgrade``, ``fsck`` and ``import``.
"""

from __future__ import annotations

import sys
from typing import Any

import trio

from cryptfs.cli.common import Progress, key_source, read_or_create_key, remote_of
from cryptfs.errors import CryptfsError, UsageError, WrongKey
from cryptfs.format.volume import KeySource, read_passphrase_file


def cmd_init(args: Any) -> int:
    from cryptfs.session import open_remote, sse_from_config
    from cryptfs.store.s3 import S3Location
    from cryptfs.volume import Volume

    loc = S3Location.parse(args.location)
    c = args.chunk_size
    if c & (c - 1) or not 1 << 12 <= c <= 1 << 24:
        raise UsageError("--chunk-size must be a power of two between 4K and 16M")
    seg = args.segment_size or max(8 << 20, c)
    if seg & (seg - 1) or not c <= seg <= 1 << 26:
        raise UsageError("--segment-size must be a power of two between the chunk size and 64M")
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
    remote = remote_of(args)

    async def main() -> None:
        async with open_remote(loc, remote) as (store, kms):
            store.set_sse(sse_from_config(sse, remote.sse_c_key))
            source = key_source(args, create=True)
            vol = await Volume.create(
                store,
                source,
                chunk_log2=c.bit_length() - 1,
                segment_log2=seg.bit_length() - 1,
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
    source = key_source(args)
    remote = remote_of(args)

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
                    new.keyfile = read_or_create_key(args.new_key_file, True)
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
    source = key_source(args)
    to_source: KeySource | None = None
    if args.to_key_file is not None:
        to_source = KeySource(keyfile=read_or_create_key(args.to_key_file, True))
    remote = remote_of(args)
    bar = Progress("rewrapping")

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


def cmd_fsck(args: Any) -> int:
    from cryptfs.fsck import EXIT_ERROR, fsck
    from cryptfs.runstate import default_cache_dir
    from cryptfs.session import open_remote, volume_session
    from cryptfs.store.s3 import S3Location

    bar = Progress("checking")

    async def main() -> int:
        loc = S3Location.parse(args.location)
        source = key_source(args)
        remote = remote_of(args)
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


def volume_job(args: Any, label: str, job: Any, failed: Any) -> int:
    """Open the volume ``args`` names, ``await job(vol, loc, progress)`` with a progress
    bar, print the report's summary; exit code 3 if ``failed(report)``."""
    from cryptfs.session import open_remote, volume_session
    from cryptfs.store.s3 import S3Location

    loc = S3Location.parse(args.location)
    source = key_source(args)
    remote = remote_of(args)
    bar = Progress(label)

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

    return volume_job(
        args,
        "upgrading",
        lambda vol, _loc, progress: upgrade(
            vol, concurrency=args.concurrency, progress=progress, settle=args.settle
        ),
        lambda report: not report.finished,
    )


def cmd_import(args: Any) -> int:
    from cryptfs.importer import import_s3ec

    return volume_job(
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
