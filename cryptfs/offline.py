"""``cryptfs ls`` and ``cryptfs decrypt``: read a volume without FUSE (the escape hatch).

Uses the same ``Filesystem`` code path as a mount (so every byte is authenticated), with a
throw-away staging directory.  Owns nothing persistent.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from cryptfs.errors import NotFound, VolumeNotFound
from cryptfs.format import s3ec
from cryptfs.format.meta import DEVICE_KINDS, KIND_DIR, KIND_LINK, SPECIAL_KINDS
from cryptfs.format.volume import CONFIG_NAME, KeySource
from cryptfs.fs.filesystem import Filesystem
from cryptfs.fs.model import ROOT_INO, Node
from cryptfs.fs.unmounted import unmounted
from cryptfs.session import Remote, open_remote, volume_session
from cryptfs.store.s3 import S3Location

log = logging.getLogger(__name__)
_READ = 8 << 20


@asynccontextmanager
async def open_offline(
    url: str, source: KeySource, remote: Remote
) -> AsyncIterator[tuple[Filesystem, Node]]:
    """The volume containing ``url`` and the node ``url`` names inside it."""
    loc = S3Location.parse(url)
    parts = [p for p in loc.prefix.split("/") if p]
    async with open_remote(S3Location(loc.bucket, ""), remote) as (bucket_store, kms):
        for cut in range(len(parts), -1, -1):
            candidate = "/".join(parts[:cut])
            try:
                await bucket_store.head((candidate + "/" if candidate else "") + CONFIG_NAME)
            except NotFound:
                continue
            store = bucket_store.with_prefix(candidate)
            inner = parts[cut:]
            break
        else:
            raise VolumeNotFound(f"no cryptfs volume at or above {url}")
        async with (
            volume_session(store, kms, source, remote) as volume,
            unmounted(volume, key_prefix=store.loc.prefix, tool="offline") as fs,
        ):
            node = fs.root
            for comp in inner:
                node = await fs.lookup(node.ino, comp.encode())
            yield fs, node


async def _entries(fs: Filesystem, d: Node) -> list[tuple[bytes, Node]]:
    """``d``'s entries whose names can be names on a local disk.  A foreign object (AWS S3
    Encryption Client) keeps its key as its name, which nothing authenticates: ``..``, an
    empty name, a NUL (or 256 bytes and more) are skipped, never joined to a local path."""
    out = []
    for name, child in await fs.readdir(d.ino):
        problem = s3ec.name_problem(name)
        if problem is None:
            out.append((name, child))
            continue
        # (a foreign name is its object key: in the log only with --log-names)
        log.warning("%s skipped: %s", fs.ident(child), problem)
    return out


async def list_entries(fs: Filesystem, node: Node, long: bool) -> list[str]:
    if node.kind != KIND_DIR:
        entries = [(node.name, node)]
    else:
        entries = await _entries(fs, node)
    out = []
    for name, child in entries:
        text = name.decode(errors="surrogateescape")
        if child.kind == KIND_LINK:
            target = await fs.readlink(child.ino)
            text += " -> " + target.decode(errors="surrogateescape")
        if long:
            st = fs.stat(child)
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(st.mtime_ns / 1e9))
            size = (
                f"{os.major(st.rdev)}, {os.minor(st.rdev)}"
                if child.kind in DEVICE_KINDS
                else st.size
            )
            text = f"{stat.filemode(st.mode)} {st.uid:>5} {st.gid:>5} {size:>12} {when} {text}"
        out.append(text)
    return out


async def decrypt_tree(
    fs: Filesystem,
    node: Node,
    dest: Path,
    progress: Callable[[int], None] | None = None,
) -> tuple[int, int]:
    """Write ``node`` (file, symlink or whole directory) to ``dest``; (files, bytes).

    ``progress`` is told every chunk of bytes written."""
    files = total = 0
    st = fs.stat(node)
    if node.kind == KIND_DIR:
        if not _clear(dest, keep_dir=True):
            os.mkdir(dest)  # offline CLI: local I/O inline is fine
        for name, child in await _entries(fs, node):
            f, b = await decrypt_tree(fs, child, dest / os.fsdecode(name), progress)
            files += f
            total += b
    elif node.kind == KIND_LINK:
        target = await fs.readlink(node.ino)
        _clear(dest)
        os.symlink(target, dest)
    elif node.kind in SPECIAL_KINDS:
        if node.kind in DEVICE_KINDS and os.geteuid() != 0:
            log.warning("%s skipped: only root can make a device node", fs.ident(node))
            return 0, 0  # (and whatever DEST holds of that name is left as it is)
        _clear(dest)
        # (a socket is made as mknod(2) makes one: a name, no listener; as tar and cp do)
        os.mknod(dest, st.mode, st.rdev)
    else:
        h = await fs.open(node.ino, os.O_RDONLY)
        try:
            _clear(dest)  # (never written through: a device, FIFO or symlink found there)
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                off = 0
                while True:
                    data = await fs.read(h.fh, off, _READ)
                    if not data:
                        break
                    os.write(fd, data)
                    off += len(data)
                    if progress is not None:
                        progress(len(data))
            finally:
                os.close(fd)
        finally:
            await fs.release(h.fh)
        files, total = 1, off
    if os.geteuid() == 0:
        os.lchown(dest, st.uid, st.gid)
    if node.kind != KIND_LINK:
        os.chmod(dest, stat.S_IMODE(st.mode))
    os.utime(dest, ns=(st.atime_ns, st.mtime_ns), follow_symlinks=False)
    return files, total


def _clear(dest: Path, *, keep_dir: bool = False) -> bool:
    """Make room at ``dest`` for what is restored there: whatever is there that is not a
    directory to keep (a file, a symlink, a device, a FIFO) is removed, never written or
    followed.  True if ``dest`` is a directory, kept.  A directory where something else is
    to go is an error (its content is not ours to remove)."""
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(st.st_mode):
        if keep_dir:
            return True
        raise IsADirectoryError(errno.EISDIR, "a directory is in the way", str(dest))
    os.unlink(dest)
    return False


__all__ = ["ROOT_INO", "decrypt_tree", "list_entries", "open_offline"]
