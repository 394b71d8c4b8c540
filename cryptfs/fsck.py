"""``cryptfs fsck``: check a volume in the bucket (and this host's staging area for it).

Checks, by walking the tree exactly as a mount does (so every check authenticates):
  - every entry's metadata authenticates for its path, and every file's data key unwraps and
    its body header matches (``--full``: every chunk of every file is read and authenticated);
  - objects that are not reachable from the root (orphans: an interrupted directory rename
    or removal, a name that does not decode) and objects that are not cryptfs's at all;
  - directories that exist only implicitly (objects below, no marker);
  - multipart uploads older than ``--upload-age`` (left by crashes or other tools);
  - files staged on this host and not uploaded yet (the next mount uploads them).

``--repair`` does only what cannot lose data: abort stale multipart uploads and write the
missing markers of implicit directories.  Objects that do not authenticate or are orphaned
are reported, never deleted: deciding about them needs a human (docs/OPERATIONS.md).

Exit codes (like e2fsck): 0 clean; 1 problems found and all repaired; 4 problems left;
8 could not check (usage, unreachable endpoint, wrong key).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptfs.cache.staging import StagingArea
from cryptfs.errors import CryptfsError, NotFound
from cryptfs.format.meta import KIND_DIR, KIND_FILE, SPECIAL_KINDS
from cryptfs.format.names import b64d
from cryptfs.format.volume import CONFIG_NAME
from cryptfs.fs.filesystem import Filesystem
from cryptfs.fs.model import Node, Options
from cryptfs.fs.unmounted import unmounted
from cryptfs.volume import MARKER, Volume

log = logging.getLogger(__name__)

EXIT_CLEAN, EXIT_REPAIRED, EXIT_LEFT, EXIT_ERROR = 0, 1, 4, 8


@dataclass
class FsckReport:
    objects: int = 0
    files: int = 0
    directories: int = 0
    symlinks: int = 0
    special: int = 0  # FIFOs, sockets, devices
    s3ec: int = 0  # AWS S3 Encryption Client objects (shown read-only; see cryptfs import)
    bytes: int = 0
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    orphans: list[tuple[str, str]] = field(default_factory=list)
    implicit_dirs: list[str] = field(default_factory=list)
    stale_uploads: list[tuple[str, str, float]] = field(default_factory=list)
    staged: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)

    def problems(self) -> int:
        return (
            len(self.unreadable)
            + len(self.orphans)
            + len(self.implicit_dirs)
            + len(self.stale_uploads)
        )

    def exit_code(self) -> int:
        if self.problems() == 0:
            return EXIT_CLEAN
        left = self.problems() - len(self.repaired)
        return EXIT_REPAIRED if left <= 0 else EXIT_LEFT

    def summary(self) -> str:
        lines = [
            f"objects: {self.objects}  files: {self.files}  directories: {self.directories}  "
            f"symlinks: {self.symlinks}  special: {self.special}  plaintext bytes: {self.bytes}",
        ]
        if self.s3ec:
            lines.append(
                f"S3 Encryption Client objects (read-only; 'cryptfs import' converts): {self.s3ec}"
            )
        for title, items in (
            ("do not authenticate (read as EIO)", [f"{k}: {w}" for k, w in self.unreadable]),
            ("orphaned (not reachable from the root)", [f"{k}: {w}" for k, w in self.orphans]),
            ("implicit directories (no marker)", self.implicit_dirs),
            (
                "stale multipart uploads",
                [
                    f"{k} (upload {u[:16]}…, {age / 3600:.1f} h old)"
                    for k, u, age in self.stale_uploads
                ],
            ),
            ("staged on this host, not uploaded yet (the next mount uploads them)", self.staged),
            ("repaired", self.repaired),
        ):
            if items:
                lines.append(f"{title}: {len(items)}")
                lines += [f"  {i}" for i in items[:50]]
                if len(items) > 50:
                    lines.append(f"  … and {len(items) - 50} more")
        lines.append("clean" if self.problems() == 0 else f"problems: {self.problems()}")
        return "\n".join(lines)


Progress = Callable[[int, int], None]


async def fsck(
    vol: Volume,
    *,
    key_prefix: str,
    full: bool = False,
    repair: bool = False,
    upload_age: float = 3600.0,
    cache_dir: Path | None = None,
    progress: Progress | None = None,
) -> FsckReport:
    report = FsckReport()
    store = vol.store
    listing = await store.list("", delimiter=None)
    keys = {o.key for o in listing.objects if o.key != CONFIG_NAME}
    report.objects = len(keys)
    reached: set[str] = set()

    options = Options(metadata_ttl=3600.0)
    async with unmounted(vol, options, key_prefix=key_prefix, tool="fsck") as fs:
        await _walk(fs, report, reached, full=full, repair=repair, progress=progress)
        # what the walk could not authenticate; names that do not decode at all belong to
        # objects that are not ours (reported below, as orphans)
        first: dict[str, str] = {}
        for k, why in fs.integrity_log:
            first.setdefault(k, why)
        known = {k for k, _ in report.unreadable}
        for k, why in first.items():
            if k in keys and k not in known and await _is_ours(vol, k):
                report.unreadable.append((k, why))

    bad = {k for k, _ in report.unreadable}
    for key in sorted(keys - reached - bad):
        report.orphans.append((key, await _why_orphan(vol, key)))

    await _stale_uploads(vol, report, upload_age, repair)
    if cache_dir is not None:
        staging = cache_dir / vol.volume_id.hex() / "staging"
        if staging.is_dir():
            area = StagingArea(staging, vol.keys.cache, vol.chunk)
            for rec in area.journals():
                path = b64d(rec["path"]).decode(errors="replace") if rec.get("path") else "?"
                report.staged.append(path)
    return report


async def _walk(
    fs: Filesystem,
    report: FsckReport,
    reached: set[str],
    *,
    full: bool,
    repair: bool,
    progress: Progress | None,
) -> None:
    """The tree as a mount sees it, from the root: every entry authenticated (``--full``:
    every chunk too); the keys it reaches go to ``reached``."""
    reached.add(MARKER)
    stack: list[Node] = [fs.root]
    while stack:
        d = stack.pop()
        report.directories += 1
        try:
            entries = await fs.readdir(d.ino)
        except CryptfsError as e:
            report.unreadable.append((fs.dir_prefix(d) or "/", f"listing failed: {e}"))
            continue
        for _name, node in entries:
            key = fs.dir_prefix(node) + MARKER if node.is_dir else fs.object_key(node)[0]
            reached.add(key)
            if node.is_dir:
                if node.remote_etag is None:
                    report.implicit_dirs.append(fs.dir_prefix(node))
                    if repair:
                        await fs.upload.put_marker(node, create=True)
                        report.repaired.append(f"wrote the marker of {fs.dir_prefix(node)}")
                stack.append(node)
                continue
            await _check_file(fs, node, key, full, report)
            if progress is not None:
                progress(len(reached), max(report.objects, len(reached)))


async def _stale_uploads(vol: Volume, report: FsckReport, upload_age: float, repair: bool) -> None:
    """Multipart uploads older than ``upload_age`` (``--repair``: aborted)."""
    now = time.time()
    for key, upload_id, started in await vol.store.list_uploads(""):
        age = now - started
        if age >= upload_age:
            report.stale_uploads.append((key, upload_id, age))
            if repair:
                try:
                    await vol.store.abort_multipart(key, upload_id)
                    report.repaired.append(f"aborted multipart upload {upload_id[:16]}… of {key}")
                except NotFound:
                    report.repaired.append(f"multipart upload {upload_id[:16]}… already gone")


async def _check_file(fs: Filesystem, node: Node, key: str, full: bool, report: FsckReport) -> None:
    if node.foreign is not None:  # an S3 Encryption Client object: read-only, not ours
        report.s3ec += 1
        report.bytes += node.attrs.size
        if full:
            try:
                h = await fs.open(node.ino, os.O_RDONLY)
                try:
                    await fs.read(h.fh, 0, 1)  # reads and authenticates the whole object
                finally:
                    await fs.release(h.fh)
            except CryptfsError as e:
                report.unreadable.append((key, str(e)))
        return
    if node.kind == KIND_FILE:
        report.files += 1
        report.bytes += node.attrs.size
    elif node.kind in SPECIAL_KINDS:
        report.special += 1  # (its attributes authenticated: its body is empty)
        return
    else:
        report.symlinks += 1
    try:
        if node.kind == KIND_FILE and node.attrs.size > 0:
            await fs.fetch.cipher(node)  # data key unwraps, header and commitment match
            if node.attrs.pin and node.attrs.body != 3 and not full:
                # a pinned revision-1 body (at most 4 MiB) is checked whole: its pin
                await fs.fetch.fetch_chunks(node, 0, 0, {})
            if full:
                h = await fs.open(node.ino, os.O_RDONLY)
                try:
                    off = 0
                    while off < node.attrs.size:
                        data = await fs.read(h.fh, off, 8 << 20)
                        if not data:
                            raise CryptfsError("body shorter than its metadata says")
                        off += len(data)
                finally:
                    await fs.release(h.fh)
                fs.cache.clear()
        elif node.kind != KIND_DIR:
            await fs.readlink(node.ino)
    except CryptfsError as e:
        report.unreadable.append((key, str(e)))


async def _why_orphan(vol: Volume, key: str) -> str:
    try:
        info = await vol.store.head(key)
    except NotFound:
        return "deleted meanwhile"
    except CryptfsError as e:
        return f"cannot read: {e}"
    md: dict[str, Any] = dict(info.metadata)
    if "cfs" not in md:
        return "not a cryptfs object (no cryptfs metadata)"
    parent = key.rsplit("/", 1)[0] + "/" if "/" in key else ""
    if parent and not await _exists(vol, parent + MARKER):
        return "its directory has no marker (left by an interrupted rename or removal?)"
    return "its name does not decode here (written under another volume or name key?)"


async def _is_ours(vol: Volume, key: str) -> bool:
    try:
        return "cfs" in (await vol.store.head(key)).metadata
    except CryptfsError:
        return True


async def _exists(vol: Volume, key: str) -> bool:
    try:
        await vol.store.head(key)
    except NotFound:
        return False
    return True
