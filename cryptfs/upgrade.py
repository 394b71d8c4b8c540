"""``cryptfs upgrade``: move a volume to the current format revision in place
(docs/FORMAT.md §7.6).

Procedure:
  1. the config becomes revision 2 (epoch 1, ``objects: [1, 2]``; the keyslots and their
     payload stay: resealing them would need every passphrase and key file);
  2. every revision-1 object is HEADed, authenticated as revision 1 says (its plaintext path
     rebuilt from its key), and rewritten in place as revision 2 by a server-side copy with
     new metadata (``CopySourceIfMatch``; nothing downloaded).  Concurrent; resumable (a
     rerun skips objects already at revision 2); an object changed meanwhile is read again;
  3. when none is left: ``objects: [2]``, and a revision-1 object is refused from then on;
  4. the config names a segment size (``segment_log2``, FORMAT.md §8.5): files are uploaded
     with revision-3 bodies from then on.  Nothing is rewritten for it: a file's body stays
     revision 1, and reads as such, until the file is next written.

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

from cryptfs.errors import CryptfsError, IntegrityError, NotFound, PreconditionFailed, UsageError
from cryptfs.format.keys import SCHEME_KMS
from cryptfs.format.meta import FORMAT, FORMAT2, FORMAT3, decode_meta, kind_fits_key
from cryptfs.format.volume import CONFIG_NAME, SEGMENT_LOG2_DEFAULT
from cryptfs.keyadmin import SETTLE, check_settle
from cryptfs.store.base import ObjectInfo, bare_etag
from cryptfs.tasks import each
from cryptfs.volume import MARKER, Volume

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
    segments_enabled: bool = False  # step 4 done by this run
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
        if self.segments_enabled:
            lines.append("file bodies:           revision 3 from now on (FORMAT.md §8.5)")
        if self.failed:
            lines.append(f"FAILED:                {len(self.failed)} (see the log; rerun)")
        state = "complete" if self.finished else "NOT complete: rerun the same command"
        lines.append(f"upgrade to format revision 2: {state}")
        return "\n".join(lines)


async def upgrade(
    vol: Volume,
    *,
    concurrency: int = 32,
    progress: Progress | None = None,
    settle: float = SETTLE,
) -> UpgradeReport:
    """See the module docstring.  ``settle``: how long after the config became revision 2
    the last pass may start (running mounts re-read the config every 30 s and write
    revision 2 from then on: an object a mount wrote at revision 1 just before is then not
    stranded by ``objects: [2]``)."""
    check_settle(settle)
    report = UpgradeReport()
    store: Any = vol.store
    started = trio.current_time()
    bytes0 = getattr(store, "bytes_in", 0)
    cfg = vol.config
    if cfg.version >= 2 and 1 not in cfg.objects:
        if _segments(vol, report):
            await vol.save_config()
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

    converted = trio.current_time()
    known: dict[str, str] = {}  # key -> ETag of a version known not to need upgrading
    counted: set[str] = set()
    for _round in range(6):
        settled = trio.current_time() - converted >= settle
        listing = await vol.store.list("", delimiter=None)
        objs = [
            o
            for o in listing.objects
            if o.key != CONFIG_NAME and known.get(o.key) != bare_etag(o.etag)
        ]
        if not objs:
            if settled:
                break
            await trio.sleep(settle - (trio.current_time() - converted))
            continue
        report.objects += sum(1 for o in objs if o.key not in counted)
        await _pass(vol, objs, report, known, counted, concurrency, progress)
        if report.failed:
            break
    else:
        report.failed.append("(objects keep changing: rerun)")
    if not report.failed:
        vol.config.objects = [2]
        _segments(vol, report)
        await vol.save_config()
        report.finished = True
        log.info("upgrade finished: revision-1 objects are refused from now on")
    report.seconds = trio.current_time() - started
    report.bytes_downloaded = getattr(store, "bytes_in", 0) - bytes0
    return report


def _segments(vol: Volume, report: UpgradeReport) -> bool:
    """Step 4: revision-3 bodies for files written from now on (the config, to be saved,
    names a segment size); False if it already does."""
    cfg = vol.config
    if cfg.segment_log2 is not None:
        return False
    cfg.segment_log2 = max(SEGMENT_LOG2_DEFAULT, cfg.chunk_log2)
    cfg.objects = sorted({*cfg.objects, 3})
    report.segments_enabled = True
    log.info("files are written with revision-3 bodies from now on")
    return True


async def _pass(
    vol: Volume,
    objs: list[ObjectInfo],
    report: UpgradeReport,
    known: dict[str, str],
    counted: set[str],
    concurrency: int,
    progress: Progress | None,
) -> None:
    heads: dict[str, ObjectInfo] = {}
    await each(objs, concurrency, lambda o: _head(vol, o, heads, report))
    paths = _Paths(vol, heads)
    todo = [heads[o.key] for o in objs if o.key in heads]
    done = 0

    async def one(info: ObjectInfo) -> None:
        nonlocal done
        first = info.key not in counted
        counted.add(info.key)
        try:
            etag = await _upgrade_one(vol, info, paths, report, first)
            if etag is not None:
                known[info.key] = bare_etag(etag)
        except CryptfsError as e:
            report.failed.append(info.key)
            log.error(
                "upgrade: %s: %s",
                vol.key_ident(info.key),
                vol.scrub(e),
            )
        done += 1
        if progress is not None:
            progress(done, len(todo))

    await each(todo, concurrency, one)


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


async def _upgrade_one(
    vol: Volume, info: ObjectInfo, paths: _Paths, r: UpgradeReport, first: bool = True
) -> str | None:
    """Rewrite one object as revision 2; returns the ETag of a version that needs nothing
    more (None: gone)."""
    for _attempt in range(5):
        md = dict(info.metadata)
        rev = md.get("cfs")
        if rev in (FORMAT2, FORMAT3):
            r.already += first
            return info.etag
        if rev != FORMAT:
            r.foreign += first
            return info.etag
        path = paths.path_of(info)
        meta = decode_meta(vol.keys, path, md)  # revision 1: authenticated for its path
        if not kind_fits_key(meta.attrs.kind, info.key):  # (never sealed to its key: §7.9)
            raise IntegrityError("object kind does not match its key")
        vol.meta.check_wrapping(meta.dek)
        new = vol.meta.encode(path, info.key, meta)
        try:
            etag = await vol.store.copy(info.key, info.key, new, if_match=info.etag, size=info.size)
        except PreconditionFailed:
            try:
                info = await vol.store.head(info.key)  # changed meanwhile: read it again
            except NotFound:
                r.vanished += 1
                return None
            continue
        r.upgraded += 1
        return etag
    raise CryptfsError("object keeps changing; not upgraded")
