"""Keyslot administration (``cryptfs key list|add|remove``) and master-key rotation
(``cryptfs rotate``).

Rotation (volumes at format revision 2, docs/FORMAT.md §7) makes a new master key (it
authenticates the config and every object's metadata, and wraps data keys unless KMS does)
and moves the data keys' target to a new key file's master key or another KMS key.  Each
object is rewritten in place by a server-side ``CopyObject`` with new metadata
(``MetadataDirective=REPLACE``, ``CopySourceIfMatch``; UploadPartCopy above 5 GiB): no
content is downloaded or re-encrypted.

Procedure (docs/OPERATIONS.md "Rotating the master key"):
  1. start: one config write sets the new target, replaces every keyslot by one slot for
     the new key whose payload holds the old *and* new master keys, and names the old ones
     as retiring; a second write bounds them in time (``retiring.until``, §7.8: objects under
     a retiring key are believed only if S3 last modified them before it);
  2. rewrap: every object not yet under the new master key and target is resealed (passes
     repeat over what changed, the last one after ``until``; resumable; concurrent; an object
     changed meanwhile is re-read and retried);
  3. finish: the slot is resealed with only the new master key, the old KMS key leaves
     ``kms_keys``, ``retiring`` goes.  From then on the old keys open, authenticate and
     unwrap nothing.

Error handling:
    An object that does not authenticate (tampered, planted, written under a retiring key
    after the bound) is reported and left: it is unreadable before and after.  One whose data
    key cannot be rewrapped (KMS denied, S3 unreachable) stops the rotation before step 3,
    so nothing readable is lost; a rerun continues.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from cryptfs.errors import (
    CryptfsError,
    IntegrityError,
    NewerFormat,
    NotFound,
    PreconditionFailed,
    UnsupportedFormat,
    UsageError,
)
from cryptfs.format import body3
from cryptfs.format.body import PIN_MAX, body_pin
from cryptfs.format.keys import LOCAL_KID, SCHEME_KMS, SCHEME_LOCAL, new_master_key
from cryptfs.format.meta import FORMATS, KIND_FILE, KIND_LINK, ObjectMeta
from cryptfs.format.volume import CONFIG_NAME, KeySource, Retiring, SlotPayload
from cryptfs.keys.keyring import Target, add_kms_slot
from cryptfs.store.base import ObjectInfo, bare_etag
from cryptfs.tasks import each
from cryptfs.volume import Volume

log = logging.getLogger(__name__)


# -- keyslots --------------------------------------------------------------------------------


def describe_slots(vol: Volume) -> list[str]:
    lines = []
    for s in vol.config.keyslots:
        if s["type"] == "kms":
            detail = f"AWS KMS key {s['key_id']}"
        elif s["type"] == "passphrase":
            detail = f"passphrase, argon2id t={s['t']} m={s['m']}KiB p={s['p']}"
        else:
            detail = "key file"
        mark = "  (used now)" if s["id"] == vol.slot_id else ""
        lines.append(f"{s['id']:<20} {detail}{mark}")
    dek = vol.config.dek
    where = f"AWS KMS key {dek['kid']}" if dek["scheme"] == SCHEME_KMS else "local master key"
    lines.append(f"new files' data keys: {where} ({dek['kid']})")
    return lines


async def add_slot(vol: Volume, source: KeySource | None, kms_key_id: str | None) -> str:
    if kms_key_id is not None:
        if vol.keyring.kms is None:
            raise UsageError("--kms-key-id needs KMS access")
        slot_id = await add_kms_slot(vol.config, vol.keyring.kms, kms_key_id, vol.payload)
    elif source is not None and source.local:
        slot_id = vol.config.add_slot(vol.payload, source)
    else:
        raise UsageError("say what to add: --new-key-file, --new-passphrase-file or --kms-key-id")
    await vol.save_config()
    return slot_id


async def remove_slot(vol: Volume, slot_id: str) -> None:
    vol.config.remove_slot(slot_id)
    await vol.save_config()


# -- rotation --------------------------------------------------------------------------------


@dataclass
class RotateReport:
    objects: int = 0
    rewrapped: int = 0
    already: int = 0
    directories: int = 0
    foreign: int = 0
    vanished: int = 0
    failed: list[str] = field(default_factory=list)
    # objects that authenticate under no key of the volume (tampered, planted): unreadable
    # before and after, so they do not hold the rotation back (a bucket writer could
    # otherwise keep it from finishing)
    unreadable: list[str] = field(default_factory=list)
    # authentic under a retiring key but written after the rotation's bound (a mount that
    # did not stop, or the key's holder): never resealed; they hold the rotation back unless
    # it is told to let them go (--discard-late), since they may be someone's data
    late: list[str] = field(default_factory=list)
    removed_slots: list[str] = field(default_factory=list)
    new_slot: str = ""
    target: str = ""
    finished: bool = False
    seconds: float = 0.0
    bytes_downloaded: int = 0  # (the trailers of the bodies pinned: never a body)
    pinned: int = 0  # bodies whose pin the rotation added (FORMAT.md §8.5, "Pinned bodies")
    unpinned: int = 0  # §2 bodies of files too big to be pinned (left as they were)
    kms_calls: int = 0

    def summary(self) -> str:
        rate = self.rewrapped / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"objects scanned:       {self.objects}",
            f"data keys rewrapped:   {self.rewrapped} ({rate:.0f}/s)",
            f"already under new key: {self.already}",
            f"directory markers:     {self.directories}",
            f"bodies pinned:         {self.pinned} (trailers, or small bodies, read)",
            f"bytes downloaded:      {self.bytes_downloaded}",
            f"KMS requests:          {self.kms_calls}",
        ]
        if self.unpinned:
            lines.append(
                f"not pinned:            {self.unpinned} file(s) of revision-1 bodies over "
                f"{PIN_MAX >> 20} MiB: whoever held their data keys before can still replace "
                "them until they are next written (SECURITY.md)"
            )
        if self.foreign:
            lines.append(f"not cryptfs objects:   {self.foreign} (left alone)")
        if self.vanished:
            lines.append(f"deleted meanwhile:     {self.vanished}")
        if self.removed_slots:
            lines.append(f"keyslots removed:      {', '.join(self.removed_slots)}")
        if self.unreadable:
            lines.append(
                f"do not authenticate:   {len(self.unreadable)} (left as they are; they read "
                "EIO; fsck --full lists them):"
            )
            lines += [f"  {k}" for k in sorted(self.unreadable)[:20]]
        if self.late:
            lines.append(
                f"written late:          {len(self.late)} (under a retiring key after the "
                "rotation began; not resealed: copy them from a mount with the new key, or "
                "rerun with --discard-late):"
            )
            lines += [f"  {k}" for k in sorted(self.late)[:20]]
        if self.failed:
            lines.append(f"FAILED:                {len(self.failed)} (rerun):")
            lines += [f"  {k}" for k in sorted(self.failed)[:20]]
        state = "complete" if self.finished else "NOT complete: rerun the same command"
        lines.append(f"rotation to {self.target}: {state}")
        return "\n".join(lines)


Progress = Callable[[int, int], None]
SETTLE = 35.0  # the config re-read interval of running mounts (30 s), and a margin


def check_settle(settle: float) -> None:
    """How long a rotation or an upgrade waits for running mounts to re-read the config."""
    if not 0 <= settle < 86400:
        raise UsageError("--settle must be between 0 and 86400 seconds")


CLOCK_SKEW = 120  # seconds the S3 server's clock may be ahead of the rotating client's


async def rotate(
    vol: Volume,
    *,
    to_source: KeySource | None = None,
    to_kms_key_id: str | None = None,
    resume: bool = False,
    concurrency: int = 32,
    progress: Progress | None = None,
    settle: float = SETTLE,
    discard_late: bool = False,
) -> RotateReport:
    """Rotate the volume's master key; see the module docstring for the procedure.
    ``settle``: how long after the start the last pass may begin (running mounts re-read the
    config every 30 s, and write under their old keys until then)."""
    cfg = vol.config
    check_settle(settle)
    if cfg.version < 2 or 1 in cfg.objects:
        raise UsageError(
            "this volume is still at format revision 1, whose rotation revokes nothing: run "
            "'cryptfs upgrade' first"
        )
    store: Any = vol.store
    kms = vol.keyring.kms
    report = RotateReport()
    started = trio.current_time()
    bytes0 = getattr(store, "bytes_in", 0)
    kms0 = kms.calls if kms is not None else 0

    in_progress = len(vol.payload.mks) > 1
    if to_kms_key_id is not None:
        if kms is None:
            raise UsageError("--to-kms-key-id needs KMS access")
        target = Target(SCHEME_KMS, await kms.key_arn(to_kms_key_id))
    elif to_source is not None and to_source.keyfile is not None:
        target = Target(SCHEME_LOCAL, "")
    else:
        raise UsageError("give --to-key-file or --to-kms-key-id")
    if in_progress or resume:
        current = Target.of(cfg)
        if target.scheme != current.scheme or (
            target.scheme == SCHEME_KMS and target.kid != current.kid
        ):
            raise UsageError(
                f"a rotation to {current.kid} is not finished: run it again with that target"
            )
        target = current
    else:
        target, new_slot = await _start(vol, target, to_source, report)
        report.new_slot = new_slot
    await _bound_retiring(vol, settle)
    await _abort_early_uploads(vol)  # (again before the last pass, once the bound has passed)
    report.target = target.kid

    await _rewrap_all(vol, target, report, concurrency, progress, settle)
    if report.late and not discard_late:
        report.failed.append("(objects written late under a retiring key: see above)")

    if not report.failed:
        await _finish(vol, target, to_source)
        report.finished = True
    report.seconds = trio.current_time() - started
    report.bytes_downloaded = getattr(store, "bytes_in", 0) - bytes0
    report.kms_calls = (kms.calls if kms is not None else 0) - kms0
    return report


async def _start(
    vol: Volume, target: Target, to_source: KeySource | None, report: RotateReport
) -> tuple[Target, str]:
    """One config write: a new master key (always: it also authenticates all metadata), the
    new target for data keys, every old keyslot replaced by one for the new key."""
    cfg = vol.config
    old = vol.payload
    kid, mk = new_master_key()
    mks = dict(old.mks)
    if old.rev == 1:
        mks[LOCAL_KID] = old.vmk  # an upgraded volume's metadata is sealed under it until now
    mks[kid] = mk
    payload = SlotPayload(old.vmk, mks, current=kid)
    if target.scheme == SCHEME_LOCAL:
        target = Target(SCHEME_LOCAL, kid)
    else:
        cfg.kms_keys = sorted(set(cfg.kms_keys) | {target.kid})
    report.removed_slots = [s["id"] for s in cfg.keyslots]
    previous = list(cfg.keyslots)
    cfg.keyslots = []
    try:
        slot_id = await _seal_target_slot(vol, target, to_source, payload)
    except BaseException:
        cfg.keyslots = previous
        raise
    old_kms = [cfg.dek["kid"]] if cfg.dek["scheme"] == SCHEME_KMS else []
    cfg.retiring = Retiring(
        sorted(set(payload.mks) - {kid}),
        [k for k in old_kms if k != target.kid],
        until=0,
        began=int(time.time()),
    )
    cfg.dek = {"scheme": target.scheme, "kid": target.kid}
    vol.set_payload(payload)
    await vol.save_config()  # one write: the old slots go, new files use the new keys
    vol.slot_id = slot_id
    if target.scheme == SCHEME_KMS and vol.state is not None:
        vol.state.see(cfg.epoch, target.kid)
    log.info("rotation started: new files now use %s; old keyslots removed", target.kid)
    return target, slot_id


async def _bound_retiring(vol: Volume, settle: float) -> None:
    """The second config write of a rotation: objects under a retiring key are believed
    only if the S3 server last modified them by the first write's Last-Modified plus the time
    running mounts take to re-read the config (``settle``), plus a second of rounding.  A
    bucket writer cannot backdate Last-Modified: whatever the holder of a retired key plants
    later is refused by every reader, and never resealed (docs/FORMAT.md §7.8)."""
    ret = vol.config.retiring
    if ret is None or ret.until:
        return
    started = (await vol.store.head(CONFIG_NAME)).modified
    if not started:
        raise CryptfsError("the S3 server gave the volume config no Last-Modified time")
    # (never later than the rotating client's own clock at the first write allows: a bucket
    # writer who touched the config since, e.g. while a crashed rotation waited for its
    # rerun, moves nothing)
    started = min(started, ret.began + CLOCK_SKEW)
    ret.until = math.ceil(started + settle) + 1
    await vol.save_config()
    log.info("rotation: objects under the retiring keys are accepted up to %d", ret.until)


async def _seal_target_slot(
    vol: Volume, target: Target, to_source: KeySource | None, payload: SlotPayload
) -> str:
    if target.scheme == SCHEME_KMS:
        assert vol.keyring.kms is not None
        return await add_kms_slot(vol.config, vol.keyring.kms, target.kid, payload)
    assert to_source is not None
    return vol.config.add_slot(payload, KeySource(keyfile=to_source.keyfile))


async def _rewrap_all(
    vol: Volume,
    target: Target,
    report: RotateReport,
    concurrency: int,
    progress: Progress | None,
    settle: float,
) -> None:
    """Every object under the new master key and data-key target.  Passes repeat over what
    changed since the last one (a mount that wrote meanwhile under its old keys: it does so
    until it re-reads the config, within 30 s), until a pass that starts ``settle`` seconds
    after the rotation started finds nothing new."""
    started = trio.current_time()
    done: dict[str, str] = {}  # key -> the ETag known to be on target
    snapshot: dict[str, str] | None = None  # what the first listing showed
    aborted = False
    changed_at = started  # the end of the last pass that rewrote anything
    for _round in range(8):
        settled = trio.current_time() - started >= settle
        if settled and not aborted:
            await _abort_early_uploads(vol)
            aborted = True
        listing = await vol.store.list("", delimiter=None)
        if snapshot is None:
            snapshot = {o.key: bare_etag(o.etag) for o in listing.objects}
        objs = [
            o
            for o in listing.objects
            if o.key != CONFIG_NAME and done.get(o.key) != bare_etag(o.etag)
        ]
        verify = False
        if not objs:
            if not settled:
                await trio.sleep(settle - (trio.current_time() - started))
                continue
            # the last pass looks at every object again (a HEAD each), ``settle`` after the
            # last change: a mount's copy of attributes in place keeps the ETag, and one that
            # read the metadata before the rotation got to it may have written it back with
            # the data key under a retiring key (and no pin) after the rotation's pass
            wait = changed_at + settle - trio.current_time()
            if wait > 0:
                await trio.sleep(wait)
            objs = [o for o in listing.objects if o.key != CONFIG_NAME]
            verify = True
        if _round == 0:
            report.objects = len(objs)
        before = (report.rewrapped, report.pinned, report.directories)
        await _pass_over(vol, objs, target, report, done, snapshot, concurrency, progress)
        if report.failed:
            return
        if (report.rewrapped, report.pinned, report.directories) != before:
            changed_at = trio.current_time()
        elif verify:
            return
    report.failed.append("(objects keep changing: rerun)")


async def _abort_early_uploads(vol: Volume) -> None:
    """Multipart uploads begun before the rotation's bound: on S3 servers that date an object
    by the start of its upload (AWS), the holder of a retiring key could otherwise begin one
    in time, then complete it with any content and have it believed (docs/FORMAT.md §7.8).
    (A mount's own upload begun then was under its old key anyway: it retries, or holds.)"""
    ret = vol.config.retiring
    if ret is None:
        return
    for key, upload_id, initiated in await vol.store.list_uploads(""):
        if initiated <= ret.until:
            with contextlib.suppress(NotFound):
                await vol.store.abort_multipart(key, upload_id)
            log.info("rotation: aborted multipart upload %s begun before the bound", upload_id[:16])


async def _pass_over(
    vol: Volume,
    objs: list[ObjectInfo],
    target: Target,
    report: RotateReport,
    done: dict[str, str],
    snapshot: dict[str, str],
    concurrency: int,
    progress: Progress | None,
) -> None:
    count = 0

    async def one(info: ObjectInfo) -> None:
        nonlocal count
        try:
            etag = await _rewrap_one(
                vol, info, target, report, snapshot, first=info.key not in done
            )
            if etag is not None:
                done[info.key] = bare_etag(etag)
        except _Late as e:
            if info.key not in report.late:
                report.late.append(info.key)
            done[info.key] = bare_etag(info.etag)
            log.error(
                "rotation: %s was written under a retiring key after the rotation began "
                "(a mount that did not stop, or planted by its holder): not resealed: %s",
                vol.key_ident(info.key),
                e,
            )
        except NewerFormat as e:  # (authenticated: left behind, the new key would strand it)
            report.failed.append(info.key)
            log.error("rotation: %s was written by a later cryptfs (upgrade this host): %s",
                      vol.key_ident(info.key), vol.scrub(e))  # fmt: skip
        except (IntegrityError, UnsupportedFormat) as e:
            if info.key not in report.unreadable:
                report.unreadable.append(info.key)
            done[info.key] = bare_etag(info.etag)
            log.error(
                "rotation: %s does not authenticate, left as it is: %s",
                vol.key_ident(info.key),
                vol.scrub(e),
            )
        except CryptfsError as e:
            report.failed.append(info.key)
            log.error(
                "rotation: %s: %s",
                vol.key_ident(info.key),
                vol.scrub(e),
            )
        count += 1
        if progress is not None:
            progress(count, len(objs))

    await each(objs, concurrency, one)


async def _body_pin(vol: Volume, key: str, etag: str, meta: ObjectMeta) -> bytes:
    """The pin of a revision-3 body (FORMAT.md §8.5, "Pinned bodies"): its trailer's bytes
    (one ranged GET of that version), hashed; no data key is unwrapped (a KMS volume's
    rotation makes no Decrypt per file)."""
    a = meta.attrs
    seg = vol.segment_bytes()
    lo, ln = body3.trailer_span(a.size, seg, vol.chunk)
    _info, tail = await vol.store.get(key, lo, lo + ln, if_match=etag)
    if len(tail) != ln:
        raise IntegrityError("the object is shorter than its metadata says")
    return body3.trailer_pin(tail, a.size, seg, vol.chunk)


class _Late(CryptfsError):
    """Authentic under a retiring key, but written after the rotation's bound."""


async def _rewrap_one(
    vol: Volume,
    info: ObjectInfo,
    target: Target,
    report: RotateReport,
    snapshot: dict[str, str] | None = None,
    first: bool = True,
) -> str | None:
    """Rewrite one object's metadata under the current master key and its data key under
    ``target``; returns its ETag then (None: not ours, or gone)."""
    keyring = vol.keyring
    for _attempt in range(5):
        try:
            head = await vol.store.head(info.key)
        except NotFound:
            report.vanished += 1
            return None
        md = dict(head.metadata)
        if md.get("cfs") not in FORMATS:
            report.foreign += 1
            return None
        codec = vol.meta
        # revision 2: bound to the key, not the path; under a retiring key only if written
        # before the rotation's bound
        try:
            meta = codec.decode(b"", info.key, md, head.modified)
        except IntegrityError:
            with contextlib.suppress(NewerFormat):  # (authentic: late whatever its kind)
                codec.decode(b"", info.key, md, window=False)  # raises: authentic under nothing
            raise _Late("last modified after the bound") from None
        wk = meta.dek
        retiring = codec.retiring_keys
        under_retiring = codec.sealed_by(md) in retiring or (wk is not None and wk.kid in retiring)
        if (
            under_retiring
            and "-" in bare_etag(head.etag)
            and (snapshot or {}).get(info.key) != bare_etag(head.etag)
        ):
            # a multipart object under a retiring key that the rotation's first listing did
            # not show: its Last-Modified may be the start of its upload (AWS), not its end
            raise _Late("a multipart upload completed after the rotation began")
        on_target = wk is None or keyring.on_target(wk, target)
        a = meta.attrs
        small1 = a.body == 1 and head.size <= PIN_MAX and a.kind in (KIND_FILE, KIND_LINK)
        # (a pin in metadata sealed under a retiring key is the holder of that key's to write:
        # it is made again from the body, never carried over)
        trusted = bool(a.pin) and codec.sealed_by(md) == codec.cur
        unpinned = wk is not None and not trusted and (a.body == 3 or small1)
        big1 = a.body == 1 and not small1 and a.kind == KIND_FILE
        if wk is not None and not a.pin and big1 and first:
            report.unpinned += 1  # (a §2 body too big to be checked whole by a reader)
        if on_target and codec.sealed_by(md) == codec.cur and not unpinned:
            if not first:
                pass  # counted in an earlier pass
            elif wk is None:
                report.directories += 1
            else:
                report.already += 1
            return head.etag
        attrs = meta.attrs
        if unpinned:
            # its data key predates this rotation: whoever held it could seal other bytes
            # under it later; the body's pin in the resealed metadata refuses them
            assert wk is not None
            if a.body == 3:
                attrs = attrs.with_(pin=await _body_pin(vol, info.key, head.etag, meta))
            else:
                _i, whole = await vol.store.get(info.key, if_match=head.etag)
                attrs = attrs.with_(pin=body_pin(whole))
            report.pinned += 1
        if not on_target:
            assert wk is not None
            wk = await keyring.rewrap(wk, meta.file_id, target)
        new = codec.encode(b"", info.key, ObjectMeta(meta.file_id, attrs, wk, meta.long_name))
        try:
            etag = await vol.store.copy(info.key, info.key, new, if_match=head.etag, size=head.size)
        except PreconditionFailed:
            continue  # rewritten meanwhile: read it again
        if wk is None:
            report.directories += 1
        else:
            report.rewrapped += 1
        return etag
    raise CryptfsError("object keeps changing; not rewrapped")


async def _finish(vol: Volume, target: Target, to_source: KeySource | None) -> None:
    """Drop every master key but the current one from the (single) remaining keyslot, and
    every KMS key but the target from the config: from then on nothing sealed or wrapped
    under an old key is accepted."""
    old = vol.payload
    cur = old.cur
    mk = old.master(cur)
    assert mk is not None
    cfg = vol.config
    kms_keys = [target.kid] if target.scheme == SCHEME_KMS else []
    if (
        set(old.mks) == {cur}
        and len(cfg.keyslots) == 1
        and cfg.kms_keys == kms_keys
        and cfg.retiring is None
    ):
        return  # nothing to retire (e.g. a rerun after completion)
    payload = SlotPayload(old.vmk, {cur: mk}, current=cur)
    previous = list(cfg.keyslots)
    cfg.keyslots = []
    try:
        vol.slot_id = await _seal_target_slot(vol, target, to_source, payload)
    except BaseException:
        cfg.keyslots = previous
        raise
    cfg.kms_keys = kms_keys
    cfg.retiring = None
    vol.set_payload(payload)
    await vol.save_config()
    log.info("rotation finished: old master keys retired (%s)", sorted(set(old.mks) - {cur}))
