"""``cryptfs import``: convert AWS S3 Encryption Client objects in a volume's prefix to the
native format (random access, encrypted names, path-bound attributes), in place.

For each object under the volume's prefix that carries S3EC v2/v3 metadata (on the object or
in its instruction file, ``<key>.instruction``): the whole object
is downloaded (at most ``max_size``), its data key unwrapped by AWS KMS with the encryption
context stored in the object, the whole body authenticated, and only then is the plaintext
written as a native file at the same path (directories created as needed) and the original
deleted (then its instruction file, if it had one).  A rerun skips what is done (resumable):
an original whose native copy already exists with the same content is only deleted; one whose
name a different native file has is kept and listed.  Objects that fail stay as they are and
are listed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptfs.errors import CryptfsError, Exists, IntegrityError, UsageError
from cryptfs.format import s3ec
from cryptfs.format.meta import KIND_DIR
from cryptfs.format.s3ec import S3ecObject
from cryptfs.format.volume import CONFIG_NAME
from cryptfs.fs.filesystem import Filesystem
from cryptfs.fs.foreign import s3ec_envelope
from cryptfs.fs.model import ROOT_INO, Node, Options
from cryptfs.fs.unmounted import unmounted
from cryptfs.volume import Volume

log = logging.getLogger(__name__)


@dataclass
class ImportReport:
    scanned: int = 0
    found: int = 0
    imported: int = 0
    bytes: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"objects scanned:             {self.scanned}",
            f"S3 Encryption Client objects: {self.found}",
            f"imported:                    {self.imported} ({self.bytes} bytes)",
        ]
        if self.failed:
            lines.append(f"FAILED (left as they were):  {len(self.failed)}")
            lines += [f"  {k}: {why}" for k, why in self.failed[:50]]
        return "\n".join(lines)


async def import_s3ec(
    vol: Volume,
    *,
    key_prefix: str,
    paths: tuple[str, ...] | None,
    max_size: int = 1 << 30,
    progress: Callable[[int, int], None] | None = None,
) -> ImportReport:
    """Import the S3EC objects whose keys start with one of ``paths`` (relative to the
    volume; None: every one, which the user must ask for).  Once imported, an object's bytes
    become an authenticated native file: only what the user pointed at is converted."""
    if not vol.config.encrypt_names:
        raise UsageError("import needs a volume with encrypted names (native keys differ)")
    store = vol.store
    report = ImportReport()
    listing = await store.list("", delimiter=None)
    every = {o.key for o in listing.objects}
    keys = [
        o.key
        for o in listing.objects
        if o.key != CONFIG_NAME
        and not s3ec.is_instruction_of_listed(o.key, every)  # part of its object
        and (paths is None or any(_under(o.key, p) for p in paths))
    ]
    report.scanned = len(keys)
    # native entries only: the S3EC originals must never be mistaken for the copies
    options = Options(writeback_delay=3600.0, show_foreign=False)
    async with unmounted(vol, options, key_prefix=key_prefix, tool="import") as fs:
        for i, key in enumerate(keys):
            if progress is not None:
                progress(i + 1, len(keys))
            try:
                info = await store.head(key)
                if "cfs" in info.metadata:
                    continue  # one of ours
                env = await s3ec_envelope(
                    store, key, dict(info.metadata), s3ec.has_instruction(key, every)
                )
            except CryptfsError as e:
                report.failed.append((key, str(e)))
                continue
            if env is None:
                continue
            report.found += 1
            if _at_native_key(vol, key):
                # a mount never shows an S3EC object there (it would stand in for a file)
                report.failed.append((key, "an S3EC object at a cryptfs key: not imported"))
                continue
            try:
                size = await _import_one(fs, key, info.size, env, max_size)
            except CryptfsError as e:
                log.error("import of %s failed: %s", fs.key_ident(key), fs.scrub(e))
                report.failed.append((key, str(e)))
                continue
            report.imported += 1
            report.bytes += size
    return report


def _under(key: str, path: str) -> bool:
    p = path.strip("/")
    return not p or key == p or key.startswith(p + "/")


def _at_native_key(vol: Volume, key: str) -> bool:
    """Is ``key`` in the native (encrypted-name) tree, where only cryptfs objects belong?"""
    first = key.split("/", 1)[0]
    if vol.names.is_long(first):
        return True
    try:
        vol.names.decode(b"/", first)
    except CryptfsError:
        return False
    return True


async def _import_one(fs: Filesystem, key: str, size: int, env: S3ecObject, max_size: int) -> int:
    plain_size = env.plain_size(size)
    if size > max_size:
        raise UsageError(f"{size} bytes is over --max-size ({max_size}); not downloaded")
    problem = next(filter(None, map(s3ec.name_problem, key.split("/"))), None)
    if problem is not None:  # (its key would be the native path: nothing authenticates it)
        raise UsageError(f"not imported: its key has {problem}")
    parts = [p.encode(errors="surrogateescape") for p in key.split("/")]
    parent = await _mkdir_p(fs, parts[:-1])
    node = await fs.look.find(parent, parts[-1])
    _info, body = await fs.store.get(key)
    try:
        data_key = await fs.vol.keyring.unwrap_s3ec(env, key)
    except CryptfsError as e:
        e.object_keys += (key,)  # (its message names the object by its key)
        raise
    plain = s3ec.decrypt(env, data_key, body)  # authenticated as a whole
    if node is not None:
        # a rerun after a crash between the import and the delete: the original goes only
        # if the native file holds its content (the same size was taken as enough: another
        # file of that size and name lost the original)
        if node.attrs.size != len(plain) or await _content(fs, node) != plain:
            raise Exists(
                f"{key}: a different native file already has this name", object_keys=(key,)
            )
    else:
        node, h = await fs.create(parent.ino, parts[-1], 0o644, fs.opt.uid, fs.opt.gid)
        await fs.write(h.fh, 0, plain)
        await fs.release(h.fh)
        await fs.sync_node(node)
        if node.attrs.size != plain_size:
            raise IntegrityError("imported size differs")
    await fs.store.delete(key)
    if env.instruction:
        await fs.store.delete(key + s3ec.INSTRUCTION_SUFFIX)
    log.info("imported %s as %s (%d bytes, S3EC v%d)", fs.key_ident(key), fs.ident(node),
             plain_size, env.version)  # fmt: skip
    return plain_size


async def _content(fs: Filesystem, node: Node) -> bytes:
    h = await fs.open(node.ino, os.O_RDONLY)
    try:
        out = bytearray()
        while len(out) < node.attrs.size:
            got = await fs.read(h.fh, len(out), min(4 << 20, node.attrs.size - len(out)))
            if not got:
                break
            out += got
        return bytes(out)
    finally:
        await fs.release(h.fh)


async def _mkdir_p(fs: Filesystem, parts: list[bytes]) -> Node:
    node = fs.root
    for comp in parts:
        child = await fs.look.find(node, comp)
        if child is None:
            child = await fs.mkdir(node.ino, comp, 0o755, fs.opt.uid, fs.opt.gid)
        elif child.attrs.kind != KIND_DIR:
            name = comp.decode(errors="replace")
            raise Exists(f"{name} exists and is not a directory", names=(name,))
        node = child
    return node


__all__ = ["ROOT_INO", "ImportReport", "import_s3ec"]
