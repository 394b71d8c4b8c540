"""``cryptfs ls`` and ``cryptfs decrypt``: read a volume without FUSE (the escape hatch).

Uses the same ``Filesystem`` code path as a mount (so every byte is authenticated), with a
throw-away staging directory.  Owns nothing persistent.
"""

from __future__ import annotations

import contextlib
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
from cryptfs.fs.model import ROOT_INO, Node, Stat
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
    """Write ``node`` (file, symlink, special file or whole directory) to ``dest``; (files,
    bytes).  ``progress`` is told every chunk of bytes written.

    Below ``dest``'s own directory, which the user named, every step is taken relative to a
    directory opened without following symlinks, and every attribute is set on what was
    opened, never through a path again: someone who can write into the destination meanwhile
    (swapping a name for a symlink to /etc between two steps of a restore run as root) makes
    it write, chmod or remove nothing outside it.  What is found at a name to restore is
    replaced, never written through or followed."""
    if dest.name in ("", ".", ".."):  # ("decrypt … ." or "/": the directory itself)
        if node.kind != KIND_DIR:
            raise IsADirectoryError(errno.EISDIR, "a directory is in the way", str(dest))
        fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)  # (followed: the user named it)
        try:
            return await _restore_dir(fs, node, fd, progress)
        finally:
            os.close(fd)
    parent = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY)  # offline CLI: inline I/O
    try:
        return await _restore(fs, node, parent, os.fsencode(dest.name), progress)
    finally:
        os.close(parent)


async def _restore(
    fs: Filesystem,
    node: Node,
    at: int,
    name: bytes,
    progress: Callable[[int], None] | None,
) -> tuple[int, int]:
    """``node`` as ``name`` in the directory open as ``at``."""
    if node.kind == KIND_DIR:
        fd = _directory_at(at, name)
        try:
            return await _restore_dir(fs, node, fd, progress)
        finally:
            os.close(fd)
    st = fs.stat(node)
    if node.kind == KIND_LINK:
        target = await fs.readlink(node.ino)
        _clear_at(at, name)
        os.symlink(target, name, dir_fd=at)
        if os.geteuid() == 0:
            os.chown(name, st.uid, st.gid, dir_fd=at, follow_symlinks=False)
        os.utime(name, ns=(st.atime_ns, st.mtime_ns), dir_fd=at, follow_symlinks=False)
        return 0, 0
    if node.kind in SPECIAL_KINDS:
        if node.kind in DEVICE_KINDS and os.geteuid() != 0:
            log.warning("%s skipped: only root can make a device node", fs.ident(node))
            return 0, 0  # (and whatever the destination holds of that name is left alone)
        _clear_at(at, name)
        # (a socket is made as mknod(2) makes one: a name, no listener; as tar and cp do)
        os.mknod(name, stat.S_IFMT(st.mode) | 0o600, st.rdev, dir_fd=at)
        # its attributes through an O_PATH descriptor of what was made (opening a FIFO or a
        # device for real could block or act): never through the name again
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW, dir_fd=at)
        try:
            if stat.S_IFMT(os.fstat(fd).st_mode) != stat.S_IFMT(st.mode):
                raise FileExistsError(errno.EEXIST, "replaced while restored", os.fsdecode(name))
            _set_attrs(fd, st, via_proc=True)
        finally:
            os.close(fd)
        return 0, 0
    h = await fs.open(node.ino, os.O_RDONLY)
    try:
        _clear_at(at, name)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
        fd = os.open(name, flags, 0o600, dir_fd=at)
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
            _set_attrs(fd, st)
        finally:
            os.close(fd)
    finally:
        await fs.release(h.fh)
    return 1, off


async def _restore_dir(
    fs: Filesystem, node: Node, fd: int, progress: Callable[[int], None] | None
) -> tuple[int, int]:
    """``node``'s entries into the directory open as ``fd``, then its own attributes.  As
    root, the directory is root's and 0700 while its entries are made (one kept from before
    may be someone else's, who could otherwise swap names in it meanwhile, or read what is
    restored before its owner and mode are): its owner and mode come last."""
    if os.geteuid() == 0:
        os.fchown(fd, 0, 0)
        os.fchmod(fd, 0o700)
    files = total = 0
    for child_name, child in await _entries(fs, node):
        f, b = await _restore(fs, child, fd, child_name, progress)
        files += f
        total += b
    _set_attrs(fd, fs.stat(node))
    return files, total


def _directory_at(at: int, name: bytes) -> int:
    """The directory ``name`` in ``at``, made if absent (a symlink or anything else there is
    replaced; a directory there is kept), opened without following a symlink."""
    for _ in range(3):
        try:
            return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=at)
        except FileNotFoundError:
            pass
        except OSError as e:
            if e.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise
            os.unlink(name, dir_fd=at)  # (a symlink, or a file, where a directory goes)
        with contextlib.suppress(FileExistsError):  # (made meanwhile: opened next time)
            os.mkdir(name, 0o700, dir_fd=at)
    raise FileExistsError(errno.EEXIST, "keeps changing while restored", os.fsdecode(name))


def _clear_at(at: int, name: bytes) -> None:
    """Make room for a file, symlink or special file ``name`` in ``at``: whatever is there
    that is not a directory is removed (a directory in the way is an error: its content is
    not ours to remove)."""
    try:
        os.unlink(name, dir_fd=at)
    except FileNotFoundError:
        pass
    except (IsADirectoryError, PermissionError):  # (Linux: EPERM for unlink of a directory)
        if not stat.S_ISDIR(os.stat(name, dir_fd=at, follow_symlinks=False).st_mode):
            raise
        raise IsADirectoryError(
            errno.EISDIR, "a directory is in the way", os.fsdecode(name)
        ) from None


def _set_attrs(fd: int, st: Stat, *, via_proc: bool = False) -> None:
    """Owner (as root), mode and times of what ``fd`` is open on.  ``via_proc``: an O_PATH
    descriptor, which fchmod and fchown refuse; its /proc/self/fd link names that very
    inode (not a path someone can swap)."""
    target: int | str = f"/proc/self/fd/{fd}" if via_proc else fd
    if os.geteuid() == 0:
        os.chown(target, st.uid, st.gid)
    os.chmod(target, stat.S_IMODE(st.mode))
    os.utime(target, ns=(st.atime_ns, st.mtime_ns))


__all__ = ["ROOT_INO", "decrypt_tree", "list_entries", "open_offline"]
