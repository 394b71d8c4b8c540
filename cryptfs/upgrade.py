"""``cryptfs upgrade``: move a volume to the current format revision in place
(docs/FORMAT.md §7.6).

Procedure:
  1. the config becomes revision 2 (epoch 1, ``objects: [1, 2]``; the keyslots and their
     payload stay: resealing them would need every passphrase and key file);
  2. every revision-1 object is HEADed, authenticated as revision 1 says (its plaintext path
     rebuilt from its key), and rewritten in place as revision 2 by a server-side copy with
     new metadata (``CopySourceIfMatch``; nothing downloaded).  Concurrent; resumable (a
     rerun skips objects already at revision 2); an object changed meanwhile is read again;
  3. when none is left: ``objects: [2]``, and a revision-1 object is refused from then on.

Error handling:
    An object that does not authenticate is reported (by key) and left; step 3 then waits
    for a rerun, so nothing readable becomes unreadable.  Objects that are not cryptfs's
    (S3 Encryption Client objects, anything else) are left alone and counted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from cryptfs import lognames
from cryptfs.errors import CryptfsError, IntegrityError, NotFound, PreconditionFailed, UsageError
from cryptfs.format.keys import SCHEME_KMS
from cryptfs.format.meta import FORMAT, FORMAT2, decode_meta
from cryptfs.format.volume import CONFIG_NAME
from cryptfs.fs.volume import MARKER, Volume
from cryptfs.store.base import ObjectInfo
from cryptfs.tasks import open_tasks

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


@dataclass
class UpgradeReport:
    objects: int = 0
    upgraded: int = 0
    already: int = 0
    foreign: int = 0
    vanished: int = 0
    failed: list[str] = field(default_factory=list)
    config_upgraded: bool = False
    finished: bool = False
    seconds: float = 0.0
    bytes_downloaded: int = 0

    def summary(self) -> str:
        rate = self.upgraded / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"objects scanned:       {self.objects}",
            f"metadata upgraded:     {self.upgraded} ({rate:.0f}/s)",
            f"already at revision 2: {self.already}",
            f"bytes downloaded:      {self.bytes_downloaded}",
        ]
        if self.foreign:
            lines.append(f"not cryptfs objects:   {self.foreign} (left alone)")
        if self.vanished:
            lines.append(f"deleted meanwhile:     {self.vanished}")
        if self.failed:
            lines.append(f"FAILED:                {len(self.failed)} (see the log; rerun)")
        state = "complete" if self.finished else "NOT complete: rerun the same command"
        lines.append(f"upgrade to format revision 2: {state}")
        return "\n".join(lines)


async def upgrade(
    vol: Volume, *, concurrency: int = 32, progress: Progress | None = None
) -> UpgradeReport:
    report = UpgradeReport()
    store: Any = vol.store
    started = trio.current_time()
    bytes0 = getattr(store, "bytes_in", 0)
    cfg = vol.config
    if cfg.version >= 2 and 1 not in cfg.objects:
        report.finished = True
        return report
    if cfg.version < 2:
        if len(vol.payload.mks) > 1:
            raise UsageError(
                "a rotation of this volume is not finished: finish it (cryptfs rotate, with "
                "the cryptfs that started it) before upgrading"
            )
        cfg.version = 2
        cfg.epoch = 0  # save_config makes it 1
        cfg.objects = [1, 2]
        cfg.kms_keys = [cfg.dek["kid"]] if cfg.dek["scheme"] == SCHEME_KMS else []
        await vol.save_config()
        report.config_upgraded = True
        log.info("volume config now at revision 2; upgrading objects")

    listing = await vol.store.list("", delimiter=None)
    objs = [o for o in listing.objects if o.key != CONFIG_NAME]
    report.objects = len(objs)
    heads: dict[str, ObjectInfo] = {}
    await _each(objs, concurrency, lambda o: _head(vol, o, heads, report))
    paths = _Paths(vol, heads)
    todo = [heads[o.key] for o in objs if o.key in heads]
    done = 0

    async def one(info: ObjectInfo) -> None:
        nonlocal done
        try:
            await _upgrade_one(vol, info, paths, report)
        except CryptfsError as e:
            report.failed.append(info.key)
            log.error(
                "upgrade: %s: %s",
                lognames.ident(info.key, opaque=vol.names.opaque(info.key)),
                lognames.scrub(e, vol.names.opaque),
            )
        done += 1
        if progress is not None:
            progress(done, len(todo))

    await _each(todo, concurrency, one)
    if not report.failed:
        vol.config.objects = [2]
        await vol.save_config()
        report.finished = True
        log.info("upgrade finished: revision-1 objects are refused from now on")
    report.seconds = trio.current_time() - started
    report.bytes_downloaded = getattr(store, "bytes_in", 0) - bytes0
    return report


async def _each(items: list[ObjectInfo], concurrency: int, fn: Any) -> None:
    send, recv = trio.open_memory_channel[ObjectInfo](0)

    async def worker() -> None:
        async for item in recv:
            await fn(item)

    async with open_tasks() as nursery:
        for _ in range(max(1, concurrency)):
            nursery.start_soon(worker)
        async with send:
            for it in items:
                await send.send(it)


async def _head(vol: Volume, o: ObjectInfo, heads: dict[str, ObjectInfo], r: UpgradeReport) -> None:
    try:
        heads[o.key] = await vol.store.head(o.key)
    except NotFound:
        r.vanished += 1


class _Paths:
    """Plaintext paths from object keys: revision-1 metadata is bound to the path."""

    def __init__(self, vol: Volume, heads: dict[str, ObjectInfo]) -> None:
        self.vol = vol
        self.heads = heads
        self._dirs: dict[str, bytes] = {"": b"/"}

    def dir_path(self, prefix: str) -> bytes:
        """``prefix``: a directory's key without the trailing slash ("" for the root)."""
        hit = self._dirs.get(prefix)
        if hit is not None:
            return hit
        parent, _, comp = prefix.rpartition("/")
        long_name = None
        if self.vol.names.is_long(comp):
            marker = self.heads.get(prefix + "/" + MARKER)
            if marker is None:
                raise IntegrityError(f"long-named directory {prefix} has no marker")
            long_name = marker.metadata.get("cfs-n")
        path = _join(self.dir_path(parent), self.vol.names.decode(self.dir_path(parent), comp,
                                                                  long_name))  # fmt: skip
        self._dirs[prefix] = path
        return path

    def path_of(self, info: ObjectInfo) -> bytes:
        parent, _, comp = info.key.rpartition("/")
        if comp == MARKER:
            return self.dir_path(parent)
        ppath = self.dir_path(parent)
        return _join(ppath, self.vol.names.decode(ppath, comp, info.metadata.get("cfs-n")))


def _join(parent: bytes, name: bytes) -> bytes:
    return (parent if parent != b"/" else b"") + b"/" + name


async def _upgrade_one(vol: Volume, info: ObjectInfo, paths: _Paths, r: UpgradeReport) -> None:
    for _attempt in range(5):
        md = dict(info.metadata)
        rev = md.get("cfs")
        if rev == FORMAT2:
            r.already += 1
            return
        if rev != FORMAT:
            r.foreign += 1
            return
        path = paths.path_of(info)
        meta = decode_meta(vol.keys, path, md)  # revision 1: authenticated for its path
        vol.meta.check_wrapping(meta.dek)
        new = vol.meta.encode(path, info.key, meta)
        try:
            await vol.store.copy(info.key, info.key, new, if_match=info.etag, size=info.size)
        except PreconditionFailed:
            try:
                info = await vol.store.head(info.key)  # changed meanwhile: read it again
            except NotFound:
                r.vanished += 1
                return
            continue
        r.upgraded += 1
        return
    raise CryptfsError("object keeps changing; not upgraded")
