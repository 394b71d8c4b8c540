"""Keyslot administration (``cryptfs key list|add|remove``) and master-key rotation
(``cryptfs rotate``).

Rotation replaces the key that wraps every file's data key (a new local master key behind a
new key file, or another KMS key).  Each object is rewritten in place by a server-side
``CopyObject`` with new metadata (``MetadataDirective=REPLACE``, ``CopySourceIfMatch``;
UploadPartCopy above 5 GiB): no content is downloaded or re-encrypted.

Procedure (docs/OPERATIONS.md "Rotating the master key"):
  1. start: one config write sets the new target for new files, replaces every keyslot by one
     slot for the new key whose payload holds the old *and* new master keys;
  2. rewrap: every object not yet under the target is rewrapped (resumable: a rerun skips
     objects already done; concurrent; an object changed meanwhile is re-read and retried);
  3. finish: once nothing refers to an old master key, the slot is resealed without them.
     From then on the old key opens neither the volume nor any object.

Error handling:
    An object whose data key does not unwrap (tampered, foreign, KMS denied) is reported and
    left as it is; the rotation then stops before step 3 so nothing readable is lost.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from cryptfs.errors import (
    CryptfsError,
    IntegrityError,
    NotFound,
    PreconditionFailed,
    UsageError,
)
from cryptfs.format.keys import SCHEME_KMS, SCHEME_LOCAL, WrappedKey, new_master_key
from cryptfs.format.meta import FORMAT
from cryptfs.format.names import b64d, b64e
from cryptfs.format.volume import CONFIG_NAME, KeySource, SlotPayload
from cryptfs.fs.volume import Volume
from cryptfs.keys.keyring import Target, add_kms_slot
from cryptfs.store.base import ObjectInfo
from cryptfs.tasks import open_tasks

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
    removed_slots: list[str] = field(default_factory=list)
    new_slot: str = ""
    target: str = ""
    finished: bool = False
    seconds: float = 0.0
    bytes_downloaded: int = 0
    kms_calls: int = 0

    def summary(self) -> str:
        rate = self.rewrapped / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"objects scanned:       {self.objects}",
            f"data keys rewrapped:   {self.rewrapped} ({rate:.0f}/s)",
            f"already under new key: {self.already}",
            f"directory markers:     {self.directories}",
            f"bytes downloaded:      {self.bytes_downloaded}",
            f"KMS requests:          {self.kms_calls}",
        ]
        if self.foreign:
            lines.append(f"not cryptfs objects:   {self.foreign} (left alone)")
        if self.vanished:
            lines.append(f"deleted meanwhile:     {self.vanished}")
        if self.removed_slots:
            lines.append(f"keyslots removed:      {', '.join(self.removed_slots)}")
        if self.failed:
            lines.append(f"FAILED:                {len(self.failed)} (see the log; rerun)")
        state = "complete" if self.finished else "NOT complete: rerun the same command"
        lines.append(f"rotation to {self.target}: {state}")
        return "\n".join(lines)


Progress = Callable[[int, int], None]


async def rotate(
    vol: Volume,
    *,
    to_source: KeySource | None = None,
    to_kms_key_id: str | None = None,
    resume: bool = False,
    concurrency: int = 32,
    progress: Progress | None = None,
) -> RotateReport:
    """Rotate the volume's master key; see the module docstring for the procedure."""
    store: Any = vol.store
    kms = vol.keyring.kms
    report = RotateReport()
    started = trio.current_time()
    bytes0 = getattr(store, "bytes_in", 0)
    kms0 = kms.calls if kms is not None else 0

    if to_kms_key_id is not None:
        if kms is None:
            raise UsageError("--to-kms-key-id needs KMS access")
        target = Target(SCHEME_KMS, await kms.key_arn(to_kms_key_id))
        resume = resume or Target.of(vol.config) == target
    elif to_source is not None and to_source.keyfile is not None:
        target = Target.of(vol.config) if resume else Target(SCHEME_LOCAL, "")
    else:
        raise UsageError("give --to-key-file or --to-kms-key-id")

    if not resume:
        target, new_slot = await _start(vol, target, to_source, report)
        report.new_slot = new_slot
    report.target = target.kid

    await _rewrap_all(vol, target, report, concurrency, progress)

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
    cfg = vol.config
    old = vol.payload
    if target.scheme == SCHEME_LOCAL:
        kid, mk = new_master_key()
        target = Target(SCHEME_LOCAL, kid)
        payload = SlotPayload(old.vmk, {**old.mks, kid: mk})
    else:
        payload = SlotPayload(old.vmk, dict(old.mks))
    report.removed_slots = [s["id"] for s in cfg.keyslots]
    cfg.keyslots = []
    slot_id = await _seal_target_slot(vol, target, to_source, payload)
    cfg.dek = {"scheme": target.scheme, "kid": target.kid}
    vol.keyring.payload = payload
    await vol.save_config()  # one write: the old slots go, new files use the new key
    vol.slot_id = slot_id
    log.info("rotation started: new files now use %s; old keyslots removed", target.kid)
    return target, slot_id


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
) -> None:
    listing = await vol.store.list("", delimiter=None)
    objs = [o for o in listing.objects if o.key != CONFIG_NAME]
    report.objects = len(objs)
    done = 0
    send, recv = trio.open_memory_channel[ObjectInfo](0)

    async def worker() -> None:
        nonlocal done
        async for info in recv:
            try:
                await _rewrap_one(vol, info, target, report)
            except CryptfsError as e:
                report.failed.append(info.key)
                log.error("rotation: %s: %s", info.key, e)
            done += 1
            if progress is not None:
                progress(done, len(objs))

    async with open_tasks() as nursery:
        for _ in range(max(1, concurrency)):
            nursery.start_soon(worker)
        async with send:
            for o in objs:
                await send.send(o)


async def _rewrap_one(vol: Volume, info: ObjectInfo, target: Target, report: RotateReport) -> None:
    keyring = vol.keyring
    for _attempt in range(5):
        try:
            head = await vol.store.head(info.key)
        except NotFound:
            report.vanished += 1
            return
        md = dict(head.metadata)
        if md.get("cfs") != FORMAT:
            report.foreign += 1
            return
        scheme = md.get("cfs-w")
        if scheme not in (SCHEME_LOCAL, SCHEME_KMS):
            report.directories += 1
            return
        try:
            wk = WrappedKey(scheme, md["cfs-kid"], b64d(md["cfs-k"]))
            file_id = b64d(md["cfs-f"])
        except KeyError as e:
            raise IntegrityError(f"metadata field {e.args[0]} missing") from None
        if keyring.on_target(wk, target):
            report.already += 1
            return
        new = await keyring.rewrap(wk, file_id, target)
        md.update({"cfs-w": new.scheme, "cfs-kid": new.kid, "cfs-k": b64e(new.blob)})
        try:
            await vol.store.copy(info.key, info.key, md, if_match=head.etag, size=head.size)
        except PreconditionFailed:
            continue  # rewritten meanwhile: read it again
        report.rewrapped += 1
        return
    raise CryptfsError("object keeps changing; not rewrapped")


async def _finish(vol: Volume, target: Target, to_source: KeySource | None) -> None:
    """Drop every master key but the target's from the (single) remaining keyslot."""
    old = vol.payload
    mks = {target.kid: old.mks[target.kid]} if target.scheme == SCHEME_LOCAL else {}
    if set(mks) == set(old.mks) and len(vol.config.keyslots) == 1:
        return  # nothing to retire (e.g. a rerun after completion)
    payload = SlotPayload(old.vmk, mks)
    cfg = vol.config
    previous = list(cfg.keyslots)
    cfg.keyslots = []
    try:
        vol.slot_id = await _seal_target_slot(vol, target, to_source, payload)
    except BaseException:
        cfg.keyslots = previous
        raise
    vol.keyring.payload = payload
    await vol.save_config()
    log.info("rotation finished: old master keys retired (%s)", sorted(set(old.mks) - set(mks)))
